//! Pricing adjustments (§4b): what the platform's support team changes for
//! one account, as records of the adjustments topic. This module reads and
//! checks them, and answers which price override rates a second of usage.
//!
//! A `price_override` rates each second of the account's usage inside its
//! window `[effective_from, effective_until)` that its selector matches:
//! `multiplier` × the list rate (of the rate-card version in force at the
//! job's start), or a flat `rate_per_second`. Where several cover a second,
//! the narrowest selector wins (model, then kind, then all usage), then the
//! latest `effective_from`, then the greatest `adjustment_id`: overrides
//! never stack. An `override_end` moves an override's end.
//!
//! Every adjustment carries who asked (`requested_by`) and why (`reason`);
//! its `adjustment_id` is unique per account forever.

use crate::cycle::{period_at, period_ends, split_at, BillingPeriod, CadenceSchedule};
use crate::event::{account_id, bounded, in_range, Invalid, JobKind, RejectReason};
use crate::money::{AccountId, ModelId, Money};
use crate::plans::AccountRecord;
use crate::ratecard::RateCard;
use crate::ratecard::Rounding;
use crate::time::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which usage an override rates (every field absent: all of it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Selector {
    /// Only jobs of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<JobKind>,
    /// Only jobs of this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelId>,
}

impl Selector {
    /// True when a job of `kind` and `model` is selected.
    pub fn matches(&self, kind: JobKind, model: Option<&ModelId>) -> bool {
        self.kind.is_none_or(|k| k == kind) && self.model.as_ref().is_none_or(|m| Some(m) == model)
    }

    /// How narrow the selector is: 2 names a model, 1 a kind only, 0 all.
    pub fn narrowness(&self) -> u8 {
        match (&self.model, &self.kind) {
            (Some(_), _) => 2,
            (None, Some(_)) => 1,
            (None, None) => 0,
        }
    }
}

/// What an override charges a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverridePrice {
    /// This times the list rate (0 is free; 1 is the list rate).
    Multiplier(Decimal),
    /// This flat rate, whatever the list rate.
    RatePerSecond(Money),
}

impl OverridePrice {
    /// The rate of a second whose list rate is `list`.
    pub fn rate(self, list: Money) -> Money {
        match self {
            OverridePrice::Multiplier(m) => Money(list.0 * m),
            OverridePrice::RatePerSecond(r) => r,
        }
    }
}

/// A per-account price override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceOverride {
    /// The usage it rates.
    pub selector: Selector,
    /// What it charges.
    pub price: OverridePrice,
    /// First instant of its window.
    pub effective_from: Timestamp,
    /// First instant after it (`None`: open-ended).
    pub effective_until: Option<Timestamp>,
}

impl PriceOverride {
    /// True when `t` is inside the window.
    pub fn covers(&self, t: Timestamp) -> bool {
        self.effective_from <= t && self.effective_until.is_none_or(|u| t < u)
    }
}

/// What an adjustment does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdjustmentBody {
    /// Rates the account's usage in a window by another price.
    PriceOverride(PriceOverride),
    /// Moves the end of the override `ends` to `effective_until`.
    OverrideEnd {
        /// The override's `adjustment_id`.
        ends: String,
        /// Its new end (exclusive).
        effective_until: Timestamp,
    },
    /// Credits that cover the account's amounts due, after its plan's.
    CreditGrant {
        /// USD, positive.
        amount: Money,
        /// From this instant on (event time) nothing more is drawn.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<Timestamp>,
        /// Which usage it covers (empty: all).
        #[serde(default)]
        selector: Selector,
    },
    /// Ends a grant: its unused remainder is gone from then on.
    CreditVoid {
        /// The grant's `adjustment_id`.
        voids: String,
    },
    /// One charge of kind `adjustment` (a fee; negative: a credit note).
    ManualCharge {
        /// USD, non-zero.
        amount: Money,
        /// What it is for (shown to the customer).
        description: String,
    },
    /// Reverses every charge of a job.
    JobRefund {
        /// The job (of the record's account).
        job_id: String,
        /// Charges of the job emitted after the refund (a running job's
        /// charge when it ends, a late stop's adjustment) are refunded too.
        #[serde(default)]
        through_end: bool,
    },
}

/// One record of the adjustments topic, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjustment {
    /// Unique per account, forever.
    pub adjustment_id: String,
    /// The account it changes.
    pub account_id: AccountId,
    /// Why (required, shown on the statement).
    pub reason: String,
    /// Who asked (required).
    pub requested_by: String,
    /// When it was written, if said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    /// What it does.
    #[serde(flatten)]
    pub body: AdjustmentBody,
}

/// How far ahead of when it was written a price override may start or an
/// `override_end` may end one: 366 days. A record beyond it is refused
/// (`invalid_value`): it is almost certainly a typo in a year, and it
/// would sit among the account's overrides for nothing until then.
pub const HORIZON_MS: i64 = 366 * 86_400_000;

