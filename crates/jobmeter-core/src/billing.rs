//! Plan effects: how a charge or an in-flight accrual consumes credits,
//! caps and quotas, what is due, which thresholds fire, and statements at
//! period close.
//!
//! Inclusion is one formula for every capped limit. With `used` the list
//! amount already charged against a cap `C` and a new amount `a`
//! (negative for a downward adjustment):
//!
//! ```text
//! included = clamp(used + a) − clamp(used),  clamp(x) = min(max(x, 0), C)
//! due      = a − included
//! ```
//!
//! so usage inside the cap is not due, the part beyond it is, and a
//! downward adjustment gives back the due part first.

use crate::context::Context;
use crate::cycle::{cadence_in_force, period_at, BillingPeriod, Cadence};
use crate::event::JobKind;
use crate::meter::{Meter, Step};
use crate::money::{AccountId, Money, CURRENCY};
use crate::output::{
    Charge, ChargeKind, LimitAction, LimitEvent, LimitKind, Output, Statement, StatementAdjustment, StatementCredit,
    StatementLine,
};
use crate::plans::{terms_in, AccountRecord, LookupError, Plan, PlanCatalog, PlanTerms, Policy};
use crate::rating::SliceCharge;
use crate::state::{
    Accrual, ChargeRef, Counter, Drawn, FiredKey, Job, JobKey, LineAcc, StartRec, StatementAcc, ThresholdId, UsageKey,
};
use crate::time::{Period, Timestamp};
use rust_decimal::{Decimal, RoundingStrategy};

/// A threshold of a limit.
#[derive(Debug)]
struct Threshold {
    id: ThresholdId,
    pct: Option<u32>,
    level: Money,
}

/// The thresholds of a limit, borrowed from the plan terms (computed on
/// demand: this runs for every heartbeat, so it allocates nothing).
#[derive(Debug)]
enum Thresholds<'a> {
    /// Percentages of a cap (none when the cap is zero).
    Pct(Money, &'a [u32]),
    /// Alert amounts.
    Amounts(&'a [Money]),
}

impl Thresholds<'_> {
    fn iter(&self) -> impl Iterator<Item = Threshold> + '_ {
        let (pcts, amounts): (&[u32], &[Money]) = match self {
            Thresholds::Pct(cap, p) if *cap > Money::ZERO => (p, &[]),
            Thresholds::Pct(..) => (&[], &[]),
            Thresholds::Amounts(a) => (&[], a),
        };
        let cap = match self {
            Thresholds::Pct(c, _) => *c,
            Thresholds::Amounts(_) => Money::ZERO,
        };
        pcts.iter()
            .map(move |p| Threshold {
                id: ThresholdId::Pct(*p),
                pct: Some(*p),
                level: cap.percent(*p),
            })
            .chain(amounts.iter().filter(|a| **a > Money::ZERO).map(|a| Threshold {
                id: ThresholdId::Amount(*a),
                pct: None,
                level: *a,
            }))
    }
}

/// The limit a job's usage counts toward, for one period.
#[derive(Debug)]
pub(crate) struct LimitSpec<'a> {
    pub(crate) key: UsageKey,
    /// Usage up to this amount is included (not due); `None` for alerts
    /// and spend limits.
    pub(crate) cap: Option<Money>,
    /// The value reported as `limit_value` for percentage thresholds.
    pub(crate) limit_value: Money,
    thresholds: Thresholds<'a>,
    pub(crate) plan: Plan,
}

/// An account's own monthly spend limit, when its terms set one: a
/// counter of the amount due for the period's usage (charges' `amount_due`,
/// plus running jobs' in-flight usage beyond what their plan includes).
/// It includes nothing: it never changes what is due.
pub(crate) fn spend_spec<'a>(
    plans: &'a PlanCatalog,
    terms: &PlanTerms,
    account: &AccountId,
    period: Period,
) -> Option<LimitSpec<'a>> {
    let limit = terms.spend_limit?;
    Some(LimitSpec {
        key: UsageKey {
            account: account.clone(),
            limit: LimitKind::SpendLimit,
            period: Some(period),
        },
        cap: None,
        limit_value: limit,
        thresholds: Thresholds::Pct(limit, &plans.spend_limit_thresholds_pct),
        plan: terms.plan,
    })
}

