//! The per-partition meter: a pure state machine. Input bytes in, output
//! events out; time comes only from the events (stream time).
//!
//! One [`Meter`] serves one input partition: an account's events all land in
//! one partition, so counters, thresholds and statements of an account are
//! owned by exactly one meter.

use crate::adjust::{rate_slices, RatedSlice};
pub use crate::context::{Context, MeterConfig, Placement, Share, Stats};
use crate::cycle::{split_periods, BillingPeriod};
use crate::event::{parse_job_event, EventBody, EventKey, Invalid, JobEvent, JobStatus, RejectReason, StartInfo};
use crate::fasthash::{FastMap, FastSet};
use crate::output::{Origin, Output, Rejected};
use crate::rating::SliceCharge;
use crate::state::{Billed, BilledPart, Counter, FiredKey, Job, JobKey, StartRec, StatementAcc, StopRec, UsageKey};
use crate::time::{Period, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// Why a meter could not apply an event: a fact it does not hold could not
/// be read. The meter's memory may be partly changed and the outputs of
/// the event partly written: drop both (and the batch being built) and
/// rebuild the meter from durable state. Bad input is never an error (it
/// is an [`Output::Reject`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// An account's records could not be read.
    #[error(transparent)]
    Lookup(#[from] crate::plans::LookupError),
    /// The job archive could not be read.
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
}

/// The event being applied, as every handler sees it: the context, the
/// stream time after the event, where outputs go, and the event's bytes
/// and origin (for a dead letter; empty for a timer).
pub(crate) struct Step<'s, 'c> {
    pub(crate) ctx: &'s Context<'c>,
    pub(crate) now: Timestamp,
    pub(crate) out: &'s mut Vec<Output>,
    pub(crate) raw: &'s [u8],
    pub(crate) origin: Option<&'s Origin>,
}

/// Keys changed since the last [`Meter::take_changes`].
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub(crate) jobs: FastSet<JobKey>,
    pub(crate) usage: FastSet<UsageKey>,
    pub(crate) fired: Vec<FiredKey>,
    pub(crate) statements: FastSet<(BillingPeriod, crate::money::AccountId)>,
    pub(crate) closed: Vec<crate::output::Statement>,
    pub(crate) meta: bool,
    pub(crate) adjustments: FastSet<(crate::money::AccountId, String)>,
}

/// The state machine of one partition.
#[derive(Debug, Default)]
pub struct Meter {
    pub(crate) stream_time: Option<Timestamp>,
    /// The last period whose statements have been emitted, pro accounts
    /// without usage included (set at the first event).
    pub(crate) fees_through: Option<Period>,
    /// The event-time watermark of the input partition of the same number
    /// (see [`crate::order`]); kept here so it commits with the partition.
    pub(crate) input_watermark: Option<Timestamp>,
    /// True once the partition's events are applied in the merge order of
    /// [`crate::order`] (set for good once events arrive elsewhere).
    pub(crate) merge_order: bool,
    /// The merge's bookkeeping of forwarded inputs (opaque here).
    pub(crate) merge_sources: Option<Vec<u8>>,
    /// The cadence schedule the partition was last billed by (JSON
    /// entries; `None` before any was recorded).
    pub(crate) billing_cycle: Option<Vec<u8>>,
    pub(crate) jobs: crate::jobs::JobTable,
    pub(crate) seen: FastSet<EventKey>,
    pub(crate) usage: FastMap<UsageKey, Counter>,
    pub(crate) fired: FastSet<FiredKey>,
    pub(crate) statements: BTreeMap<BillingPeriod, BTreeMap<crate::money::AccountId, StatementAcc>>,
    /// Pricing adjustments by account (§4b).
    pub(crate) adjustments: FastMap<crate::money::AccountId, crate::state::AccountAdjustments>,
    pub(crate) timers: BTreeSet<(Timestamp, JobKey)>,
    pub(crate) expiry: BTreeSet<(Timestamp, JobKey)>,
    pub(crate) dirty: Option<Dirty>,
    pub(crate) stats: Stats,
    /// Jobs with a deadline (running, or a stop waiting for its start).
    pub(crate) open: usize,
    /// Running jobs by account (derived from the jobs, never stored): what
    /// burn rates and `job.stop` commands are computed from.
    pub(crate) running: FastMap<crate::money::AccountId, crate::running::AccountRunning>,
    /// True once `running` reflects the job table (built at the first
    /// event after a restore, which has the plans it needs).
    pub(crate) running_built: bool,
    /// The format [`Meter::take_changes`] writes values in.
    pub(crate) format: crate::state::StateFormat,
    /// Where finished jobs go once durable (`None`: they stay in memory
    /// for their retention).
    pub(crate) archive: Option<Box<dyn crate::archive::JobArchive>>,
    pub(crate) cold: crate::archive::Cold,
}

