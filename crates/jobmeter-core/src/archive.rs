//! Finished jobs kept out of the meter's memory.
//!
//! A finished job (charged, or otherwise inert) is only needed again to
//! recognise a late duplicate, to reject a conflicting start or stop, to
//! adjust an orphan charge when its stop arrives late, and to be forgotten
//! when its retention ends. A meter with a [`JobArchive`] keeps such jobs
//! in memory only until the batch that wrote them is durable
//! ([`crate::Meter::release_stored`]); after that it reads them back from
//! the archive when an event names them, and finds the ones whose
//! retention ended by the archive's expiry index.
//!
//! The archive is the store of record read through three local indexes
//! that the meter writes next to its job records ([`index_changes`],
//! [`unindex_changes`]) and that never travel through the changelog (a
//! store restored from the changelog derives them from the jobs):
//!
//! ```text
//! event_ids : event key (16 bytes BE)                 -> (empty)  ids of archived jobs' starts and stops
//! expiries  : expiry (8 bytes, order-preserving) | job key -> (empty)
//! open_jobs : job key                                 -> (empty)  jobs with a deadline: what a restore loads
//! ```

use crate::event::EventKey;
use crate::state::{keys, Job, JobKey, StateChange, Table};
use crate::time::Timestamp;
use std::collections::{BTreeMap, BTreeSet};

/// Why the archive could not answer. The meter cannot go on correctly
/// without the answer: the caller must drop the batch and rebuild the meter
/// from durable state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// A store read failed (it may succeed when retried).
    #[error("job archive read failed: {0}")]
    Read(String),
    /// A stored job cannot be decoded: retrying cannot help.
    #[error("job archive: {0}")]
    Corrupt(crate::state::DecodeError),
}

/// Read access to the jobs a meter has let go of: its partition's stored
/// state as of the last durable batch.
pub trait JobArchive: std::fmt::Debug + Send {
    /// The stored job `jk`, if any.
    fn job(&self, jk: &JobKey) -> Result<Option<Job>, ArchiveError>;
    /// True when `key` is the start or stop of a stored finished job.
    fn has_event(&self, key: EventKey) -> Result<bool, ArchiveError>;
    /// The keys of every stored job of `account` (a price override re-rates
    /// its usage already charged).
    fn jobs_of(&self, account: &crate::money::AccountId) -> Result<Vec<JobKey>, ArchiveError>;
    /// Expiry entries strictly after `after` (all when `None`) and before
    /// `before`, in order, at most `max` of them.
    fn expiring(
        &self,
        after: Option<&(Timestamp, JobKey)>,
        before: Timestamp,
        max: usize,
    ) -> Result<Vec<(Timestamp, JobKey)>, ArchiveError>;
}

/// The archive bookkeeping of a meter.
#[derive(Debug, Default)]
pub(crate) struct Cold {
    /// The number of the batch being built (`Meter::take_changes` ends it).
    pub(crate) gen: u64,
    /// Batches up to this number are durable.
    pub(crate) durable: Option<u64>,
    /// Jobs in memory that may leave it once the batch of the given number
    /// is durable (finished jobs written in it, jobs read back in it).
    pub(crate) unstored: crate::fasthash::FastMap<JobKey, u64>,
    /// Jobs forgotten in a batch not yet durable (the archive still has
    /// them), and their event ids.
    pub(crate) tombs: crate::fasthash::FastMap<JobKey, u64>,
    pub(crate) tomb_keys: crate::fasthash::FastMap<EventKey, u64>,
    /// The last archive expiry entry handled, and the first one after it
    /// (`None`: not known; `Some(None)`: there is none).
    pub(crate) cursor: Option<(Timestamp, JobKey)>,
    pub(crate) next: Option<Option<Timestamp>>,
    /// Index deletions of the batch being built.
    pub(crate) local: Vec<StateChange>,
    /// Open jobs whose `open_jobs` entry is written (in a durable batch or
    /// one taken): an entry is written when a job is open at the end of a
    /// batch, and deleted only if it was.
    pub(crate) listed_open: crate::fasthash::FastSet<JobKey>,
}

/// Key of an `event_ids` entry.
pub fn event_id_key(k: EventKey) -> Vec<u8> {
    k.0.to_be_bytes().to_vec()
}

/// Key of an `expiries` entry: the time with its sign bit flipped (so
/// byte order is time order), then the job key.
pub fn expiry_key(at: Timestamp, jk: &JobKey) -> Vec<u8> {
    let mut out = ((at.0 as u64) ^ (1 << 63)).to_be_bytes().to_vec();
    out.extend_from_slice(&keys::job(jk));
    out
}

/// Inverse of [`expiry_key`].
pub fn decode_expiry_key(b: &[u8]) -> Option<(Timestamp, JobKey)> {
    let t: [u8; 8] = b.get(..8)?.try_into().ok()?;
    let at = Timestamp((u64::from_be_bytes(t) ^ (1 << 63)) as i64);
    Some((at, keys::decode_job(&b[8..])?))
}

