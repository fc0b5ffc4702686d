//! The poison suite against the real broker: hostile records interleaved
//! with a normal workload that crosses a month's close. The meter keeps
//! metering the valid events, every poison record lands in the dead-letter
//! topic with its reason, a SIGKILL right after the poison and a restart
//! change nothing, and every committed output equals the offline
//! computation over the same records (record timestamps included).

use crate::support;

use jobmeter_core::{Context, Meter, MeterConfig, Origin, Output};
use jobmeter_offline::simulate::FleetOptions;
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

/// One record as produced: key (or none), partition, value (or none: a
/// tombstone), record timestamp, and the poison case it stands for.
struct Rec {
    key: Option<String>,
    partition: i32,
    value: Option<Vec<u8>>,
    ts: i64,
    case: Option<(&'static str, &'static str)>,
}

fn event(id: &str, ty: &str, time: &str, subject: &str, account: &str, extra: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"poison-worker","type":"{ty}","time":"{time}","subject":"{subject}","data":{{"account_id":"{account}","kind":"inference","model":"sdxl-1.0","status":"succeeded"{extra}}}}}"#
    )
}

fn ms(t: &str) -> i64 {
    jobmeter_core::Timestamp::parse(t).map(|t| t.0).unwrap_or_default()
}

fn iso(ms: i64) -> String {
    jobmeter_core::Timestamp(ms).to_string()
}

/// The hostile cases: (name, expected reason, key, value, record time,
/// given the record time `at` of the valid event they follow).
type Case = (&'static str, &'static str, Option<String>, Option<Vec<u8>>, i64);

fn poison_cases(at: i64) -> Vec<Case> {
    let acct = "acct-poison".to_owned();
    let now = iso(at);
    let long_ascii = "i".repeat(70_000);
    let long_multi = "界".repeat(23_334); // 70,002 bytes
    let mut v: Vec<Case> = vec![
        (
            "clock at year 9999",
            "time_out_of_range",
            Some(acct.clone()),
            Some(
                event(
                    "p-9999",
                    "job.started",
                    "9999-12-31T23:59:59.999Z",
                    "pj-9999",
                    &acct,
                    "",
                )
                .into_bytes(),
            ),
            at,
        ),
        (
            "2 hours ahead of the record timestamp",
            "time_out_of_range",
            Some(acct.clone()),
            Some(event("p-ahead", "job.started", &iso(at + 7_200_000), "pj-ahead", &acct, "").into_bytes()),
            at,
        ),
        (
            "older than max_event_age (40 days behind its record)",
            "time_out_of_range",
            Some(acct.clone()),
            Some(event("p-old", "job.started", &iso(at - 40 * 86_400_000), "pj-old", &acct, "").into_bytes()),
            at,
        ),
        (
            "year 1999, stamped the same",
            "time_out_of_range",
            Some(acct.clone()),
            Some(event("p-1999", "job.started", "1999-06-01T00:00:00Z", "pj-1999", &acct, "").into_bytes()),
            ms("1999-06-01T00:00:00Z"),
        ),
        (
            "month 13",
            "schema_violation",
            Some(acct.clone()),
            Some(event("p-m13", "job.started", "2024-13-01T00:00:00Z", "pj-m13", &acct, "").into_bytes()),
            at,
        ),
        (
            "70,000-byte ASCII id",
            "schema_violation",
            Some(acct.clone()),
            Some(event(&long_ascii, "job.started", &now, "pj-long-id", &acct, "").into_bytes()),
            at,
        ),
        (
            "70,002-byte multi-byte subject",
            "schema_violation",
            Some(acct.clone()),
            Some(event("p-long-subject", "job.started", &now, &long_multi, &acct, "").into_bytes()),
            at,
        ),
        (
            "70,000-byte account id",
            "schema_violation",
            Some(acct.clone()),
            Some(event("p-long-acct", "job.started", &now, "pj-long-acct", &long_ascii, "").into_bytes()),
            at,
        ),
        (
            "257-byte model",
            "schema_violation",
            Some(acct.clone()),
            Some(
                event("p-long-model", "job.started", &now, "pj-long-model", &acct, "")
                    .replace("sdxl-1.0", &"m".repeat(257))
                    .into_bytes(),
            ),
            at,
        ),
        (
            "invalid UTF-8",
            "not_json",
            Some(acct.clone()),
            Some(b"{\"specversion\":\"1.0\",\"id\":\"\xff\xfe\"}".to_vec()),
            at,
        ),
        ("empty value", "not_json", Some(acct.clone()), Some(Vec::new()), at),
        ("null value (tombstone)", "not_json", Some(acct.clone()), None, at),
        (
            "JSON null, no key",
            "schema_violation",
            None,
            Some(b"null".to_vec()),
            at,
        ),
        (
            "JSON array",
            "schema_violation",
            Some(acct.clone()),
            Some(b"[1,2,3]".to_vec()),
            at,
        ),
        (
            "100,000 nested brackets",
            "not_json",
            Some(acct.clone()),
            Some("[".repeat(100_000).into_bytes()),
            at,
        ),
        (
            "1e999999 in a field nobody reads (valid JSON: accepted, charged as orphaned)",
            "",
            Some(acct.clone()),
            Some(
                event(
                    "p-huge-number",
                    "job.started",
                    &now,
                    "pj-huge",
                    &acct,
                    r#","weight":1e999999"#,
                )
                .into_bytes(),
            ),
            at,
        ),
        (
            "unknown status",
            "schema_violation",
            Some(acct.clone()),
            Some(
                event("p-status", "job.stopped", &now, "pj-status", &acct, "")
                    .replace("succeeded", "exploded")
                    .into_bytes(),
            ),
            at,
        ),
        (
            "unknown type",
            "unknown_type",
            Some(acct.clone()),
            Some(event("p-type", "job.exploded", &now, "pj-type", &acct, "").into_bytes()),
            at,
        ),
    ];
    // Strange but valid: control characters and emoji in ids, keyless.
    v.push((
        "valid: control characters and emoji in the job id, keyless (charged)",
        "",
        None,
        Some(event("p-ok-start", "job.started", &now, "job\\u0000\\u001f🚀", &acct, "").into_bytes()),
        at,
    ));
    v.push((
        "valid: its stop",
        "",
        None,
        Some(
            event(
                "p-ok-stop",
                "job.stopped",
                &iso(at + 1_500),
                "job\\u0000\\u001f🚀",
                &acct,
                "",
            )
            .into_bytes(),
        ),
        at + 1_500,
    ));
    v
}

