//! Restoring a partition: the changelog after the offset RocksDB reflects
//! is written into RocksDB (in chunks, each with the offset it reaches, so
//! memory stays flat and an interrupted restore resumes), then the meter
//! is built from RocksDB — with `state.finished_jobs = "store"`, from its
//! open jobs only. A partition whose stored state cannot be decoded is set
//! aside (failing) while the others go on.

use super::{Engine, EngineError, PartitionMeter};
use jobmeter_core::state::{StateChange, Table};
use jobmeter_core::Meter;
use jobmeter_kafka::reader::Reader;
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
        self.stop_partition(p, e.to_string());
    }

    /// The configured cadence schedule would re-cut billing periods of
    /// partition `p` that are already billed or open: `p` is not metered
    /// (as [`Engine::fail_partition`]) until the configuration is put right
    /// and the meter restarted. Every conflict is logged.
    fn refuse_schedule(&mut self, p: i32, conflicts: &[String]) {
        for c in conflicts {
            tracing::error!(partition = p, conflict = %c, "billing_cycle refused");
        }
        tracing::error!(
            partition = p,
            conflicts = conflicts.len(),
            "partition stopped: the configured billing_cycle would re-cut billing periods already billed or open (see the conflicts above); every other partition goes on. Put the schedule back or date the change later, then restart"
        );
        let first = conflicts.first().cloned().unwrap_or_default();
        self.stop_partition(p, format!("billing_cycle refused: {first}"));
    }

    fn stop_partition(&mut self, p: i32, reason: String) {
        self.metrics
            .state
            .partition_failed
            .with_label_values(&[&p.to_string()])
            .set(1);
        self.failing_write().insert(p, reason);
        self.newly_failed.push(p);
    }

    /// Restores every partition assigned and not yet restored, several at
    /// a time when the machine has the cores: each reads its own store
    /// records and changelog with its own reader.
    pub fn restore_pending(&mut self) -> Result<(), EngineError> {
        if self.to_restore.is_empty() {
            // Called on every turn of the poll loop: nothing to start.
            self.metrics.set_ready(self.ready());
            return Ok(());
        }
        let pending: Vec<i32> = std::mem::take(&mut self.to_restore).into_iter().collect();
        let workers = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_RESTORE_WORKERS)
            .min(pending.len())
            .max(1);
        let loader = self.loader();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut loaded: Vec<(i32, Result<Loaded, EngineError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        // One reader client for all of this worker's
                        // partitions (set up when the first needs it).
                        let mut reader = None;
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&p) = pending.get(i) else { break };
                            out.push((p, loader.load(p, &mut reader)));
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![(-1, Err(EngineError::RestorePanicked))])
                })
                .collect()
        });
        loaded.sort_by_key(|(p, _)| *p);
        let mut first_err = None;
        for (p, r) in loaded {
            match r.and_then(|l| self.install(p, l)) {
                Ok(()) => {}
                Err(EngineError::State(e)) => self.fail_partition(p, &e),
                Err(e) => {
                    // Retried by the rebuilt pipeline, with the others
                    // that failed.
                    if p >= 0 {
                        self.to_restore.insert(p);
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        self.metrics.set_ready(self.ready());
        Ok(())
    }

    /// Stored state of `p` cannot be read back: only `p` stops; other
    /// errors stop the pipeline, which is then rebuilt and retries.
    pub(super) fn restore(&mut self, p: i32) -> Result<(), EngineError> {
        match self.loader().load(p, &mut None).and_then(|l| self.install(p, l)) {
            Ok(()) => Ok(()),
            Err(EngineError::State(e)) => {
                self.fail_partition(p, &e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn loader(&self) -> Loader {
        Loader {
            store: self.store.clone(),
            settings: self.cfg.settings.clone(),
            changelog: self.cfg.topics.changelog.clone(),
            instance_id: self.cfg.instance_id.clone(),
            deadline: self.cfg.restore_deadline,
            max_local_age: self.cfg.max_local_age,
            meter: self.cfg.meter.clone(),
            archive: self.cfg.archive,
            accounts: self.billing.accounts.clone(),
            accounts_topic: self.cfg.topics.accounts_by_partition.clone(),
        }
    }

    /// Makes a loaded partition's meter live, once the configured cadence
    /// schedule is found to leave its billed and open periods as they are.
    fn install(&mut self, p: i32, l: Loaded) -> Result<(), EngineError> {
        self.metrics.state.restore_seconds.observe(l.seconds);
        self.metrics.state.restored_records.inc_by(l.changelog_records);
        self.metrics
            .billing
            .open_jobs
            .with_label_values(&[&p.to_string()])
            .set(l.meter.open_jobs() as i64);
        tracing::info!(
            partition = p,
            from_store = l.from_store,
            changelog_records = l.changelog_records,
            seconds = l.seconds,
            write_seconds = l.write_seconds,
            load_seconds = l.load_seconds,
            "partition restored"
        );
        let conflicts = {
            let book: &dyn jobmeter_core::Accounts = &*self.billing.accounts;
            let ctx = jobmeter_core::Context::new(&self.billing.rates, &self.billing.plans, book, &self.cfg.meter);
            l.meter.schedule_conflicts(&ctx)?
        };
        if !conflicts.is_empty() {
            self.refuse_schedule(p, &conflicts);
            return Ok(());
        }
        let reported = l.meter.stats().clone();
        let sources = l.meter.merge_sources().map(<[u8]>::to_vec);
        self.load_sources(p, sources.as_deref());
        // Records are applied in the merge order, and the partition's
        // state says so from its next commit (`jobmeter rebuild` reads it).
        let mut meter = l.meter;
        meter.set_merge_order();
        // The schedule it is billed by from now on (checked above, and
        // against which the next start checks).
        meter.set_billed_schedule(&self.billing.plans.billing_cycle);
        self.meters.insert(p, PartitionMeter { meter, reported });
        self.owned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(p);
        Ok(())
    }
}

/// The most partitions one pipeline restores at once.
const MAX_RESTORE_WORKERS: usize = 8;

/// What restoring a partition needs, apart from the engine.
struct Loader {
    store: std::sync::Arc<jobmeter_store::Store>,
    settings: jobmeter_kafka::client::KafkaSettings,
    changelog: String,
    instance_id: String,
    deadline: std::time::Duration,
    max_local_age: std::time::Duration,
    meter: jobmeter_core::MeterConfig,
    archive: bool,
    accounts: std::sync::Arc<crate::accounts::StoredAccounts>,
    accounts_topic: String,
}

/// How many changelog records a restore holds before it writes them.
const RESTORE_CHUNK: usize = 50_000;

/// A partition's restored meter.
struct Loaded {
    meter: Meter,
    from_store: usize,
    changelog_records: u64,
    seconds: f64,
    /// Of `seconds`: writing the changelog into RocksDB, and building the
    /// meter from RocksDB.
    write_seconds: f64,
    load_seconds: f64,
}

impl Loader {
    /// The changelog after the offset RocksDB reflects, into RocksDB; then
    /// the meter from RocksDB. Restores partition `p`, reading the
    /// changelog with `reader` (created on first use).
    fn load(&self, p: i32, reader: &mut Option<Reader>) -> Result<Loaded, EngineError> {
        let t0 = Instant::now();
        if let Some(why) = self.store.corrupt(p)? {
            return Err(EngineError::State(jobmeter_core::state::DecodeError {
                table: Table::Jobs.name(),
                key: String::new(),
                why: format!("found while metering: {why}"),
            }));
        }
        let progress = stored_progress(&self.store, p, self.max_local_age)?;
        // Nothing stored: the (empty) indexes are complete, and the restore
        // keeps them so.
        let fresh = self.store.holds_nothing(p)?;
        if self.archive && fresh {
            self.store.set_index_complete(p, true)?;
        }
        // Jobs this restore listed as open, when the store had none before
        // (otherwise any job may have an entry to delete).
        let mut listed = fresh.then(std::collections::HashSet::new);
        let indexed = self.archive && self.store.index_complete(p)?;
        let mut up = CatchUp::new(jobmeter_store::PartitionState {
            changelog_offset: progress.map(|x| x.0),
            ..Default::default()
        });
        let reader = match reader {
            Some(r) => r,
            None => reader.insert(Reader::new(&self.settings, &format!("{}-restore", self.instance_id))?),
        };
        // The partition's account records first: its meter must not rate
        // usage before the records that govern it.
        let accounts = crate::accounts::catch_up(&self.accounts, reader, &self.accounts_topic, p, self.deadline)?;
        if accounts > 0 {
            tracing::info!(
                partition = p,
                records = accounts,
                "account records of the partition caught up"
            );
        }
        let mut failed = None;
        let mut writing = std::time::Duration::ZERO;
        let n = reader.read_to_end(&self.changelog, &[(p, up.from)], self.deadline, |rec| {
            up.record(rec);
            if up.pending() >= RESTORE_CHUNK && failed.is_none() {
                let t = Instant::now();
                failed = write_caught_up(&self.store, p, &mut up, indexed, &mut listed).err();
                writing += t.elapsed();
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if n > 0 {
            let t = Instant::now();
            write_caught_up(&self.store, p, &mut up, indexed, &mut listed)?;
            writing += t.elapsed();
        }
        let t_load = Instant::now();
        self.settle_indexes(p, indexed)?;
        let st = self.store.load_meter_state(p, self.archive)?;
        let from_store = st.records.len();
        let mut meter = Meter::restore(st.records, &self.meter)?;
        if self.archive {
            meter = meter.with_archive(Box::new(jobmeter_store::Archive::new(self.store.clone(), p)));
        }
        Ok(Loaded {
            meter,
            from_store,
            changelog_records: n,
            seconds: t0.elapsed().as_secs_f64(),
            write_seconds: writing.as_secs_f64(),
            load_seconds: t_load.elapsed().as_secs_f64(),
        })
    }

    /// The finished-jobs indexes of `p` once its changelog is in: built
    /// (once) for a meter that keeps finished jobs in the store and finds
    /// them incomplete; marked incomplete by a meter that does not keep
    /// them, so that a later one that does builds them again.
    fn settle_indexes(&self, p: i32, indexed: bool) -> Result<(), EngineError> {
        if self.archive && !indexed {
            let t = Instant::now();
            let jobs = self.store.build_index(p).map_err(|e| match e {
                jobmeter_store::StoreError::Decode(d) => EngineError::State(d),
                e => EngineError::Store(e),
            })?;
            tracing::info!(
                partition = p,
                jobs,
                seconds = t.elapsed().as_secs_f64(),
                "indexed the partition's finished jobs in the store (once)"
            );
        } else if !self.archive {
            self.store.set_index_complete(p, false)?;
        }
        Ok(())
    }
}

/// The changelog offset a restore of `p` starts after (`None`: the
/// beginning), and when it was written: what the store holds, unless that
/// is older than `max_local_age` or a bulk load cut off, which are
/// dropped.
fn stored_progress(
    store: &jobmeter_store::Store,
    p: i32,
    max_local_age: std::time::Duration,
) -> Result<Option<(i64, i64)>, EngineError> {
    let progress = store.progress(p)?;
    let now_ms = jobmeter_core::Timestamp::now().0;
    let why = if progress.is_some_and(|(_, written)| now_ms - written > max_local_age.as_millis() as i64) {
        "local state is older than state.max_local_age; restoring from the changelog in full"
    } else if store.bulk_load_cut_off(p)? {
        "an earlier restore of this partition was cut off while loading table files; restoring from the changelog in full"
    } else {
        return Ok(progress);
    };
    tracing::warn!(partition = p, "{why}");
    store.drop_partition(p)?;
    Ok(None)
}

/// Writes the changelog records read so far into RocksDB, with the
/// offset they reach, and (`indexed`) the index entries of the jobs
/// they change. `listed`: the jobs listed as open so far, when only
/// this restore has listed any.
pub(crate) fn write_caught_up(
    store: &jobmeter_store::Store,
    p: i32,
    up: &mut CatchUp,
    indexed: bool,
    listed: &mut Option<std::collections::HashSet<Vec<u8>>>,
) -> Result<(), EngineError> {
    let mut changes = caught_up_changes(store, p, up, indexed, listed)?;
    if listed.is_some() {
        // Nothing but this restore has written the partition: its changes
        // go in as table files, not through the memtable and its log.
        store.ingest(p, &changes, up.last)?;
    } else {
        // In key order (the changes are; their index entries follow): the
        // memtable inserts a key after the last one faster than anywhere.
        changes.sort_by(|a, b| (a.table, &a.key).cmp(&(b.table, &b.key)));
        store.commit(p, &changes, up.last)?;
    }
    Ok(())
}

/// What [`write_caught_up`] writes: the changes of the records read so
/// far, and (`indexed`) their index entries.
fn caught_up_changes(
    store: &jobmeter_store::Store,
    p: i32,
    up: &mut CatchUp,
    indexed: bool,
    listed: &mut Option<std::collections::HashSet<Vec<u8>>>,
) -> Result<Vec<StateChange>, EngineError> {
    let mut changes = up.changes();
    up.map.clear();
    if indexed {
        let mut index = Vec::new();
        for c in changes.iter().filter(|c| c.table == Table::Jobs) {
            let Some(jk) = jobmeter_core::state::keys::decode_job(&c.key) else {
                continue;
            };
            let decode = |v: &[u8]| {
                jobmeter_core::values::decode::<jobmeter_core::state::Job>(Table::Jobs, v).map_err(|e| e.at_key(&c.key))
            };
            match &c.value {
                Some(v) => {
                    let job = decode(v)?;
                    let open = job.expires.is_none();
                    // An open job is listed once; a finished one's entry
                    // is deleted when it may have one.
                    let (write, was_listed) = match (open, listed.as_mut()) {
                        (true, Some(l)) => (l.insert(c.key.clone()), false),
                        (false, Some(l)) => (true, l.remove(&c.key)),
                        (_, None) => (true, true),
                    };
                    if write {
                        jobmeter_core::archive::index_changes(&jk, &job, open, was_listed, &mut index);
                    }
                }
                None => {
                    if let Some(l) = listed.as_mut() {
                        l.remove(&c.key);
                    }
                    if let Some(old) = store.get(p, Table::Jobs, &c.key)? {
                        jobmeter_core::archive::unindex_changes(&jk, &decode(&old)?, &mut index);
                    }
                }
            }
        }
        changes.append(&mut index);
    }
    Ok(changes)
}

/// A partition's state on restart: what the store holds, caught up with
/// the changelog records after the offset it reflects (the step after the
/// commit that a crash may have cut off).
pub(crate) struct CatchUp {
    /// The state, by (table, key).
    pub(crate) map: StateMap,
    /// The changelog offset to read from (`None`: the beginning).
    pub(crate) from: Option<i64>,
    /// Keys the replayed changelog records touched (in changelog order,
    /// repeated when a key changed more than once).
    touched: Vec<(Table, Vec<u8>)>,
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
            touched: Vec::new(),
        }
    }

    /// Changelog records applied since the last [`CatchUp::changes`].
    pub(crate) fn pending(&self) -> usize {
        self.touched.len()
    }

    /// Applies the next changelog record.
    pub(crate) fn record(&mut self, rec: jobmeter_kafka::reader::Record) {
        self.last = Some(rec.offset);
        self.touched.extend(overlay(&mut self.map, rec));
    }

    /// What the store needs to hold the caught-up state: each touched key
    /// once, with its final value (or its deletion), in key order. The
    /// same end state as writing every replayed record in turn, with one
    /// write per key instead of one per record (a changelog not compacted
    /// yet holds many versions of a job). The touched keys leave the map.
    pub(crate) fn changes(&mut self) -> Vec<StateChange> {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        // One pass over both, in key order: the touched keys' values move
        // out, the others stay.
        let mut out = Vec::with_capacity(touched.len());
        let mut kept = Vec::new();
        let mut map = std::mem::take(&mut self.map).into_iter().peekable();
        for entry in touched {
            while let Some(k) = map.next_if(|(k, _)| *k < entry) {
                kept.push(k);
            }
            let value = map.next_if(|(k, _)| *k == entry).map(|(_, v)| v);
            let (table, key) = entry;
            out.push(StateChange { table, key, value });
        }
        kept.extend(map);
        self.map = kept.into_iter().collect();
        out
    }
}

/// State records by (table, key), as restored.
pub type StateMap = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// Applies one changelog record to `map` (an upsert, or a delete for a
/// tombstone) and returns the key it touched; `None` for a malformed key.
pub fn overlay(map: &mut StateMap, rec: jobmeter_kafka::reader::Record) -> Option<(Table, Vec<u8>)> {
    let key = rec.key?;
    let (table, k) = jobmeter_kafka::changelog::split(&key)?;
    let entry = (table, k.to_vec());
    match rec.value {
        Some(v) => {
            map.insert(entry.clone(), v);
        }
        None => {
            map.remove(&entry);
        }
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobmeter_kafka::reader::Record;

    fn rec(offset: i64, table: Table, key: &[u8], value: Option<&[u8]>) -> Record {
        Record {
            partition: 0,
            offset,
            key: Some(jobmeter_kafka::changelog::key(table, key)),
            value: value.map(<[u8]>::to_vec),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    /// The changelog a meter writes for a small fleet, batch after batch
    /// (with deletions: finished jobs expire).
    fn fleet_changelog() -> Vec<Record> {
        use jobmeter_core::*;
        let rates = RateCard::from_toml(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/rate-card.toml"))
                .expect("rate card"),
        )
        .expect("rate card");
        let plans = PlanCatalog::default();
        let book = AccountBook::new(&plans);
        let config = MeterConfig {
            retention_ms: 4 * 3_600_000,
            max_event_age_ms: 4 * 3_600_000,
            ..MeterConfig::default()
        };
        let ctx = Context::new(&rates, &plans, &book, &config);
        let opts = jobmeter_offline::simulate::FleetOptions {
            jobs: 2_000,
            mean_gap_ms: 10_000,
            ..jobmeter_offline::simulate::FleetOptions::default()
        };
        let mut meter = Meter::tracking_changes();
        let (mut records, mut out) = (Vec::new(), Vec::new());
        for (i, ev) in jobmeter_offline::simulate::events(&opts).iter().enumerate() {
            meter.apply(&ctx, ev.json.as_bytes(), None, &mut out).expect("apply");
            if i % 50 == 49 {
                for c in meter.take_changes().expect("encode") {
                    records.push(Record {
                        partition: 0,
                        offset: records.len() as i64,
                        key: Some(jobmeter_kafka::changelog::key(c.table, &c.key)),
                        value: c.value,
                        headers: Vec::new(),
                        timestamp_ms: None,
                    });
                }
            }
        }
        let deletes = records.iter().filter(|r| r.value.is_none()).count();
        assert!(deletes > 100, "{deletes} deletions in the changelog");
        records
    }

    /// Asserts that `chunked` holds the jobs and indexes a store holding
    /// the final state of `records` builds: the same open jobs listed, the
    /// same event ids (expiry entries may include stale ones, which the
    /// meter drops when it meets them), and the last offset.
    fn assert_indexed_like_a_full_build(chunked: &jobmeter_store::Store, records: &[Record]) {
        let dir = tempfile::tempdir().expect("dir");
        let whole = jobmeter_store::Store::open(dir.path()).expect("open");
        let mut all = CatchUp::new(jobmeter_store::PartitionState::default());
        for r in records.iter().cloned() {
            all.record(r);
        }
        whole.commit(0, &all.changes(), all.last).expect("write");
        whole.build_index(0).expect("index");
        let scan = |s: &jobmeter_store::Store, t: Table| s.scan(0, t, b"", usize::MAX).expect("scan");
        for t in [
            Table::Jobs,
            Table::OpenJobs,
            Table::EventIds,
            Table::Usage,
            Table::Statements,
        ] {
            assert_eq!(scan(chunked, t), scan(&whole, t), "{}", t.name());
        }
        let (ch, wh) = (scan(chunked, Table::Expiries), scan(&whole, Table::Expiries));
        assert!(wh.iter().all(|e| ch.contains(e)), "every live expiry is indexed");
        let counts = (
            scan(&whole, Table::OpenJobs).len(),
            scan(&whole, Table::EventIds).len(),
            scan(&whole, Table::Jobs).len(),
        );
        assert!(counts.0 >= 2 && counts.1 > 1000 && counts.2 > 500, "{counts:?}");
        assert_eq!(chunked.progress(0).expect("progress").map(|p| p.0), all.last);
    }

    /// A restore that writes the changelog in chunks (into a partition that
    /// held nothing: as table files) leaves the store with the jobs and
    /// indexes a full build gives.
    #[test]
    fn a_chunked_restore_indexes_like_a_full_build() {
        let records = fleet_changelog();
        // Small chunks (written through the memtable) and large ones
        // (their big tables loaded as table files).
        for chunk in [97, 6_000] {
            let dir = tempfile::tempdir().expect("dir");
            let options = jobmeter_store::StoreOptions {
                ingest_min_rows: 1_000,
                ..Default::default()
            };
            let chunked = jobmeter_store::Store::open_with(dir.path(), options).expect("open");
            assert!(chunked.holds_nothing(0).expect("empty"));
            chunked.set_index_complete(0, true).expect("marker");
            let mut up = CatchUp::new(jobmeter_store::PartitionState::default());
            let mut listed = Some(std::collections::HashSet::new());
            for r in records.iter().cloned() {
                up.record(r);
                if up.pending() >= chunk {
                    write_caught_up(&chunked, 0, &mut up, true, &mut listed).expect("write");
                }
            }
            write_caught_up(&chunked, 0, &mut up, true, &mut listed).expect("write");
            assert_indexed_like_a_full_build(&chunked, &records);
            assert!(!chunked.bulk_load_cut_off(0).expect("read"));
        }
    }

    /// A bulk load that a crash cuts off between its table files (here:
    /// the index tables written, the jobs table and the offset not) is
    /// dropped by the next restore, which reads the changelog in full. Had
    /// it gone on from what the store held, the open-jobs entries of jobs
    /// open at the crash and deleted since would stay: the jobs table,
    /// where it would look up their entries, never had them. The crash in
    /// the first chunk (no offset written yet) and in a later one.
    #[test]
    fn a_bulk_load_cut_off_between_its_tables_is_dropped_by_the_next_restore() {
        let records = fleet_changelog();
        for crash_at in [0usize, 5] {
            let dir = tempfile::tempdir().expect("dir");
            let store = jobmeter_store::Store::open(dir.path()).expect("open");
            store.set_index_complete(0, true).expect("marker");
            let mut up = CatchUp::new(jobmeter_store::PartitionState::default());
            let mut listed = Some(std::collections::HashSet::new());
            for (i, chunk) in records.chunks(97).enumerate().take(crash_at + 1) {
                for r in chunk.iter().cloned() {
                    up.record(r);
                }
                if i < crash_at {
                    write_caught_up(&store, 0, &mut up, true, &mut listed).expect("write");
                } else {
                    let changes = caught_up_changes(&store, 0, &mut up, true, &mut listed).expect("changes");
                    let index: Vec<StateChange> = changes.into_iter().filter(|c| c.table != Table::Jobs).collect();
                    assert!(!index.is_empty(), "chunk {i} has index entries");
                    store.mark_bulk_load(0).expect("mark");
                    store.ingest_tables(0, &index).expect("ingest");
                    // The crash.
                }
            }
            drop(store);
            // The next start, as `Loader::load` begins it.
            let store = jobmeter_store::Store::open(dir.path()).expect("reopen");
            assert!(store.bulk_load_cut_off(0).expect("read"));
            let from = stored_progress(&store, 0, std::time::Duration::from_secs(3600)).expect("progress");
            assert_eq!(from, None, "crash in chunk {crash_at}: dropped");
            assert!(store.holds_nothing(0).expect("read"));
            assert!(!store.bulk_load_cut_off(0).expect("read"));
            store.set_index_complete(0, true).expect("marker");
            let mut up = CatchUp::new(jobmeter_store::PartitionState::default());
            let mut listed = Some(std::collections::HashSet::new());
            // In one chunk, as a restore of a changelog this small reads it.
            for r in records.iter().cloned() {
                up.record(r);
            }
            write_caught_up(&store, 0, &mut up, true, &mut listed).expect("write");
            assert_indexed_like_a_full_build(&store, &records);
            assert!(!store.bulk_load_cut_off(0).expect("read"));
        }
    }

    /// The store written from a catch-up ends in the same state as one
    /// that wrote every replayed record in turn, with each key written once.
    #[test]
    fn a_catch_up_writes_each_touched_key_once_with_its_final_value() {
        let records_stored = vec![
            (Table::Jobs, b"kept".to_vec(), b"0".to_vec()),
            (Table::Jobs, b"gone".to_vec(), b"0".to_vec()),
            (Table::Usage, b"u".to_vec(), b"0".to_vec()),
        ];
        let mut up = CatchUp::new(jobmeter_store::PartitionState {
            records: records_stored.clone(),
            changelog_offset: Some(9),
            written_at_ms: None,
        });
        assert_eq!(up.from, Some(10));
        let records = vec![
            rec(10, Table::Jobs, b"new", Some(b"1")),
            rec(11, Table::Usage, b"u", Some(b"1")),
            rec(12, Table::Jobs, b"gone", None),
            rec(13, Table::Jobs, b"new", Some(b"2")),
            rec(14, Table::Jobs, b"brief", Some(b"1")),
            rec(15, Table::Jobs, b"brief", None),
            rec(16, Table::Usage, b"u", Some(b"3")),
        ];
        // Every record written in turn, as a store would apply them.
        let mut naive: StateMap = records_stored.into_iter().map(|(t, k, v)| ((t, k), v)).collect();
        for r in &records {
            let (t, k) = jobmeter_kafka::changelog::split(r.key.as_deref().unwrap_or_default()).expect("key");
            match &r.value {
                Some(v) => naive.insert((t, k.to_vec()), v.clone()),
                None => naive.remove(&(t, k.to_vec())),
            };
        }
        for r in records {
            up.record(r);
        }
        assert_eq!(up.last, Some(16));
        assert_eq!(up.map, naive);
        let changes = up.changes();
        let written: Vec<_> = changes
            .iter()
            .map(|c| (c.table, c.key.as_slice(), c.value.as_deref()))
            .collect();
        assert_eq!(
            written,
            vec![
                (Table::Jobs, &b"brief"[..], None),
                (Table::Jobs, &b"gone"[..], None),
                (Table::Jobs, &b"new"[..], Some(&b"2"[..])),
                (Table::Usage, &b"u"[..], Some(&b"3"[..])),
            ]
        );
        assert!(up.changes().is_empty(), "taken once");
    }
}
