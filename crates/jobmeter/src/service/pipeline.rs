//! The pipeline thread: a consumer and an engine, rebuilt from durable
//! state after any failure, and the poll loop that hands records to the
//! engine (in arrival order while every event arrives on its account's
//! partition, in event-time order across partitions otherwise).

use super::engine::{Engine, EngineConfig, EngineError, MeterContext, Rebalance};
use super::Deps;
use jobmeter_kafka::topics::partition_count;
use jobmeter_kafka::txn::TxnProducer;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(super) fn pipeline_loop(deps: &Deps, stop: &Arc<AtomicBool>, ready: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match run_pipeline(deps, stop, ready) {
            Ok(()) => return Ok(()),
            Err(e) => {
                ready.store(false, Ordering::SeqCst);
                deps.metrics.restarts.inc();
                tracing::error!(error = %e, backoff_ms = backoff.as_millis() as u64, "pipeline failed; rebuilding it from durable state");
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.load(Ordering::SeqCst) {
                        return Ok(());
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

fn run_pipeline(deps: &Deps, stop: &AtomicBool, ready: &AtomicBool) -> Result<(), EngineError> {
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
    let engine = Arc::new(Mutex::new(Engine::new(
        ecfg,
        deps.billing.clone(),
        producer,
        deps.store.clone(),
        deps.metrics.clone(),
        deps.owned.clone(),
        deps.failing.clone(),
    )));
    let consumer: Arc<BaseConsumer<MeterContext>> = Arc::new(
        deps.settings
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
            })?,
    );
    consumer
        .subscribe(&[&deps.topics.job_events])
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
            op: "subscribe",
            source,
        })?;
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

/// Runs the pipeline for one assignment while every event arrives on its
/// account's partition: records are applied in arrival order from the
/// consumer's queue (each meter then sees only its own partition, in
/// order). The first event that arrives elsewhere ends the round: the
/// partitions are paused (which drops what was fetched but not applied)
/// and the next round applies them in event-time order from
/// per-partition queues. Returns like [`merge_round`].
fn fast_round<'e>(
    deps: &Deps,
    consumer: &Arc<BaseConsumer<MeterContext>>,
    lock: &dyn Fn() -> std::sync::MutexGuard<'e, Engine>,
    stop: &AtomicBool,
    ready: &AtomicBool,
    epoch: u64,
    assigned: &std::collections::BTreeSet<i32>,
) -> Result<bool, EngineError> {
    let mut all = rdkafka::TopicPartitionList::new();
    for p in assigned {
        all.add_partition(&deps.topics.job_events, *p);
        all.add_partition(&deps.topics.repartition, *p);
    }
    consumer
        .resume(&all)
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
            op: "resume partitions",
            source,
        })?;
    let mut chores = Chores::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            lock().commit_and_wait(consumer)?;
            tracing::info!("last batch committed");
            return Ok(false);
        }
        let msg = consumer.poll(Duration::from_millis(20));
        let mut e = lock();
        if e.begin_turn(epoch)? {
            return Ok(true);
        }
        match msg {
            Some(Ok(m)) => e.process(&m)?,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(err)) => tracing::warn!(error = %err, "consumer error"),
        }
        after_step(deps, consumer, &mut e, ready, &mut chores)?;
        if e.rerouting() {
            tracing::info!("events arrive on other partitions than their accounts': applying this instance's partitions in event-time order from now on");
            consumer
                .pause(&all)
                .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
                    op: "pause partitions",
                    source,
                })?;
            return Ok(true);
        }
    }
}

/// Records of different partitions less than this much event time apart
/// may be applied in arrival order: live traffic (event time moving with
/// the clock) then never waits for a partition's next fetch.
const MERGE_TOLERANCE_MS: i64 = 1_000;