/// When a job must be looked at again: its orphan deadline, or the deadline
/// of a stop still waiting for its start.
pub(crate) fn deadline(job: &Job, timeout_ms: i64) -> Option<Timestamp> {
    match (&job.start, &job.stop, &job.billed) {
        (Some(s), _, None) => {
            let last = job.last_heartbeat.map_or(s.time, |h| h.max(s.time));
            Some(last.plus_ms(timeout_ms))
        }
        (None, Some(stop), _) => Some(stop.time.plus_ms(timeout_ms)),
        _ => None,
    }
}

impl Meter {
    /// An empty meter.
    pub fn new() -> Self {
        Meter::default()
    }

    /// An empty meter that records which state keys change, for
    /// [`Meter::take_changes`].
    pub fn tracking_changes() -> Self {
        Meter {
            dirty: Some(Dirty::default()),
            ..Meter::default()
        }
    }

    /// The same meter writing state values in `format`.
    pub fn with_state_format(mut self, format: crate::state::StateFormat) -> Self {
        self.format = format;
        self
    }

    /// The partition's stream time: the largest valid event time seen.
    pub fn stream_time(&self) -> Option<Timestamp> {
        self.stream_time
    }

    /// What the meter has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Jobs started and not yet charged, plus stops waiting for their start.
    pub fn open_jobs(&self) -> usize {
        self.open
    }

    /// Jobs remembered (open, pending, and finished within retention).
    pub fn known_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Parses `raw` and applies it. Every input yields either state changes
    /// and outputs, a duplicate count, or a [`Output::Reject`]; an error
    /// only when a lookup fails (see [`ApplyError`]).
    pub fn apply(
        &mut self,
        ctx: &Context<'_>,
        raw: &[u8],
        origin: Option<&Origin>,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        match parse_job_event(raw) {
            Ok(ev) => self.apply_event(ctx, ev, raw, origin, out),
            Err(inv) => {
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                Ok(())
            }
        }
    }

    /// Applies an already parsed event (`raw` is kept for DLQ records).
    pub fn apply_event(
        &mut self,
        ctx: &Context<'_>,
        ev: JobEvent,
        raw: &[u8],
        origin: Option<&Origin>,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        if let Some(inv) = origin.and_then(|o| ctx.config.implausible(ev.time, o.record_time?)) {
            self.reject(inv, raw.to_vec(), origin.cloned(), out);
            return Ok(());
        }
        let jk: JobKey = (ev.account, ev.job);
        let processed = self.stream_time;
        let event_time = ev.time;
        // Starts and stops are deduplicated by their (source, id). Heartbeats
        // are idempotent by time instead: one that does not move its job's
        // last heartbeat forward changes nothing and is counted as a
        // duplicate. Their ids are not remembered — a long job sends
        // thousands.
        let heartbeat = matches!(ev.body, EventBody::Heartbeat);
        // A job let go to the archive is read back when an event may
        // change it: a heartbeat, or a start or stop that is no duplicate
        // (an archived job's ids are in the archive's index).
        let mut slot = self.jobs.slot(&jk);
        let duplicate = if heartbeat {
            if slot.is_none() {
                slot = self.fault_in(ctx.config.orphan_timeout_ms, &jk)?;
            }
            slot.and_then(|s| self.jobs.at(s))
                .is_some_and(|j| j.last_heartbeat.is_some_and(|h| h >= ev.time))
        } else if self.seen.contains(&ev.key) || self.archived_event(ev.key)? {
            true
        } else {
            if slot.is_none() {
                slot = self.fault_in(ctx.config.orphan_timeout_ms, &jk)?;
            }
            self.seen.insert(ev.key);
            false
        };
        if duplicate {
            self.stats.duplicates += 1;
            return Ok(());
        }
        self.stats.events += 1;
        // Stream time moves only for events that are accepted: a rejected
        // event (a conflict, an unknown model, an impossible duration) must
        // not orphan jobs or close periods with a time nobody vouches for.
        let now = self.stream_time.map_or(ev.time, |t| t.max(ev.time));
        let (idx, mut job) = self.jobs.take(slot, &jk);
        let old = (deadline(&job, ctx.config.orphan_timeout_ms).is_some(), job.expires);
        if !heartbeat {
            job.keys.push(ev.key);
        }
        let mut st = Step {
            ctx,
            now,
            out,
            raw,
            origin,
        };
        let accepted = match ev.body {
            EventBody::Started(info) => self.on_start(&mut st, &jk, &mut job, ev.key, ev.time, info)?,
            EventBody::Heartbeat => {
                self.on_heartbeat(ctx, &jk, &mut job, ev.time, now, st.out)?;
                true
            }
            EventBody::Stopped(status) => {
                let stop = StopRec {
                    key: ev.key,
                    time: ev.time,
                    status,
                    pending_raw: None,
                    origin: None,
                };
                self.on_stop(&mut st, &jk, &mut job, stop)?
            }
        };
        self.put_job(ctx, jk.clone(), idx, job, old, now)?;
        if accepted && self.stream_time != Some(now) {
            self.stream_time = Some(now);
            self.mark_meta();
        }
        if accepted {
            self.control_spend(ctx, &jk, event_time, now, out)?;
        }
        self.fire_due(ctx, processed, out)
    }

