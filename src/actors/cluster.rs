//! Cluster: this broker's membership of a federation over NATS (DESIGN 11).
//!
//! NATS carries the messages; nothing here votes or gossips. The actor
//! owns the NATS client (async-nats, on this arbiter's current-thread
//! runtime) and does four things:
//!
//! - **Advertise**: every `heartbeat_ms` it publishes this node's exported
//!   services and their ready workers (asked of the Router) on `name.hb`.
//! - **Watch**: it keeps the other nodes' heartbeats; a node unheard for 3
//!   of its intervals, one that says it leaves, one that restarted, or all
//!   of them when the NATS connection drops, go to the Router as
//!   [`NodeDown`]: their requests in flight are answered `worker_exited`
//!   at once. A heartbeat puts a node (back) in the rotation ([`NodeUp`]).
//! - **Send**: the Router routes to a node as to a process named `@node`
//!   whose [`Deliver`] lands here; requests are published to the node's
//!   request subject, replies to the reply subject the request named.
//!   Larger than the server's `max_payload`: `too_large`, never published.
//! - **Receive**: requests for this node and replies to it, decoded once
//!   and handed to the Router ([`FromNodes`]) with `source` stamped
//!   `proc@node`; a "no responders" status fails its request `unavailable`.
//!
//! The pending table, deadlines and the one reply stay the Router's: this
//! actor keeps no per-request state (the reply subject names the request),
//! so nothing here can leak when a reply never comes.

use actix::prelude::*;
use async_nats::{Client, ConnectOptions, Event, HeaderMap, StatusCode};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::log_limit::{LogLimit, LogLine};
use super::messages::{
    ClusterState, Deliver, FromNodes, Leave, NodeDown, NodeFailed, NodeState, NodeUp, ReadyCounts,
};
use super::nodes::{self, node_id};
use super::router::Router;
use crate::config::ClusterConfig;
use crate::config::cluster::is_token;
use crate::protocol::federation::{
    Heartbeat, NODE_HEADER, heartbeat_subject, parse_reply_subject, reply_subject, reply_wildcard,
    request_subject,
};
use crate::protocol::{Envelope, ErrorCode, MessageType};

/// Bytes a message's headers and subjects may take beside the envelope,
/// counted against `max_payload` (NATS counts headers in it).
const HEADROOM: usize = 256;

/// Another node, as heard.
struct Remote {
    /// `@node`, the id the Router routes it under.
    id: ByteString,
    instance: u64,
    up: bool,
    last_seen: Instant,
    heartbeat: Duration,
    services: BTreeMap<String, u32>,
    no_responders: u64,
    too_large: u64,
}

/// One message for the publisher task. `fails` names the request to fail
/// if it cannot be published: (node id, origin, correlation id).
struct Outgoing {
    subject: String,
    reply: Option<String>,
    /// Requests only: a reply's subject already says everything.
    headers: Option<HeaderMap>,
    payload: Bytes,
    fails: Option<(ByteString, ByteString, u64)>,
}

/// A subscription whose drop is safe anywhere. async-nats unsubscribes
/// from `Drop` with `tokio::spawn`, which panics outside a runtime, and an
/// actix System drops its actors' streams after its runtime is gone. With
/// no runtime there is no connection left to unsubscribe from either, so
/// the subscriber is then let go without it.
struct Subscription(Option<async_nats::Subscriber>);

impl futures_util::Stream for Subscription {
    type Item = async_nats::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.0.as_mut() {
            Some(subscriber) => subscriber.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err() {
            std::mem::forget(self.0.take());
        }
    }
}

/// What the subscriptions bring: requests and replies in batches of what
/// had arrived together, so a batch is one Router message, and the
/// Router's deliveries from it one pipe write per process.
enum Inbound {
    Requests(Vec<async_nats::Message>),
    Replies(Vec<async_nats::Message>),
    Heartbeat(async_nats::Message),
}

/// Most messages taken from a subscription at once.
const BATCH: usize = 64;

/// A NATS client event (connected, disconnected, slow consumer…).
#[derive(Message)]
#[rtype(result = "()")]
struct NatsEvent(Event);

