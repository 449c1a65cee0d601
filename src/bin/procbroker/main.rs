//! The `procbroker` command: `run` the broker, run a built-in `worker`, and
//! the protocol tools a service author needs to see what a worker says and to
//! drive one by hand:
//!
//! ```text
//! printf '%s\n' '{"type":"request","id":"Echo","correlation_id":1,"target":"echo","payload":"hi"}' \
//!   | procbroker encode | ./my_worker | procbroker decode
//! ```

mod alloc;
mod bench;
mod conformance;
mod cpu;
mod interrupt;
mod jsonl;
mod logging;
mod logs;
mod notify;
mod phases;
mod reload;
mod run;
mod stats;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use procbroker::protocol::{DEFAULT_MAX_FRAME_BYTES, Envelope, EnvelopeCodec, InvalidEnvelope};
use std::io::{BufRead, BufWriter, Read, Write};
use tokio_util::codec::{Decoder, Encoder};

/// A faster allocator than glibc's for the broker's many small, short-lived
/// allocations (envelopes, subjects, NATS messages); the library leaves the
/// choice to whoever embeds it.
#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "procbroker",
    version,
    about = "Subprocess broker over length-prefixed MessagePack pipes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The built-in workers.
#[derive(Clone, Copy, clap::ValueEnum)]
enum WorkerName {
    /// Answers every request with its payload verbatim.
    Echo,
    /// Answers every MessagePack-RPC request with its params (for
    /// `protocol = "msgpack-rpc"`).
    RpcEcho,
    /// Benchmark client: its `Run` method makes calls and times them.
    BenchClient,
    /// Benchmark worker: streams partial replies (`Repeat`), holds requests
    /// until their `cancel` and times it (`Hold`, `Cancels`).
    BenchWorker,
    /// Raw benchmark peer: echoes length-prefixed frames (no envelopes).
    RawEcho,
    /// Raw benchmark peer: the client side of the raw baseline.
    RawClient,
    /// Raw NATS benchmark peer: answers requests on a subject (from the
    /// environment) until stdin closes.
    NatsEcho,
    /// The Rust SDK's conformance subject: Echo, Sleep, Active, Count,
    /// Fail, Deadline, WhoAmI, Relay, Notify, LastCancel, LastNote and the
    /// `note` event (PROTOCOL.md lists what each does).
    Conformance,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker: spawn the configured services, route between them,
    /// stop them in order on SIGTERM / SIGINT.
    ///
    /// Settings: the file (or the embedded default: 4 built-in echo workers),
    /// then PROCBROKER_<SECTION>_<KEY> environment variables, then --set.
    /// Logs go to stderr: LOG_LEVEL or RUST_LOG, LOG_FORMAT=json|text.
    Run {
        /// The TOML config file (docs/configuration.md); default: the embedded one.
        #[arg(long, short)]
        config: Option<std::path::PathBuf>,
        /// Override one setting, e.g. --set broker.queue_capacity=500
        /// (repeatable; applied after the file and the environment).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Time round trips through the broker; --baseline also
    /// runs the raw limit of the same topology and prints the ratio.
    Bench(bench::BenchArgs),
    /// Check a service SDK against the protocol: run its conformance
    /// subject under a broker and on its own, print one `PASS|FAIL name
    /// detail` line per check, then `conformance: N/M checks passed`.
    ///
    /// The subject (the program after `--`) serves the methods PROTOCOL.md
    /// lists for it. Under a broker it runs as service `subject` with
    /// --workers workers, beside the kit's own in-process service `kit`;
    /// two more copies run directly, the kit playing the broker on their
    /// pipes (a shutdown from another source, the drain, EOF, the raw
    /// stdout). The exit status is 0 only if every check passed. The
    /// subject's stderr is logged at info: LOG_LEVEL=info shows it.
    Conformance(conformance::ConformanceArgs),
    /// Show a running broker's stats (its admin endpoint's /stats): per
    /// process status, pid, memory, restarts, counters, latency.
    Stats {
        /// The admin endpoint (`[admin] listen` of the running broker).
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: String,
        /// Print the GetMessageStats reply as JSON instead of a table.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw the table every second, like `top`, until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Show a process's last stderr lines, or a service's (its workers'
    /// lines merged in time order, each prefixed with its process id), from
    /// a running broker's admin endpoint (`/logs/{process}`).
    ///
    /// Each line: the time the broker read it (RFC 3339, UTC), a space, the
    /// line as the child wrote it. With -f, new lines as they come, until
    /// Ctrl-C or the broker stops.
    Logs {
        /// A process id (`echo.2`) or a service (`echo`).
        #[arg(value_name = "PROCESS|SERVICE")]
        target: String,
        /// How many of the newest lines (in total, for a service).
        #[arg(short = 'n', long = "lines", default_value_t = 100)]
        lines: usize,
        /// Follow: print new lines as they come.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The admin endpoint (`[admin] listen` of the running broker).
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: String,
    },
    /// Run a built-in worker on stdin/stdout (the broker spawns these; with
    /// `command = "@self"` a config re-executes this binary).
    Worker {
        /// Which worker.
        #[arg(value_enum)]
        name: WorkerName,
    },
    /// Read frames from stdin and print each envelope as one JSON line.
    ///
    /// The payload shows as JSON, with tagged objects for what JSON lacks:
    /// {"$bin": hex}, {"$ext": [type, hex]}, {"$timestamp": "RFC 3339"},
    /// {"$f32": n}, {"$f64": "NaN"|"inf"|"-inf"}, {"$str": hex} (a str
    /// that is not UTF-8), {"$map": [[key, value], ...]} (a map a JSON
    /// object cannot hold). When that would not encode back to the same
    /// bytes (a longer encoding than needed) the line also has
    /// "payload_msgpack": the payload's exact bytes in hex; a payload nested
    /// over 100 levels deep is shown by "payload_msgpack" alone.
    ///
    /// Invalid frames are printed as {"invalid": "<why>", ...} and reading goes
    /// on; a broken stream (length over the limit, EOF inside a frame) ends
    /// the command with exit status 1, as it would end a child's pipe.
    Decode {
        /// Largest frame body accepted, in bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES)]
        max_frame_bytes: usize,
    },
    /// Read envelopes as JSON objects, one per line, and write them to stdout
    /// as frames (flushed after each line, so a worker can be driven live).
    ///
    /// Keys and payload as `decode` prints them, so `decode | encode` gives
    /// the payloads back byte for byte; "payload_msgpack", when given, is
    /// written as is. A line that is not a valid envelope is reported on
    /// stderr with its number and skipped; the exit status is then 1.
    Encode {
        /// Largest frame body written, in bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES)]
        max_frame_bytes: usize,
        /// Stop at the first bad line (exit status 1) instead of skipping it.
        #[arg(long)]
        strict: bool,
    },
}

fn worker(name: WorkerName) -> Result<()> {
    use procbroker::{loadgen, service, workers};
    match name {
        WorkerName::Echo => service::run(|_| workers::echo())?,
        WorkerName::RpcEcho => {
            workers::rpc_echo(std::io::stdin().lock(), std::io::stdout().lock())?
        }
        WorkerName::BenchClient => service::run(loadgen::client::methods)?,
        WorkerName::BenchWorker => service::run(loadgen::worker::methods)?,
        WorkerName::RawEcho => loadgen::raw::echo()?,
        WorkerName::RawClient => loadgen::raw::client()?,
        WorkerName::NatsEcho => loadgen::nats::echo()?,
        WorkerName::Conformance => service::run(workers::conformance)?,
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run_command(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line; no backtrace for a user's mistake.
            eprintln!("procbroker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> Result<()> {
    match command {
        Command::Run { config, sets } => {
            logging::init("info")?;
            run::run(config, &sets)
        }
        Command::Stats { admin, json, watch } => {
            if watch {
                stats::watch(&admin)
            } else {
                stats::stats(&admin, json)
            }
        }
        Command::Logs {
            target,
            lines,
            follow,
            admin,
        } => logs::logs(&admin, &target, lines, follow),
        Command::Bench(args) => {
            // Quiet unless asked: the result goes to stdout, progress to stderr.
            logging::init("warn")?;
            bench::check(&args)?;
            match phases::Plan::of(&args)? {
                Some(plan) => {
                    let interrupt =
                        interrupt::Interrupt::install().context("handling SIGINT and SIGTERM")?;
                    let placement = bench::Placement::new(args.pin)?;
                    placement.pin_self()?;
                    phases::bench(&args, plan, placement, interrupt)
                }
                None => bench::bench(args),
            }
        }
        Command::Conformance(args) => {
            logging::init("warn")?;
            conformance::conformance(args)
        }
        Command::Worker { name } => {
            logging::init("info")?;
            worker(name)
        }
        Command::Decode { max_frame_bytes } => decode(max_frame_bytes),
        Command::Encode {
            max_frame_bytes,
            strict,
        } => encode(max_frame_bytes, strict),
    }
}

fn decode(max_frame_bytes: usize) -> Result<()> {
    let mut codec = EnvelopeCodec::new(max_frame_bytes);
    let mut input = std::io::stdin().lock();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut chunk).context("reading stdin")?;
        if n == 0 {
            while let Some(item) = codec
                .decode_eof(&mut buf)
                .context("stdin is not a frame stream")?
            {
                print_item(&mut out, item)?;
            }
            out.flush()?;
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(item) = codec
            .decode(&mut buf)
            .context("stdin is not a frame stream")?
        {
            print_item(&mut out, item)?;
        }
        out.flush()?;
    }
}

fn print_item(out: &mut impl Write, item: Result<Envelope, InvalidEnvelope>) -> Result<()> {
    use jsonl::Json;
    let line = match item {
        Ok(envelope) => jsonl::envelope_line(&envelope),
        Err(invalid) => {
            let mut obj = vec![
                ("invalid".to_owned(), Json::Str(invalid.error.to_string())),
                ("len".to_owned(), Json::Num(invalid.len.into())),
            ];
            if let Some(request) = invalid.request {
                obj.push((
                    "correlation_id".into(),
                    Json::Num(request.correlation_id.into()),
                ));
                obj.push((
                    "id".into(),
                    request
                        .id
                        .as_deref()
                        .map_or(Json::Null, |id| Json::Str(id.to_owned())),
                ));
            }
            Json::Obj(obj)
        }
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes a frame for each line; a bad line is reported on stderr with its
/// number and skipped (`strict`: it ends the command), and makes the exit
/// status 1 at the end.
fn encode(max_frame_bytes: usize, strict: bool) -> Result<()> {
    let mut codec = EnvelopeCodec::new(max_frame_bytes);
    let mut input = std::io::stdin().lock();
    let mut out = std::io::stdout().lock();
    let mut buf = BytesMut::new();
    let mut line = Vec::new();
    let (mut number, mut bad, mut first_bad) = (0u64, 0u64, 0u64);
    loop {
        line.clear();
        if input
            .read_until(b'\n', &mut line)
            .context("reading stdin")?
            == 0
        {
            break;
        }
        number += 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        buf.clear();
        let framed =
            jsonl::line_envelope(&line).and_then(|envelope| Ok(codec.encode(&envelope, &mut buf)?));
        match framed {
            Ok(()) => {
                out.write_all(&buf).context("writing stdout")?;
                out.flush().context("writing stdout")?;
            }
            Err(e) if strict => return Err(e.context(format!("line {number}"))),
            Err(e) => {
                eprintln!("procbroker encode: line {number}: {e:#}; skipped");
                bad += 1;
                if first_bad == 0 {
                    first_bad = number;
                }
            }
        }
    }
    if bad > 0 {
        bail!("{bad} of {number} lines were not written (the first: line {first_bad})");
    }
    Ok(())
}
