//! The meter's state, as data.
//!
//! Everything a partition's meter knows lives in these types: open and
//! recently closed jobs, usage counters per limit, thresholds already fired,
//! and statement accumulators of open periods. Each record kind has a key
//! codec and a value codec here; where the records are kept (memory, RocksDB,
//! a Kafka changelog) is the caller's business. Indexes (dedup keys, timers)
//! are derived from the jobs on restore and never stored.
//!
//! Key layouts (all strings are length-prefixed with a big-endian u16, so
//! keys sort by their fields and never collide):
//!
//! ```text
//! jobs     : len|account  len|job_id
//! usage    : len|account  limit:u8  period:u32 BE (0xFFFFFFFF = lifetime)
//! fired    : len|account  limit:u8  period:u32 BE  len|threshold
//! stmts    : period  len|account
//! closed   : period  len|account      (value: the emitted Statement)
//!   period: a calendar month as u32 BE ordinal; any other billing period
//!   as 0xFFFFFFFF, start i64 BE ms, end i64 BE ms
//! meta     : "stream_time" (i64 BE ms), "fees_through" (period u32 BE)
//! ```
//!
//! `closed` holds the statements of closed periods as they were emitted.
//! The meter only writes them (it never needs them again); they are there
//! so the usage API can answer for closed months, and they travel through
//! the changelog like every other record.

use crate::cycle::BillingPeriod;
use crate::event::{EventKey, JobStatus, StartInfo};
use crate::money::{AccountId, JobId, ModelId, Money};
use crate::output::{LimitKind, Origin};
use crate::time::{Period, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A job's identity within a partition.
pub type JobKey = (AccountId, JobId);

/// The accepted start of a job, with the rate fixed at that instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRec {
    /// Idempotency key of the start event.
    pub key: EventKey,
    /// Start time.
    pub time: Timestamp,
    /// Kind, model, workflow run.
    pub info: StartInfo,
    /// USD per second from the version in force at `time`.
    pub rate: Money,
    /// That version's name.
    pub version: String,
}

/// A job's stop: applied, or pending while its start has not arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRec {
    /// Idempotency key of the stop event.
    pub key: EventKey,
    /// Stop time.
    pub time: Timestamp,
    /// How it ended.
    pub status: JobStatus,
    /// The original bytes while pending (kept so a DLQ record is exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_raw: Option<String>,
    /// Where the pending stop came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// The in-flight usage a running job has contributed to a limit counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accrual {
    /// Counter it was added to.
    pub counter: UsageKey,
    /// Amount added.
    pub amount: Money,
}

/// A pricing adjustment as applied: the record, and for a price
/// override the end that `override_end` records have moved it to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAdjustment {
    /// The record as received (duplicates are compared with it).
    pub adjustment: crate::adjust::Adjustment,
    /// A price override's end as moved since (`None`: as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_until: Option<Timestamp>,
    /// A credit grant: how much of it charges have drawn.
    #[serde(default, skip_serializing_if = "Money::is_zero_ref")]
    pub used: Money,
    /// A credit grant: when a `credit_void` ended it (event time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided_at: Option<Timestamp>,
    /// A credit grant: the meter's stream time when it was applied (the
    /// older of two grants expiring together is drawn first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_at: Option<Timestamp>,
}

impl StoredAdjustment {
    /// An adjustment as applied, nothing drawn or moved yet.
    pub fn new(adjustment: crate::adjust::Adjustment) -> Self {
        StoredAdjustment {
            adjustment,
            moved_until: None,
            used: Money::ZERO,
            voided_at: None,
            granted_at: None,
        }
    }

    /// A credit grant's amount, expiry and selector (`None`: not a grant).
    pub fn grant(&self) -> Option<(Money, Option<Timestamp>, &crate::adjust::Selector)> {
        match &self.adjustment.body {
            crate::adjust::AdjustmentBody::CreditGrant {
                amount,
                expires_at,
                selector,
            } => Some((*amount, *expires_at, selector)),
            _ => None,
        }
    }