/// The Cluster actor. Started by the embedding builder when
/// `cluster.nats_url` is set.
pub struct Cluster {
    config: ClusterConfig,
    node: String,
    instance: u64,
    router: Addr<Router>,
    metrics: Recipient<ClusterState>,
    client: Option<Client>,
    out: Option<mpsc::UnboundedSender<Vec<Outgoing>>>,
    nodes: BTreeMap<String, Remote>,
    connected: bool,
    connections: u64,
    slow_consumers: u64,
    max_payload: usize,
    advertised: BTreeMap<String, u32>,
    next_heartbeat: Instant,
    /// When liveness was last checked, and when this thread last came
    /// back from a stall (see [`silent_nodes`]).
    liveness: Liveness,
    /// Another broker uses this node's name (warned once per instance).
    impostor: Option<u64>,
    /// The last server error logged.
    last_error: Option<String>,
    /// The header every request carries, parsed once.
    node_header: (async_nats::HeaderName, async_nats::HeaderValue),
    /// Warnings about what other nodes send (a few a second at most).
    log_limit: LogLimit,
}

/// The liveness checks' own clock.
struct Liveness {
    /// The last check.
    last_tick: Instant,
    /// The end of this thread's last stall: silence is counted from here
    /// at the earliest.
    resumed: Instant,
}

impl Liveness {
    fn new(now: Instant) -> Self {
        Self {
            last_tick: now,
            resumed: now,
        }
    }
}

/// The up nodes unheard for 3 of their heartbeats, checked at `now`.
///
/// If the last check is more than `stall` ago, this thread was stalled (a
/// long handler, a paused process, an overloaded host): heartbeats may
/// sit unread in the socket, so silence proves nothing. Silence is then
/// counted from `now`: a node really gone is found 3 heartbeats later. The
/// nodes' `last_seen` stays the truth (it is what `ListNodes` reports).
fn silent_nodes(
    nodes: &BTreeMap<String, Remote>,
    liveness: &mut Liveness,
    now: Instant,
    stall: Duration,
) -> Vec<String> {
    if now.saturating_duration_since(liveness.last_tick) > stall {
        liveness.resumed = now;
    }
    liveness.last_tick = now;
    nodes
        .iter()
        .filter(|(_, n)| {
            let silent_since = n.last_seen.max(liveness.resumed);
            n.up && now.saturating_duration_since(silent_since) > n.heartbeat * 3
        })
        .map(|(name, _)| name.clone())
        .collect()
}

impl Cluster {
    /// The member of `config`'s cluster; reaches local workers through
    /// `router`, reports to the MetricsStore through `metrics`.
    pub fn new(
        config: ClusterConfig,
        router: Addr<Router>,
        metrics: impl Into<Recipient<ClusterState>>,
    ) -> Self {
        let node = config.node_name();
        Self {
            config,
            instance: instance_id(),
            router,
            metrics: metrics.into(),
            client: None,
            out: None,
            nodes: BTreeMap::new(),
            connected: false,
            connections: 0,
            slow_consumers: 0,
            max_payload: 0,
            advertised: BTreeMap::new(),
            next_heartbeat: Instant::now(),
            liveness: Liveness::new(Instant::now()),
            impostor: None,
            last_error: None,
            log_limit: LogLimit::default(),
            node_header: (
                async_nats::HeaderName::from_static(NODE_HEADER),
                async_nats::HeaderValue::from(node.as_str()),
            ),
            node,
        }
    }
}

/// Random enough to tell two starts of one node apart.
fn instance_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::RandomState::default().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish().max(1)
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let options = self.options(ctx.address());
        let urls = self.config.nats_url.list();
        let node = self.node.clone();
        ctx.spawn(
            async move { options.await?.connect(urls).await.map_err(|e| e.to_string()) }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(client) => act.serve(client, ctx),
                    Err(e) => {
                        tracing::error!(%node, error = %e, "cluster: cannot use NATS; this broker serves its own services only");
                    }
                }),
        );
        // Liveness is checked four times per interval, so a node is gone
        // within 3¼ of its intervals.
        let tick = (self.config.heartbeat() / 4).max(Duration::from_millis(5));
        ctx.run_interval(tick, |act, ctx| act.tick(ctx));
        // Stats show the cluster (not connected yet) from the start.
        self.push_state();
    }
}

