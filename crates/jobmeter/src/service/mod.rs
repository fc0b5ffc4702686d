//! The streaming meter (`jobmeter run`): Kafka in, RocksDB state, Kafka
//! out, exactly once. See [`engine`] for the transaction design and its
//! crash argument.
//!
//! Threads: each meter pipeline (`pipeline.threads` of them, one by
//! default) runs on a dedicated thread, with a committer thread beside it
//! (librdkafka's transactional calls and RocksDB writes block); the accounts forwarder,
//! the accounts tailer and the pro subscribers tailer on threads of their
//! own (see [`accounts`]); tokio serves HTTP and signals. Every queue is bounded: the
//! producer's local queue (when full, the pipeline stops consuming until it
//! drains) and librdkafka's fetch queue (`queued.max.messages.kbytes`).

pub mod accounts;
pub mod api;
pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
mod pipeline;
pub mod rebuild;

use accounts::{AccountsMetrics, StoredAccounts};
use config::{Config, Overrides};
use engine::Billing;
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::topics::{ensure_topics, partition_count, TopicLayout, Topics};
use jobmeter_store::Store;
use metrics::Metrics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
        let mut over = overrides(&self.sets, self.brokers.as_deref())?;
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

/// `--set KEY=VALUE` flags (and `--brokers`, when given) as overrides of
/// the configuration's layers.
pub fn overrides(sets: &[String], brokers: Option<&str>) -> anyhow::Result<Overrides> {
    let mut over = Overrides::default();
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {s:?}: expected KEY=VALUE"))?;
        over.sets.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some(b) = brokers {
        over.sets.push(("kafka.brokers".into(), b.to_owned()));
    }
    Ok(over)
}