impl Adjustment {
    /// Refuses a record whose window starts (or whose new end lies) more
    /// than [`HORIZON_MS`] after `written`: its `created_at`, else the
    /// instant it was written to Kafka (`None`: nothing to check against).
    pub fn check_horizon(&self, written: Option<Timestamp>) -> Result<(), Invalid> {
        let Some(at) = self.created_at.or(written) else {
            return Ok(());
        };
        let (field, t) = match &self.body {
            AdjustmentBody::PriceOverride(po) => ("effective_from", po.effective_from),
            AdjustmentBody::OverrideEnd { effective_until, .. } => ("effective_until", *effective_until),
            AdjustmentBody::CreditGrant { .. }
            | AdjustmentBody::CreditVoid { .. }
            | AdjustmentBody::JobRefund { .. }
            | AdjustmentBody::ManualCharge { .. } => return Ok(()),
        };
        if t.0.saturating_sub(at.0) > HORIZON_MS {
            return Err(invalid_value(format!(
                "`{field}` {t} is more than 366 days after the record was written ({at}): beyond the horizon"
            )));
        }
        Ok(())
    }

    /// The record's `type`.
    pub fn kind(&self) -> &'static str {
        match self.body {
            AdjustmentBody::PriceOverride(_) => "price_override",
            AdjustmentBody::OverrideEnd { .. } => "override_end",
            AdjustmentBody::JobRefund { .. } => "job_refund",
            AdjustmentBody::ManualCharge { .. } => "manual_charge",
            AdjustmentBody::CreditGrant { .. } => "credit_grant",
            AdjustmentBody::CreditVoid { .. } => "credit_void",
        }
    }
}

/// The most price overrides one account may have (ended ones included):
/// every charge and heartbeat of the account is rated against them. One
/// more is refused (`invalid_value`).
pub const MAX_OVERRIDES_PER_ACCOUNT: usize = 1_000;

/// The largest `multiplier` and `rate_per_second` (USD) accepted: with
/// the longest job and the card's prices, every amount stays far inside
/// what exact decimals hold.
pub const MAX_PRICE_FACTOR: i64 = 1_000;

/// The most decimal places a `multiplier` or `rate_per_second` may have.
pub const MAX_PRICE_SCALE: u32 = 12;

/// The longest `reason` or `requested_by` accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;

fn schema(detail: String) -> Invalid {
    Invalid::new(RejectReason::SchemaViolation, detail)
}

fn invalid_value(detail: String) -> Invalid {
    Invalid::new(RejectReason::InvalidValue, detail)
}

/// A required non-empty string field.
fn text<'a>(o: &'a Map<String, Value>, field: &str) -> Result<&'a str, Invalid> {
    match o.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::String(_)) => Err(schema(format!("`{field}` is empty"))),
        Some(_) => Err(schema(format!("`{field}` is not a string"))),
        None => Err(schema(format!("`{field}` is missing"))),
    }
}

/// An optional string field (`null` is absent).
fn opt_text<'a>(o: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, Invalid> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => text(o, field).map(Some),
    }
}

fn time(o: &Map<String, Value>, field: &str) -> Result<Option<Timestamp>, Invalid> {
    opt_text(o, field)?
        .map(|s| {
            let t = Timestamp::parse(s).map_err(|_| schema(format!("`{field}` {s:?} is not an RFC 3339 time")))?;
            in_range(t, field)
        })
        .transpose()
}

/// A price decimal given as a string (`"0.80"`) or a JSON number, at most
/// [`MAX_PRICE_FACTOR`] with at most [`MAX_PRICE_SCALE`] decimal places.
fn decimal(o: &Map<String, Value>, field: &str) -> Result<Option<Decimal>, Invalid> {
    let bad = |v: &Value| invalid_value(format!("`{field}` {v} is not a decimal"));
    let d = match o.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(v @ Value::String(s)) => s.trim().parse::<Decimal>().map_err(|_| bad(v))?,
        Some(v @ Value::Number(n)) => n.to_string().parse::<Decimal>().map_err(|_| bad(v))?,
        Some(v) => return Err(bad(v)),
    };
    if d > Decimal::from(MAX_PRICE_FACTOR) {
        return Err(invalid_value(format!("`{field}` {d} is more than {MAX_PRICE_FACTOR}")));
    }
    if d.scale() > MAX_PRICE_SCALE {
        return Err(invalid_value(format!(
            "`{field}` {d} has {} decimal places; at most {MAX_PRICE_SCALE} are accepted",
            d.scale()
        )));
    }
    Ok(Some(d))
}

/// The largest manual charge or credit note, in USD either way: a larger
/// one is almost certainly a typo, and refused (`invalid_value`).
pub const MAX_MANUAL_AMOUNT: i64 = 1_000_000;