    /// Closes everything as if stream time had run to the end: orphans open
    /// jobs, dead-letters stops still missing their start, and emits the
    /// statements of every open period. Used at the end of a replay.
    pub fn flush(&mut self, ctx: &Context<'_>, out: &mut Vec<Output>) -> Result<(), ApplyError> {
        let cap = self.stream_time.map(Timestamp::period);
        let processed = self.stream_time;
        self.stream_time = Some(Timestamp::MAX);
        self.mark_meta();
        self.fire_due_until(ctx, cap, processed, out)
    }

    fn on_start(
        &mut self,
        st: &mut Step<'_, '_>,
        jk: &JobKey,
        job: &mut Job,
        key: EventKey,
        time: Timestamp,
        info: StartInfo,
    ) -> Result<bool, ApplyError> {
        let (ctx, now) = (st.ctx, st.now);
        if let Some(first) = &job.start {
            self.reject_conflict(jk, "start", first.time, st.raw, st.origin, st.out);
            return Ok(false);
        }
        let rate = match ctx.rates.rate_at(time, info.kind, info.model.as_ref()) {
            Ok(r) => (r.per_second, r.version.to_owned()),
            Err(inv) => {
                self.reject(inv, st.raw.to_vec(), st.origin.cloned(), st.out);
                return Ok(false);
            }
        };
        job.start = Some(StartRec {
            key,
            time,
            info,
            rate: rate.0,
            version: rate.1,
        });
        if let Some(stop) = job.stop.take() {
            self.pair(st, jk, job, stop)?;
        } else if job.last_heartbeat.is_some() {
            self.accrue(ctx, jk, job, now, st.out)?;
        }
        Ok(true)
    }

    /// A start has met a stop that was waiting for it.
    fn pair(&mut self, st: &mut Step<'_, '_>, jk: &JobKey, job: &mut Job, mut stop: StopRec) -> Result<(), ApplyError> {
        let (ctx, now) = (st.ctx, st.now);
        let Some(start_time) = job.start.as_ref().map(|s| s.time) else {
            return Ok(());
        };
        if let Err(inv) = check_duration(ctx, start_time, stop.time) {
            let raw = stop.pending_raw.take().unwrap_or_default().into_bytes();
            // The stop is treated as if it never arrived: the job stays open.
            self.reject(inv, raw, stop.origin.take(), st.out);
            if job.last_heartbeat.is_some() {
                self.accrue(ctx, jk, job, now, st.out)?;
            }
            return Ok(());
        }
        stop.pending_raw = None;
        stop.origin = None;
        let (time, status) = (stop.time, stop.status);
        job.stop = Some(stop);
        self.charge(st, jk, job, time, status, false)
    }

    fn on_heartbeat(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        time: Timestamp,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        // A charged job's heartbeats change nothing (a late stop of an
        // orphan is adjusted from its stop, not its heartbeats).
        if job.billed.is_some() || job.last_heartbeat.is_some_and(|h| h >= time) {
            return Ok(());
        }
        job.last_heartbeat = Some(time);
        if job.start.is_some() && job.stop.is_none() {
            self.accrue(ctx, jk, job, now, out)?;
        }
        Ok(())
    }

