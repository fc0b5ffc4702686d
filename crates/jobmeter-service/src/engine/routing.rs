//! Which partition meters a record, and what happens to one that arrived
//! elsewhere: applied to its account's partition here, or forwarded to the
//! instance that holds it.

use super::committer::OutRecord;
use super::{Engine, Reroute};
use jobmeter_core::order::MergeKey;
use jobmeter_kafka::repartition::{Lane, Marker};
use jobmeter_kafka::txn::TAG_OUTPUT;
use rdkafka::message::Message;
use std::time::{Duration, Instant};

impl Engine {
    /// The partition that meters `ev`'s account.
    pub(super) fn owner(&self, ev: &jobmeter_core::JobEvent) -> i32 {
        jobmeter_kafka::partitioner::partition_for_key(ev.account.as_str().as_bytes(), self.cfg.input_partitions)
    }

    /// The meter that applies an input record of partition `arrival` here:
    /// its account's partition when this pipeline holds it, `None` when it
    /// is forwarded to another's; a record that is not an event, where it
    /// arrived (it is dead-lettered there).
    pub fn dest(&self, arrival: i32, parsed: Option<&jobmeter_core::JobEvent>) -> Option<i32> {
        let p = parsed.map_or(arrival, |ev| self.owner(ev));
        self.assigned.contains(&p).then_some(p)
    }

    /// The smallest merge key the next record of input partition `p` can
    /// have (`None` when `p` is not metered here).
    pub fn input_bound(&self, p: i32) -> Option<(i64, i32)> {
        self.meters
            .get(&p)
            .map(|pm| MergeKey::bound(pm.meter.input_watermark(), p))
    }

    /// The lane of `p` (created at assignment; `offset` is where a lane
    /// that is somehow missing starts).
    pub(super) fn lane(&mut self, p: i32, offset: i64) -> &mut Lane {
        self.lanes.entry(p).or_insert_with(|| Lane::new(offset))
    }

    /// Counts an event that arrived on another partition than its
    /// account's, and says so in the log (at most once a minute per cause).
    pub(super) fn note_rerouted<M: Message>(&mut self, msg: &M, ev: &jobmeter_core::JobEvent, owner: i32) {
        let account = ev.account.as_str().as_bytes();
        let cause = match msg.key() {
            None => Reroute::Keyless,
            Some(k) if k == account => Reroute::Partitioner,
            Some(_) => Reroute::KeyNotAccount,
        };
        self.rerouted_by_cause[cause as usize] += 1;
        let logged = &mut self.reroute_logged[cause as usize];
        if logged.is_some_and(|t| t.elapsed() < REROUTE_LOG_EVERY) {
            return;
        }
        *logged = Some(Instant::now());
        #[derive(serde::Deserialize)]
        struct Source<'a> {
            #[serde(borrow)]
            source: Option<std::borrow::Cow<'a, str>>,
        }
        let source = serde_json::from_slice::<Source<'_>>(msg.payload().unwrap_or_default())
            .ok()
            .and_then(|s| s.source.map(|s| s.into_owned()))
            .unwrap_or_default();
        tracing::warn!(
            source = %source,
            cause = cause.as_str(),
            partition = msg.partition(),
            owner,
            account = %ev.account,
            key = %String::from_utf8_lossy(msg.key().unwrap_or_default()),
            "events arrive on a partition other than their account's (Kafka's murmur2 of data.account_id); each is metered by its account's partition, so nothing is lost or doubled, but the producer should key records by account_id with the murmur2 partitioner to spare the detour (logged at most once a minute per cause; see jobmeter_events_rerouted_total)"
        );
    }

    /// Forwards an input record unchanged to the repartition partition of
    /// the partition that meters its account (same transaction as its
    /// input offset, so exactly once), keeping its timestamp and naming
    /// where it came from in headers.
    pub(super) fn forward<M: Message>(
        &mut self,
        msg: &M,
        ev: &jobmeter_core::JobEvent,
        owner: i32,
        watermark: Option<jobmeter_core::Timestamp>,
    ) {
        let headers = jobmeter_kafka::repartition::forward_headers(
            msg.headers(),
            &self.input_topic,
            msg.partition(),
            msg.offset(),
            watermark.map(|w| w.0),
        );
        self.records.push(OutRecord {
            topic: self.cfg.topics.repartition.clone(),
            key: ev.account.as_str().as_bytes().to_vec(),
            payload: Some(msg.payload().unwrap_or_default().to_vec()),
            headers: Some(headers),
            partition: Some(owner),
            timestamp_ms: msg.timestamp().to_millis(),
            tag: TAG_OUTPUT,
        });
    }

    /// Adds a progress record for meter `p` (held elsewhere) to the open
    /// batch.
    pub(super) fn push_progress_record(&mut self, p: i32, pr: &jobmeter_kafka::repartition::Progress) {
        self.records.push(OutRecord {
            topic: self.cfg.topics.repartition.clone(),
            key: Vec::new(),
            payload: Some(pr.encode()),
            headers: Some(jobmeter_kafka::repartition::Progress::headers()),
            partition: Some(p),
            timestamp_ms: None,
            tag: TAG_OUTPUT,
        });
    }

    /// Adds partition `p`'s marker to the open batch.
    pub(super) fn push_marker(&mut self, p: i32, m: Marker) {
        self.records.push(OutRecord {
            topic: self.cfg.topics.repartition.clone(),
            key: Vec::new(),
            payload: Some(m.encode()),
            headers: Some(Marker::headers()),
            partition: Some(p),
            timestamp_ms: None,
            tag: TAG_OUTPUT,
        });
    }
}

/// How often the warning about forwarded records is logged, per cause.
pub(super) const REROUTE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Which partition meters an input record that arrived on `arrival`: its
/// account's (Kafka's murmur2 of `data.account_id` over `partitions`), or
/// `arrival` itself for a record that is not a valid event (it is
/// dead-lettered where it arrived). Returns the event when it parsed.
pub fn route(payload: &[u8], arrival: i32, partitions: i32) -> (i32, Option<jobmeter_core::JobEvent>) {
    match jobmeter_core::parse_job_event(payload) {
        Ok(ev) => (
            jobmeter_kafka::partitioner::partition_for_key(ev.account.as_str().as_bytes(), partitions),
            Some(ev),
        ),
        Err(_) => (arrival, None),
    }
}
