//! The pipeline thread: a consumer and an engine, rebuilt from durable
//! state after any failure, and the poll loop that hands records to the
//! engine in the merge order of [`jobmeter_core::order`] across the
//! partitions it reads.

mod clock;
mod read_ahead;
mod round;

use super::engine::{Engine, EngineConfig, EngineError, MeterContext, Rebalance};
use super::Deps;
use jobmeter_kafka::topics::partition_count;
use jobmeter_kafka::txn::TxnProducer;
use rdkafka::consumer::{BaseConsumer, Consumer};
use round::merge_round;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Runs one pipeline until `stop` is cancelled. A failure rebuilds the
/// pipeline from durable state after a backoff (doubling to 15 s); it
/// never ends the pipeline, so this returns only on stop.
pub(super) fn pipeline_loop(deps: &Deps, stop: &CancellationToken, ready: &AtomicBool) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match run_pipeline(deps, stop, ready) {
            Ok(()) => return,
            Err(e) => {
                ready.store(false, Ordering::SeqCst);
                deps.metrics.state.restarts.inc();
                tracing::error!(error = %e, backoff_ms = backoff.as_millis() as u64, "pipeline failed; rebuilding it from durable state");
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.is_cancelled() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
}

/// Stops fetching partitions whose state cannot be restored.
fn pause_failed<C: rdkafka::consumer::ConsumerContext>(consumer: &BaseConsumer<C>, topics: &[&str], parts: Vec<i32>) {
    if parts.is_empty() {
        return;
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in &parts {
        for topic in topics {
            tpl.add_partition(topic, *p);
        }
    }
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(error = %e, partitions = ?parts, "could not pause failing partitions; their records are skipped");
    }
}

/// A new engine: its own transactional producer, the shared store, table
/// and metrics.
fn new_engine(deps: &Deps) -> Result<Engine, EngineError> {
    let cfg = &deps.cfg;
    let txn_timeout = cfg.kafka.transaction_timeout.std();
    let producer = TxnProducer::new(&deps.settings, &cfg.transactional_id(), txn_timeout)?;
    let ecfg = EngineConfig {
        topics: deps.topics.clone(),
        settings: deps.settings.clone(),
        instance_id: cfg.instance_id.clone(),
        batch_max_events: cfg.batch.max_events,
        batch_interval: cfg.batch.interval.std(),
        meter: cfg.meter_config(),
        archive: cfg.state.finished_jobs == super::config::FinishedJobs::Store,
        max_local_age: cfg.state.max_local_age.std(),
        restore_deadline: txn_timeout * 4,
        commit_stall_after: txn_timeout * 4,
        input_partitions: match deps.input_partitions.load(Ordering::Relaxed) {
            0 => partition_count(&deps.settings, &deps.topics.job_events)?,
            n => n,
        },
    };
    Ok(Engine::new(
        ecfg,
        deps.billing.clone(),
        producer,
        deps.store.clone(),
        deps.metrics.clone(),
        deps.owned.clone(),
        deps.failing.clone(),
    ))
}

/// The group member that feeds `engine`, subscribed to the input topic;
/// its rebalance callback assigns and revokes the engine's partitions.
fn new_consumer(deps: &Deps, engine: &Arc<Mutex<Engine>>) -> Result<BaseConsumer<MeterContext>, EngineError> {
    let cfg = &deps.cfg;
    let consumer: BaseConsumer<MeterContext> = deps
        .settings
        .group_consumer(
            &cfg.kafka.group_id,
            &jobmeter_kafka::group::member_client_id(&cfg.instance_id, &cfg.advertised_url()),
        )
        // End-of-partition events tell the merge below that a partition
        // has nothing more to offer for now.
        .set("enable.partition.eof", "true")
        // Static membership: an instance restarted under its id (after
        // a crash, an upgrade) takes its partitions back at once,
        // without a rebalance that would hand them to others meanwhile;
        // the old incarnation, if alive, is fenced.
        .set("group.instance.id", &cfg.instance_id)
        .create_with_context(MeterContext {
            engine: engine.clone() as Arc<Mutex<dyn Rebalance>>,
            input_topic: deps.topics.job_events.clone(),
            repartition_topic: deps.topics.repartition.clone(),
        })
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Client {
            what: "consumer",
            source,
        })?;
    consumer
        .subscribe(&[&deps.topics.job_events])
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
            op: "subscribe",
            source,
        })?;
    Ok(consumer)
}

