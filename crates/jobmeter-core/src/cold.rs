//! A meter with a [`JobArchive`]: finished jobs leave memory once the batch
//! that wrote them is durable, and are read back from the archive when an
//! event names them or their retention ends.
//!
//! Read-your-writes without the store's help: a job stays in memory while
//! any batch that changed it is not durable, and a job forgotten in such a
//! batch is remembered as forgotten (a tombstone) until it is, so the
//! archive (the durable state) is only asked about what it is current on.

use crate::archive::{index_changes, unindex_changes, ArchiveError, Cold, JobArchive};
use crate::event::EventKey;
use crate::meter::Meter;
use crate::state::{Job, JobKey, StateChange, Table};
use crate::time::Timestamp;

/// How many expiry entries one archive read returns.
const EXPIRY_PAGE: usize = 256;

impl Meter {
    /// The same meter keeping finished jobs in `archive` instead of memory.
    /// Inert jobs it holds now (restored from durable state) leave memory
    /// at once.
    pub fn with_archive(mut self, archive: Box<dyn JobArchive>) -> Self {
        self.archive = Some(archive);
        // Open jobs restored from durable state are listed there.
        self.cold.listed_open = self
            .jobs
            .iter()
            .filter(|(_, j)| j.expires.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let inert: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.expires.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let dirty = self.dirty.as_ref().map(|d| &d.jobs);
        let inert: Vec<JobKey> = inert
            .into_iter()
            .filter(|jk| dirty.is_none_or(|d| !d.contains(jk)))
            .collect();
        for jk in inert {
            self.evict(&jk);
        }
        self
    }

    /// Every batch taken with [`Meter::take_changes`] before the last one
    /// is durable: finished jobs written in them leave memory.
    pub fn release_stored(&mut self) {
        if let Some(through) = self.cold.gen.checked_sub(2) {
            self.release_through(through);
        }
    }

    /// Every batch taken with [`Meter::take_changes`] is durable.
    pub fn release_all_stored(&mut self) {
        if let Some(through) = self.cold.gen.checked_sub(1) {
            self.release_through(through);
        }
    }

    fn release_through(&mut self, through: u64) {
        if self.cold.durable.is_some_and(|d| d >= through) {
            return;
        }
        self.cold.durable = Some(through);
        if self.archive.is_none() {
            return;
        }
        let c = &mut self.cold;
        c.tombs.retain(|_, g| *g > through);
        c.tomb_keys.retain(|_, g| *g > through);
        let mut due = Vec::new();
        c.unstored.retain(|jk, g| {
            if *g <= through {
                due.push(jk.clone());
                false
            } else {
                true
            }
        });
        let dirty = self.dirty.as_ref().map(|d| &d.jobs);
        let due: Vec<JobKey> = due
            .into_iter()
            .filter(|jk| dirty.is_none_or(|d| !d.contains(jk)))
            .collect();
        if !due.is_empty() {
            // What the archive said about its first expiry was said before
            // these jobs' entries were durable: ask again.
            self.cold.next = None;
        }
        for jk in due {
            self.evict(&jk);
        }
    }

    /// Lets an inert job go from memory (it is durable in the archive).
    fn evict(&mut self, jk: &JobKey) {
        let Some(slot) = self.jobs.slot(jk) else { return };
        // Inert: no deadline (a stale timer entry of a finished job is
        // dropped when it comes due and finds no job).
        if self.jobs.at(slot).is_none_or(|j| j.expires.is_none()) {
            return;
        }
        if let Some(job) = self.jobs.remove(jk) {
            for k in &job.keys {
                self.seen.remove(k);
            }
            if let Some(e) = job.expires {
                self.expiry.remove(&(e, jk.clone()));
            }
        }
    }

    /// Reads `jk` back from the archive into memory; its slot, or `None`
    /// when the archive does not have it (or forgot it in a batch that is
    /// not durable yet).
    pub(crate) fn fault_in(&mut self, ctx_timeout_ms: i64, jk: &JobKey) -> Result<Option<u32>, ArchiveError> {
        let Some(archive) = self.archive.as_ref() else {
            return Ok(None);
        };
        if self.cold.tombs.contains_key(jk) {
            return Ok(None);
        }
        let Some(job) = archive.job(jk)? else {
            return Ok(None);
        };
        let mut job = Box::new(job);
        self.adopt(jk, &mut job, ctx_timeout_ms);
        self.cold.unstored.insert(jk.clone(), self.cold.gen);
        self.jobs.insert(jk.clone(), job);
        Ok(self.jobs.slot(jk))
    }

    /// True when `key` belongs to an archived job the meter has not
    /// forgotten.
    pub(crate) fn archived_event(&mut self, key: EventKey) -> Result<bool, ArchiveError> {
        let Some(archive) = self.archive.as_ref() else {
            return Ok(false);
        };
        if self.cold.tomb_keys.contains_key(&key) {
            return Ok(false);
        }
        archive.has_event(key)
    }

    /// A job is forgotten: with an archive, its index entries go and the
    /// archive's copy is ignored until the deletion is durable.
    pub(crate) fn forgotten(&mut self, jk: &JobKey, job: &Job) {
        if self.archive.is_some() {
            self.tombstone(jk, job);
        }
    }

    fn tombstone(&mut self, jk: &JobKey, job: &Job) {
        let g = self.cold.gen;
        self.cold.tombs.insert(jk.clone(), g);
        for k in &job.keys {
            self.cold.tomb_keys.insert(*k, g);
        }
        self.cold.unstored.remove(jk);
        // Its open-jobs entry, if any, is deleted with the rest.
        self.cold.listed_open.remove(jk);
        unindex_changes(jk, job, &mut self.cold.local);
    }

    /// Forgets the archived jobs whose retention ended before stream time
    /// `st` (the ones in memory have their own index).
    pub(crate) fn expire_archived(&mut self, st: Timestamp) -> Result<(), ArchiveError> {
        let Some(archive) = self.archive.take() else {
            return Ok(());
        };
        let r = self.expire_archived_with(archive.as_ref(), st);
        self.archive = Some(archive);
        r
    }

    fn expire_archived_with(&mut self, archive: &dyn JobArchive, st: Timestamp) -> Result<(), ArchiveError> {
        loop {
            let next = match self.cold.next {
                Some(n) => n,
                None => {
                    let v = archive.expiring(self.cold.cursor.as_ref(), Timestamp::MAX, 1)?;
                    let n = v.first().map(|(t, _)| *t);
                    self.cold.next = Some(n);
                    n
                }
            };
            if next.is_none_or(|n| n >= st) {
                return Ok(());
            }
            let page = archive.expiring(self.cold.cursor.as_ref(), st, EXPIRY_PAGE)?;
            self.cold.next = None;
            if page.is_empty() {
                // The entry ahead of the cursor is not due after all (or
                // went): look again on the next event.
                return Ok(());
            }
            for (e, jk) in page {
                self.cold.cursor = Some((e, jk.clone()));
                if self.cold.tombs.contains_key(&jk) {
                    continue;
                }
                if let Some(job) = self.jobs.get(&jk) {
                    // In memory: the in-memory index decides; an entry of an
                    // older expiry is stale.
                    if job.expires != Some(e) {
                        self.cold.local.push(stale(e, &jk));
                    }
                    continue;
                }
                match archive.job(&jk)? {
                    Some(job) if job.expires == Some(e) => {
                        self.tombstone(&jk, &job);
                        if let Some(d) = self.dirty.as_mut() {
                            d.jobs.insert(jk);
                        }
                    }
                    _ => self.cold.local.push(stale(e, &jk)),
                }
            }
        }
    }
}

impl Cold {
    /// The index changes of the batch being taken, after its job records:
    /// the deletions of forgotten jobs' entries, then each written job's
    /// (`written`: keys of the jobs written, looked up in `jobs`; a key not
    /// there was deleted). Ends the batch.
    pub(crate) fn take_index_changes(
        &mut self,
        archived: bool,
        jobs: &crate::jobs::JobTable,
        written: &[JobKey],
        out: &mut Vec<StateChange>,
    ) {
        let g = self.gen;
        self.gen += 1;
        if !archived {
            return;
        }
        // Deletions first: a job forgotten and then started again in the
        // same batch is indexed as it is now.
        out.append(&mut self.local);
        for jk in written {
            let Some(job) = jobs.get(jk) else { continue };
            // A job has an expiry exactly when it has no deadline.
            let open = job.expires.is_none();
            if open {
                if self.listed_open.insert(jk.clone()) {
                    index_changes(jk, job, true, false, out);
                }
                continue;
            }
            let listed = self.listed_open.remove(jk);
            index_changes(jk, job, false, listed, out);
            self.unstored.insert(jk.clone(), g);
        }
    }
}

fn stale(e: Timestamp, jk: &JobKey) -> StateChange {
    StateChange {
        table: Table::Expiries,
        key: crate::archive::expiry_key(e, jk),
        value: None,
    }
}
