//! Model-based property tests of the billing core.
//!
//! Random workloads (accounts on every plan, jobs of every kind, month
//! boundaries, a price change, heartbeats, failed jobs) are delivered in a
//! random order with random duplicates, and the meter's outputs are
//! compared with a deliberately simple reference model written from the
//! contract, not from the meter's code.

mod common;
use common::*;
use jobmeter_core::*;
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, BTreeSet};

const BASE: i64 = 1_714_003_200_000; // 2024-04-25T00:00:00Z
const MAY: i64 = 1_714_521_600_000; // 2024-05-01T00:00:00Z
const JUN: i64 = 1_717_200_000_000; // 2024-06-01T00:00:00Z

#[derive(Debug, Clone)]
struct GenJob {
    account: usize,
    kind: usize,
    model: usize,
    start: i64,
    duration: i64,
    status: usize,
    heartbeats: Vec<i64>,
}

const ACCOUNTS: [&str; 4] = ["payg", "free", "pro", "ent"];
const KINDS: [&str; 3] = ["inference", "workflow_step", "fine_tune"];
const MODELS: [&str; 2] = ["img", "llm"];
const STATUS: [&str; 3] = ["succeeded", "failed", "cancelled"];

fn job_strategy() -> impl Strategy<Value = GenJob> {
    (
        0usize..4,
        0usize..3,
        0usize..2,
        0i64..(45 * 86_400_000),
        prop_oneof![0i64..5_000, 0i64..600_000, 0i64..(5 * 3_600_000)],
        0usize..3,
        proptest::collection::vec(0u32..1000, 0..3),
    )
        .prop_map(|(account, kind, model, start, duration, status, hb)| {
            let start = BASE + start;
            // Heartbeats inside the job and inside its start's month, so the
            // in-flight accrual never exceeds what the month is finally charged.
            let month_end = Timestamp(start).period().end().0;
            let heartbeats = hb
                .into_iter()
                .map(|p| start + duration * i64::from(p) / 1000)
                .filter(|t| *t < month_end)
                .collect();
            GenJob {
                account,
                kind,
                model,
                start,
                duration,
                status,
                heartbeats,
            }
        })
}

