//! Output events: charges, limit events, statements and rejects. Field
//! order is the contract's; amounts are JSON strings.

use crate::cycle::BillingPeriod;
use crate::event::{JobKind, JobStatus, RejectReason};
use crate::money::{AccountId, JobId, ModelId, Money};
use crate::plans::Plan;
use crate::time::{Period, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// What a charge bills: a job of a kind, or (`adjustment`) a manual charge
/// or credit note written by support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeKind {
    /// A model API call.
    Inference,
    /// Fine-tuning.
    FineTune,
    /// One step of a workflow run.
    WorkflowStep,
    /// A manual charge or credit note (`manual_charge`).
    Adjustment,
}

impl ChargeKind {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeKind::Inference => "inference",
            ChargeKind::FineTune => "fine_tune",
            ChargeKind::WorkflowStep => "workflow_step",
            ChargeKind::Adjustment => "adjustment",
        }
    }

    /// The job kind billed (`None`: an adjustment).
    pub fn job_kind(self) -> Option<JobKind> {
        match self {
            ChargeKind::Inference => Some(JobKind::Inference),
            ChargeKind::FineTune => Some(JobKind::FineTune),
            ChargeKind::WorkflowStep => Some(JobKind::WorkflowStep),
            ChargeKind::Adjustment => None,
        }
    }
}

impl From<JobKind> for ChargeKind {
    fn from(k: JobKind) -> Self {
        match k {
            JobKind::Inference => ChargeKind::Inference,
            JobKind::FineTune => ChargeKind::FineTune,
            JobKind::WorkflowStep => ChargeKind::WorkflowStep,
        }
    }
}

impl PartialEq<JobKind> for ChargeKind {
    fn eq(&self, other: &JobKind) -> bool {
        self.job_kind() == Some(*other)
    }
}

/// One billed slice of a job (`jobmeter.charges`).
///
/// A job inside one period yields one charge; a job crossing a month
/// boundary yields one per period; an orphaned job that later stops yields
/// adjustment charges (`adjusts` names the charge they correct).
/// `started_at`/`stopped_at`/`duration_ms` describe the slice billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Derived from account, job, service period and role; never random.
    pub charge_id: String,
    /// The account billed.
    pub account_id: AccountId,
    /// The job (null for a manual charge).
    pub job_id: Option<JobId>,
    /// The job's kind, or `adjustment` for a manual charge.
    pub kind: ChargeKind,
    /// The model (null for fine-tunes that name none).
    pub model: Option<ModelId>,
    /// The workflow run (workflow steps).
    pub workflow_run_id: Option<String>,
    /// How the job ended (`orphaned` when the meter closed it); null for
    /// a manual charge.
    pub status: Option<JobStatus>,
    /// Start of the slice billed.
    pub started_at: Timestamp,
    /// End of the slice billed.
    pub stopped_at: Timestamp,
    /// Milliseconds of the slice (for an adjustment, the difference).
    pub duration_ms: i64,
    /// Seconds billed (for an adjustment, the difference; may be negative).
    #[serde(with = "rust_decimal::serde::str")]
    pub billable_seconds: Decimal,
    /// USD per second from the rate-card version in force at job start.
    pub rate_per_second: Money,
    /// That version's name (null for a manual charge).
    pub rate_card_version: Option<String>,
    /// billable_seconds × rate_per_second, exact.
    pub amount: Money,
    /// What the account owes after plan inclusion and credits.
    pub amount_due: Money,
    /// Always `USD`.
    pub currency: String,
    /// The billing period whose statement carries this charge (`YYYY-MM`
    /// or an ISO 8601 interval, rule 6).
    pub period: BillingPeriod,
    /// The billing period the usage happened in (differs from `period` for
    /// late usage).
    pub service_period: BillingPeriod,
    /// For an adjustment, the id of the charge it corrects.
    pub adjusts: Option<String>,
    /// The pricing adjustment (a price override) that set the rate or
    /// caused the charge; null otherwise. The list rate stays visible in
    /// `rate_card_version`.
    #[serde(default)]
    pub adjustment_id: Option<String>,
}

impl Charge {
    /// The job's id, `""` for a manual charge.
    pub fn job(&self) -> &str {
        self.job_id.as_ref().map_or("", JobId::as_str)
    }
}

/// Which limit a limit event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Free credits, per account for its lifetime.
    FreeCredits,
    /// Pro model-API (inference) cap, per month.
    ModelApiCap,
    /// Pro workflow quota, per month.
    WorkflowQuota,
    /// Enterprise alert amount, per month.
    Alert,
    /// An account's own monthly spend limit (`spend_limit` in its record):
    /// the amount due for the month's usage.
    SpendLimit,
}