    /// A credit grant's unused remainder usable at `t`: nothing once it
    /// has expired or was voided.
    pub fn remaining_at(&self, t: Timestamp) -> Money {
        match self.grant() {
            Some((amount, expires_at, _))
                if expires_at.is_none_or(|e| t < e) && self.voided_at.is_none_or(|v| t < v) =>
            {
                (amount - self.used).max(Money::ZERO)
            }
            _ => Money::ZERO,
        }
    }
}

/// What the credit grants among `adjustments` that cover all usage (no
/// selector) have left at `t`: what spend control adds to a plan's limit
/// (a grant for one kind or model covers its charges, but is not counted
/// ahead of them).
pub fn general_credit<'a>(adjustments: impl IntoIterator<Item = &'a StoredAdjustment>, t: Timestamp) -> Money {
    adjustments
        .into_iter()
        .filter(|s| {
            s.grant()
                .is_some_and(|(_, _, sel)| *sel == crate::adjust::Selector::default())
        })
        .fold(Money::ZERO, |sum, s| sum + s.remaining_at(t))
}

/// One account's pricing adjustments, and the price overrides they put in
/// force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountAdjustments {
    /// Every adjustment applied, by id.
    pub by_id: BTreeMap<String, StoredAdjustment>,
    /// The price overrides among them, with their ends as moved.
    pub overrides: crate::adjust::Overrides,
    /// The ids of the credit grants among them.
    pub grants: Vec<String>,
}

impl AccountAdjustments {
    /// Adds (or replaces) an adjustment and recomputes the overrides.
    pub fn put(&mut self, id: String, a: StoredAdjustment) {
        self.by_id.insert(id, a);
        let mut o = crate::adjust::Overrides::default();
        for (id, s) in &self.by_id {
            if let crate::adjust::AdjustmentBody::PriceOverride(po) = &s.adjustment.body {
                let mut po = po.clone();
                if s.moved_until.is_some() {
                    po.effective_until = s.moved_until;
                }
                o.set(id, po);
            }
        }
        self.overrides = o;
        self.grants = self
            .by_id
            .iter()
            .filter(|(_, s)| s.grant().is_some())
            .map(|(id, _)| id.clone())
            .collect();
    }

    /// The grants a charge for usage of `kind` and `model` at `t` draws
    /// from, in order: the soonest to expire first (never last), then the
    /// oldest, then by id; only those with something left.
    pub fn grants_for(
        &self,
        kind: crate::event::JobKind,
        model: Option<&crate::money::ModelId>,
        t: Timestamp,
    ) -> Vec<String> {
        let mut v: Vec<(Timestamp, Timestamp, &String)> = self
            .grants
            .iter()
            .filter_map(|id| {
                let s = self.by_id.get(id)?;
                let (_, expires_at, selector) = s.grant()?;
                (selector.matches(kind, model) && s.remaining_at(t) > Money::ZERO).then(|| {
                    (
                        expires_at.unwrap_or(Timestamp::MAX),
                        s.granted_at.unwrap_or(Timestamp::MIN),
                        id,
                    )
                })
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, _, id)| id.clone()).collect()
    }

    /// The instants in `(from, to)` at which a grant matching `kind` and
    /// `model` stops covering usage (its expiry, or its void): a charge is
    /// cut there, so every second is either covered or not.
    pub fn grant_edges(
        &self,
        kind: crate::event::JobKind,
        model: Option<&crate::money::ModelId>,
        from: Timestamp,
        to: Timestamp,
    ) -> Vec<Timestamp> {
        self.grants
            .iter()
            .filter_map(|id| self.by_id.get(id))
            .filter(|s| s.grant().is_some_and(|(_, _, sel)| sel.matches(kind, model)))
            .flat_map(|s| [s.grant().and_then(|g| g.1), s.voided_at])
            .flatten()
            .filter(|t| from < *t && *t < to)
            .collect()
    }

