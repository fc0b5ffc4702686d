//! Read views of an account's state: what the usage API answers.
//!
//! Built from the same records the meter persists (statement accumulators,
//! emitted statements, jobs, usage counters, fired thresholds), so a usage
//! page and the charges topic can never tell two stories: the per-model
//! lines are the statement's lines, computed by the same function.

use crate::billing::{limits_for, statement_line};
use crate::cycle::BillingPeriod;
use crate::event::JobKind;
use crate::money::{AccountId, JobId, ModelId, Money, CURRENCY};
use crate::output::{LimitKind, Statement, StatementAdjustment, StatementLine};
use crate::plans::{Accounts, LookupError, Plan, PlanCatalog};
use crate::ratecard::Rounding;
use crate::spend::Exposure;
use crate::state::{Counter, FiredKey, Job, StatementAcc, UsageKey};
use crate::time::{Period, Timestamp};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Whether a period's figures are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodStatus {
    /// Still accumulating; figures grow as jobs finish.
    Open,
    /// The statement has been emitted; these are its figures.
    Closed,
}

/// Totals of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageTotals {
    /// Jobs with usage in the period.
    pub jobs: u64,
    /// Seconds billed.
    #[serde(with = "rust_decimal::serde::str")]
    pub billable_seconds: Decimal,
    /// Amount of the usage at the rates applied (the list rates, or the
    /// account's price overrides).
    pub amount: Money,
    /// The same usage at the list rates: `amount` minus what the price
    /// overrides changed (`adjustments`).
    pub list_amount: Money,
    /// Free credits drawn.
    pub credits_applied: Money,
    /// Pro usage included in the cap and quota.
    pub included_usage: Money,
    /// Usage the account owes (exact; the statement rounds once, to cents).
    pub usage_due: Money,
    /// Pro fee (closed periods; `null` while open).
    pub subscription_fee: Option<Money>,
    /// The statement's total (closed periods; `null` while open).
    pub total_due: Option<Money>,
}

/// One step of a workflow run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkflowStep {
    /// The step's job id.
    pub job_id: JobId,
    /// The model the step ran.
    pub model: Option<ModelId>,
    /// Seconds billed in the period.
    #[serde(with = "rust_decimal::serde::str")]
    pub billable_seconds: Decimal,
    /// Amount billed in the period.
    pub amount: Money,
}

/// A workflow run with usage in the period: the sum of its billed steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkflowRun {
    /// The run.
    pub workflow_run_id: String,
    /// Billed steps.
    pub steps: Vec<WorkflowStep>,
    /// Sum of the steps' seconds.
    #[serde(with = "rust_decimal::serde::str")]
    pub billable_seconds: Decimal,
    /// Sum of the steps' amounts.
    pub amount: Money,
    /// Steps still running (not in the sums yet).
    pub running_steps: u64,
}

/// A job that has started and not been charged yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InFlightJob {
    /// The job.
    pub job_id: JobId,
    /// Its kind.
    pub kind: JobKind,
    /// Its model.
    pub model: Option<ModelId>,
    /// Its workflow run.
    pub workflow_run_id: Option<String>,
    /// When it started.
    pub started_at: Timestamp,
    /// Its latest heartbeat.
    pub last_heartbeat: Option<Timestamp>,
    /// Seconds from start to the latest heartbeat (or to stream time when
    /// none has arrived), rounded as the rate card rounds.
    #[serde(with = "rust_decimal::serde::str")]
    pub running_seconds: Decimal,
    /// The rate fixed at start.
    pub rate_per_second: Money,
    /// running_seconds × rate: what it would cost if it stopped now.
    pub estimated_amount: Money,
}

/// An account's usage in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    /// The account.
    pub account_id: AccountId,
    /// The billing period (`YYYY-MM` or an ISO 8601 interval).
    pub period: BillingPeriod,
    /// Open or closed.
    pub status: PeriodStatus,
    /// The plan in force now (open) or at the period's last instant (closed).
    pub plan: Plan,
    /// The stream time the figures reflect.
    pub as_of: Option<Timestamp>,
    /// Always `USD`.
    pub currency: &'static str,
    /// Per (kind, model): jobs, billable seconds, average duration, amount.
    pub lines: Vec<StatementLine>,
    /// Sums.
    pub totals: UsageTotals,
    /// Workflow runs with usage in the period.
    pub workflow_runs: Vec<WorkflowRun>,
    /// Jobs running now (open periods only).
    pub in_flight: Vec<InFlightJob>,
    /// The price overrides that changed this period's usage, with reason
    /// and amount changed (rated − list), as on the statement.
    pub adjustments: Vec<StatementAdjustment>,
}

/// What a usage report is built from: one account's records.
#[derive(Debug, Default)]
pub struct AccountState {
    /// The statement accumulator of the period, if open.
    pub open: Option<StatementAcc>,
    /// The emitted statement of the period, if closed.
    pub closed: Option<Statement>,
    /// The account's remembered jobs.
    pub jobs: Vec<(JobId, Job)>,
    /// The account's usage counters.
    pub counters: BTreeMap<UsageKey, Counter>,
    /// The account's fired thresholds.
    pub fired: BTreeSet<FiredKey>,
    /// The partition's stream time.
    pub stream_time: Option<Timestamp>,
    /// The account's pricing adjustments, by id.
    pub adjustments: BTreeMap<String, crate::state::StoredAdjustment>,
}

impl AccountState {
    /// True when nothing at all is known of the account.
    pub fn is_empty(&self) -> bool {
        self.open.is_none() && self.closed.is_none() && self.jobs.is_empty() && self.counters.is_empty()
    }
}

