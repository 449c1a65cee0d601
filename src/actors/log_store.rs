//! LogStore: children's stderr. Every process id keeps a ring of its last
//! [`RING_LINES`] lines, kept across its restarts; each line also goes to
//! the readers following it (`/logs/{process}?follow=1`), to its file
//! under `[logs] dir` (rotated, reopened on SIGUSR1), and, a bounded number
//! a second, to the broker's own log.
//!
//! **Where it runs.** On an arbiter (a thread) of its own, which reads the
//! children's stderr pipes itself: a bridge hands over the pipe's file
//! descriptor when it spawns a child ([`AttachStderr`]) and does nothing
//! more per line. So a child flooding stderr costs this thread, never the
//! Router's thread; the hot path has no part in logs.
//!
//! **What a line is.** What the child wrote up to a newline, at most
//! [`MAX_LINE_BYTES`] bytes (a longer one is cut, see [`crate::pipe::LogLines`]),
//! invalid UTF-8 replaced, stored as `RFC 3339 time` + space + the line:
//! the format of `/logs` and of the files. The time is when the broker read
//! it (to the microsecond, UTC).
//!
//! **What it costs.** Memory: at most [`RING_LINES`] lines of at most
//! [`MAX_LINE_BYTES`] each per process (16 MiB in the worst case, ~100 KB
//! for lines of 100 bytes), a read buffer of 64 KiB per pipe, and
//! [`FOLLOW_BUFFER`] lines per process for slow followers (a follower that
//! falls further behind is told how many it missed). A child that writes
//! faster than this thread can store is slowed down by its own pipe, never
//! by the broker's memory. A process nobody follows has no follower
//! buffer at all. Log volume: `broker_log_lines_per_s` lines a
//! second per process at most, then one "N lines suppressed" line a second.

use actix::prelude::*;
use bytes::BytesMut;
use futures_util::Stream;
use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;
use tokio_util::codec::Decoder;

use super::log_file::LogFile;
use crate::config::LogsConfig;
use crate::pipe::LogLines;

/// Lines kept per process.
pub const RING_LINES: usize = 1000;
/// The longest line kept whole, in bytes; longer ones are cut.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines a follower may fall behind before it is told it missed some.
pub const FOLLOW_BUFFER: usize = 1024;
/// Bytes read from a pipe at a time.
const READ_BYTES: usize = 64 * 1024;
/// How often overdue "N lines suppressed" lines are written.
const SUPPRESSED_TICK: Duration = Duration::from_secs(1);

/// A line as stored: `RFC 3339 time`, a space, the line.
pub type LogLine = Arc<str>;

/// Read this child's stderr from now on (sent by its bridge at each
/// start). `previous`: how the run before ended, when this is a restart.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct AttachStderr {
    /// The process id.
    pub id: String,
    /// The child's pid (for the restart line).
    pub pid: u32,
    /// The read end of its stderr pipe.
    pub stderr: OwnedFd,
    /// How the previous run of this bridge ended (a restart by policy).
    pub previous: Option<String>,
}

/// The newest `n` lines of a process (all kept, without `n`), oldest
/// first; `None` if the process has no log.
#[derive(Debug, Message)]
#[rtype(result = "Option<Vec<LogLine>>")]
pub struct TailLog {
    /// The process id.
    pub id: String,
    /// How many of the newest lines.
    pub n: Option<usize>,
}

/// The newest `n` lines (none without `n`) and every line after them:
/// taken in one step, so none is missed or seen twice. Makes an empty
/// log for a process that has none yet (the caller checked it exists).
#[derive(Debug, Message)]
#[rtype(result = "(Vec<LogLine>, broadcast::Receiver<LogLine>)")]
pub struct FollowLog {
    /// The process id.
    pub id: String,
    /// Lines to replay first.
    pub n: Option<usize>,
}

