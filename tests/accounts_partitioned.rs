//! The accounts table is co-partitioned with the events: an instance loads
//! only the account records of the partitions it owns, a restart reads
//! none of them again, and the intro fee still goes to the first pro
//! subscribers of the whole platform, whichever partitions they are in.

use crate::support;

use jobmeter_core::{AccountBook, AccountRecord, PlanCatalog};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

/// Plans with only `intro` intro-fee subscribers, written next to the state.
fn plans_with_intro(dir: &std::path::Path, intro: usize) -> (std::path::PathBuf, PlanCatalog) {
    let text = std::fs::read_to_string(root().join("config/plans.toml"))
        .expect("plans")
        .replace("intro_subscribers = 1000", &format!("intro_subscribers = {intro}"));
    let path = dir.join("plans.toml");
    std::fs::write(&path, &text).expect("write plans");
    (path, PlanCatalog::from_toml(&text).expect("plans parse"))
}

/// The outputs of the workload metered offline with `plans`.
fn expected_with_plans(w: &Workload, plans: &PlanCatalog) -> Outputs {
    let (rates, _, _) = billing(w);
    let mut book = AccountBook::new(plans);
    for (_, r) in &w.accounts {
        book.insert(AccountRecord::parse(r.as_bytes()).expect("record"));
    }
    expected_with(w, w.events.len(), &rates, plans, &book)
}

/// Account records per partition of the workload.
fn records_per_partition(w: &Workload) -> BTreeMap<i32, usize> {
    let mut n = BTreeMap::new();
    for (k, _) in &w.accounts {
        *n.entry(partition_of(k, w.partitions)).or_insert(0) += 1;
    }
    n
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn each_instance_loads_its_own_partitions_accounts_and_the_intro_fee_is_platform_wide() {
    let prefix = fresh_prefix("acctpart");
    let dir = tempfile::tempdir().expect("tempdir");
    let partitions = 4;
    let (plans_path, plans) = plans_with_intro(dir.path(), 3);
    let opts = month_close_fleet(33, 60);
    let w = workload(&opts, partitions);
    let pro = w.accounts.iter().filter(|(_, r)| r.contains(r#""plan":"pro""#)).count();
    assert!(pro > 3, "the workload has more pro accounts ({pro}) than intro places");
    let per_partition = records_per_partition(&w);
    assert!(per_partition.len() > 1, "accounts spread over partitions");

    // The table exists before any instance: it is loaded, not tailed.
    let mut first = MeterSpec::new(&prefix, "acct-a", dir.path().join("a"), partitions);
    first.extra = vec!["--set".into(), format!("billing.plans={}", plans_path.display())];
    let a = first.start();
    wait_for_topics(&prefix);
    let mut a = a;
    let _ = a.terminate();
    produce_accounts(&prefix, &w);

    // One instance alone owns every partition: it stores every record once.
    let a = first.start();
    wait_until("instance a ready", Duration::from_secs(120), &[&a], || {
        http_get(&a.http, "/readyz").is_some_and(|b| b.contains("ready"))
            && a.metric("jobmeter_account_records_total").is_some()
    });
    wait_until("a stored every account record", Duration::from_secs(60), &[&a], || {
        applied(&a) >= w.accounts.len() as f64
    });

    // A second instance joins: it loads the records of the partitions it
    // is given, not the whole table.
    let mut second = MeterSpec::new(&prefix, "acct-b", dir.path().join("b"), partitions);
    second.extra = first.extra.clone();
    let b = second.start();
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let group = format!("{prefix}-group");
    let topic = format!("{prefix}.job-events");
    // The group may hand b its partitions in more than one step: wait
    // until what b stored is exactly its partitions' share.
    let (mut b_parts, mut b_expected): (Vec<i32>, usize) = (Vec::new(), 0);
    wait_until(
        "b owns partitions and stored exactly their records",
        Duration::from_secs(120),
        &[&a, &b],
        || {
            let m =
                jobmeter_kafka::group::members(&settings, &group, &topic, Duration::from_secs(5)).unwrap_or_default();
            b_parts = m
                .iter()
                .filter(|m| m.instance_id.starts_with("acct-b"))
                .flat_map(|m| m.partitions.clone())
                .collect();
            let a_has = m
                .iter()
                .any(|m| m.instance_id.starts_with("acct-a") && !m.partitions.is_empty());
            b_expected = b_parts.iter().map(|p| per_partition.get(p).copied().unwrap_or(0)).sum();
            a_has
                && !b_parts.is_empty()
                && http_get(&b.http, "/readyz").is_some_and(|x| x.contains("ready"))
                && applied(&b) as usize == b_expected
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        applied(&b) as usize,
        b_expected,
        "instance b (partitions {b_parts:?}) stored only its partitions' records, not the {} of the table",
        w.accounts.len()
    );
    assert!(b_expected < w.accounts.len());

    // Usage metered by both: the intro fee goes to the 3 first pro
    // subscribers of the platform, in whichever partition they are.
    produce_events(&prefix, &w, 0..w.events.len(), 0);
    let want = expected_with_plans(&w, &plans);
    let intro = want
        .statements
        .values()
        .filter(|s| s.contains(r#""subscription_fee":"29.00""#))
        .count();
    assert_eq!(intro, 3, "three intro fees in the expected statements");
    wait_until("all events consumed", Duration::from_secs(180), &[&a, &b], || {
        let done = a.metric("jobmeter_records_consumed_total").unwrap_or(0.0)
            + b.metric("jobmeter_records_consumed_total").unwrap_or(0.0);
        done >= w.events.len() as f64
    });
    wait_until("every statement published", Duration::from_secs(60), &[&a, &b], || {
        read_outputs(&prefix).statements.len() >= want.statements.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = read_outputs(&prefix);
    assert_same(&got, &want);

    // A restart reads no account record again: they are in its store.
    let mut b = b;
    let _ = b.terminate();
    let b = second.start();
    wait_until("b ready again", Duration::from_secs(120), &[&b], || {
        http_get(&b.http, "/readyz").is_some_and(|x| x.contains("ready"))
            && b.metric("jobmeter_account_records_total").is_some()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(applied(&b), 0.0, "a restart stores no account record again");
    let mut a = a;
    let mut b = b;
    let _ = a.terminate();
    let _ = b.terminate();
}

fn applied(m: &MeterProc) -> f64 {
    let text = http_get(&m.http, "/metrics").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(r#"jobmeter_account_records_total{outcome="applied"}"#))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}
