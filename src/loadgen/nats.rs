//! The raw limit of `procbroker bench --mode cluster`: plain
//! NATS request/reply between two async-nats processes on the same server,
//! with no broker, no envelope and no pipe. The same payload size and
//! number in flight as the procbroker run it is compared with.

use bytes::Bytes;
use futures_util::StreamExt;
use std::io::Read;

use super::{Failure, RunReport, drive};

/// The responder's environment: the server and the subject to answer on.
pub const URL_ENV: &str = "PROCBROKER_BENCH_NATS_URL";
/// See [`URL_ENV`].
pub const SUBJECT_ENV: &str = "PROCBROKER_BENCH_NATS_SUBJECT";

/// `procbroker worker nats-echo`: answers every message on the subject
/// with its payload, until its stdin closes (its parent's way to stop it).
/// Prints `ready` once subscribed.
pub fn echo() -> std::io::Result<()> {
    let url = std::env::var(URL_ENV)
        .map_err(|_| std::io::Error::other(format!("{URL_ENV} is not set")))?;
    let subject = std::env::var(SUBJECT_ENV)
        .map_err(|_| std::io::Error::other(format!("{SUBJECT_ENV} is not set")))?;
    // Stdin EOF ends the process whatever the runtime is doing.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = async_nats::connect(url)
            .await
            .map_err(std::io::Error::other)?;
        let mut requests = client
            .subscribe(subject)
            .await
            .map_err(std::io::Error::other)?;
        client.flush().await.map_err(std::io::Error::other)?;
        println!("ready");
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                let _ = client.publish(reply, request.payload).await;
            }
        }
        Ok(())
    })
}

/// Makes `calls` requests of `payload_bytes` to `subject` with
/// `concurrency` in flight, each with `Client::request` (every one is
/// answered here, so its pending entry never outlives it). Runs on the
/// current thread's local task set.
pub async fn request_reply(
    url: &str,
    subject: String,
    calls: u64,
    concurrency: u64,
    payload_bytes: u64,
) -> std::io::Result<RunReport> {
    let client = async_nats::connect(url)
        .await
        .map_err(std::io::Error::other)?;
    let payload = Bytes::from(vec![0x5au8; usize::try_from(payload_bytes).unwrap_or(64)]);
    Ok(drive(calls, concurrency, move || {
        let (client, subject, payload) = (client.clone(), subject.clone(), payload.clone());
        async move {
            match client.request(subject, payload.clone()).await {
                Ok(reply) if reply.payload == payload => Ok(()),
                Ok(_) => Err(Failure::new(
                    "wrong_reply",
                    "the reply is not the payload sent",
                )),
                Err(e) => Err(Failure::new(
                    format!("{:?}", e.kind()).to_lowercase(),
                    e.to_string(),
                )),
            }
        }
    })
    .await)
}