impl Cluster {
    /// The client's options: auth and TLS as configured, reconnecting
    /// forever without blocking the start (a broker that comes up before
    /// NATS serves locally meanwhile).
    fn options(
        &self,
        addr: Addr<Self>,
    ) -> impl std::future::Future<Output = Result<ConnectOptions, String>> + use<> {
        let c = self.config.clone();
        let name = format!("procbroker {}", self.node);
        // A dead link is noticed as fast as a dead node.
        let ping = (self.config.heartbeat() * 3).max(Duration::from_secs(1));
        async move {
            let mut o = ConnectOptions::new();
            if !c.creds_file.is_empty() {
                o = o
                    .credentials_file(&c.creds_file)
                    .await
                    .map_err(|e| format!("cluster.creds_file {:?}: {e}", c.creds_file))?;
            }
            if !c.token.is_empty() {
                o = o.token(c.token.clone());
            }
            if !c.user.is_empty() {
                o = o.user_and_password(c.user.clone(), c.password.clone());
            }
            if !c.tls_ca_file.is_empty() {
                o = o
                    .add_root_certificates(c.tls_ca_file.clone().into())
                    .require_tls(true);
            }
            if !c.tls_cert_file.is_empty() {
                o = o
                    .add_client_certificate(
                        c.tls_cert_file.clone().into(),
                        c.tls_key_file.clone().into(),
                    )
                    .require_tls(true);
            }
            Ok(o.name(name)
                .retry_on_initial_connect()
                .ping_interval(ping)
                .reconnect_delay_callback(|attempts| {
                    Duration::from_millis((50u64 << attempts.min(5)).min(1000))
                })
                .event_callback(move |event| {
                    let addr = addr.clone();
                    async move { addr.do_send(NatsEvent(event)) }
                }))
        }
    }

