//! What one charge of a job's slice is made of. The slices themselves are
//! cut by [`crate::cycle::split_periods`] at the account's billing period
//! boundaries, with the split rule of the contract (earlier slices get
//! floor(ms / 1000) seconds, the last one the rest, so the slices always
//! sum to what the whole job would have had in one period).

#[cfg(test)]
use crate::ratecard::Rounding;
use crate::time::Timestamp;

/// [`crate::cycle::split_periods`] for an account billed monthly.
#[cfg(test)]
fn split(from: Timestamp, to: Timestamp, rounding: Rounding) -> Vec<crate::cycle::PeriodSlice> {
    crate::cycle::split_periods(&[], &crate::cycle::CadenceSchedule::monthly(), from, to, rounding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

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

/// One charge to emit for a part of a job.
#[derive(Debug)]
pub(crate) struct SliceCharge {
    pub(crate) charge_id: String,
    /// The part billed: its billing period, span, milliseconds and seconds
    /// (negative for a reversal), its rate and the override that set it.
    pub(crate) part: crate::adjust::RatedSlice,
    pub(crate) status: crate::event::JobStatus,
    pub(crate) adjusts: Option<String>,
    /// True when this slice adds the job to its statement line's job count.
    pub(crate) new_job: bool,
    /// Event time reported on limit events this charge triggers.
    pub(crate) at: Timestamp,
}