fn local(table: Table, key: Vec<u8>, put: bool) -> StateChange {
    StateChange {
        table,
        key,
        value: put.then(Vec::new),
    }
}

/// The index entries of `job` as just written: an `open` job (one with a
/// deadline) is listed in `open_jobs`; a finished one is not (its entry is
/// deleted when it may have one: `listed`), and its event ids and expiry
/// are indexed.
pub fn index_changes(jk: &JobKey, job: &Job, open: bool, listed: bool, out: &mut Vec<StateChange>) {
    let key = keys::job(jk);
    if open {
        out.push(local(Table::OpenJobs, key, true));
        return;
    }
    if listed {
        out.push(local(Table::OpenJobs, key, false));
    }
    for k in &job.keys {
        out.push(local(Table::EventIds, event_id_key(*k), true));
    }
    if let Some(e) = job.expires {
        out.push(local(Table::Expiries, expiry_key(e, jk), true));
    }
}

/// The deletions of every index entry `job` may have, as it is forgotten.
pub fn unindex_changes(jk: &JobKey, job: &Job, out: &mut Vec<StateChange>) {
    out.push(local(Table::OpenJobs, keys::job(jk), false));
    for k in &job.keys {
        out.push(local(Table::EventIds, event_id_key(*k), false));
    }
    if let Some(e) = job.expires {
        out.push(local(Table::Expiries, expiry_key(e, jk), false));
    }
}

/// A [`JobArchive`] in memory that applies a meter's changes as a store
/// would (tests, and the reference for the RocksDB one).
#[derive(Debug, Default, Clone)]
pub struct MemArchive {
    jobs: BTreeMap<Vec<u8>, Vec<u8>>,
    event_ids: BTreeSet<Vec<u8>>,
    expiries: BTreeSet<Vec<u8>>,
    open: BTreeSet<Vec<u8>>,
}

impl MemArchive {
    /// An empty archive.
    pub fn new() -> MemArchive {
        MemArchive::default()
    }

    /// Applies one batch of changes (as a store commit would).
    pub fn apply(&mut self, changes: &[StateChange]) {
        for c in changes {
            let set = match c.table {
                Table::Jobs => {
                    match &c.value {
                        Some(v) => self.jobs.insert(c.key.clone(), v.clone()),
                        None => self.jobs.remove(&c.key),
                    };
                    continue;
                }
                Table::EventIds => &mut self.event_ids,
                Table::Expiries => &mut self.expiries,
                Table::OpenJobs => &mut self.open,
                _ => continue,
            };
            if c.value.is_some() {
                set.insert(c.key.clone());
            } else {
                set.remove(&c.key);
            }
        }
    }

    /// Number of job records held.
    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Number of `(event_ids, expiries, open_jobs)` entries.
    pub fn index_sizes(&self) -> (usize, usize, usize) {
        (self.event_ids.len(), self.expiries.len(), self.open.len())
    }
}

impl JobArchive for MemArchive {
    fn job(&self, jk: &JobKey) -> Result<Option<Job>, ArchiveError> {
        self.jobs
            .get(&keys::job(jk))
            .map(|v| crate::values::decode(Table::Jobs, v).map_err(|e| ArchiveError::Corrupt(e.at_key(&keys::job(jk)))))
            .transpose()
    }

    fn has_event(&self, key: EventKey) -> Result<bool, ArchiveError> {
        Ok(self.event_ids.contains(&event_id_key(key)))
    }

    fn jobs_of(&self, account: &crate::money::AccountId) -> Result<Vec<JobKey>, ArchiveError> {
        let p = keys::account_prefix(account);
        Ok(self
            .jobs
            .range(p.clone()..)
            .take_while(|(k, _)| k.starts_with(&p))
            .filter_map(|(k, _)| keys::decode_job(k))
            .filter(|jk| jk.0 == *account)
            .collect())
    }

    fn expiring(
        &self,
        after: Option<&(Timestamp, JobKey)>,
        before: Timestamp,
        max: usize,
    ) -> Result<Vec<(Timestamp, JobKey)>, ArchiveError> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, |(t, jk)| Bound::Excluded(expiry_key(*t, jk)));
        Ok(self
            .expiries
            .range((from, Bound::Unbounded))
            .filter_map(|k| decode_expiry_key(k))
            .take_while(|(t, _)| *t < before)
            .take(max)
            .collect())
    }
}

/// A shared [`MemArchive`] (the meter holds one handle, the test that
/// plays the store the other).
#[derive(Debug, Default, Clone)]
pub struct SharedMemArchive(pub std::sync::Arc<std::sync::Mutex<MemArchive>>);

impl SharedMemArchive {
    fn with<R>(&self, f: impl FnOnce(&MemArchive) -> R) -> R {
        f(&self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Applies one batch of changes.
    pub fn apply(&self, changes: &[StateChange]) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(changes);
    }

    /// Number of job records held.
    pub fn jobs(&self) -> usize {
        self.with(MemArchive::jobs)
    }
}

impl JobArchive for SharedMemArchive {
    fn job(&self, jk: &JobKey) -> Result<Option<Job>, ArchiveError> {
        self.with(|a| a.job(jk))
    }

