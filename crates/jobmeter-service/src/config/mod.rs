//! The service's configuration: one typed tree, defaults in one place,
//! layered default → file → environment → flags, validated at start with
//! every problem reported at once.
//!
//! Environment overrides use `JOBMETER__SECTION__KEY` (double underscores
//! between levels), e.g. `JOBMETER__BATCH__MAX_EVENTS=2000`;
//! `JOBMETER_KAFKA_BROKERS` is also honoured for `kafka.brokers`.

mod layers;

use jobmeter_core::MeterConfig;
use jobmeter_offline::dur::Dur;
use layers::{env_value, get_path, merge, property_path, set_path, typed};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Stable name of this instance; the transactional id is derived from
    /// it, so a restarted instance fences its own zombie. Must be unique in
    /// the group (a StatefulSet's pod name is a good choice).
    pub instance_id: String,
    /// Kafka connection.
    pub kafka: KafkaConfig,
    /// Topic names and layout.
    pub topics: TopicsConfig,
    /// Local state.
    pub state: StateConfig,
    /// Transaction batching.
    pub batch: BatchConfig,
    /// Parallel pipelines.
    pub pipeline: PipelineConfig,
    /// Event-time timeouts.
    pub meter: MeterTimeouts,
    /// Rate card and plans.
    pub billing: BillingConfig,
    /// HTTP (metrics, health, usage API).
    pub http: HttpConfig,
    /// Usage API tokens.
    pub api: ApiConfig,
    /// Shutdown.
    pub shutdown: ShutdownConfig,
}

/// The most pipelines an instance runs.
pub const MAX_PIPELINES: usize = 64;

/// `[kafka]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group of the meter instances.
    pub group_id: String,
    /// Transaction timeout (also the longest a crashed instance's open
    /// transaction blocks `read_committed` readers).
    pub transaction_timeout: Dur,
    /// librdkafka properties passed through verbatim (SASL/SSL settings…).
    pub properties: BTreeMap<String, String>,
}

/// `[topics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Prefix of every topic name.
    pub prefix: String,
    /// Create missing topics at start.
    pub create: bool,
    /// Partitions of the input (and changelog) topics when created.
    pub partitions: i32,
    /// Partitions of output topics when created.
    pub output_partitions: i32,
    /// Replication factor when created.
    pub replication: i32,
}

/// `[state]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// RocksDB directory.
    pub dir: PathBuf,
    /// Local state older than this (wall clock since its last write) is
    /// discarded and restored from the changelog in full, because the
    /// changelog's tombstones are only kept for
    /// [`jobmeter_kafka::topics::CHANGELOG_TOMBSTONE_RETENTION_MS`] (checked).
    pub max_local_age: Dur,
    /// The format state values are written in: `binary` (version 1, the
    /// default) or `json` (version 0, what releases before the binary
    /// format wrote and read). Both are always read.
    pub format: jobmeter_core::state::StateFormat,
    /// Where finished jobs are kept for their retention: `store` (the
    /// default: in RocksDB, read back when an event names them; memory
    /// holds the open jobs) or `memory` (every job in memory).
    pub finished_jobs: FinishedJobs,
    /// RocksDB's block cache in MiB, shared by every partition: what reads
    /// of finished jobs and event ids keep in memory.
    pub block_cache_mib: u64,
    /// How many accounts' records are held in memory (the rest are read
    /// from RocksDB when an event or API call names them).
    pub account_cache: u64,
}

/// `state.finished_jobs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishedJobs {
    /// In RocksDB; memory is bounded by the open jobs.
    #[default]
    Store,
    /// In memory for their whole retention.
    Memory,
}

/// `[batch]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Commit after this many input events…
    pub max_events: usize,
    /// …or this long after the batch's first event, whichever is first.
    pub interval: Dur,
    /// No longer used (accepted so that older files still load): the
    /// merge waits for a partition that has records on the way as long as
    /// its fetch takes, since going on without it could bill past records
    /// that exist (`jobmeter_core::order`).
    pub max_idle: Dur,
}

/// `[pipeline]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Pipelines of this instance (like Kafka Streams' `num.stream.threads`),
    /// default 1; 0: one per core the process may use. Each is a member
    /// of the consumer group with its own partitions, its own
    /// transactional producer and its own committer, so an instance uses
    /// up to this many cores for metering. Partitions are the unit: more
    /// pipelines than input partitions leave some idle.
    pub threads: usize,
}

/// `[meter]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeterTimeouts {
    /// Orphan timeout.
    pub orphan_timeout: Dur,
    /// Period close grace.
    pub period_grace: Dur,
    /// Longest accepted job.
    pub max_duration: Dur,
    /// How long finished jobs are remembered for duplicate detection.
    pub retention: Dur,
    /// How far an event's `time` may be ahead of its record's timestamp.
    pub max_clock_skew: Dur,
    /// How far an event's `time` may be behind its record's timestamp;
    /// unset (or empty) means the retention.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "empty_is_none")]
    pub max_event_age: Option<Dur>,
    /// A `runway` limit event fires when an account's runway against a
    /// limit falls below each of these (spend control).
    pub runway_horizons: Vec<Dur>,
    /// A job sent a `job.stop` is charged to at most the command's instant
    /// plus this (the worker's time to react).
    pub stop_grace: Dur,
}

