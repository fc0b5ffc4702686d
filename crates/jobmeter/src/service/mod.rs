//! The streaming meter (`jobmeter run`): Kafka in, RocksDB state, Kafka
//! out, exactly once. See [`engine`] for the transaction design and its
//! crash argument.
//!
//! Threads: the meter pipeline runs on one dedicated thread (librdkafka's
//! transactional calls and RocksDB writes block); the accounts tailer on
//! another; tokio serves HTTP and signals. Every queue is bounded: the
//! producer's local queue (when full, the pipeline stops consuming until it
//! drains) and librdkafka's fetch queue (`queued.max.messages.kbytes`).

pub mod accounts;
pub mod api;
pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod rebuild;

use accounts::{AccountsMetrics, AccountsTable};
use config::{Config, Overrides};
use engine::{Billing, Engine, EngineConfig, EngineError, MeterContext};
use jobmeter_core::AccountBook;
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::topics::{ensure_topics, partition_count, TopicLayout, Topics};
use jobmeter_kafka::txn::TxnProducer;
use jobmeter_store::Store;
use metrics::Metrics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `jobmeter run`.
#[derive(Debug, clap::Args)]
pub struct RunCmd {
    /// Configuration file (TOML); see `config/jobmeter.toml`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override `kafka.brokers`.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Override `instance_id`.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Override `state.dir`.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Override `http.listen`.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Override any setting: `--set batch.max_events=2000` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl RunCmd {
    /// The configuration this command describes.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let mut over = Overrides::default();
        for s in &self.sets {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--set {s:?}: expected KEY=VALUE"))?;
            over.sets.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        if let Some(b) = &self.brokers {
            over.sets.push(("kafka.brokers".into(), b.clone()));
        }
        if let Some(i) = &self.instance_id {
            over.sets.push(("instance_id".into(), i.clone()));
        }
        if let Some(d) = &self.state_dir {
            over.sets.push(("state.dir".into(), d.display().to_string()));
        }
        if let Some(h) = &self.http_listen {
            over.sets.push(("http.listen".into(), h.clone()));
        }
        let env: Vec<(String, String)> = std::env::vars().collect();
        Ok(Config::load(self.config.as_deref(), &env, &over)?)
    }
}