    /// What the grants covering `kind` and `model` (every grant when
    /// `None`) have left at `t`.
    pub fn credit_balance(
        &self,
        usage: Option<(crate::event::JobKind, Option<&crate::money::ModelId>)>,
        t: Timestamp,
    ) -> Money {
        self.grants
            .iter()
            .filter_map(|id| self.by_id.get(id))
            .filter(|s| match usage {
                Some((kind, model)) => s.grant().is_some_and(|(_, _, sel)| sel.matches(kind, model)),
                None => true,
            })
            .fold(Money::ZERO, |sum, s| sum + s.remaining_at(t))
    }
}

/// One billed slice of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BilledPart {
    /// The billing period the usage belongs to.
    pub service_period: crate::cycle::BillingPeriod,
    /// Slice start.
    pub from: Timestamp,
    /// Slice end.
    pub to: Timestamp,
    /// Seconds billed.
    pub seconds: Decimal,
    /// The charge that billed it.
    pub charge_id: String,
}

impl BilledPart {
    /// The part `p`, billed by the charge `charge_id`.
    pub(crate) fn of(p: &crate::adjust::RatedSlice, charge_id: String) -> BilledPart {
        BilledPart {
            service_period: p.period,
            from: p.from,
            to: p.to,
            seconds: p.seconds,
            charge_id,
        }
    }
}

/// One charge emitted for a job: what reversing it exactly needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRef {
    /// Its id.
    pub charge_id: String,
    /// The billing period the usage belongs to.
    pub service_period: crate::cycle::BillingPeriod,
    /// Slice start and end.
    pub from: Timestamp,
    /// Slice end.
    pub to: Timestamp,
    /// Its `duration_ms`.
    pub ms: i64,
    /// Its `billable_seconds`.
    pub seconds: Decimal,
    /// Its `rate_per_second`.
    pub rate: Money,
    /// Its `amount`.
    pub amount: Money,
    /// Its `amount_due`.
    pub due: Money,
    /// Its status.
    pub status: crate::event::JobStatus,
    /// The limit counter (of the job's account) its amount was counted
    /// against: which limit, and its month (`None`: lifetime).
    pub limit: Option<(crate::output::LimitKind, Option<crate::time::Period>)>,
    /// The month of the spend-limit counter its due part was counted
    /// against.
    pub spend: Option<crate::time::Period>,
    /// Its `adjustment_id`.
    pub adjustment_id: Option<String>,
    /// What it drew from credit grants (given back by a refund).
    pub drawn: Vec<Drawn>,
}

/// Credit drawn from one grant by one charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drawn {
    /// The grant's `adjustment_id`.
    pub grant: String,
    /// USD.
    pub amount: Money,
}

/// A job refunded by a `job_refund`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refunded {
    /// The refund's `adjustment_id`.
    pub adjustment_id: String,
    /// Charges emitted after the refund are refunded too.
    pub through_end: bool,
}

/// What was charged for a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billed {
    /// True when the meter closed the job after the orphan timeout.
    pub orphan: bool,
    /// Slices charged, in time order.
    pub parts: Vec<BilledPart>,
    /// True once a late stop has adjusted an orphan charge.
    pub adjusted: bool,
}

/// Everything known about one job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The accepted start.
    pub start: Option<StartRec>,
    /// The accepted (or pending) stop.
    pub stop: Option<StopRec>,
    /// Latest heartbeat time.
    pub last_heartbeat: Option<Timestamp>,
    /// In-flight usage counted toward a limit.
    pub accrual: Option<Accrual>,
    /// What has been charged.
    pub billed: Option<Billed>,
    /// Idempotency keys of every event applied to this job.
    pub keys: Vec<EventKey>,
    /// Stream time after which an inert job is forgotten.
    pub expires: Option<Timestamp>,
    /// The amount due a running job has contributed, in flight, to its
    /// account's spend-limit counter (accounts with a `spend_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<Accrual>,
    /// When a `job.stop` command was issued for this job (the command's `at`).
    /// The job is charged to at most this instant plus the stop grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sent: Option<Timestamp>,
    /// Every charge emitted for the job, as a refund reverses it (jobs
    /// charged by a release that did not record them have none). Kept by
    /// the binary state format only: the JSON format stays what the
    /// previous release wrote (a downgrade reads it), and a job restored
    /// from it cannot be refunded exactly (the refund is refused).
    #[serde(skip)]
    pub charges: Vec<ChargeRef>,
    /// The `job_refund` that refunded the job, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded: Option<Refunded>,
    /// The time of this job's entry in the meter's timer index (derived,
    /// never stored). Always at or before the job's real deadline: a
    /// heartbeat that pushes the deadline out does not touch the index; the
    /// entry is moved when it comes due.
    #[serde(skip)]
    pub timer: Option<Timestamp>,
}

