//! # The merge order: one order for a partition's events, whatever the fetch schedule
//!
//! Producers may put an account's events on any input partition, but one
//! partition's meter bills each account (murmur2 of its id), and a meter's
//! results depend on the order it applies events in: stream time drives
//! orphans, stops waiting for their start and period closes, and charges
//! consume caps in the order they are made. So that order is a function of
//! the log alone, never of how fetches happened to be scheduled:
//!
//! > The meter applies its events in the order of a merge of all input
//! > partitions: repeatedly, among every input partition's next record, the
//! > one with the smallest **merge time** goes first, ties by partition
//! > number. Each record goes to the meter of its account (records of other
//! > accounts are taken by the same merge and applied elsewhere).
//!
//! A record's merge time is its event time when it is a job event whose
//! time is plausible against its Kafka timestamp ([`merge_time`]); any other
//! record has none (it cannot move stream time).
//!
//! ## How it is computed
//!
//! Every record gets a [`MergeKey`] `(E, partition, offset)`, where `E` is
//! the **watermark** of its partition through it: the largest merge time
//! among the records of that partition up to and including it. Sorting all
//! records by key gives exactly the merge above: a record whose time is
//! below an earlier record of its partition waits behind that record in the
//! merge, and goes right after it, before any record of another partition
//! with the same or a later time — which is where its key (the earlier
//! record's time, its own partition and offset) sorts it. Keys grow along a
//! partition, and a key depends only on its own partition's earlier
//! records, so whoever reads a partition computes the same keys, and the
//! order restricted to one meter's events is the same whichever instance
//! reads which partition. [`merge_order`] is the reference implementation.
//!
//! ## Live: when a record may go
//!
//! A streaming meter sees only what it has fetched. It may take the record
//! with the smallest key among the fetched heads once no other partition
//! can still deliver a smaller one ([`pick`]): that partition's head is
//! larger, or its watermark and number already sort after the record (the
//! next key of a partition is at least `(watermark, partition)`), or it has
//! reached the end of what Kafka holds. A partition whose position is below
//! its end is waited for however long its fetch takes: a meter stalls rather
//! than run its stream time past records that exist. Only a partition that
//! is caught up may be passed; then what arrives later can be out of the
//! merge order by at most the producer's delay, as with any live stream.
//!
//! ## Where it is used
//!
//! The streaming meter's merge (`service/pipeline.rs`, `merge_round`) takes
//! records by [`pick`], and the run of one partition that may follow
//! with [`run_limit`]; instances tell each other how far they have read
//! through progress records, so a meter fed from several instances merges
//! the same way. `jobmeter rebuild` replays the order a meter applied.

use crate::meter::MeterConfig;
use crate::time::Timestamp;

/// Where a record sorts in the merge order (see the module docs). Ordered
/// by watermark, then partition, then offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MergeKey {
    /// The watermark of the record's partition through the record, in
    /// milliseconds (`i64::MIN` before any record with a merge time).
    pub time: i64,
    /// The input partition the record was produced to.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

impl MergeKey {
    /// Before every record: what goes at once (bookkeeping records that
    /// are not events of the merge).
    pub const FIRST: MergeKey = MergeKey {
        time: i64::MIN,
        partition: i32::MIN,
        offset: i64::MIN,
    };

    /// The key of the record at `offset` of `partition` with `merge_time`,
    /// raising `watermark` (the partition's, through the previous record)
    /// to include it.
    pub fn next(watermark: &mut Option<Timestamp>, merge_time: Option<Timestamp>, partition: i32, offset: i64) -> Self {
        if let Some(t) = merge_time {
            if watermark.is_none_or(|w| w < t) {
                *watermark = Some(t);
            }
        }
        MergeKey {
            time: watermark.map_or(i64::MIN, |w| w.0),
            partition,
            offset,
        }
    }

    /// The smallest key the next record of `partition` can have when its
    /// watermark is `watermark`.
    pub fn bound(watermark: Option<Timestamp>, partition: i32) -> (i64, i32) {
        (watermark.map_or(i64::MIN, |w| w.0), partition)
    }

    /// A queue's bound ([`MergeKey::bound`]) as a key: below every key its
    /// partition can still have; [`MergeKey::FIRST`] when nothing bounds
    /// it.
    pub fn below(bound: Option<(i64, i32)>) -> MergeKey {
        bound.map_or(MergeKey::FIRST, |(time, partition)| MergeKey {
            time,
            partition,
            offset: i64::MIN,
        })
    }
}

