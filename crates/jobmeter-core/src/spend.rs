//! Spend control: burn rate, runway, and `job.stop` commands.
//!
//! An account's **burn rate** against a limit is the sum of the per-second
//! list rates of its running jobs that count toward that limit (a job runs
//! from its accepted start until its stop is accepted or the meter closes
//! it). **Runway** is what is left of the limit divided by the burn rate.
//! Limits with a runway: free credits, the pro model-API cap and workflow
//! quota, and an account's own monthly `spend_limit`. Enterprise alert
//! amounts are notices, not limits: they have none.
//!
//! After every accepted event of an account that has running jobs (and
//! after an orphan close), the meter looks at each of those limits:
//! - **used up** (usage ≥ the limit) and the plan's policy is `stop`: one
//!   `job.stop` command for every job running against it that has not had
//!   one — in the same transaction as the charge, heartbeat or start that
//!   was applied, since the commands are outputs of that step;
//! - otherwise, with a burn rate: a `runway` limit event for each configured
//!   horizon the runway is below, once per (account, limit, period, horizon).
//!
//! A job sent a stop is charged to at most the command's instant (the
//! account's own time; see [`crate::meter::Meter::control_spend`]) plus
//! the stop grace, whenever and however it ends: what a worker
//! runs past that is not billed. So what an account is charged beyond a
//! limit whose policy is `stop` is bounded by the sum, over the jobs
//! running when the limit was used up (the one whose heartbeat or stop used
//! it up included) and those started after, of rate × (heartbeat interval +
//! stop grace + 1 s): a running job's usage is counted to its last
//! heartbeat, at most an interval old, and the step that used the limit up
//! added at most an interval's worth of one job past it; the grace is the
//! worker's time to react; a second is rounding.

use crate::billing::{limit_spec, spend_spec, LimitSpec};
use crate::context::Context;
use crate::money::{AccountId, JobId, Money, CURRENCY};
use crate::output::{Command, CommandType, LimitAction, LimitEvent, LimitKind, Output};
use crate::plans::{Accounts, LookupError, Plan, PlanCatalog, Policy};
use crate::running::Share;
use crate::state::{FiredKey, Job, JobKey, ThresholdId, UsageKey};
use crate::time::{Period, Timestamp};
use rust_decimal::{Decimal, RoundingStrategy};

impl PlanCatalog {
    /// The policy of a used-up limit of an account on `plan`.
    pub fn policy(&self, plan: Plan, limit: LimitKind) -> Policy {
        match limit {
            LimitKind::FreeCredits => self.free_on_credits_exhausted,
            LimitKind::ModelApiCap | LimitKind::WorkflowQuota => self.pro_on_cap,
            LimitKind::SpendLimit => self.on_spend_limit[plan.index()],
            LimitKind::Alert => Policy::Notify,
        }
    }
}

/// One limit of an account with the jobs running against it.
#[derive(Debug)]
pub(crate) struct Exposure {
    /// The counter.
    pub(crate) key: UsageKey,
    /// The plan that sets it.
    pub(crate) plan: Plan,
    /// The limit (credits, cap, quota, spend limit).
    pub(crate) value: Money,
    /// Usage counted toward it (charged plus in flight).
    pub(crate) usage: Money,
    /// Sum of the running jobs' per-second rates.
    pub(crate) burn: Money,
    /// What the plan does when it is used up.
    pub(crate) policy: Policy,
    /// How many jobs run against it.
    pub(crate) running: u64,
    /// Of them, not yet sent a stop.
    pub(crate) unstopped: u64,
}

impl Exposure {
    /// Seconds until the limit is used up at the burn rate (to the
    /// millisecond, rounded down), `Some(0)` when it is used up, `None`
    /// when nothing runs against it.
    pub(crate) fn runway_seconds(&self) -> Option<Decimal> {
        let left = self.value.0 - self.usage.0;
        if left <= Decimal::ZERO {
            return Some(Decimal::ZERO);
        }
        if self.burn.0 <= Decimal::ZERO {
            return None;
        }
        let mut r = left
            .checked_div(self.burn.0)?
            .round_dp_with_strategy(3, RoundingStrategy::ToZero);
        r.rescale(3);
        Some(r)
    }

    /// The burn rate in its shortest form (a sum's scale depends on the
    /// order jobs started and stopped; its value does not).
    pub(crate) fn burn_rate(&self) -> Money {
        Money(self.burn.0.normalize())
    }