/// Reopens every log file (after an external rotation); answers whether a
/// `[logs] dir` is configured.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct ReopenLogs;

/// Processes gone from the configuration (scaled down, service removed):
/// their rings go, their followers' streams end; their files stay.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ForgetLogs(pub Vec<String>);

/// Lines of one process's pipe, as one read brought them.
struct Batch {
    id: Arc<str>,
    lines: Vec<String>,
}

/// At most `limit` lines a second pass; the rest are counted.
#[derive(Debug)]
struct LineBudget {
    limit: u32,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

/// What to do with one line for the broker's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Log it; before it, say that `suppressed` lines were left out (if any).
    Log { suppressed: u64 },
    /// Leave it out (counted).
    Suppress,
}

impl LineBudget {
    fn new(limit: u32, now: Instant) -> Self {
        Self {
            limit: limit.max(1),
            window_start: now,
            in_window: 0,
            suppressed: 0,
        }
    }

    fn roll(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.in_window = 0;
            true
        } else {
            false
        }
    }

    fn admit(&mut self, now: Instant) -> Admit {
        self.roll(now);
        if self.in_window < self.limit {
            self.in_window += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Admit::Suppress
        }
    }

    /// Lines left out in a window that is over, not reported yet.
    fn overdue(&mut self, now: Instant) -> Option<u64> {
        (self.suppressed > 0 && self.roll(now)).then(|| std::mem::take(&mut self.suppressed))
    }
}

/// One process's log.
struct ProcessLog {
    ring: VecDeque<LogLine>,
    /// Made at the first follower, dropped when the last one is gone: a
    /// channel holds [`FOLLOW_BUFFER`] slots, which a process nobody
    /// follows should not pay for.
    followers: Option<broadcast::Sender<LogLine>>,
    file: Option<LogFile>,
    budget: LineBudget,
}

impl ProcessLog {
    fn new(id: &str, config: &LogsConfig) -> Self {
        Self {
            ring: VecDeque::new(),
            followers: None,
            file: config
                .dir
                .as_ref()
                .map(|dir| LogFile::new(dir, id, config.max_bytes, config.keep)),
            budget: LineBudget::new(config.broker_log_lines_per_s, Instant::now()),
        }
    }

    fn push(&mut self, line: LogLine) {
        if let Some(file) = &mut self.file {
            file.write_line(&line);
        }
        if let Some(followers) = &self.followers
            && followers.send(Arc::clone(&line)).is_err()
        {
            // Nobody follows any more.
            self.followers = None;
        }
        if self.ring.len() == RING_LINES {
            self.ring.pop_front();
        }
        self.ring.push_back(line);
    }

    fn newest(&self, n: Option<usize>) -> Vec<LogLine> {
        let n = n.unwrap_or(RING_LINES).min(self.ring.len());
        self.ring
            .iter()
            .skip(self.ring.len() - n)
            .cloned()
            .collect()
    }
}

/// `time line`: a line as stored.
fn stamped(at: &str, line: &str) -> LogLine {
    let mut s = String::with_capacity(at.len() + 1 + line.len());
    s.push_str(at);
    s.push(' ');
    s.push_str(line);
    s.into()
}

/// The LogStore actor.
pub struct LogStore {
    config: LogsConfig,
    processes: HashMap<Arc<str>, ProcessLog>,
}

impl LogStore {
    /// A store with these settings (start it with [`LogStore::start_own`]).
    pub fn new(config: LogsConfig) -> Self {
        Self {
            config,
            processes: HashMap::new(),
        }
    }

    /// Starts the store on an arbiter (a thread) of its own; the arbiter
    /// lives as long as the actix System.
    pub fn start_own(config: LogsConfig) -> Addr<Self> {
        let arbiter = Arbiter::new();
        Self::start_in_arbiter(&arbiter.handle(), move |_| Self::new(config))
    }

