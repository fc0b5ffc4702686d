//! The meter's [`JobArchive`]: one partition's finished jobs, read from
//! RocksDB through the local indexes.

use crate::{prefix, prefixed, Store};
use jobmeter_core::archive::{decode_expiry_key, event_id_key, expiry_key, ArchiveError, JobArchive};
use jobmeter_core::event::EventKey;
use jobmeter_core::state::{keys, Job, JobKey, Table};
use jobmeter_core::Timestamp;
use rocksdb::{Direction, IteratorMode};
use std::sync::Arc;

/// The archive of one partition's meter.
#[derive(Debug, Clone)]
pub struct Archive {
    store: Arc<Store>,
    partition: i32,
}

impl Archive {
    /// The archive of `partition` in `store`.
    pub fn new(store: Arc<Store>, partition: i32) -> Archive {
        Archive { store, partition }
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> ArchiveError {
        ArchiveError::Read(format!("partition {}: {what}: {e}", self.partition))
    }
}

impl JobArchive for Archive {
    fn job(&self, jk: &JobKey) -> Result<Option<Job>, ArchiveError> {
        let cf = self.store.cf(Table::Jobs.name()).map_err(|e| self.fail("jobs", e))?;
        let v = self
            .store
            .db
            .get_pinned_cf(cf, prefixed(self.partition, &keys::job(jk)))
            .map_err(|e| self.fail("read a job", e))?;
        v.map(|v| {
            jobmeter_core::values::decode(Table::Jobs, &v).map_err(|e| ArchiveError::Corrupt(e.at_key(&keys::job(jk))))
        })
        .transpose()
    }

    fn has_event(&self, key: EventKey) -> Result<bool, ArchiveError> {
        let cf = self
            .store
            .cf(Table::EventIds.name())
            .map_err(|e| self.fail("event ids", e))?;
        self.store
            .db
            .get_pinned_cf(cf, prefixed(self.partition, &event_id_key(key)))
            .map(|v| v.is_some())
            .map_err(|e| self.fail("read an event id", e))
    }

    fn jobs_of(&self, account: &jobmeter_core::AccountId) -> Result<Vec<JobKey>, ArchiveError> {
        let cf = self.store.cf(Table::Jobs.name()).map_err(|e| self.fail("jobs", e))?;
        let from = prefixed(self.partition, &keys::account_prefix(account));
        let mut out = Vec::new();
        for item in self
            .store
            .db
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, _) = item.map_err(|e| self.fail("iterate an account's jobs", e))?;
            if !k.starts_with(&from) {
                break;
            }
            if let Some(jk) = keys::decode_job(&k[prefix(self.partition).len()..]) {
                if jk.0 == *account {
                    out.push(jk);
                }
            }
        }
        Ok(out)
    }

    fn expiring(
        &self,
        after: Option<&(Timestamp, JobKey)>,
        before: Timestamp,
        max: usize,
    ) -> Result<Vec<(Timestamp, JobKey)>, ArchiveError> {
        let cf = self
            .store
            .cf(Table::Expiries.name())
            .map_err(|e| self.fail("expiries", e))?;
        let p = prefix(self.partition);
        let from = match after {
            Some((t, jk)) => prefixed(self.partition, &expiry_key(*t, jk)),
            None => p.to_vec(),
        };
        let mut out = Vec::new();
        for item in self
            .store
            .db
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, _) = item.map_err(|e| self.fail("iterate expiries", e))?;
            if !k.starts_with(&p) || out.len() >= max {
                break;
            }
            if after.is_some() && *k == *from {
                continue;
            }
            let Some((t, jk)) = decode_expiry_key(&k[4..]) else {
                return Err(self.fail("decode an expiry entry", "malformed key"));
            };
            if t >= before {
                break;
            }
            out.push((t, jk));
        }
        Ok(out)
    }
}
