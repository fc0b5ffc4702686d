//! # jobmeter-service: the streaming meter as a library
//!
//! [`run`] meters until its cancellation token is cancelled: Kafka in,
//! RocksDB state, Kafka out, exactly once. See [`engine`] for the
//! transaction design and its crash argument, [`config`] for the settings,
//! [`api`] and [`http`] for the usage API and the probes, [`metrics`] for
//! what is exported. [`run_until_signalled`] is `jobmeter run`: a runtime,
//! signals and the shutdown deadline around [`run`].
//!
//! Threads: each meter pipeline (`pipeline.threads` of them, one by
//! default) runs on a named thread of its own, with a committer thread
//! beside it (librdkafka's transactional calls and RocksDB writes block);
//! the accounts forwarder, the accounts tailer, the pro subscribers tailer
//! (see [`accounts`]), the adjustments forwarder (see [`adjustments`]) and
//! the lag monitor too. Their ends are awaited, not
//! polled. tokio serves HTTP, signals and start-up, whose blocking calls
//! run on its blocking pool. Every queue is bounded: the producer's local
//! queue (when full, the pipeline stops consuming until it drains) and
//! librdkafka's fetch queue (`queued.max.messages.kbytes`).
//!
//! Boundary: this crate depends on the core, the store and Kafka adapters
//! and the offline crate's rate-card and plan loaders. It never depends on
//! the operator tools (`jobmeter-ops`), the command line (`jobmeter`),
//! `anyhow` or an HTTP client: `./dev test` checks it. Errors are typed
//! ([`ServiceError`]).

pub mod accounts;
pub mod adjustments;
pub mod api;
mod args;
pub mod config;
pub mod engine;
pub mod http;
mod lag;
pub mod metrics;
mod pipeline;
pub mod signals;
mod startup;
mod threads;
pub mod tls;

pub use args::{overrides, KafkaArgs, RunCmd};

use accounts::{AccountsMetrics, StoredAccounts};
use config::{Config, ConfigErrors};
use engine::Billing;
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::topics::Topics;
use jobmeter_store::Store;
use metrics::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use threads::Threads;
use tokio_util::sync::CancellationToken;

