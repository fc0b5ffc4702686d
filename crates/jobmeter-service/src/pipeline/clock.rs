//! The merge round's clock: when the poll loop serves the consumer's main
//! queue, looks again at queues at their end, asks the broker where idle
//! partitions end, and counts a repartition partition as read to its end;
//! and how long the merge has waited for one queue. Every decision is a
//! pure function of the instant it is given, so the unit tests below drive
//! it with made-up instants instead of sleeping.

use std::time::{Duration, Instant};

/// How often the main queue (rebalances, errors) is served while the merge
/// is busy; an idle merge serves it on every turn.
pub(super) const MAIN_POLL_EVERY: Duration = Duration::from_millis(5);
/// How often a queue at its end is polled again while the merge is busy.
pub(super) const ENDS_EVERY: Duration = Duration::from_millis(1);
/// How often the merge asks the broker where an idle partition ends.
pub(super) const HW_CHECK_EVERY: Duration = Duration::from_millis(500);
/// After this long in a merge round, a repartition partition counts as
/// read to its end even if its end was never reported.
pub(super) const RP_END_AFTER: Duration = Duration::from_secs(2);
/// How long the merge waits for one queue before it says so in the log
/// (then once per [`WAIT_LOG_EVERY`] while the wait goes on).
pub(super) const WAIT_LOG_AFTER: Duration = Duration::from_secs(5);
/// See [`WAIT_LOG_AFTER`].
pub(super) const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// What one turn of the poll loop does, as the clock decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Turn {
    /// Serve the consumer's main queue.
    pub(super) main_poll: bool,
    /// Poll the queues at their end again.
    pub(super) ends_due: bool,
    /// Every repartition partition counts as read to its end (the round
    /// is old enough that an end reported before its queue was split will
    /// not be reported again).
    pub(super) rp_settled: bool,
}

/// What a wait for one queue amounts to so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wait {
    /// Time to add to `jobmeter_merge_wait_seconds_total` now.
    pub(super) count: Duration,
    /// `Some(how long so far)` when the wait should be logged now.
    pub(super) log: Option<Duration>,
}

/// The queue the merge is waiting for, since when, and when that was last
/// counted and logged.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    queue: usize,
    since: Instant,
    counted: Instant,
    logged: Option<Instant>,
}

/// The clock of one merge round (see the module documentation).
#[derive(Debug)]
pub(super) struct MergeClock {
    started: Instant,
    last_main: Instant,
    last_ends: Instant,
    last_hw: Option<Instant>,
    waiting: Option<Waiting>,
}

impl MergeClock {
    /// A round that starts at `now`. Its first look at where partitions
    /// end comes at once.
    pub(super) fn new(now: Instant) -> MergeClock {
        MergeClock {
            started: now,
            last_main: now,
            last_ends: now,
            last_hw: None,
            waiting: None,
        }
    }

    /// The decisions of a turn that starts at `now`; `idle` when the last
    /// turn found nothing to do (then every queue is looked at again).
    pub(super) fn turn(&mut self, now: Instant, idle: bool) -> Turn {
        let main_poll = idle || now.saturating_duration_since(self.last_main) >= MAIN_POLL_EVERY;
        if main_poll {
            self.last_main = now;
        }
        let ends_due = idle || now.saturating_duration_since(self.last_ends) >= ENDS_EVERY;
        if ends_due {
            self.last_ends = now;
        }
        Turn {
            main_poll,
            ends_due,
            rp_settled: now.saturating_duration_since(self.started) >= RP_END_AFTER,
        }
    }

    /// Whether to ask the broker where the idle partitions end, when some
    /// are `wanted`: at most once per [`HW_CHECK_EVERY`].
    pub(super) fn hw_check(&mut self, now: Instant, wanted: bool) -> bool {
        let due = wanted
            && self
                .last_hw
                .is_none_or(|t| now.saturating_duration_since(t) >= HW_CHECK_EVERY);
        if due {
            self.last_hw = Some(now);
        }
        due
    }

    /// The merge waits for `queue` at `now`: the time since the wait was
    /// last counted, and whether to log it. A wait for another queue
    /// starts afresh (for the log; the merge waited all along, and all of
    /// it is counted).
    pub(super) fn wait(&mut self, queue: usize, now: Instant) -> Wait {
        let w = match &mut self.waiting {
            Some(w) if w.queue == queue => w,
            slot => {
                let counted = slot.map_or(now, |w| w.counted);
                slot.insert(Waiting {
                    queue,
                    since: now,
                    counted,
                    logged: None,
                })
            }
        };
        let count = now.saturating_duration_since(w.counted);
        w.counted = now;
        let waited = now.saturating_duration_since(w.since);
        let log = (waited >= WAIT_LOG_AFTER
            && w.logged
                .is_none_or(|t| now.saturating_duration_since(t) >= WAIT_LOG_EVERY))
        .then(|| {
            w.logged = Some(now);
            waited
        });
        Wait { count, log }
    }