/// The usage report of `account` for `period`.
pub fn usage_report(
    account: &AccountId,
    period: BillingPeriod,
    st: &AccountState,
    plans: &PlanCatalog,
    book: &dyn Accounts,
    rounding: Rounding,
) -> Result<UsageReport, LookupError> {
    let (status, lines, mut totals, plan, adjustments) = match (&st.closed, &st.open) {
        (Some(s), _) => {
            let t = line_totals(&s.lines);
            (
                PeriodStatus::Closed,
                s.lines.clone(),
                UsageTotals {
                    credits_applied: s.credits_applied,
                    included_usage: s.included_usage,
                    usage_due: (s.total_due - s.subscription_fee).max(Money::ZERO),
                    subscription_fee: Some(s.subscription_fee),
                    total_due: Some(s.total_due),
                    ..t
                },
                s.plan,
                s.adjustments.clone(),
            )
        }
        (None, acc) => {
            let acc = acc.clone().unwrap_or_default();
            let lines: Vec<StatementLine> = acc
                .lines
                .iter()
                .map(|((kind, model), l)| statement_line(*kind, model.as_ref(), l))
                .collect();
            let t = line_totals(&lines);
            let at = st.stream_time.unwrap_or(Timestamp(period.end.0 - 1));
            (
                PeriodStatus::Open,
                lines,
                UsageTotals {
                    credits_applied: acc.credits_applied,
                    included_usage: acc.included_usage,
                    usage_due: acc.due,
                    ..t
                },
                book.terms_at(plans, account, at)?.plan,
                acc.adjustments
                    .iter()
                    .map(|(id, amount)| {
                        let stored = st.adjustments.get(id);
                        StatementAdjustment {
                            adjustment_id: id.clone(),
                            kind: stored.map_or("price_override", |a| a.adjustment.kind()).to_owned(),
                            reason: stored.map(|a| a.adjustment.reason.clone()).unwrap_or_default(),
                            requested_by: stored.map(|a| a.adjustment.requested_by.clone()).unwrap_or_default(),
                            amount: *amount,
                        }
                    })
                    .collect::<Vec<_>>(),
            )
        }
    };
    // Only what price overrides changed: a refund nets its lines out
    // and is no difference between rated and list prices.
    totals.list_amount = adjustments
        .iter()
        .filter(|x| matches!(x.kind.as_str(), "price_override" | "override_end"))
        .fold(totals.amount, |a, x| a - x.amount);
    let mut runs: BTreeMap<String, WorkflowRun> = BTreeMap::new();
    let mut in_flight = Vec::new();
    for (job_id, job) in &st.jobs {
        let Some(start) = &job.start else { continue };
        let run_id = start
            .info
            .workflow_run_id
            .as_ref()
            .filter(|_| start.info.kind == JobKind::WorkflowStep);
        match &job.billed {
            Some(b) => {
                let (secs, amount) = b
                    .parts
                    .iter()
                    .filter(|p| p.service_period == period)
                    .fold((Decimal::ZERO, Money::ZERO), |(s, a), p| {
                        (s + p.seconds, a + start.rate * p.seconds)
                    });
                if let (Some(r), false) = (run_id, secs.is_zero()) {
                    let run = runs.entry(r.clone()).or_insert_with(|| empty_run(r));
                    run.steps.push(WorkflowStep {
                        job_id: job_id.clone(),
                        model: start.info.model.clone(),
                        billable_seconds: secs,
                        amount,
                    });
                    run.billable_seconds += secs;
                    run.amount += amount;
                }
            }
            None if status == PeriodStatus::Open => {
                let until = job
                    .last_heartbeat
                    .or(st.stream_time)
                    .unwrap_or(start.time)
                    .max(start.time);
                let running_seconds = rounding.total_seconds(until.0 - start.time.0);
                if let Some(r) = run_id {
                    runs.entry(r.clone()).or_insert_with(|| empty_run(r)).running_steps += 1;
                }
                in_flight.push(InFlightJob {
                    job_id: job_id.clone(),
                    kind: start.info.kind,
                    model: start.info.model.clone(),
                    workflow_run_id: start.info.workflow_run_id.clone(),
                    started_at: start.time,
                    last_heartbeat: job.last_heartbeat,
                    running_seconds,
                    rate_per_second: start.rate,
                    estimated_amount: start.rate * running_seconds,
                });
            }
            None => {}
        }
    }
    in_flight.sort_by(|a, b| (a.started_at, &a.job_id).cmp(&(b.started_at, &b.job_id)));
    Ok(UsageReport {
        account_id: account.clone(),
        period,
        status,
        plan,
        as_of: st.stream_time,
        currency: CURRENCY,
        lines,
        totals,
        workflow_runs: runs.into_values().collect(),
        in_flight,
        adjustments,
    })
}

fn empty_run(id: &str) -> WorkflowRun {
    WorkflowRun {
        workflow_run_id: id.to_owned(),
        steps: Vec::new(),
        billable_seconds: Decimal::ZERO,
        amount: Money::ZERO,
        running_steps: 0,
    }
}

fn line_totals(lines: &[StatementLine]) -> UsageTotals {
    UsageTotals {
        jobs: lines.iter().map(|l| l.jobs).sum(),
        billable_seconds: lines.iter().map(|l| l.billable_seconds).sum(),
        amount: lines.iter().fold(Money::ZERO, |a, l| a + l.amount),
        list_amount: lines.iter().fold(Money::ZERO, |a, l| a + l.amount),
        credits_applied: Money::ZERO,
        included_usage: Money::ZERO,
        usage_due: Money::ZERO,
        subscription_fee: None,
        total_due: None,
    }
}

