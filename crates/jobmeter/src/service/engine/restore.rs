//! Restoring a partition: RocksDB, then the changelog after the offset
//! RocksDB reflects. A partition whose stored state cannot be decoded is
//! set aside (failing) while the others go on.

use super::{Engine, EngineError, PartitionMeter};
use jobmeter_core::state::{StateChange, Table};
use jobmeter_core::Meter;
use jobmeter_kafka::reader::read_to_end;
use std::collections::BTreeMap;
use std::time::Instant;

impl Engine {
    /// Stored state of `p` cannot be read back: only `p` stops. Its
    /// records are skipped without advancing its offsets, so nothing is
    /// lost; every other partition goes on metering.
    pub(super) fn fail_partition(&mut self, p: i32, e: &jobmeter_core::state::DecodeError) {
        tracing::error!(
            partition = p,
            table = e.table,
            key = %e.key,
            error = %e,
            "partition stopped: its stored state cannot be decoded; every other partition goes on. Recover with `jobmeter rebuild`, then restart"
        );
        self.metrics
            .partition_failed
            .with_label_values(&[&p.to_string()])
            .set(1);
        self.failing_write().insert(p, e.to_string());
        self.newly_failed.push(p);
    }

    /// Restores every partition assigned and not yet restored.
    pub fn restore_pending(&mut self) -> Result<(), EngineError> {
        while let Some(p) = self.to_restore.pop_first() {
            if let Err(e) = self.restore(p) {
                self.to_restore.insert(p);
                return Err(e);
            }
        }
        self.metrics.set_ready(self.ready());
        Ok(())
    }

    /// Loads a partition's state, or marks it failing when a stored record
    /// cannot be decoded (other errors, such as Kafka's, stop the pipeline,
    /// which is then rebuilt and retries).
    pub(super) fn restore(&mut self, p: i32) -> Result<(), EngineError> {
        match self.load_partition(p) {
            Err(EngineError::State(e)) => {
                self.fail_partition(p, &e);
                Ok(())
            }
            r => r,
        }
    }

    /// RocksDB, then the changelog after the offset RocksDB reflects.
    pub(super) fn load_partition(&mut self, p: i32) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let mut st = self.store.load(p)?;
        let now_ms = jobmeter_core::Timestamp::now().0;
        if st
            .written_at_ms
            .is_some_and(|w| now_ms - w > self.cfg.max_local_age.as_millis() as i64)
        {
            tracing::warn!(
                partition = p,
                "local state is older than state.max_local_age; restoring from the changelog in full"
            );
            self.store.drop_partition(p)?;
            st = Default::default();
        }
        let from_store = st.records.len();
        let mut up = CatchUp::new(st);
        let n = read_to_end(
            &self.cfg.settings,
            &format!("{}-restore-{p}", self.cfg.instance_id),
            &self.cfg.topics.changelog,
            &[(p, up.from)],
            self.cfg.restore_deadline,
            |rec| up.record(rec),
        )?;
        if n > 0 {
            self.store.commit(p, &up.replayed, up.last)?;
        }
        let meter = Meter::restore(up.map.into_iter().map(|((t, k), v)| (t, k, v)), &self.cfg.meter)?;
        let secs = t0.elapsed().as_secs_f64();
        self.metrics.restore_seconds.observe(secs);
        self.metrics.restored_records.inc_by(n);
        self.metrics
            .open_jobs
            .with_label_values(&[&p.to_string()])
            .set(meter.open_jobs() as i64);
        tracing::info!(
            partition = p,
            from_store,
            changelog_records = n,
            seconds = secs,
            "partition restored"
        );
        let reported = meter.stats().clone();
        self.meters.insert(p, PartitionMeter { meter, reported });
        self.owned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(p);
        Ok(())
    }
}

/// A partition's state on restart: what the store holds, caught up with
/// the changelog records after the offset it reflects (the step after the
/// commit that a crash may have cut off).
pub(crate) struct CatchUp {
    /// The state, by (table, key).
    pub(crate) map: StateMap,
    /// The changelog offset to read from (`None`: the beginning).
    pub(crate) from: Option<i64>,
    /// The changelog records applied, as state changes for the store.
    pub(crate) replayed: Vec<StateChange>,
    /// The last changelog offset the state reflects.
    pub(crate) last: Option<i64>,
}

impl CatchUp {
    /// Starts from what the store holds.
    pub(crate) fn new(stored: jobmeter_store::PartitionState) -> CatchUp {
        CatchUp {
            from: stored.changelog_offset.map(|o| o + 1),
            last: stored.changelog_offset,
            map: stored.records.into_iter().map(|(t, k, v)| ((t, k), v)).collect(),
            replayed: Vec::new(),
        }
    }

    /// Applies the next changelog record.
    pub(crate) fn record(&mut self, rec: jobmeter_kafka::reader::Record) {
        self.last = Some(rec.offset);
        self.replayed.extend(overlay(&mut self.map, rec));
    }
}

/// State records by (table, key), as restored.
pub(crate) type StateMap = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// Applies one changelog record to `map` (an upsert, or a delete for a
/// tombstone) and returns it as a state change; `None` for a malformed key.
pub(crate) fn overlay(map: &mut StateMap, rec: jobmeter_kafka::reader::Record) -> Option<StateChange> {
    let key = rec.key?;
    let (table, k) = jobmeter_kafka::changelog::split(&key)?;
    let entry = (table, k.to_vec());
    match &rec.value {
        Some(v) => {
            map.insert(entry, v.clone());
        }
        None => {
            map.remove(&entry);
        }
    }
    Some(StateChange {
        table,
        key: k.to_vec(),
        value: rec.value,
    })
}
