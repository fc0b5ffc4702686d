//! `jobmeter notify`: delivers limit events to a webhook.
//!
//! Consumes `<prefix>.limits` (read_committed, in a consumer group) and
//! POSTs each event, as the meter published it, to the webhook:
//!
//! ```text
//! POST <webhook>
//! Content-Type: application/json
//! Idempotency-Key: <event_id>                       (stable across retries and restarts)
//! X-Jobmeter-Event-Id: <event_id>
//! X-Jobmeter-Timestamp: <unix seconds>
//! X-Jobmeter-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
//! ```
//!
//! A 2xx answer is delivery. Anything else (an error status, a refused
//! connection, a timeout) is retried with exponential backoff and jitter,
//! for at most `--give-up-after`; then the event goes to the dead-letter
//! topic (`<prefix>.limits-dlq`) with the reason, the last status and the
//! attempt count in headers. Each partition's offset is committed only
//! after its event was delivered or dead-lettered, so a restart resumes
//! exactly there: nothing is lost, and a receiver that answered 2xx is not
//! sent the event again (except if the process dies between the answer and
//! the commit — the idempotency key lets the receiver drop that repeat).
//!
//! Events are delivered one at a time in partition order, so an account's
//! 80 % warning always arrives before its 100 % one.

use anyhow::Context as _;
use hmac::{Hmac, Mac};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sha2::Sha256;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `jobmeter notify`.
#[derive(Debug, clap::Args)]
pub struct NotifyCmd {
    /// How to reach Kafka: the meter's configuration (`--config`,
    /// `--brokers`, `--set kafka.properties.…`).
    #[command(flatten)]
    pub kafka: jobmeter_service::KafkaArgs,
    /// Topic prefix of the meter (reads `<prefix>.limits`); default: the
    /// configuration's `topics.prefix` (`jobmeter`).
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Consumer group (its committed offsets are the delivery progress).
    #[arg(long, default_value = "jobmeter-notify")]
    pub group: String,
    /// Webhook URL (http:// or https://).
    #[arg(long, env = "JOBMETER_WEBHOOK_URL")]
    pub webhook: String,
    /// HMAC secret (prefer the environment or --secret-file).
    #[arg(long, env = "JOBMETER_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// File holding the HMAC secret.
    #[arg(long)]
    pub secret_file: Option<std::path::PathBuf>,
    /// Timeout of one request.
    #[arg(long, default_value = "10s", value_parser = jobmeter_offline::args::parse_duration)]
    pub request_timeout: i64,
    /// First retry delay (doubles each attempt).
    #[arg(long, default_value = "500ms", value_parser = jobmeter_offline::args::parse_duration)]
    pub initial_backoff: i64,
    /// Longest retry delay.
    #[arg(long, default_value = "1m", value_parser = jobmeter_offline::args::parse_duration)]
    pub max_backoff: i64,
    /// Dead-letter an event still undelivered this long after its first attempt.
    #[arg(long, default_value = "1h", value_parser = jobmeter_offline::args::parse_duration)]
    pub give_up_after: i64,
    /// Dead-letter topic (default `<prefix>.limits-dlq`; created if missing).
    #[arg(long)]
    pub dlq_topic: Option<String>,
}

/// The signature header value of `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length: new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(2 + tag.len() * 2);
    hex.push_str("v1=");
    for b in tag {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The delay before retry `attempt` (1-based): exponential, capped, with
/// up to 20 % jitter derived from `seed` (so tests are reproducible).
pub fn backoff(attempt: u32, initial: Duration, max: Duration, seed: u64) -> Duration {
    let base = initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let jitter = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 200; // 0..200 ‰
    base.saturating_sub(base.mul_f64(jitter as f64 / 1000.0))
}

/// The result of one delivery attempt.
#[derive(Debug)]
enum Attempt {
    Delivered(u16),
    Failed(String, Option<u16>),
}

struct Delivery<'a> {
    client: &'a reqwest::Client,
    rt: &'a tokio::runtime::Runtime,
    url: &'a str,
    secret: &'a [u8],
}

impl Delivery<'_> {
    fn attempt(&self, event_id: &str, body: &[u8]) -> Attempt {
        let ts = jobmeter_core::Timestamp::now().0.max(0) as u64 / 1000;
        let req = self
            .client
            .post(self.url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", event_id)
            .header("X-Jobmeter-Event-Id", event_id)
            .header("X-Jobmeter-Timestamp", ts.to_string())
            .header("X-Jobmeter-Signature", signature(self.secret, ts, body))
            .body(body.to_vec());
        match self.rt.block_on(async { req.send().await }) {
            Ok(r) if r.status().is_success() => Attempt::Delivered(r.status().as_u16()),
            Ok(r) => Attempt::Failed(format!("HTTP {}", r.status()), Some(r.status().as_u16())),
            Err(e) => Attempt::Failed(
                if e.is_timeout() {
                    "timeout".to_owned()
                } else if e.is_connect() {
                    "connection refused or reset".to_owned()
                } else {
                    e.to_string()
                },
                None,
            ),
        }
    }
}

