//! Finished jobs kept in an archive instead of memory change nothing the
//! meter does.
//!
//! A meter that holds every job for its retention and a meter that lets
//! finished jobs go to a [`MemArchive`] once their batch is durable are fed
//! the same events — duplicates of finished jobs, ids reused for other
//! jobs, stops after an orphan charge, conflicting starts, jumps in stream
//! time past the retention — in batches of random size, with the archive
//! one batch behind (the batch in commit is not durable yet). Their outputs
//! must be identical, event by event; at random points the archived meter
//! is restored from the durable state (loading only open jobs) and goes on.

mod common;

use common::CARD;
use jobmeter_core::archive::{JobArchive, SharedMemArchive};
use jobmeter_core::state::{keys, StateChange, Table};
use jobmeter_core::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

type StateMap = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

#[derive(Debug, Clone)]
struct Step {
    ty: u8,
    job: u8,
    account: u8,
    /// How far this event's time is from the previous one's (ms; may be
    /// negative: late events).
    dt: i64,
    /// 0: new id; 1: an exact copy of an earlier event; 2: an earlier
    /// event's id on this event's body.
    again: u8,
    pick: usize,
    /// End the batch after this event.
    cut: bool,
    /// Restore the archived meter from durable state after this batch.
    restart: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        (0u8..3, 0u8..8, 0u8..3),
        prop_oneof![
            6 => 0i64..20_000,
            2 => -900_000i64..0,
            2 => 600_000i64..1_800_000,
            1 => 3_600_000i64..172_800_000,
        ],
        prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
        any::<usize>(),
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.05),
    )
        .prop_map(|((ty, job, account), dt, again, pick, cut, restart)| Step {
            ty,
            job,
            account,
            dt,
            again,
            pick,
            cut,
            restart,
        })
}

fn raw_of(s: &Step, id: &str, time: Timestamp) -> String {
    let ty = ["job.started", "job.heartbeat", "job.stopped"][usize::from(s.ty)];
    let account = ["free", "pro", "payg"][usize::from(s.account)];
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "w", "type": ty,
        "time": time.to_string(), "subject": format!("j{}", s.job),
        "data": {"account_id": account, "kind": "inference", "model": "llm", "status": "succeeded"}
    })
    .to_string()
}

struct Durable {
    map: StateMap,
    archive: SharedMemArchive,
}

impl Durable {
    fn write(&mut self, changes: &[StateChange]) {
        self.archive.apply(changes);
        for c in changes {
            match &c.value {
                Some(v) => self.map.insert((c.table, c.key.clone()), v.clone()),
                None => self.map.remove(&(c.table, c.key.clone())),
            };
        }
    }

    /// What a restart loads: every record but the local indexes, and of
    /// the jobs only those the open-jobs index lists.
    fn restore(&self, config: &MeterConfig) -> Meter {
        let records = self.map.iter().filter(|((t, k), _)| match t {
            Table::Jobs => self.map.contains_key(&(Table::OpenJobs, k.clone())),
            t => !t.is_local(),
        });
        Meter::restore(records.map(|((t, k), v)| (*t, k.clone(), v.clone())), config)
            .expect("restore")
            .with_archive(Box::new(self.archive.clone()))
    }
}