    fn entry(&mut self, id: &str) -> &mut ProcessLog {
        let config = &self.config;
        self.processes
            .entry(Arc::from(id))
            .or_insert_with(|| ProcessLog::new(id, config))
    }

    fn now() -> String {
        humantime::format_rfc3339_micros(SystemTime::now()).to_string()
    }
}

impl Actor for LogStore {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(SUPPRESSED_TICK, |store, _| {
            let now = Instant::now();
            for (id, log) in &mut store.processes {
                if let Some(n) = log.budget.overdue(now) {
                    suppressed_line(id, n, store.config.broker_log_lines_per_s);
                }
                if let Some(file) = &mut log.file {
                    file.flush();
                }
            }
        });
    }
}

fn suppressed_line(id: &str, n: u64, limit: u32) {
    tracing::info!(target: "procbroker::child", process = %id, suppressed = n,
        "{n} lines suppressed (logs.broker_log_lines_per_s = {limit}; the ring and the log files have every line)");
}

impl Handler<AttachStderr> for LogStore {
    type Result = ();

    fn handle(&mut self, msg: AttachStderr, ctx: &mut Self::Context) {
        let known = self.processes.contains_key(msg.id.as_str());
        let log = self.entry(&msg.id);
        if known {
            let why = msg
                .previous
                .map(|p| format!("; the previous run {p}"))
                .unwrap_or_default();
            let note = format!("procbroker: {} restarted (pid {}){why}", msg.id, msg.pid);
            log.push(stamped(&Self::now(), &note));
        }
        match tokio::net::unix::pipe::Receiver::from_owned_fd(msg.stderr) {
            Ok(pipe) => {
                ctx.add_stream(LineBatches::new(Arc::from(msg.id.as_str()), pipe));
            }
            Err(e) => {
                tracing::error!(process = %msg.id, error = %e, "cannot read the child's stderr; its lines are lost");
            }
        }
    }
}

impl StreamHandler<Batch> for LogStore {
    fn handle(&mut self, batch: Batch, _: &mut Self::Context) {
        let at = Self::now();
        let to_broker_log = self.config.to_broker_log;
        let limit = self.config.broker_log_lines_per_s;
        let Some(log) = self.processes.get_mut(&batch.id) else {
            // Forgotten while its child still wrote: nothing keeps it.
            return;
        };
        let now = Instant::now();
        for line in batch.lines {
            if to_broker_log {
                match log.budget.admit(now) {
                    Admit::Log { suppressed } => {
                        if suppressed > 0 {
                            suppressed_line(&batch.id, suppressed, limit);
                        }
                        tracing::info!(target: "procbroker::child", process = %batch.id, "{line}");
                    }
                    Admit::Suppress => {}
                }
            }
            log.push(stamped(&at, &line));
        }
        if let Some(file) = &mut log.file {
            file.flush();
        }
    }

    /// One pipe ended (its child exited); the store goes on.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<TailLog> for LogStore {
    type Result = Option<Vec<LogLine>>;

    fn handle(&mut self, msg: TailLog, _: &mut Self::Context) -> Self::Result {
        self.processes
            .get(msg.id.as_str())
            .map(|log| log.newest(msg.n))
    }
}

impl Handler<FollowLog> for LogStore {
    type Result = MessageResult<FollowLog>;

    fn handle(&mut self, msg: FollowLog, _: &mut Self::Context) -> Self::Result {
        let log = self.entry(&msg.id);
        let replay = match msg.n {
            Some(n) => log.newest(Some(n)),
            None => Vec::new(),
        };
        let receiver = match &log.followers {
            Some(followers) => followers.subscribe(),
            None => {
                let (followers, receiver) = broadcast::channel(FOLLOW_BUFFER);
                log.followers = Some(followers);
                receiver
            }
        };
        MessageResult((replay, receiver))
    }
}

impl Handler<ReopenLogs> for LogStore {
    type Result = bool;

