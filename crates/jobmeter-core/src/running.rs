//! The running-jobs index of a meter: each running job's share of its
//! account's burn rates, and the sums per limit, kept up to date job by
//! job (derived from the jobs, never stored; see [`crate::spend`]).

use crate::money::{JobId, Money};
use crate::output::LimitKind;
use crate::plans::Plan;
use std::collections::BTreeMap;

/// What a running job adds to its account's burn rates: its rate, toward
/// each limit it counts toward (with that limit's value and plan, from the
/// terms in force at its start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Share {
    pub(crate) rate: Money,
    pub(crate) limits: Vec<(LimitKind, Money, Plan)>,
    pub(crate) stopped: bool,
}

/// The jobs running on an account against one limit (of one value, under
/// one plan).
#[derive(Debug, Clone, Default)]
pub(crate) struct Burn {
    pub(crate) rate: Money,
    pub(crate) jobs: u64,
    /// Of them, not yet sent a stop.
    pub(crate) unstopped: u64,
}

/// An account's running jobs and their burn rates by (limit kind, value,
/// plan), kept up to date job by job, so spend control costs the same per
/// event however many jobs an account runs. (Jobs started under different
/// account records can count toward one limit with different values; the
/// largest is used, so the result depends on the running jobs alone.)
#[derive(Debug, Clone, Default)]
pub(crate) struct AccountRunning {
    pub(crate) jobs: BTreeMap<JobId, Share>,
    pub(crate) burn: BTreeMap<(LimitKind, Money, Plan), Burn>,
}

impl AccountRunning {
    pub(crate) fn add(&mut self, id: JobId, share: Share) {
        for l in &share.limits {
            let b = self.burn.entry(*l).or_default();
            b.rate += share.rate;
            b.jobs += 1;
            b.unstopped += u64::from(!share.stopped);
        }
        self.jobs.insert(id, share);
    }

    pub(crate) fn remove(&mut self, id: &JobId) {
        let Some(share) = self.jobs.remove(id) else { return };
        for l in &share.limits {
            if let Some(b) = self.burn.get_mut(l) {
                b.rate -= share.rate;
                b.jobs -= 1;
                b.unstopped -= u64::from(!share.stopped);
                if b.jobs == 0 {
                    self.burn.remove(l);
                }
            }
        }
    }

    pub(crate) fn mark_stopped(&mut self, id: &JobId) {
        let Some(share) = self.jobs.get_mut(id).filter(|s| !s.stopped) else {
            return;
        };
        share.stopped = true;
        for l in &share.limits {
            if let Some(b) = self.burn.get_mut(l) {
                b.unstopped -= 1;
            }
        }
    }
}