    /// The merge goes on at `now`: the time since the wait (if any) was
    /// last counted, still to be counted (a wait that one fetch ends is a
    /// wait too).
    pub(super) fn went_on(&mut self, now: Instant) -> Duration {
        self.waiting
            .take()
            .map_or(Duration::ZERO, |w| now.saturating_duration_since(w.counted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_main_queue_is_served_every_5_ms_or_when_idle() {
        let t0 = Instant::now();
        let mut c = MergeClock::new(t0);
        assert!(!c.turn(t0 + MS, false).main_poll);
        assert!(c.turn(t0 + MS, true).main_poll, "idle: at once");
        assert!(!c.turn(t0 + 5 * MS, false).main_poll, "4 ms after the last");
        assert!(c.turn(t0 + 6 * MS, false).main_poll);
        assert!(!c.turn(t0 + 7 * MS, false).main_poll);
    }

    #[test]
    fn queues_at_their_end_are_polled_again_each_millisecond_or_when_idle() {
        let t0 = Instant::now();
        let mut c = MergeClock::new(t0);
        assert!(!c.turn(t0, false).ends_due);
        assert!(c.turn(t0 + MS, false).ends_due);
        assert!(!c.turn(t0 + MS, false).ends_due);
        assert!(c.turn(t0 + MS, true).ends_due);
    }

    #[test]
    fn repartition_partitions_settle_two_seconds_into_the_round() {
        let t0 = Instant::now();
        let mut c = MergeClock::new(t0);
        assert!(!c.turn(t0 + RP_END_AFTER - MS, true).rp_settled);
        assert!(c.turn(t0 + RP_END_AFTER, false).rp_settled);
        assert!(c.turn(t0 + 10 * RP_END_AFTER, false).rp_settled);
    }

    #[test]
    fn the_first_end_check_comes_at_once_then_twice_a_second_and_only_when_wanted() {
        let t0 = Instant::now();
        let mut c = MergeClock::new(t0);
        assert!(!c.hw_check(t0, false), "nothing wanted: no broker call");
        assert!(c.hw_check(t0, true), "the first at once");
        assert!(!c.hw_check(t0 + HW_CHECK_EVERY - MS, true));
        assert!(c.hw_check(t0 + HW_CHECK_EVERY, true));
        assert!(!c.hw_check(t0 + 3 * HW_CHECK_EVERY, false));
        assert!(c.hw_check(t0 + 3 * HW_CHECK_EVERY, true));
    }

    #[test]
    fn a_wait_is_counted_in_full_and_logged_after_5_s_then_every_30_s() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut c = MergeClock::new(t0);
        assert_eq!(
            c.wait(3, t0),
            Wait {
                count: Duration::ZERO,
                log: None
            }
        );
        assert_eq!(
            c.wait(3, t0 + 2 * s),
            Wait {
                count: 2 * s,
                log: None
            }
        );
        assert_eq!(
            c.wait(3, t0 + 5 * s),
            Wait {
                count: 3 * s,
                log: Some(5 * s)
            }
        );
        assert_eq!(c.wait(3, t0 + 6 * s).log, None, "logged a second ago");
        assert_eq!(c.wait(3, t0 + 35 * s).log, Some(35 * s), "30 s after the last log");
        // The merge goes on: what was not counted yet is.
        assert_eq!(c.went_on(t0 + 35 * s + 400 * MS), 400 * MS);
        assert_eq!(c.went_on(t0 + 40 * s), Duration::ZERO, "no wait open");
        // Every second of a wait is counted once, over the calls.
        let mut total = Duration::ZERO;
        for i in 0..=10u32 {
            total += c.wait(1, t0 + 100 * s + i * s).count;
        }
        total += c.went_on(t0 + 111 * s);
        assert_eq!(total, 11 * s);
    }

    #[test]
    fn a_wait_for_another_queue_is_logged_afresh_and_counted_throughout() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut c = MergeClock::new(t0);
        c.wait(0, t0);
        assert_eq!(c.wait(0, t0 + 4 * s).count, 4 * s);
        assert_eq!(
            c.wait(1, t0 + 6 * s),
            Wait {
                count: 2 * s,
                log: None
            },
            "still waiting"
        );
        assert_eq!(c.wait(1, t0 + 10 * s).log, None, "4 s on queue 1");
        assert_eq!(c.wait(1, t0 + 11 * s).log, Some(5 * s));
    }
}