pub(crate) fn limit_spec<'a>(
    plans: &'a PlanCatalog,
    terms: &'a PlanTerms,
    kind: JobKind,
    account: &AccountId,
    period: Period,
) -> Option<LimitSpec<'a>> {
    let pct = |cap: Money, pcts: &'a [u32]| Thresholds::Pct(cap, pcts);
    let (limit, scope, cap, thresholds) = match (terms.plan, kind) {
        (Plan::Free, _) => (
            LimitKind::FreeCredits,
            None,
            Some(terms.free_credits),
            pct(terms.free_credits, &plans.free_thresholds_pct),
        ),
        (Plan::Pro, JobKind::Inference) => (
            LimitKind::ModelApiCap,
            Some(period),
            Some(terms.usage_cap),
            pct(terms.usage_cap, &plans.pro_thresholds_pct),
        ),
        (Plan::Pro, JobKind::WorkflowStep) => (
            LimitKind::WorkflowQuota,
            Some(period),
            Some(terms.workflow_quota),
            pct(terms.workflow_quota, &plans.pro_thresholds_pct),
        ),
        (Plan::Enterprise, _) if !terms.alert_thresholds.is_empty() => (
            LimitKind::Alert,
            Some(period),
            None,
            Thresholds::Amounts(&terms.alert_thresholds),
        ),
        _ => return None,
    };
    Some(LimitSpec {
        key: UsageKey {
            account: account.clone(),
            limit,
            period: scope,
        },
        limit_value: cap.unwrap_or(Money::ZERO),
        cap,
        thresholds,
        plan: terms.plan,
    })
}

/// A statement line from its accumulator: the average duration is
/// billable seconds per job, to the millisecond, half-even.
pub(crate) fn statement_line(kind: JobKind, model: Option<&crate::money::ModelId>, l: &LineAcc) -> StatementLine {
    let average_duration_seconds = if l.jobs == 0 {
        Decimal::ZERO
    } else {
        let mut avg =
            (l.seconds / Decimal::from(l.jobs)).round_dp_with_strategy(3, RoundingStrategy::MidpointNearestEven);
        avg.rescale(3);
        avg
    };
    StatementLine {
        kind,
        model: model.cloned(),
        jobs: l.jobs,
        billable_seconds: l.seconds,
        average_duration_seconds,
        amount: l.amount,
    }
}

/// A limit an account's usage counts toward in a period, as the usage API
/// shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitInfo {
    /// The counter.
    pub(crate) key: UsageKey,
    /// The plan that sets it.
    pub(crate) plan: Plan,
    /// The job kinds whose usage counts toward it.
    pub(crate) kinds: Vec<JobKind>,
    /// Usage up to this amount is included (`None` for alert thresholds).
    pub(crate) cap: Option<Money>,
    /// Thresholds, each with the usage level at which it fires.
    pub(crate) thresholds: Vec<(ThresholdId, Money)>,
}

/// The limits that govern `account` under `terms` for `period`, the same
/// ones the meter counts charges against (one per counter).
pub(crate) fn limits_for(
    plans: &PlanCatalog,
    terms: &PlanTerms,
    account: &AccountId,
    period: Period,
) -> Vec<LimitInfo> {
    let mut out: Vec<LimitInfo> = Vec::new();
    for kind in JobKind::ALL {
        let Some(spec) = limit_spec(plans, terms, kind, account, period) else {
            continue;
        };
        if let Some(l) = out.iter_mut().find(|l| l.key == spec.key) {
            l.kinds.push(kind);
            continue;
        }
        out.push(LimitInfo {
            thresholds: spec.thresholds.iter().map(|t| (t.id, t.level)).collect(),
            key: spec.key,
            plan: spec.plan,
            kinds: vec![kind],
            cap: spec.cap,
        });
    }
    if let Some(spec) = spend_spec(plans, terms, account, period) {
        out.push(LimitInfo {
            thresholds: spec.thresholds.iter().map(|t| (t.id, t.level)).collect(),
            key: spec.key,
            plan: spec.plan,
            kinds: JobKind::ALL.to_vec(),
            cap: Some(spec.limit_value),
        });
    }
    out
}

fn clamp(x: Money, cap: Money) -> Money {
    x.max(Money::ZERO).min(cap)
}

