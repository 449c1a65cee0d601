//! Broker: the control plane. It is the process `broker` in the routing table
//! and answers the broker's RPCs (DESIGN 4); it keeps the process table that
//! `ListProcesses` shows and reports life-cycle changes to the MetricsStore.
//!
//! Every reply copies the request's `correlation_id` (it is built from the
//! request itself), so no RPC can lose it the way v2e's did.
//!
//! `Spawn` and `Stop` need the subprocess bridges, which this build does not
//! have yet: they answer `unknown_method` with a message saying so (after the
//! `control_allow` check, which already applies).

use actix::prelude::*;
use bytestring::ByteString;
use std::collections::BTreeMap;

use super::metrics_store::{MetricsStore, ProcessLifecycle, SubmitMetrics, fresh_stats};
use super::router::{Deliver, Route, Router, SetReady};
use crate::config::BrokerConfig;
use crate::names::{BROKER, CALLER, service_of};
use crate::protocol::rpc::{
    BrokerMethod, Empty, MessageCount, ProcessInfo, ProcessStatus, SubmitProcessMetrics,
    SubmitProcessMetricsReply,
};
use crate::protocol::{Envelope, ErrorCode, MessageType, Payload};

/// Adds a process to the table `ListProcesses` shows.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct TrackProcess(pub ProcessInfo);

/// The Broker actor.
pub struct Broker {
    config: BrokerConfig,
    router: Addr<Router>,
    metrics: Addr<MetricsStore>,
    processes: BTreeMap<String, ProcessInfo>,
    id: ByteString,
}

impl Broker {
    /// A Broker answering through `router`.
    pub fn new(config: BrokerConfig, router: Addr<Router>, metrics: Addr<MetricsStore>) -> Self {
        Self {
            config,
            router,
            metrics,
            processes: BTreeMap::new(),
            id: ByteString::from_static(BROKER),
        }
    }

    fn send(&self, reply: Envelope) {
        self.router.do_send(Route {
            from: self.id.clone(),
            envelope: reply,
        });
    }

    fn reply<T: serde::Serialize>(&self, request: &Envelope, value: &T) {
        let reply = match Payload::encode(value) {
            Ok(payload) => request.response(Some(payload)),
            Err(e) => request.broker_error(ErrorCode::Internal, e.to_string()),
        };
        self.send(reply);
    }

    fn fail(&self, request: &Envelope, code: ErrorCode, message: impl Into<ByteString>) {
        self.send(request.broker_error(code, message));
    }

    fn lifecycle(&self, info: &ProcessInfo) {
        self.metrics.do_send(ProcessLifecycle {
            id: info.id.clone(),
            service: info.service.clone(),
            status: info.status,
            pid: info.pid,
            restarts: info.restarts,
            exit_code: info.exit_code,
        });
    }

    fn handle_request(&mut self, request: Envelope, ctx: &mut Context<Self>) {
        let method = match request.id.parse::<BrokerMethod>() {
            Ok(method) => method,
            Err(e) => return self.fail(&request, ErrorCode::UnknownMethod, e.to_string()),
        };
        if method.is_control() && !self.may_control(&request.source) {
            let message = format!(
                "{:?} may not call {method}: its service is not in broker.control_allow",
                &*request.source
            );
            return self.fail(&request, ErrorCode::Forbidden, message);
        }
        match method {
            BrokerMethod::Ping => self.reply(&request, &Empty {}),
            BrokerMethod::ListProcesses => {
                let list: Vec<&ProcessInfo> = self.processes.values().collect();
                self.reply(&request, &list);
            }
            BrokerMethod::GetMessageStats | BrokerMethod::GetMessageCount => {
                ctx.spawn(
                    fresh_stats(self.router.clone(), self.metrics.clone())
                        .into_actor(self)
                        .map(move |stats, broker, _| match stats {
                            Err(e) => broker.fail(&request, ErrorCode::Internal, e.to_string()),
                            Ok(stats) if method == BrokerMethod::GetMessageStats => {
                                broker.reply(&request, &stats);
                            }
                            Ok(stats) => {
                                let counters = &stats.total.counters;
                                let count = counters.total_sent + counters.total_received;
                                broker.reply(&request, &MessageCount { count });
                            }
                        }),
                );
            }
            BrokerMethod::SubmitProcessMetrics => {
                let samples = match request.payload_as::<SubmitProcessMetrics>() {
                    Ok(samples) => samples,
                    Err(e) => return self.fail(&request, ErrorCode::BadRequest, e.to_string()),
                };
                ctx.spawn(
                    self.metrics
                        .send(SubmitMetrics(samples))
                        .into_actor(self)
                        .map(move |stored, broker, _| match stored {
                            Ok(received) => {
                                broker.reply(&request, &SubmitProcessMetricsReply { received })
                            }
                            Err(e) => broker.fail(&request, ErrorCode::Internal, e.to_string()),
                        }),
                );
            }
            BrokerMethod::Spawn | BrokerMethod::Stop => self.fail(
                &request,
                ErrorCode::UnknownMethod,
                format!(
                    "{method} needs the subprocess bridges, which this build does not have yet"
                ),
            ),
        }
    }

    /// Rust callers are trusted; processes only if their service is allowed.
    fn may_control(&self, source: &str) -> bool {
        source == CALLER
            || self
                .config
                .control_allow
                .iter()
                .any(|s| s == service_of(source))
    }

    fn handle_event(&mut self, event: Envelope) {
        if &*event.id == "ready" {
            let id = event.source.to_string();
            if let Some(info) = self.processes.get_mut(&id) {
                info.status = ProcessStatus::Ready;
                let info = info.clone();
                self.lifecycle(&info);
            }
            self.router.do_send(SetReady {
                id: event.source,
                ready: true,
            });
        } else {
            tracing::debug!(process = %event.source, event = %event.id, "event to the broker ignored");
        }
    }
}

impl Actor for Broker {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Broker {
    type Result = ();

    fn handle(&mut self, Deliver(envelope): Deliver, ctx: &mut Self::Context) {
        match envelope.kind {
            MessageType::Request => self.handle_request(envelope, ctx),
            MessageType::Event => self.handle_event(envelope),
            // The broker sends no requests of its own yet.
            MessageType::Response | MessageType::Error => {}
        }
    }
}

impl Handler<TrackProcess> for Broker {
    type Result = ();

    fn handle(&mut self, TrackProcess(info): TrackProcess, _: &mut Self::Context) {
        self.lifecycle(&info);
        self.processes.insert(info.id.clone(), info);
    }
}
