//! The per-partition meter: a pure state machine. Input bytes in, output
//! events out; time comes only from the events (stream time).
//!
//! One [`Meter`] serves one input partition: an account's events all land in
//! one partition, so counters, thresholds and statements of an account are
//! owned by exactly one meter.

use crate::event::{parse_job_event, EventBody, EventKey, Invalid, JobEvent, JobStatus, RejectReason, StartInfo};
use crate::fasthash::{FastMap, FastSet};
use crate::money::Money;
use crate::output::{Origin, Output, Rejected};
use crate::plans::{AccountBook, PlanCatalog};
use crate::ratecard::RateCard;
use crate::rating::split;
use crate::state::{Billed, BilledPart, Counter, FiredKey, Job, JobKey, StartRec, StatementAcc, StopRec, UsageKey};
use crate::time::{Period, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// One charge to emit for a slice of a job.
#[derive(Debug)]
pub(crate) struct SliceCharge {
    pub(crate) charge_id: String,
    pub(crate) service_period: Period,
    pub(crate) from: Timestamp,
    pub(crate) to: Timestamp,
    pub(crate) ms: i64,
    pub(crate) seconds: rust_decimal::Decimal,
    pub(crate) status: crate::event::JobStatus,
    pub(crate) adjusts: Option<String>,
    /// True when this slice adds the job to its statement line's job count.
    pub(crate) new_job: bool,
    /// Event time reported on limit events this charge triggers.
    pub(crate) at: Timestamp,
}

/// Timeouts and retention, in milliseconds of event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterConfig {
    /// A running job with no heartbeat or stop for this long is closed as
    /// orphaned; a stop whose start is missing this long goes to the DLQ.
    pub orphan_timeout_ms: i64,
    /// A period closes when stream time passes its end plus this grace.
    pub period_grace_ms: i64,
    /// Longest job accepted.
    pub max_duration_ms: i64,
    /// How long a finished job (and its event ids) is remembered, so that
    /// late duplicates are still recognised.
    pub retention_ms: i64,
    /// An event whose `time` is more than this ahead of its record's
    /// timestamp is refused (`time_out_of_range`).
    pub max_clock_skew_ms: i64,
    /// An event whose `time` is more than this behind its record's
    /// timestamp is refused (`time_out_of_range`). Defaults to the
    /// retention: a duplicate older than that could not be recognised.
    pub max_event_age_ms: i64,
}

impl MeterConfig {
    /// True when an event `time` can be believed against its record's
    /// timestamp (the meter dead-letters it as `time_out_of_range`
    /// otherwise).
    pub fn plausible(&self, time: Timestamp, record: Timestamp) -> bool {
        implausible(self, time, record).is_none()
    }
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            orphan_timeout_ms: 10 * 60_000,
            period_grace_ms: 3_600_000,
            max_duration_ms: 7 * 86_400_000,
            retention_ms: 35 * 86_400_000,
            max_clock_skew_ms: 5 * 60_000,
            max_event_age_ms: 35 * 86_400_000,
        }
    }
}

/// Everything read-only the meter consults.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Prices.
    pub rates: &'a RateCard,
    /// Plan defaults.
    pub plans: &'a PlanCatalog,
    /// The accounts table.
    pub accounts: &'a AccountBook,
    /// Timeouts.
    pub config: &'a MeterConfig,
    /// The input partition this meter runs for and the partition count, or
    /// `None` for a meter over every account (a replay). Decides which pro
    /// accounts without usage this meter bills the monthly fee to.
    pub partition: Option<(i32, i32)>,
}

impl<'a> Context<'a> {
    /// The same context for the meter of input partition `p` of `n`.
    pub fn with_partition(self, p: i32, n: i32) -> Self {
        Context {
            partition: Some((p, n)),
            ..self
        }
    }

    /// True when this meter answers for `account`: Kafka's murmur2 of the
    /// account id gives this meter's partition (the streaming meter applies
    /// each event in that partition, wherever it arrived).
    pub fn owns(&self, account: &crate::money::AccountId) -> bool {
        self.partition
            .is_none_or(|(p, n)| crate::partition::partition_for_key(account.as_str().as_bytes(), n) == p)
    }

    /// Everything a meter consults, together.
    pub fn new(
        rates: &'a RateCard,
        plans: &'a PlanCatalog,
        accounts: &'a AccountBook,
        config: &'a MeterConfig,
    ) -> Self {
        Context {
            rates,
            plans,
            accounts,
            config,
            partition: None,
        }
    }
}

