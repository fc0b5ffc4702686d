//! Billing cycles: how often an account is billed, and its billing periods
//! (§1 "Billing cycle", rule 6).
//!
//! The platform's cadence schedule is effective-dated configuration
//! ([`CadenceSchedule`]: by default post-paid plans — payg and enterprise —
//! are billed twice a month until 2024-05-01T00:00Z and monthly from then
//! on; free and pro monthly throughout). An account record may carry its
//! own `billing_cycle`, in force while the record is. An account's periods
//! follow the cadence in force for it: calendar months, or half months —
//! [1st, 16th) and [16th, 1st of the next month) — in UTC. Where the
//! cadence in force changes at an instant that is not a boundary of the
//! current period, that period ends there (a short period) and the new
//! cadence runs from it ([`period_at`]). A job that crosses period
//! boundaries is split at each ([`split_periods`]): the earlier parts get
//! their whole seconds, the last the rest, so the parts always sum to the
//! seconds the job has in one piece.
//!
//! Limits do not follow the cadence: caps, quotas, alerts and spend limits
//! count per calendar month ([`crate::time::Period`]) whatever it is.

use crate::plans::{record_in, AccountRecord, Plan};
pub use crate::plans::{Cadence, CadenceEntry, CadenceSchedule, MONTHLY_FROM};
use crate::ratecard::Rounding;
use crate::time::{Period, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;

/// One of an account's billing periods: `[start, end)`. Its cadence is the
/// one in force for the account at `start` ([`cadence_in_force`]); two
/// accounts' periods with the same ends are the same period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BillingPeriod {
    /// First instant of the period.
    pub start: Timestamp,
    /// First instant after it.
    pub end: Timestamp,
}

impl BillingPeriod {
    /// The calendar month `p`.
    pub fn month(p: Period) -> BillingPeriod {
        BillingPeriod {
            start: p.start(),
            end: p.end(),
        }
    }

    /// The calendar month whose limits the period's usage counts toward
    /// (rule 6: limits count per calendar month; a period never spans two).
    pub fn limit_month(&self) -> Period {
        self.start.period()
    }

    /// True when the period is the last of its calendar month (it ends
    /// where the month does): the month's subscription fee is on its
    /// statement.
    pub fn ends_its_month(&self) -> bool {
        self.limit_month().end() == self.end
    }

    /// The calendar month this period is, if it is one.
    pub fn calendar_month(&self) -> Option<Period> {
        let p = self.start.period();
        (p.start() == self.start && p.end() == self.end).then_some(p)
    }

    /// True when `t` is in the period.
    pub fn contains(&self, t: Timestamp) -> bool {
        self.start <= t && t < self.end
    }

    /// The period's label: `YYYY-MM` for a calendar month; otherwise an ISO
    /// 8601 interval, start inclusive and end exclusive, of dates when both
    /// ends are midnight UTC (`2024-04-16/2024-05-01`) and of full UTC
    /// timestamps when not (`2024-04-16T00:00:00Z/2024-04-20T12:00:00Z`).
    pub fn label(&self) -> String {
        if let Some(p) = self.calendar_month() {
            return p.to_string();
        }
        let midnight = |t: Timestamp| t.0.rem_euclid(DAY_MS) == 0;
        if midnight(self.start) && midnight(self.end) {
            format!("{}/{}", date(self.start), date(self.end))
        } else {
            format!("{}/{}", full(self.start), full(self.end))
        }
    }

    /// The bounds a label names (`YYYY-MM`, or an interval as
    /// [`BillingPeriod::label`] writes it); `None` for anything else,
    /// including an empty or reversed interval.
    pub fn parse_label(s: &str) -> Option<(Timestamp, Timestamp)> {
        if let Some(p) = Period::parse(s) {
            return Some((p.start(), p.end()));
        }
        let (a, b) = s.split_once('/')?;
        let at = |x: &str| {
            if matches!(x, "10000-01-01" | "10000-01-01T00:00:00Z") {
                // The end of the last periods: one instant past the last
                // timestamp.
                Some(Timestamp(Timestamp::MAX.0 + 1))
            } else if !x.contains('T') {
                Timestamp::parse(&format!("{x}T00:00:00Z")).ok()
            } else {
                Timestamp::parse(x).ok()
            }
        };
        let (start, end) = (at(a)?, at(b)?);
        (start < end).then_some((start, end))
    }
}

