//! The meter's Prometheus metrics, registered into an explicit registry
//! created by the caller. Label sets are bounded: reasons, kinds, limits
//! and input partitions (bounded by configuration) only, never an account
//! or job id.

use jobmeter_core::{JobKind, RejectReason, Stats};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use rust_decimal::prelude::ToPrimitive;

/// All metrics of the streaming meter.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Input records consumed, by outcome (counted when committed).
    pub events: IntCounterVec,
    /// Input records read and applied, committed or not yet.
    pub consumed: IntCounter,
    /// Rejected inputs by reason.
    pub rejected: IntCounterVec,
    /// Charges by kind.
    pub charges: IntCounterVec,
    /// Charged list amount by kind, in USD (for dashboards; the charges
    /// topic is the exact record).
    pub charged_usd: prometheus::CounterVec,
    /// Adjustment charges.
    pub adjustments: IntCounter,
    /// Orphaned jobs closed.
    pub orphans: IntCounter,
    /// Late charges (billed in a later period).
    pub late_charges: IntCounter,
    /// Limit events by limit and threshold (`80`, `100`…, `amount` for
    /// enterprise alert amounts, which vary by account, or `runway`).
    pub limit_events: IntCounterVec,
    /// Statements.
    pub statements: IntCounter,
    /// `job.stop` commands published (counted when committed).
    pub stop_commands: IntCounter,
    /// Open jobs per partition.
    pub open_jobs: IntGaugeVec,
    /// 1 for an assigned partition whose stored state cannot be read back
    /// (it is not metered until it is rebuilt); 0 otherwise.
    pub partition_failed: IntGaugeVec,
    /// Consumer lag per input partition: the high watermark minus the
    /// group's committed offset (the log start when none is committed),
    /// so records read but not yet committed count as lag. Sampled every
    /// 5 s by a thread of its own, for every partition of the topic.
    pub lag: IntGaugeVec,
    /// Events per committed batch.
    pub batch_events: Histogram,
    /// Time to commit a batch (Kafka transaction + RocksDB write).
    pub commit_seconds: HistogramVec,
    /// Time to restore a partition's state.
    pub restore_seconds: Histogram,
    /// Changelog records replayed during restores.
    pub restored_records: IntCounter,
    /// Pipeline restarts after errors.
    pub restarts: IntCounter,
    /// Seconds the event-time merge waited for a partition that had
    /// records in Kafka not yet fetched (stream time held back).
    pub merge_wait_seconds: prometheus::Counter,
    /// Input records forwarded to the partition that meters their account,
    /// by cause (counted when committed).
    pub rerouted: IntCounterVec,
    /// Records waiting in the producer's local queue.
    pub producer_queue: IntGauge,
    /// RocksDB SST bytes.
    pub store_bytes: IntGauge,
    /// Partitions assigned to this instance.
    pub assigned_partitions: IntGauge,
    /// Account records known.
    pub accounts: IntGauge,
    /// Accounts with a pro record, platform-wide.
    pub pro_subscribers: IntGauge,
    /// 1 when state is restored and partitions assigned.
    pub ready: IntGauge,
    /// Usage API requests by route and status.
    pub api_requests: IntCounterVec,
    /// This pipeline's slot behind the instance-wide gauges.
    share: PipelineShare,
    /// The input offsets (next to read) of the last committed batch, by
    /// (topic, partition), shared by every pipeline: what the usage API's
    /// answers reflect (`committed_offsets`).
    pub committed: CommittedOffsets,
}

/// Committed input offsets by (topic, partition).
pub type CommittedOffsets = std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<(String, i32), i64>>>;

/// What one pipeline contributes to the instance-wide gauges (partitions
/// assigned, producer queue, ready): each pipeline writes its own slot, and
/// the gauge shows the instance's total (ready: every pipeline ready).
#[derive(Debug, Clone)]
struct PipelineShare {
    slot: usize,
    slots: std::sync::Arc<[PipelineSlot]>,
}

#[derive(Debug, Default)]
struct PipelineSlot {
    assigned: std::sync::atomic::AtomicI64,
    queue: std::sync::atomic::AtomicI64,
    ready: std::sync::atomic::AtomicBool,
}

impl PipelineShare {
    fn new(n: usize) -> Self {
        PipelineShare {
            slot: 0,
            slots: (0..n.max(1)).map(|_| PipelineSlot::default()).collect(),
        }
    }

    fn mine(&self) -> &PipelineSlot {
        &self.slots[self.slot]
    }