/// A manual charge's `amount`: a non-zero decimal of at most
/// [`MAX_MANUAL_AMOUNT`] either way, at most [`MAX_PRICE_SCALE`] places.
fn manual_amount(o: &Map<String, Value>) -> Result<Money, Invalid> {
    let bad = |v: &Value| invalid_value(format!("`amount` {v} is not a decimal"));
    let d = match o.get("amount") {
        None | Some(Value::Null) => return Err(schema("`amount` is missing".to_owned())),
        Some(v @ Value::String(s)) => s.trim().parse::<Decimal>().map_err(|_| bad(v))?,
        Some(v @ Value::Number(n)) => n.to_string().parse::<Decimal>().map_err(|_| bad(v))?,
        Some(v) => return Err(bad(v)),
    };
    if d.is_zero() {
        return Err(invalid_value(
            "`amount` is zero: a manual charge changes what is due".to_owned(),
        ));
    }
    if d.abs() > Decimal::from(MAX_MANUAL_AMOUNT) {
        return Err(invalid_value(format!(
            "`amount` {d} is beyond {MAX_MANUAL_AMOUNT} either way"
        )));
    }
    if d.scale() > MAX_PRICE_SCALE {
        return Err(invalid_value(format!(
            "`amount` {d} has {} decimal places; at most {MAX_PRICE_SCALE} are accepted",
            d.scale()
        )));
    }
    Ok(Money(d))
}

fn selector(o: &Map<String, Value>, rates: &RateCard) -> Result<Selector, Invalid> {
    let s = match o.get("selector") {
        None | Some(Value::Null) => return Ok(Selector::default()),
        Some(Value::Object(s)) => s,
        Some(_) => return Err(schema("`selector` is not an object".to_owned())),
    };
    if let Some(k) = s.keys().find(|k| !matches!(k.as_str(), "kind" | "model")) {
        return Err(schema(format!("`selector.{k}` is not a selector field (kind, model)")));
    }
    let kind = match opt_text(s, "kind").map_err(|e| schema(e.detail.replace('`', "`selector.")))? {
        None => None,
        Some(k) => Some(
            serde_json::from_value::<JobKind>(Value::String(k.to_owned())).map_err(|_| {
                Invalid::new(
                    RejectReason::UnknownKind,
                    format!("`selector.kind` {k:?} is not inference, fine_tune or workflow_step"),
                )
            })?,
        ),
    };
    let model = match opt_text(s, "model").map_err(|e| schema(e.detail.replace('`', "`selector.")))? {
        None => None,
        Some(m) => {
            let m = ModelId::from(bounded(m, "selector.model")?);
            if !rates.versions.iter().any(|v| v.models.contains_key(&m)) {
                return Err(Invalid::new(
                    RejectReason::UnknownModel,
                    format!("`selector.model` {:?} is in no version of the rate card", m.as_str()),
                ));
            }
            Some(m)
        }
    };
    Ok(Selector { kind, model })
}

/// The account an adjustments record is for: what routing it to the
/// partition that meters the account needs, checked as
/// [`parse_adjustment`] checks it (the rest is checked there, by the meter).
pub fn adjustment_account(raw: &[u8]) -> Result<AccountId, Invalid> {
    let v: Value = serde_json::from_slice(raw)
        .map_err(|e| Invalid::new(RejectReason::NotJson, format!("not a JSON document: {e}")))?;
    let Value::Object(o) = v else {
        return Err(schema("an adjustment is a JSON object".to_owned()));
    };
    Ok(AccountId::from(account_id(text(&o, "account_id")?, "account_id")?))
}

