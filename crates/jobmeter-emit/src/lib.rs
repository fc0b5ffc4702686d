//! # jobmeter-emit: lifecycle events from GPU workers
//!
//! A worker wraps each job in a [`JobGuard`]: [`Emitter::start`] publishes
//! `job.started`, a background thread publishes `job.heartbeat` on an
//! interval while the guard lives, and [`JobGuard::finish`] publishes
//! `job.stopped` with the job's status. If the guard is dropped without
//! `finish` — an early return, a `?`, a panic — the stop is still sent:
//! `failed` while panicking, `cancelled` otherwise. The meter therefore
//! never has to wait for the orphan timeout to bill a job that ended.
//!
//! ## Must never depend on
//! RocksDB, the service or the tools: a worker links the billing types and
//! the Kafka adapter only (`./dev test` checks it).
//!
//! ```no_run
//! use jobmeter_emit::{Emitter, EmitterConfig, JobSpec, StopStatus};
//! # fn run_inference() -> Result<(), String> { Ok(()) }
//! let emitter = Emitter::new(EmitterConfig::new("127.0.0.1:9092", "gpu-worker/us-east-1/node-17"))?;
//! let job = emitter.start(JobSpec::inference("acct-42", "job-123", "sdxl-1.0").gpu("A100-80GB"))?;
//! match run_inference() {
//!     Ok(()) => job.finish(StopStatus::Succeeded)?,
//!     Err(_) => job.finish(StopStatus::Failed)?,
//! }
//! emitter.flush(std::time::Duration::from_secs(10))?;
//! # Ok::<(), jobmeter_emit::EmitError>(())
//! ```
//!
//! ## What it guarantees
//! - **The event shape of the contract**: CloudEvents 1.0 structured JSON,
//!   `subject` = job id, `data.account_id`, `kind`/`model`/`workflow_run_id`
//!   /`gpu` on starts, `status` on stops, times in RFC 3339 with
//!   milliseconds (UTC).
//! - **Stable ids**: `<job>:started`, `<job>:hb:<n>`, `<job>:stopped`. With a
//!   stable `source` (one per worker), a re-sent event has the same
//!   `(source, id)` and the meter counts it once.
//! - **Ordered per account, no duplicates from retries**: records are keyed
//!   by `account_id` with Kafka's murmur2 partitioner, so an account's events
//!   land on the partition that meters it (other placements are forwarded
//!   there by the meter, at the cost of a detour), and produced with an
//!   idempotent producer (`enable.idempotence`, `acks=all`).
//! - Delivery failures are counted; [`Emitter::flush`] reports them.
//!
//! ## Stop commands
//! When an account runs out of what it may spend (free credits used up, a
//! spend limit reached — the plan's policy decides), the meter publishes a
//! `job.stop` command per running job on `<prefix>.commands`. The emitter
//! reads that topic (one consumer per emitter, read_committed, only the
//! jobs it runs) and fires the job's [`Cancellation`]: poll it with
//! [`JobGuard::cancelled`], or wait on a clone from
//! [`JobGuard::cancellation`]. Stop the work, then end the guard
//! (`finish(StopStatus::Cancelled)`, or drop it). A job that goes on is not
//! billed past the command plus the meter's stop grace, but the platform
//! pays for it.
//!
//! ```no_run
//! use jobmeter_emit::{EmitError, Emitter, JobSpec, StopStatus};
//! # fn train_one_step() {}
//! fn fine_tune(emitter: &Emitter) -> Result<(), EmitError> {
//!     let job = emitter.start(JobSpec::fine_tune("acct-42", "ft-7"))?;
//!     for _ in 0..10_000 {
//!         if job.cancelled() {
//!             return job.finish(StopStatus::Cancelled);
//!         }
//!         train_one_step();
//!     }
//!     job.finish(StopStatus::Succeeded)
//! }
//! ```

mod commands;

pub use commands::{Cancellation, StopCommand};
use jobmeter_core::wire::{CloudEvent, EventData};
use jobmeter_core::{JobKind, Timestamp};
use jobmeter_kafka::client::KafkaSettings;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Errors of the emitter.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The producer could not be created (bad settings).
    #[error("creating the Kafka producer: {0}")]
    Client(rdkafka::error::KafkaError),
    /// A record could not be queued.
    #[error("queueing {event}: {source}")]
    Send {
        /// The event id.
        event: String,
        /// librdkafka's error.
        source: rdkafka::error::KafkaError,
    },
    /// A flush did not finish, or some records were not delivered.
    #[error("{failed} event(s) not delivered{}", .last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Undelivered {
        /// How many.
        failed: u64,
        /// The last delivery error.
        last: Option<String>,
    },
    /// A job spec is not one the meter would accept.
    #[error("invalid job: {0}")]
    InvalidJob(String),
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStatus {
    /// Finished normally.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled by the user or the platform.
    Cancelled,
}

