//! systemd's notify protocol, for `Type=notify` units (`sd_notify(3)`).
//!
//! With `NOTIFY_SOCKET` set, `procbroker run` sends:
//!
//! - `READY=1` (with `STATUS=`) once every configured service has a ready
//!   worker, the condition of `/ready`, and not before;
//! - `RELOADING=1` with `MONOTONIC_USEC=` when a SIGHUP reload starts, and
//!   `READY=1` when it is done (for `Type=notify-reload` as well);
//! - `STOPPING=1` when it starts to shut down;
//! - `STATUS=` with the ready workers of each service, when they change
//!   (looked at every 2 s);
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, from `READY=1` on, when that
//!   is set and `WATCHDOG_PID` is unset or this process. Each is sent only
//!   after the Router has answered a message, from the Router's own thread:
//!   a Router that is wedged (its thread stuck, or its mailbox not moving)
//!   stops the pings, and systemd restarts the broker.
//!
//! The messages are those of the `sd-notify` crate; a socket path is sent
//! to with it, an abstract one (`@name`, as some containers use) by the
//! few lines here. A send that fails (a `NOTIFY_SOCKET` that does not
//! exist, say) is logged once; the broker runs on.

use procbroker::actors::messages::PendingCount;
use procbroker::admin::readiness;
use procbroker::embed::BrokerHandle;
use sd_notify::NotifyState;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// How often the ready worker counts are looked at for `STATUS=`.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often readiness is looked at before `READY=1`.
const READY_POLL: Duration = Duration::from_millis(25);

/// The broker's side of the notify socket. Lives on the System's thread.
pub struct Notifier {
    /// `NOTIFY_SOCKET` is set.
    enabled: bool,
    /// A failure was logged already.
    failed: Cell<bool>,
    /// `READY=1` was sent once (a reload's `READY=1` waits for it).
    ready_sent: Cell<bool>,
    /// The last `STATUS=` sent.
    status: RefCell<String>,
    /// The services `READY=1` waits for (a reload changes them).
    services: RefCell<Vec<String>>,
}

impl Notifier {
    /// From the environment; does nothing when `NOTIFY_SOCKET` is unset.
    pub fn from_env(services: Vec<String>) -> Rc<Self> {
        Rc::new(Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            failed: Cell::new(false),
            ready_sent: Cell::new(false),
            status: RefCell::new(String::new()),
            services: RefCell::new(services),
        })
    }

    /// Sends `states` in one datagram; the first failure is logged.
    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = send(states)
            && !self.failed.replace(true)
        {
            let socket = std::env::var("NOTIFY_SOCKET").unwrap_or_default();
            tracing::warn!(socket = %socket, error = %e,
                "cannot notify the service manager (NOTIFY_SOCKET); running on without it (said once)");
        }
    }

    /// The services `READY=1` and `STATUS=` are about, from now on.
    pub fn set_services(&self, services: Vec<String>) {
        *self.services.borrow_mut() = services;
    }

    /// `RELOADING=1` with the monotonic clock (a SIGHUP reload starts).
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.insert(1, now);
        }
        self.send(&states);
    }

    /// `READY=1` after a reload, if the first one was sent (else the
    /// watcher sends it once the services are ready).
    pub async fn reloaded(&self, broker: &BrokerHandle) {
        if self.ready_sent.get() {
            let status = self.status_text(broker).await;
            self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
            *self.status.borrow_mut() = status;
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    async fn status_text(&self, broker: &BrokerHandle) -> String {
        let processes = broker.processes().await.unwrap_or_default();
        let services = self.services.borrow().clone();
        if services.is_empty() {
            return "running, no services configured".into();
        }
        let (_, ready) = readiness(&processes, &services);
        let counts: Vec<String> = ready
            .iter()
            .map(|(service, n)| {
                let of = processes.iter().filter(|p| &p.service == service).count();
                format!("{service} {n}/{of}")
            })
            .collect();
        format!("ready workers: {}", counts.join(", "))
    }

    /// Whether `/ready` would be 200 now.
    async fn is_ready(&self, broker: &BrokerHandle) -> bool {
        let Ok(processes) = broker.processes().await else {
            return false;
        };
        let services = self.services.borrow().clone();
        readiness(&processes, &services).0
    }

    /// Waits until every configured service has a ready worker, sends
    /// `READY=1`, then keeps `STATUS=` current and (when asked for) pings
    /// the watchdog, until the System stops. Spawn it on the Router's
    /// thread once the services are started.
    pub async fn watch(self: Rc<Self>, broker: BrokerHandle) {
        if !self.enabled {
            return;
        }
        while !self.is_ready(&broker).await {
            actix::clock::sleep(READY_POLL).await;
        }
        let status = self.status_text(&broker).await;
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        *self.status.borrow_mut() = status;
        self.ready_sent.set(true);
        tracing::info!("told the service manager READY=1");
        if let Some(every) = watchdog_every() {
            tracing::info!(every_ms = every.as_millis() as u64, "watchdog pings on");
            actix::spawn(Rc::clone(&self).watchdog(broker.clone(), every));
        }
        let mut ticks = actix::clock::interval(STATUS_EVERY);
        loop {
            ticks.tick().await;
            let status = self.status_text(&broker).await;
            if *self.status.borrow() != status {
                self.send(&[NotifyState::Status(&status)]);
                *self.status.borrow_mut() = status;
            }
        }
    }

    /// `WATCHDOG=1` every `every`, each once the Router has answered.
    async fn watchdog(self: Rc<Self>, broker: BrokerHandle, every: Duration) {
        let mut ticks = actix::clock::interval(every);
        // Late pings are not made up for in a burst: one a period.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match tokio::time::timeout(every, broker.router().send(PendingCount)).await {
                Ok(Ok(_)) => self.send(&[NotifyState::Watchdog]),
                Ok(Err(_)) => return, // the Router is gone: the broker is stopping
                Err(_) => {
                    tracing::error!(
                        waited_ms = every.as_millis() as u64,
                        "the Router did not answer in time: no watchdog ping"
                    );
                }
            }
        }
    }
}

/// Half of `WATCHDOG_USEC` when it is set and `WATCHDOG_PID` is unset or
/// this process.
fn watchdog_every() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// One datagram with every state, one per line.
fn send(states: &[NotifyState]) -> std::io::Result<()> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let Some(name) = socket.to_str().and_then(|s| s.strip_prefix('@')) else {
        return sd_notify::notify(states);
    };
    // An abstract socket: sd-notify connects to paths only.
    use std::os::linux::net::SocketAddrExt;
    let mut text = String::new();
    for state in states {
        text.push_str(&state.to_string());
        text.push('\n');
    }
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.connect_addr(&addr)?;
    sock.send(text.as_bytes())?;
    Ok(())
}
