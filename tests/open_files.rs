//! A `Scale` that the open-files limit cannot hold is refused up front,
//! with the arithmetic, instead of starting workers until descriptors run
//! out. Alone in its test binary: it lowers the process's own limit.

mod support;

use procbroker::embed::ProcBroker;
use procbroker::protocol::rpc::ProcessStatus;
use support::*;

#[actix::test]
async fn a_scale_past_the_open_files_limit_is_refused_with_the_arithmetic() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let limit = 150.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, limit, hard).expect("setrlimit");

    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("sl", 1)).await.expect("spawn");
    // 60 workers need 240 descriptors; 150 cannot hold them.
    let e = broker.scale("sl", 60).await.expect_err("refused");
    let message = e.to_string();
    assert!(message.contains("open-files limit is 150"), "{message}");
    assert!(message.contains("59 new workers need 236"), "{message}");
    // Nothing was started.
    let rows = broker.processes().await.expect("list");
    assert_eq!(rows.len(), 1, "{rows:?}");
    // As the RPC: `bad_request` with the same words.
    let e = broker
        .call(
            "broker",
            "Scale",
            &serde_json::json!({"service": "sl", "workers": 60}),
        )
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some("bad_request"));
    assert!(e.to_string().contains("ulimit -n"), "{e}");
    // What fits starts, all of it ready.
    let up = broker.scale("sl", 8).await.expect("fits");
    assert_eq!(up.started.len(), 7, "{up:?}");
    let rows = broker.processes().await.expect("list");
    assert!(
        rows.iter().all(|p| p.status == ProcessStatus::Ready),
        "{rows:?}"
    );
    // A Spawn is held to the same arithmetic.
    let e = broker.spawn(echo("more", 40)).await.expect_err("refused");
    assert!(e.to_string().contains("open-files limit"), "{e}");
    broker.shutdown().await;
}