/// Why the meter could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// The rate card or the plan catalog cannot be loaded.
    #[error(transparent)]
    Billing(#[from] jobmeter_offline::replay::ReplayError),
    /// The API tokens cannot be loaded.
    #[error("API tokens: {0}")]
    Tokens(String),
    /// The HTTPS certificate and key cannot serve.
    #[error("http.tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] jobmeter_store::StoreError),
    /// Kafka failed, or a topic is laid out wrong.
    #[error(transparent)]
    Kafka(#[from] jobmeter_kafka::KafkaAdapterError),
    /// A pipeline failed for good.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A file, socket or runtime could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        /// The thread's name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// A thread (or a blocking task) panicked.
    #[error("{0} panicked")]
    Panicked(String),
}

impl ServiceError {
    fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServiceError {
        let what = what.to_string();
        move |source| ServiceError::Io { what, source }
    }
}

/// Runs `jobmeter run` until SIGTERM/SIGINT: a runtime, the signal
/// handlers (a second signal exits at once, with status 130) and the
/// shutdown deadline (`shutdown.deadline`: past it the process exits with
/// status 1) around [`run`].
pub fn run_until_signalled(cfg: Config) -> Result<(), ServiceError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("jobmeter-io")
        .build()
        .map_err(ServiceError::io("tokio runtime"))?;
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    let deadline = cfg.shutdown.deadline.std();
    rt.spawn(async move {
        signals::shutdown_requested().await;
        tracing::info!("shutdown requested: finishing the current batch");
        signals.cancel();
        signals::shutdown_requested().await;
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

/// Logs to stderr, filtered by `JOBMETER_LOG` (default `info`); in colour
/// only on a terminal (a log file, `kubectl logs` or a log shipper gets
/// plain text) and never with `NO_COLOR` set. Idempotent.
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOBMETER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = log_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Whether log lines carry colour codes: on a terminal, unless `NO_COLOR`
/// is set to anything but the empty string (no-color.org).
fn log_colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
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

/// What every part of a running meter shares.
#[derive(Debug, Clone)]
struct Shared {
    store: Arc<Store>,
    billing: Billing,
    table: Arc<StoredAccounts>,
    owned: Arc<std::sync::RwLock<std::collections::BTreeSet<i32>>>,
    failing: engine::FailingPartitions,
    input_partitions: Arc<std::sync::atomic::AtomicI32>,
    /// The API tokens and their scopes.
    tokens: Arc<api::Tokens>,
}

/// Loads the rate card, the plans and the API tokens and opens the store
/// (blocking I/O).
fn open_state(cfg: &Config, accounts_metrics: AccountsMetrics) -> Result<Shared, ServiceError> {
    let tokens = Arc::new(api::Tokens::new(cfg.api_tokens().map_err(ServiceError::Tokens)?));
    let rates = Arc::new(jobmeter_offline::replay::load_rate_card(&cfg.billing.rate_card)?);
    let plans = Arc::new(jobmeter_offline::replay::load_plans(cfg.billing.plans.as_deref())?);
    std::fs::create_dir_all(&cfg.state.dir)
        .map_err(ServiceError::io(format!("state.dir {}", cfg.state.dir.display())))?;
    let store = Arc::new(Store::open_with(
        &cfg.state.dir,
        jobmeter_store::StoreOptions {
            block_cache_bytes: (cfg.state.block_cache_mib as usize) << 20,
            ..Default::default()
        },
    )?);
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
    Ok(Shared {
        store,
        billing,
        table,
        owned: Arc::default(),
        failing: Arc::default(),
        input_partitions,
        tokens,
    })
}

/// Binds `http.listen` and serves the probes, `/metrics` and the usage API
/// until `shutdown`.
async fn serve_http(
    cfg: &Config,
    shared: &Shared,
    registry: &prometheus::Registry,
    metrics: &Metrics,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServiceError> {
    if shared.tokens.is_empty() {
        tracing::warn!("no API tokens configured (api.admin_tokens, api.account_tokens, api.tokens_file): every /v1 account call will answer 401");
    }
    let settings = cfg.kafka_settings();
    let topics = Topics::with_prefix(&cfg.topics.prefix);
    let api = Arc::new(api::Api {
        store: shared.store.clone(),
        billing: shared.billing.clone(),
        owned: shared.owned.clone(),
        input_partitions: shared.input_partitions.clone(),
        tokens: shared.tokens.clone(),
        group: Some((settings.clone(), cfg.kafka.group_id.clone(), topics.job_events.clone())),
        instance_id: cfg.instance_id.clone(),
        meter: cfg.meter_config(),
        committed: metrics.committed.clone(),
        writer: Some(Arc::new(adjustments::Writer::new(
            &settings,
            topics.adjustments.clone(),
            shared.billing.rates.clone(),
        )?)),
        written: Arc::default(),
    });
    let app = http::router(
        registry.clone(),
        ready,
        shared.failing.clone(),
        api,
        metrics.instance.api_requests.clone(),
    );
    let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
        .await
        .map_err(ServiceError::io(format!("http.listen {}", cfg.http.listen)))?;
    tracing::info!(listen = %cfg.http.listen, advertised = %cfg.advertised_url(), "serving /metrics, /healthz, /readyz and the usage API under /v1");
    Ok(match &cfg.http.tls {
        Some(t) => {
            let served = tls::start(t, &metrics.instance, &shutdown)?;
            tokio::spawn(tls::serve(listener, app, served, shutdown))
        }
        None => tokio::spawn(http::serve(listener, app, shutdown)),
    })
}

/// Starts one pipeline per configured thread, each a member of the group
/// with its own partitions, producer and committer; they share the store,
/// the accounts table and the metrics. Returns each pipeline's readiness.
fn start_pipelines(
    cfg: &Config,
    shared: &Shared,
    metrics: &Metrics,
    stop: &CancellationToken,
    threads: &mut Threads,
) -> Result<Vec<Arc<AtomicBool>>, ServiceError> {
    let n = cfg.pipelines();
    tracing::info!(pipelines = n, "starting the pipelines");
    let mut ready = Vec::with_capacity(n);
    for (i, m) in metrics.for_pipelines(n).into_iter().enumerate() {
        let deps = Deps {
            cfg: cfg.for_pipeline(i),
            settings: cfg.kafka_settings(),
            topics: Topics::with_prefix(&cfg.topics.prefix),
            billing: shared.billing.clone(),
            store: shared.store.clone(),
            metrics: m,
            owned: shared.owned.clone(),
            failing: shared.failing.clone(),
            input_partitions: shared.input_partitions.clone(),
        };
        let name = if n == 1 {
            "jobmeter-pipeline".to_owned()
        } else {
            format!("jobmeter-pipeline-{i}")
        };
        let (r, st) = (Arc::new(AtomicBool::new(false)), stop.clone());
        ready.push(r.clone());
        threads.spawn(&name, move || {
            pipeline::pipeline_loop(&deps, &st, &r);
            Ok(())
        })?;
    }
    Ok(ready)
}

/// How often the instance's readiness and the accounts gauges are updated.
const READY_EVERY: Duration = Duration::from_millis(100);

/// Runs the meter until `shutdown` is cancelled: state, HTTP, topics,
/// accounts table, then the pipelines. Returns after the last batch is
/// committed, every thread has ended and the store is closed. A pipeline
/// returns only once the stop is asked for, or when its thread panics:
/// then the others are stopped too and the error is returned.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), ServiceError> {
    let registry = prometheus::Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    let metrics = Metrics::new(&registry)?;
    let accounts_metrics = AccountsMetrics::new(&registry)?;
    let shared = {
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || open_state(&c, accounts_metrics))
            .await
            .map_err(|e| ServiceError::Panicked(format!("opening the state: {e}")))??
    };
    let ready = Arc::new(AtomicBool::new(false));
    let http = serve_http(&cfg, &shared, &registry, &metrics, ready.clone(), shutdown.clone()).await?;
    let settings = cfg.kafka_settings();
    let topics = Topics::with_prefix(&cfg.topics.prefix);
    // The threads stop when shutdown is asked for, or when one pipeline
    // ends (it only does on a panic or on the stop).
    let stop = shutdown.child_token();
    let mut background = Threads::default();
    let mut pipelines = Threads::default();
    let result = async {
        let Some(parts) = startup::topics(&cfg, &settings, &topics, &shutdown).await? else {
            return Ok(());
        };
        startup::publish_inputs(parts, &shared.input_partitions);
        startup::accounts(&cfg, &settings, &topics, parts, &shared, &stop, &mut background).await?;
        {
            let f = adjustments::Forwarding {
                settings: settings.clone(),
                group: adjustments::forwarder_group(&cfg.kafka.group_id),
                client_id: format!("{}-adjustments-forwarder", cfg.instance_id),
                transactional_id: format!("{}-adjustments", cfg.transactional_id()),
                source: topics.adjustments.clone(),
                repartition: topics.repartition.clone(),
                dlq: topics.dlq.clone(),
                partitions: shared.input_partitions.clone(),
            };
            let st = stop.clone();
            background.spawn("jobmeter-adjust-fwd", move || {
                adjustments::forward(&f, &st);
                Ok(())
            })?;
        }
        {
            let (s, t, g, st, m) = (
                settings.clone(),
                topics.job_events.clone(),
                cfg.kafka.group_id.clone(),
                stop.clone(),
                metrics.clone(),
            );
            background.spawn("jobmeter-lag", move || {
                lag::monitor(&s, &t, &g, &st, &m);
                Ok(())
            })?;
        }
        let each_ready = start_pipelines(&cfg, &shared, &metrics, &stop, &mut pipelines)?;
        supervise(&mut pipelines, &each_ready, &ready, &shared.table, &metrics).await
    }
    .await;
    ready.store(false, Ordering::SeqCst);
    stop.cancel();
    let result = result.and(pipelines.join_all().await);
    let _ = background.join_all().await;
    shutdown.cancel();
    let _ = http.await;
    drop(shared);
    tracing::info!("stopped cleanly");
    result
}

/// Until the first pipeline ends: the instance is ready when every
/// pipeline is, and the accounts gauges follow the table.
async fn supervise(
    pipelines: &mut Threads,
    each_ready: &[Arc<AtomicBool>],
    ready: &AtomicBool,
    table: &StoredAccounts,
    metrics: &Metrics,
) -> Result<(), ServiceError> {
    let mut tick = tokio::time::interval(READY_EVERY);
    loop {
        tokio::select! {
            ended = pipelines.next() => {
                return match ended {
                    Some((name, Err(e))) => {
                        tracing::error!(thread = %name, error = %e, "a pipeline ended: stopping");
                        Err(e)
                    }
                    _ => Ok(()),
                };
            }
            _ = tick.tick() => {
                ready.store(each_ready.iter().all(|r| r.load(Ordering::SeqCst)), Ordering::SeqCst);
                metrics.instance.accounts.set(table.cached() as i64);
                metrics.instance.pro_subscribers.set(table.pro_subscribers() as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_colour;
    use std::ffi::OsStr;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some(OsStr::new(""))), "an empty NO_COLOR is unset");
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None), "a file or a pipe gets plain text");
        assert!(!log_colour(false, Some(OsStr::new("1"))));
    }
}
