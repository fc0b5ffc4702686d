//! Applying pricing adjustments (§4b) to a partition's meter: each record
//! of the adjustments topic is checked ([`crate::adjust`]), deduplicated by
//! `adjustment_id` per account forever (the same content again is a
//! duplicate; other content under the same id is a conflict, dead-lettered)
//! and kept in the partition's state, where the charges of the account's
//! jobs find the price overrides in force.

use crate::adjust::{parse_adjustment, Adjustment, AdjustmentBody, Overrides, RatedSlice, MAX_OVERRIDES_PER_ACCOUNT};
use crate::context::Context;
use crate::event::{Invalid, JobStatus, RejectReason};
use crate::meter::{deadline, part_id, rated_parts_with, ApplyError, Meter, Step};
use crate::money::AccountId;
use crate::output::{Origin, Output};
use crate::rating::SliceCharge;
use crate::state::{AccountAdjustments, BilledPart, Job, JobKey, Refunded, StoredAdjustment};
use crate::time::Timestamp;

impl Meter {
    /// Applies one record of the adjustments topic. A record that cannot
    /// apply goes to `out` as a reject with its reason; nothing else is
    /// emitted yet (overrides rate the charges emitted after them).
    pub fn apply_adjustment(
        &mut self,
        ctx: &Context<'_>,
        raw: &[u8],
        origin: Option<&Origin>,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        let parsed = parse_adjustment(raw, ctx.rates)
            .and_then(|a| a.check_horizon(origin.and_then(|o| o.record_time)).map(|()| a));
        let a = match parsed {
            Ok(a) => a,
            Err(inv) => {
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                return Ok(());
            }
        };
        let admitted = admit(self.adjustments.entry(a.account_id.clone()).or_default(), &a);
        match admitted {
            Err(inv) => {
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                return Ok(());
            }
            Ok(false) => {
                self.stats.duplicates += 1;
                return Ok(());
            }
            Ok(true) => {}
        }
        if let AdjustmentBody::CreditVoid { voids } = &a.body {
            let at = self
                .stream_time
                .or(a.created_at)
                .or_else(|| origin.and_then(|o| o.record_time))
                .unwrap_or(Timestamp::MIN);
            let (account, grant) = (a.account_id.clone(), voids.clone());
            self.void_grant(&account, &grant, at);
            self.keep_adjustment(a);
            return Ok(());
        }
        if let AdjustmentBody::CreditGrant { expires_at, .. } = &a.body {
            let now = self.stream_time.or_else(|| origin.and_then(|o| o.record_time));
            if let (Some(e), Some(now)) = (expires_at, now) {
                if *e <= now {
                    let inv = Invalid::new(
                        RejectReason::InvalidValue,
                        format!("`expires_at` {e} is not after the grant's own time {now}: it would cover nothing"),
                    );
                    self.reject(inv, raw.to_vec(), origin.cloned(), out);
                    return Ok(());
                }
            }
            self.keep_adjustment(a);
            return Ok(());
        }
        if let AdjustmentBody::ManualCharge { amount, .. } = &a.body {
            let at = self
                .stream_time
                .or(a.created_at)
                .or_else(|| origin.and_then(|o| o.record_time));
            let Some(at) = at else {
                let inv = Invalid::new(
                    RejectReason::SchemaViolation,
                    "`created_at` is missing and nothing else says when to book the charge".to_owned(),
                );
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                return Ok(());
            };
            let amount = *amount;
            self.manual_charge(ctx, &a.account_id, &a.adjustment_id, amount, at, out)?;
            self.keep_adjustment(a);
            return Ok(());
        }
        if let AdjustmentBody::JobRefund { job_id, through_end } = &a.body {
            let jk: JobKey = (a.account_id.clone(), crate::money::JobId::from(job_id.as_str()));
            let st = self.step_now(ctx, out, raw, origin);
            if let Err(inv) = self.refund_job(st, &jk, &a.adjustment_id, *through_end)? {
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                return Ok(());
            }
            self.keep_adjustment(a);
            return Ok(());
        }
        let account = self.adjustments.entry(a.account_id.clone()).or_default();
        let before = account.overrides.clone();
        let mut changed = vec![a.adjustment_id.clone()];
        if let AdjustmentBody::OverrideEnd { ends, effective_until } = &a.body {
            // `admit` checked that it names a price override.
            if let Some(target) = account.by_id.get(ends).cloned() {
                account.put(
                    ends.clone(),
                    StoredAdjustment {
                        moved_until: Some(*effective_until),
                        ..target
                    },
                );
                changed.push(ends.clone());
            }
        }
        let (account_id, id) = (a.account_id.clone(), a.adjustment_id.clone());
        account.put(id.clone(), StoredAdjustment::new(a));
        if let Some(d) = self.dirty.as_mut() {
            for id in changed {
                d.adjustments.insert((account_id.clone(), id));
            }
        }
        let after = self
            .adjustments
            .get(&account_id)
            .map(|x| x.overrides.clone())
            .unwrap_or_default();
        if before != after {
            let st = self.step_now(ctx, out, raw, origin);
            self.rerate(st, &account_id, &before, &id)?;
        }
        Ok(())
    }

