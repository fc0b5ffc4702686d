//! The repartition topic: events that arrived on a partition that does not
//! meter their account, forwarded to the one that does, and the markers that
//! make the order in which a partition's meter applied its two inputs part
//! of the log.
//!
//! The meter of partition `p` reads two logs: input partition `p` (the
//! events of its own accounts, applied where they arrive; the others are
//! forwarded) and repartition partition `p` (events forwarded to it by every
//! partition). How the two interleave depends on timing, and the meter's
//! results depend on the order it applies events in (stream time, the order
//! charges consume caps). So whenever the meter applies a run of forwarded
//! events, it writes a [`Marker`] into its own repartition partition, in the
//! same transaction: "after the input records before offset `after_input`,
//! the forwarded records in `[from, to)` were applied". A [`Lane`] keeps
//! that bookkeeping live; a [`Replayer`] reads it back, so a rebuild applies
//! exactly the order the live meter did. A partition that never receives a
//! forwarded event writes no marker.

use rdkafka::message::{Header, Headers, OwnedHeaders};
use std::collections::{BTreeMap, VecDeque};

/// Header present (value `1`) on marker records.
pub const MARKER: &str = "jobmeter.marker";

/// Header of a forwarded record: the watermark of its input partition
/// through it (decimal milliseconds), the time part of its merge key
/// (`jobmeter_core::order`), which only its forwarder can compute.
pub const MERGE_TIME: &str = "jobmeter.merge_time";

/// Header present (value `1`) on progress records.
pub const PROGRESS: &str = "jobmeter.progress";

/// What an instance says, in every repartition partition it does not
/// meter, about the input partitions it reads: for each, the smallest
/// merge time a record it has not forwarded yet can have, and whether it
/// has read everything Kafka held (see `jobmeter_core::order`). Written in
/// the same transaction as the forwarded records before it, so an owner
/// that reads a progress record has read every record it speaks of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// `(input partition, bound in ms or i64::MIN, caught up)`.
    pub sources: Vec<(i32, i64, bool)>,
}

impl Progress {
    /// The record value: `partition:bound:end` per source (`end` `1` when
    /// caught up, `0` otherwise), separated by spaces.
    pub fn encode(&self) -> Vec<u8> {
        let parts: Vec<String> = self
            .sources
            .iter()
            .map(|(p, b, end)| format!("{p}:{b}:{}", u8::from(*end)))
            .collect();
        parts.join(" ").into_bytes()
    }

    /// Reads a progress record's value.
    pub fn decode(v: &[u8]) -> Option<Progress> {
        let s = std::str::from_utf8(v).ok()?;
        let mut sources = Vec::new();
        for part in s.split(' ').filter(|x| !x.is_empty()) {
            let mut f = part.split(':');
            let p = f.next()?.parse().ok()?;
            let b = f.next()?.parse().ok()?;
            let end = match f.next()? {
                "1" => true,
                "0" => false,
                _ => return None,
            };
            if f.next().is_some() {
                return None;
            }
            sources.push((p, b, end));
        }
        Some(Progress { sources })
    }

    /// The headers of a progress record.
    pub fn headers() -> OwnedHeaders {
        OwnedHeaders::new_with_capacity(1).insert(Header {
            key: PROGRESS,
            value: Some("1"),
        })
    }
}

/// True when a record with these headers is a progress record.
pub fn is_progress<H: Headers>(headers: Option<&H>) -> bool {
    headers.is_some_and(|h| h.iter().any(|x| x.key == PROGRESS))
}

/// Where a record applied by a partition's meter was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The partition's own input partition.
    Own,
    /// Its repartition partition (forwarded by another instance).
    Forwarded,
    /// Another input partition read by the same instance.
    Input(i32),
}

/// A run of records a meter applied one after another from one source:
/// every record of `source` in `[from, to)` that belongs to the meter's
/// partition (see the module docs), in offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Where the records were read.
    pub source: Source,
    /// First offset.
    pub from: i64,
    /// One past the last offset.
    pub to: i64,
}

