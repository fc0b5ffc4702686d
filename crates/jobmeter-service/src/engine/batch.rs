//! The open batch: outputs encoded as records, the state changes and
//! offsets gathered, and the hand-over to the committer.

use super::committer::{Batch, OutRecord};
use super::{Engine, EngineError};
use jobmeter_core::state::StateChange;
use jobmeter_core::Output;
use jobmeter_kafka::repartition::Marker;
use jobmeter_kafka::txn::TAG_OUTPUT;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use std::time::Instant;

/// How far a batch grows past `batch.max_events` while the committer is
/// busy with the previous one.
pub(super) const BATCH_GROWTH: usize = 8;

/// The oldest a batch grows to while the committer is busy.
pub(super) const GROWTH_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Engine {
    pub(super) fn produce_output(&mut self, o: Output, input_key: Option<&[u8]>) -> Result<(), EngineError> {
        let t = &self.cfg.topics;
        let json = |v: &dyn erased::Json| v.to_vec();
        let rec = |topic: &str, key: &[u8], payload: Vec<u8>| OutRecord {
            topic: topic.to_owned(),
            key: key.to_vec(),
            payload: Some(payload),
            headers: None,
            partition: None,
            timestamp_ms: None,
            tag: TAG_OUTPUT,
        };
        let r = match o {
            Output::Charge(c) => {
                if let Some(i) = jobmeter_core::JobKind::ALL.iter().position(|k| c.kind == *k) {
                    self.charges_by_kind[i] += 1;
                }
                rec(&t.charges, c.account_id.as_str().as_bytes(), json(&c)?)
            }
            Output::Limit(l) => {
                let threshold = match (l.threshold_pct, l.horizon_seconds) {
                    (Some(p), _) => p.to_string(),
                    (None, Some(_)) => "runway".to_owned(),
                    (None, None) => "amount".to_owned(),
                };
                *self.limits_by_label.entry((l.limit.as_str(), threshold)).or_default() += 1;
                rec(&t.limits, l.account_id.as_str().as_bytes(), json(&l)?)
            }
            Output::Statement(st) => rec(&t.statements, st.account_id.as_str().as_bytes(), json(&st)?),
            Output::Command(c) => rec(&t.commands, c.account_id.as_str().as_bytes(), json(&c)?),
            Output::Reject(r) => {
                let (topic, partition, offset) = r
                    .origin
                    .as_ref()
                    .map_or((t.job_events.as_str(), -1, -1), |o| (&*o.topic, o.partition, o.offset));
                let headers = jobmeter_kafka::dlq::headers(r.reason.as_str(), &r.detail, topic, partition, offset);
                OutRecord {
                    headers: Some(headers),
                    ..rec(&t.dlq, input_key.unwrap_or_default(), r.raw)
                }
            }
        };
        self.records.push(r);
        Ok(())
    }

    /// True when the open batch should be committed: it has
    /// `batch.max_events` events or is `batch.interval` old, and the
    /// committer is free to take it. While the committer is still busy
    /// with the previous batch (a backlog), the batch keeps growing instead
    /// of waiting — fewer, larger transactions, and state written once per
    /// key per batch — up to `BATCH_GROWTH` times `batch.max_events` or
    /// `GROWTH_MAX_AGE`; then it is handed over as before, waiting for
    /// the committer (which is where a commit that hangs is detected).
    pub fn batch_due(&self) -> bool {
        if self.batch_events == 0 {
            // Nothing applied, but other instances wait for word of this
            // one's inputs.
            return self.progress_due() && !self.committer.busy();
        }
        let age = self.batch_started.elapsed();
        let due = self.batch_events >= self.cfg.batch_max_events || age >= self.cfg.batch_interval;
        let grown = self.batch_events >= self.cfg.batch_max_events.saturating_mul(BATCH_GROWTH)
            || age >= GROWTH_MAX_AGE.max(self.cfg.batch_interval);
        grown || (due && !self.committer.busy())
    }

    /// Hands the open batch to the committer, which commits it while the
    /// pipeline goes on with the next one. Waits while the committer is
    /// still busy with the previous batch (at most one batch in commit and
    /// one being built). Returns an earlier batch's commit failure.
    pub fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<(), EngineError> {
        self.commit_with(|| consumer.group_metadata())
    }

    /// [`Engine::commit`] with the group's metadata (the generation the
    /// offsets are committed under) given by `group`.
    pub(super) fn commit_with(
        &mut self,
        group: impl FnOnce() -> Option<rdkafka::consumer::ConsumerGroupMetadata>,
    ) -> Result<(), EngineError> {
        self.committer.check()?;
        if self.batch_events == 0 && !self.progress_due() {
            return Ok(());
        }
        self.push_progress();
        let markers: Vec<(i32, Marker)> = self
            .lanes
            .iter_mut()
            .filter_map(|(p, lane)| lane.take_marker().map(|m| (*p, m)))
            .collect();
        for (p, m) in markers {
            self.push_marker(p, m);
        }
        // A record of one partition may change another's meter: take the
        // changes of every meter (untouched ones have none).
        let mut changes: Vec<(i32, Vec<StateChange>)> = Vec::new();
        let mut stats = Vec::new();
        let mut parts: Vec<i32> = self.meters.keys().copied().collect();
        parts.sort_unstable();
        for p in parts {
            let Some(pm) = self.meters.get_mut(&p) else { continue };
            let ch = pm.meter.take_changes()?;
            if ch.is_empty() && pm.meter.stats() == &pm.reported {
                continue;
            }
            changes.push((p, ch));
            let now = pm.meter.stats().clone();
            stats.push((
                p,
                std::mem::replace(&mut pm.reported, now.clone()),
                now,
                pm.meter.open_jobs(),
            ));
        }
        let group = group().ok_or(EngineError::NoGroup)?;
        let mut offsets: Vec<(String, i32, i64)> = Vec::new();
        for (p, o) in std::mem::take(&mut self.next_offsets) {
            offsets.push((self.cfg.topics.job_events.clone(), p, o));
        }
        let mut rp = std::mem::take(&mut self.next_rp_offsets);
        // Forwarded records are applied in the merge order: commit the
        // oldest one still waiting (those after it that were applied are
        // skipped by their source offset when read again).
        for p in self.meters.keys() {
            if let Some(o) = self.rp_commit_offset(*p) {
                rp.insert(*p, o);
            }
        }
        for (p, o) in rp {
            offsets.push((self.cfg.topics.repartition.clone(), p, o));
        }
        let batch = Batch {
            records: std::mem::take(&mut self.records),
            changes,
            offsets,
            group,
            events: self.batch_events,
            stats,
            charges_by_kind: std::mem::take(&mut self.charges_by_kind),
            rerouted_by_cause: std::mem::take(&mut self.rerouted_by_cause),
            limits_by_label: std::mem::take(&mut self.limits_by_label),
        };
        self.batch_events = 0;
        let t = Instant::now();
        let r = self.committer.submit(batch);
        if r.is_ok() {
            // The committer took this batch, so it is done with the one
            // before: what that one wrote is durable (a failure of it
            // tears the pipeline down before any later batch commits).
            for pm in self.meters.values_mut() {
                pm.meter.release_stored();
            }
        }
        self.metrics
            .commit
            .commit_seconds
            .with_label_values(&["handover"])
            .observe(t.elapsed().as_secs_f64());
        r
    }

    /// Commits the open batch and waits until every batch handed over is
    /// committed (shutdown, revoke).
    pub fn commit_and_wait<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<(), EngineError> {
        self.commit_and_wait_with(|| consumer.group_metadata())
    }

    /// [`Engine::commit_and_wait`] with the group's metadata given by `group`.
    pub(super) fn commit_and_wait_with(
        &mut self,
        group: impl FnOnce() -> Option<rdkafka::consumer::ConsumerGroupMetadata>,
    ) -> Result<(), EngineError> {
        self.commit_with(group)?;
        self.committer.wait()?;
        for pm in self.meters.values_mut() {
            pm.meter.release_all_stored();
        }
        Ok(())
    }

    /// Drops the open batch (its transaction was never begun; a failed
    /// commit is aborted by the committer).
    pub fn abort(&mut self) {
        self.records.clear();
        self.limits_by_label.clear();
        self.charges_by_kind = [0; 3];
        self.rerouted_by_cause = [0; 3];
        self.next_offsets.clear();
        self.next_rp_offsets.clear();
        self.batch_events = 0;
    }
}

/// JSON encoding of outputs without naming each type.
pub(super) mod erased {
    pub(super) trait Json {
        fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}