    /// A step applying `raw` at the meter's stream time.
    fn step_now<'s, 'c>(
        &self,
        ctx: &'s Context<'c>,
        out: &'s mut Vec<Output>,
        raw: &'s [u8],
        origin: Option<&'s Origin>,
    ) -> Step<'s, 'c> {
        Step {
            ctx,
            now: self.stream_time.unwrap_or(Timestamp::MIN),
            out,
            raw,
            origin,
        }
    }

    /// Keeps an applied adjustment in the account's state (its id is
    /// taken, forever).
    fn keep_adjustment(&mut self, a: Adjustment) {
        let (account_id, id) = (a.account_id.clone(), a.adjustment_id.clone());
        let mut stored = StoredAdjustment::new(a);
        if stored.grant().is_some() {
            stored.granted_at = self.stream_time.or(stored.adjustment.created_at);
        }
        self.adjustments
            .entry(account_id.clone())
            .or_default()
            .put(id.clone(), stored);
        if let Some(d) = self.dirty.as_mut() {
            d.adjustments.insert((account_id, id));
        }
    }

    /// Voids grant `grant` of `account` from `at` on: its unused remainder
    /// is gone (what it covered stays covered).
    fn void_grant(&mut self, account: &AccountId, grant: &str, at: Timestamp) {
        let Some(adj) = self.adjustments.get_mut(account) else {
            return;
        };
        if let Some(mut s) = adj.by_id.get(grant).cloned() {
            s.voided_at = Some(at);
            adj.put(grant.to_owned(), s);
            if let Some(d) = self.dirty.as_mut() {
                d.adjustments.insert((account.clone(), grant.to_owned()));
            }
        }
    }

    /// Refunds job `jk` (refund `cause`): every charge recorded for it is
    /// reversed exactly, and with `through_end` every later one too. The
    /// inner `Err` is why it cannot be refunded (nothing has changed then).
    fn refund_job(
        &mut self,
        mut st: Step<'_, '_>,
        jk: &JobKey,
        cause: &str,
        through_end: bool,
    ) -> Result<Result<(), Invalid>, ApplyError> {
        let ctx = st.ctx;
        let mut slot = self.jobs.slot(jk);
        if slot.is_none() {
            slot = self.fault_in(ctx.config.orphan_timeout_ms, jk)?;
        }
        let unknown = || {
            Invalid::new(
                RejectReason::UnknownJob,
                format!(
                    "`job_id` {:?} is no job of account {:?} that the meter remembers (never started, or forgotten after meter.retention)",
                    jk.1.as_str(),
                    jk.0.as_str()
                ),
            )
        };
        if slot.is_none() {
            return Ok(Err(unknown()));
        }
        let (idx, mut job) = self.jobs.take(slot, jk);
        let old = (deadline(&job, ctx.config.orphan_timeout_ms).is_some(), job.expires);
        let charged_before = job.charges.is_empty() && job.billed.as_ref().is_some_and(|b| !b.parts.is_empty());
        let verdict = match (&job.refunded, &job.start) {
            (Some(r), _) => Err(Invalid::new(
                RejectReason::InvalidValue,
                format!("job {:?} was refunded already, by {:?}", jk.1.as_str(), r.adjustment_id),
            )),
            (None, None) => Err(unknown()),
            _ if charged_before => Err(Invalid::new(
                RejectReason::InvalidValue,
                format!(
                    "job {:?} was charged by a release that did not record its charges: it cannot be reversed exactly (a manual credit note can)",
                    jk.1.as_str()
                ),
            )),
            _ if job.charges.is_empty() && !through_end => Err(Invalid::new(
                RejectReason::InvalidValue,
                format!(
                    "job {:?} has no charge yet; `through_end`: true refunds it when it is charged",
                    jk.1.as_str()
                ),
            )),
            (None, Some(start)) => Ok(start.clone()),
        };
        let verdict = match verdict {
            Ok(start) => {
                let records = ctx.accounts.records_of(&jk.0)?;
                let terms = crate::plans::terms_in(ctx.plans, &records, start.time);
                for c in job.charges.clone() {
                    self.emit_refund(&mut st, jk, &start, (&terms, &records), &c, cause);
                }
                job.refunded = Some(Refunded {
                    adjustment_id: cause.to_owned(),
                    through_end,
                });
                Ok(())
            }
            Err(inv) => Err(inv),
        };
        self.put_job(ctx, jk.clone(), idx, job, old, st.now)?;
        Ok(verdict)
    }

