//! One more copy of the subject, driven over its own pipes with the kit
//! playing the broker: for what a broker cannot show (a `shutdown` from
//! another source, EOF, the raw bytes of stdout).
//!
//! Plain threads and blocking pipes: a thread reads stdout (so every wait
//! has a deadline) and keeps every byte for the frames-only check; another
//! passes stderr lines to the log as the broker would.

use bytes::BytesMut;
use std::io::{BufRead, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder};

use crate::config::SELF_COMMAND;
use crate::names::{PROCESS_ID_ENV, SERVICE_ENV};
use crate::protocol::{Envelope, EnvelopeCodec};

/// What came from the subject's stdout.
#[derive(Debug)]
pub enum Received {
    /// A valid envelope (boxed: the other variants are small).
    Frame(Box<Envelope>),
    /// Nothing within the wait.
    Nothing,
    /// Stdout closed (the process exited or closed it).
    Closed,
    /// Not a valid frame: the stream is out of sync or the frame is not an
    /// envelope.
    Bad(String),
}

/// A running copy of the subject.
pub struct Direct {
    /// Its process id (`PROCBROKER_PROCESS_ID`).
    pub id: String,
    child: Child,
    stdin: Option<ChildStdin>,
    chunks: Receiver<Vec<u8>>,
    /// Read and not yet decoded.
    buffered: BytesMut,
    /// Every byte read from stdout.
    raw: Vec<u8>,
    /// Stdout reached its end.
    closed: bool,
    codec: EnvelopeCodec,
}

impl Direct {
    /// Starts `command args…` as process `id` of service `service`, with
    /// the environment the broker gives a child.
    pub fn start(command: &str, args: &[String], service: &str, id: &str) -> std::io::Result<Self> {
        let program = if command == SELF_COMMAND {
            std::env::current_exe()?
        } else {
            command.into()
        };
        let mut child = Command::new(program)
            .args(args)
            .env(PROCESS_ID_ENV, id)
            .env(SERVICE_ENV, service)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
        let (tx, chunks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        if let Some(stderr) = child.stderr.take() {
            let process = id.to_owned();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    tracing::info!(target: "procbroker::child", process = %process, "{line}");
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Self {
            id: id.to_owned(),
            child,
            stdin,
            chunks,
            buffered: BytesMut::new(),
            raw: Vec::new(),
            closed: false,
            codec: EnvelopeCodec::default(),
        })
    }

    /// Writes one frame to the subject's stdin.
    pub fn send(&mut self, envelope: &Envelope) -> Result<(), String> {
        let mut frame = BytesMut::new();
        self.codec
            .encode(envelope, &mut frame)
            .map_err(|e| format!("the kit could not encode a frame: {e}"))?;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| "stdin is closed".to_owned())?;
        stdin
            .write_all(&frame)
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing to the subject's stdin: {e}"))
    }

    /// The next frame the subject wrote, waiting at most `within`.
    pub fn recv(&mut self, within: Duration) -> Received {
        let deadline = Instant::now() + within;
        loop {
            let decoded = if self.closed {
                self.codec.decode_eof(&mut self.buffered)
            } else {
                self.codec.decode(&mut self.buffered)
            };
            match decoded {
                Ok(Some(Ok(envelope))) => return Received::Frame(Box::new(envelope)),
                Ok(Some(Err(invalid))) => {
                    return Received::Bad(format!(
                        "a frame that is not an envelope: {}",
                        invalid.error
                    ));
                }
                Err(e) => return Received::Bad(e.to_string()),
                Ok(None) if self.closed => return Received::Closed,
                Ok(None) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.take(chunk),
                Err(RecvTimeoutError::Timeout) => return Received::Nothing,
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
            }
        }
    }

    fn take(&mut self, chunk: Vec<u8>) {
        self.raw.extend_from_slice(&chunk);
        self.buffered.extend_from_slice(&chunk);
    }

    /// Closes the subject's stdin: EOF.
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Whether it exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits at most `within` for it to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Ends it (killed if still running) and returns every byte it wrote
    /// on stdout.
    pub fn finish(mut self) -> Vec<u8> {
        self.close_stdin();
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // What the reader still has, until stdout's end (bounded: a
        // grandchild could hold the pipe open).
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.take(chunk),
                Err(_) => break,
            }
        }
        std::mem::take(&mut self.raw)
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