/// Reads and checks one record of the adjustments topic. Every refusal
/// names the field; `rates` tells which models exist.
pub fn parse_adjustment(raw: &[u8], rates: &RateCard) -> Result<Adjustment, Invalid> {
    let v: Value = serde_json::from_slice(raw)
        .map_err(|e| Invalid::new(RejectReason::NotJson, format!("not a JSON document: {e}")))?;
    let Value::Object(o) = v else {
        return Err(schema("an adjustment is a JSON object".to_owned()));
    };
    let adjustment_id = bounded(text(&o, "adjustment_id")?, "adjustment_id")?.to_owned();
    let account = AccountId::from(account_id(text(&o, "account_id")?, "account_id")?);
    let reason = text(&o, "reason")?;
    let requested_by = text(&o, "requested_by")?;
    for (field, value) in [("reason", reason), ("requested_by", requested_by)] {
        if value.len() > MAX_TEXT_BYTES {
            return Err(schema(format!(
                "`{field}` is {} bytes long; at most {MAX_TEXT_BYTES} are accepted",
                value.len()
            )));
        }
    }
    let created_at = time(&o, "created_at")?;
    let ty = text(&o, "type")?;
    let body = match ty {
        "price_override" => {
            let price = match (decimal(&o, "multiplier")?, decimal(&o, "rate_per_second")?) {
                (Some(m), None) if m.is_sign_negative() && !m.is_zero() => {
                    return Err(invalid_value(format!("`multiplier` {m} is negative")));
                }
                (None, Some(r)) if r.is_sign_negative() && !r.is_zero() => {
                    return Err(invalid_value(format!("`rate_per_second` {r} is negative")));
                }
                (Some(m), None) => OverridePrice::Multiplier(m),
                (None, Some(r)) => OverridePrice::RatePerSecond(Money(r)),
                (Some(_), Some(_)) => {
                    return Err(schema(
                        "exactly one of `multiplier` and `rate_per_second` is given, not both".to_owned(),
                    ))
                }
                (None, None) => {
                    return Err(schema(
                        "exactly one of `multiplier` and `rate_per_second` is given: neither is".to_owned(),
                    ))
                }
            };
            let effective_from =
                time(&o, "effective_from")?.ok_or_else(|| schema("`effective_from` is missing".to_owned()))?;
            let effective_until = time(&o, "effective_until")?;
            if let Some(u) = effective_until.filter(|u| *u <= effective_from) {
                return Err(invalid_value(format!(
                    "`effective_until` {u} is not after `effective_from` {effective_from}: the window is empty"
                )));
            }
            AdjustmentBody::PriceOverride(PriceOverride {
                selector: selector(&o, rates)?,
                price,
                effective_from,
                effective_until,
            })
        }
        "override_end" => AdjustmentBody::OverrideEnd {
            ends: bounded(text(&o, "ends")?, "ends")?.to_owned(),
            effective_until: time(&o, "effective_until")?
                .ok_or_else(|| schema("`effective_until` is missing".to_owned()))?,
        },
        "credit_grant" => {
            let amount = manual_amount(&o)?;
            if amount.0.is_sign_negative() {
                return Err(invalid_value(format!(
                    "`amount` {amount} is negative: a grant gives credit"
                )));
            }
            let expires_at = time(&o, "expires_at")?;
            if let (Some(e), Some(c)) = (expires_at, created_at) {
                if e <= c {
                    return Err(invalid_value(format!(
                        "`expires_at` {e} is not after `created_at` {c}: the grant would never cover anything"
                    )));
                }
            }
            AdjustmentBody::CreditGrant {
                amount,
                expires_at,
                selector: selector(&o, rates)?,
            }
        }
        "credit_void" => AdjustmentBody::CreditVoid {
            voids: bounded(text(&o, "voids")?, "voids")?.to_owned(),
        },
        "manual_charge" => {
            let amount = manual_amount(&o)?;
            let description = text(&o, "description")?;
            if description.len() > MAX_TEXT_BYTES {
                return Err(schema(format!(
                    "`description` is {} bytes long; at most {MAX_TEXT_BYTES} are accepted",
                    description.len()
                )));
            }
            AdjustmentBody::ManualCharge {
                amount,
                description: description.to_owned(),
            }
        }
        "job_refund" => AdjustmentBody::JobRefund {
            job_id: bounded(text(&o, "job_id")?, "job_id")?.to_owned(),
            through_end: match o.get("through_end") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(schema("`through_end` is not true or false".to_owned())),
            },
        },
        t => {
            return Err(Invalid::new(
                RejectReason::UnknownType,
                format!("`type` {t:?} is not an adjustment type"),
            ))
        }
    };
    let a = Adjustment {
        adjustment_id,
        account_id: account,
        reason: reason.to_owned(),
        requested_by: requested_by.to_owned(),
        created_at,
        body,
    };
    a.check_horizon(None)?;
    Ok(a)
}

/// The price overrides of one account, by `adjustment_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    list: Vec<(String, PriceOverride)>,
}

impl Overrides {
    /// No override.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Adds or replaces the override `id`.
    pub fn set(&mut self, id: &str, o: PriceOverride) {
        match self.list.iter_mut().find(|(x, _)| x == id) {
            Some(slot) => slot.1 = o,
            None => self.list.push((id.to_owned(), o)),
        }
    }

    /// The override `id`, if any.
    pub fn get(&self, id: &str) -> Option<&PriceOverride> {
        self.list.iter().find(|(x, _)| x == id).map(|(_, o)| o)
    }

    /// The override that rates a second at `t` of a job of `kind` and
    /// `model`: the narrowest selector, then the latest `effective_from`,
    /// then the greatest id.
    pub fn winner(&self, kind: JobKind, model: Option<&ModelId>, t: Timestamp) -> Option<(&str, &PriceOverride)> {
        self.list
            .iter()
            .filter(|(_, o)| o.covers(t) && o.selector.matches(kind, model))
            .max_by(|(a, x), (b, y)| {
                (x.selector.narrowness(), x.effective_from, a).cmp(&(y.selector.narrowness(), y.effective_from, b))
            })
            .map(|(id, o)| (id.as_str(), o))
    }