/// The part of a new `amount` that is due, given the list amount `used`
/// already charged against the limit and its cap (`None`: no cap, all
/// due). The formula of the module documentation.
pub(crate) fn due_part(used: Money, amount: Money, cap: Option<Money>) -> Money {
    match cap {
        Some(cap) => amount - (clamp(used + amount, cap) - clamp(used, cap)),
        None => amount,
    }
}

/// The billing period a charge is billed in: its service period, or the
/// account's open one (the period holding stream time `now`) when the
/// service period has closed (a late charge, `true`; rule 11).
pub(crate) fn billing_period(
    ctx: &Context<'_>,
    records: &[AccountRecord],
    service: BillingPeriod,
    now: Timestamp,
) -> (BillingPeriod, bool) {
    if Meter::is_closed(ctx, service, now) {
        (period_at(records, &ctx.plans.billing_cycle, now), true)
    } else {
        (service, false)
    }
}

/// The calendar month whose limits usage at `t` counts toward, metered at
/// stream time `now`: that of the period it is billed in.
pub(crate) fn limit_month(ctx: &Context<'_>, records: &[AccountRecord], t: Timestamp, now: Timestamp) -> Period {
    // A period lies inside its calendar month: while stream time is still
    // in `t`'s month, the usage is billed in a period of that month —
    // `t`'s own, or, if that closed, the one holding stream time (the path
    // of almost every heartbeat, with no period to compute).
    let month = t.period();
    if t <= now && now < month.end() {
        return month;
    }
    let service = period_at(records, &ctx.plans.billing_cycle, t);
    billing_period(ctx, records, service, now).0.limit_month()
}

/// What a threshold event asks of the platform: free credits used up
/// block; a pro cap or quota reached suggests enterprise; a spend limit
/// reached blocks where its policy stops jobs; anything else notifies.
pub(crate) fn limit_action(limit: LimitKind, pct: Option<u32>, policy: Policy) -> LimitAction {
    match (limit, pct) {
        (LimitKind::FreeCredits, Some(p)) if p >= 100 => LimitAction::Block,
        (LimitKind::ModelApiCap | LimitKind::WorkflowQuota, Some(p)) if p >= 100 => LimitAction::UpgradeToEnterprise,
        (LimitKind::SpendLimit, Some(p)) if p >= 100 && policy == Policy::Stop => LimitAction::Block,
        _ => LimitAction::Notify,
    }
}

/// Where the included (not due) part of a charge shows on the statement:
/// `(credits_applied, included_usage)`.
pub(crate) fn included_as(plan: Plan, included: Money) -> (Money, Money) {
    match plan {
        Plan::Free => (included, Money::ZERO),
        Plan::Pro => (Money::ZERO, included),
        Plan::Enterprise | Plan::Payg => (Money::ZERO, Money::ZERO),
    }
}

impl Meter {
    fn counter(&mut self, key: &UsageKey) -> &mut Counter {
        if let Some(d) = self.dirty.as_mut() {
            d.usage.insert(key.clone());
        }
        self.usage.entry(key.clone()).or_default()
    }

    /// Fires every threshold of `spec` the counter has reached, once ever.
    fn check_thresholds(
        &mut self,
        plans: &PlanCatalog,
        spec: &LimitSpec<'_>,
        period: Period,
        job: &JobKey,
        at: Timestamp,
        out: &mut Vec<Output>,
    ) {
        let value = self.usage.get(&spec.key).map_or(Money::ZERO, Counter::total);
        if value <= Money::ZERO {
            return;
        }
        for t in spec.thresholds.iter() {
            if value < t.level {
                continue;
            }
            let fired = FiredKey {
                usage: spec.key.clone(),
                threshold: t.id,
            };
            if self.fired.contains(&fired) {
                continue;
            }
            let action = limit_action(spec.key.limit, t.pct, plans.policy(spec.plan, spec.key.limit));
            out.push(Output::Limit(LimitEvent {
                event_id: fired.event_id(),
                account_id: spec.key.account.clone(),
                plan: spec.plan,
                period,
                limit: spec.key.limit,
                threshold_pct: t.pct,
                limit_value: if t.pct.is_some() { spec.limit_value } else { t.level },
                usage_value: value,
                unit: CURRENCY.to_owned(),
                triggered_by_job: job.1.clone(),
                at,
                action,
                horizon_seconds: None,
                runway_seconds: None,
                burn_rate_per_second: None,
            }));
            self.stats.limit_events += 1;
            if let Some(d) = self.dirty.as_mut() {
                d.fired.push(fired.clone());
            }
            self.fired.insert(fired);
        }
    }

