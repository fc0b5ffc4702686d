//! A worker built on `jobmeter-emit`, and `jobmeter emit run`, against the
//! real broker and a running meter: every job ends with the right status
//! (succeeded, cancelled when the guard is dropped, failed on panic or a
//! failing command), heartbeats flow while jobs run, and the meter charges
//! each job once with nothing dead-lettered.

use crate::support;

use jobmeter_emit::{Emitter, EmitterConfig, JobSpec, StopStatus};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn worker_jobs_are_started_heartbeated_stopped_and_charged() {
    let prefix = fresh_prefix("emit");
    let dir = tempfile::tempdir().expect("tempdir");
    let meter = MeterSpec::new(&prefix, "emit-0", dir.path().join("state"), 2).start();
    wait_for_topics(&prefix);
    let mut cfg = EmitterConfig::new(brokers(), "gpu-worker/test/node-1").with_prefix(&prefix);
    cfg.heartbeat_interval = Duration::from_millis(250);
    let emitter = Emitter::new(cfg).expect("emitter");
    let acct = "acct-emit";

    let ok = emitter
        .start(JobSpec::inference(acct, "job-ok", "sdxl-1.0").gpu("A100-80GB"))
        .expect("start");
    std::thread::sleep(Duration::from_millis(1_300));
    ok.finish(StopStatus::Succeeded).expect("finish");

    {
        let _dropped = emitter.start(JobSpec::fine_tune(acct, "job-dropped")).expect("start");
        std::thread::sleep(Duration::from_millis(300));
    }

    let e2 = emitter.clone();
    let panicked = std::thread::spawn(move || {
        let _g = e2
            .start(JobSpec::workflow_step(acct, "job-step-1", "flux-dev", "run-1"))
            .expect("start");
        std::thread::sleep(Duration::from_millis(200));
        panic!("the model crashed");
    })
    .join();
    assert!(panicked.is_err());
    let step2 = emitter
        .start(JobSpec::workflow_step(acct, "job-step-2", "sdxl-1.0", "run-1"))
        .expect("start");
    step2.finish(StopStatus::Succeeded).expect("finish");
    assert!(
        emitter.start(JobSpec::inference(acct, "job-bad", "")).is_err(),
        "refused locally"
    );
    emitter.flush(Duration::from_secs(30)).expect("all delivered");

    // The CLI wrapper, with a command that succeeds and one that fails.
    let cli = |job: &str, cmd: &[&str]| {
        std::process::Command::new(bin())
            .args(["emit", "run", "--brokers", &brokers(), "--topic-prefix", &prefix])
            .args([
                "--account",
                acct,
                "--job",
                job,
                "--kind",
                "inference",
                "--model",
                "sdxl-turbo",
            ])
            .args(["--heartbeat", "200ms", "--"])
            .args(cmd)
            .output()
            .expect("jobmeter emit run")
    };
    let good = cli("job-cli-ok", &["sleep", "1"]);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let bad = cli("job-cli-fail", &["sh", "-c", "exit 3"]);
    assert_eq!(bad.status.code(), Some(3), "the command's exit code is passed on");

    let want: BTreeMap<&str, &str> = [
        ("job-ok", "succeeded"),
        ("job-dropped", "cancelled"),
        ("job-step-1", "failed"),
        ("job-step-2", "succeeded"),
        ("job-cli-ok", "succeeded"),
        ("job-cli-fail", "failed"),
    ]
    .into_iter()
    .collect();
    wait_until("a charge per job", Duration::from_secs(60), &[&meter], || {
        read_all(&format!("{prefix}.charges")).len() >= want.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    let charges: Vec<Value> = read_all(&format!("{prefix}.charges"))
        .iter()
        .map(|c| serde_json::from_str(c).expect("json"))
        .collect();
    let got: BTreeMap<String, String> = charges
        .iter()
        .map(|c| {
            (
                c["job_id"].as_str().unwrap_or_default().to_owned(),
                c["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want: BTreeMap<String, String> = want.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    assert_eq!(got, want, "one charge per job, with its status");
    assert_eq!(charges.len(), want.len(), "no job charged twice");
    let ok_charge = charges.iter().find(|c| c["job_id"] == "job-ok").expect("job-ok");
    let ms = ok_charge["duration_ms"].as_i64().unwrap_or(0);
    assert!((1_250..3_000).contains(&ms), "job-ok ran {ms} ms");
    assert!(read_all(&format!("{prefix}.dlq")).is_empty(), "nothing dead-lettered");
    let events: Vec<Value> = read_all(&format!("{prefix}.job-events"))
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let heartbeats: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "job.heartbeat" && e["subject"] == "job-ok")
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert!(heartbeats.len() >= 3, "heartbeats while job-ok ran: {heartbeats:?}");
    let distinct: std::collections::BTreeSet<_> = heartbeats.iter().collect();
    assert_eq!(distinct.len(), heartbeats.len(), "each heartbeat has its own id");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "job.heartbeat" && e["subject"] == "job-cli-ok"),
        "the CLI wrapper heartbeats too"
    );
}