    /// Re-rates the usage of `account` already charged (the jobs the meter
    /// remembers, in memory or archived: `meter.retention`) after its price
    /// overrides changed from `before`: for each part of a job whose period,
    /// seconds or rate differ, a charge reverses the part as billed and
    /// another bills it as now rated, both naming `cause` and `adjusts` the
    /// part's charge. They are booked like any charge: in the part's period,
    /// or in the open period when that one has closed (a closed bill is
    /// final). Seconds net to zero on the statement lines; amounts, caps
    /// and credits see the difference.
    fn rerate(
        &mut self,
        mut st: Step<'_, '_>,
        account: &AccountId,
        before: &Overrides,
        cause: &str,
    ) -> Result<(), ApplyError> {
        let ctx = st.ctx;
        if self.stream_time.is_none() {
            return Ok(());
        }
        let mut jobs: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(jk, j)| jk.0 == *account && j.billed.as_ref().is_some_and(|b| !b.parts.is_empty()))
            .map(|(jk, _)| jk.clone())
            .collect();
        if let Some(archive) = self.archive.as_ref() {
            jobs.extend(archive.jobs_of(account)?);
        }
        jobs.sort();
        jobs.dedup();
        if jobs.is_empty() {
            return Ok(());
        }
        let records = ctx.accounts.records_of(account)?;
        for jk in jobs {
            let mut slot = self.jobs.slot(&jk);
            if slot.is_none() {
                slot = self.fault_in(ctx.config.orphan_timeout_ms, &jk)?;
            }
            if slot.is_none() {
                continue;
            }
            let (idx, mut job) = self.jobs.take(slot, &jk);
            let old = (deadline(&job, ctx.config.orphan_timeout_ms).is_some(), job.expires);
            self.rerate_job(&mut st, &records, &jk, &mut job, before, cause);
            let now = st.now;
            self.put_job(ctx, jk, idx, job, old, now)?;
        }
        Ok(())
    }

    fn rerate_job(
        &mut self,
        st: &mut Step<'_, '_>,
        records: &[crate::plans::AccountRecord],
        jk: &JobKey,
        job: &mut Job,
        before: &Overrides,
        cause: &str,
    ) {
        let ctx = st.ctx;
        if job.refunded.is_some() {
            // Refunded: what it was charged is given back whatever the price.
            return;
        }
        let (Some(start), Some(billed)) = (job.start.clone(), job.billed.as_mut()) else {
            return;
        };
        let Some(end) = billed.parts.last().map(|p| p.to) else {
            return;
        };
        let was = rated_parts_with(ctx, records, Some(before), self.adjustments.get(&jk.0), &start, end);
        let now_rated = self.rated_parts(ctx, records, jk, &start, end);
        let same = |a: &RatedSlice, b: &RatedSlice| {
            (a.period, a.from, a.seconds, a.rate) == (b.period, b.from, b.seconds, b.rate)
        };
        if was.len() == now_rated.len() && was.iter().zip(&now_rated).all(|(a, b)| same(a, b)) {
            return;
        }
        let terms = crate::plans::terms_in(ctx.plans, records, start.time);
        let charge_of = |p: &RatedSlice| {
            billed
                .parts
                .iter()
                .find(|b| b.service_period == p.period && b.from == p.from)
                .map(|b| b.charge_id.clone())
        };
        let first_id = billed.parts.first().map(|p| p.charge_id.clone());
        let mut emit: Vec<SliceCharge> = Vec::new();
        let mut parts = Vec::new();
        let mut periods_seen = std::collections::BTreeSet::new();
        for p in &was {
            if p.seconds.is_zero() || now_rated.iter().any(|n| same(n, p)) {
                continue;
            }
            let Some(id) = charge_of(p) else { continue };
            emit.push(SliceCharge {
                charge_id: format!("{id}/rerate/{cause}"),
                part: RatedSlice {
                    ms: -p.ms,
                    seconds: -p.seconds,
                    adjustment_id: Some(cause.to_owned()),
                    ..p.clone()
                },
                status: job.stop.as_ref().map_or(JobStatus::Orphaned, |s| s.status),
                adjusts: Some(id),
                new_job: false,
                at: st.now,
            });
        }
        for p in &now_rated {
            let first = periods_seen.insert(p.period);
            if p.seconds.is_zero() {
                continue;
            }
            if let Some(w) = was.iter().find(|w| same(w, p)) {
                if let Some(id) = charge_of(w) {
                    parts.push(BilledPart::of(p, id));
                    continue;
                }
            }
            let id = format!("{}/{cause}", part_id(jk, p, first));
            parts.push(BilledPart::of(p, id.clone()));
            emit.push(SliceCharge {
                charge_id: id,
                part: RatedSlice {
                    adjustment_id: Some(cause.to_owned()),
                    ..p.clone()
                },
                status: job.stop.as_ref().map_or(JobStatus::Orphaned, |s| s.status),
                adjusts: charge_of(p).or_else(|| first_id.clone()),
                new_job: false,
                at: st.now,
            });
        }
        billed.parts = parts;
        for slice in emit {
            self.stats.adjustments += 1;
            let c = self.emit_charge(st, jk, &start, (&terms, records), slice);
            job.charges.push(c);
        }
    }
}