    /// Removes a job's in-flight accrual from its counter (the charge replaces it).
    pub(crate) fn release_accrual(&mut self, job: &mut Job) {
        if let Some(a) = job.accrual.take() {
            self.counter(&a.counter).inflight -= a.amount;
        }
        if let Some(a) = job.spend.take() {
            self.counter(&a.counter).inflight -= a.amount;
        }
    }

    /// Counts a running job's seconds so far (to its latest heartbeat, at
    /// list price, in the heartbeat's period) toward its limit, and the
    /// part of them beyond what the plan includes toward the account's
    /// spend limit. A job sent a stop counts only to where it is charged to.
    pub(crate) fn accrue(
        &mut self,
        ctx: &Context<'_>,
        jk: &JobKey,
        job: &mut Job,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) -> Result<(), LookupError> {
        let (Some(start), Some(hb)) = (job.start.as_ref(), job.last_heartbeat) else {
            return Ok(());
        };
        let hb = job.charged_until(hb, ctx.config.stop_grace_ms);
        if hb < start.time {
            return Ok(());
        }
        let records = ctx.accounts.records_of(&jk.0)?;
        let terms = terms_in(ctx.plans, &records, start.time);
        let period = limit_month(ctx, &records, hb, now);
        let spec = limit_spec(ctx.plans, &terms, start.info.kind, &jk.0, period);
        let spend = spend_spec(ctx.plans, &terms, &jk.0, period);
        if spec.is_none() && spend.is_none() {
            return Ok(());
        }
        // At list price, or at the price overrides in force over the run.
        let amount = if self.adjustments.get(&jk.0).is_some_and(|a| !a.overrides.is_empty()) {
            self.rated_parts(ctx, &records, jk, start, hb)
                .iter()
                .fold(Money::ZERO, |sum, p| sum + p.rate * p.seconds)
        } else {
            start.rate * ctx.rates.policy.rounding.total_seconds(hb.0 - start.time.0)
        };
        self.release_accrual(job);
        let mut due = amount;
        if let Some(spec) = &spec {
            let counter = self.counter(&spec.key);
            due = due_part(counter.total(), amount, spec.cap);
            counter.inflight += amount;
            job.accrual = Some(Accrual {
                counter: spec.key.clone(),
                amount,
            });
        }
        if let Some(spend) = &spend {
            self.counter(&spend.key).inflight += due;
            job.spend = Some(Accrual {
                counter: spend.key.clone(),
                amount: due,
            });
        }
        for spec in [spec, spend].iter().flatten() {
            self.check_thresholds(ctx.plans, spec, period, jk, hb, out);
        }
        Ok(())
    }