impl Job {
    /// True while the job runs: started, and neither stopped nor closed by
    /// the meter. A running job counts toward its account's burn rate.
    pub fn is_running(&self) -> bool {
        self.start.is_some() && self.stop.is_none() && self.billed.is_none()
    }

    /// The latest instant the job is charged to, given the stop grace:
    /// `end`, or for a job sent a `job.stop`, at most the command's instant
    /// plus the grace.
    pub fn charged_until(&self, end: Timestamp, stop_grace_ms: i64) -> Timestamp {
        match self.stop_sent {
            Some(t) => end.min(t.plus_ms(stop_grace_ms)),
            None => end,
        }
    }
}

/// Identity of a usage counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UsageKey {
    /// The account.
    pub account: AccountId,
    /// Which limit.
    pub limit: LimitKind,
    /// The month, or `None` for lifetime limits (free credits).
    pub period: Option<Period>,
}

impl UsageKey {
    /// The month of a monthly limit, or `lifetime`: the scope segment of
    /// limit event ids.
    pub fn scope(&self) -> String {
        self.period.map_or_else(|| "lifetime".to_owned(), |p| p.to_string())
    }
}

/// Usage counted toward one limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// List amount of charges emitted.
    pub charged: Money,
    /// List amount accrued by running jobs' heartbeats.
    pub inflight: Money,
}

impl Counter {
    /// What thresholds compare against.
    pub fn total(&self) -> Money {
        self.charged + self.inflight
    }
}

/// Which threshold of a limit: a percentage of it, or an alert amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ThresholdId {
    /// A percentage of the limit (80, 100).
    Pct(u32),
    /// An enterprise alert amount.
    Amount(Money),
    /// Runway below a horizon, in seconds (spend control).
    Runway(u64),
}

impl std::fmt::Display for ThresholdId {
    /// `80`, `100`, `$250.00` or `runway-600s`: the last segment of a
    /// limit event id.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThresholdId::Pct(p) => write!(f, "{p}"),
            ThresholdId::Amount(a) => write!(f, "${a}"),
            ThresholdId::Runway(s) => write!(f, "runway-{s}s"),
        }
    }
}

impl ThresholdId {
    /// Inverse of `Display`.
    pub fn parse(s: &str) -> Option<ThresholdId> {
        if let Some(secs) = s.strip_prefix("runway-").and_then(|r| r.strip_suffix('s')) {
            return secs.parse().ok().map(ThresholdId::Runway);
        }
        match s.strip_prefix('$') {
            Some(a) => Money::parse(a).map(ThresholdId::Amount),
            None => s.parse().ok().map(ThresholdId::Pct),
        }
    }
}

/// A threshold that has fired (one per key, ever).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FiredKey {
    /// The counter.
    pub usage: UsageKey,
    /// Which threshold.
    pub threshold: ThresholdId,
}

impl FiredKey {
    /// The id of the limit event that fired it:
    /// `<account>/<limit>/<month or lifetime>/<threshold>`.
    pub fn event_id(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.usage.account,
            self.usage.limit.as_str(),
            self.usage.scope(),
            self.threshold
        )
    }
}

