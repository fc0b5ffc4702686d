//! Turning a job's interval into billed slices: billable seconds per
//! calendar month, with the split rule of the contract (earlier slices get
//! floor(ms / 1000) seconds, the last one the rest, so the slices always sum
//! to what the whole job would have had in one period).

use crate::ratecard::Rounding;
use crate::time::{Period, Timestamp};
use rust_decimal::Decimal;

/// One period's slice of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// The period the slice lies in.
    pub period: Period,
    /// Slice start.
    pub from: Timestamp,
    /// Slice end.
    pub to: Timestamp,
    /// Slice length.
    pub ms: i64,
    /// Seconds billed for the slice.
    pub seconds: Decimal,
}

/// Splits `[from, to]` (with `to ≥ from`) at month boundaries: the
/// billing periods of an account billed monthly
/// ([`crate::cycle::split_periods`] under a monthly schedule).
pub fn split(from: Timestamp, to: Timestamp, rounding: Rounding) -> Vec<Slice> {
    crate::cycle::split_periods(&[], &crate::cycle::CadenceSchedule::monthly(), from, to, rounding)
        .into_iter()
        .map(|s| Slice {
            // Under a monthly schedule every period is a calendar month.
            period: s.period.calendar_month().unwrap_or_else(|| s.from.period()),
            from: s.from,
            to: s.to,
            ms: s.ms,
            seconds: s.seconds,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        Timestamp::parse(s).unwrap_or_default()
    }

    #[test]
    fn rule_6_month_boundary_split_sums_to_the_whole() {
        let s = split(
            t("2024-04-30T23:59:58.600Z"),
            t("2024-05-01T00:00:03.100Z"),
            Rounding::CeilSeconds,
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].seconds, Decimal::from(1));
        assert_eq!(s[1].seconds, Decimal::from(4)); // ceil(4.5) - 1
        assert_eq!(s[0].period.to_string(), "2024-04");
    }

    #[test]
    fn a_job_ending_exactly_at_the_boundary_stays_in_its_month() {
        let s = split(
            t("2024-04-30T23:59:00Z"),
            t("2024-05-01T00:00:00Z"),
            Rounding::CeilSeconds,
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].seconds, Decimal::from(60));
    }

    #[test]
    fn spans_several_months() {
        let s = split(
            t("2024-01-31T12:00:00Z"),
            t("2024-03-01T00:00:00.500Z"),
            Rounding::ExactMs,
        );
        assert_eq!(s.len(), 3);
        let sum: Decimal = s.iter().map(|x| x.seconds).sum();
        assert_eq!(
            sum,
            Rounding::ExactMs.total_seconds(t("2024-03-01T00:00:00.500Z").0 - t("2024-01-31T12:00:00Z").0)
        );
    }
}

/// One charge to emit for a slice of a job.
#[derive(Debug)]
pub(crate) struct SliceCharge {
    pub(crate) charge_id: String,
    pub(crate) service_period: Period,
    pub(crate) from: Timestamp,
    pub(crate) to: Timestamp,
    pub(crate) ms: i64,
    pub(crate) seconds: rust_decimal::Decimal,
    pub(crate) status: crate::event::JobStatus,
    pub(crate) adjusts: Option<String>,
    /// True when this slice adds the job to its statement line's job count.
    pub(crate) new_job: bool,
    /// Event time reported on limit events this charge triggers.
    pub(crate) at: Timestamp,
}
