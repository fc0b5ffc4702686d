//! What `run` does before the pipelines start: the topics (created or
//! checked, retried until Kafka is usable) and the accounts table (every
//! account record forwarded to its partition, the pro subscribers read,
//! the tailers started). Every blocking call runs off the async workers.

use crate::accounts;
use crate::config::Config;
use crate::threads::Threads;
use crate::ServiceError;
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::topics::{ensure_topics, partition_count, TopicLayout, Topics};
use jobmeter_kafka::KafkaAdapterError;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long start-up waits for the account records to be forwarded to
/// their partitions (a first start forwards the whole accounts topic).
const FORWARD_WAIT: Duration = Duration::from_secs(600);

/// The first and the longest pause between two attempts to reach Kafka.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(15);

/// The partition counts start-up learns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Partitions {
    /// Of the accounts topic.
    pub(crate) accounts: i32,
    /// Of the input topic (and so of the internal topics).
    pub(crate) inputs: i32,
}

/// Creates or checks the topics, retried until Kafka is usable (a broker
/// still starting, a topic whose leader is not elected yet). A wrong
/// topic layout is an error at once. `None` when shutdown came first.
pub(crate) async fn topics(
    cfg: &Config,
    settings: &KafkaSettings,
    topics: &Topics,
    shutdown: &CancellationToken,
) -> Result<Option<Partitions>, ServiceError> {
    let mut backoff = RETRY_FIRST;
    loop {
        let attempt = async {
            if cfg.topics.create {
                let layout = TopicLayout {
                    partitions: cfg.topics.partitions,
                    output_partitions: cfg.topics.output_partitions,
                    replication: cfg.topics.replication,
                };
                ensure_topics(settings, topics, &layout).await?;
            }
            let (s, t) = (settings.clone(), topics.clone());
            tokio::task::spawn_blocking(move || check_layout(&s, &t))
                .await
                .map_err(|e| ServiceError::Panicked(format!("topic check: {e}")))?
        }
        .await;
        match attempt {
            Ok(parts) => return Ok(Some(parts)),
            Err(ServiceError::Kafka(e @ KafkaAdapterError::Topic { .. })) => return Err(e.into()),
            Err(e) if shutdown.is_cancelled() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Kafka is not usable yet");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// The partition counts, and a check that the internal topics are laid
/// out as the meter needs (topics made by the operator, with
/// `topics.create = false`, must include them, partitioned like the input).
fn check_layout(settings: &KafkaSettings, topics: &Topics) -> Result<Partitions, ServiceError> {
    let accounts = partition_count(settings, &topics.accounts)?;
    let inputs = partition_count(settings, &topics.job_events)?;
    if partition_count(settings, &topics.adjustments)? == 0 {
        tracing::warn!(topic = %topics.adjustments, "the adjustments topic does not exist: no pricing adjustment can reach the meter until it is created (any partition count, retention.ms=-1)");
    }
    for (internal, policy) in [
        (
            &topics.repartition,
            "cleanup.policy=delete, message.timestamp.type=CreateTime",
        ),
        (&topics.accounts_by_partition, "cleanup.policy=compact"),
    ] {
        let n = partition_count(settings, internal)?;
        if inputs > 0 && n != inputs {
            return Err(KafkaAdapterError::Topic {
                topic: internal.clone(),
                message: format!(
                    "has {n} partitions but {} has {inputs}; create it with {inputs} ({policy})",
                    topics.job_events
                ),
            }
            .into());
        }
    }
    if partition_count(settings, &topics.pro_subscribers)? != 1 {
        return Err(KafkaAdapterError::Topic {
            topic: topics.pro_subscribers.clone(),
            message: "must exist with exactly 1 partition (cleanup.policy=compact)".into(),
        }
        .into());
    }
    Ok(Partitions { accounts, inputs })
}

/// Runs `f` on tokio's blocking pool and waits for it.
async fn blocking<T, E>(what: &str, f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, ServiceError>
where
    T: Send + 'static,
    E: Into<ServiceError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Panicked(format!("{what}: {e}")))?
        .map_err(Into::into)
}

/// The accounts table at start-up: the forwarder copies account records
/// to their partitions, and start-up waits until it (with the other
/// instances' forwarders) has passed the accounts topic's current end;
/// then the pro subscribers are read. The forwarder, the live tail of the
/// accounts topic (from its end as it is now) and the pro subscribers'
/// tail then run on threads of their own in `threads` until `stop`.
pub(crate) async fn accounts(
    cfg: &Config,
    settings: &KafkaSettings,
    topics: &Topics,
    parts: Partitions,
    shared: &crate::Shared,
    stop: &CancellationToken,
    threads: &mut Threads,
) -> Result<(), ServiceError> {
    let table = &shared.table;
    let forwarding = accounts::Forwarding {
        settings: settings.clone(),
        group: accounts::forwarder_group(&cfg.kafka.group_id),
        client_id: format!("{}-accounts-forwarder", cfg.instance_id),
        source: topics.accounts.clone(),
        by_partition: topics.accounts_by_partition.clone(),
        pro: topics.pro_subscribers.clone(),
    };
    let client = |what: &str| format!("{}-{what}", cfg.instance_id);
    let source_from = {
        let (s, tp, c) = (settings.clone(), topics.accounts.clone(), client("accounts-ends"));
        blocking("accounts topic ends", move || {
            accounts::source_ends(&s, &c, &tp, parts.accounts)
        })
        .await?
    };
    let forwarded = Arc::new(AtomicU64::new(0));
    {
        let (t, f, n, st) = (table.clone(), forwarding.clone(), forwarded.clone(), stop.clone());
        threads.spawn("jobmeter-accounts-fwd", move || {
            accounts::forward(&t, &f, &n, &st);
            Ok(())
        })?;
    }
    let started = Instant::now();
    let waited = {
        let (f, c) = (forwarding.clone(), client("accounts-wait"));
        blocking("forwarding account records", move || {
            accounts::wait_forwarded(&f.settings, &f.group, &c, &f.source, parts.accounts, FORWARD_WAIT)
        })
        .await?
    };
    if !waited {
        tracing::warn!(
            seconds = FORWARD_WAIT.as_secs(),
            "account records not all forwarded to their partitions in time; metering starts, and records forwarded later govern only later usage"
        );
    }
    let pro_next = {
        let (t, s, tp, c) = (
            table.clone(),
            settings.clone(),
            topics.pro_subscribers.clone(),
            client("pro-subscribers"),
        );
        blocking("reading pro subscribers", move || {
            accounts::read_pro(&t, &s, &c, &tp, None, None)
        })
        .await?
    };
    tracing::info!(
        forwarded = forwarded.load(Ordering::Relaxed),
        pro_subscribers = table.pro_subscribers(),
        seconds = started.elapsed().as_secs_f64(),
        "account records forwarded to their partitions; pro subscribers read"
    );
    start_tails(cfg, settings, topics, shared, (source_from, pro_next), stop, threads)
}

/// The live tails: of the pro subscribers (from `from.1`) and of the
/// accounts topic (from its ends `from.0`) with the owned partitions'
/// accounts partitions.
fn start_tails(
    cfg: &Config,
    settings: &KafkaSettings,
    topics: &Topics,
    shared: &crate::Shared,
    from: (Vec<(i32, i64)>, i64),
    stop: &CancellationToken,
    threads: &mut Threads,
) -> Result<(), ServiceError> {
    let (source_from, pro_next) = from;
    let (table, owned) = (&shared.table, &shared.owned);
    let client = |what: &str| format!("{}-{what}", cfg.instance_id);
    {
        let (t, s, tp, st, c) = (
            table.clone(),
            settings.clone(),
            topics.pro_subscribers.clone(),
            stop.clone(),
            client("pro-subscribers-tail"),
        );
        threads.spawn("jobmeter-pro-subs", move || {
            if let Err(e) = accounts::read_pro(&t, &s, &c, &tp, Some(pro_next), Some(&st)) {
                tracing::error!(error = %e, "pro subscribers tailer stopped");
            }
            Ok(())
        })?;
    }
    {
        let (t, s, st, o, c) = (
            table.clone(),
            settings.clone(),
            stop.clone(),
            owned.clone(),
            client("accounts-tail"),
        );
        let (source, by_partition) = (topics.accounts.clone(), topics.accounts_by_partition.clone());
        threads.spawn("jobmeter-accounts", move || {
            accounts::tail_owned(&t, &s, &c, (&source, &by_partition), source_from, &o, &st);
            Ok(())
        })?;
    }
    Ok(())
}

/// Publishes the input topic's partition count to whoever routes by it.
pub(crate) fn publish_inputs(parts: Partitions, to: &AtomicI32) {
    to.store(parts.inputs, Ordering::Relaxed);
}