    /// Emits one charge: rates the slice, applies plan inclusion, updates
    /// the statement, then emits the limit events it triggers.
    pub(crate) fn emit_charge(
        &mut self,
        st: &mut Step<'_, '_>,
        jk: &JobKey,
        start: &StartRec,
        (terms, records): (&PlanTerms, &[AccountRecord]),
        s: SliceCharge,
    ) -> ChargeRef {
        let (ctx, now, out) = (st.ctx, st.now, &mut *st.out);
        let (period, late) = billing_period(ctx, records, s.part.period, now);
        if late {
            self.stats.late_charges += 1;
        }
        let month = period.limit_month();
        let amount = s.part.rate * s.part.seconds;
        let spec = limit_spec(ctx.plans, terms, start.info.kind, &jk.0, month);
        let mut due = amount;
        if let Some(spec) = &spec {
            let counter = self.counter(&spec.key);
            due = due_part(counter.charged, amount, spec.cap);
            counter.charged += amount;
        }
        let (credits, included_usage) = included_as(terms.plan, amount - due);
        let drawn = self.draw_credits(jk, start, s.part.from, due);
        let granted = drawn.iter().fold(Money::ZERO, |sum, d| sum + d.amount);
        if !drawn.is_empty() {
            due -= granted;
        }
        let spend = spend_spec(ctx.plans, terms, &jk.0, month);
        if let Some(spend) = &spend {
            self.counter(&spend.key).charged += due;
        }
        let acc = self.open_statement(period, &jk.0);
        let line = acc
            .lines
            .entry((start.info.kind, start.info.model.clone()))
            .or_default();
        line.jobs += u64::from(s.new_job);
        line.seconds += s.part.seconds;
        line.amount += amount;
        acc.due += due;
        if let Some(id) = &s.part.adjustment_id {
            *acc.adjustments.entry(id.clone()).or_default() += Money((s.part.rate.0 - start.rate.0) * s.part.seconds);
        }
        acc.credits_applied += credits;
        if !drawn.is_empty() {
            acc.credits_applied += granted;
            for d in &drawn {
                *acc.grants.entry(d.grant.clone()).or_default() += d.amount;
            }
        }
        acc.included_usage += included_usage;
        self.stats.charges += 1;
        if let Some(i) = JobKind::ALL.iter().position(|k| *k == start.info.kind) {
            self.stats.amount_by_kind[i] += amount;
        }
        let record = ChargeRef {
            charge_id: s.charge_id.clone(),
            service_period: s.part.period,
            from: s.part.from,
            to: s.part.to,
            ms: s.part.ms,
            seconds: s.part.seconds,
            rate: s.part.rate,
            amount,
            due,
            status: s.status,
            limit: spec.as_ref().map(|x| (x.key.limit, x.key.period)),
            spend: spend.as_ref().map(|_| month),
            adjustment_id: s.part.adjustment_id.clone(),
            drawn,
        };
        out.push(Output::Charge(Charge {
            charge_id: s.charge_id,
            account_id: jk.0.clone(),
            job_id: Some(jk.1.clone()),
            kind: start.info.kind.into(),
            model: start.info.model.clone(),
            workflow_run_id: start.info.workflow_run_id.clone(),
            status: Some(s.status),
            started_at: s.part.from,
            stopped_at: s.part.to,
            duration_ms: s.part.ms,
            billable_seconds: s.part.seconds,
            rate_per_second: s.part.rate,
            rate_card_version: Some(start.version.clone()),
            amount,
            amount_due: due,
            currency: CURRENCY.to_owned(),
            period,
            service_period: s.part.period,
            adjusts: s.adjusts,
            adjustment_id: s.part.adjustment_id,
        }));
        for spec in [spec, spend].iter().flatten() {
            self.check_thresholds(ctx.plans, spec, month, jk, s.at, out);
        }
        record
    }

    /// The statement of `account` for `period`, open (created if need
    /// be), marked as changed.
    fn open_statement(&mut self, period: BillingPeriod, account: &AccountId) -> &mut StatementAcc {
        if let Some(d) = self.dirty.as_mut() {
            d.statements.insert((period, account.clone()));
        }
        self.statements
            .entry(period)
            .or_default()
            .entry(account.clone())
            .or_default()
    }

    /// A manual charge (`amount` < 0: a credit note) of `account`, booked at
    /// `at` in the account's billing period then open: a charge of kind
    /// `adjustment`, all of it due (no plan includes it, no credit covers
    /// it), on the statement's `adjustments` and in its total due.
    pub(crate) fn manual_charge(
        &mut self,
        ctx: &Context<'_>,
        account: &AccountId,
        cause: &str,
        amount: Money,
        at: Timestamp,
        out: &mut Vec<Output>,
    ) -> Result<(), LookupError> {
        let records = ctx.accounts.records_of(account)?;
        let (period, _) = billing_period(ctx, &records, period_at(&records, &ctx.plans.billing_cycle, at), at);
        let acc = self.open_statement(period, account);
        acc.due += amount;
        *acc.adjustments.entry(cause.to_owned()).or_default() += amount;
        self.stats.charges += 1;
        self.stats.adjustments += 1;
        out.push(Output::Charge(Charge {
            charge_id: format!("{account}/adjustment/{cause}"),
            account_id: account.clone(),
            job_id: None,
            kind: ChargeKind::Adjustment,
            model: None,
            workflow_run_id: None,
            status: None,
            started_at: at,
            stopped_at: at,
            duration_ms: 0,
            billable_seconds: Decimal::ZERO,
            rate_per_second: Money::ZERO,
            rate_card_version: None,
            amount,
            amount_due: amount,
            currency: CURRENCY.to_owned(),
            period,
            service_period: period,
            adjusts: None,
            adjustment_id: Some(cause.to_owned()),
        }));
        Ok(())
    }

