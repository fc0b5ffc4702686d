//! One merge round: the poll loop of one assignment.

use super::clock::{MergeClock, Turn};
use super::read_ahead::{views, Queue, ReadAhead, View, READ_AHEAD_TURN};
use super::{after_step, read_to_end, Chores};
use crate::engine::{Engine, EngineError, MeterContext};
use crate::Deps;
use jobmeter_core::order::{pick, run_limit, MergeKey, Pick, QueueState};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// At most this many picks in one turn of the poll loop (then the loop's
/// chores: the main queue, ends, commits).
const PICKS_PER_TURN: usize = 4_096;
/// At most this many forwarded records read from one repartition
/// partition in one turn.
const FORWARDED_PER_TURN: usize = 4_096;
/// At most this many main-queue events served in one turn.
const MAIN_EVENTS_PER_TURN: usize = 64;

/// The engine, locked (the rebalance callback takes the same lock).
type Lock<'l, 'e> = &'l dyn Fn() -> MutexGuard<'e, Engine>;

/// The queues of one assignment: each input partition's and each
/// repartition partition's, split from the consumer.
struct Queues {
    inputs: Vec<(i32, Queue)>,
    forwarded: Vec<(i32, Queue)>,
}

/// Buffers the picks reuse from turn to turn.
#[derive(Default)]
struct Scratch {
    /// Each input partition's bound, and whether it has nothing left to read.
    ends: Vec<(Option<(i64, i32)>, bool)>,
    /// The queues of records other instances forwarded.
    remote: Vec<((i32, i32), QueueState)>,
}

/// Runs the pipeline for one assignment. Records are handed to the engine
/// in the merge order of [`jobmeter_core::order`] across this instance's
/// partitions: a record goes once no other queue can still deliver a
/// smaller one for its meter ([`jobmeter_core::order::pick`]), and the run
/// of its partition's records that follows goes while they sort below what
/// the others may deliver ([`jobmeter_core::order::run_limit`]); a queue
/// that may deliver a smaller one is waited for, however long its fetch
/// takes. Each input partition is read ahead of the merge ([`ReadAhead`]):
/// what it holds back of a meter is known from what was read (a fleet that
/// places every event on its account's partition holds back no meter but
/// its own with a record read), and what another instance's meter bills is
/// forwarded as soon as it is read, so that what this instance publishes
/// of the partition is how far it has read it. Returns `Ok(true)` when the
/// assignment changed, `Ok(false)` on shutdown.
pub(super) fn merge_round<'e>(
    deps: &Deps,
    consumer: &Arc<BaseConsumer<MeterContext>>,
    lock: Lock<'_, 'e>,
    stop: &CancellationToken,
    ready: &AtomicBool,
) -> Result<bool, EngineError> {
    let Some((epoch, assigned)) = begin(lock)? else {
        return Ok(true);
    };
    // Records fetched before the queues were split wait in the main queue:
    // they come first (they precede whatever the split queues hold).
    while let Some(m) = consumer.poll(Duration::ZERO) {
        if let Ok(m) = m {
            lock().process(&m)?;
        }
    }
    let queues = split_queues(deps, consumer, &assigned)?;
    let mut ins: Vec<ReadAhead<'_>> = queues.inputs.iter().map(|_| ReadAhead::default()).collect();
    let mut scratch = Scratch::default();
    let mut clock = MergeClock::new(Instant::now());
    let mut chores = Chores::new();
    let mut idle = false;
    loop {
        if stop.is_cancelled() {
            lock().commit_and_wait(consumer)?;
            tracing::info!("last batch committed");
            return Ok(false);
        }
        let turn: Turn = clock.turn(Instant::now(), idle);
        if turn.main_poll {
            serve_main(consumer, lock, idle)?;
        }
        let mut e = lock();
        if e.begin_turn(epoch)? {
            return Ok(true);
        }
        read_forwarded(&mut e, &queues, turn.rp_settled)?;
        check_ends(deps, consumer, &mut e, &mut ins, &queues, &mut clock);
        for (r, (p, q)) in ins.iter_mut().zip(&queues.inputs) {
            if !r.at_end || turn.ends_due {
                r.fill(&mut e, *p, q, READ_AHEAD_TURN)?;
            }
        }
        idle = merge_turn(deps, &mut e, &mut ins, &queues, &mut scratch, &mut clock)?;
        // What this instance says of its inputs to the meters of others:
        // how far it has read each (every record read whose account's
        // partition is held elsewhere is forwarded already), and whether
        // that is all Kafka holds.
        for (r, (p, _)) in ins.iter().zip(&queues.inputs) {
            if let Some(b) = r.bound(&e, *p) {
                e.set_source_state(*p, b.0, r.at_end);
            }
        }
        after_step(deps, consumer, &mut e, ready, &mut chores)?;
    }
}