impl StopStatus {
    /// The contract's name.
    pub fn as_str(self) -> &'static str {
        match self {
            StopStatus::Succeeded => "succeeded",
            StopStatus::Failed => "failed",
            StopStatus::Cancelled => "cancelled",
        }
    }
}

/// Emitter settings.
#[derive(Debug, Clone)]
pub struct EmitterConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The job-events topic.
    pub topic: String,
    /// CloudEvents `source`: one stable value per worker (it scopes event ids).
    pub source: String,
    /// Heartbeat interval while a job runs.
    pub heartbeat_interval: Duration,
    /// librdkafka properties passed through (SASL, SSL…).
    pub properties: BTreeMap<String, String>,
    /// The meter's commands topic, read for `job.stop` commands to the jobs
    /// this emitter runs; `None`: do not listen.
    pub commands_topic: Option<String>,
}

impl EmitterConfig {
    /// Defaults: topic `jobmeter.job-events`, heartbeats every 10 s,
    /// commands from `jobmeter.commands`.
    pub fn new(brokers: impl Into<String>, source: impl Into<String>) -> Self {
        EmitterConfig {
            brokers: brokers.into(),
            topic: "jobmeter.job-events".into(),
            source: source.into(),
            heartbeat_interval: Duration::from_secs(10),
            properties: BTreeMap::new(),
            commands_topic: Some("jobmeter.commands".into()),
        }
    }

    /// Topics under `prefix` (`<prefix>.job-events`, `<prefix>.commands`).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.topic = format!("{prefix}.job-events");
        if self.commands_topic.is_some() {
            self.commands_topic = Some(format!("{prefix}.commands"));
        }
        self
    }
}

/// What a job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// The account billed.
    pub account_id: String,
    /// The job id (CloudEvents `subject`); unique per account.
    pub job_id: String,
    /// Inference, fine-tune or workflow step.
    pub kind: JobKind,
    /// The model (required unless fine-tune).
    pub model: Option<String>,
    /// The workflow run (required for workflow steps).
    pub workflow_run_id: Option<String>,
    /// GPU class (informational).
    pub gpu: Option<String>,
}

impl JobSpec {
    /// An inference job.
    pub fn inference(account: &str, job: &str, model: &str) -> Self {
        JobSpec {
            account_id: account.into(),
            job_id: job.into(),
            kind: JobKind::Inference,
            model: Some(model.into()),
            workflow_run_id: None,
            gpu: None,
        }
    }

    /// A fine-tuning job.
    pub fn fine_tune(account: &str, job: &str) -> Self {
        JobSpec {
            kind: JobKind::FineTune,
            model: None,
            ..JobSpec::inference(account, job, "")
        }
    }

    /// A step of a workflow run.
    pub fn workflow_step(account: &str, job: &str, model: &str, run: &str) -> Self {
        JobSpec {
            kind: JobKind::WorkflowStep,
            workflow_run_id: Some(run.into()),
            ..JobSpec::inference(account, job, model)
        }
    }

    /// Sets the model (a fine-tune may name its base model).
    pub fn model(mut self, model: &str) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets the GPU class.
    pub fn gpu(mut self, gpu: &str) -> Self {
        self.gpu = Some(gpu.into());
        self
    }

    /// Why the meter would refuse this job's start, if it would.
    pub fn problem(&self) -> Option<String> {
        if self.account_id.is_empty() {
            return Some("account_id is empty".into());
        }
        if self.job_id.is_empty() {
            return Some("job_id is empty".into());
        }
        match self.kind {
            JobKind::Inference | JobKind::WorkflowStep if self.model.as_deref().is_none_or(str::is_empty) => {
                Some(format!("a {} job needs a model", self.kind.as_str()))
            }
            JobKind::WorkflowStep if self.workflow_run_id.as_deref().is_none_or(str::is_empty) => {
                Some("a workflow step needs a workflow_run_id".into())
            }
            _ => None,
        }
    }
}

/// A lifecycle event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// `job.started`.
    Started,
    /// `job.heartbeat` number n (from 1).
    Heartbeat(u64),
    /// `job.stopped`.
    Stopped(StopStatus),
}