/// One threshold of a limit and whether it has fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThresholdView {
    /// `80`, `100`, or `$250.00` (the last segment of the limit event id).
    pub threshold: String,
    /// The percentage, for percentage thresholds.
    pub threshold_pct: Option<u32>,
    /// The usage at which it fires.
    pub level: Money,
    /// True once its limit event has been emitted.
    pub fired: bool,
}

/// One limit and how close the account is to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitView {
    /// Which limit.
    pub limit: LimitKind,
    /// The month, or `lifetime`.
    pub period: String,
    /// The job kinds counted toward it.
    pub kinds: Vec<JobKind>,
    /// The cap (`null` for alert thresholds).
    pub limit_value: Option<Money>,
    /// List amount charged against it.
    pub charged: Money,
    /// List amount of running jobs, to their latest heartbeats.
    pub in_flight: Money,
    /// What credit grants for all usage have left, added to the limit
    /// (0 for alerts and the spend limit).
    pub credit_grants: Money,
    /// charged + in_flight: what thresholds compare against.
    pub used: Money,
    /// What is left of the cap (never negative; `null` without a cap).
    pub remaining: Option<Money>,
    /// used / cap in percent, two decimals (`null` without a cap).
    pub used_pct: Option<Money>,
    /// The next threshold that has not fired.
    pub next_threshold: Option<String>,
    /// Every threshold.
    pub thresholds: Vec<ThresholdView>,
    /// What happens when it is used up: `notify` or `stop` (running jobs
    /// are sent `job.stop`).
    pub policy: crate::plans::Policy,
    /// Jobs running against it now.
    pub running_jobs: u64,
    /// Sum of their per-second list rates (zero when none runs).
    pub burn_rate_per_second: Money,
    /// Seconds until it is used up at that rate, from `used` (`0` when used
    /// up; `null` when nothing runs against it or it has no value).
    #[serde(with = "crate::output::opt_decimal")]
    pub runway_seconds: Option<Decimal>,
    /// Runway horizons whose `runway` event has fired this period.
    pub runway_events_fired: Vec<String>,
}

/// An account's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitsReport {
    /// The account.
    pub account_id: AccountId,
    /// The plan in force at `as_of`.
    pub plan: Plan,
    /// The period monthly limits are shown for.
    pub period: Period,
    /// The stream time the figures reflect.
    pub as_of: Option<Timestamp>,
    /// Always `USD`.
    pub currency: &'static str,
    /// The plan's limits (none for pay-as-you-go).
    pub limits: Vec<LimitView>,
}

/// The limits of `account` in `period`, under the plan in force at the
/// partition's stream time (or the period's last instant).
pub fn limits_report(
    account: &AccountId,
    period: Period,
    st: &AccountState,
    plans: &PlanCatalog,
    book: &dyn Accounts,
) -> Result<LimitsReport, LookupError> {
    let at = st
        .stream_time
        .filter(|t| t.period() == period)
        .unwrap_or(Timestamp(period.end().0 - 1));
    let terms = book.terms_at(plans, account, at)?;
    let credit = crate::state::general_credit(st.adjustments.values(), at);
    let exposures = crate::spend::exposures(
        plans,
        book,
        account,
        period,
        st.jobs.iter().map(|(_, j)| j),
        |k| st.counters.get(k).copied().unwrap_or_default(),
        credit,
    )?;
    let limits = limits_for(plans, &terms, account, period)
        .into_iter()
        .map(|l| {
            let exposure = exposures.iter().find(|e| e.key == l.key);
            let c = st.counters.get(&l.key).copied().unwrap_or_default();
            let used = c.total();
            let thresholds: Vec<ThresholdView> = l
                .thresholds
                .iter()
                .map(|(id, level)| ThresholdView {
                    threshold: id.to_string(),
                    threshold_pct: match id {
                        crate::state::ThresholdId::Pct(p) => Some(*p),
                        crate::state::ThresholdId::Amount(_) | crate::state::ThresholdId::Runway(_) => None,
                    },
                    level: *level,
                    fired: st.fired.contains(&FiredKey {
                        usage: l.key.clone(),
                        threshold: *id,
                    }),
                })
                .collect();
            LimitView {
                limit: l.key.limit,
                period: l.key.scope(),
                kinds: l.kinds,
                limit_value: l.cap,
                charged: c.charged,
                in_flight: c.inflight,
                used,
                credit_grants: match l.key.limit {
                    LimitKind::Alert | LimitKind::SpendLimit => Money::ZERO,
                    _ => credit,
                },
                remaining: l.cap.map(|cap| {
                    let limit = match l.key.limit {
                        LimitKind::SpendLimit => cap,
                        _ if credit > Money::ZERO => crate::spend::with_credit(cap, c.charged, credit),
                        _ => cap,
                    };
                    (limit - used).max(Money::ZERO)
                }),
                used_pct: l.cap.filter(|cap| *cap > Money::ZERO).map(|cap| {
                    Money(
                        (used.0 * Decimal::ONE_HUNDRED / cap.0)
                            .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven),
                    )
                }),
                next_threshold: thresholds.iter().find(|t| !t.fired).map(|t| t.threshold.clone()),
                thresholds,
                policy: plans.policy(l.plan, l.key.limit),
                running_jobs: exposure.map_or(0, |e| e.running),
                burn_rate_per_second: exposure.map_or(Money::ZERO, Exposure::burn_rate),
                runway_seconds: match (exposure, l.key.limit) {
                    (_, LimitKind::Alert) => None,
                    (Some(e), _) => e.runway_seconds(),
                    (None, LimitKind::SpendLimit) => l.cap.filter(|cap| used >= *cap).map(|_| Decimal::ZERO),
                    (None, _) => l
                        .cap
                        .filter(|cap| used >= crate::spend::with_credit(*cap, c.charged, credit))
                        .map(|_| Decimal::ZERO),
                },
                runway_events_fired: st
                    .fired
                    .iter()
                    .filter(|f| f.usage == l.key && matches!(f.threshold, crate::state::ThresholdId::Runway(_)))
                    .map(|f| f.threshold.to_string())
                    .collect(),
            }
        })
        .collect();
    Ok(LimitsReport {
        account_id: account.clone(),
        plan: terms.plan,
        period,
        as_of: st.stream_time,
        currency: CURRENCY,
        limits,
    })
}