    fn sum(&self, f: impl Fn(&PipelineSlot) -> i64) -> i64 {
        self.slots.iter().map(f).sum()
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> Result<T, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// Creates the metrics and registers them into `r`.
    pub fn new(r: &Registry) -> Result<Metrics, prometheus::Error> {
        let m = Metrics {
            events: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "jobmeter_events_total",
                        "Input records consumed, by outcome (applied, duplicate, rejected)",
                    ),
                    &["outcome"],
                )?,
            )?,
            consumed: reg(
                r,
                IntCounter::new(
                    "jobmeter_records_consumed_total",
                    "Input records read and applied, including the batch not yet committed",
                )?,
            )?,
            rejected: reg(
                r,
                IntCounterVec::new(
                    Opts::new("jobmeter_rejected_total", "Inputs sent to the DLQ, by reason"),
                    &["reason"],
                )?,
            )?,
            charges: reg(
                r,
                IntCounterVec::new(
                    Opts::new("jobmeter_charges_total", "Charges emitted, by job kind"),
                    &["kind"],
                )?,
            )?,
            charged_usd: reg(
                r,
                prometheus::CounterVec::new(
                    Opts::new("jobmeter_charged_usd_total", "List amount charged, USD, by job kind"),
                    &["kind"],
                )?,
            )?,
            adjustments: reg(
                r,
                IntCounter::new("jobmeter_adjustments_total", "Adjustment charges after late stops")?,
            )?,
            orphans: reg(r, IntCounter::new("jobmeter_orphans_total", "Jobs closed as orphaned")?)?,
            late_charges: reg(
                r,
                IntCounter::new(
                    "jobmeter_late_charges_total",
                    "Charges billed in a later period than their usage",
                )?,
            )?,
            limit_events: reg(
                r,
                IntCounterVec::new(
                    Opts::new("jobmeter_limit_events_total", "Limit events emitted, by limit and threshold"),
                    &["limit", "threshold"],
                )?,
            )?,
            statements: reg(r, IntCounter::new("jobmeter_statements_total", "Statements emitted")?)?,
            stop_commands: reg(
                r,
                IntCounter::new(
                    "jobmeter_stop_commands_total",
                    "job.stop commands published to the commands topic (spend control)",
                )?,
            )?,
            partition_failed: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "jobmeter_partition_failed",
                        "1 while an assigned input partition is not metered because its stored state cannot be decoded (see /readyz and the log; recover with jobmeter rebuild)",
                    ),
                    &["partition"],
                )?,
            )?,
            open_jobs: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "jobmeter_open_jobs",
                        "Running jobs not yet charged, per input partition",
                    ),
                    &["partition"],
                )?,
            )?,
            lag: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("jobmeter_consumer_lag", "Input records not yet consumed, per partition"),
                    &["partition"],
                )?,
            )?,
            batch_events: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("jobmeter_batch_events", "Input events per committed batch")
                        .buckets(vec![1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0]),
                )?,
            )?,
            commit_seconds: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "jobmeter_commit_seconds",
                        "Time to commit a batch, by step (handover: the pipeline waiting for the committer to take the batch; produce: outputs and changelog records; offsets: add offsets to the transaction; commit: transaction commit; store: RocksDB write)",
                    )
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
                    &["step"],
                )?,
            )?,
            restore_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("jobmeter_restore_seconds", "Time to restore a partition's state")
                        .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
                )?,
            )?,
            restored_records: reg(
                r,
                IntCounter::new(
                    "jobmeter_restored_records_total",
                    "Changelog records replayed during restores",
                )?,
            )?,
            restarts: reg(
                r,
                IntCounter::new("jobmeter_pipeline_restarts_total", "Pipeline restarts after errors")?,
            )?,
            merge_wait_seconds: reg(
                r,
                prometheus::Counter::new(
                    "jobmeter_merge_wait_seconds_total",
                    "Seconds the event-time merge held stream time back, waiting for a partition with records in Kafka not yet fetched",
                )?,
            )?,
            rerouted: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "jobmeter_events_rerouted_total",
                        "Input records that arrived on a partition other than their account's and were forwarded to it, by cause (keyless, partitioner, key_not_account)",
                    ),
                    &["cause"],
                )?,
            )?,
            producer_queue: reg(
                r,
                IntGauge::new(
                    "jobmeter_producer_queue_depth",
                    "Records waiting in the producer's local queue",
                )?,
            )?,
            store_bytes: reg(r, IntGauge::new("jobmeter_state_store_bytes", "RocksDB SST bytes")?)?,
            assigned_partitions: reg(
                r,
                IntGauge::new(
                    "jobmeter_assigned_partitions",
                    "Input partitions assigned to this instance",
                )?,
            )?,
            accounts: reg(
                r,
                IntGauge::new(
                    "jobmeter_accounts",
                    "Accounts whose records are held in memory (the account cache; the table itself is in RocksDB)",
                )?,
            )?,
            pro_subscribers: reg(
                r,
                IntGauge::new(
                    "jobmeter_pro_subscribers",
                    "Accounts with a pro record on the platform (held by every instance for the intro fee)",
                )?,
            )?,
            ready: reg(
                r,
                IntGauge::new("jobmeter_ready", "1 when state is restored and partitions are assigned")?,
            )?,
            api_requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new("jobmeter_api_requests_total", "Usage API requests by route and status"),
                    &["route", "status"],
                )?,
            )?,
            share: PipelineShare::new(1),
            committed: CommittedOffsets::default(),
        };
        // Create every bounded label up front so dashboards see zeros.
        for reason in RejectReason::ALL {
            m.rejected.with_label_values(&[reason.as_str()]);
        }
        for kind in JobKind::ALL {
            m.charges.with_label_values(&[kind.as_str()]);
            m.charged_usd.with_label_values(&[kind.as_str()]);
        }
        for outcome in ["applied", "duplicate", "rejected"] {
            m.events.with_label_values(&[outcome]);
        }
        for cause in ["keyless", "partitioner", "key_not_account"] {
            m.rerouted.with_label_values(&[cause]);
        }
        Ok(m)
    }

    /// One handle per pipeline of an instance running `n` of them: they
    /// share every metric, and each writes its own part of the gauges that
    /// sum over pipelines.
    pub fn for_pipelines(&self, n: usize) -> Vec<Metrics> {
        let share = PipelineShare::new(n);
        (0..n.max(1))
            .map(|slot| Metrics {
                share: PipelineShare {
                    slot,
                    slots: share.slots.clone(),
                },
                ..self.clone()
            })
            .collect()
    }

    /// This pipeline's assigned partitions.
    pub fn set_assigned(&self, n: usize) {
        let o = std::sync::atomic::Ordering::Relaxed;
        self.share.mine().assigned.store(n as i64, o);
        self.assigned_partitions.set(self.share.sum(|s| s.assigned.load(o)));
    }

    /// This pipeline's producer queue depth.
    pub fn set_producer_queue(&self, n: i64) {
        let o = std::sync::atomic::Ordering::Relaxed;
        self.share.mine().queue.store(n, o);
        self.producer_queue.set(self.share.sum(|s| s.queue.load(o)));
    }

    /// Whether this pipeline is ready; the gauge is 1 when every one is.
    pub fn set_ready(&self, ready: bool) {
        let o = std::sync::atomic::Ordering::Relaxed;
        self.share.mine().ready.store(ready, o);
        self.ready
            .set(i64::from(self.share.slots.iter().all(|s| s.ready.load(o))));
    }

    /// Adds the difference between two snapshots of a meter's stats.
    pub fn add_stats(&self, before: &Stats, after: &Stats) {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        self.events
            .with_label_values(&["applied"])
            .inc_by(d(before.events, after.events));
        self.events
            .with_label_values(&["duplicate"])
            .inc_by(d(before.duplicates, after.duplicates));
        let rej: u64 = after
            .rejected
            .iter()
            .sum::<u64>()
            .saturating_sub(before.rejected.iter().sum());
        self.events.with_label_values(&["rejected"]).inc_by(rej);
        for (i, reason) in RejectReason::ALL.iter().enumerate() {
            self.rejected
                .with_label_values(&[reason.as_str()])
                .inc_by(d(before.rejected[i], after.rejected[i]));
        }
        for (i, kind) in JobKind::ALL.iter().enumerate() {
            let amount = (after.amount_by_kind[i] - before.amount_by_kind[i])
                .0
                .to_f64()
                .unwrap_or(0.0);
            if amount > 0.0 {
                self.charged_usd.with_label_values(&[kind.as_str()]).inc_by(amount);
            }
        }
        self.adjustments.inc_by(d(before.adjustments, after.adjustments));
        self.orphans.inc_by(d(before.orphans, after.orphans));
        self.late_charges.inc_by(d(before.late_charges, after.late_charges));
        self.statements.inc_by(d(before.statements, after.statements));
        self.stop_commands.inc_by(d(before.stop_commands, after.stop_commands));
    }
}
