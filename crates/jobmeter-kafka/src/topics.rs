//! Topic names and their creation.
//!
//! Every topic is named under one prefix (default `jobmeter`), so a
//! deployment can run several meters on one cluster.

use crate::client::KafkaSettings;
use crate::KafkaAdapterError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use std::time::Duration;

/// The names of jobmeter's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Lifecycle events in.
    pub job_events: String,
    /// Account records in (compacted).
    pub accounts: String,
    /// Pricing adjustments in (support's price overrides).
    pub adjustments: String,
    /// Charges out.
    pub charges: String,
    /// Limit events out.
    pub limits: String,
    /// Statements out.
    pub statements: String,
    /// Dead letters out.
    pub dlq: String,
    /// Commands to workers out (`job.stop`).
    pub commands: String,
    /// State changelog (internal, compacted, one partition per input partition).
    pub changelog: String,
    /// Events forwarded to the partition that meters their account, and
    /// the markers that record where they were applied (internal, one
    /// partition per input partition).
    pub repartition: String,
    /// Account records, each in the partition of its account (murmur2 of
    /// the account id over the input's partitions), keyed by instant and
    /// account (internal, compacted, one partition per input partition).
    pub accounts_by_partition: String,
    /// Which account records put an account on pro: every instance reads
    /// it whole to know the first pro subscribers (internal, compacted,
    /// one partition).
    pub pro_subscribers: String,
}

impl Topics {
    /// The default names under `prefix` (`jobmeter` → `jobmeter.job-events`…).
    pub fn with_prefix(prefix: &str) -> Topics {
        let t = |s: &str| format!("{prefix}.{s}");
        Topics {
            job_events: t("job-events"),
            accounts: t("accounts"),
            adjustments: t("adjustments"),
            charges: t("charges"),
            limits: t("limits"),
            statements: t("statements"),
            dlq: t("dlq"),
            commands: t("commands"),
            changelog: t("changelog"),
            repartition: t("repartition"),
            accounts_by_partition: t("accounts-by-partition"),
            pro_subscribers: t("pro-subscribers"),
        }
    }
}

/// How long the changelog keeps tombstones (`delete.retention.ms`): local
/// state older than this may miss deletions and must be restored from the
/// changelog in full (`state.max_local_age` is checked against it).
pub const CHANGELOG_TOMBSTONE_RETENTION_MS: i64 = 3 * 86_400_000;

/// How to create missing topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLayout {
    /// Partitions of the input and changelog topics (they must match).
    pub partitions: i32,
    /// Partitions of the output topics.
    pub output_partitions: i32,
    /// Replication factor.
    pub replication: i32,
}

/// A topic to create: name, partitions, configuration.
type Spec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

