//! A cadence schedule that would re-cut periods a partition has open is
//! refused at restore, naming the account and period, and the partition
//! stops alone (as one whose state cannot be read); put back, the meter
//! goes on as if nothing had happened.

use crate::support;

use jobmeter_offline::simulate::FleetOptions;
use std::time::Duration;
use support::*;

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn a_schedule_that_would_recut_open_periods_is_refused_at_restore() {
    let prefix = fresh_prefix("cycleup");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "cycleup-0", dir.path().join("state"), 2);
    // Late April: pay-as-you-go accounts have the second half month open.
    let w = workload(
        &FleetOptions {
            seed: 21,
            jobs: 400,
            accounts: 30,
            mean_gap_ms: 2_000,
            start: jobmeter_core::Timestamp::parse("2024-04-20T00:00:00Z").expect("time"),
            ..FleetOptions::default()
        },
        2,
    );
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    produce_accounts(&prefix, &w);
    produce_events(&prefix, &w, 0..w.events.len(), 0);
    let want = expected(&w, w.events.len());
    wait_until("every charge", Duration::from_secs(120), &[&meter], || {
        read_all(&format!("{prefix}.charges")).len() >= want.charges.len()
    });
    assert_eq!(meter.terminate(), Some(0));

    // The same meter, restarted with every plan monthly from the first
    // instant: the open half months would become April.
    let plans = std::fs::read_to_string(root().join("config/plans.toml")).expect("plans");
    let cut = plans.find("[[billing_cycle]]").expect("the shipped schedule");
    let monthly = dir.path().join("monthly-plans.toml");
    std::fs::write(
        &monthly,
        format!(
            "{}[[billing_cycle]]\neffective_from = \"0001-01-01T00:00:00Z\"\n",
            &plans[..cut]
        ),
    )
    .expect("write plans");
    let mut refused = spec.clone();
    refused
        .extra
        .extend(["--set".to_owned(), format!("billing.plans={}", monthly.display())]);
    let mut meter = refused.start();
    wait_until("a partition refused", Duration::from_secs(60), &[&meter], || {
        meter
            .log_tail()
            .contains("partition stopped: the configured billing_cycle")
    });
    let (status, body) = http_call(&meter.http, "/readyz", None);
    assert_eq!(status, 503, "{body}");
    // Every partition recorded the schedule it billed by: the change,
    // dated at the first instant, is before their stream times.
    assert!(
        body.contains("billing_cycle refused: billing_cycle changes at 0001-01-01T00:00:00.000Z, before this partition's stream time 2024-04-20"),
        "{body}"
    );
    let log = meter.log_tail();
    assert!(
        log.contains("open billing period 2024-04-16/2024-05-01 would become 2024-04"),
        "{log}"
    );
    let metrics = http_get(&meter.http, "/metrics").unwrap_or_default();
    assert!(
        metrics.contains("jobmeter_partition_failed{partition=\"0\"} 1")
            || metrics.contains("jobmeter_partition_failed{partition=\"1\"} 1"),
        "{metrics}"
    );
    assert_eq!(meter.terminate(), Some(0));

    // The schedule put back: both partitions restore and nothing changed.
    let meter = spec.start();
    wait_until("ready again", Duration::from_secs(60), &[&meter], || {
        http_get(&meter.http, "/metrics").is_some() && http_call(&meter.http, "/readyz", None).0 == 200
    });
    let got = read_outputs(&prefix);
    assert_same(&got, &want);
}