fn event_id_of(payload: &[u8], topic: &str, partition: i32, offset: i64) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v["event_id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{topic}/{partition}/{offset}"))
}

/// The webhook secret: from `--secret-file`, `--secret` or the
/// environment; at least 16 characters.
fn secret_of(cmd: &NotifyCmd) -> anyhow::Result<String> {
    let secret = match (&cmd.secret, &cmd.secret_file) {
        (_, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("--secret-file {}", f.display()))?
            .trim()
            .to_owned(),
        (Some(s), None) => s.clone(),
        (None, None) => anyhow::bail!("no webhook secret: set JOBMETER_WEBHOOK_SECRET, --secret or --secret-file"),
    };
    if secret.len() < 16 {
        anyhow::bail!("the webhook secret is too short (at least 16 characters)");
    }
    Ok(secret)
}

/// One limit event taken from the topic.
struct Event {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
    id: String,
}

/// How an event's delivery ended.
enum Outcome {
    /// Delivered (logged with its HTTP status).
    Delivered,
    /// Given up after `give_up_after`: why, the last HTTP status, the
    /// number of attempts.
    Undeliverable(String, Option<u16>, u32),
    /// Stopped (shutdown, or the partition went to another member): not
    /// delivered and not committed; whoever holds it next delivers it.
    Interrupted,
}

/// The notifier: a group member on the limits topic, the webhook, the
/// dead-letter producer.
struct Notifier<'a> {
    consumer: BaseConsumer,
    producer: ThreadedProducer<DefaultProducerContext>,
    delivery: Delivery<'a>,
    dlq_topic: String,
    initial: Duration,
    max: Duration,
    give_up: Duration,
    stop: &'a CancellationToken,
}