    fn on_stop(
        &mut self,
        st: &mut Step<'_, '_>,
        jk: &JobKey,
        job: &mut Job,
        mut stop: StopRec,
    ) -> Result<bool, ApplyError> {
        if let Some(first) = &job.stop {
            self.reject_conflict(jk, "stop", first.time, st.raw, st.origin, st.out);
            return Ok(false);
        }
        let Some(start_time) = job.start.as_ref().map(|s| s.time) else {
            stop.pending_raw = Some(String::from_utf8_lossy(st.raw).into_owned());
            stop.origin = st.origin.cloned();
            job.stop = Some(stop);
            return Ok(true);
        };
        if let Err(inv) = check_duration(st.ctx, start_time, stop.time) {
            self.reject(inv, st.raw.to_vec(), st.origin.cloned(), st.out);
            return Ok(false);
        }
        let (time, status) = (stop.time, stop.status);
        job.stop = Some(stop);
        match job.billed.as_ref().map(|b| b.orphan) {
            None => self.charge(st, jk, job, time, status, false)?,
            Some(true) => self.adjust(st, jk, job, time, status)?,
            Some(false) => {}
        }
        Ok(true)
    }

    /// Puts a job back, updating its timer and expiry entries. `old` is
    /// (had a deadline, expiry) from when it was taken.
    pub(crate) fn put_job(
        &mut self,
        ctx: &Context<'_>,
        jk: JobKey,
        idx: u32,
        mut job: Box<Job>,
        old: (bool, Option<Timestamp>),
        now: Timestamp,
    ) -> Result<(), ApplyError> {
        let new_deadline = deadline(&job, ctx.config.orphan_timeout_ms);
        match (old.0, new_deadline.is_some()) {
            (false, true) => self.open += 1,
            (true, false) => self.open -= 1,
            _ => {}
        }
        if let Some(d) = new_deadline {
            if job.timer.is_none_or(|t| d < t) {
                if let Some(t) = job.timer {
                    self.timers.remove(&(t, jk.clone()));
                }
                self.timers.insert((d, jk.clone()));
                job.timer = Some(d);
            }
        }
        // An inert job is forgotten `retention` after it became inert;
        // later events that change nothing do not extend that.
        job.expires = match new_deadline {
            Some(_) => None,
            None => job.expires.or(Some(now.plus_ms(ctx.config.retention_ms))),
        };
        if job.expires != old.1 {
            if let Some(e) = old.1 {
                self.expiry.remove(&(e, jk.clone()));
            }
            if let Some(e) = job.expires {
                self.expiry.insert((e, jk.clone()));
            }
        }
        if let Some(d) = self.dirty.as_mut() {
            d.jobs.insert(jk.clone());
        }
        let tracked = if !self.running_built || job.is_running() || self.running.contains_key(&jk.0) {
            self.track_running(ctx, &jk, &job)
        } else {
            Ok(())
        };
        // The job goes back even when its share could not be looked up.
        self.jobs.put(idx, job);
        Ok(tracked?)
    }

    /// A second, different start or stop: the first one wins.
    fn reject_conflict(
        &mut self,
        jk: &JobKey,
        what: &str,
        first: Timestamp,
        raw: &[u8],
        origin: Option<&Origin>,
        out: &mut Vec<Output>,
    ) {
        let detail = format!(
            "job {:?} already has a {what} (at {first}); this {what} has another id",
            jk.1.as_str()
        );
        self.reject(
            Invalid::new(RejectReason::Conflict, detail),
            raw.to_vec(),
            origin.cloned(),
            out,
        );
    }

    pub(crate) fn reject(&mut self, inv: Invalid, raw: Vec<u8>, origin: Option<Origin>, out: &mut Vec<Output>) {
        if let Some(i) = RejectReason::ALL.iter().position(|r| *r == inv.reason) {
            self.stats.rejected[i] += 1;
        }
        out.push(Output::Reject(Rejected {
            reason: inv.reason,
            detail: inv.detail,
            raw,
            origin,
        }));
    }

    /// The event-time watermark of this partition's input: the latest
    /// [`crate::order::merge_time`] among the input records read so far,
    /// wherever they were applied.
    pub fn input_watermark(&self) -> Option<Timestamp> {
        self.input_watermark
    }