/// `[billing]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// Rate card (TOML).
    pub rate_card: PathBuf,
    /// Plan catalog (TOML); built-in defaults when empty.
    pub plans: Option<PathBuf>,
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of `/metrics`, `/healthz`, `/readyz` and `/v1`.
    pub listen: String,
    /// The URL other instances and clients reach this one at (announced in
    /// the consumer group, so a misdirected API call can name the owner).
    /// Empty: `http://<listen>` (`https://` with TLS), with the host name
    /// for a wildcard address.
    pub advertise_url: String,
    /// Serve HTTPS with this certificate and key (`[http.tls]`).
    pub tls: Option<TlsConfig>,
    /// Serve plain HTTP on an address other than loopback. Off by default:
    /// a meter reachable from other machines serves HTTPS (`http.tls`),
    /// unless something in front of it terminates TLS (an ingress, a mesh
    /// sidecar) — say so with `true`.
    pub allow_plaintext: bool,
}

pub use crate::tls::TlsConfig;

/// `[api]`: who may read the usage API.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Tokens that read every account and the rate card.
    pub admin_tokens: Vec<String>,
    /// Tokens that read every account and write pricing adjustments
    /// (`POST /v1/accounts/{id}/adjustments`).
    pub support_tokens: Vec<String>,
    /// Per account id, the tokens that read that account (and the rate card).
    pub account_tokens: BTreeMap<String, Vec<String>>,
    /// A file of `<token> <account_id>`, `<token> *` (admin) or
    /// `<token> * support` lines (for secrets mounted from elsewhere);
    /// read at start.
    pub tokens_file: Option<PathBuf>,
}

/// `[shutdown]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, exit by force if the last batch has not been
    /// committed within this time (a second signal forces it at once).
    pub deadline: Dur,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance_id: "jobmeter-0".into(),
            kafka: KafkaConfig::default(),
            topics: TopicsConfig::default(),
            state: StateConfig::default(),
            batch: BatchConfig::default(),
            pipeline: PipelineConfig::default(),
            meter: MeterTimeouts::default(),
            billing: BillingConfig::default(),
            http: HttpConfig::default(),
            api: ApiConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "jobmeter".into(),
            transaction_timeout: Dur::from_ms(30_000),
            properties: BTreeMap::new(),
        }
    }
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            prefix: "jobmeter".into(),
            create: true,
            partitions: 6,
            output_partitions: 6,
            replication: 1,
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("data/jobmeter"),
            max_local_age: Dur::from_ms(48 * 3_600_000),
            format: jobmeter_core::state::StateFormat::Binary,
            finished_jobs: FinishedJobs::Store,
            block_cache_mib: 64,
            account_cache: 100_000,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig { threads: 1 }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 20_000,
            interval: Dur::from_ms(50),
            max_idle: Dur::from_ms(500),
        }
    }
}

impl Default for MeterTimeouts {
    fn default() -> Self {
        MeterTimeouts {
            orphan_timeout: Dur::from_ms(10 * 60_000),
            period_grace: Dur::from_ms(3_600_000),
            max_duration: Dur::from_ms(7 * 86_400_000),
            retention: Dur::from_ms(35 * 86_400_000),
            max_clock_skew: Dur::from_ms(5 * 60_000),
            max_event_age: None,
            runway_horizons: vec![Dur::from_ms(10 * 60_000)],
            stop_grace: Dur::from_ms(30_000),
        }
    }
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            rate_card: PathBuf::from("config/rate-card.toml"),
            plans: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
            advertise_url: String::new(),
            tls: None,
            allow_plaintext: false,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deadline: Dur::from_ms(30_000),
        }
    }
}