    /// Draws `due` (of a charge for usage of the job of `start` from
    /// `at`) from the account's credit grants that cover it, the soonest
    /// to expire first: what each gave.
    fn draw_credits(&mut self, jk: &JobKey, start: &StartRec, at: Timestamp, due: Money) -> Vec<Drawn> {
        let mut drawn = Vec::new();
        let Some(adj) = self.adjustments.get_mut(&jk.0).filter(|a| !a.grants.is_empty()) else {
            return drawn;
        };
        let mut left = due;
        for id in adj.grants_for(start.info.kind, start.info.model.as_ref(), at) {
            if left <= Money::ZERO {
                break;
            }
            let Some(g) = adj.by_id.get_mut(&id) else { continue };
            let take = g.remaining_at(at).min(left);
            if take <= Money::ZERO {
                continue;
            }
            g.used += take;
            left -= take;
            drawn.push(Drawn {
                grant: id,
                amount: take,
            });
        }
        if let Some(d) = self.dirty.as_mut() {
            for x in &drawn {
                d.adjustments.insert((jk.0.clone(), x.grant.clone()));
            }
        }
        drawn
    }

    /// Gives back to their grants the credit a charge drew.
    fn give_back(&mut self, account: &AccountId, drawn: &[Drawn]) {
        let Some(adj) = self.adjustments.get_mut(account) else {
            return;
        };
        for x in drawn {
            if let Some(g) = adj.by_id.get_mut(&x.grant) {
                g.used = (g.used - x.amount).max(Money::ZERO);
                if let Some(d) = self.dirty.as_mut() {
                    d.adjustments.insert((account.clone(), x.grant.clone()));
                }
            }
        }
    }

    /// Keeps the charges just emitted for `job` (a refund reverses them
    /// from there) and, when the job was refunded through its end,
    /// refunds them at once.
    pub(crate) fn record_charges(
        &mut self,
        st: &mut Step<'_, '_>,
        jk: &JobKey,
        job: &mut Job,
        start: &StartRec,
        billing: (&PlanTerms, &[AccountRecord]),
        charges: Vec<ChargeRef>,
    ) {
        if let Some(r) = job.refunded.as_ref().filter(|r| r.through_end) {
            let cause = r.adjustment_id.clone();
            for c in &charges {
                self.emit_refund(st, jk, start, billing, c, &cause);
            }
        }
        job.charges.extend(charges);
    }

    /// Emits the exact reversal of charge `c` of a job, caused by refund
    /// `cause`: negated seconds, amount and amount due, `adjusts` = `c`,
    /// booked in `c`'s service period when it is still open, else in the
    /// open one. What `c` counted toward its limit and spend limit is given
    /// back to those counters; thresholds that fired stay fired.
    pub(crate) fn emit_refund(
        &mut self,
        st: &mut Step<'_, '_>,
        jk: &JobKey,
        start: &StartRec,
        (terms, records): (&PlanTerms, &[AccountRecord]),
        c: &ChargeRef,
        cause: &str,
    ) {
        let (ctx, now, out) = (st.ctx, st.now, &mut *st.out);
        let (period, late) = billing_period(ctx, records, c.service_period, now);
        if late {
            self.stats.late_charges += 1;
        }
        if let Some((limit, period)) = c.limit {
            let key = UsageKey {
                account: jk.0.clone(),
                limit,
                period,
            };
            self.counter(&key).charged -= c.amount;
        }
        if let Some(month) = c.spend {
            let key = UsageKey {
                account: jk.0.clone(),
                limit: LimitKind::SpendLimit,
                period: Some(month),
            };
            self.counter(&key).charged -= c.due;
        }
        self.give_back(&jk.0, &c.drawn);
        let granted = c.drawn.iter().fold(Money::ZERO, |sum, d| sum + d.amount);
        let (mut credits, included_usage) = included_as(terms.plan, c.due + granted - c.amount);
        if !c.drawn.is_empty() {
            credits -= granted;
        }
        let acc = self.open_statement(period, &jk.0);
        let line = acc
            .lines
            .entry((start.info.kind, start.info.model.clone()))
            .or_default();
        line.seconds -= c.seconds;
        line.amount -= c.amount;
        acc.due -= c.due;
        *acc.adjustments.entry(cause.to_owned()).or_default() -= c.amount;
        acc.credits_applied += credits;
        acc.included_usage += included_usage;
        for d in &c.drawn {
            *acc.grants.entry(d.grant.clone()).or_default() -= d.amount;
        }
        self.stats.charges += 1;
        self.stats.adjustments += 1;
        if let Some(i) = JobKind::ALL.iter().position(|k| *k == start.info.kind) {
            self.stats.amount_by_kind[i] -= c.amount;
        }
        out.push(Output::Charge(Charge {
            charge_id: format!("{}/refund/{cause}", c.charge_id),
            account_id: jk.0.clone(),
            job_id: Some(jk.1.clone()),
            kind: start.info.kind.into(),
            model: start.info.model.clone(),
            workflow_run_id: start.info.workflow_run_id.clone(),
            status: Some(c.status),
            started_at: c.from,
            stopped_at: c.to,
            duration_ms: -c.ms,
            billable_seconds: -c.seconds,
            rate_per_second: c.rate,
            rate_card_version: Some(start.version.clone()),
            amount: -c.amount,
            amount_due: -c.due,
            currency: CURRENCY.to_owned(),
            period,
            service_period: c.service_period,
            adjusts: Some(c.charge_id.clone()),
            adjustment_id: Some(cause.to_owned()),
        }));
    }