/// Counters of what the meter did, for metrics. Not persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Valid, first-seen events.
    pub events: u64,
    /// Events ignored because their (source, id) was already applied.
    pub duplicates: u64,
    /// Rejected inputs by reason (indexed like [`RejectReason::ALL`]).
    pub rejected: [u64; RejectReason::ALL.len()],
    /// Charges emitted (including adjustments).
    pub charges: u64,
    /// Adjustment charges emitted.
    pub adjustments: u64,
    /// Jobs closed as orphaned.
    pub orphans: u64,
    /// Charges billed in a later period than their usage.
    pub late_charges: u64,
    /// Limit events emitted.
    pub limit_events: u64,
    /// Statements emitted.
    pub statements: u64,
    /// Jobs not billed by policy (failed/cancelled).
    pub unbilled_jobs: u64,
    /// Sum of charge amounts by kind (indexed like [`crate::event::JobKind::ALL`]).
    pub amount_by_kind: [Money; 3],
}

/// Keys changed since the last [`Meter::take_changes`].
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub(crate) jobs: FastSet<JobKey>,
    pub(crate) usage: FastSet<UsageKey>,
    pub(crate) fired: Vec<FiredKey>,
    pub(crate) statements: FastSet<(Period, crate::money::AccountId)>,
    pub(crate) closed: Vec<crate::output::Statement>,
    pub(crate) meta: bool,
}