/// A record's merge time: the event time of a job event whose time is
/// plausible against its Kafka timestamp (`record_time`, when it has one);
/// `None` for a record the meter will refuse for its time.
pub fn merge_time(config: &MeterConfig, event_time: Timestamp, record_time: Option<Timestamp>) -> Option<Timestamp> {
    match record_time {
        Some(rt) if !config.plausible(event_time, rt) => None,
        _ => Some(event_time),
    }
}

/// A fetched record waiting at the head of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Its merge key.
    pub key: MergeKey,
    /// The partition whose meter applies it here; `None` for a record not
    /// applied here (forwarded to another instance's meter, a marker),
    /// which can go whenever it reaches the head: its order is its
    /// owner's business.
    pub dest: Option<i32>,
}

/// What the live merge knows of one of its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// The fetched record waiting at its head, if any.
    pub head: Option<Head>,
    /// The smallest key its next record can have (`(watermark, partition)`,
    /// [`MergeKey::bound`]); `None` when nothing bounds it (then only its
    /// head or its end lets the others pass).
    pub bound: Option<(i64, i32)>,
    /// True when it has reached the end of what Kafka holds (and its head
    /// is empty): it holds nothing back.
    pub at_end: bool,
    /// `Some(p)`: it only ever delivers records for partition `p`'s meter
    /// (another instance's input partition, forwarded to `p`), so it holds
    /// back nothing else. `None`: an input partition read here, whose
    /// records may be for any meter.
    pub serves: Option<i32>,
}

/// A queue of the live merge, as [`pick`] sees it: the record at its head,
/// and the smallest key it may still deliver for one meter.
pub trait MergeQueue {
    /// The fetched record waiting at its head, if any.
    fn head(&self) -> Option<Head>;
    /// The smallest key among the records this queue may still deliver for
    /// partition `dest`'s meter, with `true` when that record is at hand
    /// (fetched) and `false` when it is only a bound on records not
    /// fetched yet; `None` when it can deliver nothing more for `dest`.
    fn first_for(&self, dest: i32) -> Option<(MergeKey, bool)>;
}

impl MergeQueue for QueueState {
    fn head(&self) -> Option<Head> {
        self.head
    }

    /// Only the head is known: a queue that serves every meter may hold a
    /// record for any of them right behind it.
    fn first_for(&self, dest: i32) -> Option<(MergeKey, bool)> {
        if self.serves.is_some_and(|s| s != dest) {
            return None;
        }
        match self.head {
            Some(h) => Some((h.key, true)),
            None if self.at_end => None,
            None => Some((MergeKey::below(self.bound), false)),
        }
    }
}

/// The live merge's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Take the head of this queue now.
    Take(usize),
    /// Every head must wait; this queue, which may still deliver a smaller
    /// record (its fetch is on the way), is the first they wait for.
    Wait(usize),
    /// No queue has a head: fetch.
    Fetch,
}

/// Which queue's head goes next (see the module docs). Heads are looked
/// at from the smallest key up: a head not applied here, or keyed
/// [`MergeKey::FIRST`], goes at once; a head for partition `p`'s meter
/// goes once no other queue can still deliver a record for `p` that sorts
/// before it — one it holds, or one not fetched yet that its bound does
/// not already sort after.
pub fn pick<Q: MergeQueue>(queues: &[Q]) -> Pick {
    let mut order: Vec<(MergeKey, usize)> = queues
        .iter()
        .enumerate()
        .filter_map(|(i, q)| q.head().map(|h| (h.key, i)))
        .collect();
    if order.is_empty() {
        return Pick::Fetch;
    }
    order.sort_unstable();
    let mut wait = None;
    for (key, i) in order {
        let Some(h) = queues[i].head() else { continue };
        let Some(dest) = h.dest else { return Pick::Take(i) };
        if key == MergeKey::FIRST {
            return Pick::Take(i);
        }
        let blocker = queues.iter().enumerate().filter(|(j, _)| *j != i).find_map(|(j, q)| {
            q.first_for(dest)
                .filter(|(k, _)| *k < key)
                .map(|(_, at_hand)| (j, at_hand))
        });
        match blocker {
            None => return Pick::Take(i),
            Some((j, false)) => {
                wait.get_or_insert(j);
            }
            Some((_, true)) => {}
        }
    }
    match wait {
        Some(j) => Pick::Wait(j),
        // Every head waits behind a smaller one that waits for a queue
        // serving another meter only: cannot happen (the smallest head's
        // blockers are queues with nothing at hand), but fetching is the
        // safe answer.
        None => Pick::Fetch,
    }
}

