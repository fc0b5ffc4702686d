//! # jobmeter-store: the meter's state on disk (RocksDB)
//!
//! The store of record for each partition's meter state. It holds exactly
//! the records the core defines ([`jobmeter_core::state`]) and, per input
//! partition, the offset of the last changelog record the stored state
//! reflects. It never interprets values: encoding is the core's.
//!
//! ## Must never depend on
//! Kafka (librdkafka, `jobmeter-kafka`), the service or the tools: it is
//! the RocksDB adapter and nothing else (`./dev test` checks it).
//!
//! ## Schema
//!
//! One column family per record kind, plus `progress`:
//!
//! ```text
//! cf jobs        : partition:u32 BE | core job key        -> core job value
//! cf usage       : partition:u32 BE | core usage key      -> core counter value
//! cf fired       : partition:u32 BE | core fired key      -> (empty)
//! cf statements  : partition:u32 BE | core statement key  -> core statement value
//! cf meta        : partition:u32 BE | "stream_time"       -> i64 BE (ms)
//! cf meta        : partition:u32 BE | "fees_through"      -> u32 BE (period ordinal)
//! cf closed_statements : partition:u32 BE | core statement key -> emitted statement
//! cf progress    : partition:u32 BE                       -> changelog offset:i64 BE | written_at_ms:i64 BE
//! cf event_ids   : partition:u32 BE | event key (16 bytes) -> (empty)   local index
//! cf expiries    : partition:u32 BE | expiry | job key    -> (empty)   local index
//! cf open_jobs   : partition:u32 BE | job key             -> (empty)   local index
//! cf open_jobs   : partition:u32 BE                       -> "complete" when the indexes cover every job
//! cf accounts    : partition:u32 BE | 0x00 | account | from -> account record (see `accounts.rs`)
//! ```
//!
//! The local indexes serve [`jobmeter_core::archive`] (finished jobs read
//! back from here instead of being held in memory); they never travel
//! through the changelog. [`Store::build_index`] derives them from the
//! jobs of a partition whose indexes are not marked complete (a store
//! written by a release without them, or by a meter holding every job).
//!
//! The partition prefix is fixed-width big-endian, so one partition's
//! records are one contiguous key range (loaded with one iterator, dropped
//! with one range delete).
//!
//! ## Writes
//! A meter's step is written by [`Store::commit`]: one `WriteBatch` holding
//! the step's changes for one partition and its new progress offset,
//! written with the WAL on and `sync = true` ([`write_options`]). A crash
//! leaves either all of a step or none of it. The other writes are a
//! restore's: [`Store::ingest`] loads table files and then records the
//! offset in one such synced batch, under a mark that makes the next
//! restore drop a load cut off half-way; [`Store::drop_partition`] clears a
//! partition with a range delete per table in one synced batch;
//! [`Store::mark_corrupt`] records a record that cannot be read back; the
//! accounts table has its own batches. Every write uses
//! [`write_options`].
//!
//! ## Must never depend on
//! Kafka or the network. Callers run it off async worker threads.

mod accounts;
mod archive;
mod state_store;

pub use accounts::{AccountRow, ACCOUNTS_CF, MAX_ACCOUNT_KEY};
pub use archive::Archive;
pub use state_store::{MemStore, StateStore};

use jobmeter_core::state::{StateChange, Table};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use std::path::{Path, PathBuf};

/// A record's key (without the partition prefix) and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Column family of the per-partition progress offsets.
pub const PROGRESS_CF: &str = "progress";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB refused an operation.
    #[error("rocksdb at {path}: {op}: {source}")]
    Rocks {
        /// The database directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// A file or directory of the store could not be written.
    #[error("state store at {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// A column family is missing (the directory is not a jobmeter store).
    #[error("rocksdb at {path}: column family {cf} is missing")]
    MissingCf {
        /// The database directory.
        path: PathBuf,
        /// The family.
        cf: &'static str,
    },
    /// The store refused the write as a whole (the in-memory double when
    /// set to fail).
    #[error("state store unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: &'static str,
    },
    /// A stored state record cannot be decoded.
    #[error(transparent)]
    Decode(#[from] jobmeter_core::state::DecodeError),
    /// An account id longer than the accounts table's key layout holds.
    #[error("an account id of {len} bytes does not fit the accounts table's keys")]
    AccountIdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A stored record is malformed.
    #[error("rocksdb at {path}: malformed {what} for partition {partition}")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// What was malformed.
        what: &'static str,
        /// The partition.
        partition: i32,
    },
}

/// The write options of every write: WAL on, synced. The meter commits in
/// batches (hundreds to thousands of events), so one fsync per batch is
/// cheap, and the progress offset must never get ahead of the disk.
pub fn write_options() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w.disable_wal(false);
    w
}

/// The RocksDB state store of one jobmeter instance.
#[derive(Debug)]
pub struct Store {
    pub(crate) db: DB,
    path: PathBuf,
    /// How the table files of a bulk load are built.
    table_files: TableFileOptions,
    /// Where they are built, in the store's directory.
    ingest_dir: PathBuf,
    /// Table files built so far (their names).
    ingested: std::sync::atomic::AtomicU64,
    /// [`StoreOptions::ingest_min_rows`].
    ingest_min_rows: usize,
}

/// RocksDB options for building table files (opaque to `Debug`).
struct TableFileOptions(Options);

impl std::fmt::Debug for TableFileOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TableFileOptions")
    }
}

/// The directory, inside the store's, where bulk loads build table files.
const INGEST_DIR: &str = "ingest";