fn records(w: &Workload) -> Vec<Rec> {
    let mut out = Vec::new();
    let n = w.events.len();
    let total = poison_cases(0).len();
    // The poison goes into the first half, spread out; the kill follows it.
    let every = (n / 2) / (total + 1);
    let mut next = 0;
    for (i, e) in w.events.iter().enumerate() {
        out.push(Rec {
            key: Some(e.key.clone()),
            partition: partition_of(&e.key, w.partitions),
            value: Some(e.json.clone().into_bytes()),
            ts: e.time.0,
            case: None,
        });
        if i > 0 && i % every == 0 && next < total {
            // Each case is stamped relative to the valid event it follows.
            let (name, reason, key, value, ts) = poison_cases(e.time.0).swap_remove(next);
            next += 1;
            out.push(Rec {
                partition: partition_of(key.as_deref().unwrap_or("acct-poison"), w.partitions),
                key,
                value,
                ts,
                case: Some((name, reason)),
            });
        }
    }
    assert_eq!(next, total, "every poison case placed");
    out
}

/// The offline computation: one meter per partition, records in produce
/// order, each with its record timestamp — what the meter must commit.
fn offline(w: &Workload, recs: &[Rec]) -> (Outputs, Vec<String>, BTreeMap<usize, String>) {
    let (rates, plans, book) = billing(w);
    let config = MeterConfig::default();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let mut meters: BTreeMap<i32, Meter> = BTreeMap::new();
    let mut out = Vec::new();
    let topic: std::sync::Arc<str> = "events".into();
    for (i, r) in recs.iter().enumerate() {
        let origin = Origin {
            topic: topic.clone(),
            partition: r.partition,
            offset: i as i64,
            record_time: Some(jobmeter_core::Timestamp(r.ts)),
        };
        meters
            .entry(r.partition)
            .or_default()
            .apply(
                &ctx.with_partition(
                    r.partition,
                    w.partitions,
                    jobmeter_kafka::partitioner::partition_for_key,
                ),
                r.value.as_deref().unwrap_or_default(),
                Some(&origin),
                &mut out,
            )
            .expect("apply");
    }
    let mut reasons = Vec::new();
    let mut by_record = BTreeMap::new();
    for x in &out {
        if let Output::Reject(r) = x {
            reasons.push(r.reason.as_str().to_owned());
            if let Some(origin) = &r.origin {
                by_record.insert(origin.offset as usize, r.reason.as_str().to_owned());
            }
        }
    }
    let o = collect(out);
    reasons.sort();
    (o, reasons, by_record)
}

