//! A meter whose finished jobs live in RocksDB ([`Archive`]) yields what a
//! meter holding every job yields, through restarts that load only the open
//! jobs, and from a store written without the indexes (built once).

use jobmeter_core::state::StateChange;
use jobmeter_core::*;
use jobmeter_store::{Archive, Store};
use std::sync::Arc;

const CARD: &str = r#"
[[versions]]
version = "v1"
effective_from = "2024-01-01T00:00:00Z"
fine_tune_per_second = "0.001"
models."llm" = { per_second = "0.002" }
"#;

/// A fleet with finished jobs, late duplicates of them, stops after the
/// orphan timeout, reused ids, and stream time passing the retention.
fn events() -> Vec<String> {
    let mut out = Vec::new();
    let mut t = Timestamp::parse("2024-05-01T00:00:00Z").expect("time").0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..4_000u64 {
        t += match next(500) {
            0 => 4 * 3_600_000,
            1..=25 => 900_000,
            _ => next(20_000) as i64,
        };
        let job = i / 3 + next(5);
        let ty = ["job.started", "job.heartbeat", "job.stopped"][next(3) as usize];
        let id = match next(10) {
            0 if i > 0 => format!("e{}", next(i)),
            _ => format!("e{i}"),
        };
        let ev = serde_json::json!({
            "specversion": "1.0", "id": id, "source": "w", "type": ty,
            "time": Timestamp(t - next(600_000) as i64).to_string(), "subject": format!("j{job}"),
            "data": {"account_id": format!("a{}", job % 7), "kind": "inference", "model": "llm", "status": "succeeded"}
        });
        out.push(ev.to_string());
    }
    out
}

fn config() -> MeterConfig {
    MeterConfig {
        retention_ms: 48 * 3_600_000,
        max_event_age_ms: 48 * 3_600_000,
        ..MeterConfig::default()
    }
}

/// Runs `events` through a meter over `store` partition 0 in batches of
/// 37, committing each batch one batch late (as the committer does), with
/// a restart every `restart_every` batches; returns every output and the
/// most jobs the meter held at once.
fn run_archived(store: &Arc<Store>, events: &[String], restart_every: usize) -> (Vec<Output>, usize) {
    let rates = RateCard::from_toml(CARD).expect("card");
    let plans = PlanCatalog::default();
    let book = AccountBook::new(&plans);
    let config = config();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let open = |store: &Arc<Store>| {
        let st = store.load_meter_state(0, true).expect("load");
        Meter::restore(st.records, &config)
            .expect("restore")
            .with_archive(Box::new(Archive::new(store.clone(), 0)))
    };
    let mut meter = open(store);
    let mut in_commit: Vec<StateChange> = Vec::new();
    let (mut out, mut held) = (Vec::new(), 0);
    for (b, chunk) in events.chunks(37).enumerate() {
        for raw in chunk {
            meter.apply(&ctx, raw.as_bytes(), None, &mut out).expect("apply");
            held = held.max(meter.known_jobs());
        }
        store.commit(0, &in_commit, Some(b as i64)).expect("write");
        in_commit = meter.take_changes().expect("encode");
        meter.release_stored();
        if (b + 1) % restart_every == 0 {
            store
                .commit(0, &std::mem::take(&mut in_commit), Some(b as i64))
                .expect("write");
            meter = open(store);
        }
    }
    meter.flush(&ctx, &mut out).expect("flush");
    (out, held)
}

/// Runs `events` through a meter holding every job; writes its state to
/// `store` at the end, or flushes it.
fn run_plain(events: &[String], store: Option<&Store>) -> (Vec<Output>, usize) {
    let rates = RateCard::from_toml(CARD).expect("card");
    let plans = PlanCatalog::default();
    let book = AccountBook::new(&plans);
    let config = config();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let mut meter = Meter::tracking_changes();
    let mut out = Vec::new();
    for raw in events {
        meter.apply(&ctx, raw.as_bytes(), None, &mut out).expect("apply");
    }
    let held = meter.known_jobs();
    match store {
        Some(s) => s
            .commit(0, &meter.take_changes().expect("encode"), Some(0))
            .expect("write"),
        None => meter.flush(&ctx, &mut out).expect("flush"),
    }
    (out, held)
}

#[test]
fn finished_jobs_in_rocksdb_change_no_output() {
    let events = events();
    let (expected, plain_held) = run_plain(&events, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path()).expect("open"));
    store.set_index_complete(0, true).expect("marker");
    let (got, held) = run_archived(&store, &events, 17);
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
    let charges = got.iter().filter(|o| matches!(o, Output::Charge(_))).count();
    assert!(charges > 500, "{charges} charges");
    assert!(
        held * 4 < plain_held,
        "the archived meter held at most {held} jobs, the plain one ends with {plain_held}"
    );
}

#[test]
fn a_store_without_indexes_is_indexed_once_and_goes_on_alike() {
    let events = events();
    let (first, rest) = events.split_at(2_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path()).expect("open"));
    // Written by a meter holding every job: no indexes, no marker.
    let (before, _) = run_plain(first, Some(&store));
    assert!(!store.index_complete(0).expect("marker"));
    let jobs = store.build_index(0).expect("index");
    assert!(jobs > 100, "{jobs} jobs indexed");
    assert!(store.index_complete(0).expect("marker"));
    let open_listed = store.load_meter_state(0, true).expect("load").records.len();
    let all = store.load_meter_state(0, false).expect("load").records.len();
    assert!(open_listed < all, "a restore loads {open_listed} records of {all}");
    // The rest through the archived meter equals the rest through one meter
    // that saw everything.
    let (all_out, _) = run_plain(&events, None);
    let (tail, _) = run_archived(&store, rest, 1_000);
    assert_eq!(before, all_out[..before.len()]);
    assert_eq!(tail, all_out[before.len()..]);
}
