//! Plans: the catalog of plan terms (TOML, reviewed like the rate card), the
//! account records that put accounts on plans from an instant on, and the
//! terms that govern a job (the record in force at the job's start).

use crate::config_error::{from_toml, ConfigError, Problems};
use crate::event::{Invalid, RejectReason};
use crate::money::{AccountId, Money};
use crate::time::{Period, Timestamp};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A plan an account can be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// New users: a one-time grant of credits, then list price.
    Free,
    /// Monthly fee; model APIs and workflow steps included up to monthly caps.
    Pro,
    /// No caps; optional monthly alert thresholds.
    Enterprise,
    /// Post-paid at list price (unknown accounts).
    Payg,
}

impl Plan {
    /// Every plan.
    pub const ALL: [Plan; 4] = [Plan::Free, Plan::Pro, Plan::Enterprise, Plan::Payg];

    /// Position in [`Plan::ALL`].
    pub fn index(self) -> usize {
        match self {
            Plan::Free => 0,
            Plan::Pro => 1,
            Plan::Enterprise => 2,
            Plan::Payg => 3,
        }
    }

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
            Plan::Payg => "payg",
        }
    }
}

/// Default terms of each plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanCatalog {
    /// Free credits granted once to a free account.
    pub free_credits: Money,
    /// Threshold percentages for free credits.
    pub free_thresholds_pct: Vec<u32>,
    /// Pro monthly fee.
    pub pro_fee: Money,
    /// Introductory pro fee for the first subscribers.
    pub pro_intro_fee: Money,
    /// How many pro subscribers get the introductory fee.
    pub pro_intro_subscribers: usize,
    /// Included model-API (inference) usage per month, at list price.
    pub pro_model_api_cap: Money,
    /// Included workflow-step usage per month, at list price.
    pub pro_workflow_quota: Money,
    /// Threshold percentages for the pro cap and quota.
    pub pro_thresholds_pct: Vec<u32>,
    /// Default enterprise alert amounts (USD per month).
    pub enterprise_alert_thresholds: std::sync::Arc<[Money]>,
    /// What happens when a free account's credits are used up.
    pub free_on_credits_exhausted: Policy,
    /// What happens when a pro cap or quota is reached.
    pub pro_on_cap: Policy,
    /// What happens when an account's own `spend_limit` is reached, by plan
    /// (indexed like [`Plan::ALL`]).
    pub on_spend_limit: [Policy; 4],
    /// Threshold percentages of an account's `spend_limit`.
    pub spend_limit_thresholds_pct: Vec<u32>,
    /// How often each plan is billed, effective-dated (an account record's
    /// `billing_cycle` overrides it while in force).
    pub billing_cycle: CadenceSchedule,
}

/// What the meter does when a limit is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Only the limit event (the notification service tells the user).
    Notify,
    /// The limit event, and a `job.stop` command for every job running
    /// against the limit (and every job started against it later).
    Stop,
}

