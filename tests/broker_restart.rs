//! The broker stops and starts in the middle of a run; the meter recovers
//! by itself and the outputs are still exact. Uses its own broker (on
//! `JOBMETER_TEST_RESTART_PORT`, default 19092) so that restarting it does
//! not disturb the other tests.

use crate::support;

use jobmeter_offline::simulate::FleetOptions;
use std::process::Command;
use std::time::Duration;
use support::*;

fn kafka(cmd: &str, port: &str) {
    let st = Command::new("bash")
        .arg(root().join("deploy/local/kafka.sh"))
        .arg(cmd)
        .env("JOBMETER_KAFKA_PORT", port)
        .status()
        .expect("deploy/local/kafka.sh");
    assert!(st.success(), "kafka.sh {cmd} failed");
}

/// The broker's run directory (`kafka.sh env`).
fn rundir(port: &str) -> std::path::PathBuf {
    let out = Command::new("bash")
        .arg(root().join("deploy/local/kafka.sh"))
        .arg("env")
        .env("JOBMETER_KAFKA_PORT", port)
        .output()
        .expect("deploy/local/kafka.sh env");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let dir = text
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("rundir="))
        .unwrap_or_else(|| panic!("no rundir in {text:?}"));
    std::path::PathBuf::from(dir)
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn survives_broker_restart() {
    let port = std::env::var("JOBMETER_TEST_RESTART_PORT").unwrap_or_else(|_| "19092".into());
    kafka("wipe", &port);
    // A pid file left by a broker that died without `stop` names a pid that
    // may since belong to another process (here: this test). `stop` must
    // not signal it, and `start` must start a broker anyway.
    let rundir = rundir(&port);
    std::fs::create_dir_all(&rundir).expect("run dir");
    std::fs::write(rundir.join("broker.pid"), std::process::id().to_string()).expect("pid file");
    kafka("stop", &port);
    std::fs::write(rundir.join("broker.pid"), std::process::id().to_string()).expect("pid file");
    kafka("start", &port);
    let pid = std::fs::read_to_string(rundir.join("broker.pid")).expect("pid file");
    assert_ne!(
        pid.trim(),
        std::process::id().to_string(),
        "the stale pid file was kept"
    );
    // This test's own broker, for this test's thread only.
    let _own = use_brokers(&format!("127.0.0.1:{port}"));
    let mut prefix = fresh_prefix("brokerrestart");
    // Its broker is stopped at the end and wiped at the next start.
    prefix.keep_topics();
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "br-0", dir.path().join("state"), 2);
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    let fleet = FleetOptions {
        seed: 5,
        jobs: 1_500,
        accounts: 40,
        mean_gap_ms: 2_000,
        ..FleetOptions::default()
    };
    let w = workload(&fleet, 2);
    produce_accounts(&prefix, &w);
    let want = expected(&w, w.events.len());
    let n = w.events.len();
    produce_events(&prefix, &w, 0..n / 2, 10_000);
    std::thread::sleep(Duration::from_secs(1));
    kafka("restart", &port);
    produce_events(&prefix, &w, n / 2..n, 10_000);
    wait_until(
        "all charges after the broker restart",
        Duration::from_secs(300),
        &[&meter],
        || read_all(&format!("{prefix}.charges")).len() >= want.charges.len(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = read_outputs(&prefix);
    assert_eq!(meter.terminate(), Some(0));
    kafka("stop", &port);
    assert_same(&got, &want);
}
