//! The merge order across instances ([`jobmeter_core::order`]).
//!
//! A meter's events come from every input partition. Those this pipeline
//! reads are merge queues of the poll loop. Those another instance reads
//! reach the meter through its repartition partition, forwarded in that
//! instance's transactions: here they are split by the input partition
//! they came from into one queue each, a [`Remote`], which the poll loop
//! merges like the others. What bounds a remote queue that is empty is
//! the forwarder's word: with every commit an instance writes a
//! [`Progress`] record into the repartition partition of each meter it
//! does not hold, naming for each input partition it reads the smallest
//! merge time it can still forward and whether it has read all Kafka held.
//! The owner takes a forwarded record once no queue can deliver a smaller
//! one, so two instances bill a backlog exactly as one does.
//!
//! ## Reading ahead
//!
//! The poll loop reads each input partition ahead of its merge (up to a
//! bound, in memory) and forwards a record whose meter is held elsewhere as
//! soon as it is read ([`Engine::forward_ahead`]). So the bound an instance
//! publishes is how far it has *read* a partition, not how far its own merge
//! has got: an owner waiting for another instance's word waits one commit
//! of it, not one turn of its merge (which may itself be waiting for the
//! owner's word — the two would otherwise advance a step a commit). The
//! input offset committed stays at the first record not yet taken by the
//! merge, so a forwarder that restarts forwards again what it had read
//! beyond it; the owner knows those copies by their source offset (a
//! partition's records reach a meter in offset order, whatever the route)
//! and skips them, as `jobmeter rebuild` does.
//!
//! ## What is durable
//!
//! Forwarded records are applied out of their repartition order (in the
//! merge order), so the repartition offset committed for a meter is that
//! of its oldest record still waiting; records after it that were applied
//! before a restart are recognised by their source offset
//! (`applied_through`) and skipped when read again. That, and each remote
//! partition's last progress, live in the meter's state
//! (`merge_sources`, written with each commit that changed them), so a
//! restarted owner knows at once what it knew.
//!
//! ## Deadlock freedom
//!
//! An instance's published bound for an input partition is at least the
//! merge time of the first record its merge has not taken (reading ahead
//! only raises it), and a queue holds back a meter only with a record for
//! that meter it holds, or with its bound while it has records not read
//! yet. So the smallest unapplied record of the whole group is held back
//! by nothing but records that are not read yet: it is taken once they
//! are read (or its forwarders' latest progress is), and the group never
//! waits on itself. A partition whose read-ahead is full stops raising its
//! bound, but every record it holds then sorts below that bound (keys grow
//! along a partition), and those records are not held back by it, which
//! is all the argument needs.

use super::{Engine, EngineError};
use jobmeter_core::order::{Head, MergeKey, QueueState};
use jobmeter_kafka::repartition::{is_marker, is_progress, merge_time_of, source_of, Progress};
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedMessage};
use std::collections::VecDeque;
use std::time::Duration;

/// A forwarded record waiting to be applied.
#[derive(Debug)]
pub(super) struct Pending {
    msg: OwnedMessage,
    parsed: Option<jobmeter_core::JobEvent>,
    key: MergeKey,
}

/// One input partition read by another instance, as one meter knows it.
#[derive(Debug)]
pub(super) struct Remote {
    pending: VecDeque<Pending>,
    /// The source offset of the last record applied from it (forwarded,
    /// or read here directly since this instance took the partition).
    applied_through: i64,
    /// The source offset of the last forwarded record queued from it (not
    /// durable: the queue is read again from its committed offset).
    queued_through: i64,
    /// The smallest merge time its forwarder can still forward.
    bound: Option<i64>,
    /// Its forwarder had read all Kafka held.
    caught_up: bool,
}

impl Default for Remote {
    fn default() -> Self {
        Remote {
            pending: VecDeque::new(),
            // Before the first offset: nothing applied yet.
            applied_through: -1,
            queued_through: -1,
            bound: None,
            caught_up: false,
        }
    }
}

/// The merge queue of the records forwarded from partition `a` of the
/// adjustments topic (below -1, which stands for a repartition partition
/// not read to its end).
pub(super) fn adjustment_queue(a: i32) -> i32 {
    -2 - a
}

/// How often an instance whose inputs changed writes progress while it
/// has nothing else to commit.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(50);

