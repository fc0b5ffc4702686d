//! The meter's job table: a hash index from job key to a slot in a slab.
//!
//! Applying an event takes the job out of its slot, works on it, and puts
//! it back by slot number, so each event costs one hash lookup instead of a
//! remove and a re-insert.

use crate::fasthash::FastMap;
use crate::state::{Job, JobKey};

/// Jobs by key.
#[derive(Debug, Default, Clone)]
pub(crate) struct JobTable {
    index: FastMap<JobKey, u32>,
    slab: Vec<Option<Box<Job>>>,
    free: Vec<u32>,
}

impl JobTable {
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn slot(&self, jk: &JobKey) -> Option<u32> {
        self.index.get(jk).copied()
    }

    pub(crate) fn at(&self, slot: u32) -> Option<&Job> {
        self.slab.get(slot as usize).and_then(|j| j.as_deref())
    }

    pub(crate) fn get(&self, jk: &JobKey) -> Option<&Job> {
        self.slot(jk).and_then(|s| self.at(s))
    }

    pub(crate) fn get_mut(&mut self, jk: &JobKey) -> Option<&mut Job> {
        let s = self.slot(jk)?;
        self.slab.get_mut(s as usize).and_then(|j| j.as_deref_mut())
    }

    /// Takes the job out of `slot` (found earlier with [`JobTable::slot`]),
    /// or creates an empty one for `jk` in a new slot.
    pub(crate) fn take(&mut self, slot: Option<u32>, jk: &JobKey) -> (u32, Box<Job>) {
        if let Some(s) = slot {
            if let Some(j) = self.slab.get_mut(s as usize).and_then(Option::take) {
                return (s, j);
            }
            return (s, Box::default());
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slab.push(None);
                (self.slab.len() - 1) as u32
            }
        };
        self.index.insert(jk.clone(), s);
        (s, Box::default())
    }

    /// Puts a job back into its slot.
    pub(crate) fn put(&mut self, slot: u32, job: Box<Job>) {
        if let Some(x) = self.slab.get_mut(slot as usize) {
            *x = Some(job);
        }
    }

    /// Inserts or replaces `jk` (restores).
    pub(crate) fn insert(&mut self, jk: JobKey, job: Box<Job>) {
        let slot = self.slot(&jk);
        let (s, _) = self.take(slot, &jk);
        self.put(s, job);
    }

    pub(crate) fn remove(&mut self, jk: &JobKey) -> Option<Box<Job>> {
        let s = self.index.remove(jk)?;
        self.free.push(s);
        self.slab.get_mut(s as usize).and_then(Option::take)
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &JobKey> {
        self.index.keys()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&JobKey, &Job)> {
        self.index.iter().filter_map(|(k, s)| self.at(*s).map(|j| (k, j)))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&JobKey, &mut Job)> {
        let slab = &mut self.slab;
        // Slots are distinct, so handing out one &mut per slot is sound; do
        // it safely by walking the slab and looking keys up by slot.
        let mut by_slot: Vec<Option<&JobKey>> = vec![None; slab.len()];
        for (k, s) in &self.index {
            if let Some(x) = by_slot.get_mut(*s as usize) {
                *x = Some(k);
            }
        }
        slab.iter_mut()
            .zip(by_slot)
            .filter_map(|(j, k)| Some((k?, j.as_deref_mut()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{AccountId, JobId};

    fn key(j: &str) -> JobKey {
        (AccountId::from("a"), JobId::from(j))
    }

    #[test]
    fn take_put_remove_reuse_slots() {
        let mut t = JobTable::default();
        let (s1, mut j) = t.take(None, &key("1"));
        j.last_heartbeat = Some(crate::time::Timestamp(5));
        t.put(s1, j);
        assert_eq!(
            t.get(&key("1")).and_then(|j| j.last_heartbeat),
            Some(crate::time::Timestamp(5))
        );
        let (s2, j2) = t.take(None, &key("2"));
        t.put(s2, j2);
        assert_ne!(s1, s2);
        assert!(t.remove(&key("1")).is_some());
        let (s3, _) = t.take(None, &key("3"));
        assert_eq!(s3, s1, "freed slot is reused");
        assert_eq!(t.len(), 2);
        assert!(t.get(&key("1")).is_none());
        assert_eq!(t.iter_mut().count(), 1, "slot 3 is empty until put back");
    }
}