    /// The pro fees of calendar month `m` are due: every pro account this
    /// meter answers for ([`Context::owns`]) that was on pro during `m` and
    /// has no statement open for its last period of `m` gets an empty one
    /// (the monthly fee is owed whether or not the plan was used), which
    /// closes with that period. Each month once (`fees_through` records how
    /// far).
    ///
    /// Every account lookup is made before anything changes: a failed one
    /// leaves the month due.
    pub(crate) fn idle_fees(&mut self, ctx: &Context<'_>, m: Period) -> Result<(), LookupError> {
        let last_instant = Timestamp(m.end().0 - 1);
        let mut idle = Vec::new();
        // `pro_accounts` is ordered by account: emission order is stable.
        for a in ctx.accounts.pro_accounts(&|a| ctx.owns(a)) {
            if !ctx.accounts.pro_during(&a, m)? {
                continue;
            }
            let last = period_at(&ctx.accounts.records_of(&a)?, &ctx.plans.billing_cycle, last_instant);
            if !self.statements.get(&last).is_some_and(|u| u.contains_key(&a)) {
                idle.push((last, a));
            }
        }
        for (p, a) in idle {
            if let Some(d) = self.dirty.as_mut() {
                d.statements.insert((p, a.clone()));
            }
            self.statements.entry(p).or_default().insert(a, StatementAcc::default());
        }
        self.fees_through = Some(m);
        self.mark_meta();
        Ok(())
    }

