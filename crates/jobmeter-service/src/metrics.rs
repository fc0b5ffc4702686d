//! The meter's Prometheus metrics, registered into an explicit registry
//! created by the caller. Label sets are bounded: reasons, kinds, limits
//! and input partitions (bounded by configuration) only, never an account
//! or job id.

use jobmeter_core::{JobKind, RejectReason, Stats};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use rust_decimal::prelude::ToPrimitive;

/// All metrics of the streaming meter, by subsystem.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// What the pipelines read.
    pub input: InputMetrics,
    /// What the meters bill.
    pub billing: BillingMetrics,
    /// Batches and their transactions.
    pub commit: CommitMetrics,
    /// Partition state: restores, the store, failures.
    pub state: StateMetrics,
    /// The instance: partitions, readiness, accounts, the API.
    pub instance: InstanceMetrics,
    /// This pipeline's slot behind the instance-wide gauges.
    share: PipelineShare,
    /// The input offsets (next to read) of the last committed batch, by
    /// (topic, partition), shared by every pipeline: what the usage API's
    /// answers reflect (`committed_offsets`).
    pub committed: CommittedOffsets,
}

/// What the pipelines read.
#[derive(Debug, Clone)]
pub struct InputMetrics {
    /// Input records consumed, by outcome (counted when committed).
    pub events: IntCounterVec,
    /// Input records read and applied, committed or not yet.
    pub consumed: IntCounter,
    /// Pricing adjustments read and applied (duplicates and rejects
    /// included), committed or not yet.
    pub adjustments: IntCounter,
    /// Rejected inputs by reason.
    pub rejected: IntCounterVec,
    /// Input records forwarded to the partition that meters their account,
    /// by cause (counted when committed).
    pub rerouted: IntCounterVec,
    /// Consumer lag per input partition: the high watermark minus the
    /// group's committed offset (the log start when none is committed),
    /// so records read but not yet committed count as lag. Sampled every
    /// 5 s by a thread of its own, for every partition of the topic.
    pub lag: IntGaugeVec,
    /// Seconds the event-time merge waited for a partition that had
    /// records in Kafka not yet fetched (stream time held back).
    pub merge_wait_seconds: prometheus::Counter,
}

/// What the meters bill.
#[derive(Debug, Clone)]
pub struct BillingMetrics {
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
    pub statements: IntCounterVec,
    /// `job.stop` commands published (counted when committed).
    pub stop_commands: IntCounter,
    /// Open jobs per partition.
    pub open_jobs: IntGaugeVec,
}

/// Batches and their transactions.
#[derive(Debug, Clone)]
pub struct CommitMetrics {
    /// Events per committed batch.
    pub batch_events: Histogram,
    /// Time to commit a batch (Kafka transaction + RocksDB write), by step.
    pub commit_seconds: HistogramVec,
    /// Records waiting in the producer's local queue.
    pub producer_queue: IntGauge,
}

/// Partition state: restores, the store, failures.
#[derive(Debug, Clone)]
pub struct StateMetrics {
    /// 1 for an assigned partition whose stored state cannot be read back
    /// (it is not metered until it is rebuilt); 0 otherwise.
    pub partition_failed: IntGaugeVec,
    /// Time to restore a partition's state.
    pub restore_seconds: Histogram,
    /// Changelog records replayed during restores.
    pub restored_records: IntCounter,
    /// RocksDB SST bytes.
    pub store_bytes: IntGauge,
    /// Pipeline restarts after errors.
    pub restarts: IntCounter,
}

/// The instance: partitions, readiness, accounts, the API.
#[derive(Debug, Clone)]
pub struct InstanceMetrics {
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
    /// Loads of the HTTPS certificate and key, by outcome.
    pub tls_loads: IntCounterVec,
    /// When the served certificate expires (Unix seconds; 0 without TLS).
    pub tls_not_after: IntGauge,
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

/// Registers metrics into one registry, each in one line.
struct Reg<'r>(&'r Registry);

impl Reg<'_> {
    fn add<T: prometheus::core::Collector + Clone + 'static>(&self, c: T) -> Result<T, prometheus::Error> {
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }
    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(name, help)?)
    }
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }
    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(name, help)?)
    }
    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }
    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, prometheus::Error> {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        )?)
    }
}