impl Default for PlanCatalog {
    fn default() -> Self {
        let usd = |cents: i64| Money(rust_decimal::Decimal::new(cents, 2));
        PlanCatalog {
            free_credits: usd(500),
            free_thresholds_pct: vec![80, 100],
            pro_fee: usd(4900),
            pro_intro_fee: usd(2900),
            pro_intro_subscribers: 1000,
            pro_model_api_cap: usd(50000),
            pro_workflow_quota: usd(5000),
            pro_thresholds_pct: vec![80, 100],
            enterprise_alert_thresholds: Vec::new().into(),
            free_on_credits_exhausted: Policy::Stop,
            pro_on_cap: Policy::Notify,
            on_spend_limit: [Policy::Stop; 4],
            spend_limit_thresholds_pct: vec![80, 100],
            billing_cycle: CadenceSchedule::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    free: RawFree,
    #[serde(default)]
    pro: RawPro,
    #[serde(default)]
    enterprise: RawEnterprise,
    #[serde(default)]
    payg: RawPayg,
    #[serde(default)]
    spend_limit: RawSpendLimit,
    billing_cycle: Option<Vec<CadenceEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSpendLimit {
    thresholds_pct: Option<Vec<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFree {
    credits: Option<toml::Spanned<String>>,
    thresholds_pct: Option<Vec<u32>>,
    on_credits_exhausted: Option<Policy>,
    on_spend_limit: Option<Policy>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPro {
    monthly_fee: Option<toml::Spanned<String>>,
    intro_fee: Option<toml::Spanned<String>>,
    intro_subscribers: Option<usize>,
    model_api_cap: Option<toml::Spanned<String>>,
    workflow_quota: Option<toml::Spanned<String>>,
    thresholds_pct: Option<Vec<u32>>,
    on_cap: Option<Policy>,
    on_spend_limit: Option<Policy>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEnterprise {
    alert_thresholds: Option<Vec<toml::Spanned<String>>>,
    on_spend_limit: Option<Policy>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPayg {
    on_spend_limit: Option<Policy>,
}

fn amount(p: &mut Problems<'_>, v: &Option<toml::Spanned<String>>, field: &str, default: Money) -> Money {
    match v {
        None => default,
        Some(s) => match Money::parse(s.get_ref()) {
            Some(m) if m >= Money::ZERO => m,
            _ => {
                p.at(
                    s.span(),
                    field,
                    format!("{:?} is not a non-negative decimal amount", s.get_ref()),
                );
                default
            }
        },
    }
}

fn pcts(p: &mut Problems<'_>, v: &Option<Vec<u32>>, field: &str, default: &[u32]) -> Vec<u32> {
    let v = v.clone().unwrap_or_else(|| default.to_vec());
    if v.iter().any(|x| *x == 0 || *x > 1000) || v.windows(2).any(|w| w[0] >= w[1]) {
        p.field(field, "percentages must be ascending, distinct, between 1 and 1000");
    }
    v
}

impl PlanCatalog {
    /// Parses and validates a TOML plan catalog; omitted values take the defaults.
    pub fn from_toml(text: &str) -> Result<PlanCatalog, ConfigError> {
        let raw: RawCatalog = toml::from_str(text).map_err(|e| from_toml("plan catalog", text, &e))?;
        let d = PlanCatalog::default();
        let mut p = Problems::new(text);
        let mut alerts = Vec::new();
        for (i, s) in raw.enterprise.alert_thresholds.iter().flatten().enumerate() {
            alerts.push(amount(
                &mut p,
                &Some(s.clone()),
                &format!("enterprise.alert_thresholds[{i}]"),
                Money::ZERO,
            ));
        }
        let billing_cycle = match raw.billing_cycle {
            None => d.billing_cycle.clone(),
            Some(entries) => CadenceSchedule::new(entries).unwrap_or_else(|problems| {
                for x in problems {
                    p.field("billing_cycle", x);
                }
                d.billing_cycle.clone()
            }),
        };
        let c = PlanCatalog {
            free_credits: amount(&mut p, &raw.free.credits, "free.credits", d.free_credits),
            free_thresholds_pct: pcts(
                &mut p,
                &raw.free.thresholds_pct,
                "free.thresholds_pct",
                &d.free_thresholds_pct,
            ),
            pro_fee: amount(&mut p, &raw.pro.monthly_fee, "pro.monthly_fee", d.pro_fee),
            pro_intro_fee: amount(&mut p, &raw.pro.intro_fee, "pro.intro_fee", d.pro_intro_fee),
            pro_intro_subscribers: raw.pro.intro_subscribers.unwrap_or(d.pro_intro_subscribers),
            pro_model_api_cap: amount(&mut p, &raw.pro.model_api_cap, "pro.model_api_cap", d.pro_model_api_cap),
            pro_workflow_quota: amount(
                &mut p,
                &raw.pro.workflow_quota,
                "pro.workflow_quota",
                d.pro_workflow_quota,
            ),
            pro_thresholds_pct: pcts(
                &mut p,
                &raw.pro.thresholds_pct,
                "pro.thresholds_pct",
                &d.pro_thresholds_pct,
            ),
            enterprise_alert_thresholds: alerts.into(),
            free_on_credits_exhausted: raw.free.on_credits_exhausted.unwrap_or(d.free_on_credits_exhausted),
            pro_on_cap: raw.pro.on_cap.unwrap_or(d.pro_on_cap),
            on_spend_limit: [
                raw.free.on_spend_limit,
                raw.pro.on_spend_limit,
                raw.enterprise.on_spend_limit,
                raw.payg.on_spend_limit,
            ]
            .map(|x| x.unwrap_or(Policy::Stop)),
            spend_limit_thresholds_pct: pcts(
                &mut p,
                &raw.spend_limit.thresholds_pct,
                "spend_limit.thresholds_pct",
                &d.spend_limit_thresholds_pct,
            ),
            billing_cycle,
        };
        p.finish("plan catalog")?;
        Ok(c)
    }
}

fn money_in<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Money>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum In {
        S(String),
        I(i64),
    }
    match Option::<In>::deserialize(d)? {
        None => Ok(None),
        Some(In::I(i)) => Ok(Some(Money(i.into()))),
        Some(In::S(s)) => Money::parse(&s)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a decimal amount"))),
    }
}

fn money_list_in<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::sync::Arc<[Money]>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum In {
        S(String),
        I(i64),
    }
    let Some(list) = Option::<Vec<In>>::deserialize(d)? else {
        return Ok(None);
    };
    list.into_iter()
        .map(|x| match x {
            In::I(i) => Ok(Money(i.into())),
            In::S(s) => {
                Money::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a decimal amount")))
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|v| Some(v.into()))
}

/// How often an account gets a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cadence {
    /// Calendar months, UTC.
    Monthly,
    /// Half months: [1st, 16th) and [16th, 1st of the next month), UTC.
    SemiMonthly,
}

impl Cadence {
    /// The name used in configuration, account records and statements.
    pub fn as_str(self) -> &'static str {
        match self {
            Cadence::Monthly => "monthly",
            Cadence::SemiMonthly => "semi_monthly",
        }
    }

    /// The cadence named `s`, if any.
    pub fn parse(s: &str) -> Option<Cadence> {
        match s {
            "monthly" => Some(Cadence::Monthly),
            "semi_monthly" => Some(Cadence::SemiMonthly),
            _ => None,
        }
    }

    /// The period of this cadence that holds `t`, as if it had always been
    /// in force.
    pub fn natural_period(self, t: Timestamp) -> (Timestamp, Timestamp) {
        // The second half of a month starts on its 16th, 15 days after the 1st.
        const SECOND_HALF_AFTER_MS: i64 = 15 * 86_400_000;
        let month = t.period();
        match self {
            Cadence::Monthly => (month.start(), month.end()),
            Cadence::SemiMonthly => {
                let mid = Timestamp(month.start().0 + SECOND_HALF_AFTER_MS);
                if t < mid {
                    (month.start(), mid)
                } else {
                    (mid, month.end())
                }
            }
        }
    }
}

impl std::fmt::Display for Cadence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An account/plan record from the accounts topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// The account.
    pub account_id: AccountId,
    /// Its plan from `effective_from` on.
    pub plan: Plan,
    /// When the record takes effect.
    pub effective_from: Timestamp,
    /// Override of the free credits grant.
    #[serde(default, deserialize_with = "money_in", skip_serializing_if = "Option::is_none")]
    pub free_credits: Option<Money>,
    /// Override of the pro model-API cap.
    #[serde(default, deserialize_with = "money_in", skip_serializing_if = "Option::is_none")]
    pub usage_cap: Option<Money>,
    /// Override of the pro workflow quota.
    #[serde(default, deserialize_with = "money_in", skip_serializing_if = "Option::is_none")]
    pub workflow_quota: Option<Money>,
    /// Enterprise alert amounts (USD per month).
    #[serde(default, deserialize_with = "money_list_in", skip_serializing_if = "Option::is_none")]
    pub alert_thresholds: Option<std::sync::Arc<[Money]>>,
    /// The most the account may owe for a calendar month's usage (USD),
    /// any plan; what happens at it is the plan's `on_spend_limit` policy.
    #[serde(default, deserialize_with = "money_in", skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<Money>,
    /// The account's own statement cadence while this record is in force,
    /// instead of the platform's schedule for its plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_cycle: Option<Cadence>,
}

impl AccountRecord {
    /// Parses one record, with a machine-readable reason when it is refused.
    pub fn parse(bytes: &[u8]) -> Result<AccountRecord, Invalid> {
        let r: AccountRecord = serde_json::from_slice(bytes).map_err(|e| {
            let reason = match e.classify() {
                serde_json::error::Category::Data => RejectReason::SchemaViolation,
                _ => RejectReason::NotJson,
            };
            Invalid::new(reason, e.to_string())
        })?;
        if r.account_id.0.trim().is_empty() {
            return Err(Invalid::new(RejectReason::SchemaViolation, "`account_id` is empty"));
        }
        crate::event::account_id(&r.account_id.0, "account_id")?;
        if r.billing_cycle == Some(Cadence::SemiMonthly) && matches!(r.plan, Plan::Free | Plan::Pro) {
            return Err(Invalid::new(
                RejectReason::SchemaViolation,
                "`billing_cycle` semi_monthly is for post-paid plans (payg, enterprise); free and pro are billed monthly",
            ));
        }
        let max = Money(rust_decimal::Decimal::from(MAX_ACCOUNT_AMOUNT_USD));
        let out_of_range = |m: &Money| *m < Money::ZERO || *m > max;
        let alerts = r.alert_thresholds.as_deref().unwrap_or_default();
        if [&r.free_credits, &r.usage_cap, &r.workflow_quota, &r.spend_limit]
            .into_iter()
            .flatten()
            .chain(alerts)
            .any(out_of_range)
        {
            return Err(Invalid::new(
                RejectReason::SchemaViolation,
                format!("amounts must be between 0 and {MAX_ACCOUNT_AMOUNT_USD} USD"),
            ));
        }
        if alerts.len() > MAX_ALERT_THRESHOLDS {
            return Err(Invalid::new(
                RejectReason::SchemaViolation,
                format!(
                    "`alert_thresholds` has {} entries; at most {MAX_ALERT_THRESHOLDS} are accepted",
                    alerts.len()
                ),
            ));
        }
        // `effective_from` is not an event time: it moves no stream time and
        // derives no deadline, so any instant the parser accepts (years
        // 0001-9999) is fine, e.g. a default record "since 1970".
        Ok(r)
    }
}

/// The largest amount an account record may set (credits, caps, quotas,
/// alerts), in USD: far beyond any real account, far below where exact
/// decimal arithmetic on it could overflow.
pub const MAX_ACCOUNT_AMOUNT_USD: i64 = 1_000_000_000_000;

/// The most alert thresholds one account record may carry.
pub const MAX_ALERT_THRESHOLDS: usize = 64;

/// The terms that govern a job: resolved from the record in force at its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTerms {
    /// The plan.
    pub plan: Plan,
    /// Free credits (free plan).
    pub free_credits: Money,
    /// Pro model-API cap.
    pub usage_cap: Money,
    /// Pro workflow quota.
    pub workflow_quota: Money,
    /// Enterprise alert amounts (shared, so resolving terms never copies them).
    pub alert_thresholds: std::sync::Arc<[Money]>,
    /// The account's monthly spend limit, if it set one.
    pub spend_limit: Option<Money>,
}

/// An account's records could not be read (the store failed, or holds a
/// record it cannot decode). Billing must not go on as if the account had
/// no records: the meter that asked stops with this error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account {account}: records cannot be read: {reason}")]
pub struct LookupError {
    /// The account asked about.
    pub account: AccountId,
    /// Why its records cannot be read.
    pub reason: String,
    /// True when a stored record cannot be decoded (reading again cannot
    /// help); false when the read itself failed (it may succeed later).
    pub corrupt: bool,
}

/// Where a meter looks up the account records in force: the whole table
/// in memory ([`AccountBook`], for replays and tools) or, in the streaming
/// meter, the records of the partitions an instance owns, kept on disk.
pub trait Accounts: std::fmt::Debug + Sync {
    /// The account's records, ordered by `effective_from` (empty for an
    /// account without records), or why they cannot be read.
    fn records_of(&self, account: &AccountId) -> Result<std::sync::Arc<[AccountRecord]>, LookupError>;

    /// True when the account is among the first subscribers to pro (by the
    /// `effective_from` of its first pro record, ties by account id).
    fn has_intro_price(&self, account: &AccountId) -> bool;

    /// The accounts with at least one pro record that `keep` accepts,
    /// ordered by id (who may owe a monthly fee without usage).
    fn pro_accounts(&self, keep: &dyn Fn(&AccountId) -> bool) -> Vec<AccountId>;
}

impl dyn Accounts + '_ {
    /// The record in force at `t`, if any.
    pub fn record_at(&self, account: &AccountId, t: Timestamp) -> Result<Option<AccountRecord>, LookupError> {
        Ok(record_in(&self.records_of(account)?, t).cloned())
    }

    /// The terms in force for `account` at `t` (payg for unknown accounts).
    pub fn terms_at(&self, catalog: &PlanCatalog, account: &AccountId, t: Timestamp) -> Result<PlanTerms, LookupError> {
        Ok(terms_in(catalog, &self.records_of(account)?, t))
    }

    /// True when the account was on pro at any instant of `period`.
    pub fn pro_during(&self, account: &AccountId, period: Period) -> Result<bool, LookupError> {
        let list = self.records_of(account)?;
        let (start, end) = (period.start(), period.end());
        Ok(record_in(&list, start).is_some_and(|r| r.plan == Plan::Pro)
            || list
                .iter()
                .any(|r| r.plan == Plan::Pro && r.effective_from >= start && r.effective_from < end))
    }

    /// The subscription fee an account owes for `period` (zero unless on pro).
    pub fn subscription_fee(
        &self,
        catalog: &PlanCatalog,
        account: &AccountId,
        period: Period,
    ) -> Result<Money, LookupError> {
        Ok(if !self.pro_during(account, period)? {
            Money(rust_decimal::Decimal::new(0, 2))
        } else if self.has_intro_price(account) {
            catalog.pro_intro_fee
        } else {
            catalog.pro_fee
        })
    }
}

/// The terms in force at `t` for an account with `records` (ordered by
/// `effective_from`; payg without one).
pub fn terms_in(catalog: &PlanCatalog, records: &[AccountRecord], t: Timestamp) -> PlanTerms {
    let rec = record_in(records, t);
    PlanTerms {
        plan: rec.map_or(Plan::Payg, |r| r.plan),
        free_credits: rec.and_then(|r| r.free_credits).unwrap_or(catalog.free_credits),
        usage_cap: rec.and_then(|r| r.usage_cap).unwrap_or(catalog.pro_model_api_cap),
        workflow_quota: rec.and_then(|r| r.workflow_quota).unwrap_or(catalog.pro_workflow_quota),
        alert_thresholds: rec
            .and_then(|r| r.alert_thresholds.clone())
            .unwrap_or_else(|| catalog.enterprise_alert_thresholds.clone()),
        spend_limit: rec.and_then(|r| r.spend_limit),
    }
}

/// The record of `list` (ordered by `effective_from`) in force at `t`.
pub fn record_in(list: &[AccountRecord], t: Timestamp) -> Option<&AccountRecord> {
    let idx = list.partition_point(|x| x.effective_from <= t);
    idx.checked_sub(1).and_then(|i| list.get(i))
}

/// Adds `r` to `list` (ordered by `effective_from`): a record with the same
/// `effective_from` as an existing one replaces it. Returns false when the
/// list already held exactly `r`.
pub fn insert_record(list: &mut Vec<AccountRecord>, r: AccountRecord) -> bool {
    let pos = list.partition_point(|x| x.effective_from < r.effective_from);
    match list.get_mut(pos) {
        Some(x) if x.effective_from == r.effective_from => {
            if *x == r {
                return false;
            }
            *x = r;
        }
        _ => list.insert(pos, r),
    }
    true
}

/// The first pro subscribers: every account's first pro instant, and the
/// `limit` first of them (by that instant, ties by account id), who pay
/// the introductory fee.
#[derive(Debug, Clone, Default)]
pub struct FirstPro {
    order: BTreeSet<(Timestamp, AccountId)>,
    of: HashMap<AccountId, Timestamp>,
    intro: BTreeSet<AccountId>,
    limit: usize,
}

impl FirstPro {
    /// No subscribers yet; the first `limit` get the intro fee.
    pub fn new(limit: usize) -> Self {
        FirstPro {
            limit,
            ..FirstPro::default()
        }
    }

    /// Sets (or clears, with `None`) when `account` first subscribed.
    /// Returns true when that changed.
    pub fn set(&mut self, account: &AccountId, first: Option<Timestamp>) -> bool {
        let old = self.of.get(account).copied();
        if first == old {
            return false;
        }
        if let Some(o) = old {
            self.order.remove(&(o, account.clone()));
            self.of.remove(account);
        }
        if let Some(f) = first {
            self.order.insert((f, account.clone()));
            self.of.insert(account.clone(), f);
        }
        // Only a change among (or into) the first `limit` moves the set.
        let ranks = |t: Timestamp| {
            self.limit > 0
                && self
                    .order
                    .iter()
                    .nth(self.limit - 1)
                    .is_none_or(|last| (t, account) <= (last.0, &last.1))
        };
        if self.intro.contains(account) || first.is_some_and(ranks) {
            self.intro = self.order.iter().take(self.limit).map(|(_, a)| a.clone()).collect();
        }
        true
    }

    /// True when `account` is among the first subscribers.
    pub fn has_intro_price(&self, account: &AccountId) -> bool {
        self.intro.contains(account)
    }

    /// Every account that has subscribed, in no particular order.
    pub fn accounts(&self) -> impl Iterator<Item = &AccountId> {
        self.of.keys()
    }

    /// How many accounts have subscribed.
    pub fn len(&self) -> usize {
        self.of.len()
    }

    /// True when none has.
    pub fn is_empty(&self) -> bool {
        self.of.is_empty()
    }
}

/// When `list`'s account first subscribed to pro, if it did.
pub fn first_pro_in(list: &[AccountRecord]) -> Option<Timestamp> {
    list.iter().find(|x| x.plan == Plan::Pro).map(|x| x.effective_from)
}

/// Every account's records, ordered by `effective_from`, in memory: the
/// whole accounts table (replays, tools, tests).
#[derive(Debug, Clone, Default)]
pub struct AccountBook {
    records: HashMap<AccountId, std::sync::Arc<[AccountRecord]>>,
    first_pro: FirstPro,
}

impl AccountBook {
    /// An empty book; `catalog` sets how many pro subscribers get the intro fee.
    pub fn new(catalog: &PlanCatalog) -> Self {
        AccountBook {
            records: HashMap::new(),
            first_pro: FirstPro::new(catalog.pro_intro_subscribers),
        }
    }

    /// Adds a record. A record with the same `effective_from` as an existing
    /// one replaces it. Returns true if the book changed.
    pub fn insert(&mut self, r: AccountRecord) -> bool {
        let account = r.account_id.clone();
        let mut list = self.records.get(&account).map(|l| l.to_vec()).unwrap_or_default();
        if !insert_record(&mut list, r) {
            return false;
        }
        self.first_pro.set(&account, first_pro_in(&list));
        self.records.insert(account, list.into());
        true
    }

    /// Every record, ordered by account then `effective_from` (for snapshots).
    pub fn records(&self) -> BTreeMap<&AccountId, &[AccountRecord]> {
        self.records.iter().map(|(k, v)| (k, &v[..])).collect()
    }

    /// How many accounts the book knows.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no account is known.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The book as the [`Accounts`] a meter consults.
    pub fn as_accounts(&self) -> &dyn Accounts {
        self
    }
}

impl Accounts for AccountBook {
    fn records_of(&self, account: &AccountId) -> Result<std::sync::Arc<[AccountRecord]>, LookupError> {
        Ok(self
            .records
            .get(account)
            .cloned()
            .unwrap_or_else(|| std::sync::Arc::new([])))
    }

    fn has_intro_price(&self, account: &AccountId) -> bool {
        self.first_pro.has_intro_price(account)
    }

    fn pro_accounts(&self, keep: &dyn Fn(&AccountId) -> bool) -> Vec<AccountId> {
        let mut v: Vec<AccountId> = self.first_pro.accounts().filter(|a| keep(a)).cloned().collect();
        v.sort();
        v
    }
}

/// One effective-dated entry of the cadence schedule: the cadence of each
/// plan from `effective_from` until the next entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CadenceEntry {
    /// When the entry takes effect.
    pub effective_from: Timestamp,
    /// Pay-as-you-go accounts.
    #[serde(default = "monthly")]
    pub payg: Cadence,
    /// Enterprise accounts.
    #[serde(default = "monthly")]
    pub enterprise: Cadence,
    /// Free accounts.
    #[serde(default = "monthly")]
    pub free: Cadence,
    /// Pro accounts.
    #[serde(default = "monthly")]
    pub pro: Cadence,
}

fn monthly() -> Cadence {
    Cadence::Monthly
}

impl CadenceEntry {
    /// The cadence this entry gives `plan`.
    pub fn cadence_of(&self, plan: Plan) -> Cadence {
        match plan {
            Plan::Payg => self.payg,
            Plan::Enterprise => self.enterprise,
            Plan::Free => self.free,
            Plan::Pro => self.pro,
        }
    }
}

/// The platform's effective-dated cadence schedule (every plan monthly
/// before its first entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CadenceSchedule {
    entries: Vec<CadenceEntry>,
}