    /// Connected (or connecting): subscribe, start the publisher.
    fn serve(&mut self, client: Client, ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        actix::spawn(publish(client.clone(), rx, self.router.clone()));
        self.out = Some(tx);
        let name = &self.config.name;
        let subjects = [
            request_subject(name, &self.node),
            reply_wildcard(name, &self.node),
            heartbeat_subject(name),
        ];
        let subscriber = client.clone();
        ctx.spawn(
            async move {
                let [req, rep, hb] = subjects;
                Ok::<_, async_nats::SubscribeError>((
                    subscriber.subscribe(req).await?,
                    subscriber.subscribe(rep).await?,
                    subscriber.subscribe(hb).await?,
                ))
            }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok((req, rep, hb)) => {
                    let safe = |s| Subscription(Some(s));
                    ctx.add_stream(safe(req).ready_chunks(BATCH).map(Inbound::Requests));
                    ctx.add_stream(safe(rep).ready_chunks(BATCH).map(Inbound::Replies));
                    ctx.add_stream(safe(hb).map(Inbound::Heartbeat));
                }
                Err(e) => {
                    tracing::error!(node = %act.node, error = %e, "cluster: cannot subscribe");
                }
            }),
        );
        self.client = Some(client);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let Some(client) = &self.client else {
            return;
        };
        // Events can be missed (their channel is bounded): the state is the truth.
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        if connected != self.connected {
            self.connection_changed(connected, ctx);
        }
        let now = Instant::now();
        let stall = self.config.heartbeat();
        for name in silent_nodes(&self.nodes, &mut self.liveness, now, stall) {
            self.node_down(&name, "missed 3 heartbeats");
        }
        if self.connected {
            // At the interval, and as soon as ready workers change (a
            // worker that became ready is routable from afar at once).
            let due = now >= self.next_heartbeat;
            if due {
                self.next_heartbeat = now + self.config.heartbeat();
            }
            self.advertise(due, ctx);
        }
    }

    fn connection_changed(&mut self, connected: bool, ctx: &mut Context<Self>) {
        self.connected = connected;
        if connected {
            self.connections += 1;
            if let Some(client) = &self.client {
                self.max_payload = client.server_info().max_payload;
            }
            self.last_error = None;
            tracing::info!(node = %self.node, max_payload = self.max_payload,
                reconnect = self.connections > 1, "cluster: connected to NATS");
            // Tell the others at once rather than at the next interval.
            self.next_heartbeat = Instant::now() + self.config.heartbeat();
            self.advertise(true, ctx);
        } else {
            tracing::warn!(node = %self.node, "cluster: NATS connection lost; remote calls are unavailable until it is back");
            let up: Vec<String> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.up)
                .map(|(name, _)| name.clone())
                .collect();
            for name in up {
                self.node_down(&name, "this broker lost its NATS connection");
            }
        }
        self.push_state();
    }

    /// Asks the Router for ready workers; publishes the heartbeat if `due`
    /// or if they changed.
    fn advertise(&mut self, due: bool, ctx: &mut Context<Self>) {
        ctx.spawn(
            self.router
                .send(ReadyCounts)
                .into_actor(self)
                .map(move |counts, act, _| {
                    let Ok(counts) = counts else { return };
                    let counts: BTreeMap<String, u32> = counts
                        .into_iter()
                        .filter(|(service, _)| act.config.exports(service))
                        .collect();
                    if due || counts != act.advertised {
                        act.advertised = counts;
                        act.publish_heartbeat(false);
                        act.push_state();
                    }
                }),
        );
    }

    fn publish_heartbeat(&self, leaving: bool) {
        let heartbeat = Heartbeat {
            node: self.node.clone(),
            instance: self.instance,
            heartbeat_ms: self.config.heartbeat_ms,
            services: self.advertised.clone(),
            leaving,
        };
        let Ok(json) = serde_json::to_vec(&heartbeat) else {
            return;
        };
        self.send(vec![Outgoing {
            subject: heartbeat_subject(&self.config.name),
            reply: None,
            headers: None,
            payload: json.into(),
            fails: None,
        }]);
    }

    fn send(&self, messages: Vec<Outgoing>) {
        if let (Some(out), false) = (&self.out, messages.is_empty()) {
            let _ = out.send(messages);
        }
    }

    fn node_down(&mut self, name: &str, reason: &str) {
        if let Some(remote) = self.nodes.get_mut(name) {
            remote.up = false;
        }
        self.router.do_send(NodeDown {
            node: name.into(),
            reason: reason.into(),
            callers_gone: false,
            forget: false,
        });
        self.push_state();
    }

    /// Node `name` is alive (a heartbeat, or a message from it).
    fn node_up(&mut self, name: &str, ctx: &mut Context<Self>) {
        let Some(remote) = self.nodes.get_mut(name) else {
            return;
        };
        let joined = !remote.up;
        remote.up = true;
        remote.last_seen = Instant::now();
        let services = remote
            .services
            .iter()
            .map(|(s, n)| (ByteString::from(s.as_str()), *n))
            .collect();
        self.router.do_send(NodeUp {
            node: name.into(),
            services,
            link: ctx.address().recipient(),
        });
        if joined {
            self.push_state();
        }
    }

    fn remote(&mut self, name: &str) -> &mut Remote {
        let heartbeat = self.config.heartbeat();
        self.nodes.entry(name.to_owned()).or_insert_with(|| Remote {
            id: node_id(name),
            instance: 0,
            up: false,
            last_seen: Instant::now(),
            heartbeat,
            services: BTreeMap::new(),
            no_responders: 0,
            too_large: 0,
        })
    }

    /// The Router's id of node `name` (`@name`).
    fn id_of(&self, name: &str) -> ByteString {
        self.nodes
            .get(name)
            .map_or_else(|| node_id(name), |r| r.id.clone())
    }

    fn push_state(&self) {
        self.metrics.do_send(ClusterState {
            name: self.config.name.clone(),
            node: self.node.clone(),
            services: self.advertised.clone(),
            connected: self.connected,
            reconnects: self.connections.saturating_sub(1),
            slow_consumers: self.slow_consumers,
            max_payload: self.max_payload as u64,
            nodes: self
                .nodes
                .iter()
                .map(|(name, n)| NodeState {
                    node: name.clone(),
                    up: n.up,
                    services: n.services.clone(),
                    last_seen: n.last_seen,
                    no_responders: n.no_responders,
                    too_large: n.too_large,
                })
                .collect(),
        });
    }
}

// ---------------------------------------------------------------------------
// Receiving

impl StreamHandler<Inbound> for Cluster {
    fn handle(&mut self, inbound: Inbound, ctx: &mut Self::Context) {
        match inbound {
            Inbound::Requests(batch) => {
                let mut envelopes = Vec::with_capacity(batch.len());
                for msg in batch {
                    envelopes.extend(self.request_in(msg, ctx));
                }
                if !envelopes.is_empty() {
                    self.router.do_send(FromNodes(envelopes));
                }
            }
            Inbound::Replies(batch) => {
                let envelopes: Vec<_> =
                    batch.into_iter().filter_map(|m| self.reply_in(m)).collect();
                if !envelopes.is_empty() {
                    self.router.do_send(FromNodes(envelopes));
                }
            }
            Inbound::Heartbeat(msg) => self.heartbeat_in(&msg.payload, ctx),
        }
    }

