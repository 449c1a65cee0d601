//! Cluster: this broker's part in a federation over NATS.
//!
//! NATS carries the messages; nothing here votes or gossips. The actor
//! owns the NATS client (async-nats, on this arbiter's current-thread
//! runtime); who is in the cluster is decided by `membership` (pure
//! rules, no I/O), and this actor does the rest:
//!
//! - **Advertise**: every `heartbeat_ms` it publishes this instance's claim
//!   on its node name and the exported services with their ready workers
//!   (asked of the Router) on `name.hb`; once with `leaving` at shutdown.
//! - **Watch**: every heartbeat, and the liveness check four times an
//!   interval, go to the membership table; what changes goes to the Router:
//!   [`NodeUp`] puts a node (back) in the rotation, [`NodeDown`] takes it
//!   out (its requests in flight are answered `worker_exited` at once).
//!   When another live instance holds this broker's own name with an
//!   earlier claim, this broker stands aside: every node goes down here,
//!   nothing is advertised or served to the cluster, until the name is
//!   free again.
//! - **Send**: the Router routes to a node as to a process named `@node`
//!   whose [`Deliver`] lands here; requests are published to the one
//!   instance of the node this broker routes to (its `Link`), replies
//!   (partial ones too, in order) to the instance whose caller asked.
//!   Larger than the server's `max_payload`: `too_large`, never published.
//!   A request that ends here before its reply (its deadline passed, its
//!   caller cancelled or left, its stream was cut) comes as the event
//!   `cancel` for `@node`: it is published on the same subject as the
//!   request, with the same headers, so it never overtakes it.
//! - **Receive**: requests and cancels for this instance and replies to
//!   it, decoded once and handed to the Router ([`FromNodes`]) with
//!   `source` stamped `proc@node`, but only from the instance routed to:
//!   anything from another instance of that name is refused (a request,
//!   with an error reply to its own instance) or dropped (a reply, a
//!   cancel), so no reply ever reaches a caller it was not meant for and
//!   no other broker can cancel this broker's callers' requests. What is
//!   dropped here (unreadable, or from an instance not routed to) is
//!   counted (`dropped_messages`).
//!
//! The pending table, deadlines and the one reply stay the Router's: this
//! actor keeps no per-request state (the reply subject names the request),
//! so nothing here can leak when a reply never comes.
//!
//! **When the instance behind a node name changes** (it restarted, or a
//! conflict was settled the other way), requests its callers have in
//! flight here must not be answered to the new instance, whose callers may
//! use the same ids. The Router drops them ([`NodeDown::callers_gone`]),
//! and this actor keeps sending replies to the old instance until the
//! Router has answered that `NodeDown`: replies it delivered before are for
//! the old instance's callers (the Router and this actor share a thread, so
//! those `Deliver`s are handled before the answer), and none come after it.
//! Meanwhile the node is not routed to and its requests are refused.

use actix::prelude::*;
use async_nats::{Client, ConnectOptions, Event, HeaderMap, StatusCode};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::log_limit::{LogLimit, LogLine};
use super::membership::{Change, Counts, Limits, Membership};
use super::messages::{
    ClusterState, Deliver, FromNodes, Leave, NodeDown, NodeFailed, NodeState, NodeUp, ReadyCounts,
};
use super::nodes::{self, node_id};
use super::router::Router;
use crate::config::ClusterConfig;
use crate::config::cluster::is_token;
use crate::names::BROKER;
use crate::protocol::federation::{
    Heartbeat, Hop, INSTANCE_HEADER, NODE_HEADER, heartbeat_subject, instance_token,
    parse_instance, parse_reply_subject, reply_subject, reply_wildcard, request_subject,
};
use crate::protocol::{CancelNotice, Envelope, ErrorCode, MessageType};

/// Bytes a message's headers and subjects may take beside the envelope,
/// counted against `max_payload` (NATS counts headers in it).
const HEADROOM: usize = 256;