fn events_of(jobs: &[GenJob]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        let acct = ACCOUNTS[j.account];
        let job = format!("j{i}");
        let mut data = format!(r#""account_id":"{acct}","kind":"{}""#, KINDS[j.kind]);
        if j.kind != 2 {
            data.push_str(&format!(r#","model":"{}""#, MODELS[j.model]));
        }
        if j.kind == 1 {
            data.push_str(&format!(r#","workflow_run_id":"run{}""#, i / 3));
        }
        out.push(event(
            &format!("s{i}"),
            "job.started",
            &job,
            &Timestamp(j.start).to_string(),
            &data,
        ));
        for (h, t) in j.heartbeats.iter().enumerate() {
            out.push(event(
                &format!("h{i}.{h}"),
                "job.heartbeat",
                &job,
                &Timestamp(*t).to_string(),
                &format!(r#""account_id":"{acct}""#),
            ));
        }
        out.push(event(
            &format!("p{i}"),
            "job.stopped",
            &job,
            &Timestamp(j.start + j.duration).to_string(),
            &format!(r#""account_id":"{acct}","status":"{}""#, STATUS[j.status]),
        ));
    }
    out
}

/// Fisher-Yates with a small local generator (SplitMix64).
fn shuffle(events: &mut [String], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..events.len()).rev() {
        events.swap(i, (next() % (i as u64 + 1)) as usize);
    }
}

fn world() -> World {
    // Spend control is its own property (below): in this world credits used
    // up only notify and no runway is watched, so delivery order cannot matter.
    let mut w = World::new();
    // Remember finished jobs for the whole run: duplicates arriving after
    // the retention are, by design, new events (see the retention rule test).
    w.config.retention_ms = 400 * 86_400_000;
    // Nothing times out or closes before the final flush: the order of
    // delivery must then not matter at all.
    w.config.orphan_timeout_ms = 400 * 86_400_000;
    w.config.period_grace_ms = 400 * 86_400_000;
    w.account(r#"{"account_id":"free","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"2.50"}"#);
    w.account(r#"{"account_id":"pro","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"3.00","workflow_quota":"1.00"}"#);
    w.account(r#"{"account_id":"ent","plan":"enterprise","effective_from":"2024-01-01T00:00:00Z","alert_thresholds":["1.00","4.00"]}"#);
    w
}

/// The reference: a charge per (job, month) written straight from SPEC §5.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RefCharge {
    id: String,
    seconds: Decimal,
    amount: Money,
    period: String,
}

fn reference(jobs: &[GenJob]) -> (Vec<RefCharge>, BTreeMap<&'static str, Money>, BTreeSet<String>) {
    let rate = |j: &GenJob| -> Money {
        match (j.kind, j.model, j.start >= JUN) {
            (2, _, _) => money("0.001"),
            (_, 0, false) => money("0.0005"),
            (_, 0, true) => money("0.0004"),
            _ => money("0.002"),
        }
    };
    let mut charges = Vec::new();
    // counters: (account, limit, period or "life") -> total list amount
    let mut counters: BTreeMap<(&str, &str, String), Money> = BTreeMap::new();
    let mut plain_due: BTreeMap<&'static str, Money> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        let acct = ACCOUNTS[j.account];
        let stop = j.start + j.duration;
        let total = Decimal::from(((j.duration + 999) / 1000).max(1));
        // Walk month boundaries by hand.
        let mut bounds = vec![j.start];
        for b in [MAY, JUN, 1_719_792_000_000 /* Jul */] {
            if b > j.start && b < stop {
                bounds.push(b);
            }
        }
        bounds.push(stop);
        let mut given = Decimal::ZERO;
        for w in 0..bounds.len() - 1 {
            let last = w == bounds.len() - 2;
            let secs = if last {
                total - given
            } else {
                Decimal::from((bounds[w + 1] - bounds[w]) / 1000)
            };
            given += secs;
            if secs.is_zero() {
                continue;
            }
            // Limits count per calendar month; statements follow the
            // cadence: payg and enterprise are billed by half months before
            // May 1 (every start is after Apr 25: the second half of April).
            let period = Timestamp(bounds[w]).period().to_string();
            let billed = match acct {
                "payg" | "ent" if bounds[w] < MAY => "2024-04-16/2024-05-01".to_owned(),
                _ => period.clone(),
            };
            let amount = rate(j) * secs;
            charges.push(RefCharge {
                id: format!("{acct}/j{i}/{billed}"),
                seconds: secs,
                amount,
                period: billed,
            });
            let limit = match (acct, j.kind) {
                ("free", _) => Some(("free_credits", "life".to_owned())),
                ("pro", 0) => Some(("model_api_cap", period.clone())),
                ("pro", 1) => Some(("workflow_quota", period.clone())),
                ("ent", _) => Some(("alert", period.clone())),
                _ => None,
            };
            match limit {
                Some((l, p)) => *counters.entry((acct, l, p)).or_default() += amount,
                None => *plain_due.entry(acct).or_default() += amount,
            }
        }
    }
    let mut due = plain_due;
    let mut fired = BTreeSet::new();
    for ((acct, limit, p), used) in &counters {
        let (cap, levels): (Option<Money>, Vec<(String, Money)>) = match *limit {
            "free_credits" => (
                Some(money("2.50")),
                vec![("80".into(), money("2.00")), ("100".into(), money("2.50"))],
            ),
            "model_api_cap" => (
                Some(money("3.00")),
                vec![("80".into(), money("2.40")), ("100".into(), money("3.00"))],
            ),
            "workflow_quota" => (
                Some(money("1.00")),
                vec![("80".into(), money("0.80")), ("100".into(), money("1.00"))],
            ),
            _ => (
                None,
                vec![("$1.00".into(), money("1.00")), ("$4.00".into(), money("4.00"))],
            ),
        };
        let owed = match cap {
            Some(c) => (*used - c).max(Money::ZERO),
            None => *used,
        };
        let key: &'static str = ACCOUNTS.iter().find(|a| *a == acct).copied().unwrap_or("payg");
        *due.entry(key).or_default() += owed;
        for (id, level) in levels {
            if *used >= level && *used > Money::ZERO {
                let scope = if p == "life" { "lifetime".to_owned() } else { p.clone() };
                fired.insert(format!("{acct}/{limit}/{scope}/{id}"));
            }
        }
    }
    (charges, due, fired)
}

fn run(events: &[String]) -> World {
    let mut w = world();
    for e in events {
        w.apply(e);
    }
    w.flush();
    w
}

fn observed(w: &World) -> (Vec<RefCharge>, BTreeMap<&'static str, Money>, BTreeSet<String>) {
    let mut charges: Vec<RefCharge> = w
        .charges()
        .iter()
        .map(|c| RefCharge {
            id: c.charge_id.clone(),
            seconds: c.billable_seconds,
            amount: c.amount,
            period: c.period.to_string(),
        })
        .collect();
    charges.sort();
    let mut due: BTreeMap<&'static str, Money> = BTreeMap::new();
    for c in w.charges() {
        let key = ACCOUNTS
            .iter()
            .find(|a| **a == c.account_id.as_str())
            .copied()
            .unwrap_or("payg");
        *due.entry(key).or_default() += c.amount_due;
    }
    let fired = w.limits().iter().map(|l| l.event_id.clone()).collect();
    (charges, due, fired)
}

fn normalize(
    mut r: (Vec<RefCharge>, BTreeMap<&'static str, Money>, BTreeSet<String>),
) -> (Vec<RefCharge>, BTreeMap<&'static str, Money>, BTreeSet<String>) {
    r.0.sort();
    r.1.retain(|_, v| !v.is_zero());
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_order_and_duplication_gives_the_reference_bill(
        jobs in proptest::collection::vec(job_strategy(), 1..25),
        dups in proptest::collection::vec(any::<proptest::sample::Index>(), 0..20),
        seed in any::<u64>(),
    ) {
        // Failed/cancelled jobs are billed by default, so the reference bills all.
        let mut events = events_of(&jobs);
        for d in &dups {
            let e = events[d.index(events.len())].clone();
            events.push(e);
        }
        shuffle(&mut events, seed);
        let w = run(&events);
        prop_assert!(w.rejects().is_empty(), "{:?}", w.rejects());
        let got = normalize(observed(&w));
        let want = normalize(reference(&jobs));
        prop_assert_eq!(&got.0, &want.0);
        prop_assert_eq!(&got.1, &want.1);
        prop_assert_eq!(&got.2, &want.2);
        // Each threshold fires once.
        prop_assert_eq!(w.limits().len(), got.2.len());
        // Statements add up to the charges.
        let mut by_period: BTreeMap<(String, String), (Money, Money)> = BTreeMap::new();
        for c in w.charges() {
            let e = by_period.entry((c.account_id.to_string(), c.period.to_string())).or_default();
            e.0 += c.amount;
            e.1 += c.amount_due;
        }
        for s in w.statements() {
            let (amount, due) = by_period.remove(&(s.account_id.to_string(), s.period.to_string())).unwrap_or_default();
            let lines: Money = s.lines.iter().map(|l| l.amount).sum();
            prop_assert_eq!(lines, amount);
            prop_assert_eq!(s.total_due, (due + s.subscription_fee).round_cents());
        }
        prop_assert!(by_period.is_empty(), "charges without a statement: {:?}", by_period);
    }

    #[test]
    fn credit_grants_cover_the_reference_due_in_any_order_and_through_a_restart(
        jobs in proptest::collection::vec(job_strategy(), 1..25),
        grants in proptest::collection::vec(prop_oneof![Just(0i64), 1i64..300, 100i64..2_000], 4),
        seed in any::<u64>(),
        restart in any::<proptest::sample::Index>(),
    ) {
        // One grant for all usage, without expiry, per account (cents): it
        // covers what each account owes beyond its plan, in whatever
        // order the charges come, until it is used up.
        let records: Vec<String> = ACCOUNTS
            .iter()
            .zip(&grants)
            .filter(|(_, c)| **c > 0)
            .map(|(a, c)| format!(
                r#"{{"adjustment_id":"g","account_id":"{a}","type":"credit_grant","amount":"{}","reason":"r","requested_by":"s"}}"#,
                Money(Decimal::new(*c, 2))
            ))
            .collect();
        let mut events = events_of(&jobs);
        shuffle(&mut events, seed);
        let mut w = world();
        for g in &records {
            w.adjustment(g);
        }
        for e in &events {
            w.apply(e);
        }
        w.flush();
        prop_assert!(w.rejects().is_empty(), "{:?}", w.rejects());
        let (want_charges, plain_due, want_fired) = normalize(reference(&jobs));
        let got = normalize(observed(&w));
        prop_assert_eq!(&got.0, &want_charges, "grants change no amount");
        let mut want_due = BTreeMap::new();
        for (i, a) in ACCOUNTS.iter().enumerate() {
            let owed = plain_due.get(a).copied().unwrap_or_default();
            let left = (owed - Money(Decimal::new(grants[i], 2))).max(Money::ZERO);
            if !left.is_zero() {
                want_due.insert(*a, left);
            }
        }
        prop_assert_eq!(&got.1, &want_due);
        prop_assert_eq!(&got.2, &want_fired);
        for s in w.statements() {
            let due: Money = w
                .charges()
                .iter()
                .filter(|c| c.account_id == s.account_id && c.period == s.period)
                .map(|c| c.amount_due)
                .sum();
            prop_assert_eq!(s.total_due, (due + s.subscription_fee).round_cents());
        }
        // Restored at any point from its stored records, it ends the same.
        let cut = restart.index(events.len() + 1);
        let mut r = world();
        for g in &records {
            r.adjustment(g);
        }
        for e in &events[..cut] {
            r.apply(e);
        }
        let stored: Vec<_> = r.meter.snapshot().expect("encode").into_iter()
            .filter_map(|c| Some((c.table, c.key, c.value?))).collect();
        r.meter = Meter::restore(stored, &r.config).expect("restore");
        for e in &events[cut..] {
            r.apply(e);
        }
        r.flush();
        prop_assert_eq!(&r.out, &w.out);
    }

    #[test]
    fn lost_and_late_stops_are_settled_by_orphan_and_adjustment(
        jobs in proptest::collection::vec(job_strategy(), 1..15),
        lost in proptest::collection::vec(any::<bool>(), 15),
        late in proptest::collection::vec(any::<bool>(), 15),
    ) {
        // In time order, default timeouts. A lost stop leaves an orphan
        // charge to the last heartbeat; a late stop (delivered at the very
        // end) adds an adjustment that brings the job to its true seconds.
        let mut w = World::new();
        // Remember finished jobs for the whole run (retention is tested on its own).
        w.config.retention_ms = 400 * 86_400_000;
        let mut timed: Vec<(i64, usize, String)> = Vec::new();
        let mut tail = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            let evs = events_of(std::slice::from_ref(j));
            let evs: Vec<String> = evs.into_iter().map(|e| e.replace("\"j0\"", &format!("\"j{i}\"")).replace("\"s0\"", &format!("\"s{i}\"")).replace("\"p0\"", &format!("\"p{i}\"")).replace("\"h0.", &format!("\"h{i}."))).collect();
            let n = evs.len();
            for (k, e) in evs.into_iter().enumerate() {
                let is_stop = k == n - 1;
                let t = if k == 0 { j.start } else if is_stop { j.start + j.duration } else { j.heartbeats[k - 1] };
                if is_stop && lost[i] {
                    continue;
                }
                if is_stop && late[i] {
                    tail.push((t, e));
                } else {
                    timed.push((t, timed.len(), e));
                }
            }
        }
        timed.sort();
        for (_, _, e) in &timed {
            w.apply(e);
        }
        for (_, e) in &tail {
            w.apply(e);
        }
        let mut per_job: BTreeMap<String, Decimal> = BTreeMap::new();
        for c in w.charges() {
            *per_job.entry(c.job().to_owned()).or_default() += c.billable_seconds;
        }
        for (i, j) in jobs.iter().enumerate() {
            let got = per_job.get(&format!("j{i}")).copied().unwrap_or_default();
            let true_secs = Decimal::from(((j.duration + 999) / 1000).max(1));
            // Where the reference closes a job whose stop is lost: at the
            // first activity (start or heartbeat) after which stream time
            // passes activity + 10 min before the next activity arrives.
            let mut acts = vec![j.start];
            let mut hbs = j.heartbeats.clone();
            hbs.sort();
            acts.extend(hbs.into_iter().filter(|h| *h >= j.start));
            let times: Vec<i64> = timed.iter().map(|t| t.0).collect();
            let tail_max = tail.iter().map(|t| t.0).max().unwrap_or(i64::MIN);
            let mut close = None;
            for k in 0..acts.len() {
                let next = acts.get(k + 1).copied();
                let deadline = acts[k] + 600_000;
                if times.iter().any(|t| *t > deadline && next.is_none_or(|n| *t < n)) {
                    close = Some(acts[k]);
                    break;
                }
            }
            if close.is_none() && acts.last().is_some_and(|l| tail_max > l + 600_000) {
                close = acts.last().copied();
            }
            // A job whose stop arrives (in time, or after it was closed as
            // an orphan) is billed its true seconds in total; a job whose stop
            // is lost, its seconds to where it was closed, or nothing yet.
            let want = match (lost[i], close) {
                (false, _) => true_secs,
                (true, Some(c)) => Decimal::from(((c - j.start + 999) / 1000).max(1)),
                (true, None) => Decimal::ZERO,
            };
            prop_assert_eq!(got, want, "job j{} lost={} late={}", i, lost[i], late[i]);
        }
    }
}

// ---------------------------------------------------------------------------
// Spend control (rule 14), against a reference that simulates a free
// account's workers: jobs start, heartbeat and stop in time order; a worker
// that is sent `job.stop` stops after its own reaction time (or never, if it
// ignores commands). The reference decides, from the contract alone, when
// the credits are used up (charges plus running jobs' usage to their latest
// heartbeats), which jobs are stopped and when, where runway warnings fire,
// and what each job is charged (to at most the command plus the grace).

#[derive(Debug, Clone)]
struct SpendJob {
    model: usize,
    start: i64,
    duration: i64,
    every: i64,
    /// Milliseconds a worker takes to obey a stop; `None`: it never does.
    reaction: Option<i64>,
}

fn spend_job_strategy() -> impl Strategy<Value = SpendJob> {
    (
        0usize..3,
        0i64..1_800_000,
        1i64..2_400_000,
        10_000i64..120_000,
        prop_oneof![3 => (0i64..90_000).prop_map(Some), 1 => Just(None)],
    )
        .prop_map(|(model, start, duration, every, reaction)| SpendJob {
            model,
            start: MAY + start,
            duration,
            every,
            reaction,
        })
}

#[derive(Debug, Default, PartialEq)]
struct SpendOutcome {
    /// (job, at) of every `job.stop`, in emission order.
    commands: Vec<(String, i64)>,
    /// (at, runway in ms) of the runway warning, if any.
    runway: Vec<(i64, i64)>,
    /// Billable seconds per job.
    seconds: BTreeMap<String, Decimal>,
}

/// The reference: returns the event log the workers produce and what the
/// meter must make of it.
fn spend_reference(jobs: &[SpendJob], credits: Money, grace: i64, horizon: i64) -> (Vec<String>, SpendOutcome) {
    let rate = |j: &SpendJob| match j.model {
        0 => money("0.002"),
        1 => money("0.0005"),
        _ => money("0.001"),
    };
    let secs = |ms: i64| Decimal::from(((ms + 999) / 1000).max(1));
    let name = |i: usize| format!("j{i:02}");
    // Pending events: (time, seq, job, what) with what 0 start, 1 heartbeat, 2 stop.
    let mut queue: BTreeSet<(i64, u64, usize, u8)> = BTreeSet::new();
    let mut seq = 0u64;
    let mut stop_at: Vec<i64> = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        let stop = j.start + j.duration;
        stop_at.push(stop);
        for (t, what) in std::iter::once((j.start, 0u8))
            .chain(
                (1..)
                    .map(|k| (j.start + k * j.every, 1u8))
                    .take_while(|(t, _)| *t < stop),
            )
            .chain(std::iter::once((stop, 2u8)))
        {
            queue.insert((t, seq, i, what));
            seq += 1;
        }
    }
    let mut log = Vec::new();
    let mut out = SpendOutcome::default();
    let mut running: BTreeSet<usize> = BTreeSet::new();
    let mut accrued: BTreeMap<usize, Money> = BTreeMap::new();
    let mut charged = Money::ZERO;
    let mut commanded: BTreeMap<usize, i64> = BTreeMap::new();
    while let Some((t, _, i, what)) = queue.pop_first() {
        let j = &jobs[i];
        let until = |end: i64| commanded.get(&i).map_or(end, |c| end.min(c + grace));
        let (ty, data) = match what {
            0 => {
                running.insert(i);
                let (kind, model) = match j.model {
                    0 => ("inference", Some("llm")),
                    1 => ("inference", Some("img")),
                    _ => ("fine_tune", None),
                };
                let mut d = format!(r#""account_id":"free","kind":"{kind}""#);
                if let Some(m) = model {
                    d.push_str(&format!(r#","model":"{m}""#));
                }
                ("job.started", d)
            }
            1 => {
                accrued.insert(i, rate(j) * secs(until(t) - j.start));
                ("job.heartbeat", r#""account_id":"free""#.to_owned())
            }
            _ => {
                running.remove(&i);
                accrued.remove(&i);
                let s = secs(until(t) - j.start);
                charged += rate(j) * s;
                out.seconds.insert(name(i), s);
                ("job.stopped", r#""account_id":"free","status":"cancelled""#.to_owned())
            }
        };
        log.push(event(
            &format!("{i}.{what}.{t}"),
            ty,
            &name(i),
            &Timestamp(t).to_string(),
            &data,
        ));
        if running.is_empty() {
            continue;
        }
        let used = charged + accrued.values().copied().sum::<Money>();
        if used >= credits {
            for r in running.clone() {
                if commanded.contains_key(&r) {
                    continue;
                }
                commanded.insert(r, t);
                out.commands.push((name(r), t));
                // An obedient worker stops after its reaction time; its
                // later heartbeats never happen.
                if let Some(react) = jobs[r].reaction {
                    let new_stop = stop_at[r].min(t + react);
                    queue.retain(|e| e.2 != r || (e.3 == 1 && e.0 < new_stop));
                    queue.insert((new_stop, seq, r, 2));
                    seq += 1;
                    stop_at[r] = new_stop;
                }
            }
        } else if out.runway.is_empty() {
            let burn: Money = running.iter().map(|r| rate(&jobs[*r])).sum();
            // Runway to the millisecond, rounded down.
            let left_ms = (credits - used).0 * Decimal::from(1000) / burn.0;
            let runway_ms = left_ms.trunc();
            if runway_ms < Decimal::from(horizon) {
                out.runway.push((
                    t,
                    i64::try_from(runway_ms.mantissa() / 10i128.pow(runway_ms.scale())).unwrap_or(i64::MAX),
                ));
            }
        }
    }
    (log, out)
}

fn spend_observed(w: &World) -> SpendOutcome {
    let mut o = SpendOutcome::default();
    for c in w.commands() {
        o.commands.push((c.job_id.to_string(), c.at.0));
    }
    for l in w.limits() {
        if let (Some(_), Some(r)) = (l.horizon_seconds, l.runway_seconds) {
            let ms = r * Decimal::from(1000);
            o.runway.push((
                l.at.0,
                i64::try_from(ms.trunc().mantissa() / 10i128.pow(ms.trunc().scale())).unwrap_or(i64::MAX),
            ));
        }
    }
    for c in w.charges() {
        *o.seconds.entry(c.job().to_owned()).or_default() += c.billable_seconds;
    }
    o
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn spend_control_gives_the_reference_commands_warnings_and_charges(
        jobs in proptest::collection::vec(spend_job_strategy(), 1..8),
        credit_cents in 1i64..400,
        grace_s in 0i64..120,
        restart in any::<proptest::sample::Index>(),
    ) {
        let credits = Money(Decimal::new(credit_cents, 2));
        let (grace, horizon) = (grace_s * 1000, 600_000);
        let (log, want) = spend_reference(&jobs, credits, grace, horizon);
        let world = || {
            let mut w = World::new().spend_control();
            w.config.stop_grace_ms = grace;
            w.config.runway_horizons_ms = vec![horizon];
            w.account(&format!(r#"{{"account_id":"free","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"{credits}"}}"#));
            w
        };
        // Straight through.
        let mut w = world();
        for e in &log {
            w.apply(e);
        }
        prop_assert!(w.rejects().is_empty(), "{:?}", w.rejects());
        let got = spend_observed(&w);
        prop_assert_eq!(&got, &want);
        // Each job is sent at most one stop.
        let ids: BTreeSet<_> = w.commands().iter().map(|c| c.command_id.clone()).collect();
        prop_assert_eq!(ids.len(), w.commands().len());
        // And through a restart at any point: restored from its stored
        // records, the meter sends nothing twice and ends the same.
        let cut = restart.index(log.len() + 1);
        let mut r = world();
        for e in &log[..cut] {
            r.apply(e);
        }
        let records: Vec<_> = r.meter.snapshot().expect("encode").into_iter()
            .filter_map(|c| Some((c.table, c.key, c.value?))).collect();
        r.meter = Meter::restore(records, &r.config).expect("restore");
        for e in &log[cut..] {
            r.apply(e);
        }
        prop_assert_eq!(&r.out, &w.out);
    }
}