/// Why an admission question has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The question is invalid (an unknown model, a kind without a price).
    #[error("{}", .0.detail)]
    Invalid(crate::event::Invalid),
    /// The account's records cannot be read.
    #[error(transparent)]
    Lookup(#[from] LookupError),
}

/// One limit a job being admitted would count toward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdmissionLimit {
    /// Which limit.
    pub limit: LimitKind,
    /// The month, or `lifetime`.
    pub period: String,
    /// Its value.
    pub limit_value: Money,
    /// What happens when it is used up.
    pub policy: crate::plans::Policy,
    /// Usage charged against it.
    pub charged: Money,
    /// What the running jobs counting toward it have cost from their start
    /// to `as_of` (their latest heartbeats may be behind it).
    pub running_projected: Money,
    /// What credit grants for all usage have left (0 for the spend limit).
    pub credit_grants: Money,
    /// limit + credit_grants − charged − running_projected (negative once
    /// overspent).
    pub balance_after_running: Money,
}

/// The job a scheduler is about to place.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionRequest<'a> {
    /// Its kind.
    pub kind: JobKind,
    /// Its model (inference, workflow steps).
    pub model: Option<&'a ModelId>,
    /// How long it may run at most, if known.
    pub max_seconds: Option<Decimal>,
}

/// An advisory admission decision: may a job of this kind start now?
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Admission {
    /// The account.
    pub account_id: AccountId,
    /// Allowed or not.
    pub allow: bool,
    /// `ok`, `no_limit`, `over_limit_billed_at_list_price`, or why not:
    /// `free_credits_exhausted`, `model_api_cap_reached`,
    /// `workflow_quota_reached`, `spend_limit_reached`,
    /// `max_seconds_exceeds_balance`.
    pub reason: String,
    /// The plan in force at `as_of`.
    pub plan: Plan,
    /// The job's rate now.
    pub rate_per_second: Money,
    /// rate × max_seconds, when `max_seconds` was given.
    pub projected_job_cost: Option<Money>,
    /// The smallest balance left after the running jobs' projected cost,
    /// among the limits the job would count toward (`null`: none applies).
    pub balance_after_running: Option<Money>,
    /// Seconds the job could run on that balance at its rate.
    #[serde(with = "crate::output::opt_decimal")]
    pub affordable_seconds: Option<Decimal>,
    /// Every limit the job would count toward.
    pub limits: Vec<AdmissionLimit>,
    /// The stream time the answer reflects.
    pub as_of: Option<Timestamp>,
}