impl LimitKind {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::FreeCredits => "free_credits",
            LimitKind::ModelApiCap => "model_api_cap",
            LimitKind::WorkflowQuota => "workflow_quota",
            LimitKind::Alert => "alert",
            LimitKind::SpendLimit => "spend_limit",
        }
    }

    /// Why jobs are stopped, or a job refused, when this limit is used up
    /// (the `reason` of a `job.stop`).
    pub fn used_up_reason(self) -> &'static str {
        match self {
            LimitKind::FreeCredits => "free_credits_exhausted",
            LimitKind::ModelApiCap => "model_api_cap_reached",
            LimitKind::WorkflowQuota => "workflow_quota_reached",
            LimitKind::SpendLimit => "spend_limit_reached",
            LimitKind::Alert => "alert_reached",
        }
    }

    /// Every limit kind, for metrics registries.
    pub const ALL: [LimitKind; 5] = [
        LimitKind::FreeCredits,
        LimitKind::ModelApiCap,
        LimitKind::WorkflowQuota,
        LimitKind::Alert,
        LimitKind::SpendLimit,
    ];
}

/// What the notification service should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitAction {
    /// Tell the user.
    Notify,
    /// Tell the user the pro cap is reached and point them to enterprise.
    UpgradeToEnterprise,
    /// Free credits spent: block further free usage.
    Block,
}

/// A threshold crossed (`jobmeter.limits`); fires once per key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitEvent {
    /// Derived from account, limit, period (or `lifetime`) and threshold.
    pub event_id: String,
    /// The account.
    pub account_id: AccountId,
    /// The plan whose limit it is.
    pub plan: Plan,
    /// The period in which the threshold was crossed.
    pub period: Period,
    /// Which limit.
    pub limit: LimitKind,
    /// 80, 100… (null for enterprise alerts).
    pub threshold_pct: Option<u32>,
    /// The limit (for alerts, the alert amount).
    pub limit_value: Money,
    /// Usage counted toward the limit when it fired (charged plus in-flight).
    pub usage_value: Money,
    /// Always `USD`.
    pub unit: String,
    /// The job whose charge or heartbeat crossed it.
    pub triggered_by_job: JobId,
    /// Event time of the crossing.
    pub at: Timestamp,
    /// What to do.
    pub action: LimitAction,
    /// For a runway event: the horizon it warns about, in seconds (absent
    /// on threshold events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon_seconds: Option<u64>,
    /// For a runway event: seconds until the limit is used up at the burn
    /// rate, to the millisecond, rounded down.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal")]
    pub runway_seconds: Option<Decimal>,
    /// For a runway event: the sum of the per-second rates of the jobs
    /// running against the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burn_rate_per_second: Option<Money>,
}

/// `Option<Decimal>` as an optional JSON string.
pub(crate) mod opt_decimal {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&d.to_string()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// What a command asks a worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandType {
    /// Stop the job now.
    #[serde(rename = "job.stop")]
    JobStop,
}

/// A command to the workers (`jobmeter.commands`): today only `job.stop`,
/// published once per job when a limit whose policy is `stop` is used up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// `<account>/<job>/stop`: one per job, ever.
    pub command_id: String,
    /// `job.stop`.
    #[serde(rename = "type")]
    pub kind: CommandType,
    /// The account.
    pub account_id: AccountId,
    /// The job to stop.
    pub job_id: JobId,
    /// Why, machine-readable: `free_credits_exhausted`, `model_api_cap_reached`,
    /// `workflow_quota_reached`, `spend_limit_reached`.
    pub reason: String,
    /// The limit that was used up.
    pub limit: LimitKind,
    /// The account's time when the command was issued: the latest event
    /// time among the triggering event and the account's running jobs'
    /// starts and heartbeats. The job is charged to at most this instant
    /// plus the stop grace.
    pub at: Timestamp,
}

/// One line of a statement: one (kind, model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    /// Job kind.
    pub kind: JobKind,
    /// Model (null for fine-tunes that name none).
    pub model: Option<ModelId>,
    /// Jobs with usage in the period (adjustments do not add jobs).
    pub jobs: u64,
    /// Seconds billed.
    #[serde(with = "rust_decimal::serde::str")]
    pub billable_seconds: Decimal,
    /// billable_seconds / jobs, to the millisecond (half-even).
    #[serde(with = "rust_decimal::serde::str")]
    pub average_duration_seconds: Decimal,
    /// Sum of list amounts.
    pub amount: Money,
}

/// A pricing adjustment on a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementAdjustment {
    /// The adjustment.
    pub adjustment_id: String,
    /// Its type (`price_override`, `override_end`, `job_refund`,
    /// `manual_charge`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Why, as support wrote it.
    pub reason: String,
    /// Who asked for it (`requested_by`).
    #[serde(default)]
    pub requested_by: String,
    /// What it changed in the period: rated amount − list amount for a
    /// price override, the negated amounts of a refund, a manual charge's
    /// amount.
    pub amount: Money,
}

/// A credit grant on a statement: what it covered in the period and what
/// it has left at the period's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementCredit {
    /// The grant.
    pub adjustment_id: String,
    /// What it covered of this period's charges (net of refunds).
    pub applied: Money,
    /// What it has left at the period's last instant.
    pub remaining: Money,
}