/// The CloudEvent JSON of one lifecycle event of `job` at `time`.
pub fn event_json(source: &str, job: &JobSpec, ty: EventType, time: Timestamp) -> String {
    let (type_name, id) = match ty {
        EventType::Started => ("job.started", format!("{}:started", job.job_id)),
        EventType::Heartbeat(n) => ("job.heartbeat", format!("{}:hb:{n}", job.job_id)),
        EventType::Stopped(_) => ("job.stopped", format!("{}:stopped", job.job_id)),
    };
    let mut data = EventData {
        account_id: &job.account_id,
        ..EventData::default()
    };
    match ty {
        EventType::Started => {
            data.kind = Some(job.kind.as_str());
            data.model = job.model.as_deref();
            data.workflow_run_id = job.workflow_run_id.as_deref();
            data.gpu = job.gpu.as_deref();
        }
        EventType::Heartbeat(_) => {}
        EventType::Stopped(s) => data.status = Some(s.as_str()),
    }
    CloudEvent::new(&id, source, type_name, time, &job.job_id, data).to_json()
}

/// Counts delivery failures.
#[derive(Debug, Default)]
struct Deliveries {
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Producer context recording delivery results.
#[derive(Debug, Clone, Default)]
pub struct EmitContext {
    deliveries: Arc<Deliveries>,
}

impl ClientContext for EmitContext {}

impl ProducerContext for EmitContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.deliveries.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = self.deliveries.last_error.lock() {
                *l = Some(e.to_string());
            }
        }
    }
}

struct Inner {
    listener: Option<commands::Listener>,
    producer: ThreadedProducer<EmitContext>,
    context: EmitContext,
    topic: String,
    source: String,
    heartbeat_interval: Duration,
}

/// Publishes lifecycle events. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Emitter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("topic", &self.inner.topic)
            .field("source", &self.inner.source)
            .finish()
    }
}

/// The `group.id` of every emitter's commands listener (never joined):
/// workers' principals need `Describe` on it where ACLs are on.
pub const COMMANDS_READER_GROUP: &str = "jobmeter-emit";

impl Emitter {
    /// Connects (lazily: librdkafka connects on first use).
    pub fn new(cfg: EmitterConfig) -> Result<Emitter, EmitError> {
        let mut settings = KafkaSettings::new(cfg.brokers.clone());
        settings.properties = cfg.properties.clone();
        // The commands listener reads by assignment; its group id is only
        // looked up, and the workers' ACL lets them describe this one.
        settings.reader_group = Some(COMMANDS_READER_GROUP.to_owned());
        let context = EmitContext::default();
        let producer = settings
            .producer()
            .create_with_context(context.clone())
            .map_err(EmitError::Client)?;
        let listener = match &cfg.commands_topic {
            Some(topic) => Some(
                commands::Listener::start(&settings, topic, &format!("jobmeter-emit-{}", std::process::id()))
                    .map_err(EmitError::Client)?,
            ),
            None => None,
        };
        Ok(Emitter {
            inner: Arc::new(Inner {
                listener,
                producer,
                context,
                topic: cfg.topic,
                source: cfg.source,
                heartbeat_interval: cfg.heartbeat_interval,
            }),
        })
    }

    /// Publishes one event of `job` now.
    pub fn emit(&self, job: &JobSpec, ty: EventType) -> Result<(), EmitError> {
        let now = Timestamp::now();
        let json = event_json(&self.inner.source, job, ty, now);
        // The record timestamp is the event's time: the meter refuses an
        // event whose time is far from its record's.
        let rec = BaseRecord::to(&self.inner.topic)
            .key(job.account_id.as_str())
            .payload(json.as_str())
            .timestamp(now.0);
        jobmeter_kafka::produce::send_waiting(&self.inner.producer, rec, None).map_err(|source| EmitError::Send {
            event: format!("{}:{ty:?}", job.job_id),
            source,
        })
    }

