//! Hostile values through parse → state → store codec → restore.
//!
//! Every event the meter accepts — times at the edges of the accepted range
//! and of months, the longest allowed ids in multi-byte text, record
//! timestamps that make an event barely plausible or barely not — changes
//! state that must read back: after each step the records the meter hands a
//! store are overlaid on a map (as RocksDB and the changelog do), a second
//! meter is restored from that map, and it must equal the live one and go
//! on producing the same outputs. Each step writes its records in a
//! format version chosen at random (JSON or binary), as a deployment in the
//! middle of an upgrade does: the restore reads both.

mod common;

use common::CARD;
use jobmeter_core::event::{EVENT_TIME_MAX, EVENT_TIME_MIN, MAX_ID_BYTES};
use jobmeter_core::state::{StateChange, StateFormat, Table};
use jobmeter_core::values;
use jobmeter_core::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

type StateMap = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

fn overlay(map: &mut StateMap, changes: Vec<StateChange>) {
    for c in changes {
        match c.value {
            Some(v) => {
                map.insert((c.table, c.key), v);
            }
            None => {
                map.remove(&(c.table, c.key));
            }
        }
    }
}

/// The records with every value in the current binary format: equal
/// exactly when they hold the same state.
fn canonical(changes: Vec<StateChange>) -> Vec<StateChange> {
    changes
        .into_iter()
        .map(|mut c| {
            c.value = c
                .value
                .map(|v| values::canonical(c.table, &v).unwrap_or_else(|e| panic!("{e}")));
            c
        })
        .collect()
}

fn restore(map: &StateMap, config: &MeterConfig) -> Meter {
    Meter::restore(map.iter().map(|((t, k), v)| (*t, k.clone(), v.clone())), config)
        .unwrap_or_else(|e| panic!("state the meter wrote does not read back: {e}"))
}

/// An id of exactly `len` bytes built from `unit` (ASCII or multi-byte),
/// padded with ASCII so the byte count is exact.
fn id_of(unit: &str, len: usize, salt: usize) -> String {
    let tag = format!("{salt}-");
    let mut s = tag.clone();
    while s.len() + unit.len() <= len {
        s.push_str(unit);
    }
    while s.len() < len {
        s.push('x');
    }
    s
}

/// The edges of event time a hostile fleet can reach.
fn edge_times() -> Vec<i64> {
    let month_end = Period::new(2024, 5).end().0;
    vec![
        EVENT_TIME_MIN.0,
        EVENT_TIME_MIN.0 + 1,
        EVENT_TIME_MAX.0 - 1,
        EVENT_TIME_MAX.0 - 600_000,
        Period::new(2099, 12).start().0,
        month_end - 1,
        month_end,
        month_end + 3_600_000,
        Period::new(2024, 2).end().0 - 1, // leap day's last millisecond
        Period::new(2024, 6).start().0,
    ]
}

#[derive(Debug, Clone)]
struct Step {
    ty: u8,
    job: usize,
    account: usize,
    time: i64,
    status: u8,
    kind: u8,
    /// Record timestamp relative to the event time (ms), or none.
    record_delta: Option<i64>,
}

fn step() -> impl Strategy<Value = Step> {
    let times = edge_times();
    (
        0u8..3,
        0usize..6,
        0usize..3,
        prop_oneof![
            proptest::sample::select(times.clone()),
            proptest::sample::select(times).prop_flat_map(|t| t - 4_000_000..t + 4_000_000),
            EVENT_TIME_MIN.0 - 10..EVENT_TIME_MAX.0 + 10,
        ],
        0u8..3,
        0u8..3,
        proptest::option::of(prop_oneof![
            Just(-300_000i64),
            Just(-300_001i64),
            Just(35 * 86_400_000i64),
            Just(35 * 86_400_000i64 + 1),
            -400_000i64..40 * 86_400_000,
        ]),
    )
        .prop_map(|(ty, job, account, time, status, kind, record_delta)| Step {
            ty,
            job,
            account,
            time,
            status,
            kind,
            record_delta,
        })
}