    fn has_event(&self, key: EventKey) -> Result<bool, ArchiveError> {
        self.with(|a| a.has_event(key))
    }

    fn jobs_of(&self, account: &crate::money::AccountId) -> Result<Vec<JobKey>, ArchiveError> {
        self.with(|a| a.jobs_of(account))
    }

    fn expiring(
        &self,
        after: Option<&(Timestamp, JobKey)>,
        before: Timestamp,
        max: usize,
    ) -> Result<Vec<(Timestamp, JobKey)>, ArchiveError> {
        self.with(|a| a.expiring(after, before, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{AccountId, JobId};

    #[test]
    fn expiry_keys_sort_by_time_and_round_trip() {
        let jk: JobKey = (AccountId::from("a"), JobId::from("j"));
        let times = [
            Timestamp::MIN,
            Timestamp(-5),
            Timestamp(0),
            Timestamp(7),
            Timestamp::MAX,
        ];
        let encoded: Vec<_> = times.iter().map(|t| expiry_key(*t, &jk)).collect();
        let mut sorted = encoded.clone();
        sorted.sort();
        assert_eq!(sorted, encoded);
        for (t, k) in times.iter().zip(&encoded) {
            assert_eq!(decode_expiry_key(k), Some((*t, jk.clone())));
        }
        assert_eq!(decode_expiry_key(&[1, 2, 3]), None);
    }

    /// Job ids either side of the length held inline (23 bytes), in one-
    /// and multi-byte text, survive the job key and its expiry key and are
    /// found by the ids they decode to.
    #[test]
    fn job_keys_round_trip_either_side_of_the_inline_length() {
        let ids = [
            "x".repeat(22),
            "x".repeat(23),
            "x".repeat(24),
            format!("{}é", "x".repeat(21)),
            format!("{}é", "x".repeat(22)),
            format!("{}🚀", "x".repeat(19)),
            format!("{}🚀", "x".repeat(20)),
            " job with spaces ".to_owned(),
        ];
        let mut table: crate::fasthash::FastMap<JobKey, usize> = Default::default();
        for (i, id) in ids.iter().enumerate() {
            table.insert((AccountId::from("acct-1"), JobId::from(id.as_str())), i);
        }
        assert_eq!(table.len(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            let jk: JobKey = (AccountId::from("acct-1"), JobId::from(id.as_str()));
            let back = keys::decode_job(&keys::job(&jk));
            assert_eq!(back.as_ref(), Some(&jk), "{id:?}");
            assert_eq!(back.as_ref().map(|k| k.1.as_str()), Some(id.as_str()));
            assert_eq!(
                back.and_then(|k| table.get(&k).copied()),
                Some(i),
                "{id:?} is found by its decoded key"
            );
            let at = Timestamp(1_714_521_600_000);
            assert_eq!(decode_expiry_key(&expiry_key(at, &jk)), Some((at, jk.clone())));
        }
    }

    /// The longest ids the parser lets through, in multi-byte text, at the
    /// edges of time, survive the index keys and the in-memory archive.
    #[test]
    fn index_keys_hold_the_longest_multibyte_ids() {
        let long = |unit: &str| {
            let mut s = String::new();
            while s.len() + unit.len() <= crate::event::MAX_ID_BYTES {
                s.push_str(unit);
            }
            s
        };
        let jk: JobKey = (AccountId::from(long("界").as_str()), JobId::from(long("🚀").as_str()));
        let job = Job {
            keys: vec![EventKey(u128::MAX), EventKey(0)],
            expires: Some(Timestamp::MAX),
            ..Job::default()
        };
        let mut changes = vec![StateChange {
            table: Table::Jobs,
            key: keys::job(&jk),
            value: Some(crate::values::encode(Table::Jobs, &job, crate::state::StateFormat::Binary).expect("encode")),
        }];
        index_changes(&jk, &job, false, true, &mut changes);
        let mut a = MemArchive::new();
        a.apply(&changes);
        assert_eq!(a.job(&jk).expect("read"), Some(job.clone()));
        assert!(a.has_event(EventKey(u128::MAX)).expect("read") && a.has_event(EventKey(0)).expect("read"));
        assert_eq!(
            a.expiring(None, Timestamp::MAX, 10).expect("read"),
            Vec::<(Timestamp, JobKey)>::new(),
            "an expiry at the end of time is never before it"
        );
        assert_eq!(
            a.expiring(None, Timestamp(i64::MAX), 10).expect("read"),
            vec![(Timestamp::MAX, jk.clone())]
        );
        let mut gone = Vec::new();
        unindex_changes(&jk, &job, &mut gone);
        a.apply(&gone);
        assert_eq!(a.index_sizes(), (0, 0, 0));
    }
}