impl Engine {
    /// Takes a record of meter `p`'s repartition partition (merge mode):
    /// a forwarded event is queued by the input partition it came from, a
    /// progress record updates what the meter knows of those partitions,
    /// a marker is passed over.
    pub fn read_repartition(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), EngineError> {
        let p = msg.partition();
        if !self.local(p)? {
            return Ok(());
        }
        let o = msg.offset();
        self.rp_read.insert(p, o + 1);
        if is_marker(msg.headers()) {
            // Committed like an event, so that the repartition offset a
            // rebuild reads markers up to covers the last one written.
            if self.batch_events == 0 {
                self.batch_started = std::time::Instant::now();
            }
            self.batch_events += 1;
            return Ok(());
        }
        if is_progress(msg.headers()) {
            if let Some(pr) = Progress::decode(msg.payload().unwrap_or_default()) {
                for (q, bound, end) in pr.sources {
                    if q == p || !(0..self.cfg.input_partitions).contains(&q) {
                        continue;
                    }
                    let r = self.remote.entry((p, q)).or_default();
                    if r.bound.is_none_or(|b| b < bound) {
                        r.bound = Some(bound);
                    }
                    r.caught_up = end;
                    self.remote_dirty.insert(p);
                }
            }
            return Ok(());
        }
        let pairs = || {
            msg.headers()
                .into_iter()
                .flat_map(|h| h.iter().map(|x| (x.key, x.value.unwrap_or_default())))
        };
        let (topic, q, so) = source_of(pairs()).unwrap_or((String::new(), p, o));
        let q = if *topic == *self.adjustments_topic {
            adjustment_queue(q)
        } else {
            q
        };
        let r = self.remote.entry((p, q)).or_default();
        if so <= r.applied_through.max(r.queued_through) {
            // Applied before a restart (the committed repartition offset
            // is that of the oldest record that was still waiting), or
            // forwarded again: a forwarder reads ahead of the input offset
            // it commits, and after a restart forwards once more what it
            // had forwarded beyond it.
            return Ok(());
        }
        r.queued_through = so;
        let parsed = jobmeter_core::parse_job_event(msg.payload().unwrap_or_default()).ok();
        let record_time = msg.timestamp().to_millis().map(jobmeter_core::Timestamp);
        let time = merge_time_of(pairs())
            .or_else(|| {
                parsed
                    .as_ref()
                    .and_then(|ev| jobmeter_core::order::merge_time(&self.cfg.meter, ev.time, record_time))
                    .map(|t| t.0)
            })
            .unwrap_or(i64::MIN);
        let key = MergeKey {
            time,
            partition: q,
            offset: so,
        };
        r.pending.push_back(Pending {
            msg: msg.detach(),
            parsed,
            key,
        });
        self.rp_pending.entry(p).or_default().insert(o);
        Ok(())
    }

    /// Meter `p`'s repartition partition has been read to its end.
    pub fn repartition_at_end(&mut self, p: i32) {
        self.rp_at_end.insert(p);
    }

    /// True once meter `p`'s repartition partition has been read to its
    /// end in this assignment.
    pub fn repartition_read_to_end(&self, p: i32) -> bool {
        self.rp_at_end.contains(&p)
    }

    /// The merge queues of forwarded records, with what they hold for the
    /// poll loop's merge; `(meter, input partition)` each.
    pub fn remote_queues(&self, out: &mut Vec<((i32, i32), QueueState)>) {
        out.clear();
        for p in self.meters.keys() {
            if !self.rp_at_end.contains(p) {
                // Not read to its end yet: it may hold anything for `p`.
                out.push((
                    (*p, -1),
                    QueueState {
                        head: None,
                        bound: None,
                        at_end: false,
                        serves: Some(*p),
                    },
                ));
            }
        }
        for p in self.meters.keys() {
            // Pricing adjustments: applied as they are read (their merge
            // key sorts first), in the order of their partition.
            for ((_, q), r) in self.remote.range((*p, i32::MIN)..(*p, -1)) {
                if let Some(x) = r.pending.front() {
                    out.push((
                        (*p, *q),
                        QueueState {
                            head: Some(Head {
                                key: x.key,
                                dest: Some(*p),
                            }),
                            bound: None,
                            at_end: false,
                            serves: Some(*p),
                        },
                    ));
                }
            }
        }
        let none = Remote::default();
        for p in self.meters.keys() {
            for q in (0..self.cfg.input_partitions).filter(|q| q != p) {
                let r = self.remote.get(&(*p, q)).unwrap_or(&none);
                let local = self.assigned.contains(&q);
                if local && r.pending.is_empty() {
                    continue;
                }
                out.push((
                    (*p, q),
                    QueueState {
                        head: r.pending.front().map(|x| Head {
                            key: x.key,
                            dest: Some(*p),
                        }),
                        bound: if local { None } else { r.bound.map(|b| (b, q)) },
                        // What this instance reads itself was forwarded
                        // before it took the partition: all of it is in the
                        // repartition partition, read to its end.
                        at_end: r.pending.is_empty() && (local || r.caught_up),
                        serves: Some(*p),
                    },
                ));
            }
        }
    }