/// One incarnation of the pipeline: an engine and its consumer, merge
/// rounds until shutdown or an error; on the way out the open batch is
/// aborted (after an error) and the partitions are let go.
fn run_pipeline(deps: &Deps, stop: &CancellationToken, ready: &AtomicBool) -> Result<(), EngineError> {
    let engine = Arc::new(Mutex::new(new_engine(deps)?));
    let consumer = Arc::new(new_consumer(deps, &engine)?);
    let lock = || engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let result = loop {
        // One round per assignment: each assigned partition's input and
        // repartition records get their own queue, and the loop hands the
        // engine the queued record with the smallest timestamp first.
        match merge_round(deps, &consumer, &lock, stop, ready) {
            Ok(true) => continue,
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if result.is_err() {
        lock().abort();
    }
    ready.store(false, Ordering::SeqCst);
    deps.metrics.set_ready(false);
    // The next incarnation retries every partition it is given. Other
    // pipelines of the instance keep theirs.
    let mine = lock().assigned().clone();
    deps.failing
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|p, _| !mine.contains(p));
    deps.owned
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|p| !mine.contains(p));
    deps.metrics.set_assigned(0);
    consumer.unsubscribe();
    drop(consumer);
    result
}

/// When the poll loop last did its periodic chores.
struct Chores {
    report: Instant,
    resume: Instant,
}

impl Chores {
    fn new() -> Chores {
        Chores {
            report: Instant::now(),
            resume: Instant::now(),
        }
    }
}

/// How often the poll loop resumes every partition it meters.
const RESUME_EVERY: Duration = Duration::from_secs(1);

/// Resumes every partition this pipeline meters (both topics; not the
/// failing ones, which stay paused). A no-op for a partition that is not
/// paused. It repairs a race in librdkafka: `resume` skips a partition
/// whose pause (from the rebalance callback, a moment before) has not
/// been applied yet, and the pause then holds for good — the partition
/// never fetches again and nothing reports it (seen on a backlog: one
/// partition of six left 84,546 events unread for six minutes, every
/// pipeline ready).
fn keep_resumed(deps: &Deps, consumer: &BaseConsumer<MeterContext>, e: &Engine) {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in e.assigned().iter().filter(|p| !e.is_failing(**p)) {
        tpl.add_partition(&deps.topics.job_events, *p);
        tpl.add_partition(&deps.topics.repartition, *p);
    }
    if tpl.count() > 0 {
        if let Err(err) = consumer.resume(&tpl) {
            tracing::warn!(error = %err, "could not resume the metered partitions");
        }
    }
}

/// What every turn of the poll loop ends with: readiness, pausing newly
/// failed partitions, committing a due batch, the local gauges, keeping
/// the metered partitions resumed.
fn after_step(
    deps: &Deps,
    consumer: &BaseConsumer<MeterContext>,
    e: &mut Engine,
    ready: &AtomicBool,
    chores: &mut Chores,
) -> Result<(), EngineError> {
    ready.store(e.ready(), Ordering::SeqCst);
    pause_failed(
        consumer,
        &[&deps.topics.job_events, &deps.topics.repartition],
        e.take_newly_failed(),
    );
    if e.batch_due() {
        e.commit(consumer)?;
    }
    if chores.report.elapsed() > Duration::from_secs(5) {
        e.report_local();
        chores.report = Instant::now();
    }
    if chores.resume.elapsed() > RESUME_EVERY {
        keep_resumed(deps, consumer, e);
        chores.resume = Instant::now();
    }
    Ok(())
}

/// True when partition `p` of `topic` holds nothing this consumer has not
/// read: it is empty, or the position is at its high watermark (asked of
/// the broker). False when either is unknown.
fn read_to_end(consumer: &BaseConsumer<MeterContext>, pos: &rdkafka::TopicPartitionList, topic: &str, p: i32) -> bool {
    let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_millis(500)) else {
        return false;
    };
    let position = pos.find_partition(topic, p).and_then(|x| x.offset().to_raw());
    low >= high || position.is_some_and(|pos| pos >= 0 && pos >= high)
}