/// Runs `jobmeter run` until SIGTERM/SIGINT.
pub fn main(cmd: RunCmd) -> anyhow::Result<()> {
    init_tracing();
    let cfg = cmd.load_config()?;
    if cmd.print_config {
        println!("{}", toml::to_string_pretty(&cfg.redacted())?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("jobmeter-io")
        .build()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signals = shutdown.clone();
    let deadline = Duration::from_millis(Config::ms(&cfg.shutdown.deadline) as u64);
    rt.spawn(async move {
        crate::signals::shutdown_requested().await;
        tracing::info!("shutdown requested: finishing the current batch");
        signals.cancel();
        crate::signals::shutdown_requested().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    let guard = shutdown.clone();
    rt.spawn(async move {
        guard.cancelled().await;
        tokio::time::sleep(deadline).await;
        tracing::error!(
            seconds = deadline.as_secs(),
            "shutdown deadline passed: exiting by force"
        );
        std::process::exit(1);
    });
    rt.block_on(run(cfg, shutdown))
}

pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOBMETER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Everything the pipeline thread needs.
#[derive(Debug, Clone)]
struct Deps {
    cfg: Config,
    settings: KafkaSettings,
    topics: Topics,
    billing: Billing,
    store: Arc<Store>,
    metrics: Metrics,
    owned: Arc<std::sync::RwLock<std::collections::BTreeSet<i32>>>,
    failing: engine::FailingPartitions,
    input_partitions: Arc<std::sync::atomic::AtomicI32>,
}

/// Runs the meter until `shutdown` is cancelled: topics, accounts table,
/// HTTP, then the pipeline. Returns after the last batch is committed and
/// the store is closed.
pub async fn run(cfg: Config, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    let metrics = Metrics::new(&registry)?;
    let accounts_metrics = AccountsMetrics::new(&registry)?;
    let rates = Arc::new(crate::replay::load_rate_card(&cfg.billing.rate_card)?);
    let plans = Arc::new(crate::replay::load_plans(cfg.billing.plans.as_deref())?);
    let mut settings = KafkaSettings::new(cfg.kafka.brokers.clone());
    settings.properties = cfg.kafka.properties.clone();
    let topics = Topics::with_prefix(&cfg.topics.prefix);
    std::fs::create_dir_all(&cfg.state.dir)?;
    let store = Arc::new(Store::open(&cfg.state.dir)?);
    let ready = Arc::new(AtomicBool::new(false));
    let table = AccountsTable::new(AccountBook::new(&plans), accounts_metrics);
    let owned = Arc::new(std::sync::RwLock::new(std::collections::BTreeSet::new()));
    let failing: engine::FailingPartitions = Arc::default();
    let input_partitions = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let billing = Billing {
        rates,
        plans,
        accounts: table.book.clone(),
        newest_event_ms: table.newest_event_ms.clone(),
    };
    let tokens = cfg.api_tokens().map_err(|e| anyhow::anyhow!(e))?;
    if tokens.is_empty() {
        tracing::warn!("no API tokens configured (api.admin_tokens, api.account_tokens, api.tokens_file): every /v1 account call will answer 401");
    }
    let api = Arc::new(api::Api {
        store: store.clone(),
        billing: billing.clone(),
        owned: owned.clone(),
        input_partitions: input_partitions.clone(),
        tokens: Arc::new(api::Tokens::new(tokens)),
        group: Some((settings.clone(), cfg.kafka.group_id.clone(), topics.job_events.clone())),
        instance_id: cfg.instance_id.clone(),
    });
    let app = http::router(
        registry.clone(),
        ready.clone(),
        failing.clone(),
        api,
        metrics.api_requests.clone(),
    );
    let listener = tokio::net::TcpListener::bind(&cfg.http.listen).await?;
    tracing::info!(listen = %cfg.http.listen, advertised = %cfg.advertised_url(), "serving /metrics, /healthz, /readyz and the usage API under /v1");
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(http::serve(listener, app, http_shutdown));

    // Topics and the accounts table, retried until Kafka is usable (a
    // broker still starting, a topic whose leader is not elected yet); a
    // wrong topic layout is reported and ends the process.
    let mut backoff = Duration::from_millis(500);
    let (acc_parts, next) = loop {
        let attempt = async {
            if cfg.topics.create {
                let layout = TopicLayout {
                    partitions: cfg.topics.partitions,
                    output_partitions: cfg.topics.output_partitions,
                    replication: cfg.topics.replication,
                };
                ensure_topics(&settings, &topics, &layout).await?;
            }
            let acc_parts = partition_count(&settings, &topics.accounts)?;
            let inputs = partition_count(&settings, &topics.job_events)?;
            // Topics made by the operator (topics.create = false) must
            // include the repartition topic, partitioned like the input.
            let forwarded = partition_count(&settings, &topics.repartition)?;
            if inputs > 0 && forwarded != inputs {
                return Err(jobmeter_kafka::KafkaAdapterError::Topic {
                    topic: topics.repartition.clone(),
                    message: format!(
                        "has {forwarded} partitions but {} has {inputs}; create it with {inputs} (cleanup.policy=delete, message.timestamp.type=CreateTime)",
                        topics.job_events
                    ),
                }
                .into());
            }
            input_partitions.store(inputs, Ordering::Relaxed);
            let (t2, s2, tp) = (table.clone(), settings.clone(), topics.accounts.clone());
            let client = format!("{}-accounts", cfg.instance_id);
            let next = tokio::task::spawn_blocking(move || t2.load(&s2, &client, &tp, acc_parts)).await??;
            anyhow::Ok((acc_parts, next))
        }
        .await;
        match attempt {
            Ok(x) => break x,
            Err(e) => {
                let permanent = matches!(
                    e.downcast_ref::<jobmeter_kafka::KafkaAdapterError>(),
                    Some(jobmeter_kafka::KafkaAdapterError::Topic { .. })
                );
                if permanent || shutdown.is_cancelled() {
                    return Err(e);
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Kafka is not usable yet");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    };
    metrics
        .accounts
        .set(table.book.read().map(|b| b.len() as i64).unwrap_or(0));
    tracing::info!(accounts = metrics.accounts.get(), "accounts table loaded");
    let stop = Arc::new(AtomicBool::new(false));
    let tail = {
        let (t, s, tp, st) = (table.clone(), settings.clone(), topics.accounts.clone(), stop.clone());
        let client = format!("{}-accounts-tail", cfg.instance_id);
        std::thread::Builder::new()
            .name("jobmeter-accounts".into())
            .spawn(move || t.tail(&s, &client, &tp, acc_parts, next, st))?
    };

    let deps = Deps {
        cfg: cfg.clone(),
        settings,
        topics,
        billing,
        store: store.clone(),
        metrics: metrics.clone(),
        owned,
        failing,
        input_partitions: input_partitions.clone(),
    };
    let lag = {
        let (settings, topic, group, st, m) = (
            deps.settings.clone(),
            deps.topics.job_events.clone(),
            cfg.kafka.group_id.clone(),
            stop.clone(),
            metrics.clone(),
        );
        std::thread::Builder::new()
            .name("jobmeter-lag".into())
            .spawn(move || lag_monitor(&settings, &topic, &group, &st, &m))?
    };
    let (pstop, pready) = (stop.clone(), ready.clone());
    let pipeline = std::thread::Builder::new()
        .name("jobmeter-pipeline".into())
        .spawn(move || pipeline_loop(&deps, &pstop, &pready))?;
    let watcher_stop = stop.clone();
    let done = shutdown.clone();
    tokio::spawn(async move {
        done.cancelled().await;
        watcher_stop.store(true, Ordering::SeqCst);
    });
    let accounts_gauge = metrics.accounts.clone();
    let book = table.book.clone();
    while !pipeline.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        accounts_gauge.set(book.read().map(|b| b.len() as i64).unwrap_or(0));
    }
    let result = pipeline
        .join()
        .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?;
    stop.store(true, Ordering::SeqCst);
    let _ = tail.join();
    let _ = lag.join();
    shutdown.cancel();
    let _ = http.await;
    drop(store);
    tracing::info!("stopped cleanly");
    result
}

/// Every 5 s: consumer lag per input partition, as the high watermark minus
/// the group's committed offset (what has been metered exactly once). Runs
/// on its own thread so broker round trips never delay the pipeline.
fn lag_monitor(settings: &KafkaSettings, topic: &str, group: &str, stop: &AtomicBool, metrics: &Metrics) {
    let consumer: BaseConsumer<jobmeter_kafka::reader::ReaderContext> = match settings
        .group_consumer(group, "jobmeter-lag-monitor")
        .create_with_context(jobmeter_kafka::reader::ReaderContext)
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "lag monitor disabled");
            return;
        }
    };
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next = Instant::now() + Duration::from_secs(5);
        let parts = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => md.topics().first().map_or(0, |t| t.partitions().len() as i32),
            Err(_) => continue,
        };
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..parts {
            tpl.add_partition(topic, p);
        }
        let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(5)) else {
            continue;
        };
        for e in committed.elements() {
            let Ok((low, high)) = consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(5)) else {
                continue;
            };
            let done = e.offset().to_raw().filter(|o| *o >= 0).unwrap_or(low);
            metrics
                .lag
                .with_label_values(&[&e.partition().to_string()])
                .set((high - done).max(0));
        }
    }
}

