//! Admin HTTP: actix-web in the broker's own System, loopback
//! by default.
//!
//! - `/`: the dashboard, one self-contained HTML page (`dashboard.html`,
//!   compiled in) that reads `/events`.
//! - `/events`: the stats reply once a second, as server-sent events
//!   ([`events`]).
//! - `/metrics`: Prometheus text ([`metrics`]).
//! - `/stats`: the `GetMessageStats` reply as JSON.
//! - `/health`: 200 while the broker runs.
//! - `/ready`: 200 once every configured service has a ready worker, else
//!   503; the body says which are not.
//! - `/logs/{process}`: a process's last stderr lines, or (`?follow=1`)
//!   every new one as server-sent events ([`logs`]).
//!
//! The server does not handle signals itself (`disable_signals`): the broker
//! owns shutdown and stops the server as its last step.

pub mod events;
pub mod logs;
pub mod metrics;

use actix_web::{App, HttpResponse, HttpServer, web};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tokio::sync::watch;

use crate::actors::messages::GetLatencySums;
use crate::embed::BrokerHandle;
use crate::protocol::rpc::{ProcessInfo, ProcessStatus};

struct State {
    broker: BrokerHandle,
    /// The configured services `/ready` waits for (a reload changes them).
    services: std::sync::RwLock<Vec<String>>,
    /// Turns true when the server stops: open event streams end.
    closing: watch::Receiver<bool>,
}

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// A running admin server.
pub struct Admin {
    /// The address it listens on (the real port when 0 was asked for).
    pub addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    closing: watch::Sender<bool>,
    state: web::Data<State>,
}

impl Admin {
    /// Binds `addr` and serves in the current System. `services` are the
    /// configured services `/ready` waits for.
    pub fn start(
        broker: BrokerHandle,
        addr: SocketAddr,
        services: Vec<String>,
    ) -> std::io::Result<Self> {
        let (closing_tx, closing) = watch::channel(false);
        let state = web::Data::new(State {
            broker,
            services: std::sync::RwLock::new(services),
            closing,
        });
        let shared = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .route("/", web::get().to(dashboard_page))
                .route("/events", web::get().to(events_page))
                .route("/metrics", web::get().to(metrics_page))
                .route("/stats", web::get().to(stats_page))
                .route(
                    "/health",
                    web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
                )
                .route("/ready", web::get().to(ready_page))
                .route("/logs/{process}", web::get().to(logs_page))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(addr)?;
        let addr = server.addrs().first().copied().unwrap_or(addr);
        let server = server.run();
        let handle = server.handle();
        actix::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "admin HTTP server failed");
            }
        });
        Ok(Self {
            addr,
            handle,
            closing: closing_tx,
            state: shared,
        })
    }

    /// The services `/ready` waits for from now on (after a reload added or
    /// removed some).
    pub fn set_services(&self, services: Vec<String>) {
        if let Ok(mut current) = self.state.services.write() {
            *current = services;
        }
    }

    /// Ends the event streams, stops accepting and finishes the requests
    /// in progress.
    pub async fn stop(self) {
        let _ = self.closing.send(true);
        self.handle.stop(true).await;
    }
}

fn unavailable(e: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::ServiceUnavailable().body(format!("{e}\n"))
}

async fn dashboard_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(DASHBOARD)
}

async fn events_page(state: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // Proxies such as nginx would otherwise buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(events::stream(state.broker.clone(), state.closing.clone()))
}

async fn stats_page(state: web::Data<State>) -> HttpResponse {
    match state.broker.stats().await {
        Ok(stats) => HttpResponse::Ok().json(stats),
        Err(e) => unavailable(e),
    }
}

async fn metrics_page(state: web::Data<State>) -> HttpResponse {
    let stats = match state.broker.stats().await {
        Ok(stats) => stats,
        Err(e) => return unavailable(e),
    };
    let sums = state
        .broker
        .metrics()
        .send(GetLatencySums)
        .await
        .unwrap_or_default();
    match prometheus::TextEncoder::new().encode_to_string(&metrics::families(&stats, &sums)) {
        Ok(text) => HttpResponse::Ok()
            .content_type(prometheus::TEXT_FORMAT)
            .body(text),
        Err(e) => HttpResponse::InternalServerError().body(format!("{e}\n")),
    }
}

async fn logs_page(
    state: web::Data<State>,
    process: web::Path<String>,
    query: web::Query<logs::LogsQuery>,
) -> HttpResponse {
    logs::logs_page(
        &state.broker,
        state.closing.clone(),
        process.into_inner(),
        query.into_inner(),
    )
    .await
}

/// Ready workers per service of `services` (each listed, 0 if none), and
/// whether every one has at least one: what `/ready` answers, and what
/// `procbroker run` waits for before it tells systemd it is ready.
pub fn readiness(
    processes: &[ProcessInfo],
    services: &[String],
) -> (bool, BTreeMap<String, usize>) {
    let mut ready: BTreeMap<String, usize> = services.iter().map(|s| (s.clone(), 0)).collect();
    for p in processes {
        if p.status == ProcessStatus::Ready
            && let Some(n) = ready.get_mut(p.service.as_str())
        {
            *n += 1;
        }
    }
    (ready.values().all(|&n| n > 0), ready)
}

async fn ready_page(state: web::Data<State>) -> HttpResponse {
    let processes = match state.broker.processes().await {
        Ok(p) => p,
        Err(e) => return unavailable(e),
    };
    let services = match state.services.read() {
        Ok(services) => services.clone(),
        Err(e) => return unavailable(e),
    };
    let (all, ready) = readiness(&processes, &services);
    let body = serde_json::json!({ "ready": all, "ready_workers": ready });
    if all {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