impl Serialize for BillingPeriod {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.calendar_month() {
            Some(p) => p.serialize(s),
            None => s.serialize_str(&self.label()),
        }
    }
}

impl<'de> Deserialize<'de> for BillingPeriod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BillingPeriod::parse_label(&s)
            .map(|(start, end)| BillingPeriod { start, end })
            .ok_or_else(|| serde::de::Error::custom(format!("invalid period {s:?}")))
    }
}

impl From<Period> for BillingPeriod {
    fn from(p: Period) -> Self {
        BillingPeriod::month(p)
    }
}

impl fmt::Display for BillingPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.calendar_month() {
            Some(p) => p.fmt(f),
            None => f.write_str(&self.label()),
        }
    }
}

/// `YYYY-MM-DD` of `t` (`10000-01-01` for the instant after the last).
fn date(t: Timestamp) -> String {
    let s = t.to_string();
    s.split_once('T').map_or(s.clone(), |(d, _)| d.to_owned())
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`, with milliseconds only when it has any.
fn full(t: Timestamp) -> String {
    let s = t.to_string();
    match s.strip_suffix(".000Z") {
        Some(whole) => format!("{whole}Z"),
        None => s,
    }
}

/// The cadence in force for an account with `records` (ordered by
/// `effective_from`) at `t`: its record's `billing_cycle`, else the
/// schedule's for its plan (payg without a record).
pub fn cadence_in_force(records: &[AccountRecord], schedule: &CadenceSchedule, t: Timestamp) -> Cadence {
    let rec = record_in(records, t);
    rec.and_then(|r| r.billing_cycle)
        .unwrap_or_else(|| schedule.cadence_at(rec.map_or(Plan::Payg, |r| r.plan), t))
}

/// The instants at which the cadence in force for the account may change:
/// the schedule's entries and the account's records, in order.
fn candidates<'a>(records: &'a [AccountRecord], schedule: &'a CadenceSchedule) -> impl Iterator<Item = Timestamp> + 'a {
    schedule
        .entries()
        .iter()
        .map(|e| e.effective_from)
        .chain(records.iter().map(|r| r.effective_from))
}

/// The billing period of an account with `records` that holds `t`: the
/// natural period of the cadence in force at `t`, cut short where the
/// cadence in force changed inside it (rule 6).
pub fn period_at(records: &[AccountRecord], schedule: &CadenceSchedule, t: Timestamp) -> BillingPeriod {
    let cadence = cadence_in_force(records, schedule, t);
    let (mut start, mut end) = cadence.natural_period(t);
    let changes_at = |c: Timestamp| {
        c > Timestamp::MIN
            && cadence_in_force(records, schedule, Timestamp(c.0 - 1)) != cadence_in_force(records, schedule, c)
    };
    for c in candidates(records, schedule) {
        if c > start && c <= t && changes_at(c) {
            start = c;
        } else if c > t && c < end && changes_at(c) {
            end = c;
        }
    }
    BillingPeriod { start, end }
}

/// One part of a job inside one billing period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodSlice {
    /// The billing period the part falls in.
    pub period: BillingPeriod,
    /// First instant of the part.
    pub from: Timestamp,
    /// Last instant (exclusive) of the part.
    pub to: Timestamp,
    /// Milliseconds in the part.
    pub ms: i64,
    /// Seconds billed for it: the whole seconds of an earlier part, the
    /// rest of the job's billable seconds for the last.
    pub seconds: Decimal,
}

/// Splits `[from, to]` (`to ≥ from`) at the account's period boundaries
/// (rule 6): one part per period, the parts' seconds summing to the job's.
pub fn split_periods(
    records: &[AccountRecord],
    schedule: &CadenceSchedule,
    from: Timestamp,
    to: Timestamp,
    rounding: Rounding,
) -> Vec<PeriodSlice> {
    split_at(from, to, &period_ends(records, schedule, from, to), rounding)
        .into_iter()
        .map(|(from, to, ms, seconds)| PeriodSlice {
            period: period_at(records, schedule, from),
            from,
            to,
            ms,
            seconds,
        })
        .collect()
}

/// The boundaries of the account's billing periods inside `(from, to)`,
/// in order.
pub fn period_ends(
    records: &[AccountRecord],
    schedule: &CadenceSchedule,
    from: Timestamp,
    to: Timestamp,
) -> Vec<Timestamp> {
    let mut cuts = Vec::new();
    let mut cur = from;
    loop {
        let end = period_at(records, schedule, cur).end;
        if end >= to {
            return cuts;
        }
        cuts.push(end);
        cur = end;
    }
}

/// Splits `[from, to]` (`to ≥ from`) at `cuts` (increasing, inside
/// `(from, to)`) by rule 6's split: every part but the last gets the whole
/// seconds of its milliseconds, the last the rest of the seconds `[from,
/// to]` has in one piece, so the parts always add up to it. Returns
/// `(from, to, ms, seconds)` per part.
pub fn split_at(
    from: Timestamp,
    to: Timestamp,
    cuts: &[Timestamp],
    rounding: Rounding,
) -> Vec<(Timestamp, Timestamp, i64, Decimal)> {
    let total = rounding.total_seconds(to.0 - from.0);
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut cur = from;
    let mut given = Decimal::ZERO;
    for c in cuts.iter().copied().filter(|c| from < *c && *c < to) {
        let ms = c.0 - cur.0;
        let seconds = rounding.part_seconds(ms);
        given += seconds;
        out.push((cur, c, ms, seconds));
        cur = c;
    }
    out.push((cur, to, to.0 - cur.0, total - given));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Timestamp {
        Timestamp::parse(s).unwrap()
    }

    fn rec(plan: Plan, from: &str, cycle: Option<Cadence>) -> AccountRecord {
        AccountRecord {
            account_id: "a".into(),
            plan,
            effective_from: t(from),
            free_credits: None,
            usage_cap: None,
            workflow_quota: None,
            alert_thresholds: None,
            spend_limit: None,
            billing_cycle: cycle,
        }
    }

    fn labels(parts: &[PeriodSlice]) -> Vec<(String, Decimal)> {
        parts.iter().map(|s| (s.period.label(), s.seconds)).collect()
    }

    #[test]
    fn labels_are_months_date_intervals_or_timestamp_intervals() {
        let may = BillingPeriod::month(Period::new(2024, 5));
        assert_eq!(may.label(), "2024-05");
        let half = BillingPeriod {
            start: t("2024-04-16T00:00:00Z"),
            end: t("2024-05-01T00:00:00Z"),
        };
        assert_eq!(half.label(), "2024-04-16/2024-05-01");
        let short = BillingPeriod {
            start: t("2024-04-16T00:00:00Z"),
            end: t("2024-04-20T12:00:00Z"),
        };
        assert_eq!(short.label(), "2024-04-16T00:00:00Z/2024-04-20T12:00:00Z");
        let odd = BillingPeriod {
            start: t("2024-04-20T12:00:00.250Z"),
            end: t("2024-05-01T00:00:00Z"),
        };
        assert_eq!(odd.label(), "2024-04-20T12:00:00.250Z/2024-05-01T00:00:00Z");
        for p in [may, half, short, odd] {
            assert_eq!(BillingPeriod::parse_label(&p.label()), Some((p.start, p.end)), "{p}");
        }
        // The last periods end one instant past the last timestamp.
        let last = BillingPeriod {
            start: t("9999-12-16T00:00:00Z"),
            end: Timestamp(Timestamp::MAX.0 + 1),
        };
        assert_eq!(last.label(), "9999-12-16/10000-01-01");
        assert_eq!(BillingPeriod::parse_label(&last.label()), Some((last.start, last.end)));
        let short = BillingPeriod {
            start: t("9999-12-20T12:00:00Z"),
            ..last
        };
        assert_eq!(short.label(), "9999-12-20T12:00:00Z/10000-01-01T00:00:00Z");
        assert_eq!(
            BillingPeriod::parse_label(&short.label()),
            Some((short.start, short.end))
        );
        assert_eq!(BillingPeriod::parse_label("2024-05-01/2024-04-16"), None);
        assert_eq!(BillingPeriod::parse_label("2024-05-01/2024-05-01"), None);
        assert_eq!(BillingPeriod::parse_label("May"), None);
    }

    #[test]
    fn the_default_schedule_bills_post_paid_plans_by_half_months_until_may() {
        let s = CadenceSchedule::default();
        for plan in [Plan::Payg, Plan::Enterprise] {
            assert_eq!(s.cadence_at(plan, t("2024-04-30T23:59:59.999Z")), Cadence::SemiMonthly);
            assert_eq!(s.cadence_at(plan, t("2024-05-01T00:00:00Z")), Cadence::Monthly);
        }
        for plan in [Plan::Free, Plan::Pro] {
            assert_eq!(s.cadence_at(plan, t("2024-04-10T00:00:00Z")), Cadence::Monthly);
        }
        assert_eq!(
            CadenceSchedule::monthly().cadence_at(Plan::Payg, t("2024-04-10T00:00:00Z")),
            Cadence::Monthly
        );
    }

    #[test]
    fn an_unordered_schedule_is_refused_with_the_entry_named() {
        let e = |from: &str| CadenceEntry {
            effective_from: t(from),
            payg: Cadence::Monthly,
            enterprise: Cadence::Monthly,
            free: Cadence::Monthly,
            pro: Cadence::Monthly,
        };
        let err = CadenceSchedule::new(vec![e("2024-05-01T00:00:00Z"), e("2024-05-01T00:00:00Z")]).unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(err[0].starts_with("billing_cycle[1]"), "{err:?}");
        assert!(CadenceSchedule::new(vec![e("2024-06-01T00:00:00Z"), e("2024-05-01T00:00:00Z")]).is_err());
        assert!(CadenceSchedule::new(vec![e("2024-05-01T00:00:00Z"), e("2024-06-01T00:00:00Z")]).is_ok());
        let pro_semi = CadenceEntry {
            pro: Cadence::SemiMonthly,
            ..e("2024-05-01T00:00:00Z")
        };
        let err = CadenceSchedule::new(vec![pro_semi]).unwrap_err();
        assert!(err[0].starts_with("billing_cycle[0]: free and pro"), "{err:?}");
    }

    #[test]
    fn a_job_across_the_half_month_gets_its_whole_seconds_then_the_rest() {
        let s = CadenceSchedule::default();
        let parts = split_periods(
            &[],
            &s,
            t("2024-04-15T23:59:59.500Z"),
            t("2024-04-16T00:00:00.700Z"),
            Rounding::CeilSeconds,
        );
        assert_eq!(
            labels(&parts),
            vec![
                ("2024-04-01/2024-04-16".to_owned(), Decimal::ZERO),
                ("2024-04-16/2024-05-01".to_owned(), Decimal::from(2)),
            ]
        );
    }

    #[test]
    fn a_fine_tune_across_the_cutover_is_billed_half_month_then_month() {
        let s = CadenceSchedule::default();
        let parts = split_periods(
            &[],
            &s,
            t("2024-04-30T22:00:00Z"),
            t("2024-05-01T02:00:00Z"),
            Rounding::CeilSeconds,
        );
        assert_eq!(
            labels(&parts),
            vec![
                ("2024-04-16/2024-05-01".to_owned(), Decimal::from(7200)),
                ("2024-05".to_owned(), Decimal::from(7200)),
            ]
        );
        assert_eq!(cadence_in_force(&[], &s, parts[0].period.start), Cadence::SemiMonthly);
        assert_eq!(cadence_in_force(&[], &s, parts[1].period.start), Cadence::Monthly);
    }

    #[test]
    fn an_upgrade_to_pro_mid_half_month_cuts_a_short_period() {
        let s = CadenceSchedule::default();
        let records = [
            rec(Plan::Payg, "2024-01-01T00:00:00Z", None),
            rec(Plan::Pro, "2024-04-20T12:00:00Z", None),
        ];
        let parts = split_periods(
            &records,
            &s,
            t("2024-04-20T11:00:00Z"),
            t("2024-04-20T13:00:00.001Z"),
            Rounding::CeilSeconds,
        );
        assert_eq!(
            labels(&parts),
            vec![
                (
                    "2024-04-16T00:00:00Z/2024-04-20T12:00:00Z".to_owned(),
                    Decimal::from(3600)
                ),
                (
                    "2024-04-20T12:00:00Z/2024-05-01T00:00:00Z".to_owned(),
                    Decimal::from(3601)
                ),
            ]
        );
        // A plan change that keeps the cadence (payg → enterprise) cuts nothing.
        let same = [
            rec(Plan::Payg, "2024-01-01T00:00:00Z", None),
            rec(Plan::Enterprise, "2024-04-20T12:00:00Z", None),
        ];
        assert_eq!(
            period_at(&same, &s, t("2024-04-21T00:00:00Z")).label(),
            "2024-04-16/2024-05-01"
        );
    }

    #[test]
    fn an_account_records_billing_cycle_overrides_the_schedule_while_in_force() {
        let s = CadenceSchedule::default();
        let records = [
            rec(Plan::Payg, "2024-01-01T00:00:00Z", Some(Cadence::Monthly)),
            rec(Plan::Payg, "2024-03-10T00:00:00Z", None),
        ];
        assert_eq!(period_at(&records, &s, t("2024-02-20T00:00:00Z")).label(), "2024-02");
        // Back on the schedule (semi-monthly) on Mar 10: Mar 1–10 is short.
        assert_eq!(
            period_at(&records, &s, t("2024-03-05T00:00:00Z")).label(),
            "2024-03-01/2024-03-10"
        );
        assert_eq!(
            period_at(&records, &s, t("2024-03-12T00:00:00Z")).label(),
            "2024-03-10/2024-03-16"
        );
        assert_eq!(
            period_at(&records, &s, t("2024-03-20T00:00:00Z")).label(),
            "2024-03-16/2024-04-01"
        );
    }

    #[test]
    fn an_account_record_names_its_cycle_or_is_refused() {
        let parse = |cycle: &str| {
            AccountRecord::parse(
                format!(r#"{{"account_id":"a","plan":"payg","effective_from":"2024-04-01T00:00:00Z","billing_cycle":{cycle}}}"#)
                    .as_bytes(),
            )
        };
        assert_eq!(
            parse("\"semi_monthly\"").unwrap().billing_cycle,
            Some(Cadence::SemiMonthly)
        );
        assert_eq!(parse("\"monthly\"").unwrap().billing_cycle, Some(Cadence::Monthly));
        for odd in ["\"weekly\"", "\"MONTHLY\"", "\" monthly\"", "\"\""] {
            let bad = parse(odd).unwrap_err();
            assert_eq!(
                bad.reason,
                crate::event::RejectReason::SchemaViolation,
                "{odd}: {bad:?}"
            );
        }
        // serde_json reports a number or a list where a name is expected
        // as a syntax error (not_json); refused either way.
        assert!(parse("1").is_err() && parse("[]").is_err());
        assert_eq!(parse("null").unwrap().billing_cycle, None);
        // Prepaid plans are billed monthly (one fee per month).
        for plan in ["free", "pro"] {
            let r = AccountRecord::parse(
                format!(r#"{{"account_id":"a","plan":"{plan}","effective_from":"2024-04-01T00:00:00Z","billing_cycle":"semi_monthly"}}"#)
                    .as_bytes(),
            )
            .unwrap_err();
            assert!(r.detail.contains("post-paid"), "{r:?}");
        }
        // Without the field, a record is stored exactly as before.
        let plain =
            AccountRecord::parse(br#"{"account_id":"a","plan":"payg","effective_from":"2024-04-01T00:00:00Z"}"#)
                .unwrap();
        assert_eq!(plain.billing_cycle, None);
        assert!(!serde_json::to_string(&plain).unwrap().contains("billing_cycle"));
    }

    fn cadence() -> impl Strategy<Value = Cadence> {
        prop_oneof![Just(Cadence::Monthly), Just(Cadence::SemiMonthly)]
    }

    fn plan() -> impl Strategy<Value = Plan> {
        prop_oneof![
            Just(Plan::Payg),
            Just(Plan::Enterprise),
            Just(Plan::Free),
            Just(Plan::Pro)
        ]
    }

    /// Instants over four months around the cutover, at any millisecond,
    /// or exactly on a day or half-month boundary.
    fn instant() -> impl Strategy<Value = Timestamp> {
        let base = t("2024-03-01T00:00:00Z").0;
        prop_oneof![
            (0i64..120 * DAY_MS).prop_map(move |ms| Timestamp(base + ms)),
            (0i64..120).prop_map(move |d| Timestamp(base + d * DAY_MS)),
        ]
    }

    fn schedule() -> impl Strategy<Value = CadenceSchedule> {
        proptest::collection::vec((instant(), cadence(), cadence()), 0..4).prop_map(|es| {
            let mut entries: Vec<CadenceEntry> = es
                .into_iter()
                .map(|(from, payg, enterprise)| CadenceEntry {
                    effective_from: from,
                    payg,
                    enterprise,
                    free: Cadence::Monthly,
                    pro: Cadence::Monthly,
                })
                .collect();
            entries.sort_by_key(|e| e.effective_from);
            entries.dedup_by_key(|e| e.effective_from);
            CadenceSchedule::new(entries).unwrap()
        })
    }

    fn records() -> impl Strategy<Value = Vec<AccountRecord>> {
        proptest::collection::vec((instant(), plan(), proptest::option::of(cadence())), 0..5).prop_map(|rs| {
            let mut v: Vec<AccountRecord> = rs
                .into_iter()
                .map(|(from, plan, cycle)| AccountRecord {
                    effective_from: from,
                    // As parsing allows: prepaid plans are monthly.
                    ..rec(
                        plan,
                        "2024-01-01T00:00:00Z",
                        cycle.filter(|_| matches!(plan, Plan::Payg | Plan::Enterprise)),
                    )
                })
                .collect();
            v.sort_by_key(|r| r.effective_from);
            v.dedup_by_key(|r| r.effective_from);
            v
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// For any schedule, any account records and any job: the parts are
        /// contiguous, each inside its own period, the periods follow one
        /// another, and their seconds add up to the job's, so every second
        /// is billed in exactly one period.
        #[test]
        fn every_second_is_billed_in_exactly_one_period(
            s in schedule(),
            records in records(),
            from in instant(),
            len in prop_oneof![0i64..5_000, 0i64..40 * DAY_MS],
            exact in any::<bool>(),
        ) {
            let rounding = if exact { Rounding::ExactMs } else { Rounding::CeilSeconds };
            let to = Timestamp(from.0 + len);
            let parts = split_periods(&records, &s, from, to, rounding);
            prop_assert_eq!(parts[0].from, from);
            prop_assert_eq!(parts[parts.len() - 1].to, to);
            let mut sum = Decimal::ZERO;
            for (i, p) in parts.iter().enumerate() {
                prop_assert!(p.period.start <= p.from && p.to <= p.period.end, "{:?}", p);
                prop_assert_eq!(p.ms, p.to.0 - p.from.0);
                if i + 1 < parts.len() {
                    prop_assert_eq!(p.to, parts[i + 1].from);
                    prop_assert_eq!(p.to, p.period.end);
                    prop_assert_eq!(p.period.end, parts[i + 1].period.start);
                    prop_assert_eq!(p.seconds, rounding.part_seconds(p.ms));
                }
                prop_assert!(p.seconds >= Decimal::ZERO);
                sum += p.seconds;
            }
            prop_assert_eq!(sum, rounding.total_seconds(len));
        }

        /// Periods tile time: the period holding `t` holds every instant in
        /// it, and the next one starts where it ends.
        #[test]
        fn periods_tile_time(s in schedule(), records in records(), at in instant()) {
            let p = period_at(&records, &s, at);
            prop_assert!(p.contains(at), "{:?} {}", p, at);
            prop_assert!(p.end.0 - p.start.0 <= 31 * DAY_MS);
            prop_assert_eq!(period_at(&records, &s, p.start), p);
            prop_assert_eq!(period_at(&records, &s, Timestamp(p.end.0 - 1)), p);
            let next = period_at(&records, &s, p.end);
            prop_assert_eq!(next.start, p.end);
            prop_assert_eq!(BillingPeriod::parse_label(&p.label()), Some((p.start, p.end)));
        }
    }
}