/// Whether adjustment `a` applies to an account with `account`'s
/// adjustments: `Ok(true)` it does, `Ok(false)` it is a duplicate (the same
/// record again), `Err` why not (another record under its id, one price
/// override too many, an end naming no price override).
fn admit(account: &AccountAdjustments, a: &Adjustment) -> Result<bool, Invalid> {
    let is_override = |s: &StoredAdjustment| matches!(s.adjustment.body, AdjustmentBody::PriceOverride(_));
    let of = a.account_id.as_str();
    if let Some(seen) = account.by_id.get(&a.adjustment_id) {
        return if seen.adjustment == *a {
            Ok(false)
        } else {
            Err(Invalid::new(
                RejectReason::Conflict,
                format!(
                    "adjustment {:?} of account {of:?} was applied already with other content; ids are unique per account, forever",
                    a.adjustment_id
                ),
            ))
        };
    }
    match &a.body {
        AdjustmentBody::PriceOverride(_)
            if account.by_id.values().filter(|s| is_override(s)).count() >= MAX_OVERRIDES_PER_ACCOUNT =>
        {
            Err(Invalid::new(
                RejectReason::InvalidValue,
                format!(
                    "account {of:?} has {MAX_OVERRIDES_PER_ACCOUNT} price overrides already, the most one account may have (every charge of the account is rated against them)"
                ),
            ))
        }
        AdjustmentBody::CreditVoid { voids }
            if !account
                .by_id
                .get(voids)
                .is_some_and(|s| s.grant().is_some() && s.voided_at.is_none()) =>
        {
            Err(Invalid::new(
                RejectReason::InvalidValue,
                format!("`voids` {voids:?} names no credit grant of account {of:?} still in force"),
            ))
        }
        AdjustmentBody::OverrideEnd { ends, .. } if !account.by_id.get(ends).is_some_and(is_override) => Err(Invalid::new(
            RejectReason::InvalidValue,
            format!("`ends` {ends:?} names no price override of account {of:?}"),
        )),
        _ => Ok(true),
    }
}
