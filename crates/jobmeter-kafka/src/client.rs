//! Client configuration: one place that turns jobmeter's Kafka settings
//! into librdkafka configurations for each kind of client.

use rdkafka::config::ClientConfig;
use std::collections::BTreeMap;

/// Connection settings shared by every client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Extra librdkafka properties passed through verbatim (SASL, SSL,
    /// timeouts…); they override jobmeter's defaults.
    pub properties: BTreeMap<String, String>,
    /// The `group.id` of the readers ([`KafkaSettings::reader`]). They only
    /// read assigned partitions and never join or commit, but librdkafka
    /// still looks up the group's coordinator, which a broker with ACLs
    /// allows only to a principal that may describe the group: a name the
    /// ACLs cover (the meter uses `<kafka.group_id>.readers`). `None`:
    /// `<client id>-reader`.
    pub reader_group: Option<String>,
}

/// How long a consumer waits before fetching again for a partition whose
/// local queue is over its threshold. librdkafka's default (1 s) starved the
/// meter on a backlog: it applied a fetch's worth of records in about 0.4 s
/// and then waited for the next fetch for the rest of the second (half the
/// sustained rate of this setting, measured in `BENCHMARKS.md` §2g).
const FETCH_QUEUE_BACKOFF_MS: &str = "5";

impl KafkaSettings {
    /// Settings for `brokers` with no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            properties: BTreeMap::new(),
            reader_group: None,
        }
    }

    /// A base configuration: brokers, then the pass-through properties.
    pub fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// A consumer in `group`: read_committed, no auto commit, starts at the
    /// earliest offset when the group has none.
    pub fn group_consumer(&self, group: &str, instance: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("client.id", instance)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "300000")
            // A fetch returns as soon as data is there, or after this: the
            // librdkafka default (500 ms) would add up to half a second
            // between a stop event and its charge when input is sparse.
            .set("fetch.wait.max.ms", "20")
            .set("queued.max.messages.kbytes", "65536")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
        self.finish(c)
    }

    /// A consumer with no group, for reading partitions by assignment
    /// (changelog restores, the accounts table): read_committed, EOF events on.
    pub fn reader(&self, client_id: &str) -> ClientConfig {
        let mut c = self.base();
        let group = match &self.reader_group {
            Some(g) => g.clone(),
            None => format!("{client_id}-reader"),
        };
        c.set("group.id", group)
            .set("client.id", client_id)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            // A reader stops at the end-of-partition event, which comes
            // with the fetch that finds nothing more: with librdkafka's
            // default wait (500 ms) every restore of a partition took half
            // a second longer than its reading.
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set("auto.offset.reset", "earliest");
        self.finish(c)
    }

    /// The transactional producer of instance `transactional_id`.
    pub fn transactional_producer(&self, transactional_id: &str, transaction_timeout_ms: u64) -> ClientConfig {
        let mut c = self.base();
        c.set("transactional.id", transactional_id)
            .set("client.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("transaction.timeout.ms", transaction_timeout_ms.to_string())
            .set("linger.ms", "5")
            // After a commit, the coordinator is still writing the previous
            // transaction's markers; the next AddPartitionsToTxn is answered
            // CONCURRENT_TRANSACTIONS and retried after this backoff. The
            // default (100 ms) put a 100 ms floor under every batch.
            .set("retry.backoff.ms", "5")
            .set("retry.backoff.max.ms", "100")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", "262144")
            .set("message.timeout.ms", transaction_timeout_ms.to_string());
        self.finish(c)
    }

    /// A plain idempotent producer (tools, tests, the simulator).
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("partitioner", "murmur2_random");
        self.finish(c)
    }

    /// What librdkafka refuses among the extra properties (an unknown name,
    /// a value of the wrong type or out of range), one message each, found
    /// without connecting: a configuration error to report at start-up,
    /// not a client that fails to be created again and again.
    pub fn property_problems(&self) -> Vec<String> {
        self.properties
            .iter()
            .filter_map(|(k, v)| {
                let mut c = ClientConfig::new();
                c.set(k, v);
                c.create_native_config()
                    .err()
                    .map(|e| format!("kafka.properties.{k}: {e}"))
            })
            .collect()
    }

    /// An admin client.
    pub fn admin(&self) -> ClientConfig {
        self.finish(self.base())
    }
}

/// The broker address tests and tools use: `JOBMETER_KAFKA_BROKERS`, else
/// `127.0.0.1:9092`.
pub fn brokers_from_env() -> String {
    std::env::var("JOBMETER_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_fetch_again_soon_and_properties_override_it() {
        let mut s = KafkaSettings::new("b:9092");
        let group = s.group_consumer("g", "i");
        let reader = s.reader("r");
        for c in [&group, &reader] {
            assert_eq!(c.get("fetch.queue.backoff.ms"), Some(FETCH_QUEUE_BACKOFF_MS));
        }
        s.properties.insert("fetch.queue.backoff.ms".into(), "250".into());
        assert_eq!(s.group_consumer("g", "i").get("fetch.queue.backoff.ms"), Some("250"));
        assert_eq!(s.reader("r").get("fetch.queue.backoff.ms"), Some("250"));
    }

    #[test]
    fn unknown_properties_and_bad_values_are_named_without_connecting() {
        let mut s = KafkaSettings::new("b:9092");
        for (k, v) in [
            ("fetch.queue.backoff.ms", "5"),
            ("security.protocol", "plaintext"),
            ("linger.ms", "0"),
        ] {
            s.properties.insert(k.into(), v.into());
        }
        assert_eq!(s.property_problems(), Vec::<String>::new());
        for (k, v) in [
            ("fetch.queue.backoff.ms", "abc"),
            ("linger.ms", "-1"),
            ("queued.min.messages", "10000001"),
            ("no.such.property", "1"),
        ] {
            s.properties.insert(k.into(), v.into());
        }
        let problems = s.property_problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        for k in [
            "fetch.queue.backoff.ms",
            "linger.ms",
            "queued.min.messages",
            "no.such.property",
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("kafka.properties.{k}: "))),
                "{k}: {problems:?}"
            );
        }
    }
}
