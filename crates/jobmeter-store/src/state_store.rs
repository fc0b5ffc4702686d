//! The store as the meter's pipeline uses it, and an in-memory double.

use crate::{PartitionState, Store, StoreError};
use jobmeter_core::state::{StateChange, Table};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What the pipeline needs of its state store: one atomic write per batch
/// (every partition's changes and the changelog offset they reach, all or
/// nothing), and a partition's state back. [`Store`] (RocksDB) is the store
/// of record; [`MemStore`] keeps the same contract in memory for tests.
pub trait StateStore: Send + Sync + 'static {
    /// Writes the steps of several partitions in one atomic batch.
    fn commit_many(&self, steps: &[(i32, &[StateChange], Option<i64>)]) -> Result<(), StoreError>;
    /// Everything stored for `partition`.
    fn load(&self, partition: i32) -> Result<PartitionState, StoreError>;
}

impl StateStore for Store {
    fn commit_many(&self, steps: &[(i32, &[StateChange], Option<i64>)]) -> Result<(), StoreError> {
        Store::commit_many(self, steps)
    }

    fn load(&self, partition: i32) -> Result<PartitionState, StoreError> {
        Store::load(self, partition)
    }
}

/// [`StateStore`] in memory, with a switch that makes writes fail (as a
/// full disk or a crash in the middle of the write would: nothing of the
/// batch is applied).
#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<Mem>,
    fail_writes: AtomicBool,
}

#[derive(Debug, Default)]
struct Mem {
    records: BTreeMap<(i32, Table, Vec<u8>), Vec<u8>>,
    /// Per partition: changelog offset reached.
    progress: BTreeMap<i32, i64>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// From now on every write fails (`true`) or succeeds (`false`).
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }
}

impl StateStore for MemStore {
    fn commit_many(&self, steps: &[(i32, &[StateChange], Option<i64>)]) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                reason: "the in-memory store is set to fail writes",
            });
        }
        let mut m = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (partition, changes, changelog_offset) in steps {
            for ch in changes.iter() {
                let key = (*partition, ch.table, ch.key.clone());
                match &ch.value {
                    Some(v) => {
                        m.records.insert(key, v.clone());
                    }
                    None => {
                        m.records.remove(&key);
                    }
                }
            }
            if let Some(o) = changelog_offset {
                m.progress.insert(*partition, *o);
            }
        }
        Ok(())
    }

    fn load(&self, partition: i32) -> Result<PartitionState, StoreError> {
        let m = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(PartitionState {
            records: m
                .records
                .iter()
                .filter(|((p, _, _), _)| *p == partition)
                .map(|((_, t, k), v)| (*t, k.clone(), v.clone()))
                .collect(),
            changelog_offset: m.progress.get(&partition).copied(),
            written_at_ms: m.progress.get(&partition).map(|_| jobmeter_core::Timestamp::now().0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, value: Option<&str>) -> StateChange {
        StateChange {
            table: Table::Jobs,
            key: key.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
        }
    }

    /// The double and RocksDB agree on the contract the pipeline relies on.
    #[test]
    fn mem_store_behaves_like_the_rocksdb_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rocks = Store::open(dir.path()).expect("open");
        let mem = MemStore::new();
        let stores: [&dyn StateStore; 2] = [&rocks, &mem];
        for s in stores {
            s.commit_many(&[(0, &[change("a", Some("1")), change("b", Some("2"))], Some(4))])
                .expect("write");
            s.commit_many(&[(0, &[change("a", None)], Some(7)), (1, &[change("c", Some("3"))], None)])
                .expect("write");
        }
        for p in [0, 1, 2] {
            let (r, m) = (rocks.load(p).expect("load"), mem.load(p).expect("load"));
            assert_eq!(r.records, m.records, "partition {p}");
            assert_eq!(r.changelog_offset, m.changelog_offset, "partition {p}");
        }
        assert_eq!(mem.load(0).expect("load").changelog_offset, Some(7));
    }

    #[test]
    fn a_failing_write_applies_nothing() {
        let mem = MemStore::new();
        mem.commit_many(&[(0, &[change("a", Some("1"))], Some(1))])
            .expect("write");
        mem.fail_writes(true);
        assert!(mem
            .commit_many(&[(0, &[change("a", None), change("b", Some("2"))], Some(2))])
            .is_err());
        let st = mem.load(0).expect("load");
        assert_eq!(st.records, vec![(Table::Jobs, b"a".to_vec(), b"1".to_vec())]);
        assert_eq!(st.changelog_offset, Some(1));
    }
}
