//! The raw limit of the relay topology: client → relay → echo → relay →
//! client over the same kind of pipes, with blocking `read`/`write` of
//! length-prefixed frames and nothing else (no actors, no MessagePack).
//!
//! Both peers and the relay flush only when their input buffer is drained
//!, the best a blocking program can do, so the procbroker path
//! is compared with the strongest simple baseline, not a strawman.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Quantiles, RunReport, ns_histogram};
use crate::pipe::{PIPE_BYTES, set_pipe_size};

const BUF: usize = 64 * 1024;

/// How long a raw run may go with no frame moving before it is called
/// stalled: its peers are killed and the run fails, where it would
/// otherwise wait forever on a peer that died or hung (the procbroker
/// client gives each call as long).
const STALL: Duration = Duration::from_secs(30);

/// Kills `pids` (SIGKILL) once `moved` has not changed for [`STALL`]:
/// their pipes close, and whoever waits on them sees EOF. Stopped when
/// dropped, before the peers are reaped (their pids are then still theirs).
struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    stalled: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(pids: Vec<u32>, moved: Arc<AtomicU64>) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stalled = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, stalled) = (Arc::clone(&stop), Arc::clone(&stalled));
            std::thread::spawn(move || {
                let (lock, wake) = &*stop;
                let (mut seen, mut since) = (moved.load(Ordering::Relaxed), Instant::now());
                let Ok(mut stopped) = lock.lock() else { return };
                while !*stopped {
                    let now = moved.load(Ordering::Relaxed);
                    if now != seen {
                        (seen, since) = (now, Instant::now());
                    } else if since.elapsed() >= STALL {
                        stalled.store(true, Ordering::Relaxed);
                        for &pid in &pids {
                            if let Ok(pid) = i32::try_from(pid) {
                                let _ = nix::sys::signal::kill(
                                    nix::unistd::Pid::from_raw(pid),
                                    nix::sys::signal::Signal::SIGKILL,
                                );
                            }
                        }
                        return;
                    }
                    stopped = match wake.wait_timeout(stopped, Duration::from_millis(500)) {
                        Ok((guard, _)) => guard,
                        Err(_) => return,
                    };
                }
            })
        };
        Self {
            stop,
            stalled,
            thread: Some(thread),
        }
    }

    /// Stops watching; `Err` if the run had stalled (and its peers were killed).
    fn finish(mut self) -> std::io::Result<()> {
        self.halt();
        if self.stalled.load(Ordering::Relaxed) {
            return Err(std::io::Error::other(format!(
                "the raw baseline stalled: no frame moved for {} s, its peers were killed",
                STALL.as_secs()
            )));
        }
        Ok(())
    }

    fn halt(&mut self) {
        if let Ok(mut stopped) = self.stop.0.lock() {
            *stopped = true;
        }
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Reads one frame body into `buf`; `false` at a clean EOF.
fn read_frame(from: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    match from.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    from.read_exact(buf)?;
    Ok(true)
}

fn write_frame(to: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    to.write_all(&len.to_be_bytes())?;
    to.write_all(body)
}

fn stdio() -> std::io::Result<(BufReader<File>, BufWriter<File>)> {
    let input = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let output = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    Ok((
        BufReader::with_capacity(BUF, input),
        BufWriter::with_capacity(BUF, output),
    ))
}

/// The raw echo peer: every frame back, verbatim, until EOF.
pub fn echo() -> std::io::Result<()> {
    let (mut input, mut output) = stdio()?;
    let mut buf = Vec::new();
    while read_frame(&mut input, &mut buf)? {
        write_frame(&mut output, &buf)?;
        if input.buffer().is_empty() {
            output.flush()?;
        }
    }
    output.flush()
}

/// The raw client peer. Each run starts with a 24-byte control frame on
/// stdin (calls, concurrency, payload bytes; u64 big-endian); the client then
/// makes the calls and prints one line on stderr:
/// `ok elapsed_ns p50 p90 p99 p999 max` (nanoseconds).
pub fn client() -> std::io::Result<()> {
    let (mut input, output) = stdio()?;
    // Its own writes, never blocking (see `Outbox`).
    let output = output.into_inner().map_err(|e| e.into_error())?;
    let mut err = std::io::stderr().lock();
    let mut buf = Vec::new();
    while read_frame(&mut input, &mut buf)? {
        let word = |i: usize| {
            buf.get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes)
        };
        let (calls, concurrency, payload) = (word(0), word(1), word(2));
        let start = Instant::now();
        let moved = AtomicU64::new(0);
        let (answered, histogram) =
            ping_pong(&mut input, &output, calls, concurrency, payload, &moved)?;
        let elapsed = start.elapsed().as_nanos();
        let q = Quantiles::of(&histogram);
        writeln!(
            err,
            "{answered} {elapsed} {} {} {} {} {}",
            q.p50, q.p90, q.p99, q.p999, q.max
        )?;
        err.flush()?;
    }
    Ok(())
}

