//! Subprocess bridges with real children: the Python example worker under
//! the broker, round-robin over real processes, restarts, stop.

use procbroker::config::ServiceConfig;
use procbroker::embed::ProcBroker;
use procbroker::protocol::rpc::ProcessStatus;
use std::time::Duration;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn python_echo(workers: u32) -> ServiceConfig {
    ServiceConfig::new("pyecho", python())
        .args([format!("{}/examples/python/echo_worker.py", env!("CARGO_MANIFEST_DIR"))])
        .workers(workers)
}

#[actix::test]
async fn the_python_example_serves_under_the_broker() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spawned = broker.spawn(python_echo(2)).await.expect("spawn");
    assert_eq!(spawned.len(), 2);
    assert!(spawned.iter().all(|p| p.status == ProcessStatus::Ready && p.pid.is_some()), "{spawned:?}");
    let reply = broker.call("pyecho", "Reverse", &"stressed").await.expect("call");
    assert_eq!(reply.payload_as::<String>().expect("str"), "desserts");
    let stopped = broker.stop("pyecho").await.expect("stop");
    assert_eq!(stopped, ["pyecho.0", "pyecho.1"]);
    let table = broker.processes().await.expect("list");
    assert!(table.iter().all(|p| p.status == ProcessStatus::Stopped), "{table:?}");
    let _ = Duration::ZERO;
}