/// After [`pick`] took the head of queue `i`: the key below which the
/// queue's next head, when it is for partition `dest`'s meter, may be
/// taken as well without asking [`pick`] again, while the other queues
/// stay as they are: the smallest key any other queue may still deliver
/// for `dest` (`None`: none may deliver anything for it). Such a head is
/// the smallest record `dest`'s meter can still be given, so it goes next
/// in that meter's order (only records for other meters might have gone
/// before it): a run of one queue costs a comparison a record, however
/// many queues there are.
pub fn run_limit<Q: MergeQueue>(queues: &[Q], i: usize, dest: i32) -> Option<MergeKey> {
    queues
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .filter_map(|(_, q)| q.first_for(dest).map(|(k, _)| k))
        .min()
}

/// The merge order of a whole log, the reference the live merge is held
/// to: `partitions[p][o]` is the merge time of the record at offset `o` of
/// partition `p`; returns every `(partition, offset)` in the order the
/// merge takes them.
pub fn merge_order(partitions: &[Vec<Option<Timestamp>>]) -> Vec<(i32, i64)> {
    let mut keys = Vec::with_capacity(partitions.iter().map(Vec::len).sum());
    for (p, times) in partitions.iter().enumerate() {
        let p = i32::try_from(p).unwrap_or(i32::MAX);
        let mut watermark = None;
        for (o, t) in times.iter().enumerate() {
            let o = i64::try_from(o).unwrap_or(i64::MAX);
            keys.push(MergeKey::next(&mut watermark, *t, p, o));
        }
    }
    keys.sort_unstable();
    keys.into_iter().map(|k| (k.partition, k.offset)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Option<Timestamp> {
        Some(Timestamp(ms))
    }

    /// The merge as the docs state it: repeatedly the smallest next record
    /// (by merge time, ties by partition); a record without a merge time
    /// goes first among the heads, as it cannot delay anything.
    fn naive(partitions: &[Vec<Option<Timestamp>>]) -> Vec<(i32, i64)> {
        let mut pos = vec![0usize; partitions.len()];
        let mut out = Vec::new();
        loop {
            let next = (0..partitions.len())
                .filter(|p| pos[*p] < partitions[*p].len())
                .min_by_key(|p| (partitions[*p][pos[*p]].map_or(i64::MIN, |x| x.0), *p));
            let Some(p) = next else { return out };
            out.push((p as i32, pos[p] as i64));
            pos[p] += 1;
        }
    }

    #[test]
    fn a_record_behind_its_partition_goes_right_after_the_record_it_waited_for() {
        // Partition 0: 5, 3, 7. Partition 1: 4, 6.
        let log = vec![vec![t(5), t(3), t(7)], vec![t(4), t(6)]];
        let want = vec![(1, 0), (0, 0), (0, 1), (1, 1), (0, 2)];
        assert_eq!(merge_order(&log), want);
        assert_eq!(naive(&log), want);
    }

    #[test]
    fn ties_go_to_the_lower_partition_and_records_without_time_keep_their_place() {
        let log = vec![vec![t(5), None, t(5)], vec![None, t(5)], vec![]];
        let want = vec![(1, 0), (0, 0), (0, 1), (0, 2), (1, 1)];
        assert_eq!(merge_order(&log), want);
        assert_eq!(naive(&log), want);
    }

    #[test]
    fn merge_order_equals_the_head_by_head_merge() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..500 {
            let parts = 1 + next(5) as usize;
            let log: Vec<Vec<Option<Timestamp>>> = (0..parts)
                .map(|_| {
                    (0..next(12))
                        .map(|_| (next(6) != 0).then(|| Timestamp(next(20) as i64)))
                        .collect()
                })
                .collect();
            assert_eq!(merge_order(&log), naive(&log), "{log:?}");
        }
    }

    #[test]
    fn pick_waits_for_a_queue_that_may_deliver_a_smaller_record() {
        let k = |time, partition| MergeKey {
            time,
            partition,
            offset: 0,
        };
        let here = |time, partition| {
            Some(Head {
                key: k(time, partition),
                dest: Some(0),
            })
        };
        let q = |head, bound, at_end| QueueState {
            head,
            bound,
            at_end,
            serves: None,
        };
        // Queue 1 is empty, not at its end, and stands at 3 < 5: wait.
        let qs = [q(here(5, 0), Some((0, 0)), false), q(None, Some((3, 1)), false)];
        assert_eq!(pick(&qs), Pick::Wait(1));
        // At its end: pass it.
        let qs = [q(here(5, 0), Some((0, 0)), false), q(None, Some((3, 1)), true)];
        assert_eq!(pick(&qs), Pick::Take(0));
        // Already past the head (same time, higher partition): pass it.
        let qs = [q(here(5, 0), None, false), q(None, Some((5, 1)), false)];
        assert_eq!(pick(&qs), Pick::Take(0));
        // Same time, lower partition: its next record would go first.
        let qs = [q(None, Some((5, 0)), false), q(here(5, 1), None, false)];
        assert_eq!(pick(&qs), Pick::Wait(0));
        // Nothing bounds it: only a head or its end lets the others pass.
        let qs = [q(here(5, 0), None, false), q(None, None, false)];
        assert_eq!(pick(&qs), Pick::Wait(1));
        let first = Some(Head {
            key: MergeKey::FIRST,
            dest: Some(0),
        });
        let qs = [q(first, None, false), q(None, None, false)];
        assert_eq!(pick(&qs), Pick::Take(0));
        assert_eq!(pick(&[q(None, None, false)]), Pick::Fetch);
        // The smallest head wins.
        let qs = [q(here(7, 0), None, false), q(here(6, 2), None, false)];
        assert_eq!(pick(&qs), Pick::Take(1));
        // A record forwarded elsewhere goes whenever it is at a head, even
        // while a smaller head waits.
        let away = Some(Head {
            key: k(9, 2),
            dest: None,
        });
        let qs = [q(here(5, 0), None, false), q(None, None, false), q(away, None, false)];
        assert_eq!(pick(&qs), Pick::Take(2));
    }

    #[test]
    fn a_queue_that_serves_one_meter_holds_back_only_that_meter() {
        let head = |time, partition, dest| {
            Some(Head {
                key: MergeKey {
                    time,
                    partition,
                    offset: 0,
                },
                dest: Some(dest),
            })
        };
        let q = |head, bound, serves| QueueState {
            head,
            bound,
            at_end: false,
            serves,
        };
        // Partition 4 (another instance's) may still forward to meter 0 a
        // record before the one partition 3 forwarded: meter 0's head
        // waits; meter 1's goes, as no queue that serves meter 1 can
        // deliver anything before it.
        let qs = [
            q(head(5, 3, 0), Some((5, 3)), Some(0)),
            q(head(6, 1, 1), Some((6, 1)), None),
            q(None, Some((2, 4)), Some(0)),
            q(None, Some((9, 4)), Some(1)),
        ];
        assert_eq!(pick(&qs), Pick::Take(1));
        // Without meter 1's head, meter 0's waits for partition 4.
        let qs = [
            q(head(5, 3, 0), Some((5, 3)), Some(0)),
            q(None, Some((6, 1)), None),
            q(None, Some((2, 4)), Some(0)),
            q(None, Some((9, 4)), Some(1)),
        ];
        assert_eq!(pick(&qs), Pick::Wait(2));
        // A head on an input queue holds back every meter's larger heads
        // (that queue may hold their records right after it).
        let qs = [
            q(head(5, 0, 0), Some((5, 0)), None),
            q(head(6, 1, 1), Some((6, 1)), None),
            q(None, Some((2, 4)), Some(0)),
            q(None, Some((9, 4)), Some(1)),
        ];
        assert_eq!(pick(&qs), Pick::Wait(2));
    }

    #[test]
    fn next_raises_the_watermark_only_with_a_later_time() {
        let mut w = None;
        assert_eq!(MergeKey::next(&mut w, None, 2, 0).time, i64::MIN);
        assert_eq!(MergeKey::next(&mut w, t(10), 2, 1).time, 10);
        assert_eq!(MergeKey::next(&mut w, t(4), 2, 2).time, 10);
        assert_eq!(MergeKey::next(&mut w, None, 2, 3).time, 10);
        assert_eq!(MergeKey::next(&mut w, t(11), 2, 4).time, 11);
        assert_eq!(w, t(11));
        assert_eq!(MergeKey::bound(None, 3), (i64::MIN, 3));
    }
}