/// Copies frames from `from` to `to`, flushing when `from` is drained;
/// counts each frame in `moved`.
fn pump(
    mut from: BufReader<impl Read>,
    to: &Mutex<Option<BufWriter<ChildStdin>>>,
    moved: &AtomicU64,
) {
    let mut buf = Vec::new();
    while let Ok(true) = read_frame(&mut from, &mut buf) {
        let Ok(mut guard) = to.lock() else { return };
        let Some(to) = guard.as_mut() else { return };
        if write_frame(to, &buf).is_err() {
            return;
        }
        moved.fetch_add(1, Ordering::Relaxed);
        if from.buffer().is_empty() && to.flush().is_err() {
            return;
        }
    }
}

/// The raw relay with its two peers, `program worker raw-client` and
/// `program worker raw-echo`, running.
pub struct RawRelay {
    client: Child,
    echo: Child,
    to_client: Arc<Mutex<Option<BufWriter<ChildStdin>>>>,
    to_echo: Arc<Mutex<Option<BufWriter<ChildStdin>>>>,
    report: BufReader<std::process::ChildStderr>,
    pumps: Vec<JoinHandle<()>>,
    /// Frames the pumps have relayed, for the [`Watchdog`].
    moved: Arc<AtomicU64>,
}

fn spawn_peer(program: &Path, name: &str) -> std::io::Result<Child> {
    let child = Command::new(program)
        .args(["worker", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(i), Some(o)) = (&child.stdin, &child.stdout) {
        let _ = set_pipe_size(i.as_fd(), PIPE_BYTES);
        let _ = set_pipe_size(o.as_fd(), PIPE_BYTES);
    }
    Ok(child)
}

fn missing(what: &str) -> std::io::Error {
    std::io::Error::other(format!("peer has no {what}"))
}

impl RawRelay {
    /// Starts both peers (from the `procbroker` binary at `program`) and the
    /// two relay threads.
    pub fn start(program: &Path) -> std::io::Result<Self> {
        let mut client = spawn_peer(program, "raw-client")?;
        let mut echo = spawn_peer(program, "raw-echo")?;
        let wrap = |stdin: Option<ChildStdin>| {
            stdin
                .map(|s| Arc::new(Mutex::new(Some(BufWriter::with_capacity(BUF, s)))))
                .ok_or_else(|| missing("stdin"))
        };
        let to_client = wrap(client.stdin.take())?;
        let to_echo = wrap(echo.stdin.take())?;
        let from_client = client.stdout.take().ok_or_else(|| missing("stdout"))?;
        let from_echo = echo.stdout.take().ok_or_else(|| missing("stdout"))?;
        let report = BufReader::new(client.stderr.take().ok_or_else(|| missing("stderr"))?);
        let moved = Arc::new(AtomicU64::new(0));
        let pumps = vec![
            {
                let (to, moved) = (Arc::clone(&to_echo), Arc::clone(&moved));
                std::thread::spawn(move || {
                    pump(BufReader::with_capacity(BUF, from_client), &to, &moved)
                })
            },
            {
                let (to, moved) = (Arc::clone(&to_client), Arc::clone(&moved));
                std::thread::spawn(move || {
                    pump(BufReader::with_capacity(BUF, from_echo), &to, &moved)
                })
            },
        ];
        Ok(Self {
            client,
            echo,
            to_client,
            to_echo,
            report,
            pumps,
            moved,
        })
    }

    /// The pids of the client and echo peers (for CPU placement).
    #[must_use]
    pub fn pids(&self) -> [u32; 2] {
        [self.client.id(), self.echo.id()]
    }

    /// One run: `calls` round trips of `payload_bytes` (at least 8) with
    /// `concurrency` in flight.
    pub fn run(
        &mut self,
        calls: u64,
        concurrency: u64,
        payload_bytes: u64,
    ) -> std::io::Result<RunReport> {
        {
            let mut guard = self
                .to_client
                .lock()
                .map_err(|_| std::io::Error::other("relay thread panicked"))?;
            let to = guard.as_mut().ok_or_else(|| missing("stdin"))?;
            let mut control = Vec::with_capacity(24);
            for word in [calls, concurrency, payload_bytes] {
                control.extend_from_slice(&word.to_be_bytes());
            }
            write_frame(to, &control)?;
            to.flush()?;
        }
        let watchdog = Watchdog::start(
            vec![self.client.id(), self.echo.id()],
            Arc::clone(&self.moved),
        );
        let mut line = String::new();
        let read = self.report.read_line(&mut line);
        watchdog.finish()?;
        if read? == 0 {
            return Err(std::io::Error::other("raw client exited"));
        }
        let n: Vec<u64> = line
            .split_whitespace()
            .map(|w| w.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| n.get(i).copied().unwrap_or(0);
        Ok(unanswered(RunReport {
            ok: at(0),
            errors: calls.saturating_sub(at(0)),
            elapsed_ns: at(1),
            latency_ns: Quantiles {
                p50: at(2),
                p90: at(3),
                p99: at(4),
                p999: at(5),
                max: at(6),
            },
            error_codes: Vec::new(),
        }))
    }
}

impl Drop for RawRelay {
    /// EOF to both peers; they exit, the pumps see EOF and end; all reaped.
    fn drop(&mut self) {
        for to in [&self.to_client, &self.to_echo] {
            if let Ok(mut guard) = to.lock() {
                guard.take();
            }
        }
        let _ = self.client.wait();
        let _ = self.echo.wait();
        for pump in self.pumps.drain(..) {
            let _ = pump.join();
        }
    }
}

/// The raw limit of the direct topology: this process against `workers`
/// `program worker raw-echo` children, one thread per child keeping its
/// share of `concurrency` in flight, blocking frames, no envelopes.
pub fn direct(
    program: &Path,
    workers: u64,
    calls: u64,
    concurrency: u64,
    payload_bytes: u64,
    place: &dyn Fn(u32),
) -> std::io::Result<RunReport> {
    let workers = workers.clamp(1, concurrency.max(1));
    let mut children = Vec::new();
    for _ in 0..workers {
        let child = spawn_peer(program, "raw-echo")?;
        place(child.id());
        children.push(child);
    }
    let moved = Arc::new(AtomicU64::new(0));
    let watchdog = Watchdog::start(children.iter().map(Child::id).collect(), Arc::clone(&moved));
    let start = Instant::now();
    let mut threads = Vec::new();
    for (i, child) in children.iter_mut().enumerate() {
        let i = i as u64;
        let share = calls / workers + u64::from(i < calls % workers);
        let lanes = concurrency / workers + u64::from(i < concurrency % workers);
        let to = child.stdin.take().ok_or_else(|| missing("stdin"))?;
        let from =
            BufReader::with_capacity(BUF, child.stdout.take().ok_or_else(|| missing("stdout"))?);
        let moved = Arc::clone(&moved);
        threads.push(std::thread::spawn(move || {
            let mut from = from;
            ping_pong(&mut from, to, share, lanes, payload_bytes, &moved)
        }));
    }
    let mut histogram = ns_histogram();
    let mut ok = 0;
    let mut lanes_ended = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok((n, h))) => {
                ok += n;
                let _ = histogram.add(&h);
            }
            Ok(Err(e)) => lanes_ended = Err(e),
            Err(_) => lanes_ended = Err(std::io::Error::other("raw lane panicked")),
        }
    }
    let elapsed_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    // A stall says more than the broken pipe the lanes saw after it.
    let ended = watchdog.finish().and(lanes_ended);
    for mut child in children {
        let _ = child.wait();
    }
    ended?;
    Ok(unanswered(RunReport {
        ok,
        errors: calls.saturating_sub(ok),
        elapsed_ns,
        latency_ns: Quantiles::of(&histogram),
        error_codes: Vec::new(),
    }))
}