fn event_json(s: &Step, accounts: &[String], jobs: &[String], i: usize) -> String {
    let ty = ["job.started", "job.heartbeat", "job.stopped"][usize::from(s.ty)];
    let time = Timestamp(s.time.clamp(Timestamp::MIN.0, Timestamp::MAX.0));
    let kind = ["inference", "fine_tune", "workflow_step"][usize::from(s.kind)];
    let status = ["succeeded", "failed", "cancelled"][usize::from(s.status)];
    let long = id_of("界", MAX_ID_BYTES, i);
    serde_json::json!({
        "specversion": "1.0",
        "id": long,
        "source": id_of("ü", MAX_ID_BYTES, s.job),
        "type": ty,
        "time": time.to_string(),
        "subject": jobs[s.job % jobs.len()],
        "data": {
            "account_id": accounts[s.account % accounts.len()],
            "kind": kind,
            "model": "llm",
            "workflow_run_id": id_of("🚀", MAX_ID_BYTES, s.job),
            "gpu": id_of("g", MAX_ID_BYTES, 0),
            "status": status,
        }
    })
    .to_string()
}

fn world() -> (RateCard, PlanCatalog, AccountBook, Vec<String>, Vec<String>) {
    let rates = RateCard::from_toml(CARD).expect("card");
    let plans = PlanCatalog::default();
    let mut book = AccountBook::new(&plans);
    let accounts: Vec<String> = vec![id_of("ß", MAX_ID_BYTES, 1), id_of("a", MAX_ID_BYTES, 2), "p".into()];
    let plans_of = ["free", "pro", "enterprise"];
    for (a, plan) in accounts.iter().zip(plans_of) {
        let rec = serde_json::json!({
            "account_id": a, "plan": plan, "effective_from": "2000-01-01T00:00:00Z",
            "free_credits": "0.05", "usage_cap": "0.10", "alert_thresholds": ["0.01", "1000000000000"],
            "spend_limit": "0.03"
        });
        book.insert(AccountRecord::parse(rec.to_string().as_bytes()).expect("record"));
    }
    let jobs: Vec<String> = (0..6)
        .map(|j| id_of(["job", "ジョブ", "🚀"][j % 3], MAX_ID_BYTES, j))
        .collect();
    (rates, plans, book, accounts, jobs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_state_change_reads_back_and_restores_the_same_meter(steps in proptest::collection::vec((step(), any::<bool>()), 1..40)) {
        let (rates, plans, book, accounts, jobs) = world();
        let config = MeterConfig::default();
        let ctx = Context::new(&rates, &plans, &book, &config).with_partition(0, 1, |_, _| 0);
        let mut live = Meter::tracking_changes();
        let mut map = StateMap::new();
        let topic: std::sync::Arc<str> = "events".into();
        for (i, (s, json)) in steps.iter().enumerate() {
            let format = if *json { StateFormat::Json } else { StateFormat::Binary };
            live = std::mem::take(&mut live).with_state_format(format);
            let raw = event_json(s, &accounts, &jobs, i);
            let origin = Origin {
                topic: topic.clone(),
                partition: 0,
                offset: i as i64,
                record_time: s.record_delta.map(|d| Timestamp(s.time.saturating_add(d))),
            };
            let before = live.stream_time();
            let mut out = Vec::new();
            live.apply(&ctx, raw.as_bytes(), Some(&origin), &mut out).unwrap();
            // A refused time never moves stream time.
            if out.iter().any(|o| matches!(o, Output::Reject(r) if r.reason == RejectReason::TimeOutOfRange)) {
                prop_assert_eq!(live.stream_time(), before);
            }
            if let Some(t) = live.stream_time() {
                prop_assert!(t >= EVENT_TIME_MIN && t < EVENT_TIME_MAX, "stream time {} left the accepted range", t);
            }
            let changes = live.take_changes().expect("encode");
            for c in &changes {
                if let (Table::Jobs | Table::Usage | Table::Statements, Some(v)) = (c.table, &c.value) {
                    prop_assert_eq!(values::version(v), format.version());
                }
            }
            overlay(&mut map, changes);
            let mut restored = restore(&map, &config);
            prop_assert_eq!(canonical(restored.snapshot().expect("encode")), canonical(live.snapshot().expect("encode")));
            prop_assert_eq!(restored.stream_time(), live.stream_time());
            prop_assert_eq!(restored.open_jobs(), live.open_jobs());
            // Both go on identically: the next event (or a flush) yields the
            // same outputs from the restored meter as from the live one.
            let mut probe_live = Meter::restore(map.iter().map(|((t, k), v)| (*t, k.clone(), v.clone())), &config).expect("restore");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            if let Some((next, _)) = steps.get(i + 1) {
                let raw = event_json(next, &accounts, &jobs, i + 1);
                probe_live.apply(&ctx, raw.as_bytes(), None, &mut a).unwrap();
                restored.apply(&ctx, raw.as_bytes(), None, &mut b).unwrap();
            } else {
                probe_live.flush(&ctx, &mut a).unwrap();
                restored.flush(&ctx, &mut b).unwrap();
            }
            prop_assert_eq!(a, b);
        }
    }
}

#[test]
fn ids_over_the_bound_are_refused_naming_the_field_never_truncated() {
    let (rates, plans, book, _, _) = world();
    let config = MeterConfig::default();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let base = serde_json::json!({
        "specversion": "1.0", "id": "e1", "source": "s", "type": "job.started",
        "time": "2024-05-01T00:00:00Z", "subject": "j",
        "data": {"account_id": "a", "kind": "workflow_step", "model": "llm", "workflow_run_id": "r", "gpu": "g"}
    });
    let fields = [
        ("id", "/id"),
        ("source", "/source"),
        ("subject", "/subject"),
        ("data.account_id", "/data/account_id"),
        ("data.model", "/data/model"),
        ("data.workflow_run_id", "/data/workflow_run_id"),
        ("data.gpu", "/data/gpu"),
    ];
    for (name, pointer) in fields {
        for unit in ["a", "é", "界", "🚀"] {
            for (len, ok) in [(MAX_ID_BYTES, true), (MAX_ID_BYTES + 1, false), (70_000, false)] {
                let mut ev = base.clone();
                let v = id_of(unit, len, 0);
                assert_eq!(v.len(), len);
                if let Some(slot) = ev.pointer_mut(pointer) {
                    *slot = serde_json::Value::String(v);
                }
                let mut meter = Meter::tracking_changes();
                let mut out = Vec::new();
                meter.apply(&ctx, ev.to_string().as_bytes(), None, &mut out).unwrap();
                let rejected = out.iter().find_map(|o| match o {
                    Output::Reject(r) => Some(r),
                    _ => None,
                });
                if ok {
                    // Accepted by the parser (a model that long is still
                    // not on the rate card).
                    assert!(
                        rejected.is_none_or(|r| r.reason != RejectReason::SchemaViolation),
                        "{name} of {len} bytes was refused: {rejected:?}"
                    );
                } else {
                    let r = rejected.unwrap_or_else(|| panic!("{name} of {len} bytes ({unit}) was accepted"));
                    assert_eq!(r.reason, RejectReason::SchemaViolation);
                    assert!(r.detail.contains(&format!("`{name}`")), "{}", r.detail);
                    assert_eq!(meter.known_jobs(), 0);
                }
            }
        }
    }
    // A default record "since 1970" is fine: `effective_from` is no event time.
    let since = serde_json::json!({"account_id": "a", "plan": "pro", "effective_from": "1970-01-01T00:00:00Z"});
    assert!(AccountRecord::parse(since.to_string().as_bytes()).is_ok());
    for (amount, ok) in [("1000000000000", true), ("1000000000000.01", false), ("-0.01", false)] {
        let rec = serde_json::json!({"account_id": "a", "plan": "free", "effective_from": "2024-01-01T00:00:00Z", "free_credits": amount});
        assert_eq!(AccountRecord::parse(rec.to_string().as_bytes()).is_ok(), ok, "{amount}");
    }
    let long = id_of("界", MAX_ID_BYTES + 1, 0);
    let rec = serde_json::json!({"account_id": long, "plan": "pro", "effective_from": "2024-01-01T00:00:00Z"});
    let err = AccountRecord::parse(rec.to_string().as_bytes()).err();
    assert!(err.is_some_and(|e| e.reason == RejectReason::SchemaViolation && e.detail.contains("`account_id`")));
}

#[test]
fn a_broken_clock_is_refused_and_moves_nothing() {
    let (rates, plans, book, _, _) = world();
    let config = MeterConfig::default();
    let ctx = Context::new(&rates, &plans, &book, &config).with_partition(0, 1, |_, _| 0);
    let ev = |id: &str, time: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"job.started","time":"{time}","subject":"{id}","data":{{"account_id":"p","kind":"inference","model":"llm"}}}}"#
        )
    };
    let origin = |offset: i64, record: &str| Origin {
        topic: "t".into(),
        partition: 0,
        offset,
        record_time: Some(common::ts(record)),
    };
    let mut m = Meter::tracking_changes();
    let mut out = Vec::new();
    let now = "2024-05-10T12:00:00Z";
    m.apply(&ctx, ev("ok", now).as_bytes(), Some(&origin(0, now)), &mut out)
        .unwrap();
    let st = m.stream_time();
    let _ = m.take_changes();
    for (i, (time, record)) in [
        ("9999-12-31T23:59:59.999Z", now),                        // far future, absolute bound
        ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"), // a producer stamping the same bad clock
        ("2100-01-01T00:00:00Z", "2100-01-01T00:00:00Z"),
        ("1999-12-31T23:59:59.999Z", "1999-12-31T23:59:59.999Z"),
        ("2024-05-10T14:00:00Z", now),     // two hours ahead of its record
        ("2024-05-10T12:05:00.001Z", now), // 1 ms past the default skew
        ("2024-04-05T11:59:59.999Z", now), // 1 ms older than 35 days
    ]
    .into_iter()
    .enumerate()
    {
        let before = out.len();
        m.apply(
            &ctx,
            ev(&format!("bad{i}"), time).as_bytes(),
            Some(&origin(i as i64 + 1, record)),
            &mut out,
        )
        .unwrap();
        let new = &out[before..];
        assert_eq!(new.len(), 1, "{time}: {new:?}");
        assert!(
            matches!(&new[0], Output::Reject(r) if r.reason == RejectReason::TimeOutOfRange),
            "{time}: {new:?}"
        );
        assert_eq!(m.stream_time(), st, "{time} moved stream time");
        assert!(m.take_changes().expect("encode").is_empty(), "{time} changed state");
    }
    let i = RejectReason::ALL
        .iter()
        .position(|r| *r == RejectReason::TimeOutOfRange)
        .expect("listed");
    assert_eq!(m.stats().rejected[i], 7);
    // The edges themselves are plausible.
    for (i, time) in ["2024-05-10T12:05:00Z", "2024-04-05T12:00:00Z"].into_iter().enumerate() {
        let before = out.len();
        m.apply(
            &ctx,
            ev(&format!("edge{i}"), time).as_bytes(),
            Some(&origin(20 + i as i64, now)),
            &mut out,
        )
        .unwrap();
        assert!(
            out[before..].iter().all(|o| !matches!(o, Output::Reject(_))),
            "{time}: {:?}",
            &out[before..]
        );
    }
    let statements: Vec<_> = out.iter().filter(|o| matches!(o, Output::Statement(_))).collect();
    assert!(statements.is_empty(), "{statements:?}");
}