/// The order in which one batch applied a partition's records, written
/// when the batch applied any record that was not its own input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The partition's own input records before this offset were applied
    /// before this batch (by earlier batches that needed no marker).
    pub own_next: i64,
    /// The batch's runs, in the order applied.
    pub runs: Vec<Run>,
}

impl Marker {
    /// The marker's record value: `own_next` then one `source:from:to` per
    /// run (`o` own input, `r` repartition, `i<n>` input partition n),
    /// separated by spaces.
    pub fn encode(&self) -> Vec<u8> {
        use std::fmt::Write;
        let mut s = self.own_next.to_string();
        for r in &self.runs {
            let _ = match r.source {
                Source::Own => write!(s, " o:{}:{}", r.from, r.to),
                Source::Forwarded => write!(s, " r:{}:{}", r.from, r.to),
                Source::Input(q) => write!(s, " i{q}:{}:{}", r.from, r.to),
            };
        }
        s.into_bytes()
    }

    /// Reads a marker's record value.
    pub fn decode(v: &[u8]) -> Option<Marker> {
        let s = std::str::from_utf8(v).ok()?;
        let mut parts = s.split(' ');
        let own_next = parts.next()?.parse().ok()?;
        let mut runs = Vec::new();
        for p in parts {
            let mut f = p.split(':');
            let source = match f.next()? {
                "o" => Source::Own,
                "r" => Source::Forwarded,
                x => Source::Input(x.strip_prefix('i')?.parse().ok()?),
            };
            let from: i64 = f.next()?.parse().ok()?;
            let to: i64 = f.next()?.parse().ok()?;
            if f.next().is_some() || from >= to {
                return None;
            }
            runs.push(Run { source, from, to });
        }
        (!runs.is_empty()).then_some(Marker { own_next, runs })
    }

    /// The headers of a marker record.
    pub fn headers() -> OwnedHeaders {
        OwnedHeaders::new_with_capacity(1).insert(Header {
            key: MARKER,
            value: Some("1"),
        })
    }
}

/// True when a record with these headers is a marker.
pub fn is_marker<H: Headers>(headers: Option<&H>) -> bool {
    headers.is_some_and(|h| h.iter().any(|x| x.key == MARKER))
}

/// The headers of a forwarded record: the original ones, then where it was
/// first read (the dead-letter headers' layout, so a reject of a forwarded
/// event names its original position) and its merge time, when its
/// partition has a watermark.
pub fn forward_headers<H: Headers>(
    original: Option<&H>,
    topic: &str,
    partition: i32,
    offset: i64,
    merge_time: Option<i64>,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(original.map_or(0, |o| o.count()) + 4);
    if let Some(o) = original {
        for x in o.iter() {
            if !x.key.starts_with("jobmeter.source.") && x.key != MARKER && x.key != MERGE_TIME {
                h = h.insert(x);
            }
        }
    }
    let h = crate::dlq::insert_source(h, topic, partition, offset);
    match merge_time {
        Some(t) => {
            let v = t.to_string();
            h.insert(Header {
                key: MERGE_TIME,
                value: Some(v.as_str()),
            })
        }
        None => h,
    }
}

/// A forwarded record's merge time, from its headers (`None`: forwarded
/// by a release that did not write it, or from a partition without a
/// watermark yet).
pub fn merge_time_of<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Option<i64> {
    headers
        .into_iter()
        .find(|(k, _)| *k == MERGE_TIME)
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
}

