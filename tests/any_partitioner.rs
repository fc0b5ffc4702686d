//! Any partitioner: one workload sent at once by three kinds of clients —
//! Kafka's murmur2, librdkafka's default `consistent_random` and keyless —
//! so most accounts' events (even one job's start and stop) arrive on
//! several partitions. Every account is metered by the one partition its id
//! belongs to: across a month close and SIGKILLs the committed outputs
//! equal the offline computation with one meter per owning partition (one
//! statement and one fee per pro account-month, each threshold once), and
//! `jobmeter rebuild` reproduces them from the logs.

use crate::support;

use jobmeter_offline::simulate::FleetOptions;
use std::time::Duration;
use support::*;

/// Input records that arrived on a partition other than their account's.
fn misrouted(prefix: &str, partitions: i32) -> usize {
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let parts: Vec<(i32, Option<i64>)> = (0..partitions).map(|p| (p, None)).collect();
    let mut n = 0;
    jobmeter_kafka::reader::read_to_end(
        &settings,
        "it-misrouted",
        &format!("{prefix}.job-events"),
        &parts,
        Duration::from_secs(60),
        |r| {
            if let Ok(ev) = jobmeter_core::parse_job_event(r.value.as_deref().unwrap_or_default()) {
                n += usize::from(partition_of(ev.account.as_str(), partitions) != r.partition);
            }
        },
    )
    .expect("read the input topic");
    n
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn mixed_partitioners_bill_each_account_once() {
    let prefix = fresh_prefix("anypart");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "anypart-0", dir.path().join("state"), 3);
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    let opts = month_close_fleet(33, 300);
    let w = workload(&opts, 3);
    produce_accounts(&prefix, &w);
    let want = expected(&w, w.events.len());
    let total = w.events.len();
    let producer = {
        let prefix = prefix.to_string();
        let opts = opts.clone();
        std::thread::spawn(move || {
            let w = workload(&opts, 3);
            produce_mixed(
                &prefix,
                &w,
                0..total,
                &[Placement::Murmur2, Placement::ConsistentRandom, Placement::Keyless],
                30,
                3_000,
            );
        })
    };
    let mut rng = jobmeter_offline::simulate::Rng::new(5);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(400 + rng.below(1200)));
        meter.kill9();
        eprintln!("kill {round}: SIGKILL sent");
        meter = spec.start();
    }
    producer.join().expect("producer thread");
    wait_until("all charges", Duration::from_secs(240), &[&meter], || {
        read_all(&format!("{prefix}.charges")).len() >= want.charges.len()
    });
    std::thread::sleep(Duration::from_secs(2));
    // read_outputs fails on any charge, limit event or statement seen twice.
    let got = read_outputs(&prefix);
    assert_eq!(meter.terminate(), Some(0), "clean exit after SIGTERM");
    assert_same(&got, &want);
    let pro_fees = got
        .statements
        .values()
        .filter(|s| s.contains(r#""subscription_fee":"29.00""#) || s.contains(r#""subscription_fee":"49.00""#))
        .count();
    assert!(pro_fees > 10, "the workload bills pro fees ({pro_fees})");
    assert!(
        want.limits.len() > 5,
        "the workload fires limit events ({})",
        want.limits.len()
    );
    // Many events did arrive on a partition other than their account's.
    let misrouted = misrouted(&prefix, 3);
    assert!(
        misrouted > total / 3,
        "{misrouted} of {total} events arrived on another partition than their account's"
    );
    // The rebuild replays each partition's two inputs in the order the
    // meter applied them and finds the same state and outputs.
    assert_rebuild_matches(&spec, true);
}

/// Two instances share the partitions, so events of an account held by the
/// other instance go through the repartition topic. Produced at a pace where
/// event time moves about 1,200 times faster than the clock (one commit's
/// delay is then a few minutes of event time, inside the orphan timeout),
/// the outputs equal the offline computation, nothing is doubled, and the
/// rebuild replays the forwarded events where the meters applied them.
#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn forwarding_between_instances_is_exactly_once() {
    let prefix = fresh_prefix("forward");
    let dir = tempfile::tempdir().expect("tempdir");
    let a = MeterSpec::new(&prefix, "fw-a", dir.path().join("a"), 4);
    let b = MeterSpec::new(&prefix, "fw-b", dir.path().join("b"), 4);
    let ma = a.start();
    wait_for_topics(&prefix);
    let mb = b.start();
    wait_until(
        "both instances hold partitions",
        Duration::from_secs(90),
        &[&ma, &mb],
        || {
            [&ma, &mb].iter().all(|m| {
                m.metric("jobmeter_assigned_partitions").unwrap_or(0.0) > 0.0
                    && http_get(&m.http, "/readyz").is_some_and(|r| r.contains("ready"))
            })
        },
    );
    let opts = FleetOptions {
        seed: 8,
        jobs: 800,
        accounts: 120,
        mean_gap_ms: 2_000,
        ..FleetOptions::default()
    };
    let w = workload(&opts, 4);
    produce_accounts(&prefix, &w);
    let want = expected(&w, w.events.len());
    produce_mixed(
        &prefix,
        &w,
        0..w.events.len(),
        &[Placement::Murmur2, Placement::ConsistentRandom, Placement::Keyless],
        10,
        600,
    );
    wait_until("all charges", Duration::from_secs(180), &[&ma, &mb], || {
        read_all(&format!("{prefix}.charges")).len() >= want.charges.len()
    });
    std::thread::sleep(Duration::from_secs(2));
    let got = read_outputs(&prefix);
    let forwarded: f64 = [&ma, &mb]
        .iter()
        .map(|m| m.metric("jobmeter_events_rerouted_total").unwrap_or(0.0))
        .sum();
    let (mut ma, mut mb) = (ma, mb);
    assert_eq!(mb.terminate(), Some(0));
    assert_eq!(ma.terminate(), Some(0));
    assert_same(&got, &want);
    assert!(forwarded > 0.0, "events were rerouted");
    let in_repartition = read_all(&format!("{prefix}.repartition"))
        .iter()
        .filter(|v| v.starts_with('{'))
        .count();
    assert!(
        in_repartition > 100,
        "{in_repartition} events crossed instances through the repartition topic"
    );
    assert_rebuild_matches(&a, true);
}