impl InputMetrics {
    fn new(r: &Reg<'_>) -> Result<InputMetrics, prometheus::Error> {
        let m = InputMetrics {
            events: r.counters(
                "jobmeter_events_total",
                "Input records consumed, by outcome (applied, duplicate, rejected)",
                &["outcome"],
            )?,
            consumed: r.counter(
                "jobmeter_records_consumed_total",
                "Input records read and applied, including the batch not yet committed",
            )?,
            adjustments: r.counter(
                "jobmeter_adjustments_read_total",
                "Pricing adjustments read and applied by the meters (duplicates and rejects included), including the batch not yet committed",
            )?,
            rejected: r.counters("jobmeter_rejected_total", "Inputs sent to the DLQ, by reason", &["reason"])?,
            rerouted: r.counters(
                "jobmeter_events_rerouted_total",
                "Input records that arrived on a partition other than their account's and were forwarded to it, by cause (keyless, partitioner, key_not_account)",
                &["cause"],
            )?,
            lag: r.gauges(
                "jobmeter_consumer_lag",
                "Input records not yet consumed, per partition",
                &["partition"],
            )?,
            merge_wait_seconds: r.add(prometheus::Counter::new(
                "jobmeter_merge_wait_seconds_total",
                "Seconds the event-time merge held stream time back, waiting for a partition with records in Kafka not yet fetched",
            )?)?,
        };
        // Every bounded label up front, so that dashboards see zeros.
        for reason in RejectReason::ALL {
            m.rejected.with_label_values(&[reason.as_str()]);
        }
        for outcome in ["applied", "duplicate", "rejected"] {
            m.events.with_label_values(&[outcome]);
        }
        for cause in ["keyless", "partitioner", "key_not_account"] {
            m.rerouted.with_label_values(&[cause]);
        }
        Ok(m)
    }
}

impl BillingMetrics {
    fn new(r: &Reg<'_>) -> Result<BillingMetrics, prometheus::Error> {
        let m = BillingMetrics {
            charges: r.counters("jobmeter_charges_total", "Charges emitted, by job kind", &["kind"])?,
            charged_usd: r.add(prometheus::CounterVec::new(
                Opts::new("jobmeter_charged_usd_total", "List amount charged, USD, by job kind"),
                &["kind"],
            )?)?,
            adjustments: r.counter("jobmeter_adjustments_total", "Adjustment charges after late stops")?,
            orphans: r.counter("jobmeter_orphans_total", "Jobs closed as orphaned")?,
            late_charges: r.counter(
                "jobmeter_late_charges_total",
                "Charges billed in a later period than their usage",
            )?,
            limit_events: r.counters(
                "jobmeter_limit_events_total",
                "Limit events emitted, by limit and threshold",
                &["limit", "threshold"],
            )?,
            statements: {
                let v = r.counters(
                    "jobmeter_statements_total",
                    "Statements emitted, by the cadence of their billing period (monthly, semi_monthly)",
                    &["cadence"],
                )?;
                // Both series exist from the start, at zero.
                for c in ["monthly", "semi_monthly"] {
                    v.with_label_values(&[c]);
                }
                v
            },
            stop_commands: r.counter(
                "jobmeter_stop_commands_total",
                "job.stop commands published to the commands topic (spend control)",
            )?,
            open_jobs: r.gauges(
                "jobmeter_open_jobs",
                "Running jobs not yet charged, per input partition",
                &["partition"],
            )?,
        };
        for kind in JobKind::ALL {
            m.charges.with_label_values(&[kind.as_str()]);
            m.charged_usd.with_label_values(&[kind.as_str()]);
        }
        Ok(m)
    }
}

impl CommitMetrics {
    fn new(r: &Reg<'_>) -> Result<CommitMetrics, prometheus::Error> {
        Ok(CommitMetrics {
            batch_events: r.histogram(
                "jobmeter_batch_events",
                "Input events per committed batch",
                &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0],
            )?,
            commit_seconds: r.add(HistogramVec::new(
                HistogramOpts::new(
                    "jobmeter_commit_seconds",
                    "Time to commit a batch, by step (handover: the pipeline waiting for the committer to take the batch; produce: outputs and changelog records; offsets: add offsets to the transaction; commit: transaction commit; store: RocksDB write)",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
                &["step"],
            )?)?,
            producer_queue: r.gauge(
                "jobmeter_producer_queue_depth",
                "Records waiting in the producer's local queue",
            )?,
        })
    }
}

impl StateMetrics {
    fn new(r: &Reg<'_>) -> Result<StateMetrics, prometheus::Error> {
        Ok(StateMetrics {
            partition_failed: r.gauges(
                "jobmeter_partition_failed",
                "1 while an assigned input partition is not metered because its stored state cannot be decoded (see /readyz and the log; recover with jobmeter rebuild)",
                &["partition"],
            )?,
            restore_seconds: r.histogram(
                "jobmeter_restore_seconds",
                "Time to restore a partition's state",
                &[0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0],
            )?,
            restored_records: r.counter(
                "jobmeter_restored_records_total",
                "Changelog records replayed during restores",
            )?,
            store_bytes: r.gauge("jobmeter_state_store_bytes", "RocksDB SST bytes")?,
            restarts: r.counter("jobmeter_pipeline_restarts_total", "Pipeline restarts after errors")?,
        })
    }
}