/// An optional duration where an empty string means unset.
fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Dur>, D::Error> {
    let text = String::deserialize(d)?;
    match text.trim() {
        "" => Ok(None),
        t => t.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// Settings given on the command line (the last layer).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `key.path=value` pairs.
    pub sets: Vec<(String, String)>,
}

impl Config {
    /// Loads: defaults, then `file`, then environment (`env`), then
    /// `overrides`; then validates everything.
    pub fn load(file: Option<&Path>, env: &[(String, String)], overrides: &Overrides) -> Result<Config, ConfigErrors> {
        Self::load_checked(file, env, overrides, Config::problems)
    }

    /// Loads like [`Config::load`] for a tool that only talks to Kafka
    /// (`dump`, `notify`): the same layers, but only what reaching Kafka
    /// needs is validated (no rate card, state directory or API tokens).
    pub fn load_for_kafka(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &Overrides,
    ) -> Result<Config, ConfigErrors> {
        Self::load_checked(file, env, overrides, Config::kafka_problems)
    }

    fn load_checked(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &Overrides,
        problems: fn(&Config) -> Vec<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let mut table = match toml::Table::try_from(Config::default()) {
            Ok(t) => t,
            Err(e) => return Err(ConfigErrors(vec![format!("defaults: {e}")])),
        };
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => match text.parse::<toml::Table>() {
                    Ok(t) => merge(&mut table, t),
                    Err(e) => errors.push(format!("{}: {e}", path.display())),
                },
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        for (k, v) in env {
            if k == "JOBMETER_KAFKA_BROKERS" {
                set_path(
                    &mut table,
                    &["kafka".into(), "brokers".into()],
                    toml::Value::String(v.clone()),
                );
            } else if let Some(rest) = k.strip_prefix("JOBMETER__") {
                let path = property_path(rest.split("__").map(str::to_ascii_lowercase).collect());
                let value = env_value(v, get_path(&table, &path));
                set_path(&mut table, &path, value);
            }
        }
        for (k, v) in &overrides.sets {
            let path = property_path(k.split('.').map(str::to_owned).collect());
            let value = env_value(v, get_path(&table, &path));
            set_path(&mut table, &path, value);
        }
        // librdkafka takes every property as a string.
        if let Some(toml::Value::Table(props)) = table
            .get_mut("kafka")
            .and_then(|k| k.as_table_mut())
            .and_then(|k| k.get_mut("properties"))
        {
            for (_, v) in props.iter_mut() {
                if !v.is_str() {
                    *v = toml::Value::String(v.to_string());
                }
            }
        }
        let Some(cfg) = typed(table, &mut errors) else {
            return Err(ConfigErrors(errors));
        };
        errors.extend(problems(&cfg));
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// What reaching Kafka needs: brokers, librdkafka properties it
    /// accepts, a topic prefix.
    pub fn kafka_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.kafka.brokers.trim().is_empty() {
            p.push("kafka.brokers: must not be empty".into());
        }
        p.extend(self.kafka_settings().property_problems());
        if self.topics.prefix.is_empty() {
            p.push("topics.prefix: must not be empty".into());
        }
        p
    }

    /// The Kafka client settings every client of the meter and of its
    /// tools uses: the brokers, the librdkafka properties, and readers
    /// named under the group (`<kafka.group_id>.readers`), so the group
    /// ACL of docs/security.md covers them.
    pub fn kafka_settings(&self) -> jobmeter_kafka::client::KafkaSettings {
        let mut settings = jobmeter_kafka::client::KafkaSettings::new(self.kafka.brokers.clone());
        settings.properties = self.kafka.properties.clone();
        settings.reader_group = Some(format!("{}.readers", self.kafka.group_id));
        settings
    }

    /// Every semantic problem.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.instance_id.is_empty()
            || !self
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            p.push(format!(
                "instance_id: {:?} must be non-empty letters, digits, '-', '_' or '.'",
                self.instance_id
            ));
        }
        p.extend(self.kafka_problems());
        self.group_problems(&mut p);
        self.state_problems(&mut p);
        self.timing_problems(&mut p);
        self.http_problems(&mut p);
        if let Err(e) = jobmeter_offline::replay::load_rate_card(&self.billing.rate_card) {
            p.push(format!("billing.rate_card: {e}"));
        }
        if let Err(e) = jobmeter_offline::replay::load_plans(self.billing.plans.as_deref()) {
            p.push(format!("billing.plans: {e}"));
        }
        p
    }

    /// The consumer group, its assignor, the topics' layout, the pipelines.
    fn group_problems(&self, p: &mut Vec<String>) {
        if self.kafka.group_id.trim().is_empty() {
            p.push("kafka.group_id: must not be empty".into());
        }
        // The meter hands each instance's records to its meters from
        // per-partition queues and rebuilds them at every assignment, which
        // needs the eager protocol (every partition revoked, committed and
        // assigned again at its committed offset).
        if let Some(s) = self.kafka.properties.get("partition.assignment.strategy") {
            if s.contains("cooperative") {
                p.push(format!(
                    "kafka.properties.partition.assignment.strategy: {s:?} is incremental; jobmeter needs an eager assignor (range or roundrobin, the default)"
                ));
            }
        }
        if let Some(s) = self.kafka.properties.get("group.protocol") {
            if s != "classic" {
                p.push(format!(
                    "kafka.properties.group.protocol: {s:?} assigns incrementally; jobmeter needs \"classic\" (the default)"
                ));
            }
        }
        if self.topics.partitions < 1 || self.topics.output_partitions < 1 || self.topics.replication < 1 {
            p.push("topics.partitions, output_partitions and replication must be at least 1".into());
        }
        if self.batch.max_events == 0 {
            p.push("batch.max_events: must be at least 1".into());
        }
        if self.pipeline.threads > MAX_PIPELINES {
            p.push(format!(
                "pipeline.threads: {} must be 0 (one per core) to {MAX_PIPELINES}",
                self.pipeline.threads
            ));
        }
    }

    /// The local state store.
    fn state_problems(&self, p: &mut Vec<String>) {
        if !(8..=1 << 20).contains(&self.state.block_cache_mib) {
            p.push(format!(
                "state.block_cache_mib: {} is outside 8 to 1048576",
                self.state.block_cache_mib
            ));
        }
        if !(1_000..=100_000_000).contains(&self.state.account_cache) {
            p.push(format!(
                "state.account_cache: {} is outside 1000 to 100000000",
                self.state.account_cache
            ));
        }
        let tombstones = jobmeter_kafka::topics::CHANGELOG_TOMBSTONE_RETENTION_MS;
        if self.state.max_local_age.ms() >= tombstones {
            p.push(format!(
                "state.max_local_age: {} must be shorter than the changelog's tombstone retention ({} h): older local state could miss deletions",
                self.state.max_local_age,
                tombstones / 3_600_000
            ));
        }
    }

    /// Every duration, the runway horizons, the shutdown deadline.
    fn timing_problems(&self, p: &mut Vec<String>) {
        for (field, v) in [
            ("kafka.transaction_timeout", self.kafka.transaction_timeout),
            ("state.max_local_age", self.state.max_local_age),
            ("batch.interval", self.batch.interval),
            ("batch.max_idle", self.batch.max_idle),
            ("meter.orphan_timeout", self.meter.orphan_timeout),
            ("meter.period_grace", self.meter.period_grace),
            ("meter.max_duration", self.meter.max_duration),
            ("meter.retention", self.meter.retention),
            ("meter.max_clock_skew", self.meter.max_clock_skew),
            ("meter.stop_grace", self.meter.stop_grace),
            ("shutdown.deadline", self.shutdown.deadline),
        ]
        .into_iter()
        .chain(self.meter.max_event_age.map(|age| ("meter.max_event_age", age)))
        {
            if v.ms() <= 0 {
                p.push(format!("{field}: must be more than 0"));
            }
        }
        if self.meter.runway_horizons.len() > 16 {
            p.push(format!(
                "meter.runway_horizons: {} horizons; at most 16 (each fires its own event per account and limit)",
                self.meter.runway_horizons.len()
            ));
        }
        for (i, h) in self.meter.runway_horizons.iter().enumerate() {
            if h.ms() < 1000 {
                p.push(format!("meter.runway_horizons[{i}]: {h} must be at least 1s"));
            }
        }
        // The last batch's commit may take up to the transaction timeout;
        // a shorter deadline cuts it off (safe, but not the clean exit the
        // deadline is for).
        if self.shutdown.deadline < self.kafka.transaction_timeout {
            p.push(format!(
                "shutdown.deadline: {} is shorter than kafka.transaction_timeout ({}): the last commit could be cut off",
                self.shutdown.deadline, self.kafka.transaction_timeout
            ));
        }
    }

    /// The HTTP listener, its advertised URL and the API tokens.
    fn http_problems(&self, p: &mut Vec<String>) {
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "http.listen: {:?} is not an address such as 127.0.0.1:9464",
                self.http.listen
            ));
        }
        match &self.http.tls {
            Some(tls) => {
                if let Err(e) = crate::tls::Pair::load(tls) {
                    p.push(format!("http.tls: {e}"));
                }
                if tls.reload_check.ms() < 1_000 {
                    p.push("http.tls.reload_check: must be at least 1s".into());
                }
            }
            None if !self.http.allow_plaintext && !listens_on_loopback(&self.http.listen) => p.push(format!(
                "http.listen: {:?} is reachable from other machines and would serve plain HTTP: set http.tls.cert and http.tls.key to serve HTTPS, or http.allow_plaintext = true where an ingress or sidecar terminates TLS in front of the meter",
                self.http.listen
            )),
            None => {}
        }
        let url = &self.http.advertise_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            p.push(format!(
                "http.advertise_url: {:?} must start with http:// or https://",
                self.http.advertise_url
            ));
        }
        match self.api_tokens() {
            Ok(tokens) => {
                let mut seen = std::collections::BTreeSet::new();
                for (t, _) in &tokens {
                    if t.len() < 16 || t.chars().any(char::is_whitespace) {
                        p.push(format!(
                            "api: a token of {} characters is too short or has spaces (at least 16, no spaces)",
                            t.chars().count()
                        ));
                    }
                    if !seen.insert(t.clone()) {
                        p.push("api: the same token is configured twice".into());
                    }
                }
                p.extend(self.public_token_problems(&tokens));
            }
            Err(e) => p.push(e),
        }
    }

    /// A token written in jobmeter's own repository (a demo token, a
    /// placeholder) is known to anyone who has read it: refused unless the
    /// meter listens on loopback only (the local demo), naming the setting
    /// that holds it.
    fn public_token_problems(&self, tokens: &[(String, super::api::Scope)]) -> Vec<String> {
        if listens_on_loopback(&self.http.listen) {
            return Vec::new();
        }
        let api = &self.api;
        let inline = api
            .admin_tokens
            .iter()
            .map(|t| ("api.admin_tokens".to_owned(), t))
            .chain(api.support_tokens.iter().map(|t| ("api.support_tokens".to_owned(), t)))
            .chain(
                api.account_tokens
                    .iter()
                    .flat_map(|(a, ts)| ts.iter().map(move |t| (format!("api.account_tokens.{a}"), t))),
            );
        let mut named: Vec<(String, &String)> = inline.collect();
        let from_file = tokens
            .iter()
            .map(|(t, _)| t)
            .filter(|t| !named.iter().any(|(_, x)| x == t));
        let file = api
            .tokens_file
            .as_ref()
            .map_or_else(String::new, |f| format!("api.tokens_file {}", f.display()));
        named.extend(from_file.map(|t| (file.clone(), t)).collect::<Vec<_>>());
        named
            .into_iter()
            .filter(|(_, t)| PUBLIC_TOKENS.contains(&t.as_str()))
            .map(|(setting, t)| {
                format!(
                    "{setting}: the token {t:?} is written in jobmeter's repository (a demo token or a placeholder), so anyone may know it; http.listen {:?} is not loopback: set a long random token of your own",
                    self.http.listen
                )
            })
            .collect()
    }

    /// Every API token with its scope (inline ones, then the tokens file).
    pub fn api_tokens(&self) -> Result<Vec<(String, super::api::Scope)>, String> {
        use super::api::{Scope, Tokens};
        let mut out: Vec<(String, Scope)> = self
            .api
            .admin_tokens
            .iter()
            .map(|t| (t.clone(), Scope::Admin))
            .collect();
        out.extend(self.api.support_tokens.iter().map(|t| (t.clone(), Scope::Support)));
        for (account, tokens) in &self.api.account_tokens {
            out.extend(tokens.iter().map(|t| (t.clone(), Scope::Account(account.clone()))));
        }
        if let Some(f) = &self.api.tokens_file {
            let text = std::fs::read_to_string(f).map_err(|e| format!("api.tokens_file: {}: {e}", f.display()))?;
            out.extend(Tokens::parse_file(&text).map_err(|e| format!("api.tokens_file: {}: {e}", f.display()))?);
        }
        Ok(out)
    }

    /// A copy safe to print: API tokens and secret-looking Kafka properties
    /// (passwords, secrets, keys) replaced by `<redacted>`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        let hide = |v: &mut String| *v = "<redacted>".into();
        c.api.admin_tokens.iter_mut().for_each(hide);
        c.api.support_tokens.iter_mut().for_each(hide);
        for tokens in c.api.account_tokens.values_mut() {
            tokens.iter_mut().for_each(hide);
        }
        for (k, v) in c.kafka.properties.iter_mut() {
            if ["password", "secret", "key"].iter().any(|w| k.contains(w)) && !k.ends_with(".location") {
                hide(v);
            }
        }
        c
    }

    /// The URL announced to the group: `http.advertise_url`, or one derived
    /// from `http.listen`.
    pub fn advertised_url(&self) -> String {
        if !self.http.advertise_url.is_empty() {
            return self.http.advertise_url.trim_end_matches('/').to_owned();
        }
        let scheme = if self.http.tls.is_some() { "https" } else { "http" };
        match self.http.listen.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => {
                let host = hostname();
                format!("{scheme}://{host}:{}", a.port())
            }
            _ => format!("{scheme}://{}", self.http.listen),
        }
    }

    /// The core's timeouts.
    pub fn meter_config(&self) -> MeterConfig {
        MeterConfig {
            orphan_timeout_ms: self.meter.orphan_timeout.ms(),
            period_grace_ms: self.meter.period_grace.ms(),
            max_duration_ms: self.meter.max_duration.ms(),
            retention_ms: self.meter.retention.ms(),
            max_clock_skew_ms: self.meter.max_clock_skew.ms(),
            max_event_age_ms: self.meter.max_event_age.unwrap_or(self.meter.retention).ms(),
            state_format: self.state.format,
            runway_horizons_ms: self.meter.runway_horizons.iter().map(|h| h.ms()).collect(),
            stop_grace_ms: self.meter.stop_grace.ms(),
        }
    }

    /// The transactional id: `<prefix>-<instance_id>`.
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.topics.prefix, self.instance_id)
    }

    /// How many pipelines this instance runs: `pipeline.threads`, or one
    /// per core the process may use when it is 0.
    pub fn pipelines(&self) -> usize {
        match self.pipeline.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_PIPELINES)),
            n => n.min(MAX_PIPELINES),
        }
    }

    /// The configuration pipeline `i` of this instance runs with: the
    /// first keeps the instance's id (so its transactional id and static
    /// group membership are the ones a single-pipeline instance had), the
    /// others are `<instance_id>-p<i>`.
    pub fn for_pipeline(&self, i: usize) -> Config {
        let mut c = self.clone();
        if i > 0 {
            c.instance_id = format!("{}-p{i}", self.instance_id);
        }
        c
    }
}