/// How an operator tool (`dump`, `notify`) reaches Kafka: with the meter's
/// own configuration — its `[kafka]` brokers and librdkafka properties
/// (SASL, SSL…) and its topic prefix — layered as for `jobmeter run`
/// (defaults, `--config` file, `JOBMETER_KAFKA_BROKERS` and `JOBMETER__…`
/// environment, flags), so a tool reaches every cluster the meter does.
/// Only what reaching Kafka needs is validated.
#[derive(Debug, clap::Args)]
pub struct KafkaArgs {
    /// The meter's configuration file (TOML; see `config/jobmeter.toml`).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Override `kafka.brokers`.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Override a setting: `--set kafka.properties.security.protocol=SASL_SSL`
    /// (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl KafkaArgs {
    /// The configuration these flags describe (Kafka and topics checked).
    pub fn load(&self) -> anyhow::Result<Config> {
        let over = overrides(&self.sets, self.brokers.as_deref())?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Ok(Config::load_for_kafka(self.config.as_deref(), &env, &over)?)
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
    let deadline = cfg.shutdown.deadline.std();
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

/// How long start-up waits for the account records to be forwarded to
/// their partitions (a first start forwards the whole accounts topic).
const FORWARD_WAIT: Duration = Duration::from_secs(600);

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
    let settings = cfg.kafka_settings();
    let topics = Topics::with_prefix(&cfg.topics.prefix);
    std::fs::create_dir_all(&cfg.state.dir)?;
    let store = Arc::new(Store::open_with(
        &cfg.state.dir,
        jobmeter_store::StoreOptions {
            block_cache_bytes: (cfg.state.block_cache_mib as usize) << 20,
            ..Default::default()
        },
    )?);
    let ready = Arc::new(AtomicBool::new(false));
    let owned = Arc::new(std::sync::RwLock::new(std::collections::BTreeSet::new()));
    let failing: engine::FailingPartitions = Arc::default();
    let input_partitions = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let table = Arc::new(StoredAccounts::new(
        store.clone(),
        input_partitions.clone(),
        cfg.state.account_cache as usize,
        plans.pro_intro_subscribers,
        accounts_metrics,
    ));
    let billing = Billing {
        rates,
        plans,
        accounts: table.clone(),
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
        meter: cfg.meter_config(),
        committed: metrics.committed.clone(),
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

    // Topics, retried until Kafka is usable (a broker still starting, a
    // topic whose leader is not elected yet); a wrong topic layout is
    // reported and ends the process.
    let mut backoff = Duration::from_millis(500);
    let acc_parts = loop {
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
            // include the internal topics, partitioned like the input.
            for (internal, policy) in [
                (
                    &topics.repartition,
                    "cleanup.policy=delete, message.timestamp.type=CreateTime",
                ),
                (&topics.accounts_by_partition, "cleanup.policy=compact"),
            ] {
                let n = partition_count(&settings, internal)?;
                if inputs > 0 && n != inputs {
                    return Err(jobmeter_kafka::KafkaAdapterError::Topic {
                        topic: internal.clone(),
                        message: format!(
                            "has {n} partitions but {} has {inputs}; create it with {inputs} ({policy})",
                            topics.job_events
                        ),
                    }
                    .into());
                }
            }
            if partition_count(&settings, &topics.pro_subscribers)? != 1 {
                return Err(jobmeter_kafka::KafkaAdapterError::Topic {
                    topic: topics.pro_subscribers.clone(),
                    message: "must exist with exactly 1 partition (cleanup.policy=compact)".into(),
                }
                .into());
            }
            input_partitions.store(inputs, Ordering::Relaxed);
            anyhow::Ok(acc_parts)
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
    let stop = Arc::new(AtomicBool::new(false));
    // The forwarder copies account records to their partitions; start-up
    // waits until it (with the other instances' forwarders) has passed
    // the accounts topic's current end, then reads the pro subscribers.
    let forwarding = accounts::Forwarding {
        settings: settings.clone(),
        group: accounts::forwarder_group(&cfg.kafka.group_id),
        client_id: format!("{}-accounts-forwarder", cfg.instance_id),
        source: topics.accounts.clone(),
        by_partition: topics.accounts_by_partition.clone(),
        pro: topics.pro_subscribers.clone(),
    };
    // The live tail of the accounts topic starts at its end as it is now.
    let source_from = {
        let (s, tp) = (settings.clone(), topics.accounts.clone());
        let client = format!("{}-accounts-ends", cfg.instance_id);
        tokio::task::spawn_blocking(move || accounts::source_ends(&s, &client, &tp, acc_parts)).await??
    };
    let forwarded = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let forwarder = {
        let (t, f, n, st) = (table.clone(), forwarding.clone(), forwarded.clone(), stop.clone());
        std::thread::Builder::new()
            .name("jobmeter-accounts-fwd".into())
            .spawn(move || accounts::forward(&t, &f, &n, &st))?
    };
    let started = Instant::now();
    let waited = {
        let f = forwarding.clone();
        let client = format!("{}-accounts-wait", cfg.instance_id);
        tokio::task::spawn_blocking(move || {
            accounts::wait_forwarded(&f.settings, &f.group, &client, &f.source, acc_parts, FORWARD_WAIT)
        })
        .await??
    };
    if !waited {
        tracing::warn!(
            seconds = FORWARD_WAIT.as_secs(),
            "account records not all forwarded to their partitions in time; metering starts, and records forwarded later govern only later usage"
        );
    }
    let pro_next = {
        let (t, s, tp) = (table.clone(), settings.clone(), topics.pro_subscribers.clone());
        let client = format!("{}-pro-subscribers", cfg.instance_id);
        tokio::task::spawn_blocking(move || accounts::read_pro(&t, &s, &client, &tp, None, None)).await??
    };
    tracing::info!(
        forwarded = forwarded.load(Ordering::Relaxed),
        pro_subscribers = table.pro_subscribers(),
        seconds = started.elapsed().as_secs_f64(),
        "account records forwarded to their partitions; pro subscribers read"
    );
    let pro_tail = {
        let (t, s, tp, st) = (
            table.clone(),
            settings.clone(),
            topics.pro_subscribers.clone(),
            stop.clone(),
        );
        let client = format!("{}-pro-subscribers-tail", cfg.instance_id);
        std::thread::Builder::new()
            .name("jobmeter-pro-subs".into())
            .spawn(move || {
                if let Err(e) = accounts::read_pro(&t, &s, &client, &tp, Some(pro_next), Some(&st)) {
                    tracing::error!(error = %e, "pro subscribers tailer stopped");
                }
            })?
    };
    let tail = {
        let (t, s, st, o) = (table.clone(), settings.clone(), stop.clone(), owned.clone());
        let (source, by_partition) = (topics.accounts.clone(), topics.accounts_by_partition.clone());
        let client = format!("{}-accounts-tail", cfg.instance_id);
        std::thread::Builder::new()
            .name("jobmeter-accounts".into())
            .spawn(move || accounts::tail_owned(&t, &s, &client, (&source, &by_partition), source_from, &o, &st))?
    };

    let lag = {
        let (settings, topic, group, st, m) = (
            settings.clone(),
            topics.job_events.clone(),
            cfg.kafka.group_id.clone(),
            stop.clone(),
            metrics.clone(),
        );
        std::thread::Builder::new()
            .name("jobmeter-lag".into())
            .spawn(move || lag_monitor(&settings, &topic, &group, &st, &m))?
    };
    // One pipeline per configured thread, each a member of the group with
    // its own partitions, producer and committer; they share the store,
    // the accounts table and the metrics.
    let threads = cfg.pipelines();
    tracing::info!(pipelines = threads, "starting the pipelines");
    let mut pipelines = Vec::with_capacity(threads);
    for (i, m) in metrics.for_pipelines(threads).into_iter().enumerate() {
        let deps = Deps {
            cfg: cfg.for_pipeline(i),
            settings: settings.clone(),
            topics: topics.clone(),
            billing: billing.clone(),
            store: store.clone(),
            metrics: m,
            owned: owned.clone(),
            failing: failing.clone(),
            input_partitions: input_partitions.clone(),
        };
        let (pstop, pready) = (stop.clone(), Arc::new(AtomicBool::new(false)));
        let name = if threads == 1 {
            "jobmeter-pipeline".to_owned()
        } else {
            format!("jobmeter-pipeline-{i}")
        };
        let handle = std::thread::Builder::new().name(name).spawn({
            let pready = pready.clone();
            move || pipeline::pipeline_loop(&deps, &pstop, &pready)
        })?;
        pipelines.push((handle, pready));
    }
    let watcher_stop = stop.clone();
    let done = shutdown.clone();
    tokio::spawn(async move {
        done.cancelled().await;
        watcher_stop.store(true, Ordering::SeqCst);
    });
    let (accounts_gauge, pro_gauge) = (metrics.accounts.clone(), metrics.pro_subscribers.clone());
    // The instance is ready when every pipeline is. A pipeline returns only
    // once the stop is asked for, or when its thread panics: then the
    // others are stopped too and the process ends, as with one pipeline.
    while pipelines.iter().all(|(h, _)| !h.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready.store(
            pipelines.iter().all(|(_, r)| r.load(Ordering::SeqCst)),
            Ordering::SeqCst,
        );
        accounts_gauge.set(table.cached() as i64);
        pro_gauge.set(table.pro_subscribers() as i64);
    }
    ready.store(false, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let mut result = Ok(());
    for (h, _) in pipelines {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a pipeline thread panicked")));
        if result.is_ok() {
            result = r;
        }
    }
    let _ = tail.join();
    let _ = pro_tail.join();
    let _ = forwarder.join();
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