impl InstanceMetrics {
    fn new(r: &Reg<'_>) -> Result<InstanceMetrics, prometheus::Error> {
        Ok(InstanceMetrics {
            assigned_partitions: r.gauge(
                "jobmeter_assigned_partitions",
                "Input partitions assigned to this instance",
            )?,
            accounts: r.gauge(
                "jobmeter_accounts",
                "Accounts whose records are held in memory (the account cache; the table itself is in RocksDB)",
            )?,
            pro_subscribers: r.gauge(
                "jobmeter_pro_subscribers",
                "Accounts with a pro record on the platform (held by every instance for the intro fee)",
            )?,
            ready: r.gauge("jobmeter_ready", "1 when state is restored and partitions are assigned")?,
            api_requests: r.counters(
                "jobmeter_api_requests_total",
                "Usage API requests by route and status",
                &["route", "status"],
            )?,
            tls_loads: r.counters(
                "jobmeter_http_tls_loads_total",
                "Loads of the HTTPS certificate and key (at start and on change), by outcome (loaded, failed: the previous pair is kept)",
                &["outcome"],
            )?,
            tls_not_after: r.gauge(
                "jobmeter_http_tls_certificate_not_after_seconds",
                "When the served HTTPS certificate expires, in Unix seconds (0 without TLS)",
            )?,
        })
    }
}

impl Metrics {
    /// Creates the metrics and registers them into `r`.
    pub fn new(r: &Registry) -> Result<Metrics, prometheus::Error> {
        let r = Reg(r);
        Ok(Metrics {
            input: InputMetrics::new(&r)?,
            billing: BillingMetrics::new(&r)?,
            commit: CommitMetrics::new(&r)?,
            state: StateMetrics::new(&r)?,
            instance: InstanceMetrics::new(&r)?,
            share: PipelineShare::new(1),
            committed: CommittedOffsets::default(),
        })
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
        self.instance
            .assigned_partitions
            .set(self.share.sum(|s| s.assigned.load(o)));
    }

    /// This pipeline's producer queue depth.
    pub fn set_producer_queue(&self, n: i64) {
        let o = std::sync::atomic::Ordering::Relaxed;
        self.share.mine().queue.store(n, o);
        self.commit.producer_queue.set(self.share.sum(|s| s.queue.load(o)));
    }

    /// Whether this pipeline is ready; the gauge is 1 when every one is.
    pub fn set_ready(&self, ready: bool) {
        let o = std::sync::atomic::Ordering::Relaxed;
        self.share.mine().ready.store(ready, o);
        self.instance
            .ready
            .set(i64::from(self.share.slots.iter().all(|s| s.ready.load(o))));
    }

    /// Adds the difference between two snapshots of a meter's stats.
    pub fn add_stats(&self, before: &Stats, after: &Stats) {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        self.input
            .events
            .with_label_values(&["applied"])
            .inc_by(d(before.events, after.events));
        self.input
            .events
            .with_label_values(&["duplicate"])
            .inc_by(d(before.duplicates, after.duplicates));
        let rej: u64 = after
            .rejected
            .iter()
            .sum::<u64>()
            .saturating_sub(before.rejected.iter().sum());
        self.input.events.with_label_values(&["rejected"]).inc_by(rej);
        for (i, reason) in RejectReason::ALL.iter().enumerate() {
            self.input
                .rejected
                .with_label_values(&[reason.as_str()])
                .inc_by(d(before.rejected[i], after.rejected[i]));
        }
        for (i, kind) in JobKind::ALL.iter().enumerate() {
            let amount = (after.amount_by_kind[i] - before.amount_by_kind[i])
                .0
                .to_f64()
                .unwrap_or(0.0);
            if amount > 0.0 {
                self.billing
                    .charged_usd
                    .with_label_values(&[kind.as_str()])
                    .inc_by(amount);
            }
        }
        self.billing
            .adjustments
            .inc_by(d(before.adjustments, after.adjustments));
        self.billing.orphans.inc_by(d(before.orphans, after.orphans));
        self.billing
            .late_charges
            .inc_by(d(before.late_charges, after.late_charges));
        let semi = d(before.semi_monthly_statements, after.semi_monthly_statements);
        self.billing
            .statements
            .with_label_values(&["monthly"])
            .inc_by(d(before.statements, after.statements).saturating_sub(semi));
        self.billing
            .statements
            .with_label_values(&["semi_monthly"])
            .inc_by(semi);
        self.billing
            .stop_commands
            .inc_by(d(before.stop_commands, after.stop_commands));
    }
}