    /// Raises the input watermark to `t` (a record of this partition's
    /// input was read); it commits with the partition's next changes.
    pub fn raise_input_watermark(&mut self, t: Timestamp) {
        if self.input_watermark.is_none_or(|w| w < t) {
            self.input_watermark = Some(t);
            self.mark_meta();
        }
    }

    /// Records that this partition's events are applied in the merge
    /// order from now on (durable with its next changes).
    pub fn set_merge_order(&mut self) {
        if !self.merge_order {
            self.merge_order = true;
            self.mark_meta();
        }
    }

    /// The merge's bookkeeping of the inputs forwarded to this partition,
    /// as last set (opaque to the core; it commits with the partition).
    pub fn merge_sources(&self) -> Option<&[u8]> {
        self.merge_sources.as_deref()
    }

    /// Replaces the merge's bookkeeping (durable with the next changes).
    pub fn set_merge_sources(&mut self, v: Vec<u8>) {
        if self.merge_sources.as_deref() != Some(&v) {
            self.merge_sources = Some(v);
            self.mark_meta();
        }
    }

    /// The cadence schedule the partition was last billed by, as stored
    /// (JSON entries).
    pub fn billed_schedule(&self) -> Option<&[u8]> {
        self.billing_cycle.as_deref()
    }

    /// Records the schedule the partition is billed by from now on
    /// (durable with the next changes). Check it first with
    /// [`Meter::schedule_conflicts`].
    pub fn set_billed_schedule(&mut self, schedule: &crate::cycle::CadenceSchedule) {
        let v = serde_json::to_vec(schedule).unwrap_or_default();
        self.set_billed_schedule_raw(v);
    }

    /// [`Meter::set_billed_schedule`] with the stored bytes (a rebuild
    /// keeps what the live meter recorded).
    pub fn set_billed_schedule_raw(&mut self, v: Vec<u8>) {
        if self.billing_cycle.as_deref() != Some(&v) {
            self.billing_cycle = Some(v);
            self.mark_meta();
        }
    }

