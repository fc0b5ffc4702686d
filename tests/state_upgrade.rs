//! A rolling upgrade of the state format against the real broker: a meter
//! writing format version 0 (JSON, what releases before the binary format
//! wrote: `state.format = "json"`) is killed and started again writing
//! version 1, first on its local RocksDB (JSON values) and then on an
//! empty state directory (restored from a changelog holding both
//! versions). The committed outputs equal the offline computation, and a
//! rebuild from the input topics matches the mixed changelog.

use crate::support;

use jobmeter_offline::simulate::FleetOptions;
use std::time::Duration;
use support::*;

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn json_state_upgrades_to_binary_across_restarts() {
    let prefix = fresh_prefix("upgrade");
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = FleetOptions {
        seed: 31,
        jobs: 1_500,
        accounts: 50,
        mean_gap_ms: 2_000,
        ..FleetOptions::default()
    };
    let mut old = MeterSpec::new(&prefix, "upgrade-0", dir.path().join("state"), 3);
    old.extra = vec!["--set".into(), "state.format=json".into()];
    let mut meter = old.start();
    wait_for_topics(&prefix);
    let w = workload(&fleet, 3);
    produce_accounts(&prefix, &w);
    let n = w.events.len();
    let thirds = [0, n / 3, 2 * n / 3, n];
    let charged = |upto: usize| expected(&w, upto).charges.len();
    let step = |meter: &support::MeterProc, i: usize| {
        produce_events(&prefix, &w, thirds[i]..thirds[i + 1], 0);
        let want = charged(thirds[i + 1]);
        wait_until("the step charged", Duration::from_secs(120), &[meter], || {
            read_all(&format!("{prefix}.charges")).len() >= want
        });
    };
    step(&meter, 0);
    meter.kill9();
    // The new format, on the local state the old one wrote.
    let new = MeterSpec::new(&prefix, "upgrade-0", dir.path().join("state"), 3);
    let mut meter = new.start();
    step(&meter, 1);
    meter.kill9();
    // The new format on an empty directory: everything comes back from a
    // changelog holding both versions.
    let fresh = MeterSpec::new(&prefix, "upgrade-0", dir.path().join("fresh"), 3);
    let mut meter = fresh.start();
    wait_until("restored", Duration::from_secs(60), &[&meter], || {
        meter.metric("jobmeter_restored_records_total").unwrap_or(0.0) > 0.0
            && meter.metric("jobmeter_ready") == Some(1.0)
    });
    step(&meter, 2);
    std::thread::sleep(Duration::from_secs(2));
    // The changelog holds jobs written in both versions.
    let mut versions = std::collections::BTreeMap::new();
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    jobmeter_kafka::reader::read_to_end(
        &settings,
        &format!("{prefix}-versions"),
        &format!("{prefix}.changelog"),
        &[(0, None), (1, None), (2, None)],
        Duration::from_secs(60),
        |r| {
            let table = r
                .key
                .as_deref()
                .and_then(jobmeter_kafka::changelog::split)
                .map(|(t, _)| t);
            if let (Some(jobmeter_core::state::Table::Jobs), Some(v)) = (table, r.value.as_deref()) {
                *versions.entry(jobmeter_core::values::version(v)).or_insert(0u64) += 1;
            }
        },
    )
    .expect("read the changelog");
    assert!(
        versions.get(&0).is_some_and(|n| *n > 100) && versions.get(&1).is_some_and(|n| *n > 100),
        "{versions:?}"
    );
    let got = read_outputs(&prefix);
    assert_eq!(meter.terminate(), Some(0));
    assert_same(&got, &expected(&w, n));
    assert!(expected(&w, n).limits.len() > 2, "the workload fires limit events");
    assert_rebuild_matches(&fresh, true);
}