/// One (kind, model) line being accumulated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineAcc {
    /// Jobs with usage in the period.
    pub jobs: u64,
    /// Seconds billed.
    pub seconds: Decimal,
    /// List amount.
    pub amount: Money,
}

/// A statement being accumulated for (period, account).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementAcc {
    /// Lines by (kind, model). Stored as a list of entries, since JSON map
    /// keys must be strings.
    #[serde(with = "line_entries")]
    pub lines: BTreeMap<(crate::event::JobKind, Option<ModelId>), LineAcc>,
    /// Free credits drawn.
    pub credits_applied: Money,
    /// Pro usage included.
    pub included_usage: Money,
    /// Sum of amounts due.
    pub due: Money,
    /// What each price override changed (rated amount − list amount), by
    /// `adjustment_id`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adjustments: BTreeMap<String, Money>,
    /// What each credit grant covered, by `adjustment_id`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub grants: BTreeMap<String, Money>,
}

mod line_entries {
    use super::*;
    use serde::{Deserializer, Serializer};

    type Lines = BTreeMap<(crate::event::JobKind, Option<ModelId>), LineAcc>;

    pub(super) fn serialize<S: Serializer>(m: &Lines, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lines, D::Error> {
        let v: Vec<((crate::event::JobKind, Option<ModelId>), LineAcc)> = Vec::deserialize(d)?;
        Ok(v.into_iter().collect())
    }
}

/// The record kinds of persisted state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// [`Job`] by (account, job).
    Jobs,
    /// [`Counter`] by [`UsageKey`].
    Usage,
    /// Fired thresholds (value is empty).
    Fired,
    /// [`StatementAcc`] by (period, account).
    Statements,
    /// Partition metadata (stream time).
    Meta,
    /// Emitted [`crate::output::Statement`]s by (period, account).
    Closed,
    /// Local index: event ids of archived jobs ([`crate::archive`]).
    EventIds,
    /// Local index: archived jobs by expiry ([`crate::archive`]).
    Expiries,
    /// Local index: jobs with a deadline ([`crate::archive`]).
    OpenJobs,
    /// [`StoredAdjustment`] by (account, adjustment id): every pricing
    /// adjustment applied, kept forever (ids are unique per account).
    Adjustments,
}

impl Table {
    /// Every table, in a fixed order.
    pub const ALL: [Table; 10] = [
        Table::Jobs,
        Table::Usage,
        Table::Fired,
        Table::Statements,
        Table::Meta,
        Table::Closed,
        Table::EventIds,
        Table::Expiries,
        Table::OpenJobs,
        Table::Adjustments,
    ];

    /// True for the indexes a store derives from the jobs for
    /// [`crate::archive`]: they never travel through the changelog and are
    /// never part of a meter's restored state.
    pub fn is_local(self) -> bool {
        matches!(self, Table::EventIds | Table::Expiries | Table::OpenJobs)
    }

    /// Stable name (RocksDB column family, changelog key prefix).
    pub fn name(self) -> &'static str {
        match self {
            Table::Jobs => "jobs",
            Table::Usage => "usage",
            Table::Fired => "fired",
            Table::Statements => "statements",
            Table::Meta => "meta",
            Table::Closed => "closed_statements",
            Table::EventIds => "event_ids",
            Table::Expiries => "expiries",
            Table::OpenJobs => "open_jobs",
            Table::Adjustments => "adjustments",
        }
    }

    /// One-byte tag used where several tables share one keyspace (changelog).
    pub fn tag(self) -> u8 {
        match self {
            Table::Jobs => 1,
            Table::Usage => 2,
            Table::Fired => 3,
            Table::Statements => 4,
            Table::Meta => 5,
            Table::Closed => 6,
            Table::EventIds => 7,
            Table::Expiries => 8,
            Table::OpenJobs => 9,
            Table::Adjustments => 10,
        }
    }

    /// Inverse of [`Table::tag`].
    pub fn from_tag(t: u8) -> Option<Table> {
        Table::ALL.into_iter().find(|x| x.tag() == t)
    }
}