/// The round's epoch and assignment, once every partition restored is
/// restored; `None` when the assignment changed meanwhile.
fn begin(lock: Lock<'_, '_>) -> Result<Option<(u64, std::collections::BTreeSet<i32>)>, EngineError> {
    let mut e = lock();
    // Restored first: a restored partition may say its records are
    // applied in the merge order.
    let epoch = e.epoch();
    if e.begin_turn(epoch)? {
        return Ok(None);
    }
    Ok(Some((e.epoch(), e.assigned().clone())))
}

/// Splits each assigned partition's input and repartition queue from the
/// consumer and resumes them (assigned partitions start paused; see the
/// rebalance callback). Each repartition partition is read as it comes,
/// its forwarded records queued by the input partition they came from (the
/// engine's remote queues).
fn split_queues(
    deps: &Deps,
    consumer: &Arc<BaseConsumer<MeterContext>>,
    assigned: &std::collections::BTreeSet<i32>,
) -> Result<Queues, EngineError> {
    let mut queues = Queues {
        inputs: Vec::new(),
        forwarded: Vec::new(),
    };
    let mut resume = rdkafka::TopicPartitionList::new();
    for p in assigned {
        if let Some(q) = consumer.split_partition_queue(&deps.topics.job_events, *p) {
            queues.inputs.push((*p, q));
            resume.add_partition(&deps.topics.job_events, *p);
        }
        if let Some(q) = consumer.split_partition_queue(&deps.topics.repartition, *p) {
            queues.forwarded.push((*p, q));
            resume.add_partition(&deps.topics.repartition, *p);
        }
    }
    consumer
        .resume(&resume)
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
            op: "resume partitions",
            source,
        })?;
    Ok(queues)
}

/// Serves rebalances and errors from the main queue (the records come from
/// the partition queues); waits a little for them when the merge is idle.
fn serve_main(consumer: &BaseConsumer<MeterContext>, lock: Lock<'_, '_>, idle: bool) -> Result<(), EngineError> {
    let mut timeout = if idle { Duration::from_millis(2) } else { Duration::ZERO };
    for _ in 0..MAIN_EVENTS_PER_TURN {
        match consumer.poll(timeout) {
            Some(Ok(m)) => lock().process(&m)?,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(err)) => tracing::warn!(error = %err, "consumer error"),
            None => break,
        }
        timeout = Duration::ZERO;
    }
    Ok(())
}

/// What other instances forwarded, and their progress. A repartition
/// partition whose end was reported before its queue was split reports
/// none again: once the round has `settled`, it counts as read to its end.
fn read_forwarded(e: &mut Engine, queues: &Queues, settled: bool) -> Result<(), EngineError> {
    for (p, q) in &queues.forwarded {
        if settled {
            e.repartition_at_end(*p);
        }
        if e.is_failing(*p) {
            continue;
        }
        for _ in 0..FORWARDED_PER_TURN {
            match q.poll(Duration::ZERO) {
                Some(Ok(m)) => e.read_repartition(&m)?,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    e.repartition_at_end(*p);
                    break;
                }
                Some(Err(err)) => tracing::warn!(error = %err, partition = *p, "consumer error"),
                None => break,
            }
        }
    }
    Ok(())
}

