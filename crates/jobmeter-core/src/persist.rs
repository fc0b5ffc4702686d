//! Snapshot and restore of a meter's state as [`StateChange`] records.
//!
//! [`Meter::take_changes`] returns what changed since the last call (the
//! unit a store writes atomically); [`Meter::restore`] rebuilds a meter,
//! including its derived indexes, from the records a store holds.

use crate::meter::{deadline, Dirty, Meter, MeterConfig};
use crate::state::{keys, Counter, DecodeError, Job, JobKey, StateChange, StatementAcc, Table};
use crate::time::Timestamp;
use crate::values;

impl Meter {
    /// The state records changed since the last call, deletions included.
    /// Empty for a meter that does not track changes.
    pub fn take_changes(&mut self) -> Result<Vec<StateChange>, DecodeError> {
        let Some(d) = self.dirty.as_mut() else {
            return Ok(Vec::new());
        };
        let d = std::mem::take(d);
        let f = self.format;
        let Dirty {
            jobs,
            usage,
            fired,
            statements,
            closed,
            meta,
            adjustments,
        } = d;
        // Room for everything, the archive's index entries included (a
        // finished job's: its open-jobs entry, two event ids, its expiry):
        // a list this long regrown as it fills is copied and its memory
        // faulted in anew at each doubling.
        let index = if self.archive.is_some() {
            self.cold.local.len() + 4 * jobs.len()
        } else {
            0
        };
        let mut out = Vec::with_capacity(
            jobs.len() + index + usage.len() + fired.len() + statements.len() + adjustments.len() + closed.len() + 6,
        );
        let mut jobs: Vec<_> = jobs.into_iter().collect();
        jobs.sort();
        for k in &jobs {
            out.push(StateChange {
                table: Table::Jobs,
                key: keys::job(k),
                value: self
                    .jobs
                    .get(k)
                    .map(|v| values::encode(Table::Jobs, v, f))
                    .transpose()?,
            });
        }
        let archived = self.archive.is_some();
        self.cold.take_index_changes(archived, &self.jobs, &jobs, &mut out);
        let mut usage: Vec<_> = usage.into_iter().collect();
        usage.sort();
        for k in usage {
            out.push(StateChange {
                table: Table::Usage,
                key: keys::usage(&k),
                value: self
                    .usage
                    .get(&k)
                    .map(|v| values::encode(Table::Usage, v, f))
                    .transpose()?,
            });
        }
        for k in fired {
            out.push(StateChange {
                table: Table::Fired,
                key: keys::fired(&k),
                value: Some(Vec::new()),
            });
        }
        let mut statements: Vec<_> = statements.into_iter().collect();
        statements.sort();
        for (p, a) in statements {
            out.push(StateChange {
                table: Table::Statements,
                key: keys::statement(p, &a),
                value: self
                    .statements
                    .get(&p)
                    .and_then(|m| m.get(&a))
                    .map(|v| values::encode(Table::Statements, v, f))
                    .transpose()?,
            });
        }
        let mut adjustments: Vec<_> = adjustments.into_iter().collect();
        adjustments.sort();
        for (a, id) in adjustments {
            out.push(StateChange {
                table: Table::Adjustments,
                key: keys::adjustment(&a, &id),
                // JSON: written once per adjustment (and per end moved).
                value: self
                    .adjustments
                    .get(&a)
                    .and_then(|x| x.by_id.get(&id))
                    .map(|v| serde_json::to_vec(v).unwrap_or_default()),
            });
        }
        for st in closed {
            out.push(StateChange {
                table: Table::Closed,
                key: keys::statement(st.period, &st.account_id),
                value: Some(values::json(Table::Closed, &st)?),
            });
        }
        if meta {
            out.push(StateChange {
                table: Table::Meta,
                key: keys::STREAM_TIME.to_vec(),
                value: self.stream_time.map(|t| t.0.to_be_bytes().to_vec()),
            });
            out.push(StateChange {
                table: Table::Meta,
                key: keys::FEES_THROUGH.to_vec(),
                value: self.fees_through.map(|p| p.ordinal().to_be_bytes().to_vec()),
            });
            // Written only once set, so the state of a partition that
            // never saw either is the same as before they existed.
            if let Some(w) = self.input_watermark {
                out.push(StateChange {
                    table: Table::Meta,
                    key: keys::INPUT_WATERMARK.to_vec(),
                    value: Some(w.0.to_be_bytes().to_vec()),
                });
            }
            if self.merge_order {
                out.push(StateChange {
                    table: Table::Meta,
                    key: keys::EVENT_ORDER.to_vec(),
                    value: Some(Vec::new()),
                });
            }
            if let Some(v) = &self.merge_sources {
                out.push(StateChange {
                    table: Table::Meta,
                    key: keys::MERGE_SOURCES.to_vec(),
                    value: Some(v.clone()),
                });
            }
            if let Some(v) = &self.billing_cycle {
                out.push(StateChange {
                    table: Table::Meta,
                    key: keys::BILLING_CYCLE.to_vec(),
                    value: Some(v.clone()),
                });
            }
        }
        Ok(out)
    }