/// Where a forwarded record was first read, from its headers.
pub fn source_of<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Option<(String, i32, i64)> {
    let (mut t, mut p, mut o) = (None, None, None);
    for (k, v) in headers {
        let v = std::str::from_utf8(v).ok();
        match k {
            crate::dlq::SOURCE_TOPIC => t = v.map(str::to_owned),
            crate::dlq::SOURCE_PARTITION => p = v.and_then(|v| v.parse().ok()),
            crate::dlq::SOURCE_OFFSET => o = v.and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    Some((t?, p?, o?))
}

/// The live bookkeeping of one partition's meter: the runs of the open
/// batch, and where its own input stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// One past the last own input record read (applied here or not), or
    /// the committed position before the first.
    own_pos: i64,
    /// `own_pos` when the open batch began.
    batch_own_next: i64,
    runs: Vec<Run>,
    foreign: bool,
}

impl Lane {
    /// A lane whose own input resumes at `own_pos` (the committed position).
    pub fn new(own_pos: i64) -> Lane {
        Lane {
            own_pos,
            batch_own_next: own_pos,
            runs: Vec::new(),
            foreign: false,
        }
    }

    /// The meter applied the record of `source` at `offset`.
    pub fn applied(&mut self, source: Source, offset: i64) {
        self.applied_unless(source, offset, |_| false);
    }

    /// [`Lane::applied`] for records that may be applied out of offset
    /// order (forwarded records of several instances, each applied in the
    /// merge order): the last run grows to include `offset` only when
    /// `offset` is past its end and `pending(to)` says no record of the
    /// source in `[to, offset)` is still waiting to be applied; otherwise a
    /// new run begins.
    pub fn applied_unless(&mut self, source: Source, offset: i64, pending: impl FnOnce(i64) -> bool) {
        if source == Source::Own {
            self.own_pos = offset + 1;
        } else {
            self.foreign = true;
        }
        match self.runs.last_mut() {
            Some(r) if r.source == source && offset >= r.to && !pending(r.to) => r.to = offset + 1,
            _ => self.runs.push(Run {
                source,
                from: offset,
                to: offset + 1,
            }),
        }
    }

    /// Where the open batch's last run ends (`None` before the first).
    pub fn last_run_end(&self) -> Option<i64> {
        self.runs.last().map(|r| r.to)
    }

    /// An own input record that another partition's meter applies.
    pub fn passed_on(&mut self, offset: i64) {
        self.own_pos = offset + 1;
    }

    /// The batch commits: its marker when it applied anything but its own
    /// input (a batch of own input alone needs none).
    #[must_use]
    pub fn take_marker(&mut self) -> Option<Marker> {
        let runs = std::mem::take(&mut self.runs);
        let own_next = std::mem::replace(&mut self.batch_own_next, self.own_pos);
        std::mem::take(&mut self.foreign).then_some(Marker { own_next, runs })
    }
}

/// Tells the forwarded records of a repartition partition, read in offset
/// order, from the copies among them. A forwarder reads its input ahead of
/// the offset it commits; restarted, it forwards again what it had
/// forwarded beyond that offset, so a record of input partition `q` can
/// appear twice, the copy after the original. The owner skips a copy as
/// it reads it (it is never queued, so never waiting), and a marker's run
/// may therefore span it while its original still waits: a replay must
/// drop copies before the markers place anything, or it applies the copy
/// where the run is, ahead of the original's place.
#[derive(Debug, Default)]
pub struct Copies {
    last: BTreeMap<i32, i64>,
}

impl Copies {
    /// The next forwarded record read, from offset `offset` of input
    /// partition `partition`: true when it is not a copy of one read
    /// before (each partition's records are forwarded in offset order, so
    /// an offset at or below the last one read is a copy).
    pub fn first(&mut self, partition: i32, offset: i64) -> bool {
        let last = self.last.entry(partition).or_insert(i64::MIN);
        let fresh = offset > *last;
        *last = (*last).max(offset);
        fresh
    }
}

/// Replays one partition's records in the order its live meter applied
/// them: own input records are pushed in offset order with
/// [`Replayer::own`]; the other sources' records, loaded beforehand, are
/// handed out where the markers place them.
#[derive(Debug)]
pub struct Replayer<T> {
    markers: VecDeque<Marker>,
    /// Runs of the head marker already done, and whether it has begun.
    done: usize,
    begun: bool,
    foreign: BTreeMap<(Source, i64), T>,
    /// Own input records that apply here but no marker placed (there
    /// should be none).
    pub misplaced: usize,
}

impl<T> Replayer<T> {
    /// `markers` in log order; `foreign`: every non-own record that applies
    /// to this partition, by source and offset.
    pub fn new(markers: impl IntoIterator<Item = Marker>, foreign: BTreeMap<(Source, i64), T>) -> Replayer<T> {
        Replayer {
            markers: markers.into_iter().collect(),
            done: 0,
            begun: false,
            foreign,
            misplaced: 0,
        }
    }

    /// Per input partition, the offset ranges the markers' runs cover, in
    /// order (what a rebuild must load for [`Replayer::new`]).
    pub fn input_runs(markers: &[Marker]) -> BTreeMap<i32, Vec<(i64, i64)>> {
        let mut m: BTreeMap<i32, Vec<(i64, i64)>> = BTreeMap::new();
        for r in markers.iter().flat_map(|m| &m.runs) {
            if let Source::Input(q) = r.source {
                m.entry(q).or_default().push((r.from, r.to));
            }
        }
        for v in m.values_mut() {
            v.sort_unstable();
        }
        m
    }

    /// True when `offset` lies in one of `runs` (sorted, from
    /// [`Replayer::input_runs`]).
    pub fn in_runs(runs: &[(i64, i64)], offset: i64) -> bool {
        let i = runs.partition_point(|(from, _)| *from <= offset);
        i > 0 && offset < runs[i - 1].1
    }

    fn run_foreign(&mut self, r: Run, f: &mut impl FnMut(T)) {
        let keys: Vec<(Source, i64)> = self
            .foreign
            .range((r.source, r.from)..(r.source, r.to))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(t) = self.foreign.remove(&k) {
                f(t);
            }
        }
    }

    /// The own input record at `offset`, in offset order; `applies_here`
    /// says whether it belongs to this partition. Hands `f` every record
    /// the live meter applied before it, then the record itself.
    pub fn own(&mut self, offset: i64, rec: T, applies_here: bool, mut f: impl FnMut(T)) {
        while let Some(m) = self.markers.front() {
            if !self.begun {
                if offset < m.own_next {
                    break;
                }
                self.begun = true;
            }
            if let Some(r) = m.runs.get(self.done).copied() {
                if r.source == Source::Own {
                    if offset < r.from {
                        if applies_here {
                            self.misplaced += 1;
                        }
                        break;
                    }
                    if offset < r.to {
                        break;
                    }
                } else {
                    self.run_foreign(r, &mut f);
                }
                self.done += 1;
                continue;
            }
            self.markers.pop_front();
            self.done = 0;
            self.begun = false;
        }
        if applies_here {
            f(rec);
        }
    }

    /// After the last own input record: the remaining runs. Returns the
    /// foreign records no marker placed, in source and offset order (live,
    /// they were not applied: copies of records applied once already).
    pub fn finish(mut self, mut f: impl FnMut(T)) -> Vec<T> {
        while let Some(m) = self.markers.pop_front() {
            for r in m.runs.iter().skip(self.done) {
                if r.source != Source::Own {
                    self.run_foreign(*r, &mut f);
                }
            }
            self.done = 0;
        }
        self.foreign.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn markers_round_trip_and_refuse_garbage() {
        let m = Marker {
            own_next: 7,
            runs: vec![
                Run {
                    source: Source::Own,
                    from: 7,
                    to: 9,
                },
                Run {
                    source: Source::Input(3),
                    from: 100,
                    to: 140,
                },
                Run {
                    source: Source::Forwarded,
                    from: 0,
                    to: 2,
                },
            ],
        };
        assert_eq!(Marker::decode(&m.encode()), Some(m));
        for bad in [
            "",
            "5",
            "5 o:1",
            "5 o:1:2:3",
            "5 x:1:2",
            "5 i:1:2",
            "5 o:3:3",
            "a o:1:2",
            "5 o:1:2 ",
        ] {
            assert_eq!(Marker::decode(bad.as_bytes()), None, "{bad:?}");
        }
    }

    /// What one step of the live meter of partition 0 does.
    #[derive(Debug, Clone)]
    enum Step {
        /// Its own input's next record: applied here, or by another
        /// partition's meter.
        Own(bool),
        /// Input partition 1's or 2's next record: applied here
        /// (short-circuited) or not.
        Other(i32, bool),
        /// The next forwarded record.
        Forwarded,
        /// The batch commits.
        Commit,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<bool>().prop_map(Step::Own),
            3 => (1i32..3, any::<bool>()).prop_map(|(q, here)| Step::Other(q, here)),
            2 => Just(Step::Forwarded),
            1 => Just(Step::Commit),
        ]
    }

    proptest! {
        /// Whatever the interleaving of the sources, which records apply
        /// here and where batches end, the replay applies exactly the live
        /// order.
        #[test]
        fn replay_reproduces_the_live_order(steps in proptest::collection::vec(step(), 0..300), start in 0i64..5) {
            let mut lane = Lane::new(start);
            let mut next: BTreeMap<Source, i64> = BTreeMap::new();
            next.insert(Source::Own, start);
            let mut live: Vec<(Source, i64)> = Vec::new();
            let mut own: Vec<(i64, bool)> = Vec::new();
            let mut foreign: BTreeMap<(Source, i64), (Source, i64)> = BTreeMap::new();
            let mut markers: Vec<Marker> = Vec::new();
            for s in steps {
                match s {
                    Step::Own(here) => {
                        let o = *next.entry(Source::Own).or_default();
                        if here {
                            lane.applied(Source::Own, o);
                            live.push((Source::Own, o));
                        } else {
                            lane.passed_on(o);
                        }
                        own.push((o, here));
                        next.insert(Source::Own, o + 1);
                    }
                    Step::Other(q, here) => {
                        let src = Source::Input(q);
                        let o = *next.entry(src).or_default();
                        if here {
                            lane.applied(src, o);
                            live.push((src, o));
                            foreign.insert((src, o), (src, o));
                        }
                        next.insert(src, o + 1);
                    }
                    Step::Forwarded => {
                        let o = *next.entry(Source::Forwarded).or_default();
                        lane.applied(Source::Forwarded, o);
                        live.push((Source::Forwarded, o));
                        foreign.insert((Source::Forwarded, o), (Source::Forwarded, o));
                        // Markers share the repartition log's offsets.
                        next.insert(Source::Forwarded, o + 1);
                    }
                    Step::Commit => {
                        if let Some(m) = lane.take_marker() {
                            markers.push(m);
                            *next.entry(Source::Forwarded).or_default() += 1;
                        }
                    }
                }
            }
            markers.extend(lane.take_marker());
            let mut replay = Replayer::new(markers, foreign);
            let mut got = Vec::new();
            for (o, here) in own {
                replay.own(o, (Source::Own, o), here, |r| got.push(r));
            }
            prop_assert_eq!(replay.misplaced, 0);
            let left = replay.finish(|r| got.push(r));
            prop_assert!(left.is_empty());
            prop_assert_eq!(got, live);
        }
    }

    /// One step of partition 0's owner, fed by forwarders of input
    /// partitions 1 and 2 that may restart behind what they forwarded.
    #[derive(Debug, Clone)]
    enum Fwd {
        /// Forwarder `q` forwards its next record.
        Forward(i32),
        /// Forwarder `q` restarts `back` records behind: copies follow.
        Restart(i32, i64),
        /// The owner reads the repartition partition's next record.
        Read,
        /// The owner's merge takes the oldest waiting record of `q`.
        Take(i32),
        /// Its own input's next record: applied here or passed on.
        Own(bool),
        /// The batch commits (a marker when it applied forwarded records).
        Commit,
    }

    fn fwd_step() -> impl Strategy<Value = Fwd> {
        prop_oneof![
            3 => (1i32..3).prop_map(Fwd::Forward),
            1 => (1i32..3, 1i64..6).prop_map(|(q, b)| Fwd::Restart(q, b)),
            3 => Just(Fwd::Read),
            3 => (1i32..3).prop_map(Fwd::Take),
            2 => any::<bool>().prop_map(Fwd::Own),
            1 => Just(Fwd::Commit),
        ]
    }

    /// The owner of partition 0, as the engine keeps it: records queued by
    /// input partition, copies skipped as they are read, waiting records
    /// never covered by a run.
    #[derive(Default)]
    struct Owner {
        /// The repartition log: `Ok((q, source offset))` forwarded records,
        /// `Err(marker)` markers.
        rp: Vec<Result<(i32, i64), Marker>>,
        next_so: BTreeMap<i32, i64>,
        read: usize,
        waiting: BTreeMap<i32, VecDeque<(i64, i64)>>,
        queued: BTreeMap<i32, i64>,
        applied: BTreeMap<i32, i64>,
        next_own: i64,
        own: Vec<(i64, bool)>,
        /// What was applied, in order: `(0, offset)` own records,
        /// `(q, source offset)` forwarded ones.
        live: Vec<(i32, i64)>,
    }

    impl Owner {
        fn read_one(&mut self) {
            if let Some(Ok((q, so))) = self.rp.get(self.read).cloned() {
                let seen = self.applied.get(&q).copied().max(self.queued.get(&q).copied());
                if seen.is_none_or(|s| so > s) {
                    self.queued.insert(q, so);
                    self.waiting.entry(q).or_default().push_back((self.read as i64, so));
                }
            }
            self.read = (self.read + 1).min(self.rp.len());
        }

        fn take(&mut self, lane: &mut Lane, q: i32) {
            let Some((off, so)) = self.waiting.get_mut(&q).and_then(VecDeque::pop_front) else {
                return;
            };
            if self.applied.get(&q).is_some_and(|a| so <= *a) {
                return;
            }
            self.applied.insert(q, so);
            let waiting: Vec<i64> = self.waiting.values().flatten().map(|(o, _)| *o).collect();
            let blocked = lane
                .last_run_end()
                .is_some_and(|to| waiting.iter().any(|o| (to..off).contains(o)));
            lane.applied_unless(Source::Forwarded, off, |_| blocked);
            self.live.push((q, so));
        }
    }

    proptest! {
        /// Forwarders that restart behind what they forwarded write copies
        /// into the repartition partition, which the owner skips as it
        /// reads them while their originals may still wait: a replay that
        /// drops the copies in log order applies exactly the live order.
        #[test]
        fn replay_skips_copies_of_records_still_waiting(steps in proptest::collection::vec(fwd_step(), 0..300)) {
            let mut lane = Lane::new(0);
            let mut o = Owner::default();
            for s in steps {
                match s {
                    Fwd::Forward(q) => {
                        let so = o.next_so.entry(q).or_default();
                        o.rp.push(Ok((q, *so)));
                        *so += 1;
                    }
                    Fwd::Restart(q, back) => {
                        let so = o.next_so.entry(q).or_default();
                        *so = (*so - back).max(0);
                    }
                    Fwd::Read => o.read_one(),
                    Fwd::Take(q) => o.take(&mut lane, q),
                    Fwd::Own(here) => {
                        let off = o.next_own;
                        o.next_own += 1;
                        if here {
                            lane.applied(Source::Own, off);
                            o.live.push((0, off));
                        } else {
                            lane.passed_on(off);
                        }
                        o.own.push((off, here));
                    }
                    Fwd::Commit => {
                        if let Some(m) = lane.take_marker() {
                            o.rp.push(Err(m));
                        }
                    }
                }
            }
            // Everything read and taken, the last batch committed.
            while o.read < o.rp.len() {
                o.read_one();
            }
            for q in 1..3 {
                while o.waiting.get(&q).is_some_and(|w| !w.is_empty()) {
                    o.take(&mut lane, q);
                }
            }
            if let Some(m) = lane.take_marker() {
                o.rp.push(Err(m));
            }
            // The rebuild: markers and forwarded records in log order, the
            // copies dropped; as live, a record at or below the last one
            // applied from its partition is not applied again.
            let mut copies = Copies::default();
            let mut markers = Vec::new();
            let mut foreign = BTreeMap::new();
            for (off, e) in o.rp.iter().enumerate() {
                match e {
                    Ok((q, so)) => {
                        if copies.first(*q, *so) {
                            foreign.insert((Source::Forwarded, off as i64), (*q, *so));
                        }
                    }
                    Err(m) => markers.push(m.clone()),
                }
            }
            let mut replay = Replayer::new(markers, foreign);
            let mut got = Vec::new();
            let mut last: BTreeMap<i32, i64> = BTreeMap::new();
            let mut apply = |(q, so): (i32, i64)| {
                if q == 0 || last.get(&q).is_none_or(|l| so > *l) {
                    last.insert(q, so);
                    got.push((q, so));
                }
            };
            for (off, here) in o.own.clone() {
                replay.own(off, (0, off), here, &mut apply);
            }
            prop_assert_eq!(replay.misplaced, 0);
            let left = replay.finish(&mut apply);
            prop_assert!(left.is_empty(), "{:?}", left);
            prop_assert_eq!(got, o.live);
        }
    }

    /// The case the property found first, by hand: input partition 1's
    /// record 0 waits at repartition offset 0 while its copy (offset 2) is
    /// skipped and a run of partition 2's records spans it.
    #[test]
    fn a_run_spanning_a_copy_does_not_apply_it_early() {
        let mut lane = Lane::new(0);
        lane.applied(Source::Forwarded, 1);
        lane.applied_unless(Source::Forwarded, 3, |_| false);
        lane.applied_unless(Source::Forwarded, 0, |_| false);
        let marker = lane.take_marker().expect("a marker");
        assert_eq!(
            marker.encode(),
            b"0 r:1:4 r:0:1".to_vec(),
            "the copy at offset 2 lies inside the first run"
        );
        let log = [(1, 0), (2, 0), (1, 0), (2, 1)];
        let mut copies = Copies::default();
        let foreign: BTreeMap<(Source, i64), (i32, i64)> = log
            .iter()
            .enumerate()
            .filter(|(_, (q, so))| copies.first(*q, *so))
            .map(|(off, x)| ((Source::Forwarded, off as i64), *x))
            .collect();
        let mut got = Vec::new();
        let left = Replayer::new([marker], foreign).finish(|x| got.push(x));
        assert!(left.is_empty());
        assert_eq!(got, vec![(2, 0), (2, 1), (1, 0)]);
    }

    #[test]
    fn input_runs_cover_exactly_their_ranges() {
        let run = |q, from, to| Run {
            source: Source::Input(q),
            from,
            to,
        };
        let markers = vec![
            Marker {
                own_next: 0,
                runs: vec![run(1, 10, 12), run(2, 5, 6)],
            },
            Marker {
                own_next: 0,
                runs: vec![run(1, 3, 4)],
            },
        ];
        let runs = Replayer::<()>::input_runs(&markers);
        assert_eq!(runs[&1], vec![(3, 4), (10, 12)]);
        let covered: Vec<i64> = (0..15).filter(|o| Replayer::<()>::in_runs(&runs[&1], *o)).collect();
        assert_eq!(covered, vec![3, 10, 11]);
    }

    #[test]
    fn a_batch_of_own_input_alone_writes_no_marker() {
        let mut lane = Lane::new(10);
        lane.applied(Source::Own, 10);
        lane.passed_on(11);
        lane.applied(Source::Own, 12);
        assert_eq!(lane.take_marker(), None);
        lane.applied(Source::Input(2), 5);
        lane.applied(Source::Own, 13);
        assert_eq!(
            lane.take_marker(),
            Some(Marker {
                own_next: 13,
                runs: vec![
                    Run {
                        source: Source::Input(2),
                        from: 5,
                        to: 6
                    },
                    Run {
                        source: Source::Own,
                        from: 13,
                        to: 14
                    },
                ],
            })
        );
    }
}