fn produce(prefix: &str, recs: &[Rec]) {
    let p = producer();
    let topic = format!("{prefix}.job-events");
    for r in recs {
        send_at(
            &p,
            &topic,
            r.key.as_deref().map(str::as_bytes),
            r.value.as_deref(),
            Some(r.partition),
            Some(r.ts),
        );
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(60)).expect("flush");
}

fn dlq_reasons(prefix: &str) -> Vec<String> {
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let topic = format!("{prefix}.dlq");
    let n = jobmeter_kafka::topics::partition_count(&settings, &topic).expect("partition count");
    let parts: Vec<(i32, Option<i64>)> = (0..n).map(|p| (p, None)).collect();
    let mut reasons = Vec::new();
    jobmeter_kafka::reader::read_to_end(&settings, "it-dlq", &topic, &parts, Duration::from_secs(60), |r| {
        let reason = r
            .headers
            .iter()
            .find(|(k, _)| k == "jobmeter.reason")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        reasons.push(reason);
    })
    .expect("read the DLQ");
    reasons.sort();
    reasons
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn meters_through_the_poison_suite_and_a_kill() {
    let prefix = fresh_prefix("poison-suite");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = MeterSpec::new(&prefix, "ps-0", dir.path().join("state"), 2);
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    let opts = FleetOptions {
        seed: 23,
        jobs: 1_500,
        accounts: 50,
        start: jobmeter_core::Timestamp(ms("2024-05-31T21:30:00Z")),
        mean_gap_ms: 10_000,
        ..FleetOptions::default()
    };
    let w = workload(&opts, 2);
    produce_accounts(&prefix, &w);
    let recs = records(&w);
    let (want, want_reasons, by_record) = offline(&w, &recs);

    // Every case does what its name says, offline first.
    let mut cases = 0;
    eprintln!("poison cases (name → reason):");
    for (i, r) in recs.iter().enumerate() {
        if let Some((name, reason)) = r.case {
            let got = by_record.get(&i).map(String::as_str).unwrap_or("");
            eprintln!("  {name} → {}", if got.is_empty() { "accepted" } else { got });
            assert_eq!(got, reason, "case {name:?}");
            cases += 1;
        }
    }
    eprintln!("{cases} poison cases interleaved with {} valid events", w.events.len());
    assert!(cases >= 20);
    assert!(!want.statements.is_empty(), "the workload closes May");
    assert!(
        want.charges.keys().any(|k| k.contains("job\u{0}\u{1f}🚀")),
        "the keyless job with control characters in its id is charged"
    );
    assert!(
        want.statements.keys().all(|k| k.ends_with("/2024-05")),
        "no statement beyond the workload's months: {:?}",
        want.statements.keys().collect::<Vec<_>>()
    );

    // Up to just past the last poison record, then SIGKILL and restart.
    let last_case = recs.iter().rposition(|r| r.case.is_some()).unwrap_or(0);
    let cut = last_case + 1;
    produce(&prefix, &recs[..cut]);
    let poison_rejects = recs
        .iter()
        .filter(|r| r.case.is_some_and(|(_, why)| !why.is_empty()))
        .count();
    wait_until("the poison in the DLQ", Duration::from_secs(120), &[&meter], || {
        read_all(&format!("{prefix}.dlq")).len() >= poison_rejects
    });
    meter.kill9();
    meter = spec.start();
    wait_until("ready after the kill", Duration::from_secs(120), &[&meter], || {
        http_get(&meter.http, "/readyz").is_some_and(|b| b.starts_with("ready"))
    });
    produce(&prefix, &recs[cut..]);
    wait_until("all charges", Duration::from_secs(240), &[&meter], || {
        read_all(&format!("{prefix}.charges")).len() >= want.charges.len()
    });
    wait_until("all statements", Duration::from_secs(60), &[&meter], || {
        read_all(&format!("{prefix}.statements")).len() >= want.statements.len()
    });
    std::thread::sleep(Duration::from_secs(2));
    let got = read_outputs(&prefix);
    assert_same(&got, &want);
    assert_eq!(dlq_reasons(&prefix), want_reasons, "every dead letter with its reason");
    let ready = http_get(&meter.http, "/readyz").unwrap_or_default();
    assert!(ready.starts_with("ready"), "{ready}");
    assert_eq!(meter.terminate(), Some(0));
}