    /// True when usage has reached the limit.
    pub(crate) fn used_up(&self) -> bool {
        self.usage >= self.value
    }
}

/// The limits with a runway a job of `kind` under `terms` counts toward in
/// `period`: its plan's limit (not enterprise alerts) and the account's
/// spend limit.
pub(crate) fn job_limits<'a>(
    plans: &'a PlanCatalog,
    terms: &'a crate::plans::PlanTerms,
    kind: crate::event::JobKind,
    account: &AccountId,
    period: Period,
) -> impl Iterator<Item = LimitSpec<'a>> {
    let plan_limit = limit_spec(plans, terms, kind, account, period).filter(|s| s.key.limit != LimitKind::Alert);
    [plan_limit, spend_spec(plans, terms, account, period)]
        .into_iter()
        .flatten()
}

/// The limits `jobs` (those of them running) count toward in `period`,
/// each with its burn rate and usage, ordered by counter: what the limits
/// view computes runway from (the meter keeps the same sums job by job, in
/// its running-jobs index).
pub(crate) fn exposures<'j>(
    plans: &PlanCatalog,
    book: &dyn Accounts,
    account: &AccountId,
    period: Period,
    jobs: impl Iterator<Item = &'j Job>,
    counter: impl Fn(&UsageKey) -> crate::state::Counter,
    credit: Money,
) -> Result<Vec<Exposure>, LookupError> {
    let mut out: Vec<Exposure> = Vec::new();
    for job in jobs {
        let Some(start) = job.start.as_ref().filter(|_| job.is_running()) else {
            continue;
        };
        let terms = book.terms_at(plans, account, start.time)?;
        for spec in job_limits(plans, &terms, start.info.kind, account, period) {
            match out.iter_mut().find(|e| e.key == spec.key) {
                Some(e) => {
                    e.burn += start.rate;
                    e.running += 1;
                    e.unstopped += u64::from(job.stop_sent.is_none());
                }
                None => out.push(Exposure {
                    usage: counter(&spec.key).total(),
                    policy: plans.policy(spec.plan, spec.key.limit),
                    value: if spec.key.limit == LimitKind::SpendLimit || credit <= Money::ZERO {
                        spec.limit_value
                    } else {
                        with_credit(spec.limit_value, counter(&spec.key).charged, credit)
                    },
                    key: spec.key,
                    plan: spec.plan,
                    burn: start.rate,
                    running: 1,
                    unstopped: u64::from(job.stop_sent.is_none()),
                }),
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// A plan limit `cap` extended by `credit` left in grants, for a counter
/// with `charged` charged: what was charged beyond the cap is accounted
/// for already (drawn from grants, or billed), so the limit is used up
/// once what runs beyond it reaches the credit left. Equal to `cap` plus
/// the credit while nothing beyond the cap was charged.
pub(crate) fn with_credit(cap: Money, charged: Money, credit: Money) -> Money {
    cap + (charged - cap).max(Money::ZERO) + credit
}

/// A running job's share of its account's burn rates (`None` when it is not
/// running): its rate when it started, a price override's if one was in
/// force for it then.
fn share_of(
    ctx: &Context<'_>,
    account: &AccountId,
    job: &Job,
    overrides: Option<&crate::adjust::Overrides>,
) -> Result<Option<Share>, LookupError> {
    let Some(start) = job.start.as_ref().filter(|_| job.is_running()) else {
        return Ok(None);
    };
    let terms = ctx.accounts.terms_at(ctx.plans, account, start.time)?;
    let limits = job_limits(ctx.plans, &terms, start.info.kind, account, start.time.period())
        .map(|s| (s.key.limit, s.limit_value, s.plan))
        .collect();
    let rate = overrides
        .and_then(|o| o.winner(start.info.kind, start.info.model.as_ref(), start.time))
        .map_or(start.rate, |(_, o)| o.price.rate(start.rate));
    Ok(Some(Share {
        rate,
        limits,
        stopped: job.stop_sent.is_some(),
    }))
}

impl crate::meter::Meter {
    /// Keeps the running-jobs index in step with a job just put back.
    pub(crate) fn track_running(&mut self, ctx: &Context<'_>, jk: &JobKey, job: &Job) -> Result<(), LookupError> {
        self.ensure_running(ctx)?;
        let running = job.is_running();
        let known = self.running.get(&jk.0).is_some_and(|a| a.jobs.contains_key(&jk.1));
        match (known, running) {
            (true, true) => {
                if job.stop_sent.is_some() {
                    if let Some(a) = self.running.get_mut(&jk.0) {
                        a.mark_stopped(&jk.1);
                    }
                }
            }
            (true, false) => {
                if let Some(a) = self.running.get_mut(&jk.0) {
                    a.remove(&jk.1);
                    if a.jobs.is_empty() {
                        self.running.remove(&jk.0);
                    }
                }
            }
            (false, true) => {
                let overrides = self.adjustments.get(&jk.0).map(|a| &a.overrides);
                if let Some(share) = share_of(ctx, &jk.0, job, overrides)? {
                    self.running.entry(jk.0.clone()).or_default().add(jk.1.clone(), share);
                }
            }
            (false, false) => {}
        }
        Ok(())
    }

    /// Builds the running-jobs index from the job table once (a restored
    /// meter has the jobs but not the index: it needs the plans).
    fn ensure_running(&mut self, ctx: &Context<'_>) -> Result<(), LookupError> {
        if self.running_built {
            return Ok(());
        }
        let mut shares: Vec<(JobKey, Share)> = Vec::new();
        for (jk, job) in self.jobs.iter() {
            if let Some(s) = share_of(ctx, &jk.0, job, self.adjustments.get(&jk.0).map(|a| &a.overrides))? {
                shares.push((jk.clone(), s));
            }
        }
        self.running_built = true;
        for (jk, share) in shares {
            self.running.entry(jk.0).or_default().add(jk.1, share);
        }
        Ok(())
    }

    /// The limits `account`'s running jobs count toward, monthly ones in
    /// `period`, each with its burn rate, ordered by counter.
    pub(crate) fn exposures(
        &mut self,
        ctx: &Context<'_>,
        account: &AccountId,
        period: Period,
    ) -> Result<Vec<Exposure>, LookupError> {
        self.ensure_running(ctx)?;
        let Some(a) = self.running.get(account) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Exposure> = Vec::new();
        // Ordered by kind, then value: the last entry of a kind sets it.
        for ((kind, value, plan), b) in &a.burn {
            if let Some(e) = out.last_mut().filter(|e| e.key.limit == *kind) {
                e.burn += b.rate;
                e.running += b.jobs;
                e.unstopped += b.unstopped;
                e.value = *value;
                e.plan = *plan;
                e.policy = ctx.plans.policy(*plan, *kind);
                continue;
            }
            let key = UsageKey {
                account: account.clone(),
                limit: *kind,
                period: (*kind != LimitKind::FreeCredits).then_some(period),
            };
            out.push(Exposure {
                usage: self.usage.get(&key).map_or(Money::ZERO, |c| c.total()),
                policy: ctx.plans.policy(*plan, *kind),
                key,
                plan: *plan,
                value: *value,
                burn: b.rate,
                running: b.jobs,
                unstopped: b.unstopped,
            });
        }
        // Credit grants for all usage extend the plan's limits (not the
        // account's own spend limit, which counts what is due after them).
        let credit = self.adjustments.get(account).map_or(Money::ZERO, |a| {
            let t = self.stream_time.unwrap_or(Timestamp::MIN);
            crate::state::general_credit(a.grants.iter().filter_map(|id| a.by_id.get(id)), t)
        });
        if credit > Money::ZERO {
            for e in out.iter_mut().filter(|e| e.key.limit != LimitKind::SpendLimit) {
                let charged = self.usage.get(&e.key).map_or(Money::ZERO, |c| c.charged);
                e.value = with_credit(e.value, charged, credit);
            }
        }
        Ok(out)
    }

    /// Stops the jobs running against a used-up limit whose policy is
    /// `stop`, and warns of short runways. `trigger` is the job whose event
    /// (or orphan close) was just applied; `now` is stream time.
    ///
    /// Commands and warnings carry the account's own time — the latest of
    /// `event_time` (the trigger's) and its running jobs' starts and
    /// heartbeats — never the partition's stream time, which depends on
    /// how other accounts' events interleave with this one's: so the same
    /// events of an account give the same commands, warnings and charges
    /// however they were merged with others'. It is never before any usage
    /// already counted, so a command's charge bound cuts none of it.
    pub(crate) fn control_spend(
        &mut self,
        ctx: &Context<'_>,
        trigger: &JobKey,
        event_time: Timestamp,
        now: Timestamp,
        out: &mut Vec<Output>,
    ) -> Result<(), LookupError> {
        if !self.running.contains_key(&trigger.0) {
            return Ok(());
        }
        let period = crate::billing::limit_month(ctx, &ctx.accounts.records_of(&trigger.0)?, event_time, now);
        let mut at = None;
        for e in self.exposures(ctx, &trigger.0, period)? {
            if e.used_up() {
                if e.policy == Policy::Stop && e.unstopped > 0 {
                    let t = *at.get_or_insert_with(|| self.account_time(&trigger.0, event_time));
                    self.stop_jobs(&e, t, out);
                }
                continue;
            }
            if e.burn <= Money::ZERO {
                continue;
            }
            let left = e.value.0 - e.usage.0;
            for h in &ctx.config.runway_horizons_ms {
                let secs = u64::try_from(*h / 1000).unwrap_or(0);
                // runway < h, without dividing (this runs for every event
                // of an account with running jobs).
                if e.burn.0.checked_mul(Decimal::from(secs)).is_some_and(|x| left >= x) {
                    continue;
                }
                let Some(runway) = e.runway_seconds() else { continue };
                if runway >= Decimal::from(secs) {
                    continue;
                }
                let fired = FiredKey {
                    usage: e.key.clone(),
                    threshold: ThresholdId::Runway(secs),
                };
                if self.fired.contains(&fired) {
                    continue;
                }
                let at = *at.get_or_insert_with(|| self.account_time(&trigger.0, event_time));
                out.push(Output::Limit(LimitEvent {
                    event_id: fired.event_id(),
                    account_id: e.key.account.clone(),
                    plan: e.plan,
                    period,
                    limit: e.key.limit,
                    threshold_pct: None,
                    limit_value: e.value,
                    usage_value: e.usage,
                    unit: CURRENCY.to_owned(),
                    triggered_by_job: trigger.1.clone(),
                    at,
                    action: LimitAction::Notify,
                    horizon_seconds: Some(secs),
                    runway_seconds: Some(runway),
                    burn_rate_per_second: Some(e.burn_rate()),
                }));
                self.stats.runway_events += 1;
                if let Some(d) = self.dirty.as_mut() {
                    d.fired.push(fired.clone());
                }
                self.fired.insert(fired);
            }
        }
        Ok(())
    }

    /// The account's own time: the latest of `t` and its running jobs'
    /// starts and latest heartbeats.
    fn account_time(&self, account: &AccountId, t: Timestamp) -> Timestamp {
        let Some(a) = self.running.get(account) else { return t };
        a.jobs
            .keys()
            .filter_map(|id| self.jobs.get(&(account.clone(), id.clone())))
            .filter_map(|j| {
                j.start
                    .as_ref()
                    .map(|s| j.last_heartbeat.map_or(s.time, |h| h.max(s.time)))
            })
            .fold(t, Timestamp::max)
    }

    /// One `job.stop` per running job of the exposure not yet sent one.
    fn stop_jobs(&mut self, e: &Exposure, now: Timestamp, out: &mut Vec<Output>) {
        let reason = e.key.limit.used_up_reason();
        let ids: Vec<JobId> = self
            .running
            .get(&e.key.account)
            .into_iter()
            .flat_map(|a| a.jobs.iter())
            .filter(|(_, s)| !s.stopped && s.limits.iter().any(|l| l.0 == e.key.limit))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let jk = (e.key.account.clone(), id);
            if let Some(a) = self.running.get_mut(&jk.0) {
                a.mark_stopped(&jk.1);
            }
            let Some(job) = self.jobs.get_mut(&jk) else { continue };
            if job.stop_sent.is_some() {
                continue;
            }
            job.stop_sent = Some(now);
            out.push(Output::Command(Command {
                command_id: format!("{}/{}/stop", jk.0, jk.1),
                kind: CommandType::JobStop,
                account_id: jk.0.clone(),
                job_id: jk.1.clone(),
                reason: reason.to_owned(),
                limit: e.key.limit,
                at: now,
            }));
            self.stats.stop_commands += 1;
            if let Some(d) = self.dirty.as_mut() {
                d.jobs.insert(jk);
            }
        }
    }
}