    /// A subscription ends only with the client; the actor stays.
    fn finished(&mut self, _: &mut Self::Context) {}
}

/// `id@node`, without `format!` (once per message).
fn at_node(id: &str, node: &str) -> ByteString {
    let mut s = String::with_capacity(id.len() + 1 + node.len());
    s.push_str(id);
    s.push('@');
    s.push_str(node);
    s.into()
}

fn header<'a>(msg: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    Some(msg.headers.as_ref()?.get(name)?.as_str())
}

impl Cluster {
    fn heartbeat_in(&mut self, payload: &[u8], ctx: &mut Context<Self>) {
        let hb: Heartbeat = match serde_json::from_slice(payload) {
            Ok(hb) => hb,
            Err(e) => {
                tracing::debug!(error = %e, "cluster: heartbeat not understood, dropped");
                return;
            }
        };
        if !is_token(&hb.node) {
            return;
        }
        if hb.node == self.node {
            if hb.instance != self.instance && self.impostor != Some(hb.instance) {
                self.impostor = Some(hb.instance);
                tracing::error!(node = %self.node, "cluster: another broker uses this node's name; give each a distinct cluster.node");
            }
            return;
        }
        let restarted = {
            let remote = self.remote(&hb.node);
            let restarted = remote.up && remote.instance != 0 && remote.instance != hb.instance;
            remote.instance = hb.instance;
            remote.heartbeat = Duration::from_millis(hb.heartbeat_ms.max(1));
            remote.last_seen = Instant::now();
            remote.services = hb.services;
            restarted
        };
        if restarted {
            self.node_down(&hb.node, "it restarted");
        }
        if hb.leaving {
            if self.nodes.get(&hb.node).is_some_and(|n| n.up) {
                self.node_down(&hb.node, "it left the cluster");
            }
            return;
        }
        self.node_up(&hb.node, ctx);
    }

    /// A request from another node, stamped for the Router.
    fn request_in(
        &mut self,
        msg: async_nats::Message,
        ctx: &mut Context<Self>,
    ) -> Option<(ByteString, Envelope)> {
        let from = header(&msg, NODE_HEADER)
            .filter(|n| is_token(n))
            .map(str::to_owned);
        let decoded = Envelope::decode(&msg.payload);
        let (from, mut envelope) = match (from, decoded) {
            (Some(from), Ok(e)) if e.kind == MessageType::Request => (from, e),
            (from, decoded) => {
                // Another node's bug or version: said, at a bounded rate.
                if let LogLine::Log { suppressed } = self.log_limit.check(Instant::now()) {
                    let why = decoded.map_or_else(
                        |e| e.to_string(),
                        |e| format!("a {} on the request subject", e.kind),
                    );
                    tracing::warn!(from = from.as_deref().unwrap_or("?"), %why, suppressed,
                        "cluster: a message from another node dropped");
                }
                return None;
            }
        };
        if !self.nodes.get(&from).is_some_and(|n| n.up) {
            // Heard from before its heartbeat: it is alive, and its reply
            // must find a way back.
            self.remote(&from);
            self.node_up(&from, ctx);
        } else if let Some(remote) = self.nodes.get_mut(&from) {
            remote.last_seen = Instant::now();
        }
        // The caller's broker wrote the time left of its deadline into
        // `timeout_ms`: this node times out too, a moment after it.
        envelope.source = at_node(&envelope.source, &from);
        Some((self.id_of(&from), envelope))
    }