/// An account's bill for a closed period (`jobmeter.statements`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StatementIn")]
pub struct Statement {
    /// The account.
    pub account_id: AccountId,
    /// The billing period (`YYYY-MM` or an ISO 8601 interval, rule 6).
    pub period: BillingPeriod,
    /// The period's first instant.
    pub period_start: Timestamp,
    /// The first instant after the period (exclusive).
    pub period_end: Timestamp,
    /// The statement cadence the period was cut by.
    pub cadence: crate::plans::Cadence,
    /// The plan in force at the period's last instant.
    pub plan: Plan,
    /// Per (kind, model) lines, ordered by kind then model.
    pub lines: Vec<StatementLine>,
    /// Pro fee (intro or regular) if the account was on pro in the period.
    pub subscription_fee: Money,
    /// Free credits and credit grants drawn down by this period's charges.
    pub credits_applied: Money,
    /// Pro usage included in the cap and quota.
    pub included_usage: Money,
    /// The pricing adjustments that changed this period's usage, each with
    /// its reason and the amount it changed (rated − list).
    pub adjustments: Vec<StatementAdjustment>,
    /// Each credit grant that covered charges of the period (their sum is
    /// part of `credits_applied`).
    pub credit_grants: Vec<StatementCredit>,
    /// What every credit grant of the account has left at the period's
    /// last instant.
    pub credit_balance: Money,
    /// Sum of amounts due plus the fee, rounded to cents half-even.
    pub total_due: Money,
    /// Always `USD`.
    pub currency: String,
}

/// A statement as stored or published: one written before statements
/// carried their bounds and cadence (a calendar month, monthly) reads back
/// with them.
#[derive(Deserialize)]
struct StatementIn {
    account_id: AccountId,
    period: BillingPeriod,
    period_start: Option<Timestamp>,
    period_end: Option<Timestamp>,
    cadence: Option<crate::plans::Cadence>,
    plan: Plan,
    lines: Vec<StatementLine>,
    subscription_fee: Money,
    credits_applied: Money,
    included_usage: Money,
    #[serde(default)]
    adjustments: Vec<StatementAdjustment>,
    #[serde(default)]
    credit_grants: Vec<StatementCredit>,
    #[serde(default)]
    credit_balance: Money,
    total_due: Money,
    currency: String,
}

impl From<StatementIn> for Statement {
    fn from(s: StatementIn) -> Statement {
        Statement {
            account_id: s.account_id,
            period: s.period,
            period_start: s.period_start.unwrap_or(s.period.start),
            period_end: s.period_end.unwrap_or(s.period.end),
            cadence: s.cadence.unwrap_or(crate::plans::Cadence::Monthly),
            plan: s.plan,
            lines: s.lines,
            subscription_fee: s.subscription_fee,
            credits_applied: s.credits_applied,
            included_usage: s.included_usage,
            adjustments: s.adjustments,
            credit_grants: s.credit_grants,
            credit_balance: s.credit_balance,
            total_due: s.total_due,
            currency: s.currency,
        }
    }
}

/// Where an input came from (for DLQ headers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Topic (or input file). Shared: every record of a partition names
    /// the same topic.
    pub topic: std::sync::Arc<str>,
    /// Partition (0 for files).
    pub partition: i32,
    /// Offset (line number for files).
    pub offset: i64,
    /// The record's own timestamp (Kafka CreateTime; for files, the
    /// optional leading field of a line). An event whose `time` is too far
    /// from it is refused (`time_out_of_range`). Never stored.
    #[serde(skip)]
    pub record_time: Option<Timestamp>,
}

/// A refused input: original bytes, reason and origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// What was wrong.
    pub detail: String,
    /// The original bytes, untouched.
    pub raw: Vec<u8>,
    /// Where it came from.
    pub origin: Option<Origin>,
}

/// Everything the meter emits, in the order it emits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A charge.
    Charge(Charge),
    /// A limit event.
    Limit(LimitEvent),
    /// A statement.
    Statement(Statement),
    /// A command to the workers.
    Command(Command),
    /// A refused input.
    Reject(Rejected),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_names_its_bounds_and_cadence_and_an_older_one_reads_back_with_them() {
        let old = r#"{"account_id":"a","period":"2024-04","plan":"payg","lines":[],"subscription_fee":"0.00","credits_applied":"0","included_usage":"0","total_due":"1.20","currency":"USD"}"#;
        let s: Statement = serde_json::from_str(old).unwrap();
        assert_eq!(s.period_start, Timestamp::parse("2024-04-01T00:00:00Z").unwrap());
        assert_eq!(s.period_end, Timestamp::parse("2024-05-01T00:00:00Z").unwrap());
        assert_eq!(s.cadence, crate::plans::Cadence::Monthly);
        let text = serde_json::to_string(&s).unwrap();
        assert!(
            text.starts_with(r#"{"account_id":"a","period":"2024-04","period_start":"2024-04-01T00:00:00.000Z","period_end":"2024-05-01T00:00:00.000Z","cadence":"monthly","plan":"payg""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Statement>(&text).unwrap(), s);
    }
}
