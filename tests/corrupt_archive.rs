//! A finished job in RocksDB that cannot be decoded, found only when an
//! event makes the meter read it back (finished jobs are not loaded at
//! restore), stops its own partition and no other: it is marked, the
//! pipeline is rebuilt, and the restore sets the partition aside as for a
//! record found at restore. `jobmeter rebuild` recovers it.

use crate::support;

use jobmeter_core::state::{keys, StateChange, Table};
use jobmeter_core::{AccountId, JobId};
use std::time::Duration;
use support::*;

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn a_finished_job_that_cannot_be_read_back_stops_its_partition_alone() {
    let prefix = fresh_prefix("corruptarch");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let spec = MeterSpec::new(&prefix, "corruptarch-0", state.clone(), 2);
    let (w, n, half) = meter_first_half(&prefix, &spec, 11, 1_000);

    // A charged job of partition 0, and its stop event.
    let (account, job, stop) = w.events[..n / 2]
        .iter()
        .filter(|e| partition_of(&e.key, 2) == 0)
        .filter_map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.json).ok()?;
            (v["type"] == "job.stopped").then(|| {
                (
                    v["data"]["account_id"].as_str().unwrap_or_default().to_owned(),
                    v["subject"].as_str().unwrap_or_default().to_owned(),
                    v,
                )
            })
        })
        .find(|(a, j, _)| half.charges.keys().any(|id| id.starts_with(&format!("{a}/{j}/"))))
        .expect("a charged job on partition 0");
    let key = keys::job(&(AccountId::from(account.as_str()), JobId::from(job.as_str())));
    {
        let store = jobmeter_store::Store::open(&state).expect("open the meter's store");
        assert!(
            store.get(0, Table::Jobs, &key).expect("read").is_some(),
            "the job is stored"
        );
        assert!(
            store.index_complete(0).expect("marker"),
            "finished jobs live in the store"
        );
        store
            .commit(
                0,
                &[StateChange {
                    table: Table::Jobs,
                    key: key.clone(),
                    value: Some(b"{\"start\": this is not JSON".to_vec()),
                }],
                None,
            )
            .expect("write");
    }

    // The restart does not read the finished job; a heartbeat for it does.
    let mut meter = spec.start();
    wait_until("ready", Duration::from_secs(60), &[&meter], || {
        http_get(&meter.http, "/readyz").is_some_and(|b| b.starts_with("ready"))
    });
    let mut hb = stop.clone();
    hb["type"] = "job.heartbeat".into();
    hb["id"] = "late-heartbeat-of-a-finished-job".into();
    let p = producer();
    send(
        &p,
        &format!("{prefix}.job-events"),
        &account,
        Some(hb.to_string().as_bytes()),
        Some(0),
    );
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(10)).unwrap();
    produce_events(&prefix, &w, n / 2..n, 20_000);
    let all = expected(&w, n);
    let by_partition = |charges: &std::collections::BTreeMap<String, String>, p: i32| {
        charges_by_partition(charges, 2).get(&p).copied().unwrap_or(0)
    };
    wait_until("partition 1's charges", Duration::from_secs(120), &[&meter], || {
        by_partition(&read_outputs(&prefix).charges, 1) == by_partition(&all.charges, 1)
    });
    wait_until("partition 0 set aside", Duration::from_secs(60), &[&meter], || {
        http_call(&meter.http, "/readyz", None).0 == 503
    });
    let (_, body) = http_call(&meter.http, "/readyz", None);
    assert!(
        body.contains("partition 0:") && body.contains("found while metering"),
        "{body}"
    );
    assert!(!body.contains("partition 1:"), "{body}");
    let got = read_outputs(&prefix);
    assert!(
        by_partition(&got.charges, 0) < by_partition(&all.charges, 0),
        "partition 0 stopped before its second half"
    );
    assert!(meter.log_tail().contains("partition stopped"), "{}", meter.log_tail());
    assert_eq!(meter.terminate(), Some(0));

    // Recovery as for any undecodable state: rebuild, start again; every
    // charge is there exactly once.
    let out = spec.command("rebuild", 0).output().expect("jobmeter rebuild");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    restart_and_expect_everything(&spec, &prefix, &all);
}