/// This machine's name: `$HOSTNAME`, else `/etc/hostname`, else `localhost`
/// (event sources of `jobmeter emit`, the advertised URL of a wildcard listener).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The tokens written in jobmeter's repository: the local demo's
/// (`./dev demo`, loopback only) and the Kubernetes manifest's placeholder.
/// A test keeps this list equal to what the repository holds.
pub const PUBLIC_TOKENS: &[&str] = &[
    "demo-admin-token-change-me",
    "demo-acct-0001-token-change-me",
    "replace-this-admin-token-with-a-long-random-one",
];

/// True when `listen` (an `ip:port`, as `http.listen` must be) accepts
/// connections from this machine only.
pub fn listens_on_loopback(listen: &str) -> bool {
    listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_card_path() -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/rate-card.toml").to_owned()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            format!(
                "instance_id = \"a\"\n[batch]\nmax_events = 10\n[billing]\nrate_card = {:?}\n",
                rate_card_path()
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let env = vec![
            ("JOBMETER__BATCH__MAX_EVENTS".to_owned(), "20".to_owned()),
            ("JOBMETER_KAFKA_BROKERS".to_owned(), "b:1".to_owned()),
        ];
        let over = Overrides {
            sets: vec![("instance_id".into(), "c".into())],
        };
        let c = Config::load(Some(&file), &env, &over).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.instance_id.as_str(), c.batch.max_events, c.kafka.brokers.as_str()),
            ("c", 20, "b:1")
        );
        let env = vec![(
            "JOBMETER__KAFKA__PROPERTIES__SASL__USERNAME".to_owned(),
            "meter".to_owned(),
        )];
        let over = Overrides {
            sets: vec![
                ("kafka.properties.compression.type".into(), "none".into()),
                ("kafka.properties.linger.ms".into(), "10".into()),
                ("billing.rate_card".into(), rate_card_path()),
            ],
        };
        let c = Config::load(None, &env, &over).unwrap_or_else(|e| panic!("{e}"));
        let props: Vec<(&str, &str)> = c
            .kafka
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            props,
            vec![
                ("compression.type", "none"),
                ("linger.ms", "10"),
                ("sasl.username", "meter")
            ]
        );
    }

    #[test]
    fn text_settings_stay_text_and_numbers_become_numbers() {
        let env = vec![
            ("JOBMETER__KAFKA__GROUP_ID".to_owned(), "2024".to_owned()),
            ("JOBMETER__TOPICS__PREFIX".to_owned(), "true".to_owned()),
            ("JOBMETER__BATCH__MAX_EVENTS".to_owned(), " 2000".to_owned()),
        ];
        let over = Overrides {
            sets: vec![
                ("instance_id".into(), "42".into()),
                ("topics.partitions".into(), "12".into()),
                ("billing.rate_card".into(), rate_card_path()),
            ],
        };
        let c = Config::load(None, &env, &over).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                c.kafka.group_id.as_str(),
                c.topics.prefix.as_str(),
                c.instance_id.as_str()
            ),
            ("2024", "true", "42")
        );
        assert_eq!((c.batch.max_events, c.topics.partitions), (2000, 12));
        let over = Overrides {
            sets: vec![
                ("state.max_local_age".into(), "3d".into()),
                ("billing.rate_card".into(), rate_card_path()),
            ],
        };
        let err = Config::load(None, &[], &over).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("tombstone")), "{err:?}");
        // A number setting given text is an error that names the setting.
        let env = vec![("JOBMETER__BATCH__MAX_EVENTS".to_owned(), "many".to_owned())];
        let err = Config::load(None, &env, &Overrides::default())
            .err()
            .map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("max_events")), "{err:?}");
    }

    #[test]
    fn where_finished_jobs_live_is_checked() {
        let load = |k: &str, v: &str| {
            let over = Overrides {
                sets: vec![(k.into(), v.into()), ("billing.rate_card".into(), rate_card_path())],
            };
            Config::load(None, &[], &over).map_err(|e| e.to_string())
        };
        let c = load("state.finished_jobs", "memory").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.state.finished_jobs, FinishedJobs::Memory);
        let c = load("state.block_cache_mib", "512").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.state.finished_jobs, c.state.block_cache_mib),
            (FinishedJobs::Store, 512)
        );
        for (k, v, says) in [
            ("state.finished_jobs", "disk", "finished_jobs"),
            ("state.block_cache_mib", "0", "block_cache_mib"),
            ("state.block_cache_mib", "4", "block_cache_mib"),
            ("state.block_cache_mib", "-1", "block_cache_mib"),
            ("state.account_cache", "10", "account_cache"),
            ("state.account_cache", "1000000000", "account_cache"),
        ] {
            let err = load(k, v).err();
            assert!(err.as_deref().is_some_and(|e| e.contains(says)), "{k}={v}: {err:?}");
        }
    }

    #[test]
    fn kafka_tools_read_the_meters_kafka_settings_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("jobmeter.toml");
        std::fs::write(
            &file,
            "[kafka]\nbrokers = \"kafka-1:9093\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n[topics]\nprefix = \"billing\"\n[billing]\nrate_card = \"/no/such/card.toml\"\n",
        )
        .expect("write");
        // The meter itself refuses the file (its rate card is missing)...
        let err = Config::load(Some(&file), &[], &Overrides::default())
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("billing.rate_card")),
            "{err:?}"
        );
        // ...a tool that only talks to Kafka takes what it needs from it,
        // with the same layers (environment, then flags).
        let env = vec![("JOBMETER_KAFKA_BROKERS".to_owned(), "kafka-2:9093".to_owned())];
        let over = Overrides {
            sets: vec![("kafka.properties.sasl.username".into(), "notify".into())],
        };
        let c = Config::load_for_kafka(Some(&file), &env, &over).unwrap_or_else(|e| panic!("{e}"));
        let settings = c.kafka_settings();
        assert_eq!(settings.brokers, "kafka-2:9093");
        assert_eq!(
            settings.properties.get("security.protocol").map(String::as_str),
            Some("SASL_SSL")
        );
        assert_eq!(
            settings.properties.get("sasl.username").map(String::as_str),
            Some("notify")
        );
        assert_eq!(c.topics.prefix, "billing");
        // What reaching Kafka needs is still checked.
        let over = Overrides {
            sets: vec![("kafka.brokers".into(), " ".into())],
        };
        let err = Config::load_for_kafka(Some(&file), &[], &over)
            .err()
            .map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("kafka.brokers")), "{err:?}");
    }

    /// The configuration with the test rate card, `http.listen` and `extra`
    /// settings, or its errors.
    fn load_listening(listen: &str, extra: &[(&str, &str)]) -> Result<Config, String> {
        let mut sets = vec![
            ("billing.rate_card".to_owned(), rate_card_path()),
            ("http.listen".to_owned(), listen.to_owned()),
        ];
        sets.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Config::load(None, &[], &Overrides { sets }).map_err(|e| e.to_string())
    }

    #[test]
    fn a_token_written_in_the_repository_is_refused_off_loopback() {
        let load = load_listening;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "replace-this-admin-token-with-a-long-random-one *\nmy-own-long-random-token-0123 acct-9\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let demo = [("api.admin_tokens", r#"["demo-admin-token-change-me"]"#)];
        // The local demo: loopback keeps working.
        for listen in ["127.0.0.1:9464", "[::1]:9464"] {
            assert!(load(listen, &demo).is_ok(), "{listen}");
        }
        // Anything else refuses it, naming the setting.
        let err = load("0.0.0.0:9464", &demo).err().unwrap_or_default();
        assert!(
            err.contains("api.admin_tokens") && err.contains("written in jobmeter's repository"),
            "{err}"
        );
        let path = file.display().to_string();
        let err = load("10.0.0.7:9464", &[("api.tokens_file", path.as_str())])
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("api.tokens_file") && err.contains("replace-this-admin-token"),
            "{err}"
        );
        assert!(!err.contains("my-own-long-random-token"), "{err}");
        // A token of one's own is fine anywhere (behind TLS).
        assert!(load(
            "0.0.0.0:9464",
            &[
                ("api.admin_tokens", r#"["my-own-long-random-token-0123"]"#),
                ("http.allow_plaintext", "true")
            ]
        )
        .is_ok());
    }

    #[test]
    fn plain_http_off_loopback_needs_tls_or_an_explicit_yes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let load = load_listening;
        assert!(load("127.0.0.1:9464", &[]).is_ok(), "loopback serves plain HTTP");
        let err = load("0.0.0.0:9464", &[]).err().unwrap_or_default();
        assert!(
            err.contains("http.listen") && err.contains("http.tls.cert") && err.contains("http.allow_plaintext"),
            "{err}"
        );
        assert!(load("0.0.0.0:9464", &[("http.allow_plaintext", "true")]).is_ok());
        let (cert, key) = crate::tls::self_signed(&["localhost"], 1).unwrap_or_else(|e| panic!("{e}"));
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, &cert).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&k, &key).unwrap_or_else(|e| panic!("{e}"));
        let (c, k) = (c.display().to_string(), k.display().to_string());
        let tls = load(
            "0.0.0.0:9464",
            &[("http.tls.cert", c.as_str()), ("http.tls.key", k.as_str())],
        );
        let cfg = tls.unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.advertised_url().starts_with("https://"), "{}", cfg.advertised_url());
        // A pair that does not load is a configuration error naming it.
        let err = load(
            "0.0.0.0:9464",
            &[("http.tls.cert", k.as_str()), ("http.tls.key", k.as_str())],
        )
        .err()
        .unwrap_or_default();
        assert!(err.contains("http.tls: http.tls.cert"), "{err}");
    }

    #[test]
    fn printed_config_hides_secrets() {
        let over = Overrides {
            sets: vec![
                ("kafka.properties.sasl.password".into(), "hunter2hunter2".into()),
                ("kafka.properties.ssl.key.location".into(), "/etc/key.pem".into()),
                ("billing.rate_card".into(), rate_card_path()),
            ],
        };
        let mut c = Config::load(None, &[], &over).unwrap_or_else(|e| panic!("{e}"));
        c.api.admin_tokens = vec!["admin-token-0123456789".into()];
        let text = toml::to_string_pretty(&c.redacted()).unwrap_or_default();
        assert!(
            !text.contains("hunter2") && !text.contains("admin-token-0123456789"),
            "{text}"
        );
        assert!(text.contains("/etc/key.pem"), "file locations are not secrets");
    }

    #[test]
    fn durations_are_typed() {
        let over = Overrides {
            sets: vec![
                ("batch.interval".into(), "1h 30m".into()),
                ("meter.max_event_age".into(), "".into()),
                ("billing.rate_card".into(), rate_card_path()),
            ],
        };
        let cfg = Config::load(None, &[], &over).expect("valid");
        assert_eq!(cfg.batch.interval.ms(), 5_400_000);
        assert_eq!(cfg.meter.max_event_age, None, "empty means the retention");
        assert_eq!(cfg.meter_config().max_event_age_ms, cfg.meter.retention.ms());
        let over = Overrides {
            sets: vec![
                ("meter.max_event_age".into(), "2d".into()),
                ("billing.rate_card".into(), rate_card_path()),
            ],
        };
        let cfg = Config::load(None, &[], &over).expect("valid");
        assert_eq!(cfg.meter_config().max_event_age_ms, 2 * 86_400_000);
        assert!(toml::to_string(&cfg).expect("print").contains("max_event_age = \"2d\""));
    }

    #[test]
    fn spend_control_settings_are_typed_and_checked() {
        let load = |sets: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = sets.iter().map(|(k, x)| ((*k).into(), (*x).into())).collect();
            v.push(("billing.rate_card".into(), rate_card_path()));
            Config::load(None, &[], &Overrides { sets: v })
        };
        let cfg = load(&[
            ("meter.runway_horizons", r#"["1h", "10m"]"#),
            ("meter.stop_grace", "5s"),
        ])
        .expect("valid");
        let m = cfg.meter_config();
        assert_eq!(m.runway_horizons_ms, vec![3_600_000, 600_000]);
        assert_eq!(m.stop_grace_ms, 5_000);
        let defaults = load(&[]).expect("valid").meter_config();
        assert_eq!(
            (defaults.runway_horizons_ms, defaults.stop_grace_ms),
            (vec![600_000], 30_000)
        );
        let err = |sets: &[(&str, &str)]| load(sets).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&[("meter.runway_horizons", r#"["500ms"]"#)])
            .contains("meter.runway_horizons[0]: 500ms must be at least 1s"));
        let many = format!("[{}]", vec!["\"1m\""; 17].join(","));
        assert!(err(&[("meter.runway_horizons", many.as_str())]).contains("at most 16"));
        assert!(err(&[("meter.stop_grace", "0s")]).contains("meter.stop_grace"));
        assert!(err(&[("meter.stop_grace", "soon")]).contains("meter.stop_grace"));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let env = vec![
            ("JOBMETER__BATCH__INTERVAL".to_owned(), "soon".to_owned()),
            ("JOBMETER__TOPICS__PARTITIONS".to_owned(), "0".to_owned()),
            ("JOBMETER__METER__RETENTION".to_owned(), "forever".to_owned()),
            ("JOBMETER__SHUTDOWN__DEADLINE".to_owned(), "10s".to_owned()),
        ];
        let over = Overrides {
            sets: vec![
                ("http.listen".into(), "nowhere".into()),
                ("billing.rate_card".into(), "/nope.toml".into()),
                ("batch.max_idle".into(), "0ms".into()),
                (
                    "kafka.properties.partition.assignment.strategy".into(),
                    "cooperative-sticky".into(),
                ),
                ("kafka.properties.group.protocol".into(), "consumer".into()),
                ("kafka.properties.fetch.queue.backoff.ms".into(), "soon".into()),
            ],
        };
        let err = Config::load(None, &env, &over)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for needle in [
            "batch.interval: \"soon\" is not a duration",
            "meter.retention: \"forever\" is not a duration",
            "shutdown.deadline: 10s is shorter than kafka.transaction_timeout (30s)",
            "batch.max_idle",
            "topics.partitions",
            "http.listen",
            "billing.rate_card",
            "partition.assignment.strategy",
            "group.protocol",
            "kafka.properties.fetch.queue.backoff.ms: ",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
        let unknown = Config::load(
            None,
            &[("JOBMETER__BATCH__SIZE".into(), "1".into())],
            &Overrides::default(),
        );
        assert!(unknown
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("unknown field"));
    }
}
