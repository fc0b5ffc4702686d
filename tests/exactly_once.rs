//! Exactly-once end to end against the real local broker: the committed
//! outputs (read with read_committed) equal the outputs computed offline
//! by the same core, one meter per partition — nothing missing, nothing
//! doubled — across kills, rebalances and poison messages.

use crate::support;

use jobmeter_offline::simulate::FleetOptions;
use std::time::Duration;
use support::*;

fn fleet(jobs: usize, seed: u64) -> FleetOptions {
    FleetOptions {
        seed,
        jobs,
        accounts: 60,
        // Short gaps so that a few thousand jobs span hours of event time,
        // with orphans, limit events and duplicates all exercised.
        mean_gap_ms: 2_000,
        ..FleetOptions::default()
    }
}

fn charges_reach(prefix: &str, n: usize) -> impl FnMut() -> bool + '_ {
    move || read_all(&format!("{prefix}.charges")).len() >= n
}

/// Produces `opts`' fleet (accounts first) while the meter runs, kills it
/// with SIGKILL `kills` times at moments spread over the run (`min_ms` plus
/// up to `spread_ms`, pseudo-random from `seed` but reproducible),
/// restarting it each time, then waits for every charge, stops it with
/// SIGTERM (it must exit cleanly) and returns what was committed and what
/// the offline computation gives.
fn kill_while_producing(
    spec: &MeterSpec,
    mut meter: MeterProc,
    opts: &FleetOptions,
    kills: usize,
    (min_ms, spread_ms): (u64, u64),
    seed: u64,
) -> (Outputs, Outputs) {
    let w = workload(opts, spec.partitions);
    produce_accounts(&spec.prefix, &w);
    let want = expected(&w, w.events.len());
    let total = w.events.len();
    let producer = {
        let (prefix, opts, parts) = (spec.prefix.clone(), opts.clone(), spec.partitions);
        std::thread::spawn(move || {
            let w = workload(&opts, parts);
            produce_events(&prefix, &w, 0..total, 8_000);
        })
    };
    let mut rng = jobmeter_offline::simulate::Rng::new(seed);
    for round in 0..kills {
        std::thread::sleep(Duration::from_millis(min_ms + rng.below(spread_ms)));
        meter.kill9();
        eprintln!("kill {round}: SIGKILL sent");
        meter = spec.start();
    }
    producer.join().expect("producer thread");
    wait_until(
        "all charges",
        Duration::from_secs(240),
        &[&meter],
        charges_reach(&spec.prefix, want.charges.len()),
    );
    // Let any last batch land, then compare everything.
    std::thread::sleep(Duration::from_secs(2));
    let got = read_outputs(&spec.prefix);
    assert_eq!(meter.terminate(), Some(0), "clean exit after SIGTERM");
    (got, want)
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn survives_kill_at_any_point() {
    let prefix = fresh_prefix("kill");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "kill-0", dir.path().join("state"), 3);
    let meter = spec.start();
    wait_for_topics(&prefix);
    let (got, want) = kill_while_producing(&spec, meter, &fleet(3_000, 7), 6, (300, 1200), 99);
    assert_same(&got, &want);
    assert!(
        want.limits.len() > 5,
        "the workload fires limit events ({})",
        want.limits.len()
    );
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn handles_rebalance() {
    let prefix = fresh_prefix("rebalance");
    let dir = tempfile::tempdir().expect("tempdir");
    let a = MeterSpec::new(&prefix, "rb-a", dir.path().join("a"), 4);
    let b = MeterSpec::new(&prefix, "rb-b", dir.path().join("b"), 4);
    let mut ma = a.start();
    wait_for_topics(&prefix);
    let w = workload(&fleet(3_000, 11), 4);
    produce_accounts(&prefix, &w);
    let want = expected(&w, w.events.len());
    let n = w.events.len();
    produce_events(&prefix, &w, 0..n / 3, 10_000);
    // A second instance joins mid-run: partitions move to it with their state.
    let mut mb = b.start();
    produce_events(&prefix, &w, n / 3..2 * n / 3, 10_000);
    wait_until(
        "instance b to own partitions",
        Duration::from_secs(60),
        &[&ma, &mb],
        || mb.metric("jobmeter_assigned_partitions").unwrap_or(0.0) > 0.0,
    );
    // …and leaves: its partitions move back.
    assert_eq!(mb.terminate(), Some(0));
    produce_events(&prefix, &w, 2 * n / 3..n, 10_000);
    wait_until(
        "all charges",
        Duration::from_secs(240),
        &[&ma],
        charges_reach(&prefix, want.charges.len()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = read_outputs(&prefix);
    assert_eq!(ma.terminate(), Some(0));
    assert_same(&got, &want);
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn advances_offset_past_poison_messages() {
    let prefix = fresh_prefix("poison");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "poison-0", dir.path().join("state"), 1);
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    let topic = format!("{prefix}.job-events");
    let p = producer();
    let good_start = r#"{"specversion":"1.0","id":"1","source":"w","type":"job.started","time":"2024-05-01T00:00:00Z","subject":"j1","data":{"account_id":"a","kind":"inference","model":"sdxl-1.0"}}"#;
    let good_stop = r#"{"specversion":"1.0","id":"2","source":"w","type":"job.stopped","time":"2024-05-01T00:00:10Z","subject":"j1","data":{"account_id":"a","status":"succeeded"}}"#;
    send(&p, &topic, "a", Some(b"\xff\xfe not json at all"), Some(0));
    send(&p, &topic, "a", None, Some(0));
    send(&p, &topic, "a", Some(good_start.as_bytes()), Some(0));
    send(
        &p,
        &topic,
        "a",
        Some(
            good_start
                .replace("job.started", "job.exploded")
                .replace("\"id\":\"1\"", "\"id\":\"3\"")
                .as_bytes(),
        ),
        Some(0),
    );
    send(&p, &topic, "a", Some(good_stop.as_bytes()), Some(0));
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(10)).expect("flush");
    wait_until(
        "the charge after the poison",
        Duration::from_secs(60),
        &[&meter],
        charges_reach(&prefix, 1),
    );
    wait_until("three dead letters", Duration::from_secs(30), &[&meter], || {
        read_all(&format!("{prefix}.dlq")).len() == 3
    });
    // The dead letters keep the original bytes and carry reason and origin.
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let consumer: rdkafka::consumer::BaseConsumer = settings.reader("it-dlq").create().expect("reader");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for part in 0..2 {
        tpl.add_partition_offset(&format!("{prefix}.dlq"), part, rdkafka::Offset::Beginning)
            .expect("tpl");
    }
    rdkafka::consumer::Consumer::assign(&consumer, &tpl).expect("assign");
    let mut reasons = Vec::new();
    let mut raw = Vec::new();
    let started = std::time::Instant::now();
    while reasons.len() < 3 && started.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            use rdkafka::message::{Headers, Message};
            let h = m.headers().expect("headers");
            let get = |k: &str| {
                h.iter()
                    .find(|x| x.key == k)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            reasons.push(get("jobmeter.reason").unwrap_or_default());
            assert_eq!(get("jobmeter.source.topic").as_deref(), Some(topic.as_str()));
            assert!(get("jobmeter.source.offset").is_some());
            raw.push(m.payload().map(<[u8]>::to_vec));
        }
    }
    reasons.sort();
    assert_eq!(reasons, vec!["not_json", "not_json", "unknown_type"]);
    assert!(
        raw.contains(&Some(b"\xff\xfe not json at all".to_vec())),
        "original bytes kept"
    );
    assert_eq!(meter.terminate(), Some(0));
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn shutdown_commits_in_flight_work() {
    let prefix = fresh_prefix("shutdown");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = MeterSpec::new(&prefix, "sd-0", dir.path().join("state"), 2);
    // Nothing would be committed for 10 minutes but for the shutdown.
    spec.extra = vec![
        "--set".into(),
        "batch.interval=10m".into(),
        "--set".into(),
        "batch.max_events=10000000".into(),
    ];
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    let w = workload(&fleet(300, 3), 2);
    produce_accounts(&prefix, &w);
    produce_events(&prefix, &w, 0..w.events.len(), 0);
    let want = expected(&w, w.events.len());
    wait_until("all events consumed", Duration::from_secs(60), &[&meter], || {
        all_consumed(&meter, w.events.len())
    });
    assert!(
        read_all(&format!("{prefix}.charges")).is_empty(),
        "nothing is visible before the commit"
    );
    assert_eq!(meter.terminate(), Some(0), "SIGTERM exits 0 after committing");
    let got = read_outputs(&prefix);
    assert_same(&got, &want);
}

/// True once the meter has read and applied `n` input records, committed
/// or not (`jobmeter_events_total` moves only at commit).
fn all_consumed(m: &MeterProc, n: usize) -> bool {
    m.metric("jobmeter_records_consumed_total")
        .is_some_and(|c| c >= n as f64)
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn rebuild_from_input_topics_matches_state_and_outputs() {
    let prefix = fresh_prefix("rebuild");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "rebuild-0", dir.path().join("state"), 2);
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    let w = workload(&fleet(1_000, 21), 2);
    produce_accounts(&prefix, &w);
    let n = w.events.len();
    produce_events(&prefix, &w, 0..n / 2, 0);
    let half = expected(&w, n / 2);
    wait_until(
        "first half charged",
        Duration::from_secs(120),
        &[&meter],
        charges_reach(&prefix, half.charges.len()),
    );
    wait_until("first half consumed", Duration::from_secs(60), &[&meter], || {
        all_consumed(&meter, n / 2)
    });
    assert_eq!(meter.terminate(), Some(0));
    // State and outputs rebuilt from the input topics equal what the meter
    // stored in its changelog and published.
    assert_rebuild_matches(&spec, false);
    // The meter goes on from the rebuilt local state, exactly.
    let mut meter = spec.start();
    produce_events(&prefix, &w, n / 2..n, 0);
    let want = expected(&w, n);
    wait_until(
        "all charges",
        Duration::from_secs(120),
        &[&meter],
        charges_reach(&prefix, want.charges.len()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = read_outputs(&prefix);
    assert_eq!(meter.terminate(), Some(0));
    assert_same(&got, &want);
}

/// A run across a month boundary: May closes, and every pro account keyed
/// to a partition gets May's statement exactly once — with its usage lines,
/// or with the fee alone if it used nothing.
#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn month_close_bills_every_pro_account_once() {
    let prefix = fresh_prefix("month");
    let dir = tempfile::tempdir().expect("tempdir");
    let meter = MeterSpec::new(&prefix, "month-0", dir.path().join("state"), 3).start();
    wait_for_topics(&prefix);
    let opts = month_close_fleet(21, 400);
    let w = workload(&opts, 3);
    produce_accounts(&prefix, &w);
    produce_events(&prefix, &w, 0..w.events.len(), 0);
    let want = expected(&w, w.events.len());
    let idle: Vec<&String> = want
        .statements
        .values()
        .filter(|s| s.contains(r#""lines":[]"#))
        .collect();
    assert!(!idle.is_empty(), "the workload has pro accounts without May usage");
    wait_until("all events consumed", Duration::from_secs(120), &[&meter], || {
        all_consumed(&meter, w.events.len())
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = read_outputs(&prefix);
    assert_same(&got, &want);
    for s in idle {
        assert!(
            s.contains(r#""subscription_fee":"29.00""#) || s.contains(r#""subscription_fee":"49.00""#),
            "{s}"
        );
    }
}

/// An instance running three pipelines (three group members, three
/// transactional producers, one store) meters exactly once through kills,
/// and the group shows its partitions spread over the three.
#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn parallel_pipelines_survive_kills() {
    let prefix = fresh_prefix("threads");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = MeterSpec::new(&prefix, "threads-0", dir.path().join("state"), 5);
    spec.extra = vec!["--set".into(), "pipeline.threads=3".into()];
    let meter = spec.start();
    wait_for_topics(&prefix);
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let group = format!("{prefix}-group");
    let topic = format!("{prefix}.job-events");
    wait_until(
        "three pipelines own the five partitions",
        Duration::from_secs(90),
        &[&meter],
        || {
            let m =
                jobmeter_kafka::group::members(&settings, &group, &topic, Duration::from_secs(5)).unwrap_or_default();
            let mut ids: Vec<&str> = m
                .iter()
                .filter(|m| !m.partitions.is_empty())
                .map(|m| m.instance_id.as_str())
                .collect();
            ids.sort_unstable();
            ids == ["threads-0", "threads-0-p1", "threads-0-p2"]
                && m.iter().map(|m| m.partitions.len()).sum::<usize>() == 5
                && meter.metric("jobmeter_ready") == Some(1.0)
                && meter.metric("jobmeter_assigned_partitions") == Some(5.0)
        },
    );
    let (got, want) = kill_while_producing(&spec, meter, &fleet(3_000, 17), 4, (500, 1500), 5);
    assert_same(&got, &want);
    assert_rebuild_matches(&spec, true);
}