    fn handle(&mut self, _: ReopenLogs, _: &mut Self::Context) -> bool {
        let Some(dir) = &self.config.dir else {
            return false;
        };
        let mut reopened = 0usize;
        for log in self.processes.values_mut() {
            if let Some(file) = &mut log.file
                && file.reopen()
            {
                reopened += 1;
            }
        }
        tracing::info!(dir = %dir.display(), files = reopened, "log files reopened");
        true
    }
}

impl Handler<ForgetLogs> for LogStore {
    type Result = ();

    fn handle(&mut self, ForgetLogs(ids): ForgetLogs, _: &mut Self::Context) {
        for id in ids {
            if let Some(mut log) = self.processes.remove(id.as_str())
                && let Some(file) = &mut log.file
            {
                file.flush();
            }
        }
    }
}

/// A child's stderr as batches of lines: what one read brought, so the
/// file is flushed once per read, not once per line.
struct LineBatches {
    id: Arc<str>,
    pipe: tokio::net::unix::pipe::Receiver,
    buf: BytesMut,
    codec: LogLines,
    done: bool,
}

impl LineBatches {
    fn new(id: Arc<str>, pipe: tokio::net::unix::pipe::Receiver) -> Self {
        Self {
            id,
            pipe,
            buf: BytesMut::new(),
            codec: LogLines::new(MAX_LINE_BYTES),
            done: false,
        }
    }

    fn batch(&self, lines: Vec<String>) -> Poll<Option<Batch>> {
        Poll::Ready(Some(Batch {
            id: Arc::clone(&self.id),
            lines,
        }))
    }
}

impl Stream for LineBatches {
    type Item = Batch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Batch>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let mut lines = Vec::new();
        loop {
            // The decoder never fails.
            while let Ok(Some(line)) = this.codec.decode(&mut this.buf) {
                lines.push(line);
            }
            if !lines.is_empty() {
                return this.batch(lines);
            }
            this.buf.reserve(READ_BYTES);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.pipe), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(n)) if n > 0 => {}
                // EOF, or an error reading: what is left is the last line.
                Poll::Ready(_) => {
                    this.done = true;
                    while let Ok(Some(line)) = this.codec.decode_eof(&mut this.buf) {
                        lines.push(line);
                    }
                    return if lines.is_empty() {
                        Poll::Ready(None)
                    } else {
                        this.batch(lines)
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_lets_the_limit_through_then_counts_and_reports_once() {
        let t0 = Instant::now();
        let mut b = LineBudget::new(3, t0);
        let first: Vec<Admit> = (0..5).map(|_| b.admit(t0)).collect();
        assert_eq!(first[..3], [Admit::Log { suppressed: 0 }; 3]);
        assert_eq!(first[3..], [Admit::Suppress; 2]);
        assert_eq!(b.overdue(t0), None, "the window is not over");
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(b.overdue(t1), Some(2));
        assert_eq!(b.overdue(t1), None, "reported once");
        // Or reported with the next line that passes.
        let _ = (0..4).map(|_| b.admit(t1)).count();
        assert_eq!(
            b.admit(t1 + Duration::from_secs(1)),
            Admit::Log { suppressed: 1 }
        );
    }

    #[test]
    fn the_ring_keeps_the_newest_lines_in_order() {
        let mut log = ProcessLog::new("p.0", &LogsConfig::default());
        for i in 0..(RING_LINES + 5) {
            log.push(stamped("t", &i.to_string()));
        }
        assert_eq!(log.ring.len(), RING_LINES);
        let newest = log.newest(Some(2));
        let expect = [
            format!("t {}", RING_LINES + 3),
            format!("t {}", RING_LINES + 4),
        ];
        assert_eq!(
            newest.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
            expect
        );
        assert_eq!(log.newest(None).len(), RING_LINES);
        assert_eq!(&*log.newest(None)[0], "t 5");
        assert_eq!(log.newest(Some(0)).len(), 0);
    }
}