fn prefix(partition: i32) -> [u8; 4] {
    (partition as u32).to_be_bytes()
}

/// The key range `[from, to)` of every record of `partition`.
fn partition_range(partition: i32) -> (Vec<u8>, Vec<u8>) {
    let to = if partition == i32::MAX {
        vec![0xFF; 5]
    } else {
        prefix(partition + 1).to_vec()
    };
    (prefix(partition).to_vec(), to)
}

/// The progress record of `partition`: the changelog offset, and when it
/// was written (now).
fn progress_value(offset: i64) -> [u8; 16] {
    progress_value_at(offset, jobmeter_core::Timestamp::now().0)
}

fn progress_value_at(offset: i64, now_ms: i64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&offset.to_be_bytes());
    v[8..].copy_from_slice(&now_ms.to_be_bytes());
    v
}

/// `changes` per table (in [`Table::ALL`]'s order), in key order, each key
/// once with its last change (a stable sort keeps a key's changes in
/// their order).
fn in_key_order(changes: &[StateChange]) -> Vec<Vec<&StateChange>> {
    let mut tables: Vec<Vec<&StateChange>> = vec![Vec::new(); Table::ALL.len()];
    for c in changes {
        if let Some(i) = Table::ALL.iter().position(|t| *t == c.table) {
            tables[i].push(c);
        }
    }
    for rows in &mut tables {
        // The rows point into `changes`: their addresses order a key's
        // changes as they came, which makes the unstable sort stable.
        rows.sort_unstable_by(|a, b| {
            a.key
                .cmp(&b.key)
                .then_with(|| std::ptr::from_ref(*a).cmp(&std::ptr::from_ref(*b)))
        });
        rows.dedup_by(|later, earlier| {
            // A key's last change wins: it takes the earlier one's place.
            if later.key == earlier.key {
                *earlier = *later;
                true
            } else {
                false
            }
        });
    }
    tables
}

/// The mark of a bulk load under way in `partition`, in the progress
/// table (inside the partition's key range: dropped with it).
fn bulk_key(partition: i32) -> Vec<u8> {
    prefixed(partition, b"bulk")
}

/// The key of a partition's corruption marker in the `open_jobs` family:
/// one byte after the prefix, which no job key (two length prefixes) is.
fn corrupt_key(partition: i32) -> Vec<u8> {
    prefixed(partition, &[0xFF])
}

fn prefixed(partition: i32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&prefix(partition));
    k.extend_from_slice(key);
    k
}

/// A partition's stored state: records and the changelog offset they reflect.
#[derive(Debug, Default)]
pub struct PartitionState {
    /// `(table, key, value)` of every record.
    pub records: Vec<(Table, Vec<u8>, Vec<u8>)>,
    /// The last changelog offset the records reflect (`None`: nothing stored).
    pub changelog_offset: Option<i64>,
    /// Wall-clock time (Unix ms) of the last write, to judge whether local
    /// state is recent enough to be caught up from the changelog.
    pub written_at_ms: Option<i64>,
}

/// How much memory RocksDB may use for reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The block cache shared by every column family (data blocks; the
    /// index and bloom filter blocks are held apart, a few bytes a key).
    pub block_cache_bytes: usize,
    /// The fewest rows of a table [`Store::ingest`] loads as a table file;
    /// smaller tables go through the memtable with the offset (a table file
    /// costs a few synced writes of its own).
    pub ingest_min_rows: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_cache_bytes: 64 << 20,
            ingest_min_rows: 4096,
        }
    }
}

/// The memory all memtables together may use before RocksDB flushes them.
pub const MEMTABLE_BUDGET: usize = 128 << 20;

/// One column family's memtable size.
const MEMTABLE_BYTES: usize = 8 << 20;

/// The value of the marker that says a partition's indexes cover every job.
const INDEX_COMPLETE: &[u8] = b"complete";

impl Store {
    /// Opens (or creates) the store at `path` with default options.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the store at `path`.
    pub fn open_with(path: &Path, o: StoreOptions) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        // All column families' memtables together: a bound on write memory
        // that does not grow with the number of tables.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        let cache = rocksdb::Cache::new_lru_cache(o.block_cache_bytes);
        let table_options = || {
            let mut t = rocksdb::BlockBasedOptions::default();
            t.set_block_cache(&cache);
            // Point reads of absent keys (a new job's id, a new event id)
            // are answered by the filter without reading a data block.
            t.set_bloom_filter(10.0, false);
            // Index and filter blocks stay in the table readers, outside
            // the block cache: random reads of old jobs would otherwise
            // evict them and every later read reload them from the file
            // (measured: 170 µs an event at a million retained jobs). They
            // take about 1.3 bytes a key for the filter and a few for the
            // index (16 KiB data blocks keep it small).
            t.set_block_size(16 << 10);
            t
        };
        let cf_options = || {
            let mut c = Options::default();
            c.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // Memtables are flushed to level 0 uncompressed (flushes are
            // frequent and level 0 is soon compacted); compacted levels
            // are compressed.
            {
                use rocksdb::DBCompressionType::{Lz4, None as Plain};
                c.set_compression_per_level(&[Plain, Lz4, Lz4, Lz4, Lz4, Lz4, Lz4]);
            }
            c.set_block_based_table_factory(&table_options());
            // Small memtables with a bloom filter of their own: most point
            // reads are of absent keys, and a read of a large memtable's
            // skiplist (or an insert into it) costs microseconds.
            c.set_write_buffer_size(MEMTABLE_BYTES);
            c.set_memtable_whole_key_filtering(true);
            c.set_memtable_prefix_bloom_ratio(0.1);
            c
        };
        let cfs = Table::ALL
            .iter()
            .map(|t| t.name())
            .chain([PROGRESS_CF, ACCOUNTS_CF])
            .map(|n| ColumnFamilyDescriptor::new(n, cf_options()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| StoreError::Rocks {
            path: path.to_owned(),
            op: "open",
            source,
        })?;
        // Table files of a bulk load (`Store::ingest`), built uncompressed
        // with the column families' filters and block size. A file left
        // by a load that a crash cut off was never ingested: it goes.
        let mut files = Options::default();
        files.set_compression_type(rocksdb::DBCompressionType::None);
        files.set_block_based_table_factory(&table_options());
        let ingest_dir = path.join(INGEST_DIR);
        let _ = std::fs::remove_dir_all(&ingest_dir);
        std::fs::create_dir_all(&ingest_dir).map_err(|source| StoreError::Io {
            path: ingest_dir.clone(),
            source,
        })?;
        Ok(Store {
            db,
            path: path.to_owned(),
            table_files: TableFileOptions(files),
            ingest_dir,
            ingested: std::sync::atomic::AtomicU64::new(0),
            ingest_min_rows: o.ingest_min_rows,
        })
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or_else(|| StoreError::MissingCf {
            path: self.path.clone(),
            cf: name,
        })
    }