/// When the platform's post-paid customers move from twice-monthly to
/// monthly statements.
pub const MONTHLY_FROM: &str = "2024-05-01T00:00:00Z";

impl Default for CadenceSchedule {
    /// The announcement's schedule: payg and enterprise semi-monthly until
    /// [`MONTHLY_FROM`], monthly from then on; free and pro monthly.
    fn default() -> Self {
        let post_paid = |from: Timestamp, c: Cadence| CadenceEntry {
            effective_from: from,
            payg: c,
            enterprise: c,
            free: Cadence::Monthly,
            pro: Cadence::Monthly,
        };
        CadenceSchedule {
            entries: vec![
                post_paid(Timestamp::MIN, Cadence::SemiMonthly),
                post_paid(
                    Timestamp::parse(MONTHLY_FROM).unwrap_or(Timestamp::MIN),
                    Cadence::Monthly,
                ),
            ],
        }
    }
}

impl CadenceSchedule {
    /// Every plan monthly, always.
    pub fn monthly() -> CadenceSchedule {
        CadenceSchedule { entries: Vec::new() }
    }

    /// A schedule of `entries`, which must be in strictly increasing
    /// `effective_from` order; every problem is reported.
    pub fn new(entries: Vec<CadenceEntry>) -> Result<CadenceSchedule, Vec<String>> {
        let mut problems: Vec<String> = entries
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[1].effective_from <= w[0].effective_from)
            .map(|(i, w)| {
                format!(
                    "billing_cycle[{}]: effective_from {} is not after the previous entry's ({}): entries must be in increasing order, one per instant",
                    i + 1,
                    w[1].effective_from,
                    w[0].effective_from
                )
            })
            .collect();
        for (i, e) in entries.iter().enumerate() {
            if e.free != Cadence::Monthly || e.pro != Cadence::Monthly {
                problems.push(format!(
                    "billing_cycle[{i}]: free and pro are billed monthly (semi_monthly is for payg and enterprise)"
                ));
            }
        }
        if problems.is_empty() {
            Ok(CadenceSchedule { entries })
        } else {
            Err(problems)
        }
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[CadenceEntry] {
        &self.entries
    }