    /// Why the configured cadence schedule (`ctx.plans.billing_cycle`)
    /// cannot bill this partition from its stored state: a change dated
    /// before its stream time (it would re-cut periods already billed —
    /// checked against the schedule the partition recorded, when it has
    /// one), or an open period of an account whose bounds it would move
    /// (its charges so far name the period). Empty when there is none.
    pub fn schedule_conflicts(&self, ctx: &Context<'_>) -> Result<Vec<String>, crate::plans::LookupError> {
        let schedule = &ctx.plans.billing_cycle;
        let mut out = Vec::new();
        let stored = self
            .billing_cycle
            .as_deref()
            .and_then(|v| serde_json::from_slice::<Vec<crate::cycle::CadenceEntry>>(v).ok())
            .and_then(|e| crate::cycle::CadenceSchedule::new(e).ok());
        if let (Some(old), Some(st)) = (stored, self.stream_time) {
            if let Some(d) = old.first_difference(schedule).filter(|d| *d < st) {
                out.push(format!(
                    "billing_cycle changes at {d}, before this partition's stream time {st}: it would re-cut billing periods already metered; date the change at or after {st}"
                ));
            }
        }
        for (p, accounts) in &self.statements {
            for a in accounts.keys() {
                let now = crate::cycle::period_at(&ctx.accounts.records_of(a)?, schedule, p.start);
                if now != *p {
                    out.push(format!(
                        "account {a}: open billing period {p} would become {now} under the configured billing_cycle, but its charges so far name {p}; date the change at the end of the period or later"
                    ));
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn mark_meta(&mut self) {
        if let Some(d) = self.dirty.as_mut() {
            d.meta = true;
        }
    }

    /// True when `p` is closed at stream time `now`.
    pub(crate) fn is_closed(ctx: &Context<'_>, p: BillingPeriod, now: Timestamp) -> bool {
        p.end.plus_ms(ctx.config.period_grace_ms) < now
    }

    /// Charges a job from its start to `end` (a stop, or the orphan close).
    pub(crate) fn charge(
        &mut self,
        st: &mut Step<'_, '_>,
        jk: &JobKey,
        job: &mut Job,
        end: Timestamp,
        status: JobStatus,
        orphan: bool,
    ) -> Result<(), ApplyError> {
        let ctx = st.ctx;
        let Some(start) = job.start.clone() else {
            self.release_accrual(job);
            return Ok(());
        };
        let billed_with = if billable(ctx, status) {
            let records = ctx.accounts.records_of(&jk.0)?;
            Some((crate::plans::terms_in(ctx.plans, &records, start.time), records))
        } else {
            None
        };
        self.release_accrual(job);
        let end = job.charged_until(end, ctx.config.stop_grace_ms);
        let mut parts = Vec::new();
        if let Some((terms, records)) = billed_with {
            let slices = self.rated_parts(ctx, &records, jk, &start, end);
            let mut periods_seen = BTreeSet::new();
            let mut charges = Vec::new();
            for s in slices {
                if s.seconds.is_zero() {
                    continue;
                }
                let first = periods_seen.insert(s.period);
                let charge_id = part_id(jk, &s, first);
                parts.push(BilledPart::of(&s, charge_id.clone()));
                let slice = SliceCharge {
                    charge_id,
                    part: s,
                    status,
                    adjusts: None,
                    new_job: first,
                    at: end,
                };
                charges.push(self.emit_charge(st, jk, &start, (&terms, &records), slice));
            }
            self.record_charges(st, jk, job, &start, (&terms, &records), charges);
        } else {
            self.stats.unbilled_jobs += 1;
        }
        job.billed = Some(Billed {
            orphan,
            parts,
            adjusted: false,
        });
        Ok(())
    }

    /// A stop arrived for a job already charged as orphaned: charge the
    /// difference, period by period, against the orphan charge.
    fn adjust(
        &mut self,
        st: &mut Step<'_, '_>,
        jk: &JobKey,
        job: &mut Job,
        end: Timestamp,
        status: JobStatus,
    ) -> Result<(), ApplyError> {
        let ctx = st.ctx;
        let end = job.charged_until(end, ctx.config.stop_grace_ms);
        let (Some(start), Some(billed)) = (job.start.clone(), job.billed.as_mut()) else {
            return Ok(());
        };
        let records = ctx.accounts.records_of(&jk.0)?;
        let terms = crate::plans::terms_in(ctx.plans, &records, start.time);
        billed.adjusted = true;
        let old = billed.parts.clone();
        let full = if billable(ctx, status) {
            self.rated_parts(ctx, &records, jk, &start, end)
        } else {
            Vec::new()
        };
        // Parts are matched by (period, start): the cuts before the orphan
        // close are the same in both runs.
        let keys: BTreeSet<(BillingPeriod, Timestamp)> = full
            .iter()
            .map(|s| (s.period, s.from))
            .chain(old.iter().map(|p| (p.service_period, p.from)))
            .collect();
        let first_id = old.first().map(|p| p.charge_id.clone());
        let overrides = self
            .adjustments
            .get(&jk.0)
            .map(|a| a.overrides.clone())
            .unwrap_or_default();
        let mut periods_seen = BTreeSet::new();
        let mut charges = Vec::new();
        for (p, part_from) in keys {
            let first = periods_seen.insert(p);
            let f = full.iter().find(|s| s.period == p && s.from == part_from);
            let o = old.iter().find(|x| x.service_period == p && x.from == part_from);
            let delta = f.map_or(rust_decimal::Decimal::ZERO, |s| s.seconds)
                - o.map_or(rust_decimal::Decimal::ZERO, |x| x.seconds);
            if delta.is_zero() {
                continue;
            }
            let (from, to) = match (f, o) {
                (Some(s), _) => (s.from, s.to),
                (None, Some(x)) => (x.from, x.to),
                (None, None) => continue,
            };
            let ms = f.map_or(0, |s| s.ms) - o.map_or(0, |x| x.to.0 - x.from.0);
            // The rate of the part: the override in force at its start.
            let (rate, adjustment_id) = match overrides.winner(start.info.kind, start.info.model.as_ref(), part_from) {
                Some((id, w)) => (w.price.rate(start.rate), Some(id.to_owned())),
                None => (start.rate, None),
            };
            let part = RatedSlice {
                period: p,
                from,
                to,
                ms,
                seconds: delta,
                rate,
                adjustment_id,
            };
            let slice = SliceCharge {
                charge_id: format!("{}/adj", part_id(jk, &part, first)),
                part,
                status,
                adjusts: o.map(|x| x.charge_id.clone()).or_else(|| first_id.clone()),
                new_job: first && !old.iter().any(|x| x.service_period == p),
                at: end,
            };
            self.stats.adjustments += 1;
            charges.push(self.emit_charge(st, jk, &start, (&terms, &records), slice));
        }
        // The job is now billed as its full run (read by the usage API).
        let mut periods_seen = BTreeSet::new();
        billed.parts = full
            .iter()
            .map(|s| {
                let first = periods_seen.insert(s.period);
                let charge_id = old
                    .iter()
                    .find(|x| x.service_period == s.period && x.from == s.from)
                    .map_or_else(|| format!("{}/adj", part_id(jk, s, first)), |x| x.charge_id.clone());
                BilledPart::of(s, charge_id)
            })
            .collect();
        self.record_charges(st, jk, job, &start, (&terms, &records), charges);
        Ok(())
    }
}

/// A part's charge id: `<account>/<job>/<period>` for the first part of
/// the job in a period (as always), `…@<part start>` for a later one (the
/// job crosses an override's edge inside the period).
pub(crate) fn part_id(jk: &JobKey, s: &RatedSlice, first_in_period: bool) -> String {
    if first_in_period {
        format!("{}/{}/{}", jk.0, jk.1, s.period)
    } else {
        format!("{}/{}/{}@{}", jk.0, jk.1, s.period, s.from)
    }
}

impl Meter {
    /// The rated parts of a job of `start` up to `end`: cut at its
    /// account's period boundaries and, where the account has price
    /// overrides, wherever the override in force changes.
    pub(crate) fn rated_parts(
        &self,
        ctx: &Context<'_>,
        records: &[crate::plans::AccountRecord],
        jk: &JobKey,
        start: &crate::state::StartRec,
        end: Timestamp,
    ) -> Vec<RatedSlice> {
        let adj = self.adjustments.get(&jk.0);
        rated_parts_with(ctx, records, adj.map(|a| &a.overrides), adj, start, end)
    }
}

/// [`Meter::rated_parts`] under the price overrides `overrides`, cut also
/// where a credit grant of `grants` stops covering the job (its expiry or
/// void), so that each part is covered or not as a whole.
pub(crate) fn rated_parts_with(
    ctx: &Context<'_>,
    records: &[crate::plans::AccountRecord],
    overrides: Option<&crate::adjust::Overrides>,
    grants: Option<&crate::state::AccountAdjustments>,
    start: &crate::state::StartRec,
    end: Timestamp,
) -> Vec<RatedSlice> {
    {
        let rounding = ctx.rates.policy.rounding;
        let schedule = &ctx.plans.billing_cycle;
        let usage = (start.info.kind, start.info.model.as_ref());
        let cuts = grants.map_or_else(Vec::new, |g| g.grant_edges(usage.0, usage.1, start.time, end));
        let none = crate::adjust::Overrides::default();
        match overrides.filter(|o| !o.is_empty()) {
            o if o.is_some() || !cuts.is_empty() => rate_slices(
                records,
                schedule,
                o.unwrap_or(&none),
                usage,
                start.rate,
                (start.time, end, &cuts),
                rounding,
            ),
            _ => split_periods(records, schedule, start.time, end, rounding)
                .into_iter()
                .map(|s| RatedSlice {
                    period: s.period,
                    from: s.from,
                    to: s.to,
                    ms: s.ms,
                    seconds: s.seconds,
                    rate: start.rate,
                    adjustment_id: None,
                })
                .collect(),
        }
    }
}

fn billable(ctx: &Context<'_>, status: JobStatus) -> bool {
    match status {
        JobStatus::Failed => ctx.rates.policy.bill_failed,
        JobStatus::Cancelled => ctx.rates.policy.bill_cancelled,
        JobStatus::Succeeded | JobStatus::Orphaned => true,
    }
}

/// Why an event `time` cannot be believed against its record's timestamp
/// (decided from the log alone, so replays agree), or `None`.
fn check_duration(ctx: &Context<'_>, start: Timestamp, stop: Timestamp) -> Result<(), Invalid> {
    let d = stop.0 - start.0;
    if d < 0 {
        Err(Invalid::new(
            RejectReason::NegativeDuration,
            format!("stop {stop} is {} ms before start {start}", -d),
        ))
    } else if d > ctx.config.max_duration_ms {
        Err(Invalid::new(
            RejectReason::DurationTooLong,
            format!("duration {d} ms exceeds the maximum {} ms", ctx.config.max_duration_ms),
        ))
    } else {
        Ok(())
    }
}