    /// Publishes `job.started` and returns the guard that heartbeats and
    /// stops the job.
    pub fn start(&self, job: JobSpec) -> Result<JobGuard, EmitError> {
        if let Some(p) = job.problem() {
            return Err(EmitError::InvalidJob(p));
        }
        // Watched before the start is sent: its command cannot come earlier.
        let cancel = match &self.inner.listener {
            Some(l) => l.watch(&job.account_id, &job.job_id),
            None => Cancellation::default(),
        };
        if let Err(e) = self.emit(&job, EventType::Started) {
            self.forget(&job);
            return Err(e);
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let heartbeats = {
            let (emitter, job, stop) = (self.clone(), job.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("heartbeat-{}", job.job_id))
                .spawn(move || emitter.heartbeat_loop(&job, &stop))
                .ok()
        };
        Ok(JobGuard {
            emitter: self.clone(),
            job,
            stop,
            heartbeats,
            finished: false,
            cancel,
        })
    }

    fn forget(&self, job: &JobSpec) {
        if let Some(l) = &self.inner.listener {
            l.forget(&job.account_id, &job.job_id);
        }
    }

    fn heartbeat_loop(&self, job: &JobSpec, stop: &(Mutex<bool>, Condvar)) {
        let (lock, cv) = stop;
        let mut n = 0;
        let Ok(mut stopped) = lock.lock() else { return };
        loop {
            let Ok((guard, timeout)) = cv.wait_timeout(stopped, self.inner.heartbeat_interval) else {
                return;
            };
            stopped = guard;
            if *stopped {
                return;
            }
            if timeout.timed_out() {
                n += 1;
                // A heartbeat that cannot be queued is not fatal: the next
                // one (or the stop) carries the job on.
                let _ = self.emit(job, EventType::Heartbeat(n));
            }
        }
    }

    /// Waits until every queued event is delivered (or `timeout`), and
    /// reports events that could not be delivered since the last flush.
    pub fn flush(&self, timeout: Duration) -> Result<(), EmitError> {
        let flushed = self.inner.producer.flush(timeout);
        let failed = self.inner.context.deliveries.failed.swap(0, Ordering::Relaxed);
        let last = self
            .inner
            .context
            .deliveries
            .last_error
            .lock()
            .ok()
            .and_then(|mut l| l.take());
        match (failed, flushed) {
            (0, Ok(())) => Ok(()),
            (0, Err(e)) => Err(EmitError::Undelivered {
                failed: u64::from(self.inner.producer.in_flight_count().max(0) as u32),
                last: Some(e.to_string()),
            }),
            (n, _) => Err(EmitError::Undelivered { failed: n, last }),
        }
    }
}

/// A running job. Heartbeats while it lives; always ends with a stop.
#[derive(Debug)]
pub struct JobGuard {
    emitter: Emitter,
    job: JobSpec,
    stop: Arc<(Mutex<bool>, Condvar)>,
    heartbeats: Option<std::thread::JoinHandle<()>>,
    finished: bool,
    cancel: Cancellation,
}

impl JobGuard {
    /// The job.
    pub fn job(&self) -> &JobSpec {
        &self.job
    }

    /// True once the meter has sent this job a `job.stop` (its account may
    /// not spend more): stop the work and end the guard.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A handle on the job's cancellation, to poll or wait on from the code
    /// that runs the job.
    pub fn cancellation(&self) -> Cancellation {
        self.cancel.clone()
    }

    fn end(&mut self, status: StopStatus) -> Result<(), EmitError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        {
            let (lock, cv) = &*self.stop;
            if let Ok(mut s) = lock.lock() {
                *s = true;
            }
            cv.notify_all();
        }
        if let Some(h) = self.heartbeats.take() {
            let _ = h.join();
        }
        self.emitter.forget(&self.job);
        self.emitter.emit(&self.job, EventType::Stopped(status))
    }

    /// Publishes `job.stopped` with `status`.
    pub fn finish(mut self, status: StopStatus) -> Result<(), EmitError> {
        self.end(status)
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        let status = if std::thread::panicking() {
            StopStatus::Failed
        } else {
            StopStatus::Cancelled
        };
        let _ = self.end(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_what_the_meter_accepts() {
        let t = Timestamp::parse("2024-05-01T12:00:00.250Z").unwrap_or(Timestamp(0));
        let job = JobSpec::workflow_step("acct-42", "job-1", "sdxl-1.0", "run-9").gpu("A100-80GB");
        for (ty, want) in [
            (EventType::Started, "job.started"),
            (EventType::Heartbeat(3), "job.heartbeat"),
            (EventType::Stopped(StopStatus::Failed), "job.stopped"),
        ] {
            let json = event_json("node-17", &job, ty, t);
            let e = jobmeter_core::parse_job_event(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: {e:?}"));
            assert_eq!(e.job.as_str(), "job-1");
            assert!(json.contains(want), "{json}");
            assert!(json.contains(r#""time":"2024-05-01T12:00:00.250Z""#), "{json}");
        }
        let a = event_json("node-17", &job, EventType::Heartbeat(3), t);
        let b = event_json("node-17", &job, EventType::Heartbeat(3), Timestamp(t.0 + 5));
        let id = |s: &str| {
            serde_json::from_str::<serde_json::Value>(s)
                .map(|v| v["id"].clone())
                .ok()
        };
        assert_eq!(id(&a), id(&b), "a re-sent event keeps its id");
    }

    #[test]
    fn refuses_jobs_the_meter_would_reject() {
        assert!(JobSpec::inference("a", "j", "").problem().is_some());
        assert!(JobSpec::workflow_step("a", "j", "m", "").problem().is_some());
        assert!(JobSpec::fine_tune("a", "j").problem().is_none());
        assert!(JobSpec::inference("", "j", "m").problem().is_some());
    }
}