    /// The first instant at which `self` and `other` give some plan
    /// different cadences (`None`: they agree everywhere).
    pub fn first_difference(&self, other: &CadenceSchedule) -> Option<Timestamp> {
        let mut at: Vec<Timestamp> = std::iter::once(Timestamp::MIN)
            .chain(self.entries.iter().chain(&other.entries).map(|e| e.effective_from))
            .collect();
        at.sort_unstable();
        at.into_iter().find(|t| {
            Plan::ALL
                .iter()
                .any(|p| self.cadence_at(*p, *t) != other.cadence_at(*p, *t))
        })
    }

    /// The cadence the schedule gives `plan` at `t`.
    pub fn cadence_at(&self, plan: Plan, t: Timestamp) -> Cadence {
        let i = self.entries.partition_point(|e| e.effective_from <= t);
        i.checked_sub(1)
            .map_or(Cadence::Monthly, |i| self.entries[i].cadence_of(plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(a: &str, plan: Plan, from: &str) -> AccountRecord {
        AccountRecord {
            account_id: AccountId::from(a),
            plan,
            effective_from: Timestamp::parse(from).unwrap_or_default(),
            free_credits: None,
            usage_cap: None,
            workflow_quota: None,
            alert_thresholds: None,
            spend_limit: None,
            billing_cycle: None,
        }
    }

    #[test]
    fn intro_price_goes_to_the_first_subscribers_ties_by_id() {
        let catalog = PlanCatalog {
            pro_intro_subscribers: 2,
            ..PlanCatalog::default()
        };
        let mut book = AccountBook::new(&catalog);
        book.insert(rec("b", Plan::Pro, "2024-01-01T00:00:00Z"));
        book.insert(rec("a", Plan::Pro, "2024-01-01T00:00:00Z"));
        book.insert(rec("c", Plan::Free, "2023-01-01T00:00:00Z"));
        book.insert(rec("c", Plan::Pro, "2024-02-01T00:00:00Z"));
        assert!(book.has_intro_price(&"a".into()));
        assert!(book.has_intro_price(&"b".into()));
        assert!(!book.has_intro_price(&"c".into()));
        book.insert(rec("c", Plan::Pro, "2023-06-01T00:00:00Z"));
        assert!(book.has_intro_price(&"c".into()));
        assert!(!book.has_intro_price(&"b".into()));
    }

    proptest::proptest! {
        /// The intro set kept incrementally equals the first `limit`
        /// subscribers recomputed from scratch, whatever the order of changes.
        #[test]
        fn first_pro_matches_a_recount(
            limit in 0usize..5,
            ops in proptest::collection::vec((0u8..8, proptest::option::of(0i64..6)), 0..60),
        ) {
            let mut fp = FirstPro::new(limit);
            let mut naive: BTreeMap<AccountId, Timestamp> = BTreeMap::new();
            for (a, t) in ops {
                let account = AccountId::from(format!("a{a}").as_str());
                fp.set(&account, t.map(Timestamp));
                match t {
                    Some(t) => naive.insert(account, Timestamp(t)),
                    None => naive.remove(&account),
                };
                let mut order: Vec<(Timestamp, AccountId)> = naive.iter().map(|(a, t)| (*t, a.clone())).collect();
                order.sort();
                let intro: BTreeSet<AccountId> = order.into_iter().take(limit).map(|(_, a)| a).collect();
                for a in 0..8u8 {
                    let account = AccountId::from(format!("a{a}").as_str());
                    proptest::prop_assert_eq!(fp.has_intro_price(&account), intro.contains(&account));
                }
                proptest::prop_assert_eq!(fp.len(), naive.len());
            }
        }
    }

    #[test]
    fn record_in_force_and_defaults() {
        let catalog = PlanCatalog::default();
        let mut owned = AccountBook::new(&catalog);
        owned.insert(rec("a", Plan::Free, "2024-01-01T00:00:00Z"));
        owned.insert(rec("a", Plan::Pro, "2024-03-15T00:00:00Z"));
        let book = owned.as_accounts();
        let t = |s| Timestamp::parse(s).unwrap_or_default();
        let a = AccountId::from("a");
        assert_eq!(
            book.terms_at(&catalog, &a, t("2024-03-14T23:59:59Z")).unwrap().plan,
            Plan::Free
        );
        assert_eq!(
            book.terms_at(&catalog, &a, t("2024-03-15T00:00:00Z")).unwrap().plan,
            Plan::Pro
        );
        assert_eq!(
            book.terms_at(&catalog, &a, t("2023-03-15T00:00:00Z")).unwrap().plan,
            Plan::Payg
        );
        assert_eq!(
            book.terms_at(&catalog, &"zz".into(), t("2024-03-15T00:00:00Z"))
                .unwrap()
                .plan,
            Plan::Payg
        );
        assert!(book.pro_during(&a, Period::new(2024, 3)).unwrap());
        assert!(!book.pro_during(&a, Period::new(2024, 2)).unwrap());
        assert_eq!(
            book.subscription_fee(&catalog, &a, Period::new(2024, 4))
                .unwrap()
                .to_string(),
            "29.00"
        );
    }

    #[test]
    fn parses_records_with_string_or_integer_amounts() {
        let r = AccountRecord::parse(br#"{"account_id":"a","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"100.50","workflow_quota":20}"#);
        let r = r.ok();
        assert_eq!(
            r.as_ref().and_then(|r| r.usage_cap).map(|m| m.to_string()),
            Some("100.50".into())
        );
        assert_eq!(
            r.and_then(|r| r.workflow_quota).map(|m| m.to_string()),
            Some("20".into())
        );
        assert!(
            AccountRecord::parse(br#"{"account_id":"a","plan":"gold","effective_from":"2024-01-01T00:00:00Z"}"#)
                .is_err()
        );
        assert!(AccountRecord::parse(
            br#"{"account_id":"a","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":1.5}"#
        )
        .is_err());
    }

    #[test]
    fn spend_control_policies_and_spend_limits() {
        use crate::output::LimitKind;
        let d = PlanCatalog::default();
        assert_eq!(d.policy(Plan::Free, LimitKind::FreeCredits), Policy::Stop);
        assert_eq!(d.policy(Plan::Pro, LimitKind::ModelApiCap), Policy::Notify);
        assert_eq!(d.policy(Plan::Payg, LimitKind::SpendLimit), Policy::Stop);
        let c = PlanCatalog::from_toml(
            "[free]\non_credits_exhausted = \"notify\"\n[pro]\non_cap = \"stop\"\n[payg]\non_spend_limit = \"notify\"\n[spend_limit]\nthresholds_pct = [50, 100]\n",
        )
        .unwrap_or_default();
        assert_eq!(c.free_on_credits_exhausted, Policy::Notify);
        assert_eq!(c.pro_on_cap, Policy::Stop);
        assert_eq!(c.policy(Plan::Payg, LimitKind::SpendLimit), Policy::Notify);
        assert_eq!(c.policy(Plan::Enterprise, LimitKind::SpendLimit), Policy::Stop);
        assert_eq!(c.spend_limit_thresholds_pct, vec![50, 100]);
        let e = PlanCatalog::from_toml("[pro]\non_cap = \"halt\"\n")
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("halt"));
        let r = AccountRecord::parse(
            br#"{"account_id":"a","plan":"payg","effective_from":"2024-01-01T00:00:00Z","spend_limit":"250.00"}"#,
        );
        assert_eq!(
            r.ok().and_then(|r| r.spend_limit).map(|m| m.to_string()),
            Some("250.00".into())
        );
        for bad in ["\"-1\"", "1000000000001", "1.5"] {
            let json = format!(
                r#"{{"account_id":"a","plan":"payg","effective_from":"2024-01-01T00:00:00Z","spend_limit":{bad}}}"#
            );
            assert!(AccountRecord::parse(json.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn catalog_defaults_and_errors() {
        let c = PlanCatalog::from_toml("[pro]\nmonthly_fee = \"59.00\"\n").unwrap_or_default();
        assert_eq!(c.pro_fee.to_string(), "59.00");
        assert_eq!(c.free_credits.to_string(), "5.00");
        let e = PlanCatalog::from_toml("[free]\ncredits = \"lots\"\n[pro]\nthresholds_pct = [100, 80]\n");
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("line 2, free.credits") && msg.contains("pro.thresholds_pct"),
            "{msg}"
        );
    }
}