    /// The instants in `(from, to)` at which the override rating a job of
    /// `kind` and `model` may change: every window edge of a matching
    /// override, in order, without repeats.
    pub fn edges(&self, kind: JobKind, model: Option<&ModelId>, from: Timestamp, to: Timestamp) -> Vec<Timestamp> {
        let mut out: Vec<Timestamp> = self
            .list
            .iter()
            .filter(|(_, o)| o.selector.matches(kind, model))
            .flat_map(|(_, o)| [Some(o.effective_from), o.effective_until])
            .flatten()
            .filter(|t| from < *t && *t < to)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// One part of a job, in one billing period at one rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedSlice {
    /// The billing period it falls in.
    pub period: BillingPeriod,
    /// First instant of the part.
    pub from: Timestamp,
    /// Last instant (exclusive) of the part.
    pub to: Timestamp,
    /// Milliseconds in it.
    pub ms: i64,
    /// Seconds billed for it (rule 6's split).
    pub seconds: Decimal,
    /// USD per second: the list rate, or the override's.
    pub rate: Money,
    /// The override that set the rate (`None`: the list rate).
    pub adjustment_id: Option<String>,
}

/// Splits a job `[from, to]` of `kind` and `model`, whose list rate is
/// `list`, wherever its billing period or the override rating it changes,
/// and at the `extra` instants inside it
/// (rule 6's split over all those cuts at once, so the parts' seconds add
/// up to the job's), and rates each part.
#[allow(clippy::too_many_arguments)]
pub fn rate_slices(
    records: &[AccountRecord],
    schedule: &CadenceSchedule,
    overrides: &Overrides,
    (kind, model): (JobKind, Option<&ModelId>),
    list: Money,
    (from, to, extra): (Timestamp, Timestamp, &[Timestamp]),
    rounding: Rounding,
) -> Vec<RatedSlice> {
    let winner = |t: Timestamp| overrides.winner(kind, model, t).map(|(id, _)| id);
    let mut cuts = period_ends(records, schedule, from, to);
    cuts.extend(extra.iter().copied().filter(|t| from < *t && *t < to));
    // An override edge cuts where it changes the override in force.
    cuts.extend(
        overrides
            .edges(kind, model, from, to)
            .into_iter()
            .filter(|c| winner(Timestamp(c.0 - 1)) != winner(*c)),
    );
    cuts.sort_unstable();
    cuts.dedup();
    split_at(from, to, &cuts, rounding)
        .into_iter()
        .map(|(from, to, ms, seconds)| {
            let (rate, adjustment_id) = match overrides.winner(kind, model, from) {
                Some((id, o)) => (o.price.rate(list), Some(id.to_owned())),
                None => (list, None),
            };
            RatedSlice {
                period: period_at(records, schedule, from),
                from,
                to,
                ms,
                seconds,
                rate,
                adjustment_id,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rates() -> RateCard {
        RateCard::from_toml(include_str!("../../../config/rate-card.toml")).expect("the shipped card")
    }

    fn parse(json: &str) -> Result<Adjustment, Invalid> {
        parse_adjustment(json.as_bytes(), &rates())
    }

    const BASE: &str =
        r#""adjustment_id":"adj-1","account_id":"a","reason":"outage credit","requested_by":"support@x""#;

    #[test]
    fn a_price_override_reads_with_its_window_and_selector() {
        let a = parse(&format!(
            r#"{{{BASE},"type":"price_override","selector":{{"model":"sdxl-1.0"}},"multiplier":"0.80","effective_from":"2024-05-01T00:00:00Z","effective_until":"2024-07-01T00:00:00Z"}}"#
        ))
        .expect("valid");
        let AdjustmentBody::PriceOverride(o) = &a.body else {
            panic!("{a:?}")
        };
        assert_eq!(o.price, OverridePrice::Multiplier(Decimal::new(80, 2)));
        assert_eq!(o.selector.model.as_ref().map(ModelId::as_str), Some("sdxl-1.0"));
        assert!(o.covers(Timestamp::parse("2024-06-30T23:59:59.999Z").expect("t")));
        assert!(!o.covers(Timestamp::parse("2024-07-01T00:00:00Z").expect("t")));
        // What is stored reads back as the same adjustment.
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(serde_json::from_str::<Adjustment>(&json).expect("back"), a);
    }

    #[test]
    fn every_refusal_names_its_field_and_reason() {
        let po = |rest: &str| {
            format!(r#"{{{BASE},"type":"price_override","effective_from":"2024-05-01T00:00:00Z",{rest}}}"#)
        };
        let cases: Vec<(String, RejectReason, &str)> = vec![
            (
                po(r#""multiplier":"-0.5""#),
                RejectReason::InvalidValue,
                "`multiplier` -0.5 is negative",
            ),
            (
                po(r#""multiplier":"abc""#),
                RejectReason::InvalidValue,
                "`multiplier` \"abc\" is not a decimal",
            ),
            (
                po(r#""multiplier":"79228162514264337593543950335""#),
                RejectReason::InvalidValue,
                "is more than 1000",
            ),
            (
                po(r#""rate_per_second":1e300"#),
                RejectReason::InvalidValue,
                "`rate_per_second` 1e+300 is not a decimal",
            ),
            (
                po(r#""multiplier":"0.0000000000001""#),
                RejectReason::InvalidValue,
                "has 13 decimal places",
            ),
            (
                po(r#""multiplier":"1","rate_per_second":"0.1""#),
                RejectReason::SchemaViolation,
                "not both",
            ),
            (po(r#""selector":{}"#), RejectReason::SchemaViolation, "neither"),
            (
                po(r#""multiplier":"1","effective_until":"2024-04-01T00:00:00Z""#),
                RejectReason::InvalidValue,
                "`effective_until` 2024-04-01T00:00:00.000Z is not after",
            ),
            (
                po(r#""multiplier":"1","selector":{"model":"nope"}"#),
                RejectReason::UnknownModel,
                "`selector.model` \"nope\"",
            ),
            (
                po(r#""multiplier":"1","selector":{"kind":"gpu"}"#),
                RejectReason::UnknownKind,
                "`selector.kind` \"gpu\"",
            ),
            (
                po(r#""multiplier":"1","selector":{"region":"eu"}"#),
                RejectReason::SchemaViolation,
                "`selector.region`",
            ),
            (
                format!(r#"{{{BASE},"type":"price_override","multiplier":"1"}}"#),
                RejectReason::SchemaViolation,
                "`effective_from` is missing",
            ),
            (
                format!(r#"{{{BASE},"type":"discount"}}"#),
                RejectReason::UnknownType,
                "`type` \"discount\"",
            ),
            (
                format!(r#"{{{BASE},"type":"credit_grant","amount":"-5"}}"#),
                RejectReason::InvalidValue,
                "is negative: a grant gives credit",
            ),
            (
                format!(r#"{{{BASE},"type":"credit_void"}}"#),
                RejectReason::SchemaViolation,
                "`voids` is missing",
            ),
            (
                format!(r#"{{{BASE},"type":"manual_charge","amount":"5"}}"#),
                RejectReason::SchemaViolation,
                "`description` is missing",
            ),
            (
                format!(r#"{{{BASE},"type":"manual_charge","amount":"-1000000.5","description":"d"}}"#),
                RejectReason::InvalidValue,
                "beyond 1000000 either way",
            ),
            (
                format!(r#"{{{BASE},"type":"job_refund"}}"#),
                RejectReason::SchemaViolation,
                "`job_id` is missing",
            ),
            (
                format!(r#"{{{BASE},"type":"job_refund","job_id":"{}"}}"#, "j".repeat(257)),
                RejectReason::SchemaViolation,
                "`job_id` is 257 bytes long",
            ),
            (
                r#"{"adjustment_id":"x","account_id":"a","requested_by":"s","type":"override_end"}"#.to_owned(),
                RejectReason::SchemaViolation,
                "`reason` is missing",
            ),
            (
                format!(
                    r#"{{"adjustment_id":"{}","account_id":"a","reason":"r","requested_by":"s","type":"override_end"}}"#,
                    "x".repeat(257)
                ),
                RejectReason::SchemaViolation,
                "`adjustment_id` is 257 bytes long",
            ),
            (
                r#"{"adjustment_id":"x","account_id":" a","reason":"r","requested_by":"s","type":"override_end"}"#
                    .to_owned(),
                RejectReason::SchemaViolation,
                "white space",
            ),
            (
                format!(r#"{{{BASE},"type":"override_end","ends":"adj-0"}}"#),
                RejectReason::SchemaViolation,
                "`effective_until` is missing",
            ),
            (
                r#"{"adjustment_id":"x","account_id":"a","reason":"r","requested_by":"s","created_at":"2024-05-01T00:00:00Z","type":"price_override","multiplier":"1","effective_from":"2025-05-02T00:00:01Z"}"#.to_owned(),
                RejectReason::InvalidValue,
                "`effective_from` 2025-05-02T00:00:01.000Z is more than 366 days after",
            ),
            (
                r#"{"adjustment_id":"x","account_id":"a","reason":"r","requested_by":"s","created_at":"2024-05-01T00:00:00Z","type":"override_end","ends":"y","effective_until":"2030-01-01T00:00:00Z"}"#.to_owned(),
                RejectReason::InvalidValue,
                "beyond the horizon",
            ),
            ("[1]".to_owned(), RejectReason::SchemaViolation, "JSON object"),
            ("{".to_owned(), RejectReason::NotJson, "not a JSON document"),
        ];
        for (json, reason, detail) in cases {
            let e = parse(&json).expect_err(&json);
            assert_eq!(e.reason, reason, "{json}: {}", e.detail);
            assert!(e.detail.contains(detail), "{json}: {}", e.detail);
        }
        // 256 bytes of id, a zero multiplier and a zero rate are accepted.
        assert!(parse(&format!(
            r#"{{"adjustment_id":"{}","account_id":"a","reason":"r","requested_by":"s","type":"override_end","ends":"y","effective_until":"2024-05-01T00:00:00Z"}}"#,
            "x".repeat(256)
        ))
        .is_ok());
        assert!(parse(&po(r#""multiplier":"0""#)).is_ok());
        // At the horizon exactly; and far ahead with nothing to measure from.
        assert!(parse(r#"{"adjustment_id":"x","account_id":"a","reason":"r","requested_by":"s","created_at":"2024-05-01T00:00:00Z","type":"price_override","multiplier":"1","effective_from":"2025-05-02T00:00:00Z"}"#).is_ok());
        let far = parse(r#"{"adjustment_id":"x","account_id":"a","reason":"r","requested_by":"s","type":"price_override","multiplier":"1","effective_from":"2099-01-01T00:00:00Z"}"#).expect("no created_at");
        assert!(far.check_horizon(None).is_ok());
        let written = Timestamp::parse("2024-05-01T00:00:00Z").ok();
        assert_eq!(
            far.check_horizon(written).map_err(|e| e.reason),
            Err(RejectReason::InvalidValue)
        );
        assert!(parse(&po(r#""multiplier":"1000""#)).is_ok());
        assert!(parse(&po(r#""rate_per_second":"0.000000000001""#)).is_ok());
        assert!(parse(&po(r#""rate_per_second":0"#)).is_ok());
    }

    #[test]
    fn an_override_starting_mid_job_splits_it_there_with_whole_seconds_then_the_rest() {
        let at = |t: &str| Timestamp::parse(t).expect("t");
        let mut set = Overrides::default();
        set.set("half", o(Selector::default(), "2024-05-10T12:00:00Z", None, 50));
        let img = ModelId::from("img");
        // An img inference job at $0.0005/s from `from` to `to`.
        let slices = |set: &Overrides, from: &str, to: &str| {
            rate_slices(
                &[],
                &CadenceSchedule::default(),
                set,
                (JobKind::Inference, Some(&img)),
                Money(Decimal::new(5, 4)),
                (at(from), at(to), &[]),
                Rounding::CeilSeconds,
            )
        };
        let parts = slices(&set, "2024-05-10T11:59:58.600Z", "2024-05-10T12:00:03.100Z");
        let got: Vec<(Decimal, Money, Option<&str>)> = parts
            .iter()
            .map(|p| (p.seconds, p.rate, p.adjustment_id.as_deref()))
            .collect();
        // 4.5 s in one piece is 5 s: floor(1.4) = 1 s at the list rate, the
        // other 4 at half of it.
        assert_eq!(
            got,
            vec![
                (Decimal::from(1), Money(Decimal::new(5, 4)), None),
                (Decimal::from(4), Money(Decimal::new(25, 5)), Some("half")),
            ]
        );
        // An edge where the override in force does not change (a wider one
        // ending inside a narrower one's window) cuts nothing.
        set.set(
            "model",
            o(
                Selector {
                    kind: None,
                    model: Some(img.clone()),
                },
                "2024-05-01T00:00:00Z",
                None,
                10,
            ),
        );
        let parts = slices(&set, "2024-05-10T11:00:00Z", "2024-05-10T13:00:00Z");
        assert_eq!(parts.len(), 1, "{parts:?}");
        assert_eq!(parts[0].adjustment_id.as_deref(), Some("model"));
    }

    fn arb_override() -> impl Strategy<Value = (u8, PriceOverride)> {
        let base = 1_712_000_000_000i64; // 2024-04-01T19:33:20Z
        (
            0u8..3,
            0i64..200,
            0i64..(70 * 86_400_000),
            proptest::option::of(1i64..(20 * 86_400_000)),
            0u8..4,
        )
            .prop_map(move |(sel, m, from, len, id)| {
                let selector = match sel {
                    0 => Selector::default(),
                    1 => Selector {
                        kind: Some(JobKind::Inference),
                        model: None,
                    },
                    _ => Selector {
                        kind: None,
                        model: Some(ModelId::from("img")),
                    },
                };
                let price = if m % 7 == 0 {
                    OverridePrice::RatePerSecond(Money(Decimal::new(m, 5)))
                } else {
                    OverridePrice::Multiplier(Decimal::new(m, 2))
                };
                (
                    id,
                    PriceOverride {
                        selector,
                        price,
                        effective_from: Timestamp(base + from),
                        effective_until: len.map(|l| Timestamp(base + from + l)),
                    },
                )
            })
    }

    proptest::proptest! {
        /// For any overrides and any job: the parts tile the job, their
        /// seconds add up to the job's, each lies in one billing period, and
        /// every instant of a part is rated by the override in force then
        /// (or the list rate), the same one throughout the part.
        #[test]
        fn seconds_are_conserved_and_each_is_rated_by_exactly_one_rate(
            set in proptest::collection::vec(arb_override(), 0..6),
            start in 0i64..(80 * 86_400_000),
            len in 0i64..(3 * 86_400_000),
            kind in 0u8..3,
            exact in proptest::bool::ANY,
        ) {
            let mut overrides = Overrides::default();
            for (i, (id, o)) in set.into_iter().enumerate() {
                overrides.set(&format!("adj-{id}-{i}"), o);
            }
            let kind = [JobKind::Inference, JobKind::FineTune, JobKind::WorkflowStep][kind as usize];
            let img = ModelId::from("img");
            let model = (kind != JobKind::FineTune).then_some(&img);
            let from = Timestamp(1_712_000_000_000 + start);
            let to = Timestamp(from.0 + len);
            let rounding = if exact { Rounding::ExactMs } else { Rounding::CeilSeconds };
            let list = Money(Decimal::new(5, 4));
            let schedule = CadenceSchedule::default();
            let parts = rate_slices(&[], &schedule, &overrides, (kind, model), list, (from, to, &[]), rounding);
            let total: Decimal = parts.iter().map(|p| p.seconds).sum();
            proptest::prop_assert_eq!(total, rounding.total_seconds(len));
            proptest::prop_assert_eq!(parts.first().map(|p| p.from), Some(from));
            proptest::prop_assert_eq!(parts.last().map(|p| p.to), Some(to));
            for w in parts.windows(2) {
                proptest::prop_assert_eq!(w[0].to, w[1].from);
                proptest::prop_assert!(w[0].from < w[0].to);
            }
            for p in &parts {
                proptest::prop_assert_eq!(p.period, period_at(&[], &schedule, p.from));
                proptest::prop_assert!(p.to <= p.period.end);
                let last = Timestamp((p.to.0 - 1).max(p.from.0));
                for t in [p.from, Timestamp((p.from.0 + last.0) / 2), last] {
                    let w = overrides.winner(kind, model, t);
                    proptest::prop_assert_eq!(w.map(|(id, _)| id), p.adjustment_id.as_deref());
                    proptest::prop_assert_eq!(w.map_or(list, |(_, o)| o.price.rate(list)), p.rate);
                }
            }
        }
    }

    fn o(sel: Selector, from: &str, until: Option<&str>, m: i64) -> PriceOverride {
        PriceOverride {
            selector: sel,
            price: OverridePrice::Multiplier(Decimal::new(m, 2)),
            effective_from: Timestamp::parse(from).expect("t"),
            effective_until: until.map(|u| Timestamp::parse(u).expect("t")),
        }
    }

    #[test]
    fn the_narrowest_selector_wins_then_the_latest_start_then_the_greatest_id() {
        let img = Some(ModelId::from("img"));
        let model = Selector {
            kind: None,
            model: img.clone(),
        };
        let kind = Selector {
            kind: Some(JobKind::Inference),
            model: None,
        };
        let mut set = Overrides::default();
        set.set("all", o(Selector::default(), "2024-05-01T00:00:00Z", None, 50));
        set.set("kind", o(kind, "2024-05-01T00:00:00Z", None, 60));
        set.set(
            "model",
            o(model.clone(), "2024-05-10T00:00:00Z", Some("2024-05-20T00:00:00Z"), 70),
        );
        set.set(
            "model-b",
            o(model.clone(), "2024-05-10T00:00:00Z", Some("2024-05-20T00:00:00Z"), 75),
        );
        let at = |t: &str| Timestamp::parse(t).expect("t");
        let win = |k, m: Option<&ModelId>, t: &str| set.winner(k, m, at(t)).map(|(id, _)| id.to_owned());
        assert_eq!(
            win(JobKind::Inference, img.as_ref(), "2024-05-05T00:00:00Z"),
            Some("kind".into())
        );
        assert_eq!(win(JobKind::FineTune, None, "2024-05-05T00:00:00Z"), Some("all".into()));
        assert_eq!(
            win(JobKind::Inference, img.as_ref(), "2024-05-15T00:00:00Z"),
            Some("model-b".into())
        );
        assert_eq!(win(JobKind::Inference, img.as_ref(), "2024-04-30T00:00:00Z"), None);
        assert_eq!(
            set.edges(
                JobKind::Inference,
                img.as_ref(),
                at("2024-05-01T00:00:00Z"),
                at("2024-06-01T00:00:00Z")
            ),
            vec![at("2024-05-10T00:00:00Z"), at("2024-05-20T00:00:00Z")]
        );
        assert!(set
            .edges(
                JobKind::FineTune,
                None,
                at("2024-05-02T00:00:00Z"),
                at("2024-06-01T00:00:00Z")
            )
            .is_empty());
    }
}