    fn rocks(&self, op: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError + '_ {
        move |source| StoreError::Rocks {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Writes one step atomically: `changes` of `partition` and the
    /// changelog offset they bring the stored state up to.
    pub fn commit(
        &self,
        partition: i32,
        changes: &[StateChange],
        changelog_offset: Option<i64>,
    ) -> Result<(), StoreError> {
        self.commit_many(&[(partition, changes, changelog_offset)])
    }

    /// Writes the steps of several partitions in one atomic, synced batch
    /// (one fsync per meter batch, however many partitions it touched).
    pub fn commit_many(&self, steps: &[(i32, &[StateChange], Option<i64>)]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let now = jobmeter_core::Timestamp::now().0;
        for (partition, changes, changelog_offset) in steps {
            self.add_changes(&mut batch, *partition, changes.iter())?;
            if let Some(o) = changelog_offset {
                batch.put_cf(self.cf(PROGRESS_CF)?, prefix(*partition), progress_value_at(*o, now));
            }
        }
        self.db
            .write_opt(batch, &write_options())
            .map_err(self.rocks("write batch"))
    }

    /// Writes `changes` of `partition` as table files that RocksDB takes
    /// in whole (one per table of at least [`StoreOptions::ingest_min_rows`] rows,
    /// ingested, not written through the memtable and its log); the
    /// smaller tables go in one synced write with the changelog offset the
    /// changes reach. The same end state as [`Store::commit`] — a key
    /// changed more than once ends with its last change — at a fraction of
    /// the cost for a bulk load: a restore into a partition that held
    /// nothing.
    ///
    /// The table files are ingested one after another, then the last
    /// write. While they are, the partition carries a mark
    /// ([`Store::bulk_load_cut_off`]) that goes with that write: a crash in
    /// between leaves tables ahead of others (the jobs of one chunk without
    /// their index entries, or the reverse) and the mark, and the next
    /// restore of the partition drops it and reads the changelog in full.
    pub fn ingest(
        &self,
        partition: i32,
        changes: &[StateChange],
        changelog_offset: Option<i64>,
    ) -> Result<(), StoreError> {
        let tables = in_key_order(changes);
        if tables.iter().all(|rows| rows.len() < self.ingest_min_rows) {
            // A table file costs a few synced writes: for this little, one
            // write through the memtable is cheaper (and atomic: no mark).
            let rows: Vec<&StateChange> = tables.into_iter().flatten().collect();
            return self.finish(partition, &rows, changelog_offset, false);
        }
        self.mark_bulk_load(partition)?;
        let mut rest = Vec::new();
        for rows in tables {
            if rows.len() >= self.ingest_min_rows {
                self.ingest_table(partition, &rows)?;
            } else {
                rest.extend(rows);
            }
        }
        self.finish(partition, &rest, changelog_offset, true)
    }

    /// The first step of [`Store::ingest`]: the mark, synced.
    pub fn mark_bulk_load(&self, partition: i32) -> Result<(), StoreError> {
        self.db
            .put_cf_opt(self.cf(PROGRESS_CF)?, bulk_key(partition), [], &write_options())
            .map_err(self.rocks("mark a bulk load"))
    }

    /// A step of [`Store::ingest`]: `changes` of every table they touch as
    /// table files, one table after another.
    pub fn ingest_tables(&self, partition: i32, changes: &[StateChange]) -> Result<(), StoreError> {
        for rows in in_key_order(changes).iter().filter(|rows| !rows.is_empty()) {
            self.ingest_table(partition, rows)?;
        }
        Ok(())
    }

    /// The last step of [`Store::ingest`]: the changes not loaded as table
    /// files, the offset, and (`marked`) the mark gone, in one synced write.
    fn finish(
        &self,
        partition: i32,
        rows: &[&StateChange],
        changelog_offset: Option<i64>,
        marked: bool,
    ) -> Result<(), StoreError> {
        let progress = self.cf(PROGRESS_CF)?;
        let mut batch = WriteBatch::default();
        self.add_changes(&mut batch, partition, rows.iter().copied())?;
        if marked {
            batch.delete_cf(progress, bulk_key(partition));
        }
        if let Some(o) = changelog_offset {
            batch.put_cf(progress, prefix(partition), progress_value(o));
        }
        self.db
            .write_opt(batch, &write_options())
            .map_err(self.rocks("write batch"))
    }

    /// True when a bulk load into `partition` ([`Store::ingest`]) was cut
    /// off: some of its tables may hold changes that others lack, and the
    /// partition's state is to be dropped and restored in full.
    pub fn bulk_load_cut_off(&self, partition: i32) -> Result<bool, StoreError> {
        let v = self
            .db
            .get_cf(self.cf(PROGRESS_CF)?, bulk_key(partition))
            .map_err(self.rocks("get bulk load mark"))?;
        Ok(v.is_some())
    }

    /// Builds one table file of `rows` (in key order, each key once) and
    /// has RocksDB take it.
    fn ingest_table(&self, partition: i32, rows: &[&StateChange]) -> Result<(), StoreError> {
        let Some(table) = rows.first().map(|c| c.table) else {
            return Ok(());
        };
        let n = self.ingested.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.ingest_dir.join(format!("{partition}-{}-{n}.sst", table.name()));
        let cf = self.cf(table.name())?;
        let built = (|| {
            let mut w = rocksdb::SstFileWriter::create(&self.table_files.0);
            w.open(&file)?;
            let head = prefix(partition);
            let mut key = head.to_vec();
            for c in rows {
                key.truncate(head.len());
                key.extend_from_slice(&c.key);
                match &c.value {
                    Some(v) => w.put(&key, v)?,
                    None => w.delete(&key)?,
                }
            }
            w.finish()?;
            let mut o = rocksdb::IngestExternalFileOptions::default();
            o.set_move_files(true);
            self.db.ingest_external_file_cf_opts(cf, &o, vec![&file])
        })();
        let _ = std::fs::remove_file(&file);
        built.map_err(self.rocks("ingest table file"))
    }

    /// Adds `changes` of `partition` to `batch`: a put, or a delete.
    fn add_changes<'c>(
        &self,
        batch: &mut WriteBatch,
        partition: i32,
        changes: impl Iterator<Item = &'c StateChange>,
    ) -> Result<(), StoreError> {
        // In key order within each table. RocksDB inserts a batch into a
        // column family's memtable (a skiplist) key after key, each search
        // starting where the previous key went: a key next to the previous
        // one costs a few steps, a key anywhere else (event ids, expiries:
        // in the order their jobs finished) a longer search, a cache miss
        // a level. Every key of the step has the same partition prefix, so
        // the state keys' order is the stored keys'. The sort is stable: a
        // key changed twice in one step still ends with its last change.
        let mut rows: Vec<&StateChange> = changes.collect();
        rows.sort_by(|a, b| (a.table, &a.key).cmp(&(b.table, &b.key)));
        let mut cf: Option<(Table, &rocksdb::ColumnFamily)> = None;
        let mut key = prefix(partition).to_vec();
        let at = key.len();
        for ch in rows {
            let handle = match cf {
                Some((t, h)) if t == ch.table => h,
                _ => {
                    let h = self.cf(ch.table.name())?;
                    cf = Some((ch.table, h));
                    h
                }
            };
            // The batch copies the key: one buffer serves every row.
            key.truncate(at);
            key.extend_from_slice(&ch.key);
            match &ch.value {
                Some(v) => batch.put_cf(handle, &key, v),
                None => batch.delete_cf(handle, &key),
            }
        }
        Ok(())
    }

    /// Loads everything stored for `partition` (not the local indexes).
    pub fn load(&self, partition: i32) -> Result<PartitionState, StoreError> {
        self.load_tables(partition, false)
    }

    /// What a meter restores from: every record of `partition` but the
    /// local indexes and the closed statements (the meter never reads them
    /// again), and with `open_only` only the jobs the `open_jobs` index
    /// lists (a meter with an archive reads the others when it needs them).
    pub fn load_meter_state(&self, partition: i32, open_only: bool) -> Result<PartitionState, StoreError> {
        let mut st = self.load_tables(partition, open_only)?;
        if open_only {
            let p = prefix(partition);
            let open = self.cf(Table::OpenJobs.name())?;
            let jobs = self.cf(Table::Jobs.name())?;
            for item in self.db.iterator_cf(open, IteratorMode::From(&p, Direction::Forward)) {
                let (k, _) = item.map_err(self.rocks("iterate"))?;
                if !k.starts_with(&p) {
                    break;
                }
                if k.len() == p.len() {
                    continue;
                }
                if let Some(v) = self.db.get_cf(jobs, &k).map_err(self.rocks("get"))? {
                    st.records.push((Table::Jobs, k[4..].to_vec(), v));
                }
            }
        }
        Ok(st)
    }

    /// `partition`'s records: every table but the local indexes; with
    /// `meter_only`, neither its jobs nor its closed statements.
    fn load_tables(&self, partition: i32, meter_only: bool) -> Result<PartitionState, StoreError> {
        let mut records = Vec::new();
        let p = prefix(partition);
        let skipped = |t: &Table| t.is_local() || (meter_only && matches!(t, Table::Jobs | Table::Closed));
        for table in Table::ALL.into_iter().filter(|t| !skipped(t)) {
            let cf = self.cf(table.name())?;
            for item in self.db.iterator_cf(cf, IteratorMode::From(&p, Direction::Forward)) {
                let (k, v) = item.map_err(self.rocks("iterate"))?;
                if !k.starts_with(&p) {
                    break;
                }
                records.push((table, k[4..].to_vec(), v.to_vec()));
            }
        }
        let progress = self.progress(partition)?;
        Ok(PartitionState {
            records,
            changelog_offset: progress.map(|p| p.0),
            written_at_ms: progress.map(|p| p.1),
        })
    }

    /// One record of `partition` (readers such as the usage API).
    pub fn get(&self, partition: i32, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(table.name())?, prefixed(partition, key))
            .map_err(self.rocks("get"))
    }