/// One state record written or deleted (`value: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// Which record kind.
    pub table: Table,
    /// Encoded key.
    pub key: Vec<u8>,
    /// Encoded value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

/// Why a state record could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode or decode {table} record{}: {why}", if key.is_empty() { String::new() } else { format!(" with key {key}") })]
pub struct DecodeError {
    /// The table.
    pub table: &'static str,
    /// The record's key, printable (empty when unknown).
    pub key: String,
    /// What was wrong.
    pub why: String,
}

impl DecodeError {
    pub(crate) fn new(table: Table, why: impl Into<String>) -> Self {
        DecodeError {
            table: table.name(),
            key: String::new(),
            why: why.into(),
        }
    }

    /// The same error naming the record's key (escaped, at most 200 bytes
    /// shown), so an operator can find the record.
    pub fn at_key(mut self, key: &[u8]) -> Self {
        let shown = &key[..key.len().min(200)];
        self.key = shown.escape_ascii().to_string();
        if key.len() > shown.len() {
            self.key.push_str("...");
        }
        self
    }
}

/// Key codecs. Every string in a key is an identifier the parser bounds to
/// [`crate::event::MAX_ID_BYTES`] (256) bytes, far below the u16 length
/// prefix's 65 535; `put_str` still clamps, so a key can never be malformed.
pub mod keys {
    use super::*;

    const LIFETIME: u32 = u32::MAX;