/// What a scheduler asks before placing a job: whether a job of `kind`
/// (and `model`) may start on `account` at stream time `now`, given what
/// is charged and what the running jobs have cost so far. A limit whose
/// policy is `stop` denies once its balance is used up, or when
/// `max_seconds` at the job's rate would exceed it; a `notify` limit
/// allows (usage beyond it is billed at list price).
pub fn admission(
    account: &AccountId,
    job: &AdmissionRequest<'_>,
    st: &AccountState,
    ctx: &crate::context::Context<'_>,
    now: Timestamp,
) -> Result<Admission, AdmissionError> {
    let (plans, book, rates) = (ctx.plans, ctx.accounts, ctx.rates);
    let (kind, model, max_seconds) = (job.kind, job.model, job.max_seconds);
    let rate = rates
        .rate_at(now, kind, model)
        .map_err(AdmissionError::Invalid)?
        .per_second;
    let terms = book.terms_at(plans, account, now)?;
    // The terms of each running job's start, looked up once.
    let mut running = Vec::new();
    for (_, j) in st.jobs.iter().filter(|(_, j)| j.is_running()) {
        if let Some(start) = j.start.as_ref() {
            running.push((j, start, book.terms_at(plans, account, start.time)?));
        }
    }
    let period = now.period();
    let specs = [
        crate::billing::limit_spec(plans, &terms, kind, account, period).filter(|s| s.key.limit != LimitKind::Alert),
        crate::billing::spend_spec(plans, &terms, account, period),
    ];
    let projected = |key: &crate::state::UsageKey| -> Money {
        running
            .iter()
            .filter_map(|(j, start, t)| {
                let counts = crate::billing::limit_spec(plans, t, start.info.kind, account, period)
                    .is_some_and(|s| &s.key == key)
                    || crate::billing::spend_spec(plans, t, account, period).is_some_and(|s| &s.key == key);
                counts.then(|| {
                    let end = j.charged_until(now, ctx.config.stop_grace_ms);
                    start.rate * rates.policy.rounding.total_seconds((end.0 - start.time.0).max(0))
                })
            })
            .sum()
    };
    let mut limits = Vec::new();
    let general = crate::state::general_credit(st.adjustments.values(), now);
    for spec in specs.into_iter().flatten() {
        let charged = st.counters.get(&spec.key).map_or(Money::ZERO, |c| c.charged);
        let running_projected = projected(&spec.key);
        let credit_grants = if spec.key.limit == LimitKind::SpendLimit {
            Money::ZERO
        } else {
            general
        };
        // What was charged beyond the limit is accounted for already
        // (drawn from grants, or billed): the grants' remainder is what
        // is left beyond it.
        let limit_value = if credit_grants > Money::ZERO {
            crate::spend::with_credit(spec.limit_value, charged, Money::ZERO)
        } else {
            spec.limit_value
        };
        limits.push(AdmissionLimit {
            limit: spec.key.limit,
            period: spec.key.scope(),
            limit_value: spec.limit_value,
            policy: plans.policy(spec.plan, spec.key.limit),
            charged,
            running_projected,
            credit_grants,
            balance_after_running: limit_value + credit_grants - charged - running_projected,
        });
    }
    let cost = max_seconds.map(|s| rate * s);
    let tightest = limits.iter().min_by_key(|l| l.balance_after_running);
    let binding = limits
        .iter()
        .filter(|l| l.policy == crate::plans::Policy::Stop)
        .find(|l| l.balance_after_running <= Money::ZERO || cost.is_some_and(|c| c > l.balance_after_running));
    let (allow, reason) = match binding {
        Some(l) if l.balance_after_running <= Money::ZERO => (false, l.limit.used_up_reason()),
        Some(_) => (false, "max_seconds_exceeds_balance"),
        None if limits.is_empty() => (true, "no_limit"),
        None if tightest.is_some_and(|l| l.balance_after_running <= Money::ZERO) => {
            (true, "over_limit_billed_at_list_price")
        }
        None => (true, "ok"),
    };
    let balance = tightest.map(|l| l.balance_after_running);
    Ok(Admission {
        account_id: account.clone(),
        allow,
        reason: reason.to_owned(),
        plan: terms.plan,
        rate_per_second: rate,
        projected_job_cost: cost,
        balance_after_running: balance,
        affordable_seconds: balance
            .and_then(|b| (rate > Money::ZERO).then(|| (b.0.max(Decimal::ZERO) / rate.0).trunc())),
        limits,
        as_of: st.stream_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::{Context, Meter, MeterConfig};
    use crate::output::Output;
    use crate::ratecard::RateCard;
    use crate::state::{keys, Table};
    use crate::values;

    fn ev(ty: &str, id: &str, job: &str, t: &str, data: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"{ty}","time":"{t}","subject":"{job}","data":{{"account_id":"a"{data}}}}}"#
        )
    }

    type Records = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

    /// Brings `store` up to date with the meter's changes, then builds the
    /// account state of `a` from it, as a store-backed reader would.
    fn state_of(store: &mut Records, meter: &mut Meter, period: BillingPeriod) -> AccountState {
        for c in meter.take_changes().unwrap_or_else(|e| panic!("{e}")) {
            match c.value {
                Some(v) => store.insert((c.table, c.key), v),
                None => store.remove(&(c.table, c.key)),
            };
        }
        let mut st = AccountState::default();
        let account = AccountId::from("a");
        for ((table, k), v) in store.iter() {
            let (table, k, v) = (*table, k.as_slice(), v.as_slice());
            match table {
                Table::Jobs => {
                    if let (Some((acc, job)), Ok(j)) = (keys::decode_job(k), values::decode::<Job>(table, v)) {
                        if acc == account {
                            st.jobs.push((job, j));
                        }
                    }
                }
                Table::Usage => {
                    if let (Some(key), Ok(c)) = (keys::decode_usage(k), values::decode(table, v)) {
                        st.counters.insert(key, c);
                    }
                }
                Table::Fired => {
                    st.fired.extend(keys::decode_fired(k));
                }
                Table::Statements => {
                    if keys::decode_statement(k) == Some((period, account.clone())) {
                        st.open = values::decode(table, v).ok();
                    }
                }
                Table::Closed => {
                    if keys::decode_statement(k) == Some((period, account.clone())) {
                        st.closed = values::decode_json(table, v).ok();
                    }
                }
                Table::Adjustments => {
                    if let (Some((acc, id)), Ok(a)) = (keys::decode_adjustment(k), serde_json::from_slice(v)) {
                        if acc == account {
                            st.adjustments.insert(id, a);
                        }
                    }
                }
                Table::Meta | Table::EventIds | Table::Expiries | Table::OpenJobs => {}
            }
        }
        st.stream_time = meter.stream_time();
        st
    }

    #[test]
    fn the_usage_page_shows_the_overrides_and_the_list_amount() {
        let rates = RateCard::from_toml(include_str!("../../../config/rate-card.toml")).expect("card");
        let plans = PlanCatalog::default();
        let book = crate::plans::AccountBook::new(&plans);
        let config = MeterConfig::default();
        let ctx = Context::new(&rates, &plans, &book, &config);
        let mut meter = Meter::tracking_changes();
        let mut out = Vec::new();
        let po = r#"{"adjustment_id":"sdxl-20","account_id":"a","type":"price_override","selector":{"model":"sdxl-1.0"},"multiplier":"0.80","effective_from":"2024-05-01T00:00:00Z","reason":"outage goodwill","requested_by":"support@platform"}"#;
        meter
            .apply_adjustment(&ctx, po.as_bytes(), None, &mut out)
            .expect("adjustment");
        for e in [
            ev(
                "job.started",
                "1",
                "j",
                "2024-05-02T00:00:00Z",
                r#","kind":"inference","model":"sdxl-1.0""#,
            ),
            ev(
                "job.stopped",
                "2",
                "j",
                "2024-05-02T00:01:40Z",
                r#","status":"succeeded""#,
            ),
        ] {
            meter.apply(&ctx, e.as_bytes(), None, &mut out).expect("apply");
        }
        let may = BillingPeriod::month(Period::new(2024, 5));
        let st = state_of(&mut Records::new(), &mut meter, may);
        let r = usage_report(&AccountId::from("a"), may, &st, &plans, &book, rates.policy.rounding).expect("report");
        // 100 s of sdxl-1.0 at $0.00055, 20 % off.
        assert_eq!(r.totals.amount, Money::parse("0.044").expect("m"));
        assert_eq!(r.totals.list_amount, Money::parse("0.055").expect("m"));
        assert_eq!(r.adjustments.len(), 1);
        assert_eq!(
            (
                r.adjustments[0].adjustment_id.as_str(),
                r.adjustments[0].reason.as_str()
            ),
            ("sdxl-20", "outage goodwill")
        );
        assert_eq!(r.adjustments[0].amount, Money::parse("-0.011").expect("m"));
    }

    #[test]
    fn limits_show_runway_and_admission_answers_from_the_balance() {
        let rates = RateCard::from_toml(
            "[[versions]]\nversion='v'\neffective_from='2024-01-01T00:00:00Z'\nfine_tune_per_second='0.001'\nmodels.m={per_second='0.01'}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let plans = PlanCatalog::default();
        let mut book = crate::AccountBook::new(&plans);
        book.insert(
            crate::plans::AccountRecord::parse(
                br#"{"account_id":"a","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"2.00"}"#,
            )
            .unwrap_or_else(|e| panic!("{e:?}")),
        );
        let config = MeterConfig::default();
        let ctx = Context::new(&rates, &plans, &book, &config);
        let mut meter = Meter::tracking_changes();
        let mut out = Vec::new();
        let inf = r#","kind":"inference","model":"m""#;
        // $0.50 charged; j2 runs at $0.01/s, heartbeat at 30 s ($0.30 in flight).
        for e in [
            ev("job.started", "1", "j1", "2024-05-01T00:00:00Z", inf),
            ev(
                "job.stopped",
                "2",
                "j1",
                "2024-05-01T00:00:50Z",
                r#","status":"succeeded""#,
            ),
            ev("job.started", "3", "j2", "2024-05-01T00:01:00Z", inf),
            ev("job.heartbeat", "4", "j2", "2024-05-01T00:01:30Z", ""),
        ] {
            meter.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
        }
        let may = BillingPeriod::month(Period::new(2024, 5));
        let mut store = Records::new();
        let st = state_of(&mut store, &mut meter, may);
        let a = AccountId::from("a");
        let limits = limits_report(&a, may.limit_month(), &st, &plans, &book).unwrap();
        let credits = &limits.limits[0];
        assert_eq!(credits.limit, LimitKind::FreeCredits);
        assert_eq!(
            (credits.running_jobs, credits.burn_rate_per_second),
            (1, Money::parse("0.01").unwrap_or_default())
        );
        // $2.00 − $0.80 used = $1.20 at $0.01/s.
        assert_eq!(credits.runway_seconds.map(|d| d.to_string()), Some("120.000".into()));
        assert_eq!(credits.policy, crate::plans::Policy::Stop);
        assert_eq!(credits.runway_events_fired, vec!["runway-600s".to_owned()]);
        let ask = |max: Option<i64>, now: &str| {
            let model = ModelId::from("m");
            let req = AdmissionRequest {
                kind: JobKind::Inference,
                model: Some(&model),
                max_seconds: max.map(Decimal::from),
            };
            let now = Timestamp::parse(now).unwrap_or_default();
            admission(&a, &req, &st, &ctx, now).unwrap_or_else(|e| panic!("{e:?}"))
        };
        // At 00:01:30, j2 has cost $0.30: $1.20 left, 120 s of a $0.01/s job.
        let ok = ask(Some(100), "2024-05-01T00:01:30Z");
        assert_eq!((ok.allow, ok.reason.as_str()), (true, "ok"));
        assert_eq!(ok.balance_after_running, Money::parse("1.20"));
        assert_eq!(ok.affordable_seconds, Some(Decimal::from(120)));
        let too_long = ask(Some(121), "2024-05-01T00:01:30Z");
        assert_eq!(
            (too_long.allow, too_long.reason.as_str()),
            (false, "max_seconds_exceeds_balance")
        );
        // Projected past its last heartbeat to as_of: at 00:03:30 j2 has cost
        // $1.50 and the credits are gone.
        let gone = ask(None, "2024-05-01T00:03:30Z");
        assert_eq!((gone.allow, gone.reason.as_str()), (false, "free_credits_exhausted"));
        assert_eq!(
            gone.limits[0].running_projected,
            Money::parse("1.50").unwrap_or_default()
        );
        let unknown = ModelId::from("nope");
        let req = AdmissionRequest {
            kind: JobKind::Inference,
            model: Some(&unknown),
            max_seconds: None,
        };
        assert!(admission(
            &a,
            &req,
            &st,
            &ctx,
            Timestamp::parse("2024-05-01T00:01:30Z").unwrap_or_default()
        )
        .is_err());
    }

    #[test]
    fn admission_names_the_limit_that_denies_or_why_it_allows() {
        let rates = RateCard::from_toml(
            "[[versions]]\nversion='v'\neffective_from='2024-01-01T00:00:00Z'\nfine_tune_per_second='0.001'\nmodels.m={per_second='0.01'}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // One account "a" per case: its record, the plans, and the reason.
        let cases = [
            (
                r#"{"account_id":"a","plan":"payg","effective_from":"2024-01-01T00:00:00Z"}"#,
                PlanCatalog::default(),
                true,
                "no_limit",
            ),
            (
                r#"{"account_id":"a","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"0.10"}"#,
                PlanCatalog::default(),
                true,
                "over_limit_billed_at_list_price",
            ),
            (
                r#"{"account_id":"a","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"0.10"}"#,
                PlanCatalog {
                    pro_on_cap: crate::plans::Policy::Stop,
                    ..PlanCatalog::default()
                },
                false,
                "model_api_cap_reached",
            ),
            (
                r#"{"account_id":"a","plan":"payg","effective_from":"2024-01-01T00:00:00Z","spend_limit":"0.10"}"#,
                PlanCatalog::default(),
                false,
                "spend_limit_reached",
            ),
        ];
        for (record, plans, allow, reason) in cases {
            let mut book = crate::AccountBook::new(&plans);
            book.insert(crate::plans::AccountRecord::parse(record.as_bytes()).unwrap_or_else(|e| panic!("{e:?}")));
            let config = MeterConfig::default();
            let ctx = Context::new(&rates, &plans, &book, &config);
            let mut meter = Meter::tracking_changes();
            let mut out = Vec::new();
            // $0.50 of inference charged this month.
            let inf = r#","kind":"inference","model":"m""#;
            for e in [
                ev("job.started", "1", "j1", "2024-05-01T00:00:00Z", inf),
                ev(
                    "job.stopped",
                    "2",
                    "j1",
                    "2024-05-01T00:00:50Z",
                    r#","status":"succeeded""#,
                ),
            ] {
                meter.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
            }
            let mut store = Records::new();
            let st = state_of(&mut store, &mut meter, Period::new(2024, 5).into());
            let model = ModelId::from("m");
            let req = AdmissionRequest {
                kind: JobKind::Inference,
                model: Some(&model),
                max_seconds: None,
            };
            let now = Timestamp::parse("2024-05-01T00:01:00Z").unwrap_or_default();
            let a = admission(&AccountId::from("a"), &req, &st, &ctx, now).unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!((a.allow, a.reason.as_str()), (allow, reason), "{record}");
        }
    }

    #[test]
    fn a_credit_grant_reopens_admission_on_a_used_up_limit() {
        let rates = RateCard::from_toml(
            "[[versions]]\nversion='v'\neffective_from='2024-01-01T00:00:00Z'\nfine_tune_per_second='0.001'\nmodels.m={per_second='0.01'}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let plans = PlanCatalog {
            pro_on_cap: crate::plans::Policy::Stop,
            ..PlanCatalog::default()
        };
        let mut book = crate::AccountBook::new(&plans);
        book.insert(
            crate::plans::AccountRecord::parse(
                br#"{"account_id":"a","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"0.10"}"#,
            )
            .unwrap_or_else(|e| panic!("{e:?}")),
        );
        let config = MeterConfig::default();
        let ctx = Context::new(&rates, &plans, &book, &config);
        let mut meter = Meter::tracking_changes();
        let mut out = Vec::new();
        let inf = r#","kind":"inference","model":"m""#;
        for e in [
            ev("job.started", "1", "j1", "2024-05-01T00:00:00Z", inf),
            ev(
                "job.stopped",
                "2",
                "j1",
                "2024-05-01T00:00:50Z",
                r#","status":"succeeded""#,
            ),
        ] {
            meter.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
        }
        let mut store = Records::new();
        let model = ModelId::from("m");
        let req = AdmissionRequest {
            kind: JobKind::Inference,
            model: Some(&model),
            max_seconds: None,
        };
        let now = Timestamp::parse("2024-05-01T00:01:00Z").unwrap_or_default();
        let st = state_of(&mut store, &mut meter, Period::new(2024, 5).into());
        let a = admission(&AccountId::from("a"), &req, &st, &ctx, now).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((a.allow, a.reason.as_str()), (false, "model_api_cap_reached"));
        // $0.50 charged against a $0.10 cap; a $1.00 grant leaves $1.00.
        let grant = r#"{"adjustment_id":"g","account_id":"a","type":"credit_grant","amount":"1.00","reason":"r","requested_by":"s"}"#;
        meter
            .apply_adjustment(&ctx, grant.as_bytes(), None, &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        let st = state_of(&mut store, &mut meter, Period::new(2024, 5).into());
        let a = admission(&AccountId::from("a"), &req, &st, &ctx, now).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((a.allow, a.reason.as_str()), (true, "ok"));
        let cap = a
            .limits
            .iter()
            .find(|l| l.limit == LimitKind::ModelApiCap)
            .expect("the cap");
        assert_eq!(
            (cap.credit_grants, cap.balance_after_running),
            (
                Money::parse("1.00").unwrap_or_default(),
                Money::parse("1.00").unwrap_or_default()
            )
        );
        let limits = limits_report(&AccountId::from("a"), Period::new(2024, 5), &st, &plans, &book)
            .unwrap_or_else(|e| panic!("{e}"));
        let l = limits
            .limits
            .iter()
            .find(|l| l.limit == LimitKind::ModelApiCap)
            .expect("the cap");
        assert_eq!(l.credit_grants, Money::parse("1.00").unwrap_or_default());
        assert_eq!(l.remaining, Some(Money::parse("1.00").unwrap_or_default()));
    }

    #[test]
    fn usage_matches_charges_and_statement() {
        let rates = RateCard::from_toml(
            "[[versions]]\nversion='v'\neffective_from='2024-01-01T00:00:00Z'\nfine_tune_per_second='0.001'\nmodels.m={per_second='0.01'}\nmodels.n={per_second='0.02'}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let plans = PlanCatalog::default();
        let mut book = crate::AccountBook::new(&plans);
        book.insert(
            crate::plans::AccountRecord::parse(
                br#"{"account_id":"a","plan":"free","effective_from":"2024-01-01T00:00:00Z"}"#,
            )
            .unwrap_or_else(|e| panic!("{e:?}")),
        );
        let config = MeterConfig::default();
        let ctx = Context::new(&rates, &plans, &book, &config);
        let mut meter = Meter::tracking_changes();
        let mut out = Vec::new();
        let inf = r#","kind":"inference","model":"m""#;
        let wf =
            |run: &str, model: &str| format!(r#","kind":"workflow_step","model":"{model}","workflow_run_id":"{run}""#);
        for e in [
            ev("job.started", "1", "j1", "2024-05-01T00:00:00Z", inf),
            ev(
                "job.stopped",
                "2",
                "j1",
                "2024-05-01T00:00:10Z",
                r#","status":"succeeded""#,
            ),
            ev("job.started", "3", "j2", "2024-05-01T00:01:00Z", inf),
            ev(
                "job.stopped",
                "4",
                "j2",
                "2024-05-01T00:01:21Z",
                r#","status":"succeeded""#,
            ),
            ev("job.started", "5", "s1", "2024-05-01T00:02:00Z", &wf("r1", "m")),
            ev(
                "job.stopped",
                "6",
                "s1",
                "2024-05-01T00:02:05Z",
                r#","status":"succeeded""#,
            ),
            ev("job.started", "7", "s2", "2024-05-01T00:02:05Z", &wf("r1", "n")),
            ev(
                "job.stopped",
                "8",
                "s2",
                "2024-05-01T00:02:15Z",
                r#","status":"succeeded""#,
            ),
            ev("job.started", "9", "s3", "2024-05-01T00:02:15Z", &wf("r1", "m")),
            ev("job.heartbeat", "10", "s3", "2024-05-01T00:02:45Z", ""),
        ] {
            meter.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
        }
        let may = BillingPeriod::month(Period::new(2024, 5));
        let mut store = Records::new();
        let st = state_of(&mut store, &mut meter, may);
        let r = usage_report(&AccountId::from("a"), may, &st, &plans, &book, rates.policy.rounding).unwrap();
        let charges: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Charge(c) => Some(c),
                _ => None,
            })
            .collect();
        let total: Money = charges.iter().fold(Money::ZERO, |a, c| a + c.amount);
        assert_eq!(r.status, PeriodStatus::Open);
        assert_eq!(r.plan, Plan::Free);
        assert_eq!(r.totals.amount, total);
        assert_eq!(r.totals.jobs, 4);
        let m = r
            .lines
            .iter()
            .find(|l| l.kind == JobKind::Inference)
            .unwrap_or_else(|| panic!("no inference line"));
        assert_eq!((m.jobs, m.billable_seconds), (2, Decimal::from(31)));
        assert_eq!(m.average_duration_seconds.to_string(), "15.500");
        assert_eq!(r.workflow_runs.len(), 1);
        let run = &r.workflow_runs[0];
        assert_eq!(run.steps.len(), 2);
        assert_eq!(run.running_steps, 1);
        assert_eq!(run.billable_seconds, Decimal::from(15));
        assert_eq!(run.amount.to_string(), "0.25");
        assert_eq!(r.in_flight.len(), 1);
        assert_eq!(r.in_flight[0].running_seconds, Decimal::from(30));
        assert_eq!(r.totals.credits_applied, total, "free credits cover it all");
        assert_eq!(r.totals.usage_due, Money::ZERO);

        let l = limits_report(&AccountId::from("a"), may.limit_month(), &st, &plans, &book).unwrap();
        assert_eq!(l.limits.len(), 1);
        let fc = &l.limits[0];
        assert_eq!(fc.limit, LimitKind::FreeCredits);
        assert_eq!(fc.period, "lifetime");
        assert_eq!(fc.charged, total);
        assert_eq!(fc.used, total + fc.in_flight);
        assert_eq!(fc.limit_value.map(|c| c - fc.used), fc.remaining);
        assert_eq!(fc.next_threshold.as_deref(), Some("80"));

        // Close May: the report becomes the statement's figures.
        for e in [
            ev(
                "job.stopped",
                "11",
                "s3",
                "2024-05-01T00:03:00Z",
                r#","status":"succeeded""#,
            ),
            ev("job.started", "12", "j9", "2024-06-02T00:00:00Z", inf),
        ] {
            meter.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
        }
        let st = state_of(&mut store, &mut meter, may);
        assert!(
            st.open.is_none() && st.closed.is_some(),
            "{:?} {:?} {out:?}",
            st.open,
            st.closed
        );
        let r2 = usage_report(&AccountId::from("a"), may, &st, &plans, &book, rates.policy.rounding).unwrap();
        let statement = out
            .iter()
            .find_map(|o| match o {
                Output::Statement(s) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no statement"));
        assert_eq!(r2.status, PeriodStatus::Closed);
        assert_eq!(r2.lines, statement.lines);
        assert_eq!(r2.totals.total_due, Some(statement.total_due));
        assert!(r2.in_flight.is_empty());
    }
}