fn setup() -> (RateCard, PlanCatalog, AccountBook, MeterConfig) {
    let rates = RateCard::from_toml(CARD).expect("card");
    let plans = PlanCatalog::default();
    let mut book = AccountBook::new(&plans);
    for (a, plan) in [("free", "free"), ("pro", "pro")] {
        let rec = serde_json::json!({
            "account_id": a, "plan": plan, "effective_from": "2000-01-01T00:00:00Z",
            "free_credits": "5", "usage_cap": "8"
        });
        book.insert(AccountRecord::parse(rec.to_string().as_bytes()).expect("record"));
    }
    let config = MeterConfig {
        retention_ms: 6 * 3_600_000,
        max_event_age_ms: 6 * 3_600_000,
        ..MeterConfig::default()
    };
    (rates, plans, book, config)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn an_archived_meter_yields_what_one_holding_every_job_yields(steps in proptest::collection::vec(step(), 1..160)) {
        let (rates, plans, book, config) = setup();
        let ctx = Context::new(&rates, &plans, &book, &config);
        let mut plain = Meter::tracking_changes();
        let mut durable = Durable { map: StateMap::new(), archive: SharedMemArchive::default() };
        let mut archived = Meter::tracking_changes().with_archive(Box::new(durable.archive.clone()));
        // The batch in commit: durable once the next one is taken.
        let mut in_commit: Vec<StateChange> = Vec::new();
        let mut t = Timestamp::parse("2024-05-31T20:00:00Z").expect("time");
        let mut sent: Vec<(String, String)> = Vec::new();
        let mut max_held = 0;
        for (i, s) in steps.iter().enumerate() {
            t = Timestamp(t.0 + s.dt);
            let raw = match (s.again, sent.is_empty()) {
                (1, false) => sent[s.pick % sent.len()].1.clone(),
                (2, false) => raw_of(s, &sent[s.pick % sent.len()].0.clone(), t),
                _ => raw_of(s, &format!("e{i}"), t),
            };
            sent.push((format!("e{i}"), raw.clone()));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            plain.apply(&ctx, raw.as_bytes(), None, &mut a).unwrap();
            archived.apply(&ctx, raw.as_bytes(), None, &mut b).unwrap();
            prop_assert_eq!(&a, &b, "event {}: {}", i, raw);
            prop_assert_eq!(plain.open_jobs(), archived.open_jobs());
            prop_assert_eq!(plain.stream_time(), archived.stream_time());
            prop_assert!(archived.known_jobs() <= plain.known_jobs());
            max_held = max_held.max(archived.known_jobs());
            if s.cut || i + 1 == steps.len() {
                plain.take_changes().expect("encode");
                durable.write(&in_commit);
                in_commit = archived.take_changes().expect("encode");
                archived.release_stored();
                if s.restart {
                    durable.write(&std::mem::take(&mut in_commit));
                    archived = durable.restore(&config);
                }
            }
        }
        // Nothing pending: once every batch is durable, memory holds only
        // the open jobs and the durable state equals the plain meter's.
        durable.write(&std::mem::take(&mut in_commit));
        archived.take_changes().expect("encode");
        archived.release_all_stored();
        let open = archived.open_jobs();
        prop_assert_eq!(archived.known_jobs(), open, "held {} at most", max_held);
        let plain_jobs: BTreeMap<Vec<u8>, Vec<u8>> = plain
            .snapshot()
            .expect("encode")
            .into_iter()
            .filter(|c| c.table == Table::Jobs)
            .filter_map(|c| Some((c.key, values::canonical(Table::Jobs, &c.value?).ok()?)))
            .collect();
        let stored_jobs: BTreeMap<Vec<u8>, Vec<u8>> = durable
            .map
            .iter()
            .filter(|((t, _), _)| *t == Table::Jobs)
            .filter_map(|((_, k), v)| Some((k.clone(), values::canonical(Table::Jobs, v).ok()?)))
            .collect();
        prop_assert_eq!(&plain_jobs, &stored_jobs);
        // The indexes list exactly the open jobs, and every stored
        // finished job's ids and expiry.
        let open_listed = durable.map.keys().filter(|(t, _)| *t == Table::OpenJobs).count();
        prop_assert_eq!(open_listed, open);
        for (k, v) in &durable.map {
            if k.0 != Table::Jobs {
                continue;
            }
            let job: state::Job = values::decode(Table::Jobs, v).expect("job");
            let jk = keys::decode_job(&k.1).expect("key");
            if let Some(e) = job.expires {
                prop_assert!(durable.map.contains_key(&(Table::Expiries, archive::expiry_key(e, &jk))));
                for ek in &job.keys {
                    prop_assert!(durable.archive.has_event(*ek).expect("read"));
                }
            }
        }
        // Both go on identically to the end.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        plain.flush(&ctx, &mut a).unwrap();
        archived.flush(&ctx, &mut b).unwrap();
        prop_assert_eq!(a, b);
    }
}

/// A job finished long ago is not in memory, is still recognised, and is
/// forgotten from the archive when its retention ends.
#[test]
fn a_finished_job_leaves_memory_and_is_forgotten_at_its_retention() {
    let (rates, plans, book, config) = setup();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let archive = SharedMemArchive::default();
    let mut m = Meter::tracking_changes().with_archive(Box::new(archive.clone()));
    let ev = |id: &str, ty: u8, job: u8, time: &str| {
        let s = Step {
            ty,
            job,
            account: 2,
            dt: 0,
            again: 0,
            pick: 0,
            cut: false,
            restart: false,
        };
        raw_of(&s, id, Timestamp::parse(time).expect("time"))
    };
    let mut out = Vec::new();
    let start = ev("s1", 0, 1, "2024-05-01T00:00:00Z");
    m.apply(&ctx, start.as_bytes(), None, &mut out).unwrap();
    m.apply(&ctx, ev("p1", 2, 1, "2024-05-01T00:00:10Z").as_bytes(), None, &mut out)
        .unwrap();
    assert_eq!(out.len(), 1, "one charge: {out:?}");
    let batch = m.take_changes().expect("encode");
    assert_eq!(m.known_jobs(), 1, "held until its batch is durable");
    archive.apply(&batch);
    m.take_changes().expect("encode");
    m.release_stored();
    assert_eq!(m.known_jobs(), 0, "gone from memory");
    // The duplicate start is recognised from the archive.
    let before = m.stats().duplicates;
    m.apply(&ctx, start.as_bytes(), None, &mut out).unwrap();
    assert_eq!(m.stats().duplicates, before + 1);
    assert_eq!(out.len(), 1);
    // A different start for the finished job is a conflict.
    m.apply(&ctx, ev("s2", 0, 1, "2024-05-01T00:01:00Z").as_bytes(), None, &mut out)
        .unwrap();
    assert!(matches!(out.last(), Some(Output::Reject(r)) if r.reason == RejectReason::Conflict));
    archive.apply(&m.take_changes().expect("encode"));
    m.take_changes().expect("encode");
    m.release_all_stored();
    assert_eq!(archive.jobs(), 1);
    // Seven hours later the retention (6 h) has ended: the job is deleted,
    // and its start is new again.
    m.apply(&ctx, ev("x", 1, 5, "2024-05-01T07:00:00Z").as_bytes(), None, &mut out)
        .unwrap();
    let batch = m.take_changes().expect("encode");
    assert!(batch.iter().any(|c| c.table == Table::Jobs
        && c.value.is_none()
        && keys::decode_job(&c.key).is_some_and(|k| k.1.as_str() == "j1")));
    archive.apply(&batch);
    assert_eq!(archive.jobs(), 1, "only the heartbeat-only job x is left");
    let n = out.len();
    m.apply(&ctx, ev("s1", 0, 1, "2024-05-01T07:00:01Z").as_bytes(), None, &mut out)
        .unwrap();
    assert_eq!(out.len(), n, "a start, accepted");
    assert_eq!(m.stats().duplicates, before + 1);
}