    /// Every state record the meter holds, as if all had changed. Closed
    /// statements are written once and not held, so they are not part of it.
    pub fn snapshot(&self) -> Result<Vec<StateChange>, DecodeError> {
        let mut copy = Dirty {
            jobs: self.jobs.keys().cloned().collect(),
            usage: self.usage.keys().cloned().collect(),
            fired: self.fired.iter().cloned().collect(),
            statements: self
                .statements
                .iter()
                .flat_map(|(p, m)| m.keys().map(move |a| (*p, a.clone())))
                .collect(),
            closed: Vec::new(),
            meta: true,
            adjustments: self
                .adjustments
                .iter()
                .flat_map(|(a, x)| x.by_id.keys().map(move |id| (a.clone(), id.clone())))
                .collect(),
        };
        copy.fired.sort();
        let mut view = Meter {
            stream_time: self.stream_time,
            fees_through: self.fees_through,
            input_watermark: self.input_watermark,
            merge_order: self.merge_order,
            merge_sources: self.merge_sources.clone(),
            billing_cycle: self.billing_cycle.clone(),
            dirty: Some(copy),
            format: self.format,
            ..Meter::default()
        };
        view.jobs = self.jobs.clone();
        view.usage = self.usage.clone();
        view.statements = self.statements.clone();
        view.adjustments = self.adjustments.clone();
        view.take_changes()
    }

    /// Rebuilds a meter from stored records (`(table, key, value)`), with
    /// change tracking on. Dedup keys and timers are derived from the jobs;
    /// the running-jobs index, which needs the plans, at the first event.
    pub fn restore<I>(records: I, config: &MeterConfig) -> Result<Meter, DecodeError>
    where
        I: IntoIterator<Item = (Table, Vec<u8>, Vec<u8>)>,
    {
        let mut m = Meter::tracking_changes().with_state_format(config.state_format);
        for (table, k, v) in records {
            m.restore_record(table, &k, &v).map_err(|e| e.at_key(&k))?;
        }
        let mut jobs = std::mem::take(&mut m.jobs);
        for (jk, job) in jobs.iter_mut() {
            m.adopt(jk, job, config.orphan_timeout_ms);
        }
        m.jobs = jobs;
        Ok(m)
    }

    /// Adds a job read from durable state to the derived indexes: its
    /// event ids, its timer, its expiry.
    pub(crate) fn adopt(&mut self, jk: &JobKey, job: &mut Job, orphan_timeout_ms: i64) {
        for k in &job.keys {
            self.seen.insert(*k);
        }
        if let Some(d) = deadline(job, orphan_timeout_ms) {
            self.timers.insert((d, jk.clone()));
            job.timer = Some(d);
            self.open += 1;
        }
        if let Some(e) = job.expires {
            self.expiry.insert((e, jk.clone()));
        }
    }

    /// Loads one stored record into this meter.
    fn restore_record(&mut self, table: Table, k: &[u8], v: &[u8]) -> Result<(), DecodeError> {
        let bad_key = || DecodeError::new(table, "malformed key");
        match table {
            Table::Jobs => {
                let key = keys::decode_job(k).ok_or_else(bad_key)?;
                let job: Job = values::decode(table, v)?;
                self.jobs.insert(key, Box::new(job));
            }
            Table::Usage => {
                let key = keys::decode_usage(k).ok_or_else(bad_key)?;
                let c: Counter = values::decode(table, v)?;
                self.usage.insert(key, c);
            }
            Table::Fired => {
                self.fired.insert(keys::decode_fired(k).ok_or_else(bad_key)?);
            }
            Table::Statements => {
                let (p, a) = keys::decode_statement(k).ok_or_else(bad_key)?;
                let acc: StatementAcc = values::decode(table, v)?;
                self.statements.entry(p).or_default().insert(a, acc);
            }
            Table::Adjustments => {
                let (a, id) = keys::decode_adjustment(k).ok_or_else(bad_key)?;
                let stored: crate::state::StoredAdjustment = serde_json::from_slice(v)
                    .map_err(|e| DecodeError::new(table, format!("adjustment {id:?}: {e}")))?;
                self.adjustments.entry(a).or_default().put(id, stored);
            }
            // Written for readers; the meter never needs them again.
            Table::Closed => {}
            // Indexes of the store, read through the archive.
            Table::EventIds | Table::Expiries | Table::OpenJobs => {}
            Table::Meta if k == keys::FEES_THROUGH => {
                let b: [u8; 4] = v
                    .try_into()
                    .map_err(|_| DecodeError::new(table, "fees_through is not 4 bytes"))?;
                self.fees_through = Some(crate::time::Period::from_ordinal(u32::from_be_bytes(b)));
            }
            Table::Meta if k == keys::STREAM_TIME => self.stream_time = Some(decode_time(table, "stream_time", v)?),
            Table::Meta if k == keys::INPUT_WATERMARK => {
                self.input_watermark = Some(decode_time(table, "input_watermark", v)?);
            }
            Table::Meta if k == keys::EVENT_ORDER => self.merge_order = true,
            Table::Meta if k == keys::MERGE_SOURCES => self.merge_sources = Some(v.to_vec()),
            Table::Meta if k == keys::BILLING_CYCLE => self.billing_cycle = Some(v.to_vec()),
            Table::Meta => {}
        }
        Ok(())
    }
}

/// A meta record holding a time: 8 bytes, big-endian milliseconds, inside
/// the range of [`Timestamp`].
fn decode_time(table: Table, what: &str, v: &[u8]) -> Result<Timestamp, DecodeError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| DecodeError::new(table, format!("{what} is not 8 bytes")))?;
    let t = Timestamp(i64::from_be_bytes(b));
    if t < Timestamp::MIN || t > Timestamp::MAX {
        return Err(DecodeError::new(table, format!("{what} {} ms is out of range", t.0)));
    }
    Ok(t)
}