    fn put_str(out: &mut Vec<u8>, s: &str) {
        let b = s.as_bytes();
        let n = b.len().min(u16::MAX as usize);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&b[..n]);
    }

    fn take_str<'a>(b: &mut &'a [u8]) -> Option<&'a str> {
        if b.len() < 2 {
            return None;
        }
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        let s = b.get(2..2 + n)?;
        *b = &b[2 + n..];
        std::str::from_utf8(s).ok()
    }

    fn take_u32(b: &mut &[u8]) -> Option<u32> {
        let v = b.get(..4)?;
        let n = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
        *b = &b[4..];
        Some(n)
    }

    fn take_i64(b: &mut &[u8]) -> Option<i64> {
        let v: [u8; 8] = b.get(..8)?.try_into().ok()?;
        *b = &b[8..];
        Some(i64::from_be_bytes(v))
    }

    fn limit_tag(l: LimitKind) -> u8 {
        match l {
            LimitKind::FreeCredits => 1,
            LimitKind::ModelApiCap => 2,
            LimitKind::WorkflowQuota => 3,
            LimitKind::Alert => 4,
            LimitKind::SpendLimit => 5,
        }
    }

    fn limit_from(t: u8) -> Option<LimitKind> {
        LimitKind::ALL.into_iter().find(|l| limit_tag(*l) == t)
    }

    /// Encodes a job key.
    pub fn job(k: &JobKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + k.0 .0.len() + k.1.as_str().len());
        put_str(&mut out, &k.0 .0);
        put_str(&mut out, k.1.as_str());
        out
    }

    /// The prefix shared by every job, usage and fired key of `account`
    /// (for reading one account's records with a prefix scan).
    pub fn account_prefix(account: &AccountId) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + account.0.len());
        put_str(&mut out, &account.0);
        out
    }

    /// Decodes a job key.
    pub fn decode_job(mut b: &[u8]) -> Option<JobKey> {
        let a = take_str(&mut b)?;
        let j = take_str(&mut b)?;
        b.is_empty().then(|| (AccountId::from(a), JobId::from(j)))
    }

    /// Encodes a usage key.
    pub fn usage(k: &UsageKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + k.account.0.len());
        put_str(&mut out, &k.account.0);
        out.push(limit_tag(k.limit));
        out.extend_from_slice(&k.period.map_or(LIFETIME, Period::ordinal).to_be_bytes());
        out
    }

    fn take_usage(b: &mut &[u8]) -> Option<UsageKey> {
        let account = AccountId::from(take_str(b)?);
        let limit = limit_from(*b.first()?)?;
        *b = &b[1..];
        let p = take_u32(b)?;
        Some(UsageKey {
            account,
            limit,
            period: (p != LIFETIME).then(|| Period::from_ordinal(p)),
        })
    }

    /// Decodes a usage key.
    pub fn decode_usage(mut b: &[u8]) -> Option<UsageKey> {
        let k = take_usage(&mut b)?;
        b.is_empty().then_some(k)
    }

    /// Encodes a fired-threshold key.
    pub fn fired(k: &FiredKey) -> Vec<u8> {
        let mut out = usage(&k.usage);
        put_str(&mut out, &k.threshold.to_string());
        out
    }

    /// Decodes a fired-threshold key.
    pub fn decode_fired(mut b: &[u8]) -> Option<FiredKey> {
        let usage = take_usage(&mut b)?;
        let threshold = ThresholdId::parse(take_str(&mut b)?)?;
        b.is_empty().then_some(FiredKey { usage, threshold })
    }

    /// A statement key's period field when the period is not a calendar
    /// month (no month ordinal reaches it); start and end follow.
    const INTERVAL: u32 = u32::MAX;

    /// Encodes an adjustment key: the account, then the adjustment id.
    pub fn adjustment(a: &AccountId, id: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + a.0.len() + id.len());
        put_str(&mut out, &a.0);
        put_str(&mut out, id);
        out
    }

    /// Decodes an adjustment key.
    pub fn decode_adjustment(mut b: &[u8]) -> Option<(AccountId, String)> {
        let a = AccountId::from(take_str(&mut b)?);
        let id = take_str(&mut b)?.to_owned();
        b.is_empty().then_some((a, id))
    }

    /// Encodes a statement key: a calendar month as its ordinal (as before
    /// periods of other lengths existed), any other period as
    /// [`INTERVAL`](Self::INTERVAL), start and end (i64 BE ms).
    pub fn statement(p: BillingPeriod, a: &AccountId) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + a.0.len());
        match p.calendar_month() {
            Some(m) => out.extend_from_slice(&m.ordinal().to_be_bytes()),
            None => {
                out.extend_from_slice(&INTERVAL.to_be_bytes());
                out.extend_from_slice(&p.start.0.to_be_bytes());
                out.extend_from_slice(&p.end.0.to_be_bytes());
            }
        }
        put_str(&mut out, &a.0);
        out
    }

    /// Decodes a statement key.
    pub fn decode_statement(mut b: &[u8]) -> Option<(BillingPeriod, AccountId)> {
        let o = take_u32(&mut b)?;
        let p = if o == INTERVAL {
            let start = Timestamp(take_i64(&mut b)?);
            let end = Timestamp(take_i64(&mut b)?);
            let valid = Timestamp::MIN <= start && start < end && end.0 <= Timestamp::MAX.0 + 1;
            valid.then_some(BillingPeriod { start, end })?
        } else {
            // No month after 9999-12 has a timestamp.
            (o <= 9999 * 12 + 11).then(|| BillingPeriod::month(Period::from_ordinal(o)))?
        };
        let a = AccountId::from(take_str(&mut b)?);
        b.is_empty().then_some((p, a))
    }

    /// The key of the stream-time record.
    pub const STREAM_TIME: &[u8] = b"stream_time";

    /// The key of the last period whose statements were all emitted.
    pub const FEES_THROUGH: &[u8] = b"fees_through";

    /// The key of the input partition's event-time watermark (see
    /// [`crate::order`]): 8 bytes, big-endian milliseconds.
    pub const INPUT_WATERMARK: &[u8] = b"input_watermark";

    /// The key of the record that says the partition's events are applied
    /// in the merge order of [`crate::order`] (empty value).
    pub const EVENT_ORDER: &[u8] = b"event_order";

    /// The key of the merge's bookkeeping of the input partitions other
    /// instances forward to this partition (opaque to the core; written
    /// by the streaming meter).
    pub const MERGE_SOURCES: &[u8] = b"merge_sources";

    /// The key of the cadence schedule the partition was last billed by
    /// (JSON entries).
    pub const BILLING_CYCLE: &[u8] = b"billing_cycle";
}