/// How this broker routes to one other node (its liveness and services
/// are the [`Membership`]'s).
struct Link {
    /// `@node`, the id the Router routes it under.
    id: ByteString,
    /// The instance the Router's `@node` stands for: requests go to it,
    /// replies are taken from it only, and replies to its callers go back
    /// to it. `None`: the Router has no requests of or to it.
    routed: Option<u64>,
    /// `NodeDown`s that drop its callers' requests, sent and not yet
    /// answered by the Router: until then nothing new goes to or comes
    /// from the node.
    draining: u32,
    no_responders: u64,
    too_large: u64,
}

impl Link {
    fn new(node: &str) -> Self {
        Self {
            id: node_id(node),
            routed: None,
            draining: 0,
            no_responders: 0,
            too_large: 0,
        }
    }

    /// The instance messages may go to and come from now.
    fn current(&self) -> Option<u64> {
        self.routed.filter(|_| self.draining == 0)
    }
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

/// What the subscriptions bring: messages in batches of what had arrived
/// together, so a batch of requests or replies is one Router message (and
/// the Router's deliveries from it one pipe write per process), and a
/// flood of heartbeats one update of the stats.
enum Inbound {
    Requests(Vec<async_nats::Message>),
    Replies(Vec<async_nats::Message>),
    Heartbeats(Vec<async_nats::Message>),
}

/// Most messages taken from a subscription at once.
const BATCH: usize = 64;

/// A NATS client event (connected, disconnected, slow consumer…).
#[derive(Message)]
#[rtype(result = "()")]
struct NatsEvent(Event);

/// The Cluster actor. Started by the embedding builder when
/// `cluster.nats_url` is set, on the Router's thread.
pub struct Cluster {
    config: ClusterConfig,
    node: String,
    instance: u64,
    router: Addr<Router>,
    metrics: Recipient<ClusterState>,
    client: Option<Client>,
    out: Option<mpsc::UnboundedSender<Vec<Outgoing>>>,
    /// Who is in the cluster, by the rules.
    membership: Membership,
    /// How each node is routed to (only nodes ever routed to).
    links: BTreeMap<String, Link>,
    connected: bool,
    connections: u64,
    slow_consumers: u64,
    max_payload: usize,
    advertised: BTreeMap<String, u32>,
    next_heartbeat: Instant,
    /// The membership's counts as last pushed to the stats.
    pushed: Counts,
    /// This broker said goodbye (it is shutting down): it advertises no
    /// more, or the others would take it back in while it stops.
    left: bool,
    /// The last server error logged.
    last_error: Option<String>,
    /// The headers every request carries (this node, this instance).
    headers: HeaderMap,
    /// Warnings about what other nodes send (a few a second at most).
    log_limit: LogLimit,
    /// Messages from other nodes dropped here: unreadable, or a reply or
    /// cancel from an instance other than the one routed to.
    dropped: u64,
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
        let instance = instance_id();
        let limits = Limits {
            forget_after: config.forget_after(),
            max_nodes: usize::try_from(config.max_nodes).unwrap_or(usize::MAX),
            heartbeat: config.heartbeat(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, node.as_str());
        headers.insert(INSTANCE_HEADER, instance_token(instance).as_str());
        Self {
            membership: Membership::new(&node, instance, limits, Instant::now()),
            config,
            instance,
            router,
            metrics: metrics.into(),
            client: None,
            out: None,
            links: BTreeMap::new(),
            connected: false,
            connections: 0,
            slow_consumers: 0,
            max_payload: 0,
            advertised: BTreeMap::new(),
            next_heartbeat: Instant::now(),
            pushed: Counts::default(),
            left: false,
            last_error: None,
            headers,
            log_limit: LogLimit::default(),
            dropped: 0,
            node,
        }
    }

    /// This instance, as messages are addressed.
    fn hop(&self) -> Hop<'_> {
        Hop {
            node: &self.node,
            instance: self.instance,
        }
    }
}

/// Random enough to tell two starts of one node apart (never 0).
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

