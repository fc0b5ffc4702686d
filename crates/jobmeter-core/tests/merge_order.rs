//! The live merge ([`order::pick`]) against the merge order of the whole
//! log ([`order::merge_order`]): whatever the fetch schedule — partitions
//! delivered in any chunks, in any order, one held back until the others
//! are done — the records are taken in exactly the reference order, and a
//! meter fed that way bills like one fed the reference order.

mod common;

use common::*;
use jobmeter_core::order::{self, Head, MergeKey, MergeQueue, Pick, QueueState};
use jobmeter_core::Timestamp;
use proptest::prelude::*;

/// Drives the live merge over `log` with fetches delivered as `schedule`
/// says (`(partition, how many records)`, taken modulo the partitions;
/// after the schedule, whatever is left arrives partition by partition).
/// Returns the order in which records were taken, and how often the merge
/// waited for a partition.
fn live(log: &[Vec<Option<Timestamp>>], schedule: &[(usize, usize)]) -> (Vec<(i32, i64)>, usize) {
    live_with(log, schedule, false)
}

/// [`live`]; with `runs`, after each pick the merge goes on taking the
/// same partition's delivered records while they sort below
/// [`order::run_limit`], as the streaming merge does.
fn live_with(log: &[Vec<Option<Timestamp>>], schedule: &[(usize, usize)], runs: bool) -> (Vec<(i32, i64)>, usize) {
    let n = log.len();
    let mut delivered = vec![0usize; n];
    let mut taken = vec![0usize; n];
    let mut watermark: Vec<Option<Timestamp>> = vec![None; n];
    let mut steps = schedule.iter();
    let mut out = Vec::new();
    let mut waits = 0;
    loop {
        let queues: Vec<QueueState> = (0..n)
            .map(|p| {
                let head = (taken[p] < delivered[p]).then(|| {
                    let mut w = watermark[p];
                    Head {
                        key: MergeKey::next(&mut w, log[p][taken[p]], p as i32, taken[p] as i64),
                        dest: Some(0),
                    }
                });
                QueueState {
                    head,
                    bound: Some(MergeKey::bound(watermark[p], p as i32)),
                    at_end: delivered[p] == log[p].len() && taken[p] == delivered[p],
                    serves: None,
                }
            })
            .collect();
        match order::pick(&queues) {
            Pick::Take(p) => {
                let limit = order::run_limit(&queues, p, 0);
                loop {
                    MergeKey::next(&mut watermark[p], log[p][taken[p]], p as i32, taken[p] as i64);
                    out.push((p as i32, taken[p] as i64));
                    taken[p] += 1;
                    if !runs || taken[p] == delivered[p] {
                        break;
                    }
                    let mut w = watermark[p];
                    let key = MergeKey::next(&mut w, log[p][taken[p]], p as i32, taken[p] as i64);
                    if limit.is_some_and(|l| key >= l) {
                        break;
                    }
                }
            }
            pick => {
                if matches!(pick, Pick::Wait(_)) {
                    waits += 1;
                }
                let step = steps
                    .next()
                    .map(|(p, k)| (p % n.max(1), *k))
                    .or_else(|| (0..n).find(|p| delivered[*p] < log[*p].len()).map(|p| (p, usize::MAX)));
                let Some((p, k)) = step else {
                    assert!(
                        matches!(pick, Pick::Fetch),
                        "waits for partition with nothing left: {pick:?}"
                    );
                    return (out, waits);
                };
                delivered[p] = delivered[p].saturating_add(k).min(log[p].len());
            }
        }
    }
}

fn log_strategy() -> impl Strategy<Value = Vec<Vec<Option<Timestamp>>>> {
    prop::collection::vec(
        prop::collection::vec(prop::option::weighted(0.9, (0i64..50).prop_map(Timestamp)), 0..30),
        1..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_fetch_schedule_takes_the_merge_order(
        log in log_strategy(),
        schedule in prop::collection::vec((0usize..6, 1usize..8), 0..40),
    ) {
        let (got, _) = live(&log, &schedule);
        prop_assert_eq!(got, order::merge_order(&log));
    }

    #[test]
    fn runs_below_the_limit_take_the_merge_order(
        log in log_strategy(),
        schedule in prop::collection::vec((0usize..6, 1usize..8), 0..40),
    ) {
        let (got, _) = live_with(&log, &schedule, true);
        prop_assert_eq!(got, order::merge_order(&log));
    }
}

/// A partition read ahead of the merge: every record read is at hand,
/// with its meter, so it holds back a meter only with a record for that
/// meter, or with its bound while it has records not read yet.
struct ReadAhead<'a> {
    keys: &'a [MergeKey],
    dests: &'a [i32],
    taken: usize,
    read: usize,
    /// `(watermark, partition)` through the last record read.
    bound: (i64, i32),
}