/// The format a meter writes state values in. Both are always read.
///
/// Every value of the jobs, usage and statements tables carries its format
/// version: a version-1 value starts with the two bytes `00 01` (no JSON
/// value starts with a zero byte); a value without that header is a JSON
/// document, format version 0, as every release before the binary format
/// wrote. Closed statements are always JSON (written once per account and
/// month, and read by people with `ldb`). Fired thresholds (empty) and the
/// meta records (fixed-width integers) have no payload to version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateFormat {
    /// Version 0: JSON, as releases before the binary format wrote it —
    /// the format to keep writing while such a release still runs (see
    /// the upgrade steps in `docs/operations.md`).
    Json,
    /// Version 1: the compact binary layout of [`crate::codec`].
    #[default]
    Binary,
}

impl StateFormat {
    /// The format version it writes.
    pub fn version(self) -> u8 {
        match self {
            StateFormat::Json => 0,
            StateFormat::Binary => 1,
        }
    }

    /// The config name: `json` or `binary`.
    pub fn name(self) -> &'static str {
        match self {
            StateFormat::Json => "json",
            StateFormat::Binary => "binary",
        }
    }

    /// Inverse of [`StateFormat::name`].
    pub fn parse(s: &str) -> Option<StateFormat> {
        match s {
            "json" => Some(StateFormat::Json),
            "binary" => Some(StateFormat::Binary),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn job_keys_round_trip(a in ".{0,40}", j in ".{0,40}") {
            let k = (AccountId::from(a), JobId::from(j));
            prop_assert_eq!(keys::decode_job(&keys::job(&k)), Some(k));
        }

        #[test]
        fn usage_and_fired_keys_round_trip(a in ".{0,20}", l in 0usize..4, p in proptest::option::of(0u32..40_000), t in 0u32..2000, amount in proptest::option::of(0i64..1_000_000)) {
            let usage = UsageKey { account: AccountId::from(a), limit: LimitKind::ALL[l], period: p.map(Period::from_ordinal) };
            prop_assert_eq!(keys::decode_usage(&keys::usage(&usage)), Some(usage.clone()));
            let threshold = match amount { Some(a) => ThresholdId::Amount(Money(rust_decimal::Decimal::new(a, 2))), None => ThresholdId::Pct(t) };
            let f = FiredKey { usage, threshold };
            prop_assert_eq!(keys::decode_fired(&keys::fired(&f)), Some(f));
        }

        #[test]
        fn statement_keys_sort_by_period(a in ".{0,20}", p1 in 0u32..40_000, p2 in 0u32..40_000) {
            let month = |o| BillingPeriod::month(Period::from_ordinal(o));
            let (k1, k2) = (keys::statement(month(p1), &AccountId::from(a.as_str())), keys::statement(month(p2), &AccountId::from(a.as_str())));
            prop_assert_eq!(p1.cmp(&p2), k1.cmp(&k2));
            prop_assert_eq!(keys::decode_statement(&k1), Some((month(p1), AccountId::from(a))));
        }

        /// A period that is not a calendar month keeps its exact ends, and
        /// its key never reads back as a month's.
        #[test]
        fn statement_keys_of_any_period_round_trip(a in ".{0,20}", start in -62_135_596_800_000i64..253_300_000_000_000, len in 1i64..40 * 86_400_000) {
            let p = BillingPeriod { start: Timestamp(start), end: Timestamp(start + len) };
            let k = keys::statement(p, &AccountId::from(a.as_str()));
            prop_assert_eq!(keys::decode_statement(&k), Some((p, AccountId::from(a))));
        }

        #[test]
        fn key_decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = keys::decode_job(&b);
            let _ = keys::decode_usage(&b);
            let _ = keys::decode_fired(&b);
            let _ = keys::decode_statement(&b);
            let _ = crate::values::decode::<Job>(Table::Jobs, &b);
        }
    }
}
