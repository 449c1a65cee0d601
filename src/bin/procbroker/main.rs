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
mod cpu;
mod interrupt;
mod logging;
mod reload;
mod run;
mod stats;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use procbroker::protocol::{
    DEFAULT_MAX_FRAME_BYTES, Envelope, EnvelopeCodec, InvalidEnvelope, MessageType, Payload,
};
use serde_json::{Map, Value as Json, json};
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
    /// Raw benchmark peer: echoes length-prefixed frames (no envelopes).
    RawEcho,
    /// Raw benchmark peer: the client side of the raw baseline.
    RawClient,
    /// Raw NATS benchmark peer: answers requests on a subject (from the
    /// environment) until stdin closes.
    NatsEcho,
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
        /// The TOML config file (the README's shape); default: the embedded one.
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
    /// Run a built-in worker on stdin/stdout (the broker spawns these; with
    /// `command = "@self"` a config re-executes this binary).
    Worker {
        /// Which worker.
        #[arg(value_enum)]
        name: WorkerName,
    },
    /// Read frames from stdin and print each envelope as one JSON line.
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
    /// Keys as in PROTOCOL.md; `payload` is any JSON value, written as MessagePack.
    Encode {
        /// Largest frame body written, in bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES)]
        max_frame_bytes: usize,
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
        WorkerName::RawEcho => loadgen::raw::echo()?,
        WorkerName::RawClient => loadgen::raw::client()?,
        WorkerName::NatsEcho => loadgen::nats::echo()?,
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
        Command::Bench(args) => {
            // Quiet unless asked: the result goes to stdout, progress to stderr.
            logging::init("warn")?;
            bench::bench(args)
        }
        Command::Worker { name } => {
            logging::init("info")?;
            worker(name)
        }
        Command::Decode { max_frame_bytes } => decode(max_frame_bytes),
        Command::Encode { max_frame_bytes } => encode(max_frame_bytes),
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
    let line = match item {
        Ok(envelope) => envelope_to_json(&envelope)?,
        Err(invalid) => {
            let mut obj = json!({"invalid": invalid.error.to_string(), "len": invalid.len});
            if let Some(request) = invalid.request {
                obj["correlation_id"] = json!(request.correlation_id);
                obj["id"] = json!(request.id.as_deref());
            }
            obj
        }
    };
    writeln!(out, "{line}")?;
    Ok(())
}

fn envelope_to_json(e: &Envelope) -> Result<Json> {
    let mut obj = Map::new();
    obj.insert("type".into(), json!(e.kind.as_str()));
    obj.insert("id".into(), json!(&*e.id));
    if e.kind != MessageType::Event || e.correlation_id != 0 {
        obj.insert("correlation_id".into(), json!(e.correlation_id));
    }
    for (key, value) in [("source", &e.source), ("target", &e.target)] {
        if !value.is_empty() {
            obj.insert(key.into(), json!(&**value));
        }
    }
    if let Some(ms) = e.timeout_ms {
        obj.insert("timeout_ms".into(), json!(ms));
    }
    for (key, value) in [("error", &e.error), ("code", &e.code)] {
        if let Some(value) = value {
            obj.insert(key.into(), json!(&**value));
        }
    }
    if let Some(payload) = &e.payload {
        let value = rmpv::decode::read_value(&mut payload.as_bytes().as_ref())
            .context("payload was validated but does not decode")?;
        obj.insert("payload".into(), msgpack_to_json(value));
    }
    Ok(Json::Object(obj))
}

/// MessagePack has more kinds than JSON: bin shows as {"$bin": hex}, ext as
/// {"$ext": type, "data": hex}, non-string map keys as their JSON text.
fn msgpack_to_json(value: rmpv::Value) -> Json {
    use rmpv::Value;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    match value {
        Value::Nil => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Integer(i) => i
            .as_u64()
            .map(|u| json!(u))
            .or_else(|| i.as_i64().map(|v| json!(v)))
            .unwrap_or(Json::Null),
        Value::F32(f) => json!(f),
        Value::F64(f) => json!(f),
        Value::String(s) => match s.into_str() {
            Some(s) => json!(s),
            None => json!({"$invalid_utf8": true}),
        },
        Value::Binary(b) => json!({"$bin": hex(&b)}),
        Value::Array(items) => Json::Array(items.into_iter().map(msgpack_to_json).collect()),
        Value::Map(pairs) => Json::Object(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::String(s) if s.is_str() => s.into_str().unwrap_or_default(),
                        other => msgpack_to_json(other).to_string(),
                    };
                    (key, msgpack_to_json(v))
                })
                .collect(),
        ),
        Value::Ext(kind, data) => json!({"$ext": kind, "data": hex(&data)}),
    }
}

fn encode(max_frame_bytes: usize) -> Result<()> {
    let mut codec = EnvelopeCodec::new(max_frame_bytes);
    let mut out = std::io::stdout().lock();
    let mut buf = BytesMut::new();
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let envelope = json_to_envelope(&line).with_context(|| format!("line {}", n + 1))?;
        buf.clear();
        codec
            .encode(&envelope, &mut buf)
            .with_context(|| format!("line {}", n + 1))?;
        out.write_all(&buf).context("writing stdout")?;
        out.flush().context("writing stdout")?;
    }
    Ok(())
}

fn json_to_envelope(line: &str) -> Result<Envelope> {
    let Json::Object(mut obj) = serde_json::from_str::<Json>(line).context("not JSON")? else {
        bail!("an envelope must be a JSON object");
    };
    let text = |obj: &Map<String, Json>, key: &str| -> Result<Option<String>> {
        match obj.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(other) => bail!("{key:?} must be a string, not {other}"),
        }
    };
    let uint = |obj: &Map<String, Json>, key: &str| -> Result<Option<u64>> {
        match obj.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .with_context(|| format!("{key:?} must be a non-negative integer, not {v}")),
        }
    };
    let kind: MessageType = text(&obj, "type")?.context("missing \"type\"")?.parse()?;
    let mut envelope = Envelope::request(
        text(&obj, "target")?.unwrap_or_default(),
        text(&obj, "id")?.unwrap_or_default(),
        uint(&obj, "correlation_id")?.unwrap_or(0),
    );
    envelope.kind = kind;
    envelope.source = text(&obj, "source")?.unwrap_or_default().into();
    envelope.timeout_ms = uint(&obj, "timeout_ms")?;
    envelope.error = text(&obj, "error")?.map(Into::into);
    envelope.code = text(&obj, "code")?.map(Into::into);
    if let Some(payload) = obj.remove("payload") {
        envelope.payload = Some(Payload::encode(&payload)?);
    }
    envelope.validate()?;
    Ok(envelope)
}