    /// Emits the statements of billing period `p` and forgets its
    /// accumulators. The subscription fee of a month is on the statement of
    /// the account's last period of that month.
    ///
    /// Every account lookup is made before anything changes: a failed one
    /// leaves the period open.
    pub(crate) fn close_period(
        &mut self,
        ctx: &Context<'_>,
        p: BillingPeriod,
        out: &mut Vec<Output>,
    ) -> Result<(), LookupError> {
        let last_instant = Timestamp(p.end.0 - 1);
        let mut terms = std::collections::BTreeMap::new();
        for account in self.statements.get(&p).into_iter().flat_map(|m| m.keys()) {
            let records = ctx.accounts.records_of(account)?;
            let plan = terms_in(ctx.plans, &records, last_instant).plan;
            let fee = if p.ends_its_month() {
                ctx.accounts.subscription_fee(ctx.plans, account, p.limit_month())?
            } else {
                Money(Decimal::new(0, 2))
            };
            let cadence = cadence_in_force(&records, &ctx.plans.billing_cycle, p.start);
            terms.insert(account.clone(), (plan, fee, cadence));
        }
        let accounts = self.statements.remove(&p).unwrap_or_default();
        for (account, acc) in accounts {
            let adjustments = acc
                .adjustments
                .iter()
                .map(|(id, amount)| {
                    let stored = self.adjustments.get(&account).and_then(|a| a.by_id.get(id));
                    StatementAdjustment {
                        adjustment_id: id.clone(),
                        kind: stored.map_or("price_override", |s| s.adjustment.kind()).to_owned(),
                        reason: stored.map(|s| s.adjustment.reason.clone()).unwrap_or_default(),
                        requested_by: stored.map(|s| s.adjustment.requested_by.clone()).unwrap_or_default(),
                        amount: *amount,
                    }
                })
                .collect();
            let last = Timestamp(p.end.0 - 1);
            let grants = self.adjustments.get(&account);
            let remaining = |id: &str| {
                grants
                    .and_then(|a| a.by_id.get(id))
                    .map_or(Money::ZERO, |g| g.remaining_at(last))
            };
            let credit_grants = acc
                .grants
                .iter()
                .map(|(id, applied)| StatementCredit {
                    adjustment_id: id.clone(),
                    applied: *applied,
                    remaining: remaining(id),
                })
                .collect();
            let credit_balance = grants.map_or(Money::ZERO, |a| a.credit_balance(None, last));
            let Some((plan, fee, cadence)) = terms.remove(&account) else {
                continue;
            };
            let lines = acc
                .lines
                .iter()
                .map(|((kind, model), l)| statement_line(*kind, model.as_ref(), l))
                .collect();
            if let Some(d) = self.dirty.as_mut() {
                d.statements.insert((p, account.clone()));
            }
            self.stats.statements += 1;
            self.stats.semi_monthly_statements += u64::from(cadence == Cadence::SemiMonthly);
            let statement = Statement {
                account_id: account,
                period: p,
                period_start: p.start,
                period_end: p.end,
                cadence,
                plan,
                lines,
                subscription_fee: fee,
                credits_applied: acc.credits_applied,
                included_usage: acc.included_usage,
                adjustments,
                credit_grants,
                credit_balance,
                total_due: (acc.due + fee).round_cents(),
                currency: CURRENCY.to_owned(),
            };
            if let Some(d) = self.dirty.as_mut() {
                d.closed.push(statement.clone());
            }
            out.push(Output::Statement(statement));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Money {
        Money::parse(s).unwrap_or_default()
    }

    #[test]
    fn the_due_part_follows_the_inclusion_formula() {
        let cap = Some(m("10"));
        assert_eq!(due_part(m("0"), m("4"), cap), m("0"), "inside the cap");
        assert_eq!(due_part(m("8"), m("4"), cap), m("2"), "across the cap");
        assert_eq!(due_part(m("12"), m("4"), cap), m("4"), "beyond the cap");
        assert_eq!(
            due_part(m("12"), m("-4"), cap),
            m("-2"),
            "an adjustment gives back the due part first"
        );
        assert_eq!(due_part(m("5"), m("-4"), cap), m("0"), "then the included part");
        assert_eq!(due_part(m("5"), m("4"), None), m("4"), "no cap: all due");
        assert_eq!(
            due_part(m("0"), m("4"), Some(m("0"))),
            m("4"),
            "a zero cap includes nothing"
        );
    }

    #[test]
    fn actions_and_statement_columns_by_plan() {
        let stop = Policy::Stop;
        assert_eq!(
            limit_action(LimitKind::FreeCredits, Some(100), stop),
            LimitAction::Block
        );
        assert_eq!(
            limit_action(LimitKind::FreeCredits, Some(80), stop),
            LimitAction::Notify
        );
        assert_eq!(
            limit_action(LimitKind::ModelApiCap, Some(100), Policy::Notify),
            LimitAction::UpgradeToEnterprise
        );
        assert_eq!(
            limit_action(LimitKind::Alert, None, Policy::Notify),
            LimitAction::Notify
        );
        assert_eq!(limit_action(LimitKind::SpendLimit, Some(100), stop), LimitAction::Block);
        assert_eq!(
            limit_action(LimitKind::SpendLimit, Some(100), Policy::Notify),
            LimitAction::Notify
        );
        assert_eq!(included_as(Plan::Free, m("3")), (m("3"), m("0")));
        assert_eq!(included_as(Plan::Pro, m("3")), (m("0"), m("3")));
        assert_eq!(included_as(Plan::Payg, m("3")), (m("0"), m("0")));
    }
}