/// The state machine of one partition.
#[derive(Debug, Default)]
pub struct Meter {
    pub(crate) stream_time: Option<Timestamp>,
    /// The last period whose statements have been emitted, pro accounts
    /// without usage included (set at the first event).
    pub(crate) fees_through: Option<Period>,
    pub(crate) jobs: crate::jobs::JobTable,
    pub(crate) seen: FastSet<EventKey>,
    pub(crate) usage: FastMap<UsageKey, Counter>,
    pub(crate) fired: FastSet<FiredKey>,
    pub(crate) statements: BTreeMap<Period, BTreeMap<crate::money::AccountId, StatementAcc>>,
    pub(crate) timers: BTreeSet<(Timestamp, JobKey)>,
    pub(crate) expiry: BTreeSet<(Timestamp, JobKey)>,
    pub(crate) dirty: Option<Dirty>,
    pub(crate) stats: Stats,
    /// Jobs with a deadline (running, or a stop waiting for its start).
    pub(crate) open: usize,
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
    /// and outputs, a duplicate count, or a [`Output::Reject`].
    pub fn apply(&mut self, ctx: &Context<'_>, raw: &[u8], origin: Option<&Origin>, out: &mut Vec<Output>) {
        match parse_job_event(raw) {
            Ok(ev) => self.apply_event(ctx, ev, raw, origin, out),
            Err(inv) => self.reject(inv, raw.to_vec(), origin.cloned(), out),
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
    ) {
        if let Some(inv) = origin.and_then(|o| implausible(ctx.config, ev.time, o.record_time?)) {
            self.reject(inv, raw.to_vec(), origin.cloned(), out);
            return;
        }
        let jk: JobKey = (ev.account, ev.job);
        let processed = self.stream_time;
        // Starts and stops are deduplicated by their (source, id). Heartbeats
        // are idempotent by time instead: one that does not move its job's
        // last heartbeat forward changes nothing and is counted as a
        // duplicate. Their ids are not remembered — a long job sends
        // thousands.
        let heartbeat = matches!(ev.body, EventBody::Heartbeat);
        let slot = self.jobs.slot(&jk);
        let duplicate = if heartbeat {
            slot.and_then(|s| self.jobs.at(s))
                .is_some_and(|j| j.last_heartbeat.is_some_and(|h| h >= ev.time))
        } else {
            !self.seen.insert(ev.key)
        };
        if duplicate {
            self.stats.duplicates += 1;
            return;
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
        let accepted = match ev.body {
            EventBody::Started(info) => self.on_start(ctx, &jk, &mut job, ev.key, ev.time, info, raw, origin, now, out),
            EventBody::Heartbeat => {
                self.on_heartbeat(ctx, &jk, &mut job, ev.time, now, out);
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
                self.on_stop(ctx, &jk, &mut job, stop, raw, origin, now, out)
            }
        };
        self.put_job(ctx, jk, idx, job, old, now);
        if accepted && self.stream_time != Some(now) {
            self.stream_time = Some(now);
            self.mark_meta();
        }
        self.fire_due(ctx, processed, out);
    }

    /// Closes everything as if stream time had run to the end: orphans open
    /// jobs, dead-letters stops still missing their start, and emits the
    /// statements of every open period. Used at the end of a replay.
    pub fn flush(&mut self, ctx: &Context<'_>, out: &mut Vec<Output>) {
        let cap = self.stream_time.map(Timestamp::period);
        let processed = self.stream_time;
        self.stream_time = Some(Timestamp::MAX);
        self.mark_meta();
        self.fire_due_until(ctx, cap, processed, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_start(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        key: EventKey,
        time: Timestamp,
        info: StartInfo,
        raw: &[u8],
        origin: Option<&Origin>,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) -> bool {
        if let Some(first) = &job.start {
            self.reject_conflict(jk, "start", first.time, raw, origin, out);
            return false;
        }
        let rate = match ctx.rates.rate_at(time, info.kind, info.model.as_ref()) {
            Ok(r) => (r.per_second, r.version.to_owned()),
            Err(inv) => {
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                return false;
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
            self.pair(ctx, jk, job, stop, now, out);
        } else if job.last_heartbeat.is_some() {
            self.accrue(ctx, jk, job, now, out);
        }
        true
    }

    /// A start has met a stop that was waiting for it.
    fn pair(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        mut stop: StopRec,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) {
        let Some(start_time) = job.start.as_ref().map(|s| s.time) else {
            return;
        };
        if let Err(inv) = check_duration(ctx, start_time, stop.time) {
            let raw = stop.pending_raw.take().unwrap_or_default().into_bytes();
            // The stop is treated as if it never arrived: the job stays open.
            self.reject(inv, raw, stop.origin.take(), out);
            if job.last_heartbeat.is_some() {
                self.accrue(ctx, jk, job, now, out);
            }
            return;
        }
        stop.pending_raw = None;
        stop.origin = None;
        let (time, status) = (stop.time, stop.status);
        job.stop = Some(stop);
        self.charge(ctx, jk, job, time, status, false, now, out);
    }

    fn on_heartbeat(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        time: Timestamp,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) {
        // A charged job's heartbeats change nothing (a late stop of an
        // orphan is adjusted from its stop, not its heartbeats).
        if job.billed.is_some() || job.last_heartbeat.is_some_and(|h| h >= time) {
            return;
        }
        job.last_heartbeat = Some(time);
        if job.start.is_some() && job.stop.is_none() {
            self.accrue(ctx, jk, job, now, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_stop(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        mut stop: StopRec,
        raw: &[u8],
        origin: Option<&Origin>,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) -> bool {
        if let Some(first) = &job.stop {
            self.reject_conflict(jk, "stop", first.time, raw, origin, out);
            return false;
        }
        let Some(start_time) = job.start.as_ref().map(|s| s.time) else {
            stop.pending_raw = Some(String::from_utf8_lossy(raw).into_owned());
            stop.origin = origin.cloned();
            job.stop = Some(stop);
            return true;
        };
        if let Err(inv) = check_duration(ctx, start_time, stop.time) {
            self.reject(inv, raw.to_vec(), origin.cloned(), out);
            return false;
        }
        let (time, status) = (stop.time, stop.status);
        job.stop = Some(stop);
        match job.billed.as_ref().map(|b| b.orphan) {
            None => self.charge(ctx, jk, job, time, status, false, now, out),
            Some(true) => self.adjust(ctx, jk, job, time, status, now, out),
            Some(false) => {}
        }
        true
    }

    /// A deadline came due at stream time `at`.
    fn on_deadline(&mut self, ctx: &Context<'_>, jk: JobKey, at: Timestamp, out: &mut Vec<Output>) {
        let slot = self.jobs.slot(&jk);
        let (idx, mut job) = self.jobs.take(slot, &jk);
        let old = (deadline(&job, ctx.config.orphan_timeout_ms).is_some(), job.expires);
        if let Some(s) = job.start.as_ref().filter(|_| job.billed.is_none()) {
            let close = job.last_heartbeat.map_or(s.time, |h| h.max(s.time));
            self.stats.orphans += 1;
            self.charge(ctx, &jk, &mut job, close, JobStatus::Orphaned, true, at, out);
        } else if job.start.is_none() {
            if let Some(mut stop) = job.stop.take() {
                let raw = stop.pending_raw.take().unwrap_or_default().into_bytes();
                let detail = format!("no start for job {:?} within the orphan timeout", jk.1.as_str());
                self.reject(
                    Invalid::new(RejectReason::StopWithoutStart, detail),
                    raw,
                    stop.origin.take(),
                    out,
                );
            }
        }
        self.put_job(ctx, jk, idx, job, old, at);
    }

    /// Processes, in event-time order, every deadline and period close that
    /// stream time has passed.
    fn fire_due(&mut self, ctx: &Context<'_>, processed: Option<Timestamp>, out: &mut Vec<Output>) {
        self.fire_due_until(ctx, None, processed, out);
    }

    /// As [`Meter::fire_due`]; with a `cap`, months after it are not closed
    /// for the sake of accounts without usage (a flush would otherwise run
    /// on forever). Without one, stream time is the only bound: a month
    /// whose close time has passed is before stream time's month.
    ///
    /// `processed` is the stream time before the current event: every
    /// deadline and close before it has been handled. A deadline older than
    /// that (a late event's orphan timeout, already past on arrival) is
    /// handled as of `processed`, so it cannot bill into a month whose
    /// statement is already out.
    fn fire_due_until(
        &mut self,
        ctx: &Context<'_>,
        cap: Option<Period>,
        processed: Option<Timestamp>,
        out: &mut Vec<Output>,
    ) {
        let Some(st) = self.stream_time else { return };
        if self.fees_through.is_none() {
            // Months before this partition's first event are not billed to
            // accounts without usage from here.
            self.fees_through = Some(st.period().prev());
            self.mark_meta();
        }
        loop {
            let timer = self.timers.first().map(|(d, _)| *d).filter(|d| *d < st);
            let idle = self
                .fees_through
                .map(Period::next)
                .filter(|p| cap.is_none_or(|c| *p <= c));
            let close = self
                .statements
                .keys()
                .next()
                .copied()
                .into_iter()
                .chain(idle)
                .min()
                .map(|p| (p.end().plus_ms(ctx.config.period_grace_ms), p))
                .filter(|(t, _)| *t < st);
            let timer_first = match (timer, close) {
                (Some(d), Some((t, _))) => d <= t,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if timer_first {
                if let Some((d, jk)) = self.timers.pop_first() {
                    self.timer_due(ctx, jk, d, processed, out);
                }
            } else if let Some((t, p)) = close {
                self.close_period(ctx, p, t, out);
            } else {
                break;
            }
        }
        while let Some((e, _)) = self.expiry.first() {
            if *e >= st {
                break;
            }
            let Some((e, jk)) = self.expiry.pop_first() else { break };
            if self.jobs.get(&jk).is_some_and(|j| j.expires == Some(e)) {
                if let Some(job) = self.jobs.remove(&jk) {
                    for k in &job.keys {
                        self.seen.remove(k);
                    }
                }
                if let Some(d) = self.dirty.as_mut() {
                    d.jobs.insert(jk);
                }
            }
        }
    }

    /// A timer entry came due: fire it, or move it to the job's real
    /// deadline if heartbeats pushed that out (or drop it if stale).
    fn timer_due(
        &mut self,
        ctx: &Context<'_>,
        jk: JobKey,
        d: Timestamp,
        processed: Option<Timestamp>,
        out: &mut Vec<Output>,
    ) {
        let Some(job) = self.jobs.get_mut(&jk) else { return };
        if job.timer != Some(d) {
            return;
        }
        job.timer = None;
        match deadline(job, ctx.config.orphan_timeout_ms) {
            None => {}
            Some(actual) if actual > d => {
                job.timer = Some(actual);
                self.timers.insert((actual, jk));
            }
            Some(_) => {
                let at = processed.map_or(d, |p| p.max(d));
                self.on_deadline(ctx, jk, at, out)
            }
        }
    }

    /// Puts a job back, updating its timer and expiry entries. `old` is
    /// (had a deadline, expiry) from when it was taken.
    fn put_job(
        &mut self,
        ctx: &Context<'_>,
        jk: JobKey,
        idx: u32,
        mut job: Box<Job>,
        old: (bool, Option<Timestamp>),
        now: Timestamp,
    ) {
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
        self.jobs.put(idx, job);
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

    pub(crate) fn mark_meta(&mut self) {
        if let Some(d) = self.dirty.as_mut() {
            d.meta = true;
        }
    }

    /// True when `p` is closed at stream time `now`.
    pub(crate) fn is_closed(ctx: &Context<'_>, p: Period, now: Timestamp) -> bool {
        p.end().plus_ms(ctx.config.period_grace_ms) < now
    }

    /// Charges a job from its start to `end` (a stop, or the orphan close).
    #[allow(clippy::too_many_arguments)]
    fn charge(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        end: Timestamp,
        status: JobStatus,
        orphan: bool,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) {
        self.release_accrual(job);
        let Some(start) = job.start.clone() else { return };
        let mut parts = Vec::new();
        if billable(ctx, status) {
            let terms = ctx.accounts.terms_at(ctx.plans, &jk.0, start.time);
            for s in split(start.time, end, ctx.rates.policy.rounding) {
                if s.seconds.is_zero() {
                    continue;
                }
                let charge_id = format!("{}/{}/{}", jk.0, jk.1, s.period);
                let slice = SliceCharge {
                    charge_id: charge_id.clone(),
                    service_period: s.period,
                    from: s.from,
                    to: s.to,
                    ms: s.ms,
                    seconds: s.seconds,
                    status,
                    adjusts: None,
                    new_job: true,
                    at: end,
                };
                self.emit_charge(ctx, jk, &start, &terms, slice, now, out);
                parts.push(BilledPart {
                    service_period: s.period,
                    from: s.from,
                    to: s.to,
                    seconds: s.seconds,
                    charge_id,
                });
            }
        } else {
            self.stats.unbilled_jobs += 1;
        }
        job.billed = Some(Billed {
            orphan,
            parts,
            adjusted: false,
        });
    }

    /// A stop arrived for a job already charged as orphaned: charge the
    /// difference, period by period, against the orphan charge.
    #[allow(clippy::too_many_arguments)]
    fn adjust(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        end: Timestamp,
        status: JobStatus,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) {
        let (Some(start), Some(billed)) = (job.start.clone(), job.billed.as_mut()) else {
            return;
        };
        billed.adjusted = true;
        let old = billed.parts.clone();
        let full = if billable(ctx, status) {
            split(start.time, end, ctx.rates.policy.rounding)
        } else {
            Vec::new()
        };
        let periods: BTreeSet<Period> = full
            .iter()
            .map(|s| s.period)
            .chain(old.iter().map(|p| p.service_period))
            .collect();
        let first_id = old.first().map(|p| p.charge_id.clone());
        let terms = ctx.accounts.terms_at(ctx.plans, &jk.0, start.time);
        for p in periods {
            let f = full.iter().find(|s| s.period == p);
            let o = old.iter().find(|x| x.service_period == p);
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
            let slice = SliceCharge {
                charge_id: format!("{}/{}/{}/adj", jk.0, jk.1, p),
                service_period: p,
                from,
                to,
                ms,
                seconds: delta,
                status,
                adjusts: o.map(|x| x.charge_id.clone()).or_else(|| first_id.clone()),
                new_job: o.is_none(),
                at: end,
            };
            self.stats.adjustments += 1;
            self.emit_charge(ctx, jk, &start, &terms, slice, now, out);
        }
        // The job is now billed as its full run (read by the usage API).
        billed.parts = full
            .iter()
            .map(|s| BilledPart {
                service_period: s.period,
                from: s.from,
                to: s.to,
                seconds: s.seconds,
                charge_id: old.iter().find(|x| x.service_period == s.period).map_or_else(
                    || format!("{}/{}/{}/adj", jk.0, jk.1, s.period),
                    |x| x.charge_id.clone(),
                ),
            })
            .collect();
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
fn implausible(config: &MeterConfig, time: Timestamp, record: Timestamp) -> Option<Invalid> {
    let ahead = time.0.saturating_sub(record.0);
    if ahead > config.max_clock_skew_ms {
        return Some(Invalid::new(
            RejectReason::TimeOutOfRange,
            format!(
                "`time` {time} is {ahead} ms ahead of the record timestamp {record} (max_clock_skew {} ms)",
                config.max_clock_skew_ms
            ),
        ));
    }
    if -ahead > config.max_event_age_ms {
        return Some(Invalid::new(
            RejectReason::TimeOutOfRange,
            format!(
                "`time` {time} is {} ms behind the record timestamp {record} (max_event_age {} ms)",
                -ahead, config.max_event_age_ms
            ),
        ));
    }
    None
}

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
