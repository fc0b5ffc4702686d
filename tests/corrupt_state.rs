//! A stored record that cannot be decoded stops only its own partition:
//! the other partition goes on metering, `/readyz` and a metric name the
//! failing one, its offsets do not move (nothing is lost), and after
//! `jobmeter rebuild` the meter meters everything exactly once.

use crate::support;

use jobmeter_core::state::{keys, Table};
use jobmeter_core::{AccountId, JobId};
use jobmeter_kafka::changelog;
use std::time::Duration;
use support::*;

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn a_partition_whose_state_cannot_be_read_stops_alone() {
    let prefix = fresh_prefix("corrupt");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "corrupt-0", dir.path().join("state"), 2);
    let (w, n, half) = meter_first_half(&prefix, &spec, 5, 1_200);

    // A record no decoder accepts, written into partition 0's changelog
    // after what the local store holds: the next restore reads it.
    let p = producer();
    let key = changelog::key(
        Table::Jobs,
        &keys::job(&(AccountId::from("acct-x"), JobId::from("job-x"))),
    );
    send_at(
        &p,
        &format!("{prefix}.changelog"),
        Some(&key),
        Some(b"{\"start\": this is not JSON"),
        Some(0),
        None,
    );
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(10)).unwrap();

    let mut meter = spec.start();
    produce_events(&prefix, &w, n / 2..n, 20_000);
    let all = expected(&w, n);
    let want = charges_by_partition(&all.charges, 2);
    // Partition 1 meters everything; partition 0 nothing more.
    wait_until("partition 1's charges", Duration::from_secs(120), &[&meter], || {
        let got = read_outputs(&prefix);
        charges_by_partition(&got.charges, 2).get(&1) == want.get(&1)
    });
    let (status, body) = http_call(&meter.http, "/readyz", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("partition 0:") && body.contains("jobs"), "{body}");
    assert!(!body.contains("partition 1:"), "{body}");
    let metrics = http_get(&meter.http, "/metrics").unwrap_or_default();
    assert!(
        metrics.contains("jobmeter_partition_failed{partition=\"0\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("partition_failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let got = read_outputs(&prefix);
    let first = charges_by_partition(&half.charges, 2);
    assert_eq!(
        charges_by_partition(&got.charges, 2).get(&0),
        first.get(&0),
        "partition 0 stopped"
    );
    assert!(meter.log_tail().contains("partition stopped"), "{}", meter.log_tail());
    assert_eq!(meter.terminate(), Some(0));

    // Recovery as the README says: rebuild (it reports the bad record as a
    // difference), then start again; every charge is there exactly once.
    let out = spec.command("rebuild", 0).output().expect("jobmeter rebuild");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("partition 0:"), "{text}");
    // A difference is a finding, not an error: exit status 1 (2 is an
    // error), after the report.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("rebuild differs"), "{text}");
    restart_and_expect_everything(&spec, &prefix, &all);
}