    /// A reply from another node, stamped for the Router; a "no
    /// responders" status fails its request here.
    fn reply_in(&mut self, msg: async_nats::Message) -> Option<(ByteString, Envelope)> {
        let to = parse_reply_subject(&msg.subject)?;
        let node = self.id_of(&to.from);
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            if let Some(remote) = self.nodes.get_mut(&to.from) {
                remote.no_responders += 1;
            }
            self.router.do_send(NodeFailed {
                node,
                origin: to.origin.into(),
                correlation_id: to.correlation_id,
                code: ErrorCode::Unavailable,
                message: format!("node {:?} has no responders on NATS", to.from),
            });
            self.push_state();
            return None;
        }
        let mut envelope = match Envelope::decode(&msg.payload) {
            Ok(e) if matches!(e.kind, MessageType::Response | MessageType::Error) => e,
            Ok(_) | Err(_) => {
                tracing::debug!(from = %to.from, "cluster: not a reply on a reply subject, dropped");
                return None;
            }
        };
        if let Some(remote) = self.nodes.get_mut(&to.from) {
            remote.last_seen = Instant::now();
        }
        envelope.target = to.origin.into();
        envelope.correlation_id = to.correlation_id;
        envelope.source = at_node(&envelope.source, &to.from);
        Some((node, envelope))
    }
}

// ---------------------------------------------------------------------------
// Sending

impl Handler<Deliver> for Cluster {
    type Result = ();

    fn handle(&mut self, Deliver(envelopes): Deliver, _: &mut Self::Context) {
        let mut out = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            out.extend(match envelope.kind {
                MessageType::Request => self.request_out(envelope),
                MessageType::Response | MessageType::Error => self.reply_out(envelope),
                MessageType::Event => None,
            });
        }
        self.send(out);
    }
}

impl Cluster {
    /// Whether an encoded envelope of `len` bytes may be published.
    fn fits(&self, len: usize) -> bool {
        self.max_payload == 0 || len + HEADROOM <= self.max_payload
    }

    /// A request the Router sent to `service@node`, to publish.
    fn request_out(&mut self, envelope: Envelope) -> Option<Outgoing> {
        let (_, node) = nodes::split(&envelope.target)?;
        let node = node.to_owned();
        let origin = envelope.source.clone();
        let correlation_id = envelope.correlation_id;
        let payload = envelope.to_bytes();
        if !self.fits(payload.len()) {
            let max = self.max_payload;
            if let Some(remote) = self.nodes.get_mut(&node) {
                remote.too_large += 1;
            }
            self.router.do_send(NodeFailed {
                node: self.id_of(&node),
                origin,
                correlation_id,
                code: ErrorCode::TooLarge,
                message: format!(
                    "the request ({} bytes) is larger than the NATS server's max_payload ({max} bytes with {HEADROOM} for headers)",
                    payload.len()
                ),
            });
            self.push_state();
            return None;
        }
        let mut headers = HeaderMap::new();
        headers.insert(self.node_header.0.clone(), self.node_header.1.clone());
        let name = &self.config.name;
        Some(Outgoing {
            subject: request_subject(name, &node),
            reply: Some(reply_subject(
                name,
                &self.node,
                &node,
                correlation_id,
                &origin,
            )),
            headers: Some(headers),
            payload,
            fails: Some((self.id_of(&node), origin, correlation_id)),
        })
    }

    /// A reply to a caller on another node (`target = proc@node`), to publish.
    fn reply_out(&mut self, envelope: Envelope) -> Option<Outgoing> {
        let (origin, node) = nodes::split(&envelope.target)?;
        let subject = reply_subject(
            &self.config.name,
            node,
            &self.node,
            envelope.correlation_id,
            origin,
        );
        let mut payload = envelope.to_bytes();
        if !self.fits(payload.len()) {
            // Still exactly one reply, to the same caller: it learns why.
            let message = format!(
                "the reply ({} bytes) is larger than the NATS server's max_payload ({} bytes)",
                payload.len(),
                self.max_payload
            );
            payload = Envelope::broker_error_to(
                envelope.target.clone(),
                envelope.id.clone(),
                envelope.correlation_id,
                ErrorCode::TooLarge,
                message,
            )
            .to_bytes();
        }
        Some(Outgoing {
            subject,
            reply: None,
            headers: None,
            payload,
            fails: None,
        })
    }
}

/// The publisher: one task, in order. What cannot be published fails its
/// request at once (`too_large` past `max_payload`, else `unavailable`).
async fn publish(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<Vec<Outgoing>>,
    router: Addr<Router>,
) {
    while let Some(batch) = rx.recv().await {
        for m in batch {
            publish_one(&client, m, &router).await;
        }
    }
}

