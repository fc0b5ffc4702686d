//! Applying pricing adjustments (§4b) to a partition's meter: each record
//! of the adjustments topic is checked ([`crate::adjust`]), deduplicated by
//! `adjustment_id` per account forever (the same content again is a
//! duplicate; other content under the same id is a conflict, dead-lettered)
//! and kept in the partition's state, where the charges of the account's
//! jobs find the price overrides in force.

use crate::adjust::{parse_adjustment, AdjustmentBody};
use crate::context::Context;
use crate::event::{Invalid, RejectReason};
use crate::meter::{ApplyError, Meter};
use crate::output::{Origin, Output};
use crate::state::StoredAdjustment;

impl Meter {
    /// Applies one record of the adjustments topic. A record that cannot
    /// apply goes to `out` as a reject with its reason; nothing else is
    /// emitted yet (overrides rate the charges emitted after them).
    pub fn apply_adjustment(
        &mut self,
        ctx: &Context<'_>,
        raw: &[u8],
        origin: Option<&Origin>,
        out: &mut Vec<Output>,
    ) -> Result<(), ApplyError> {
        let a = match parse_adjustment(raw, ctx.rates) {
            Ok(a) => a,
            Err(inv) => {
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                return Ok(());
            }
        };
        let account = self.adjustments.entry(a.account_id.clone()).or_default();
        if let Some(seen) = account.by_id.get(&a.adjustment_id) {
            if seen.adjustment == a {
                self.stats.duplicates += 1;
            } else {
                let inv = Invalid::new(
                    RejectReason::Conflict,
                    format!(
                        "adjustment {:?} of account {:?} was applied already with other content; ids are unique per account, forever",
                        a.adjustment_id,
                        a.account_id.as_str()
                    ),
                );
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
            }
            return Ok(());
        }
        let mut changed = vec![a.adjustment_id.clone()];
        if let AdjustmentBody::OverrideEnd { ends, effective_until } = &a.body {
            let Some(target) = account
                .by_id
                .get(ends)
                .filter(|s| matches!(s.adjustment.body, AdjustmentBody::PriceOverride(_)))
                .cloned()
            else {
                let inv = Invalid::new(
                    RejectReason::InvalidValue,
                    format!(
                        "`ends` {ends:?} names no price override of account {:?}",
                        a.account_id.as_str()
                    ),
                );
                self.reject(inv, raw.to_vec(), origin.cloned(), out);
                return Ok(());
            };
            account.put(
                ends.clone(),
                StoredAdjustment {
                    moved_until: Some(*effective_until),
                    ..target
                },
            );
            changed.push(ends.clone());
        }
        let (account_id, id) = (a.account_id.clone(), a.adjustment_id.clone());
        account.put(
            id,
            StoredAdjustment {
                adjustment: a,
                moved_until: None,
            },
        );
        if let Some(d) = self.dirty.as_mut() {
            for id in changed {
                d.adjustments.insert((account_id.clone(), id));
            }
        }
        Ok(())
    }
}