/// The raw peers have no error replies: a call not answered is one whose
/// peer closed its pipe first.
fn unanswered(mut report: RunReport) -> RunReport {
    if report.errors > 0 {
        report.error_codes = vec![super::ErrorCount {
            code: "unanswered".into(),
            count: report.errors,
            message: "a raw peer closed its pipe before answering".into(),
        }];
    }
    report
}

/// Frames on their way into a pipe whose writes never block.
///
/// A peer that blocks writing requests stops reading replies, and once the
/// frames in flight outgrow the pipes between the two peers (1 MiB × 4 in
/// flight does), its peer blocks writing those replies and stops reading
/// too: neither ever wakes. So what the pipe does not take now waits here
/// while [`ping_pong`] reads replies. Small frames are batched as a
/// `BufWriter` would (one write when the replies read so far are handled);
/// a large frame goes straight to the pipe, and only what the pipe refuses
/// is copied.
struct Outbox<W> {
    to: W,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    sent: usize,
}

impl<W: Write + AsFd> Outbox<W> {
    fn new(to: W) -> std::io::Result<Self> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(to.as_fd(), FcntlArg::F_GETFL)?);
        fcntl(to.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(Self {
            to,
            pending: Vec::with_capacity(BUF),
            sent: 0,
        })
    }

    /// Queues one frame; writes if the batch is full or the frame large.
    fn push_frame(&mut self, body: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(body.len())
            .map_err(std::io::Error::other)?
            .to_be_bytes();
        if body.len() < BUF {
            self.pending.extend_from_slice(&len);
            self.pending.extend_from_slice(body);
            if self.pending.len() - self.sent >= BUF {
                self.write_some()?;
            }
            return Ok(());
        }
        if self.write_some()? {
            let mut written = 0;
            while written < len.len() + body.len() {
                let (head, tail) = if written < len.len() {
                    (&len[written..], body)
                } else {
                    (&[][..], &body[written - len.len()..])
                };
                let slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(tail)];
                match self.to.write_vectored(&slices) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if written < len.len() {
                self.pending.extend_from_slice(&len[written..]);
                written = len.len();
            }
            self.pending.extend_from_slice(&body[written - len.len()..]);
        } else {
            self.pending.extend_from_slice(&len);
            self.pending.extend_from_slice(body);
        }
        Ok(())
    }

    /// Writes what the pipe takes now; `true` when nothing is left.
    fn write_some(&mut self) -> std::io::Result<bool> {
        while self.sent < self.pending.len() {
            match self.to.write(&self.pending[self.sent..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.pending.len() {
            self.pending.clear();
            self.sent = 0;
            return Ok(true);
        }
        // Written bytes leave once they are half the buffer: each byte is
        // moved at most once, and the buffer stays as large as the frames in
        // flight.
        if self.sent >= self.pending.len() / 2 {
            self.pending.drain(..self.sent);
            self.sent = 0;
        }
        Ok(false)
    }

    /// Writes while waiting for `from` to have something to read: returns
    /// when it has (or at once when nothing is left to write).
    fn write_until_readable(&mut self, from: BorrowedFd<'_>) -> std::io::Result<()> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        while !self.write_some()? {
            let mut fds = [
                PollFd::new(from, PollFlags::POLLIN),
                PollFd::new(self.to.as_fd(), PollFlags::POLLOUT),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            // Readable, at EOF or broken: the read that follows says which.
            if fds[0].any().unwrap_or(true) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// `calls` round trips over one pipe pair with `lanes` in flight, frames of
/// `payload_bytes` (at least 8: the sequence number), counting each reply in
/// `moved`. Returns the replies read and their latencies.
fn ping_pong<R: Read + AsFd, W: Write + AsFd>(
    from: &mut BufReader<R>,
    to: W,
    calls: u64,
    lanes: u64,
    payload_bytes: u64,
    moved: &AtomicU64,
) -> std::io::Result<(u64, hdrhistogram::Histogram<u64>)> {
    fn send<W: Write + AsFd>(
        out: &mut Outbox<W>,
        seq: u64,
        body: &mut [u8],
        sent_at: &mut [Option<Instant>],
    ) -> std::io::Result<()> {
        body[..8].copy_from_slice(&seq.to_be_bytes());
        if let Some(slot) = sent_at.get_mut(seq as usize) {
            *slot = Some(Instant::now());
        }
        out.push_frame(body)
    }
    let mut out = Outbox::new(to)?;
    let mut body = vec![0x5au8; usize::try_from(payload_bytes.max(8)).unwrap_or(8)];
    let mut sent_at = vec![None::<Instant>; usize::try_from(calls).unwrap_or(0)];
    let mut histogram = ns_histogram();
    let (mut issued, mut answered) = (0u64, 0u64);
    let mut buf = Vec::new();
    while issued < calls.min(lanes.max(1)) {
        send(&mut out, issued, &mut body, &mut sent_at)?;
        issued += 1;
    }
    while answered < calls {
        // Replies already buffered are handled first; then what is queued
        // is written (the batch), reading as soon as a reply comes.
        if from.buffer().is_empty() {
            out.write_until_readable(from.get_ref().as_fd())?;
        }
        if !read_frame(from, &mut buf)? {
            break;
        }
        let seq = buf
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes);
        if let Some(at) = sent_at.get(seq as usize).copied().flatten() {
            histogram.saturating_record(u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        answered += 1;
        moved.fetch_add(1, Ordering::Relaxed);
        if issued < calls {
            send(&mut out, issued, &mut body, &mut sent_at)?;
            issued += 1;
        }
    }
    Ok((answered, histogram))
}