/// Runs the notifier until SIGTERM/SIGINT.
pub fn main(cmd: NotifyCmd) -> anyhow::Result<()> {
    jobmeter_service::init_tracing();
    if !(cmd.webhook.starts_with("http://") || cmd.webhook.starts_with("https://")) {
        anyhow::bail!("--webhook {:?}: must be an http:// or https:// URL", cmd.webhook);
    }
    let secret = secret_of(&cmd)?;
    // One runtime: its worker serves the signals while the loop below
    // blocks on each request.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        rt.spawn(async move {
            jobmeter_service::signals::shutdown_requested().await;
            tracing::info!("shutdown requested: finishing the current event");
            stop.cancel();
        });
    }
    let cfg = cmd.kafka.load()?;
    let settings = cfg.kafka_settings();
    let topics = jobmeter_kafka::topics::Topics::with_prefix(cmd.topic_prefix.as_deref().unwrap_or(&cfg.topics.prefix));
    let dlq_topic = cmd
        .dlq_topic
        .clone()
        .unwrap_or_else(|| format!("{}-dlq", topics.limits));
    rt.block_on(jobmeter_kafka::topics::create_topic(&settings, &dlq_topic, 1, 1))?;
    let consumer: BaseConsumer = settings
        .group_consumer(&cmd.group, &format!("jobmeter-notify-{}", std::process::id()))
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[&topics.limits]).context("subscribing")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(cmd.request_timeout as u64))
        .user_agent(concat!("jobmeter-notify/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let ms = |v: i64| Duration::from_millis(v as u64);
    let n = Notifier {
        consumer,
        producer: settings.producer().create().context("creating the DLQ producer")?,
        delivery: Delivery {
            client: &client,
            rt: &rt,
            url: &cmd.webhook,
            secret: secret.as_bytes(),
        },
        dlq_topic,
        initial: ms(cmd.initial_backoff),
        max: ms(cmd.max_backoff),
        give_up: ms(cmd.give_up_after),
        stop: &stop,
    };
    tracing::info!(topic = %topics.limits, webhook = %cmd.webhook, dlq = %n.dlq_topic, "delivering limit events");
    n.run()
}

impl Notifier<'_> {
    /// Delivers events until stopped; each is committed once delivered or
    /// dead-lettered.
    fn run(&self) -> anyhow::Result<()> {
        let (mut delivered, mut dead) = (0u64, 0u64);
        while !self.stop.is_cancelled() {
            let Some(ev) = self.next() else { continue };
            match self.deliver(&ev) {
                Outcome::Interrupted => break,
                Outcome::Delivered => delivered += 1,
                Outcome::Undeliverable(reason, status, attempts) => {
                    self.dead_letter(&ev, &reason, status, attempts)?;
                    tracing::error!(event_id = ev.id, attempts, %reason, dlq = %self.dlq_topic, "undeliverable: dead-lettered");
                    dead += 1;
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&ev.topic, ev.partition, Offset::Offset(ev.offset + 1))?;
            self.consumer.commit(&tpl, CommitMode::Sync).context("committing")?;
        }
        tracing::info!(delivered, dead_lettered = dead, "stopped");
        Ok(())
    }

    /// The next event, if one comes within 200 ms.
    fn next(&self) -> Option<Event> {
        let msg = match self.consumer.poll(Duration::from_millis(200))? {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                return None;
            }
        };
        let (topic, partition, offset) = (msg.topic().to_owned(), msg.partition(), msg.offset());
        let payload = msg.payload().unwrap_or_default().to_vec();
        Some(Event {
            id: event_id_of(&payload, &topic, partition, offset),
            key: msg.key().map(<[u8]>::to_vec),
            topic,
            partition,
            offset,
            payload,
        })
    }

    /// Delivers `ev`, retrying with backoff until `give_up_after`. While
    /// retrying, the partition is paused and the consumer polled, so the
    /// group keeps this member and rebalances are served.
    fn deliver(&self, ev: &Event) -> Outcome {
        let first = Instant::now();
        let mut paused = false;
        let mut attempts = 0u32;
        let outcome = loop {
            attempts += 1;
            let (reason, status) = match self.delivery.attempt(&ev.id, &ev.payload) {
                Attempt::Delivered(status) => {
                    tracing::info!(event_id = ev.id, attempts, status, "delivered");
                    break Outcome::Delivered;
                }
                Attempt::Failed(reason, status) => (reason, status),
            };
            if first.elapsed() >= self.give_up {
                break Outcome::Undeliverable(reason, status, attempts);
            }
            let wait = backoff(attempts, self.initial, self.max, ev.offset as u64 ^ u64::from(attempts));
            tracing::warn!(event_id = ev.id, attempts, %reason, retry_in_ms = wait.as_millis() as u64, "delivery failed");
            if !paused {
                let _ = self.consumer.assignment().map(|a| self.consumer.pause(&a));
                paused = true;
            }
            let until = Instant::now() + wait.min(self.give_up.saturating_sub(first.elapsed()));
            while Instant::now() < until && !self.stop.is_cancelled() {
                let _ = self.consumer.poll(Duration::from_millis(50));
            }
            let still_ours = self
                .consumer
                .assignment()
                .map(|a| a.find_partition(&ev.topic, ev.partition).is_some())
                .unwrap_or(false);
            if self.stop.is_cancelled() || !still_ours {
                break Outcome::Interrupted;
            }
        };
        if paused {
            let _ = self.consumer.assignment().map(|a| self.consumer.resume(&a));
        }
        outcome
    }

    /// Writes `ev` to the dead-letter topic in the meter's layout (reason,
    /// detail, source topic/partition/offset), plus what the delivery
    /// tried: the last HTTP status and the number of attempts.
    fn dead_letter(&self, ev: &Event, reason: &str, status: Option<u16>, attempts: u32) -> anyhow::Result<()> {
        let last_status = status.map(|s| s.to_string()).unwrap_or_default();
        let attempts = attempts.to_string();
        let headers = jobmeter_kafka::dlq::headers("webhook_undeliverable", reason, &ev.topic, ev.partition, ev.offset)
            .insert(Header {
                key: "jobmeter.last_status",
                value: Some(last_status.as_str()),
            })
            .insert(Header {
                key: "jobmeter.attempts",
                value: Some(attempts.as_str()),
            });
        let mut rec = BaseRecord::to(&self.dlq_topic).payload(&ev.payload).headers(headers);
        if let Some(k) = &ev.key {
            rec = rec.key(k);
        }
        self.producer.send(rec).map_err(|(e, _)| e).context("dead-lettering")?;
        self.producer.flush(Duration::from_secs(30)).context("dead-lettering")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // RFC 4231 test case 2 shape: key "Jefe", message as given.
        let s = signature(b"Jefe", 0, b"what do ya want for nothing?");
        assert!(s.starts_with("v1="));
        assert_eq!(s.len(), 3 + 64);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap_or_else(|_| panic!("key"));
        mac.update(b"0.what do ya want for nothing?");
        let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("v1={want}"));
        assert_ne!(
            signature(b"Jefe", 1, b"x"),
            signature(b"Jefe", 2, b"x"),
            "the timestamp is signed"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (1..8).map(|a| backoff(a, i, m, 0)).collect();
        assert_eq!(d[0], Duration::from_millis(100));
        assert_eq!(d[1], Duration::from_millis(200));
        assert_eq!(d[6], Duration::from_secs(2));
        for a in 1..30 {
            let j = backoff(a, i, m, a as u64 * 7919);
            assert!(j <= m && j >= Duration::from_millis(80), "{a}: {j:?}");
        }
    }

    #[test]
    fn event_ids_come_from_the_event() {
        assert_eq!(
            event_id_of(br#"{"event_id":"a/free_credits/lifetime/80"}"#, "t", 0, 5),
            "a/free_credits/lifetime/80"
        );
        assert_eq!(event_id_of(b"not json", "t", 1, 5), "t/1/5");
    }
}
