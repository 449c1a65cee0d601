//! Actor-hop benchmarks, same thread, one request in flight.
//!
//! - `actors/bare_actix_router`: the anchor. A minimal hand-written actix
//!   router doing the same hops as procbroker: caller → router (pending map,
//!   round-robin over 4 workers) → worker → router → caller (oneshot).
//! - `actors/procbroker_router_inproc`: the same round trip through
//!   procbroker's Router and in-process echo workers: envelopes, pending table
//!   with deadlines, counters and latency histograms on.
//! - `actors/procbroker_router_inproc_no_latency`: the same with latency
//!   recording off, to price it.
//!
//! Run: `cargo bench --bench actors`. Compare ratios within one run.

use actix::prelude::*;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use procbroker::config::BrokerConfig;
use procbroker::embed::{BrokerHandle, ProcBroker};
use procbroker::protocol::{Envelope, Payload};
use procbroker::service::Methods;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

// ---- the anchor: a minimal actix router -----------------------------------

#[derive(Message)]
#[rtype(result = "()")]
struct BareCall {
    payload: Bytes,
    reply: oneshot::Sender<Bytes>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct BareRequest {
    id: u64,
    payload: Bytes,
}

#[derive(Message)]
#[rtype(result = "()")]
struct BareResponse {
    id: u64,
    payload: Bytes,
}

#[derive(Default)]
struct BareRouter {
    workers: Vec<Recipient<BareRequest>>,
    cursor: usize,
    next_id: u64,
    pending: HashMap<u64, oneshot::Sender<Bytes>>,
}

impl Actor for BareRouter {
    type Context = Context<Self>;
}

impl Handler<BareCall> for BareRouter {
    type Result = ();
    fn handle(&mut self, msg: BareCall, _: &mut Self::Context) {
        self.next_id += 1;
        self.pending.insert(self.next_id, msg.reply);
        let worker = &self.workers[self.cursor];
        self.cursor = (self.cursor + 1) % self.workers.len();
        worker.do_send(BareRequest {
            id: self.next_id,
            payload: msg.payload,
        });
    }
}

impl Handler<BareResponse> for BareRouter {
    type Result = ();
    fn handle(&mut self, msg: BareResponse, _: &mut Self::Context) {
        if let Some(reply) = self.pending.remove(&msg.id) {
            let _ = reply.send(msg.payload);
        }
    }
}

struct BareWorker {
    router: Addr<BareRouter>,
}

impl Actor for BareWorker {
    type Context = Context<Self>;
}

impl Handler<BareRequest> for BareWorker {
    type Result = ();
    fn handle(&mut self, msg: BareRequest, _: &mut Self::Context) {
        self.router.do_send(BareResponse {
            id: msg.id,
            payload: msg.payload,
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct SetWorkers(Vec<Recipient<BareRequest>>);

impl Handler<SetWorkers> for BareRouter {
    type Result = ();
    fn handle(&mut self, msg: SetWorkers, _: &mut Self::Context) {
        self.workers = msg.0;
    }
}

async fn start_bare() -> Addr<BareRouter> {
    let router = BareRouter::default().start();
    let workers = (0..4)
        .map(|_| {
            BareWorker {
                router: router.clone(),
            }
            .start()
            .recipient()
        })
        .collect();
    router.send(SetWorkers(workers)).await.expect("router");
    router
}

// ---- procbroker ---------------------------------------------------------------

async fn start_procbroker(record_latency: bool) -> BrokerHandle {
    let config = BrokerConfig {
        sysmon_interval: None,
        record_latency,
        ..BrokerConfig::default()
    };
    let broker = ProcBroker::builder().config(config).start();
    // Answers at once, as the bare worker does: like for like.
    let echo = Methods::new().raw_sync("Echo", |request: Envelope| Ok(request.payload));
    broker.add_service("echo", 4, echo).await.expect("add");
    broker
}

fn benches(c: &mut Criterion) {
    let system = System::new();
    let payload = Bytes::from_static(&[0xa4, b't', b'e', b's', b't']);
    let request = Envelope::request("echo", "Echo", 0)
        .with_raw_payload(Payload::from_msgpack(payload.clone()).expect("msgpack"));

    let bare = system.block_on(start_bare());
    let with_latency = system.block_on(start_procbroker(true));
    let without_latency = system.block_on(start_procbroker(false));

    let mut group = c.benchmark_group("actors");
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("bare_actix_router", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (reply, answer) = oneshot::channel();
                    bare.do_send(BareCall {
                        payload: payload.clone(),
                        reply,
                    });
                    criterion::black_box(answer.await.expect("reply"));
                }
                start.elapsed()
            })
        })
    });
    for (id, broker) in [
        ("procbroker_router_inproc", &with_latency),
        ("procbroker_router_inproc_no_latency", &without_latency),
    ] {
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let reply = broker.call_envelope(request.clone()).await.expect("reply");
                        criterion::black_box(reply);
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(actor_benches, benches);
criterion_main!(actor_benches);