    /// Every record of `partition` in `table` whose key starts with
    /// `key_prefix`, in key order, at most `limit` of them.
    pub fn scan(
        &self,
        partition: i32,
        table: Table,
        key_prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let cf = self.cf(table.name())?;
        let from = prefixed(partition, key_prefix);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(&from, Direction::Forward)) {
            let (k, v) = item.map_err(self.rocks("iterate"))?;
            if !k.starts_with(&from) || out.len() >= limit {
                break;
            }
            out.push((k[4..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// True when nothing is stored for `partition`: no changelog offset and
    /// no record in any table (a bulk load that a crash cut off between
    /// its table files leaves records without an offset).
    pub fn holds_nothing(&self, partition: i32) -> Result<bool, StoreError> {
        if self.progress(partition)?.is_some() {
            return Ok(false);
        }
        for t in Table::ALL {
            if !self.scan(partition, t, b"", 1)?.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The changelog offset `partition`'s stored state reflects, and when it
    /// was written.
    pub fn progress(&self, partition: i32) -> Result<Option<(i64, i64)>, StoreError> {
        let v = self
            .db
            .get_cf(self.cf(PROGRESS_CF)?, prefix(partition))
            .map_err(self.rocks("get progress"))?;
        match v {
            None => Ok(None),
            Some(b) if b.len() == 16 => {
                let mut o = [0u8; 8];
                let mut t = [0u8; 8];
                o.copy_from_slice(&b[..8]);
                t.copy_from_slice(&b[8..]);
                Ok(Some((i64::from_be_bytes(o), i64::from_be_bytes(t))))
            }
            Some(_) => Err(StoreError::Corrupt {
                path: self.path.clone(),
                what: "progress record",
                partition,
            }),
        }
    }

    /// Deletes everything stored for `partition` (a rebuild, or a partition
    /// this instance will restore from the changelog from scratch).
    pub fn drop_partition(&self, partition: i32) -> Result<(), StoreError> {
        let (from, to) = partition_range(partition);
        let mut batch = WriteBatch::default();
        for name in Table::ALL.iter().map(|t| t.name()).chain([PROGRESS_CF]) {
            let cf = self.cf(name)?;
            batch.delete_range_cf(cf, &from, &to);
        }
        self.db
            .write_opt(batch, &write_options())
            .map_err(self.rocks("drop partition"))
    }

    /// Records that `partition` holds a record that cannot be decoded (found
    /// while metering, when a finished job was read back): its next restore
    /// stops with that error, as for a record found at restore, until
    /// `jobmeter rebuild` drops the partition's state.
    pub fn mark_corrupt(&self, partition: i32, why: &str) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(Table::OpenJobs.name())?, corrupt_key(partition), why.as_bytes());
        self.db
            .write_opt(batch, &write_options())
            .map_err(self.rocks("write corruption marker"))
    }

    /// What [`Store::mark_corrupt`] recorded for `partition`, if anything.
    pub fn corrupt(&self, partition: i32) -> Result<Option<String>, StoreError> {
        let v = self
            .db
            .get_cf(self.cf(Table::OpenJobs.name())?, corrupt_key(partition))
            .map_err(self.rocks("get corruption marker"))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// True when `partition`'s local indexes cover every job it holds.
    pub fn index_complete(&self, partition: i32) -> Result<bool, StoreError> {
        let v = self
            .db
            .get_cf(self.cf(Table::OpenJobs.name())?, prefix(partition))
            .map_err(self.rocks("get index marker"))?;
        Ok(v.as_deref() == Some(INDEX_COMPLETE))
    }

    /// Marks `partition`'s local indexes complete, or not (a meter that
    /// holds every job in memory does not keep them).
    pub fn set_index_complete(&self, partition: i32, complete: bool) -> Result<(), StoreError> {
        let cf = self.cf(Table::OpenJobs.name())?;
        let mut batch = WriteBatch::default();
        if complete {
            batch.put_cf(cf, prefix(partition), INDEX_COMPLETE);
        } else {
            batch.delete_cf(cf, prefix(partition));
        }
        self.db
            .write_opt(batch, &write_options())
            .map_err(self.rocks("write index marker"))
    }

    /// Derives `partition`'s local indexes from its jobs and marks them
    /// complete; returns how many jobs it read. Written in batches of a few
    /// thousand jobs, so memory stays flat however many jobs there are.
    pub fn build_index(&self, partition: i32) -> Result<u64, StoreError> {
        let p = prefix(partition);
        let (from, to) = partition_range(partition);
        let mut batch = WriteBatch::default();
        for t in [Table::EventIds, Table::Expiries, Table::OpenJobs] {
            batch.delete_range_cf(self.cf(t.name())?, &from, &to);
        }
        // A corruption marker stays until the partition is rebuilt.
        if let Some(why) = self.corrupt(partition)? {
            batch.put_cf(self.cf(Table::OpenJobs.name())?, corrupt_key(partition), why.as_bytes());
        }
        self.db
            .write_opt(batch, &write_options())
            .map_err(self.rocks("clear index"))?;
        let jobs = self.cf(Table::Jobs.name())?;
        let mut n = 0u64;
        let mut changes = Vec::new();
        for item in self.db.iterator_cf(jobs, IteratorMode::From(&p, Direction::Forward)) {
            let (k, v) = item.map_err(self.rocks("iterate"))?;
            if !k.starts_with(&p) {
                break;
            }
            let Some(jk) = jobmeter_core::state::keys::decode_job(&k[4..]) else {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    what: "job key",
                    partition,
                });
            };
            let job = jobmeter_core::values::decode::<jobmeter_core::state::Job>(Table::Jobs, &v)
                .map_err(|e| e.at_key(&k[4..]))?;
            // The indexes were cleared above: no open-jobs entry to delete.
            jobmeter_core::archive::index_changes(&jk, &job, job.expires.is_none(), false, &mut changes);
            n += 1;
            if changes.len() >= 8192 {
                self.commit(partition, &std::mem::take(&mut changes), None)?;
            }
        }
        self.commit(partition, &changes, None)?;
        self.set_index_complete(partition, true)?;
        Ok(n)
    }

    /// Approximate bytes on disk (SST files), for metrics.
    pub fn size_bytes(&self) -> u64 {
        Table::ALL
            .iter()
            .filter_map(|t| self.db.cf_handle(t.name()))
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(cf, "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(table: Table, key: &[u8], value: Option<&[u8]>) -> StateChange {
        StateChange {
            table,
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }
    }

    /// A bulk load ends in the state the same changes written through the
    /// memtable give: the last change of a key wins, deletions hide what
    /// was there (in the memtable or in earlier table files), other
    /// partitions are untouched, the offset is written and the mark gone.
    #[test]
    fn ingest_ends_like_commit() -> Result<(), Box<dyn std::error::Error>> {
        let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
        let (bulk, plain) = (Store::open(dirs.0.path())?, Store::open(dirs.1.path())?);
        let before = vec![
            change(Table::Jobs, b"old", Some(b"0")),
            change(Table::Jobs, b"gone", Some(b"0")),
            change(Table::EventIds, b"e-old", Some(b"old")),
        ];
        let chunks = [
            vec![
                change(Table::Jobs, b"b", Some(b"1")),
                change(Table::Jobs, b"a", Some(b"1")),
                change(Table::EventIds, b"e2", Some(b"b")),
                change(Table::EventIds, b"e1", Some(b"a")),
                change(Table::Jobs, b"a", Some(b"2")),
                change(Table::Jobs, b"gone", None),
                change(Table::Usage, b"u", Some(b"1")),
            ],
            vec![
                change(Table::Jobs, b"b", None),
                change(Table::EventIds, b"e2", None),
                change(Table::EventIds, b"e-old", None),
                change(Table::EventIds, b"e3", Some(b"c")),
                change(Table::EventIds, b"e3", None),
                change(Table::EventIds, b"e3", Some(b"c2")),
                change(Table::Usage, b"u", Some(b"2")),
            ],
        ];
        // Enough event ids for a table file in both chunks (the other
        // tables are written with the offset), the second deleting half.
        let mut chunks = chunks;
        for i in 0..2 * StoreOptions::default().ingest_min_rows {
            let k = format!("many-{i:05}").into_bytes();
            chunks[0].push(change(Table::EventIds, &k, Some(b"m")));
            if i % 2 == 0 {
                chunks[1].push(change(Table::EventIds, &k, None));
            } else {
                chunks[1].push(change(Table::EventIds, &k, Some(b"m2")));
            }
        }
        for s in [&bulk, &plain] {
            s.commit(0, &before, None)?;
            s.commit(1, &[change(Table::Jobs, b"a", Some(b"p1"))], Some(3))?;
        }
        for (i, c) in chunks.iter().enumerate() {
            bulk.ingest(0, c, Some(10 + i as i64))?;
            plain.commit(0, c, Some(10 + i as i64))?;
        }
        for p in [0, 1] {
            for t in Table::ALL {
                assert_eq!(
                    bulk.scan(p, t, b"", usize::MAX)?,
                    plain.scan(p, t, b"", usize::MAX)?,
                    "{p} {}",
                    t.name()
                );
            }
            assert_eq!(bulk.progress(p)?.map(|x| x.0), plain.progress(p)?.map(|x| x.0));
            assert!(!bulk.bulk_load_cut_off(p)?);
        }
        assert_eq!(
            bulk.scan(0, Table::Jobs, b"", usize::MAX)?,
            vec![(b"a".to_vec(), b"2".to_vec()), (b"old".to_vec(), b"0".to_vec())]
        );
        let ids = bulk.scan(0, Table::EventIds, b"", usize::MAX)?;
        assert_eq!(ids.len(), 2 + StoreOptions::default().ingest_min_rows);
        assert_eq!(
            ids[..2],
            [(b"e1".to_vec(), b"a".to_vec()), (b"e3".to_vec(), b"c2".to_vec())]
        );
        assert!(ids[2..].iter().all(|(k, v)| k.starts_with(b"many-") && v == b"m2"));
        let files: usize = bulk
            .db
            .live_files()?
            .iter()
            .filter(|f| f.column_family_name == "event_ids")
            .count();
        assert!(files >= 2, "the event ids went in as table files: {files}");
        assert_eq!(bulk.progress(0)?.map(|x| x.0), Some(11));
        // No table file is left behind, and one a crash left goes at the
        // next open; the data survives a reopen.
        let files = dirs.0.path().join(INGEST_DIR);
        assert_eq!(std::fs::read_dir(&files)?.count(), 0);
        std::fs::write(files.join("0-jobs-7.sst"), b"cut off")?;
        drop(bulk);
        let bulk = Store::open(dirs.0.path())?;
        assert_eq!(std::fs::read_dir(&files)?.count(), 0);
        assert_eq!(bulk.scan(0, Table::Jobs, b"", usize::MAX)?.len(), 2);
        // A load cut off after its mark is seen, and dropping the
        // partition clears it.
        bulk.mark_bulk_load(0)?;
        assert!(bulk.bulk_load_cut_off(0)? && !bulk.bulk_load_cut_off(1)?);
        assert!(!bulk.holds_nothing(0)?);
        bulk.drop_partition(0)?;
        assert!(!bulk.bulk_load_cut_off(0)?);
        assert!(bulk.holds_nothing(0)? && !bulk.holds_nothing(1)?);
        Ok(())
    }

    /// The edges through a bulk load, as through a commit: the first and
    /// last partitions, an empty key, a 64 KiB multi-byte key, empty and
    /// 1 MiB values, and a restore that reads them back.
    #[test]
    fn ingest_keeps_the_edges_like_commit() -> Result<(), Box<dyn std::error::Error>> {
        let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
        let every_row = StoreOptions {
            ingest_min_rows: 1,
            ..Default::default()
        };
        let (bulk, plain) = (Store::open_with(dirs.0.path(), every_row)?, Store::open(dirs.1.path())?);
        let long_key = "é€😀".repeat(64 * 1024 / 9).into_bytes();
        let big = vec![0xA5u8; 1 << 20];
        let changes = vec![
            change(Table::Usage, b"", Some(b"")),
            change(Table::Usage, &long_key, Some(&big)),
            change(Table::Meta, &[0xFF; 8], Some(b"x")),
            change(Table::Meta, &[0x00], None),
        ];
        for p in [0, i32::MAX] {
            bulk.ingest(p, &changes, Some(i64::MAX))?;
            plain.commit(p, &changes, Some(i64::MAX))?;
        }
        assert!(bulk
            .db
            .live_files()?
            .iter()
            .any(|f| f.column_family_name == Table::Usage.name()));
        drop(bulk);
        let bulk = Store::open_with(dirs.0.path(), every_row)?;
        for p in [0, i32::MAX] {
            for t in [Table::Usage, Table::Meta] {
                assert_eq!(
                    bulk.scan(p, t, b"", usize::MAX)?,
                    plain.scan(p, t, b"", usize::MAX)?,
                    "{p}"
                );
            }
            let usage = bulk.scan(p, Table::Usage, b"", usize::MAX)?;
            assert_eq!(usage.len(), 2);
            assert_eq!((usage[1].0.len(), usage[1].1.len()), (long_key.len(), 1 << 20));
            assert_eq!(bulk.progress(p)?.map(|x| x.0), Some(i64::MAX));
            assert!(!bulk.holds_nothing(p)? && !bulk.bulk_load_cut_off(p)?);
        }
        assert!(bulk.holds_nothing(1)?);
        Ok(())
    }

    /// A step's changes are written in key order, yet a key changed more
    /// than once in one step ends with its last change, whatever keys and
    /// tables come between.
    #[test]
    fn a_step_ends_with_each_keys_last_change() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.commit(
            1,
            &[
                change(Table::EventIds, b"z", Some(b"")),
                change(Table::Jobs, b"m", Some(b"1")),
                change(Table::EventIds, b"a", Some(b"")),
                change(Table::Jobs, b"b", Some(b"2")),
                change(Table::Jobs, b"m", None),
                change(Table::EventIds, b"z", None),
                change(Table::Jobs, b"a", Some(b"3")),
                change(Table::Jobs, b"m", Some(b"4")),
                change(Table::Jobs, b"b", None),
            ],
            Some(1),
        )?;
        assert_eq!(store.get(1, Table::Jobs, b"m")?, Some(b"4".to_vec()));
        assert_eq!(store.get(1, Table::Jobs, b"a")?, Some(b"3".to_vec()));
        assert_eq!(store.get(1, Table::Jobs, b"b")?, None);
        assert_eq!(store.get(1, Table::EventIds, b"z")?, None);
        assert_eq!(store.get(1, Table::EventIds, b"a")?, Some(Vec::new()));
        Ok(())
    }

    #[test]
    fn commit_load_and_drop_per_partition() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.commit(
            3,
            &[
                change(Table::Jobs, b"a", Some(b"1")),
                change(Table::Usage, b"u", Some(b"2")),
            ],
            Some(10),
        )?;
        store.commit(4, &[change(Table::Jobs, b"a", Some(b"other"))], Some(5))?;
        store.commit(
            3,
            &[change(Table::Jobs, b"a", None), change(Table::Jobs, b"b", Some(b"3"))],
            Some(12),
        )?;
        let s = store.load(3)?;
        assert_eq!(s.changelog_offset, Some(12));
        assert_eq!(
            s.records,
            vec![
                (Table::Jobs, b"b".to_vec(), b"3".to_vec()),
                (Table::Usage, b"u".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(store.get(3, Table::Jobs, b"b")?, Some(b"3".to_vec()));
        assert_eq!(store.get(4, Table::Jobs, b"b")?, None);
        store.commit(
            3,
            &[
                change(Table::Jobs, b"ba", Some(b"4")),
                change(Table::Jobs, b"c", Some(b"5")),
            ],
            Some(13),
        )?;
        let scanned = store.scan(3, Table::Jobs, b"b", 10)?;
        assert_eq!(
            scanned,
            vec![(b"b".to_vec(), b"3".to_vec()), (b"ba".to_vec(), b"4".to_vec())]
        );
        assert_eq!(store.scan(3, Table::Jobs, b"", 1)?.len(), 1, "limit honoured");
        store.drop_partition(3)?;
        assert!(store.load(3)?.records.is_empty());
        assert_eq!(store.load(3)?.changelog_offset, None);
        assert_eq!(store.load(4)?.records.len(), 1, "other partitions untouched");
        Ok(())
    }

    #[test]
    fn state_survives_reopen_and_restores_a_meter() -> Result<(), Box<dyn std::error::Error>> {
        use jobmeter_core::*;
        let dir = tempfile::tempdir()?;
        let rates = RateCard::from_toml(
            "[[versions]]\nversion='v'\neffective_from='2024-01-01T00:00:00Z'\nfine_tune_per_second='0.001'\nmodels.m={per_second='0.01'}\n",
        )?;
        let plans = PlanCatalog::default();
        let book = AccountBook::new(&plans);
        let config = MeterConfig::default();
        let ctx = Context::new(&rates, &plans, &book, &config);
        let ev = |ty: &str, id: &str, t: &str, data: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"{ty}","time":"{t}","subject":"j","data":{{"account_id":"a"{data}}}}}"#
            )
        };
        let mut meter = Meter::tracking_changes();
        let mut out = Vec::new();
        meter.apply(
            &ctx,
            ev(
                "job.started",
                "1",
                "2024-05-01T00:00:00Z",
                r#","kind":"inference","model":"m""#,
            )
            .as_bytes(),
            None,
            &mut out,
        )?;
        {
            let store = Store::open(dir.path())?;
            store.commit(0, &meter.take_changes()?, Some(1))?;
        }
        let store = Store::open(dir.path())?;
        let loaded = store.load(0)?;
        let mut restored = Meter::restore(loaded.records, &config)?;
        restored.apply(
            &ctx,
            ev("job.stopped", "2", "2024-05-01T00:00:09Z", r#","status":"succeeded""#).as_bytes(),
            None,
            &mut out,
        )?;
        let charges: Vec<_> = out.iter().filter(|o| matches!(o, Output::Charge(_))).collect();
        assert_eq!(charges.len(), 1);
        Ok(())
    }

    #[test]
    fn hostile_values_round_trip_through_rocksdb_and_restore() -> Result<(), Box<dyn std::error::Error>> {
        use jobmeter_core::event::MAX_ID_BYTES;
        use jobmeter_core::*;
        let dir = tempfile::tempdir()?;
        let rates = RateCard::from_toml(
            "[[versions]]\nversion='v'\neffective_from='2000-01-01T00:00:00Z'\nfine_tune_per_second='0.001'\nmodels.m={per_second='0.01'}\n",
        )?;
        let plans = PlanCatalog::default();
        let book = AccountBook::new(&plans);
        let config = MeterConfig::default();
        let ctx = Context::new(&rates, &plans, &book, &config).with_partition(7, 8, |_, _| 7);
        // The longest ids accepted, in 1-, 2-, 3- and 4-byte characters.
        let long = |unit: &str, salt: &str| {
            let mut s = salt.to_owned();
            while s.len() + unit.len() <= MAX_ID_BYTES {
                s.push_str(unit);
            }
            while s.len() < MAX_ID_BYTES {
                s.push('x');
            }
            s
        };
        let account = long("界", "a");
        let ev = |ty: &str, id: &str, t: &str| {
            serde_json::json!({
                "specversion": "1.0", "id": long("é", id), "source": long("s", "w"), "type": ty, "time": t,
                "subject": long("🚀", if id < "4" { "j" } else { id }), "data": {"account_id": account, "kind": "workflow_step", "model": "m",
                "workflow_run_id": long("ü", "r"), "gpu": long("g", "g"), "status": "failed"}
            })
            .to_string()
        };
        let steps = [
            ev("job.started", "1", "2000-01-01T00:00:00Z"),
            ev("job.heartbeat", "2", "2000-01-01T00:05:00Z"),
            ev("job.stopped", "3", "2000-01-01T00:09:59.999Z"),
            ev("job.started", "4", "2099-12-31T23:59:59.999Z"),
            ev("job.started", "5", "2100-01-01T00:00:00Z"),
        ];
        let mut live = Meter::tracking_changes();
        let mut out = Vec::new();
        for (i, raw) in steps.iter().enumerate() {
            live.apply(&ctx, raw.as_bytes(), None, &mut out)?;
            {
                let store = Store::open(dir.path())?;
                store.commit(7, &live.take_changes()?, Some(i as i64))?;
            }
            let store = Store::open(dir.path())?;
            let restored = Meter::restore(store.load(7)?.records, &config)?;
            assert_eq!(restored.snapshot()?, live.snapshot()?, "after step {i}");
            assert_eq!(restored.stream_time(), live.stream_time());
        }
        // The last step is refused; the one before it is accepted (the
        // last millisecond of the accepted range).
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Reject(r) if r.reason == RejectReason::TimeOutOfRange)));
        assert_eq!(
            live.stream_time().map(|t| t.to_string()).as_deref(),
            Some("2099-12-31T23:59:59.999Z")
        );
        Ok(())
    }
}