impl MergeQueue for ReadAhead<'_> {
    fn head(&self) -> Option<Head> {
        (self.taken < self.read).then(|| Head {
            key: self.keys[self.taken],
            dest: Some(self.dests[self.taken]),
        })
    }

    fn first_for(&self, dest: i32) -> Option<(MergeKey, bool)> {
        if let Some(i) = (self.taken..self.read).find(|i| self.dests[*i] == dest) {
            return Some((self.keys[i], true));
        }
        (self.read < self.keys.len()).then_some((MergeKey::below(Some(self.bound)), false))
    }
}

/// The streaming merge over partitions read ahead as `schedule` says, each
/// record for one of several meters (`dests`): after each pick, the run of
/// the same partition below [`order::run_limit`] of its record's meter.
/// Returns, per meter, the records in the order it was given them.
fn live_read_ahead(
    log: &[Vec<Option<Timestamp>>],
    dests: &[Vec<i32>],
    schedule: &[(usize, usize)],
) -> std::collections::BTreeMap<i32, Vec<(i32, i64)>> {
    let n = log.len();
    let keys: Vec<Vec<MergeKey>> = log
        .iter()
        .enumerate()
        .map(|(p, times)| {
            let mut w = None;
            times
                .iter()
                .enumerate()
                .map(|(o, t)| MergeKey::next(&mut w, *t, p as i32, o as i64))
                .collect()
        })
        .collect();
    let mut qs: Vec<ReadAhead<'_>> = (0..n)
        .map(|p| ReadAhead {
            keys: &keys[p],
            dests: &dests[p],
            taken: 0,
            read: 0,
            bound: MergeKey::bound(None, p as i32),
        })
        .collect();
    let mut steps = schedule.iter();
    let mut out: std::collections::BTreeMap<i32, Vec<(i32, i64)>> = Default::default();
    loop {
        match order::pick(&qs) {
            Pick::Take(p) => loop {
                let d = qs[p].dests[qs[p].taken];
                out.entry(d).or_default().push((p as i32, qs[p].taken as i64));
                qs[p].taken += 1;
                let Some(next) = qs[p].head() else { break };
                let limit = order::run_limit(&qs, p, next.dest.unwrap_or_default());
                if limit.is_some_and(|l| next.key >= l) {
                    break;
                }
            },
            pick => {
                let step = steps
                    .next()
                    .map(|(p, k)| (p % n.max(1), *k))
                    .or_else(|| (0..n).find(|p| qs[*p].read < log[*p].len()).map(|p| (p, usize::MAX)));
                let Some((p, k)) = step else {
                    assert!(matches!(pick, Pick::Fetch), "waits with nothing left: {pick:?}");
                    return out;
                };
                let q = &mut qs[p];
                q.read = q.read.saturating_add(k).min(q.keys.len());
                if q.read > 0 {
                    q.bound = (q.keys[q.read - 1].time, p as i32);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Several meters, partitions read ahead in any chunks: every meter is
    /// given its records in the merge order of the whole log.
    #[test]
    fn read_ahead_gives_every_meter_the_merge_order(
        parts in prop::collection::vec(
            prop::collection::vec((prop::option::weighted(0.9, (0i64..50).prop_map(Timestamp)), 0i32..3), 0..30),
            1..6,
        ),
        schedule in prop::collection::vec((0usize..6, 1usize..12), 0..40),
    ) {
        let log: Vec<Vec<Option<Timestamp>>> = parts.iter().map(|p| p.iter().map(|r| r.0).collect()).collect();
        let dests: Vec<Vec<i32>> = parts.iter().map(|p| p.iter().map(|r| r.1).collect()).collect();
        let got = live_read_ahead(&log, &dests, &schedule);
        let mut want: std::collections::BTreeMap<i32, Vec<(i32, i64)>> = Default::default();
        for (p, o) in order::merge_order(&log) {
            want.entry(dests[p as usize][o as usize]).or_default().push((p, o));
        }
        prop_assert_eq!(got, want);
    }
}

#[test]
fn a_partition_held_back_until_the_others_are_done_is_waited_for() {
    // Partition 1 holds the early records; partition 0 delivers all of
    // its later ones first, in one fetch.
    let log = vec![
        (100..130).map(|t| Some(Timestamp(t))).collect::<Vec<_>>(),
        (0..10).map(|t| Some(Timestamp(t))).collect::<Vec<_>>(),
    ];
    let (got, waits) = live(&log, &[(0, 30)]);
    assert_eq!(got, order::merge_order(&log));
    assert_eq!(&got[..10], (0..10).map(|o| (1, o)).collect::<Vec<_>>().as_slice());
    assert!(waits > 0, "the merge waited for partition 1");
}

/// One account's jobs, each started on partition 0 and stopped on
/// partition 1 (two clients that place records differently), while
/// partition 0 also carries another account's traffic for hours. The
/// stops' partition is delivered only after all of partition 0: a merge
/// that passed it would run stream time hours past the stops and
/// dead-letter them as stops without a start; the live merge bills every
/// job exactly as the reference order does, with no orphan and no reject.
#[test]
fn a_partition_delayed_past_the_orphan_timeout_changes_no_bill() {
    let mut w = World::new();
    w.account(r#"{"account_id":"a","plan":"payg","effective_from":"2024-01-01T00:00:00Z"}"#);
    w.account(r#"{"account_id":"b","plan":"payg","effective_from":"2024-01-01T00:00:00Z"}"#);
    let mut parts: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    let at = |min: i64, sec: i64| {
        Timestamp::parse("2024-05-01T00:00:00Z")
            .expect("time")
            .plus_ms((min * 60 + sec) * 1000)
            .to_string()
    };
    for j in 0..20 {
        let job = format!("a-{j}");
        parts[0].push(w.start("a", &job, &at(j * 15, 0), "inference", Some("img")));
        parts[1].push(w.stop("a", &job, &at(j * 15, 42), "succeeded"));
    }
    for j in 0..200 {
        let job = format!("b-{j}");
        parts[0].push(w.start("b", &job, &at(j * 2, 1), "inference", Some("llm")));
        parts[0].push(w.stop("b", &job, &at(j * 2, 9), "succeeded"));
    }
    // Partition 0 in time order, as one client sends it.
    parts[0].sort_by_key(|e| jobmeter_core::parse_job_event(e.as_bytes()).expect("event").time);
    let times: Vec<Vec<Option<Timestamp>>> = parts
        .iter()
        .map(|p| {
            p.iter()
                .map(|e| Some(jobmeter_core::parse_job_event(e.as_bytes()).expect("event").time))
                .collect()
        })
        .collect();
    let feed = |w: &mut World, order: &[(i32, i64)]| {
        for (p, o) in order {
            let e = parts[*p as usize][*o as usize].clone();
            w.apply(&e);
        }
        w.flush();
    };
    let (live_order, waits) = live(&times, &[(0, usize::MAX)]);
    assert!(waits > 0, "the merge waited for the delayed partition");
    feed(&mut w, &live_order);
    assert!(w.rejects().is_empty(), "rejects: {:?}", w.rejects());
    let charges = w.charges();
    assert_eq!(charges.len(), 220, "one charge per job");
    assert!(
        charges
            .iter()
            .all(|c| c.status != Some(jobmeter_core::JobStatus::Orphaned)),
        "no orphan"
    );
    assert!(charges
        .iter()
        .filter(|c| c.account_id.as_str() == "a")
        .all(|c| c.billable_seconds.to_string() == "42"));
    // The same as the reference order.
    let mut reference = World::new();
    reference.account(r#"{"account_id":"a","plan":"payg","effective_from":"2024-01-01T00:00:00Z"}"#);
    reference.account(r#"{"account_id":"b","plan":"payg","effective_from":"2024-01-01T00:00:00Z"}"#);
    feed(&mut reference, &order::merge_order(&times));
    assert_eq!(format!("{:?}", w.out), format!("{:?}", reference.out));
}