/// Now on the wall clock, in ms since the Unix epoch (what claims compare).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
            request_subject(name, self.hop()),
            reply_wildcard(name, self.hop()),
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
                    ctx.add_stream(safe(hb).ready_chunks(BATCH).map(Inbound::Heartbeats));
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
        let mut changes = Vec::new();
        self.membership.tick(now, wall_ms(), &mut changes);
        self.settle(changes, ctx);
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
        let mut changes = Vec::new();
        if connected {
            self.connections += 1;
            if let Some(client) = &self.client {
                self.max_payload = client.server_info().max_payload;
            }
            self.last_error = None;
            self.membership.connected(Instant::now(), wall_ms());
            tracing::info!(node = %self.node, instance = %instance_token(self.instance),
                max_payload = self.max_payload, reconnect = self.connections > 1,
                "cluster: connected to NATS");
            // Tell the others at once rather than at the next interval.
            self.next_heartbeat = Instant::now() + self.config.heartbeat();
            self.advertise(true, ctx);
        } else {
            tracing::warn!(node = %self.node, "cluster: NATS connection lost; remote calls are unavailable until it is back");
            self.membership.disconnected(&mut changes);
        }
        self.settle(changes, ctx);
        self.push_state();
    }

    /// Asks the Router for ready workers; publishes the heartbeat if `due`
    /// or if they changed. Not while this broker stands aside, nor after
    /// its goodbye.
    fn advertise(&mut self, due: bool, ctx: &mut Context<Self>) {
        if self.left || self.membership.claim().is_none() {
            return;
        }
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

    /// This instance's heartbeat; with `leaving`, its goodbye. Only an
    /// instance holding its name advertises.
    fn publish_heartbeat(&self, leaving: bool) {
        let claim = self.membership.claim();
        if !leaving && (claim.is_none() || self.left) {
            return;
        }
        let heartbeat = Heartbeat {
            node: self.node.clone(),
            instance: self.instance,
            since_ms: claim.unwrap_or(0),
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

    /// Acts on what the membership decided, then updates the stats if
    /// anything changed.
    fn settle(&mut self, changes: Vec<Change>, ctx: &mut Context<Self>) {
        let changed = !changes.is_empty();
        for change in changes {
            match change {
                Change::Up(node) => self.route_to(&node, ctx),
                Change::Down {
                    node,
                    reason,
                    forget,
                } => self.unroute(&node, reason, forget, ctx),
                Change::StandAside { holder } => {
                    tracing::error!(node = %self.node, instance = %instance_token(self.instance),
                        holder = %instance_token(holder),
                        "cluster: this node name is held by another broker instance that claimed it earlier; this broker stays out of the cluster (it serves its own services, routes nothing to or from other nodes, does not advertise) and rejoins when that instance is gone; give each broker its own cluster.node");
                    // Whoever routed to this instance stops now.
                    self.publish_heartbeat(true);
                }
                Change::Rejoin => {
                    tracing::warn!(node = %self.node, instance = %instance_token(self.instance),
                        "cluster: the instance that held this node name is gone; this broker claims it and rejoins the cluster");
                    self.next_heartbeat = Instant::now() + self.config.heartbeat();
                    self.advertise(true, ctx);
                }
                Change::Rival { instance } => {
                    if let LogLine::Log { suppressed } = self.log_limit.check(Instant::now()) {
                        tracing::warn!(node = %self.node, rival = %instance_token(instance), suppressed,
                            "cluster: another broker instance claims this node name too; this one claimed it earlier and keeps it, the other stays out; give each broker its own cluster.node");
                    }
                }
            }
        }
        if changed || self.membership.counts() != self.pushed {
            self.push_state();
        }
    }

    /// Routes to `node`: registers it with the Router (or updates its
    /// services), unless its instance changed; then the old one's callers
    /// are dropped first.
    fn route_to(&mut self, node: &str, ctx: &mut Context<Self>) {
        if !self.membership.routable(node) {
            return;
        }
        let Some(member) = self.membership.member(node) else {
            return;
        };
        let instance = member.claim.instance;
        let services = member
            .services
            .iter()
            .map(|(s, n)| (ByteString::from(s.as_str()), *n))
            .collect();
        let link = self
            .links
            .entry(node.to_owned())
            .or_insert_with(|| Link::new(node));
        if link.draining > 0 {
            return; // routed when the Router has answered
        }
        if link.routed.is_some_and(|routed| routed != instance) {
            self.drain(node, "another instance now holds its name", false, ctx);
            return;
        }
        link.routed = Some(instance);
        self.router.do_send(NodeUp {
            node: node.into(),
            services,
            link: ctx.address().recipient(),
        });
    }

    /// Takes `node` out of the Router's rotation; `forget`: everything of
    /// it, its callers' requests included.
    fn unroute(&mut self, node: &str, reason: &'static str, forget: bool, ctx: &mut Context<Self>) {
        if !self.links.contains_key(node) {
            return; // never routed: the Router never heard of it
        }
        if forget {
            self.drain(node, reason, true, ctx);
        } else {
            self.router.do_send(NodeDown {
                node: node.into(),
                reason: reason.into(),
                callers_gone: false,
                forget: false,
            });
        }
    }

    /// Tells the Router that the instance routed to under `node` is gone
    /// (its callers' requests are dropped); nothing goes to or comes from
    /// `node` until the Router has answered.
    fn drain(&mut self, node: &str, reason: &'static str, forget: bool, ctx: &mut Context<Self>) {
        let Some(link) = self.links.get_mut(node) else {
            return;
        };
        link.draining += 1;
        let name = node.to_owned();
        ctx.spawn(
            self.router
                .send(NodeDown {
                    node: node.into(),
                    reason: reason.into(),
                    callers_gone: true,
                    forget,
                })
                .into_actor(self)
                .map(move |_, act, ctx| act.drained(&name, ctx)),
        );
    }

    /// The Router has dropped what `node`'s previous instance had here.
    fn drained(&mut self, node: &str, ctx: &mut Context<Self>) {
        let Some(link) = self.links.get_mut(node) else {
            return;
        };
        link.draining = link.draining.saturating_sub(1);
        if link.draining > 0 {
            return;
        }
        link.routed = None;
        if self.membership.member(node).is_none() {
            self.links.remove(node);
        } else {
            self.route_to(node, ctx);
        }
    }

    /// The Router's id of node `name` (`@name`).
    fn id_of(&self, name: &str) -> ByteString {
        self.links
            .get(name)
            .map_or_else(|| node_id(name), |l| l.id.clone())
    }

    fn push_state(&mut self) {
        let counts = self.membership.counts();
        self.pushed = counts;
        let conflict = self.membership.holder().is_some();
        self.metrics.do_send(ClusterState {
            name: self.config.name.clone(),
            node: self.node.clone(),
            services: self.advertised.clone(),
            connected: self.connected,
            reconnects: self.connections.saturating_sub(1),
            slow_consumers: self.slow_consumers,
            max_payload: self.max_payload as u64,
            nodes: self
                .membership
                .nodes()
                .iter()
                .map(|(name, m)| {
                    let link = self.links.get(name);
                    NodeState {
                        node: name.clone(),
                        up: m.up && !conflict,
                        services: m.services.clone(),
                        last_seen: m.last_seen,
                        no_responders: link.map_or(0, |l| l.no_responders),
                        too_large: link.map_or(0, |l| l.too_large),
                    }
                })
                .collect(),
            instance: self.instance,
            conflict,
            malformed_heartbeats: counts.malformed_heartbeats,
            nodes_ignored: counts.nodes_ignored,
            services_ignored: counts.services_ignored,
            nodes_forgotten: counts.nodes_forgotten,
            dropped_messages: self.dropped,
        });
    }
}

// ---------------------------------------------------------------------------
// Receiving

impl StreamHandler<Inbound> for Cluster {
    fn handle(&mut self, inbound: Inbound, ctx: &mut Self::Context) {
        match inbound {
            Inbound::Requests(batch) => {
                let dropped = self.dropped;
                let mut envelopes = Vec::with_capacity(batch.len());
                for msg in batch {
                    envelopes.extend(self.request_in(msg, ctx));
                }
                if !envelopes.is_empty() {
                    self.router.do_send(FromNodes(envelopes));
                }
                if self.dropped != dropped {
                    self.push_state();
                }
            }
            Inbound::Replies(batch) => {
                let dropped = self.dropped;
                let envelopes: Vec<_> =
                    batch.into_iter().filter_map(|m| self.reply_in(m)).collect();
                if !envelopes.is_empty() {
                    self.router.do_send(FromNodes(envelopes));
                }
                if self.dropped != dropped {
                    self.push_state();
                }
            }
            Inbound::Heartbeats(batch) => self.heartbeats_in(batch, ctx),
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
    fn heartbeats_in(&mut self, batch: Vec<async_nats::Message>, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let now_ms = wall_ms();
        let mut changes = Vec::new();
        for msg in batch {
            if let Err(e) = self
                .membership
                .heartbeat(&msg.payload, now, now_ms, &mut changes)
                && let LogLine::Log { suppressed } = self.log_limit.check(now)
            {
                tracing::warn!(error = %e, suppressed,
                    "cluster: a heartbeat that cannot be read, dropped (counted in malformed_heartbeats)");
            }
        }
        self.settle(changes, ctx);
    }

    /// A request from another node, stamped for the Router; refused (with
    /// an error reply to the instance that sent it) unless that instance is
    /// the one routed to. A `cancel` from another node comes this way too
    /// (see [`cancel_in`](Self::cancel_in)); anything else is dropped.
    fn request_in(
        &mut self,
        msg: async_nats::Message,
        ctx: &mut Context<Self>,
    ) -> Option<(ByteString, Envelope)> {
        let from = header(&msg, NODE_HEADER)
            .filter(|n| is_token(n))
            .map(str::to_owned);
        let instance = header(&msg, INSTANCE_HEADER).and_then(parse_instance);
        let decoded = Envelope::decode(&msg.payload);
        let (from, instance, mut envelope) = match (from, instance, decoded) {
            (Some(from), Some(instance), Ok(e)) if e.kind == MessageType::Request => {
                (from, instance, e)
            }
            (Some(from), Some(instance), Ok(e)) if e.is_cancel() => {
                return self.cancel_in(&from, instance, e);
            }
            (from, instance, decoded) => {
                let why = match (decoded, instance) {
                    (Err(e), _) => e.to_string(),
                    (Ok(e), Some(_)) if e.kind == MessageType::Event => {
                        format!("the event {:?} on the request subject", e.id)
                    }
                    (Ok(e), Some(_)) => format!("a {} on the request subject", e.kind),
                    (Ok(_), None) => format!("no valid {INSTANCE_HEADER} header"),
                };
                self.malformed(from.as_deref(), &why);
                return None;
            }
        };
        let mut changes = Vec::new();
        let admitted = self
            .membership
            .request_from(&from, instance, Instant::now(), &mut changes);
        self.settle(changes, ctx);
        let refusal = match admitted {
            Err(refusal) => Some(refusal.to_string()),
            Ok(()) if self.links.get(&from).and_then(Link::current) == Some(instance) => None,
            Ok(()) => Some("its node is being re-registered under a new instance; retry".into()),
        };
        if let Some(why) = refusal {
            self.refuse(&msg, &envelope, &from, &why);
            return None;
        }
        // The caller's broker wrote the time left of its deadline into
        // `timeout_ms`: this node times out too, a moment after it.
        envelope.source = at_node(&envelope.source, &from);
        Some((self.id_of(&from), envelope))
    }

    /// A message from another node that cannot be read: dropped, counted,
    /// and said at a bounded rate (another node's bug or version).
    fn malformed(&mut self, from: Option<&str>, why: &str) {
        self.dropped += 1;
        if let LogLine::Log { suppressed } = self.log_limit.check(Instant::now()) {
            tracing::warn!(from = from.unwrap_or("?"), %why, suppressed,
                "cluster: a message from another node dropped (counted in dropped_messages)");
        }
    }

    /// The broker of node `from` (instance `instance`) cancels a request
    /// its caller sent here: its `source` is that caller as it knows it,
    /// and is stamped `proc@from` as the request was, so the Router finds
    /// the request by it. Only from the instance routed to (a cancel from
    /// any other names no request of it here, or is forged): anything else
    /// is dropped and counted. Nothing is answered: the caller's broker has
    /// answered its caller already.
    fn cancel_in(
        &mut self,
        from: &str,
        instance: u64,
        mut cancel: Envelope,
    ) -> Option<(ByteString, Envelope)> {
        if let Err(e) = CancelNotice::from_payload(cancel.payload.as_ref()) {
            self.malformed(Some(from), &format!("a cancel without its reason: {e}"));
            return None;
        }
        if self.links.get(from).and_then(Link::current) != Some(instance) {
            self.dropped += 1;
            tracing::debug!(%from, instance = %instance_token(instance),
                "cluster: a cancel from an instance not routed to, dropped");
            return None;
        }
        self.membership.reply_from(from, instance, Instant::now());
        cancel.source = at_node(&cancel.source, from);
        Some((self.id_of(from), cancel))
    }

    /// Answers a request this broker does not serve with `unavailable`,
    /// on its own reply subject: to the very instance that sent it.
    fn refuse(&mut self, msg: &async_nats::Message, request: &Envelope, from: &str, why: &str) {
        tracing::debug!(%from, %why, "cluster: a request from another node refused");
        // Only to a reply subject of this cluster that names this
        // instance as the answering one: nobody can make this broker
        // publish elsewhere.
        let Some(reply) = msg.reply.as_deref() else {
            return;
        };
        let ours = reply.starts_with(self.config.name.as_str())
            && reply.as_bytes().get(self.config.name.len()) == Some(&b'.')
            && parse_reply_subject(reply)
                .is_some_and(|to| to.from == self.node && to.from_instance == self.instance);
        if !ours {
            return;
        }
        let error = Envelope::broker_error_to(
            request.source.clone(),
            request.id.clone(),
            request.correlation_id,
            ErrorCode::Unavailable,
            format!("node {:?} refused the request: {why}", self.node),
        );
        self.send(vec![Outgoing {
            subject: reply.to_owned(),
            reply: None,
            headers: None,
            payload: error.to_bytes(),
            fails: None,
        }]);
    }

    /// A reply from another node, stamped for the Router; a "no
    /// responders" status fails its request here. Only from the instance
    /// routed to: a reply from any other (a predecessor, an impostor) is
    /// for a request the Router no longer holds, and is dropped.
    fn reply_in(&mut self, msg: async_nats::Message) -> Option<(ByteString, Envelope)> {
        let Some(to) = parse_reply_subject(&msg.subject) else {
            self.malformed(None, "a reply subject that cannot be read");
            return None;
        };
        if to.to_instance != self.instance {
            self.dropped += 1;
            return None;
        }
        if self.links.get(&to.from).and_then(Link::current) != Some(to.from_instance) {
            self.dropped += 1;
            tracing::debug!(from = %to.from, "cluster: a reply from an instance not routed to, dropped");
            return None;
        }
        let node = self.id_of(&to.from);
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            if let Some(link) = self.links.get_mut(&to.from) {
                link.no_responders += 1;
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
            Ok(e) => {
                self.malformed(Some(&to.from), &format!("a {} on a reply subject", e.kind));
                return None;
            }
            Err(e) => {
                self.malformed(Some(&to.from), &e.to_string());
                return None;
            }
        };
        self.membership
            .reply_from(&to.from, to.from_instance, Instant::now());
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
                MessageType::Request => self.request_out(*envelope),
                MessageType::Response | MessageType::Error => self.reply_out(*envelope),
                // The only event that crosses nodes.
                MessageType::Event if envelope.is_cancel() => self.cancel_out(*envelope),
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

    /// A request the Router sent to `service@node`, to publish to the
    /// instance routed to.
    fn request_out(&mut self, envelope: Envelope) -> Option<Outgoing> {
        let (_, node) = nodes::split(&envelope.target)?;
        let node = node.to_owned();
        let origin = envelope.source.clone();
        let correlation_id = envelope.correlation_id;
        let current = self.links.get(&node).and_then(Link::current);
        let Some(instance) = current.filter(|_| self.membership.holder().is_none()) else {
            // Sent before the node went down here: the Router fails it
            // (`worker_exited`) if it has not already.
            self.router.do_send(NodeFailed {
                node: self.id_of(&node),
                origin,
                correlation_id,
                code: ErrorCode::Unavailable,
                message: format!("node {node:?} is not routed to from here now"),
            });
            return None;
        };
        let payload = envelope.to_bytes();
        if !self.fits(payload.len()) {
            let max = self.max_payload;
            if let Some(link) = self.links.get_mut(&node) {
                link.too_large += 1;
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
        let name = &self.config.name;
        let to = Hop {
            node: &node,
            instance,
        };
        Some(Outgoing {
            subject: request_subject(name, to),
            reply: Some(reply_subject(name, self.hop(), to, correlation_id, &origin)),
            headers: Some(self.headers.clone()),
            payload,
            fails: Some((self.id_of(&node), origin, correlation_id)),
        })
    }

    /// The Router ended a request it had sent to node `@node` before its
    /// reply came (`cancel` with `{source: the caller here, reason}`): the
    /// cancel goes to the instance the request went to, on its request
    /// subject with this instance's headers. One publisher on one subject
    /// keeps order, so it arrives after its request. On the wire it is the
    /// caller's own cancel: `source` is the caller here (stamped
    /// `proc@thisnode` there, as the request was) and `target` is `broker`.
    /// With the node no longer routed to, there is nothing to cancel: its
    /// requests were failed with it.
    fn cancel_out(&mut self, mut cancel: Envelope) -> Option<Outgoing> {
        let node = cancel.target.strip_prefix('@')?.to_owned();
        let current = self.links.get(&node).and_then(Link::current);
        let Some(instance) = current.filter(|_| self.membership.holder().is_none()) else {
            tracing::debug!(%node, "cluster: a cancel for a node no longer routed to, dropped");
            return None;
        };
        let origin = CancelNotice::from_payload(cancel.payload.as_ref())
            .ok()?
            .source;
        cancel.source = origin;
        cancel.target = ByteString::from_static(BROKER);
        let payload = cancel.to_bytes();
        if !self.fits(payload.len()) {
            return None;
        }
        let to = Hop {
            node: &node,
            instance,
        };
        Some(Outgoing {
            subject: request_subject(&self.config.name, to),
            reply: None,
            headers: Some(self.headers.clone()),
            payload,
            fails: None,
        })
    }

    /// A reply to a caller on another node (`target = proc@node`), to
    /// publish to the instance that caller is on. Partial replies (`more`)
    /// go the same way, to the same subject, one after the other: NATS
    /// keeps one publisher's messages on one subject in order, and the
    /// subject is the request's whatever the reply, so the caller's broker
    /// takes each as it comes and the request ends at its final reply.
    fn reply_out(&mut self, envelope: Envelope) -> Option<Outgoing> {
        let (origin, node) = nodes::split(&envelope.target)?;
        let Some(instance) = self.links.get(node).and_then(|l| l.routed) else {
            tracing::debug!(%node, "cluster: a reply to a node no longer routed to, dropped");
            return None;
        };
        let subject = reply_subject(
            &self.config.name,
            Hop { node, instance },
            self.hop(),
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
        if self.connected && self.membership.claim().is_some() {
            self.publish_heartbeat(true);
        }
        self.left = true;
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