    /// Applies the next forwarded record of `(meter, input partition)`.
    pub fn take_remote(&mut self, p: i32, q: i32) -> Result<(), EngineError> {
        let Some(x) = self.remote.get_mut(&(p, q)).and_then(|r| r.pending.pop_front()) else {
            return Ok(());
        };
        if let Some(set) = self.rp_pending.get_mut(&p) {
            set.remove(&x.msg.offset());
        }
        self.remote_dirty.insert(p);
        if !self.first_from(p, q, x.key.offset) {
            // Read here directly first (this instance holds `q` now).
            return Ok(());
        }
        self.process_parsed(&x.msg, x.parsed)
    }

    /// Meter `p` is about to apply the record at `offset` of input
    /// partition `q` (not its own): true the first time, false when it
    /// applied it already. Each partition's records reach a meter in offset
    /// order (their merge keys grow along the partition), by whichever
    /// route — forwarded, or read here — so an offset at or below the last
    /// one applied is a copy: the same record forwarded again after its
    /// forwarder restarted behind what it had read ahead, or forwarded
    /// before this instance took `q` and then read here again.
    pub(super) fn first_from(&mut self, p: i32, q: i32, offset: i64) -> bool {
        let r = self.remote.entry((p, q)).or_default();
        if offset <= r.applied_through {
            return false;
        }
        r.applied_through = offset;
        self.remote_dirty.insert(p);
        true
    }

    /// Where a record read ahead from input partition `msg.partition()`
    /// sorts in the merge order: `watermark` is the partition's watermark
    /// through the previous record read (`None` until the first read of the
    /// round, when it is the partition's own, through the last record
    /// applied), raised to include this one. The partition is restored
    /// first when it is waiting for it; a record of a failing one sorts
    /// first (it is not metered).
    pub fn read_key<M: Message>(
        &mut self,
        msg: &M,
        parsed: Option<&jobmeter_core::JobEvent>,
        watermark: &mut Option<Option<jobmeter_core::Timestamp>>,
    ) -> Result<MergeKey, EngineError> {
        let record_time = msg.timestamp().to_millis().map(jobmeter_core::Timestamp);
        let merge_time = parsed.and_then(|ev| jobmeter_core::order::merge_time(&self.cfg.meter, ev.time, record_time));
        let p = msg.partition();
        if !self.local(p)? {
            return Ok(MergeKey::FIRST);
        }
        let w = watermark.get_or_insert_with(|| self.meters.get(&p).and_then(|pm| pm.meter.input_watermark()));
        Ok(MergeKey::next(w, merge_time, p, msg.offset()))
    }

    /// Forwards at once, when it is read, an input record whose account's
    /// partition another instance holds (its order there is its owner's
    /// business), so that what this instance can tell others of the
    /// partition is how far it has read, not how far its own merge has
    /// got. Returns true when it did; the record is then taken by the merge
    /// with [`Engine::process_read`] like the others (its partition's
    /// offset, lane and watermark move in offset order).
    pub fn forward_ahead<M: Message>(
        &mut self,
        msg: &M,
        parsed: Option<&jobmeter_core::JobEvent>,
        key: MergeKey,
    ) -> Result<bool, EngineError> {
        let Some(ev) = parsed else { return Ok(false) };
        let p = msg.partition();
        let target = self.owner(ev);
        if target == p || self.assigned.contains(&target) || !self.local(p)? {
            return Ok(false);
        }
        self.note_rerouted(msg, ev, target);
        let watermark = (key.time != i64::MIN).then_some(jobmeter_core::Timestamp(key.time));
        self.forward(msg, ev, target, watermark);
        if self.batch_events == 0 {
            self.batch_started = std::time::Instant::now();
        }
        self.batch_events += 1;
        Ok(true)
    }

