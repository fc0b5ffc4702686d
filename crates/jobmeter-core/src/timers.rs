//! Event-time timers of a meter: orphan deadlines and expiries, fired as
//! stream time passes them.

use crate::context::Context;
use crate::event::{Invalid, JobStatus, RejectReason};
use crate::meter::{deadline, ApplyError, Meter, Step};
use crate::output::Output;
use crate::state::JobKey;
use crate::time::{Period, Timestamp};

/// What closes next at stream time.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// The pro fees of a calendar month ([`Meter::idle_fees`]).
    Fees(Period),
    /// A billing period's statements.
    Period(crate::cycle::BillingPeriod),
}

impl Meter {
    /// A deadline came due at stream time `at`.
    fn on_deadline(
        &mut self,
        ctx: &Context<'_>,
        jk: JobKey,
        at: Timestamp,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        let slot = self.jobs.slot(&jk);
        let (idx, mut job) = self.jobs.take(slot, &jk);
        let old = (deadline(&job, ctx.config.orphan_timeout_ms).is_some(), job.expires);
        let mut closed_at = None;
        if let Some(s) = job.start.as_ref().filter(|_| job.billed.is_none()) {
            let close = job.last_heartbeat.map_or(s.time, |h| h.max(s.time));
            closed_at = Some(close);
            self.stats.orphans += 1;
            let mut st = Step {
                ctx,
                now: at,
                out,
                raw: &[],
                origin: None,
            };
            self.charge(&mut st, &jk, &mut job, close, JobStatus::Orphaned, true)?;
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
        self.put_job(ctx, jk.clone(), idx, job, old, at)?;
        // An orphan charge may use up a limit other jobs run against.
        if let Some(close) = closed_at {
            self.control_spend(ctx, &jk, close, at, out)?;
        }
        Ok(())
    }

    /// Processes, in event-time order, every deadline and period close that
    /// stream time has passed.
    pub(crate) fn fire_due(
        &mut self,
        ctx: &Context<'_>,
        processed: Option<Timestamp>,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        self.fire_due_until(ctx, None, processed, out)
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
    pub(crate) fn fire_due_until(
        &mut self,
        ctx: &Context<'_>,
        cap: Option<Period>,
        processed: Option<Timestamp>,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        let Some(st) = self.stream_time else {
            return Ok(());
        };
        if self.fees_through.is_none() {
            // Months before this partition's first event are not billed to
            // accounts without usage from here.
            self.fees_through = Some(st.period().prev());
            self.mark_meta();
        }
        loop {
            let timer = self.timers.first().map(|(d, _)| *d).filter(|d| *d < st);
            let grace = ctx.config.period_grace_ms;
            // The open period that ends first, and the month whose pro fees
            // are next: idle pro accounts join their last period of that
            // month before it closes (at the same instant, fees first).
            let period = self
                .statements
                .keys()
                .min_by_key(|p| (p.end, **p))
                .map(|p| (p.end.plus_ms(grace), Close::Period(*p)));
            let fees = self
                .fees_through
                .map(Period::next)
                .filter(|p| cap.is_none_or(|c| *p <= c))
                .map(|m| (m.end().plus_ms(grace), Close::Fees(m)));
            let close = [fees, period]
                .into_iter()
                .flatten()
                .min_by_key(|(t, c)| (*t, matches!(c, Close::Period(_))))
                .filter(|(t, _)| *t < st);
            let timer_first = match (timer, close) {
                (Some(d), Some((t, _))) => d <= t,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if timer_first {
                if let Some((d, jk)) = self.timers.pop_first() {
                    self.timer_due(ctx, jk, d, processed, out)?;
                }
            } else if let Some((_, c)) = close {
                match c {
                    Close::Fees(m) => self.idle_fees(ctx, m)?,
                    Close::Period(p) => self.close_period(ctx, p, out)?,
                }
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
                    self.forgotten(&jk, &job);
                }
                if let Some(d) = self.dirty.as_mut() {
                    d.jobs.insert(jk);
                }
            }
        }
        self.expire_archived(st)?;
        Ok(())
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
    ) -> Result<(), ApplyError> {
        let Some(job) = self.jobs.get_mut(&jk) else {
            return Ok(());
        };
        if job.timer != Some(d) {
            return Ok(());
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
                return self.on_deadline(ctx, jk, at, out);
            }
        }
        Ok(())
    }
}