/// Publishes one message; what cannot be published fails its request.
async fn publish_one(client: &Client, m: Outgoing, router: &Addr<Router>) {
    let result = match (m.reply, m.headers) {
        (Some(reply), Some(headers)) => {
            client
                .publish_with_reply_and_headers(m.subject, reply, headers, m.payload)
                .await
        }
        (Some(reply), None) => client.publish_with_reply(m.subject, reply, m.payload).await,
        (None, Some(headers)) => {
            client
                .publish_with_headers(m.subject, headers, m.payload)
                .await
        }
        (None, None) => client.publish(m.subject, m.payload).await,
    };
    if let (Err(e), Some((node, origin, correlation_id))) = (result, m.fails) {
        let code = if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded {
            ErrorCode::TooLarge
        } else {
            ErrorCode::Unavailable
        };
        router.do_send(NodeFailed {
            node,
            origin,
            correlation_id,
            code,
            message: format!("cannot publish to NATS: {e}"),
        });
    }
}

// ---------------------------------------------------------------------------
// Client events and leaving

impl Handler<NatsEvent> for Cluster {
    type Result = ();

    fn handle(&mut self, NatsEvent(event): NatsEvent, ctx: &mut Self::Context) {
        match event {
            Event::Connected if !self.connected => self.connection_changed(true, ctx),
            Event::Disconnected if self.connected => self.connection_changed(false, ctx),
            Event::SlowConsumer(_) => {
                self.slow_consumers += 1;
                tracing::warn!(node = %self.node, "cluster: slow consumer: the NATS client dropped messages");
                self.push_state();
            }
            Event::ServerError(e) => {
                // Repeats at every reconnect attempt (a wrong token): said
                // once per distinct error.
                let e = e.to_string();
                if self.last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(node = %self.node, error = %e, "cluster: the NATS server refused us");
                    self.last_error = Some(e);
                }
            }
            other => tracing::debug!(event = %other, "cluster: NATS event"),
        }
    }
}

impl Handler<Leave> for Cluster {
    type Result = ResponseFuture<()>;

    /// Says goodbye so the others fail over now, not 3 heartbeats later.
    fn handle(&mut self, _: Leave, _: &mut Self::Context) -> Self::Result {
        if self.connected {
            self.publish_heartbeat(true);
        }
        let client = self.client.clone();
        // The goodbye is queued behind everything else for the publisher;
        // a flush after a moment sees it out.
        Box::pin(async move {
            if let Some(client) = client {
                actix::clock::sleep(Duration::from_millis(20)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(last_seen: Instant) -> Remote {
        Remote {
            id: ByteString::from_static("@b"),
            instance: 1,
            up: true,
            last_seen,
            heartbeat: Duration::from_millis(200),
            services: BTreeMap::new(),
            no_responders: 0,
            too_large: 0,
        }
    }

    /// Checks every 50 ms from `from` up to `from + 600 ms` find nothing;
    /// the one at `from + 650 ms` finds b.
    fn b_gone_650_ms_after(
        from: Instant,
        nodes: &BTreeMap<String, Remote>,
        liveness: &mut Liveness,
    ) {
        let ms = Duration::from_millis;
        for n in 1..=12 {
            let now = from + ms(50 * n);
            assert!(
                silent_nodes(nodes, liveness, now, ms(200)).is_empty(),
                "at {} ms",
                50 * n
            );
        }
        let now = from + ms(650);
        assert_eq!(silent_nodes(nodes, liveness, now, ms(200)), ["b"]);
    }

    #[test]
    fn a_node_unheard_for_three_heartbeats_is_silent() {
        let t0 = Instant::now();
        let nodes = BTreeMap::from([("b".to_owned(), remote(t0))]);
        b_gone_650_ms_after(t0, &nodes, &mut Liveness::new(t0));
    }

    #[test]
    fn a_stall_of_this_thread_restarts_the_count_instead() {
        let t0 = Instant::now();
        let nodes = BTreeMap::from([("b".to_owned(), remote(t0))]);
        let mut liveness = Liveness::new(t0);
        // This thread was away for 1 s: b's heartbeats may be unread.
        let back = t0 + Duration::from_secs(1);
        assert!(silent_nodes(&nodes, &mut liveness, back, Duration::from_millis(200)).is_empty());
        // b still silent 3 heartbeats after the stall: now it is gone. Its
        // last_seen was left as it was.
        b_gone_650_ms_after(back, &nodes, &mut liveness);
        assert_eq!(nodes["b"].last_seen, t0);
    }
}