fn pipeline_loop(deps: &Deps, stop: &Arc<AtomicBool>, ready: &Arc<AtomicBool>) -> anyhow::Result<()> {
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
    let txn_timeout = Duration::from_millis(Config::ms(&cfg.kafka.transaction_timeout) as u64);
    let producer = TxnProducer::new(&deps.settings, &cfg.transactional_id(), txn_timeout)?;
    let ecfg = EngineConfig {
        topics: deps.topics.clone(),
        settings: deps.settings.clone(),
        instance_id: cfg.instance_id.clone(),
        batch_max_events: cfg.batch.max_events,
        batch_interval: Duration::from_millis(Config::ms(&cfg.batch.interval) as u64),
        meter: cfg.meter_config(),
        max_local_age: Duration::from_millis(Config::ms(&cfg.state.max_local_age) as u64),
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
                engine: engine.clone(),
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
    // The next incarnation retries every partition it is given.
    deps.failing
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    deps.owned
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    consumer.unsubscribe();
    drop(consumer);
    result
}

/// What every turn of the poll loop ends with: readiness, pausing newly
/// failed partitions, committing a due batch, the local gauges.
fn after_step(
    deps: &Deps,
    consumer: &BaseConsumer<MeterContext>,
    e: &mut Engine,
    ready: &AtomicBool,
    last_report: &mut Instant,
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
    if last_report.elapsed() > Duration::from_secs(5) {
        e.report_local();
        *last_report = Instant::now();
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
    let mut last_report = Instant::now();
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
        after_step(deps, consumer, &mut e, ready, &mut last_report)?;
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
    let max_idle = Duration::from_millis(Config::ms(&deps.cfg.batch.max_idle) as u64);
    // The event time of each queue's last record (where it stands).
    let mut last_key = vec![i64::MIN; queues.len()];
    let mut last_main = Instant::now();
    let mut last_report = Instant::now();
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
        after_step(deps, consumer, &mut e, ready, &mut last_report)?;
    }
}