/// A partition's end is reported once: one reported before this round
/// began is found from the position and the high watermark instead (asked
/// of the broker when the clock allows). A meter waits for its repartition
/// partition to be read to its end (records forwarded before this round);
/// an empty one is at its end at once.
fn check_ends(
    deps: &Deps,
    consumer: &BaseConsumer<MeterContext>,
    e: &mut Engine,
    ins: &mut [ReadAhead<'_>],
    queues: &Queues,
    clock: &mut MergeClock,
) {
    let rp_open = |e: &Engine, p: i32| !e.repartition_read_to_end(p) && !e.is_failing(p);
    let wanted =
        ins.iter().any(|r| !r.at_end && r.buf.is_empty()) || queues.forwarded.iter().any(|(p, _)| rp_open(e, *p));
    if !clock.hw_check(Instant::now(), wanted) {
        return;
    }
    let Ok(pos) = consumer.position() else { return };
    for (r, (p, _)) in ins.iter_mut().zip(&queues.inputs) {
        if !r.at_end && r.buf.is_empty() {
            r.at_end = read_to_end(consumer, &pos, &deps.topics.job_events, *p);
        }
    }
    for (p, _) in &queues.forwarded {
        if rp_open(e, *p) && read_to_end(consumer, &pos, &deps.topics.repartition, *p) {
            e.repartition_at_end(*p);
        }
    }
}

/// Picks and applies records in the merge order until a queue must be
/// waited for or fetched (then returns `true`: the loop is idle), a batch
/// is due, or [`PICKS_PER_TURN`] picks are done.
fn merge_turn<'q>(
    deps: &Deps,
    e: &mut Engine,
    ins: &mut [ReadAhead<'q>],
    queues: &'q Queues,
    s: &mut Scratch,
    clock: &mut MergeClock,
) -> Result<bool, EngineError> {
    let n = queues.inputs.len();
    for _ in 0..PICKS_PER_TURN {
        e.remote_queues(&mut s.remote);
        s.ends.clear();
        s.ends.extend(
            ins.iter()
                .zip(&queues.inputs)
                .map(|(r, (p, _))| (r.bound(e, *p), r.at_end || e.is_failing(*p))),
        );
        let picked = {
            let mut v = Vec::with_capacity(n + s.remote.len());
            views(ins, &s.ends, &s.remote, &mut v);
            pick(&v)
        };
        match picked {
            Pick::Take(i) if i < n => {
                went_on(deps, clock);
                take_run(e, ins, i, queues, s)?;
            }
            Pick::Take(i) => {
                went_on(deps, clock);
                let ((p, q), _) = s.remote[i - n];
                e.take_remote(p, q)?;
            }
            Pick::Wait(j) => {
                let (topic, p) = match queues.inputs.get(j) {
                    Some((p, _)) => (deps.topics.job_events.as_str(), *p),
                    None => (deps.topics.repartition.as_str(), s.remote[j - n].0 .0),
                };
                waits(deps, clock, j, topic, p);
                return Ok(true);
            }
            Pick::Fetch => {
                went_on(deps, clock);
                return Ok(true);
            }
        }
        if e.batch_due() {
            break;
        }
    }
    Ok(false)
}

/// Input partition `i`'s head, then the run of its records that sort below
/// what any other queue may still deliver for their meter (the other
/// queues do not change meanwhile).
fn take_run<'q>(
    e: &mut Engine,
    ins: &mut [ReadAhead<'q>],
    i: usize,
    queues: &'q Queues,
    s: &Scratch,
) -> Result<(), EngineError> {
    let (p, q) = &queues.inputs[i];
    let mut limits: Vec<(i32, Option<MergeKey>)> = Vec::new();
    for _ in 0..READ_AHEAD_TURN {
        let Some(x) = ins[i].pop() else { break };
        e.process_read(&x.msg, x.parsed, x.forwarded)?;
        if ins[i].buf.is_empty() {
            ins[i].fill(e, *p, q, READ_AHEAD_TURN)?;
        }
        let Some(next) = ins[i].buf.front().map(|h| h.head) else {
            break;
        };
        let Some(d) = next.dest.filter(|_| next.key != MergeKey::FIRST) else {
            continue;
        };
        let limit = match limits.iter().find(|(x, _)| *x == d) {
            Some((_, l)) => *l,
            None => {
                let mut v: Vec<View<'_, '_>> = Vec::with_capacity(ins.len() + s.remote.len());
                views(ins, &s.ends, &s.remote, &mut v);
                let l = run_limit(&v, i, d);
                limits.push((d, l));
                l
            }
        };
        if limit.is_some_and(|l| next.key >= l) {
            break;
        }
    }
    Ok(())
}

/// The merge goes on: the rest of a wait is counted.
fn went_on(deps: &Deps, clock: &mut MergeClock) {
    let d = clock.went_on(Instant::now());
    if !d.is_zero() {
        deps.metrics.input.merge_wait_seconds.inc_by(d.as_secs_f64());
    }
}

/// The merge waits for queue `j` (of `topic`, partition `p`): counts the
/// time in `jobmeter_merge_wait_seconds_total`, and says so in the log when
/// the wait is long.
fn waits(deps: &Deps, clock: &mut MergeClock, j: usize, topic: &str, p: i32) {
    let w = clock.wait(j, Instant::now());
    deps.metrics.input.merge_wait_seconds.inc_by(w.count.as_secs_f64());
    if let Some(waited) = w.log {
        tracing::warn!(
            topic,
            partition = p,
            waited_seconds = waited.as_secs(),
            "stream time held back: this partition has records in Kafka that are not fetched yet, and they may come before the records waiting to be applied (the meter waits rather than bill past them; see jobmeter_merge_wait_seconds_total)"
        );
    }
}