    /// True when a forwarded record of meter `p` in `[from, to)` is still
    /// waiting (a marker run must not cover it).
    pub(super) fn rp_waiting(&self, p: i32, from: i64, to: i64) -> bool {
        from < to
            && self
                .rp_pending
                .get(&p)
                .is_some_and(|s| s.range(from..to).next().is_some())
    }

    /// The repartition offset to commit for meter `p`: its oldest waiting
    /// record's, or the next to read.
    pub(super) fn rp_commit_offset(&self, p: i32) -> Option<i64> {
        self.rp_pending
            .get(&p)
            .and_then(|s| s.first().copied())
            .or_else(|| self.rp_read.get(&p).copied())
    }

    /// What the poll loop says of an input partition it reads: the
    /// smallest merge time its next record can have (its head's when one
    /// is fetched) and whether it has read all Kafka holds.
    pub fn set_source_state(&mut self, q: i32, bound: i64, caught_up: bool) {
        self.sources.insert(q, (bound, caught_up));
    }

    /// True when progress changed since it was last written and other
    /// partitions' meters are held elsewhere.
    pub(super) fn progress_due(&self) -> bool {
        self.sources != self.published
            && (0..self.cfg.input_partitions).any(|p| !self.assigned.contains(&p))
            && self.progress_at.elapsed() >= PROGRESS_EVERY
    }

    /// Adds to the open batch a progress record for every repartition
    /// partition of a meter held elsewhere, and the merge bookkeeping of
    /// every meter whose changed.
    pub(super) fn push_progress(&mut self) {
        let dirty: Vec<i32> = std::mem::take(&mut self.remote_dirty).into_iter().collect();
        for p in dirty {
            let v = self.encode_sources(p);
            if let Some(pm) = self.meters.get_mut(&p) {
                pm.meter.set_merge_sources(v);
            }
        }
        if self.sources == self.published {
            return;
        }
        let pr = Progress {
            sources: self
                .sources
                .iter()
                .filter(|(q, _)| self.assigned.contains(q))
                .map(|(q, (b, end))| (*q, *b, *end))
                .collect(),
        };
        let elsewhere: Vec<i32> = (0..self.cfg.input_partitions)
            .filter(|p| !self.assigned.contains(p))
            .collect();
        for p in elsewhere {
            self.push_progress_record(p, &pr);
        }
        self.published = self.sources.clone();
        self.progress_at = std::time::Instant::now();
    }

    /// Meter `p`'s knowledge of forwarded partitions, for its state:
    /// `q:applied_through:bound:end` per partition, spaces between.
    fn encode_sources(&self, p: i32) -> Vec<u8> {
        let parts: Vec<String> = self
            .remote
            .range((p, i32::MIN)..=(p, i32::MAX))
            .map(|((_, q), r)| {
                format!(
                    "{q}:{}:{}:{}",
                    r.applied_through,
                    r.bound.unwrap_or(i64::MIN),
                    u8::from(r.caught_up)
                )
            })
            .collect();
        parts.join(" ").into_bytes()
    }

    /// Loads meter `p`'s knowledge of forwarded partitions from its state.
    pub(super) fn load_sources(&mut self, p: i32, v: Option<&[u8]>) {
        let Some(s) = v.and_then(|v| std::str::from_utf8(v).ok()) else {
            return;
        };
        for part in s.split(' ').filter(|x| !x.is_empty()) {
            let f: Vec<&str> = part.split(':').collect();
            let [q, applied, bound, end] = f.as_slice() else {
                continue;
            };
            let (Ok(q), Ok(applied), Ok(bound)) = (q.parse::<i32>(), applied.parse::<i64>(), bound.parse::<i64>())
            else {
                continue;
            };
            let r = self.remote.entry((p, q)).or_default();
            r.applied_through = r.applied_through.max(applied);
            r.bound = (bound != i64::MIN).then_some(bound).max(r.bound);
            r.caught_up = *end == "1";
        }
    }

    /// Forgets meter `p`'s forwarded records and repartition position
    /// (revoked; or assigned again, read from its committed offset).
    pub(super) fn forget_remote(&mut self, p: i32) {
        self.remote.retain(|(m, _), _| *m != p);
        self.rp_pending.remove(&p);
        self.rp_read.remove(&p);
        self.rp_at_end.remove(&p);
    }

    /// Forwarded records waiting to be applied, over all meters.
    pub fn remote_waiting(&self) -> usize {
        self.rp_pending.values().map(std::collections::BTreeSet::len).sum()
    }
}
