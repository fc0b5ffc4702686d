//! What a meter consults besides its own state: timeouts ([`MeterConfig`]),
//! prices, plans and accounts ([`Context`]), and the counters it reports
//! ([`Stats`]).

use crate::event::{Invalid, RejectReason};
use crate::money::Money;
use crate::plans::{Accounts, PlanCatalog};
use crate::ratecard::RateCard;
use crate::time::Timestamp;

/// Timeouts and retention, in milliseconds of event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterConfig {
    /// A running job with no heartbeat or stop for this long is closed as
    /// orphaned; a stop whose start is missing this long goes to the DLQ.
    pub orphan_timeout_ms: i64,
    /// A period closes when stream time passes its end plus this grace.
    pub period_grace_ms: i64,
    /// Longest job accepted.
    pub max_duration_ms: i64,
    /// How long a finished job (and its event ids) is remembered, so that
    /// late duplicates are still recognised.
    pub retention_ms: i64,
    /// An event whose `time` is more than this ahead of its record's
    /// timestamp is refused (`time_out_of_range`).
    pub max_clock_skew_ms: i64,
    /// An event whose `time` is more than this behind its record's
    /// timestamp is refused (`time_out_of_range`). Defaults to the
    /// retention: a duplicate older than that could not be recognised.
    pub max_event_age_ms: i64,
    /// The format state values are written in (both formats are read).
    pub state_format: crate::state::StateFormat,
    /// A `runway` limit event fires when an account's runway against a
    /// limit falls below each of these horizons.
    pub runway_horizons_ms: Vec<i64>,
    /// A job sent a `job.stop` is charged to at most the command's instant
    /// plus this grace (the worker's time to react).
    pub stop_grace_ms: i64,
}

impl MeterConfig {
    /// True when an event `time` can be believed against its record's
    /// timestamp (the meter dead-letters it as `time_out_of_range`
    /// otherwise).
    pub fn plausible(&self, time: Timestamp, record: Timestamp) -> bool {
        self.implausible(time, record).is_none()
    }

    /// Why an event `time` cannot be believed against its record's
    /// timestamp, or `None` when it can.
    pub(crate) fn implausible(&self, time: Timestamp, record: Timestamp) -> Option<Invalid> {
        let config = self;
        let ahead = time.0.saturating_sub(record.0);
        if ahead > config.max_clock_skew_ms {
            return Some(Invalid::new(
                RejectReason::TimeOutOfRange,
                format!(
                    "`time` {time} is {ahead} ms ahead of the record timestamp {record} (max_clock_skew {} ms)",
                    config.max_clock_skew_ms
                ),
            ));
        }
        if -ahead > config.max_event_age_ms {
            return Some(Invalid::new(
                RejectReason::TimeOutOfRange,
                format!(
                    "`time` {time} is {} ms behind the record timestamp {record} (max_event_age {} ms)",
                    -ahead, config.max_event_age_ms
                ),
            ));
        }
        None
    }
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            orphan_timeout_ms: 10 * 60_000,
            period_grace_ms: 3_600_000,
            max_duration_ms: 7 * 86_400_000,
            retention_ms: 35 * 86_400_000,
            max_clock_skew_ms: 5 * 60_000,
            max_event_age_ms: 35 * 86_400_000,
            state_format: crate::state::StateFormat::Binary,
            runway_horizons_ms: vec![10 * 60_000],
            stop_grace_ms: 30_000,
        }
    }
}

/// Everything read-only the meter consults.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Prices.
    pub rates: &'a RateCard,
    /// Plan defaults.
    pub plans: &'a PlanCatalog,
    /// The accounts table.
    pub accounts: &'a dyn Accounts,
    /// Timeouts.
    pub config: &'a MeterConfig,
    /// The share of accounts this meter answers for, or `None` for a meter
    /// over every account (a replay). Decides which pro accounts without
    /// usage this meter bills the monthly fee to.
    pub partition: Option<Share>,
}

/// Which partition an account's key belongs to, given the partition count
/// (the Kafka adapter's murmur2, for the streaming meter).
pub type Placement = fn(key: &[u8], partitions: i32) -> i32;

/// The accounts of one partition: those `place` puts in `partition` of
/// `partitions`.
#[derive(Debug, Clone, Copy)]
pub struct Share {
    /// This meter's partition.
    pub partition: i32,
    /// How many partitions there are.
    pub partitions: i32,
    /// Where an account id goes.
    pub place: Placement,
}

impl<'a> Context<'a> {
    /// The same context for the meter of partition `p` of `n`, answering
    /// for the accounts `place` puts there.
    pub fn with_partition(self, p: i32, n: i32, place: Placement) -> Self {
        Context {
            partition: Some(Share {
                partition: p,
                partitions: n,
                place,
            }),
            ..self
        }
    }

    /// True when this meter answers for `account` (the streaming meter
    /// applies each event in its account's partition, wherever it arrived).
    pub fn owns(&self, account: &crate::money::AccountId) -> bool {
        self.partition
            .is_none_or(|s| (s.place)(account.as_str().as_bytes(), s.partitions) == s.partition)
    }

    /// Everything a meter consults, together.
    pub fn new(
        rates: &'a RateCard,
        plans: &'a PlanCatalog,
        accounts: &'a dyn Accounts,
        config: &'a MeterConfig,
    ) -> Self {
        Context {
            rates,
            plans,
            accounts,
            config,
            partition: None,
        }
    }
}

/// Counters of what the meter did, for metrics. Not persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Valid, first-seen events.
    pub events: u64,
    /// Events ignored because their (source, id) was already applied.
    pub duplicates: u64,
    /// Rejected inputs by reason (indexed like [`RejectReason::ALL`]).
    pub rejected: [u64; RejectReason::ALL.len()],
    /// Charges emitted (including adjustments).
    pub charges: u64,
    /// Adjustment charges emitted.
    pub adjustments: u64,
    /// Jobs closed as orphaned.
    pub orphans: u64,
    /// Charges billed in a later period than their usage.
    pub late_charges: u64,
    /// Limit events emitted (thresholds).
    pub limit_events: u64,
    /// Runway limit events emitted.
    pub runway_events: u64,
    /// `job.stop` commands emitted.
    pub stop_commands: u64,
    /// Statements emitted.
    pub statements: u64,
    /// Of those, statements of half-month periods (cadence `semi_monthly`).
    pub semi_monthly_statements: u64,
    /// Jobs not billed by policy (failed/cancelled).
    pub unbilled_jobs: u64,
    /// Sum of charge amounts by kind (indexed like [`crate::event::JobKind::ALL`]).
    pub amount_by_kind: [Money; 3],
}