/// Creates the topics of `specs` that do not exist yet, then waits until
/// every partition of each has a leader (a topic created a moment ago is
/// not usable before that).
async fn create_and_wait(
    settings: &KafkaSettings,
    specs: &[Spec<'_>],
    replication: i32,
) -> Result<(), KafkaAdapterError> {
    let admin: AdminClient<DefaultClientContext> =
        settings.admin().create().map_err(|source| KafkaAdapterError::Client {
            what: "admin client",
            source,
        })?;
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|(name, parts, cfg)| {
            let mut t = NewTopic::new(name, *parts, TopicReplication::Fixed(replication));
            for (k, v) in cfg.iter() {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(KafkaAdapterError::op("create topics"))?;
    per_topic(results, "create", RDKafkaErrorCode::TopicAlreadyExists)?;
    let consumer: BaseConsumer = settings.admin().create().map_err(|source| KafkaAdapterError::Client {
        what: "metadata client",
        source,
    })?;
    let started = std::time::Instant::now();
    for (name, _, _) in specs {
        loop {
            let ready = consumer
                .fetch_metadata(Some(name), Duration::from_secs(10))
                .ok()
                .and_then(|md| {
                    md.topics().first().map(|t| {
                        t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
                    })
                })
                .unwrap_or(false);
            if ready {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(KafkaAdapterError::Topic {
                    topic: (*name).to_owned(),
                    message: "partitions have no leader after 60 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Creates one plain topic if it does not exist (tools' own topics, such
/// as the notifier's dead letters).
pub async fn create_topic(
    settings: &KafkaSettings,
    name: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaAdapterError> {
    create_and_wait(settings, &[(name, partitions, &[])], replication).await
}

/// Creates the topics that do not exist yet and checks that the changelog,
/// the repartition topic and the accounts by partition have as many
/// partitions as the input (the meter maps each onto the other).
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &Topics,
    layout: &TopicLayout,
) -> Result<(), KafkaAdapterError> {
    // Compacted topics keep the latest value per key; the changelog keeps
    // tombstones for 3 days so a restore from older local state sees deletes.
    let tombstones = CHANGELOG_TOMBSTONE_RETENTION_MS.to_string();
    let compacted = [
        ("cleanup.policy", "compact"),
        ("delete.retention.ms", tombstones.as_str()),
        ("min.insync.replicas", "1"),
    ];
    let plain: [(&str, &str); 0] = [];
    let retained = [("retention.ms", "-1")];
    // Events keep the producer's timestamp (CreateTime): a platform loading
    // history sets each record's timestamp to its event's time, and the
    // meter compares the two. The broker refuses records stamped more than
    // an hour ahead of its own clock, which bounds a producer's clock too.
    let events = [
        ("message.timestamp.type", "CreateTime"),
        ("message.timestamp.after.max.ms", "3600000"),
    ];
    // Forwarded events keep their original timestamp; the broker's bound
    // was checked when they first arrived.
    let forwarded = [("message.timestamp.type", "CreateTime")];
    let specs: Vec<Spec<'_>> = vec![
        (&topics.job_events, layout.partitions, &events),
        (&topics.changelog, layout.partitions, &compacted),
        (&topics.repartition, layout.partitions, &forwarded),
        (&topics.accounts, 1, &compacted[..1]),
        // Adjustments are kept (the meter deduplicates them by id forever,
        // and `jobmeter rebuild` reads them again from the beginning).
        (&topics.adjustments, layout.partitions, &retained),
        (&topics.accounts_by_partition, layout.partitions, &compacted[..1]),
        (&topics.pro_subscribers, 1, &compacted),
        (&topics.charges, layout.output_partitions, &plain),
        (&topics.limits, layout.output_partitions, &plain),
        (&topics.statements, layout.output_partitions, &plain),
        (&topics.dlq, layout.output_partitions, &plain),
        (&topics.commands, layout.output_partitions, &plain),
    ];
    create_and_wait(settings, &specs, layout.replication).await?;
    let inp = partition_count(settings, &topics.job_events)?;
    for internal in [&topics.changelog, &topics.repartition, &topics.accounts_by_partition] {
        let n = partition_count(settings, internal)?;
        if n != inp {
            return Err(KafkaAdapterError::Topic {
                topic: internal.clone(),
                message: format!(
                    "has {n} partitions but {} has {inp}; they must match",
                    topics.job_events
                ),
            });
        }
    }
    Ok(())
}

/// Partitions of `topic` (0 when it does not exist).
pub fn partition_count(settings: &KafkaSettings, topic: &str) -> Result<i32, KafkaAdapterError> {
    let consumer: BaseConsumer = settings.admin().create().map_err(|source| KafkaAdapterError::Client {
        what: "metadata client",
        source,
    })?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(KafkaAdapterError::op("fetch metadata"))?;
    Ok(md.topics().first().map_or(0, |t| t.partitions().len() as i32))
}

/// Deletes the topic named `prefix` and every topic named `prefix.*`, and
/// returns their names. For tools and tests that create throwaway topics:
/// a broker that keeps thousands of partitions starts slowly.
pub async fn delete_prefixed(settings: &KafkaSettings, prefix: &str) -> Result<Vec<String>, KafkaAdapterError> {
    let consumer: BaseConsumer = settings.admin().create().map_err(|source| KafkaAdapterError::Client {
        what: "metadata client",
        source,
    })?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(KafkaAdapterError::op("fetch metadata"))?;
    let dotted = format!("{prefix}.");
    let names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n == prefix || n.starts_with(&dotted))
        .collect();
    if names.is_empty() {
        return Ok(names);
    }
    let admin: AdminClient<DefaultClientContext> =
        settings.admin().create().map_err(|source| KafkaAdapterError::Client {
            what: "admin client",
            source,
        })?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .delete_topics(&refs, &opts)
        .await
        .map_err(KafkaAdapterError::op("delete topics"))?;
    per_topic(results, "delete", RDKafkaErrorCode::UnknownTopicOrPartition)?;
    Ok(names)
}

/// The first per-topic failure of an admin call, other than `harmless`
/// (the topic already is as asked).
fn per_topic(
    results: Vec<rdkafka::admin::TopicResult>,
    verb: &str,
    harmless: RDKafkaErrorCode,
) -> Result<(), KafkaAdapterError> {
    for r in results {
        if let Err((topic, code)) = r {
            if code != harmless {
                return Err(KafkaAdapterError::Topic {
                    topic,
                    message: format!("cannot {verb}: {code}"),
                });
            }
        }
    }
    Ok(())
}