/// Runs the pipeline for one assignment (see [`fast_round`] for a fleet
/// that places every event on its account's partition). Records are handed
/// to the engine in event-time order across this instance's partitions (ties by
/// partition), waiting up to `batch.max_idle` for a partition that has not
/// reached its end and has nothing queued: an account's events that arrive on several partitions
/// are then metered close to the order they were produced in, even when
/// the instance catches up on a backlog. Returns `Ok(true)` when the
/// assignment changed, `Ok(false)` on shutdown.
fn merge_round<'e>(
    deps: &Deps,
    consumer: &Arc<BaseConsumer<MeterContext>>,
    lock: &dyn Fn() -> std::sync::MutexGuard<'e, Engine>,
    stop: &AtomicBool,
    ready: &AtomicBool,
) -> Result<bool, EngineError> {
    use rdkafka::message::{BorrowedMessage, Headers, Message};
    let (epoch, assigned) = {
        let e = lock();
        (e.epoch(), e.assigned().clone())
    };
    // Records fetched before the queues were split wait in the main queue:
    // they come first (they precede whatever the split queues hold).
    while let Some(m) = consumer.poll(Duration::ZERO) {
        if let Ok(m) = m {
            lock().process(&m)?;
        }
    }
    if !lock().rerouting() {
        return fast_round(deps, consumer, lock, stop, ready, epoch, &assigned);
    }
    let mut queues = Vec::new();
    let mut resume = rdkafka::TopicPartitionList::new();
    for p in &assigned {
        for topic in [&deps.topics.job_events, &deps.topics.repartition] {
            if let Some(q) = consumer.split_partition_queue(topic, *p) {
                queues.push((*p, q));
                resume.add_partition(topic, *p);
            }
        }
    }
    // Assigned partitions start paused (see the rebalance callback).
    consumer
        .resume(&resume)
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
            op: "resume partitions",
            source,
        })?;
    // Each queue's next record, its event (parsed once) and merge key.
    type Head<'q> = (BorrowedMessage<'q>, Option<jobmeter_core::JobEvent>, i64);
    let mut heads: Vec<Option<Head<'_>>> = queues.iter().map(|_| None).collect();
    let mut at_end = vec![false; queues.len()];
    // Since when each queue has had nothing while its partition has not
    // reached its end: it holds the others back for `max_idle` at most,
    // until it delivers a record or reaches its end.
    let mut starved_since: Vec<Option<Instant>> = vec![None; queues.len()];
    let max_idle = deps.cfg.batch.max_idle.std();
    // The event time of each queue's last record (where it stands).
    let mut last_key = vec![i64::MIN; queues.len()];
    let mut last_main = Instant::now();
    let mut chores = Chores::new();
    let mut last_ends = Instant::now();
    let mut idle = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            lock().commit_and_wait(consumer)?;
            tracing::info!("last batch committed");
            return Ok(false);
        }
        if idle || last_main.elapsed() >= Duration::from_millis(5) {
            // Serves rebalances and errors (the records come from the
            // partition queues).
            let mut timeout = if idle { Duration::from_millis(2) } else { Duration::ZERO };
            for _ in 0..64 {
                match consumer.poll(timeout) {
                    Some(Ok(m)) => lock().process(&m)?,
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                    Some(Err(err)) => tracing::warn!(error = %err, "consumer error"),
                    None => break,
                }
                timeout = Duration::ZERO;
            }
            last_main = Instant::now();
        }
        let mut e = lock();
        if e.begin_turn(epoch)? {
            return Ok(true);
        }
        // A queue at its end is asked again at most once a millisecond (it
        // holds nothing back meanwhile); the others whenever they are empty.
        let ends_due = idle || last_ends.elapsed() >= Duration::from_millis(1);
        if ends_due {
            last_ends = Instant::now();
        }
        idle = false;
        for round in 0..256 {
            for (i, (p, q)) in queues.iter().enumerate() {
                if heads[i].is_some() || (at_end[i] && (!ends_due || round > 0)) {
                    continue;
                }
                if e.is_failing(*p) {
                    at_end[i] = true;
                    continue;
                }
                match q.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        let marker = m
                            .headers()
                            .is_some_and(|h| h.iter().any(|x| x.key == jobmeter_kafka::repartition::MARKER));
                        let parsed = if marker {
                            None
                        } else {
                            jobmeter_core::parse_job_event(m.payload().unwrap_or_default()).ok()
                        };
                        let key = e.merge_key(&m, parsed.as_ref());
                        heads[i] = Some((m, parsed, key));
                        at_end[i] = false;
                        starved_since[i] = None;
                    }
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                        at_end[i] = true;
                        starved_since[i] = None;
                    }
                    Some(Err(err)) => tracing::warn!(error = %err, partition = *p, "consumer error"),
                    None => {
                        if !at_end[i] {
                            starved_since[i].get_or_insert_with(Instant::now);
                        }
                    }
                }
            }
            // Records that cannot move stream time go at once; otherwise
            // the oldest head, unless a partition with
            // records on the way has none queued, is more than
            // MERGE_TOLERANCE_MS of event time behind it, and the wait for
            // it is not over.
            let next = heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.as_ref().map(|(_, _, key)| (*key, i)))
                .min();
            let Some((key, i)) = next else {
                idle = true;
                break;
            };
            let waiting = key != i64::MIN
                && (0..queues.len()).any(|j| {
                    heads[j].is_none()
                        && last_key[j].saturating_add(MERGE_TOLERANCE_MS) < key
                        && starved_since[j].is_some_and(|t| t.elapsed() < max_idle)
                });
            if waiting {
                idle = true;
                break;
            }
            if let Some((m, parsed, key)) = heads[i].take() {
                if key != i64::MIN {
                    last_key[i] = key;
                }
                e.process_parsed(&m, parsed)?;
            }
            if e.batch_due() {
                break;
            }
        }
        after_step(deps, consumer, &mut e, ready, &mut chores)?;
    }
}
