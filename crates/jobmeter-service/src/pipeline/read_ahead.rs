//! One input partition as the merge reads it ([`ReadAhead`]), and the
//! merge's queues as [`jobmeter_core::order::pick`] sees them ([`View`]).

use crate::engine::{Engine, EngineError, MeterContext};
use jobmeter_core::order::{Head, MergeKey, MergeQueue, QueueState};
use std::time::Duration;

/// The consumer's queue of one partition.
pub(super) type Queue = rdkafka::consumer::base_consumer::PartitionQueue<MeterContext>;

/// How many records of one input partition the merge reads ahead of what
/// it has applied, at most (what it holds in memory; the partition is not
/// read further until its head is taken).
pub(super) const READ_AHEAD: usize = 8_192;

/// How many records of one input partition one turn of the merge reads.
pub(super) const READ_AHEAD_TURN: usize = 1_024;

/// A record read ahead by the merge: its event (parsed once), merge key and
/// meter, and whether it was forwarded already.
pub(super) struct ReadRecord<'q> {
    pub(super) msg: rdkafka::message::BorrowedMessage<'q>,
    pub(super) parsed: Option<jobmeter_core::JobEvent>,
    pub(super) head: Head,
    pub(super) forwarded: bool,
}

/// One input partition as the merge reads it: the records read and not yet
/// taken, in offset order; the partition's watermark through the last one
/// read (`None` before the first read); whether it has reached the end of
/// what Kafka holds.
/// `firsts[d]` holds the merge keys of the records read for partition
/// `d`'s meter, in order: what the partition holds back of that meter.
#[derive(Default)]
pub(super) struct ReadAhead<'q> {
    pub(super) buf: std::collections::VecDeque<ReadRecord<'q>>,
    firsts: Vec<std::collections::VecDeque<MergeKey>>,
    watermark: Option<Option<jobmeter_core::Timestamp>>,
    pub(super) at_end: bool,
}

impl<'q> ReadAhead<'q> {
    /// Takes the next record read.
    pub(super) fn pop(&mut self) -> Option<ReadRecord<'q>> {
        let x = self.buf.pop_front()?;
        if let Some(d) = x.head.dest {
            if let Some(keys) = usize::try_from(d).ok().and_then(|d| self.firsts.get_mut(d)) {
                keys.pop_front();
            }
        }
        Some(x)
    }

    fn push(&mut self, x: ReadRecord<'q>) {
        if let Some(d) = x.head.dest.and_then(|d| usize::try_from(d).ok()) {
            if self.firsts.len() <= d {
                self.firsts.resize_with(d + 1, Default::default);
            }
            self.firsts[d].push_back(x.head.key);
        }
        self.buf.push_back(x);
    }

    /// Reads up to `max` more records of partition `p` from `queue`, while
    /// fewer than [`READ_AHEAD`] wait. Each is keyed as it is read, and a
    /// record for a meter held elsewhere is forwarded at once.
    pub(super) fn fill(&mut self, e: &mut Engine, p: i32, queue: &'q Queue, max: usize) -> Result<(), EngineError> {
        use rdkafka::message::Message;
        if e.is_failing(p) {
            self.at_end = true;
            return Ok(());
        }
        for _ in 0..max {
            if self.buf.len() >= READ_AHEAD {
                break;
            }
            match queue.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    let parsed =
                        jobmeter_core::parse_job_event_with(m.payload().unwrap_or_default(), &mut e.account_ids).ok();
                    let key = e.read_key(&m, parsed.as_ref(), &mut self.watermark)?;
                    let forwarded = e.forward_ahead(&m, parsed.as_ref(), key)?;
                    let dest = if forwarded { None } else { e.dest(p, parsed.as_ref()) };
                    self.push(ReadRecord {
                        msg: m,
                        parsed,
                        head: Head { key, dest },
                        forwarded,
                    });
                    self.at_end = false;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    self.at_end = true;
                    break;
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, partition = p, "consumer error");
                    break;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// The smallest merge key the partition's next unread record can have
    /// (`None` when `p` is not metered here).
    pub(super) fn bound(&self, e: &Engine, p: i32) -> Option<(i64, i32)> {
        match self.watermark {
            Some(w) => Some(MergeKey::bound(w, p)),
            None => e.input_bound(p),
        }
    }
}

/// One of the merge's queues as [`jobmeter_core::order::pick`] sees it: an
/// input partition read ahead (every record read is at hand, with its
/// meter; `bound` and `ended` say what it may still deliver), or a queue
/// of records forwarded by another instance.
pub(super) enum View<'a, 'q> {
    Input {
        r: &'a ReadAhead<'q>,
        bound: Option<(i64, i32)>,
        ended: bool,
    },
    Other(QueueState),
}

impl MergeQueue for View<'_, '_> {
    fn head(&self) -> Option<Head> {
        match self {
            View::Input { r, .. } => r.buf.front().map(|x| x.head),
            View::Other(q) => q.head(),
        }
    }

    /// A partition read ahead holds back a meter with the first record it
    /// read for it, or, when it read none, with its bound until it has
    /// read all Kafka holds.
    fn first_for(&self, dest: i32) -> Option<(MergeKey, bool)> {
        match self {
            View::Input { r, bound, ended } => usize::try_from(dest)
                .ok()
                .and_then(|d| r.firsts.get(d))
                .and_then(|keys| keys.front())
                .map(|k| (*k, true))
                .or_else(|| (!ended).then(|| (MergeKey::below(*bound), false))),
            View::Other(q) => q.first_for(dest),
        }
    }
}

/// The merge's queues: the input partitions (`ends[i]`: their bound, and
/// whether they have nothing left to read), then the forwarded ones.
pub(super) fn views<'a, 'q>(
    ins: &'a [ReadAhead<'q>],
    ends: &[(Option<(i64, i32)>, bool)],
    remote: &[((i32, i32), QueueState)],
    out: &mut Vec<View<'a, 'q>>,
) {
    out.clear();
    out.extend(ins.iter().zip(ends).map(|(r, (bound, ended))| View::Input {
        r,
        bound: *bound,
        ended: *ended,
    }));
    out.extend(remote.iter().map(|(_, s)| View::Other(*s)));
}
