//! Pricing adjustments through Kafka: price overrides written to the
//! adjustments topic while two meters catch up on a mixed fleet's backlog,
//! with SIGKILLs in between, reach the meter of their account exactly once
//! and re-rate what was charged before they arrived. What each account pays
//! in all must equal the contract's computation with the overrides in force
//! from the start (an override costs the same whenever it arrives), every
//! refused record is dead-lettered with its reason, and `jobmeter rebuild`
//! reproduces the live outputs.

use crate::support;

use jobmeter_offline::simulate::FleetOptions;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;
use support::*;

const PARTITIONS: i32 = 6;

/// About 17,000 events of 150 accounts, none changing plan, over two days from Apr 29
/// noon (April closes inside the backlog).
fn fleet(seed: u64) -> FleetOptions {
    FleetOptions {
        seed,
        jobs: 4_000,
        accounts: 150,
        plan_change_permille: 0,
        start: jobmeter_core::Timestamp::parse("2024-04-29T12:00:00Z").expect("time"),
        mean_gap_ms: 44_000,
        heartbeat_interval_ms: 12_000,
        fine_tune_permille: 20,
        ..FleetOptions::default()
    }
}

/// A price override record.
fn price_override(id: &str, account: &str, selector: &str, price: &str, from: &str, until: Option<&str>) -> String {
    let until = until.map_or(String::new(), |u| format!(r#","effective_until":"{u}""#));
    format!(
        r#"{{"adjustment_id":"{id}","account_id":"{account}","type":"price_override","reason":"outage credit","requested_by":"support@example.com","created_at":"2024-05-01T09:00:00Z","selector":{selector},{price},"effective_from":"{from}"{until}}}"#
    )
}

/// The records support writes, in order, in two rounds: price overrides of
/// every shape on twelve accounts, a duplicate, a conflict, refusals, an
/// override ended early; and one record with no account at all.
fn adjustments(w: &Workload) -> (Vec<String>, Vec<String>) {
    let accounts = post_paid_without_spend_limit(w);
    assert!(accounts.len() >= 8, "{} accounts to adjust", accounts.len());
    let mut first = Vec::new();
    let mut second = Vec::new();
    for (i, a) in accounts.iter().enumerate() {
        let id = format!("adj-{i}");
        let rec = match i % 4 {
            0 => price_override(
                &id,
                a,
                "{}",
                r#""multiplier":"0.80""#,
                "2024-04-29T18:00:00Z",
                Some("2024-04-30T18:00:00Z"),
            ),
            1 => price_override(
                &id,
                a,
                r#"{"kind":"inference"}"#,
                r#""rate_per_second":"0.000123""#,
                "2024-04-29T00:00:00Z",
                None,
            ),
            2 => price_override(
                &id,
                a,
                r#"{"kind":"fine_tune"}"#,
                r#""multiplier":"0""#,
                "2024-04-29T13:00:00Z",
                None,
            ),
            _ => price_override(&id, a, "{}", r#""multiplier":"1.5""#, "2024-04-29T00:00:00Z", None),
        };
        if i < accounts.len() / 2 {
            first.push(rec);
        } else {
            second.push(rec);
        }
    }
    // The same record again: a duplicate, nothing happens.
    first.push(first[0].clone());
    // A negative multiplier: refused, naming the field.
    first.push(price_override(
        "adj-neg",
        accounts[0],
        "{}",
        r#""multiplier":"-1""#,
        "2024-04-29T00:00:00Z",
        None,
    ));
    // Another content under an id applied already: a conflict.
    second.push(price_override(
        "adj-1",
        accounts[1],
        "{}",
        r#""multiplier":"0.5""#,
        "2024-04-29T00:00:00Z",
        None,
    ));
    // The 1.5× override of account 3 ended early, at Apr 30 06:00.
    second.push(format!(
        r#"{{"adjustment_id":"end-3","account_id":"{}","type":"override_end","reason":"goodwill ends","requested_by":"support@example.com","ends":"adj-3","effective_until":"2024-04-30T06:00:00Z"}}"#,
        accounts[3]
    ));
    (first, second)
}

/// Twelve accounts that spend control leaves alone: every record of theirs
/// is post-paid (payg or enterprise) with no spend limit. Where spend
/// control acts, what is charged depends on the price in force when it
/// acted (a job told to stop is charged up to the command and the grace),
/// so an override that arrives later cannot undo it.
fn post_paid_without_spend_limit(w: &Workload) -> Vec<&str> {
    let mut ok: BTreeMap<&str, bool> = BTreeMap::new();
    for (k, r) in &w.accounts {
        let v: serde_json::Value = serde_json::from_str(r).expect("account record");
        let fine = matches!(v["plan"].as_str(), Some("payg" | "enterprise")) && v["spend_limit"].is_null();
        *ok.entry(k.as_str()).or_insert(true) &= fine;
    }
    ok.into_iter()
        .filter(|(_, fine)| *fine)
        .map(|(k, _)| k)
        .take(12)
        .collect()
}

/// What each account was charged in all (`amount`), from the charges topic.
fn paid(charges: impl IntoIterator<Item = String>) -> BTreeMap<String, Decimal> {
    let mut m: BTreeMap<String, Decimal> = BTreeMap::new();
    for c in charges {
        let v: serde_json::Value = serde_json::from_str(&c).expect("charge");
        let amount = Decimal::from_str(v["amount"].as_str().expect("amount")).expect("decimal");
        *m.entry(v["account_id"].as_str().unwrap_or_default().to_owned())
            .or_default() += amount;
    }
    m
}

fn produce_adjustments(prefix: &str, records: &[String]) {
    let p = producer_for(Placement::Murmur2);
    let topic = format!("{prefix}.adjustments");
    for r in records {
        let account = jobmeter_core::adjust::adjustment_account(r.as_bytes()).expect("an account");
        send_at(
            &p,
            &topic,
            Some(account.as_str().as_bytes()),
            Some(r.as_bytes()),
            None,
            None,
        );
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn price_overrides_written_during_a_catch_up_bill_as_if_in_force_from_the_start_through_sigkills() {
    let name = "adjust";
    let prefix = fresh_prefix(name);
    let dir = tempfile::tempdir().expect("tempdir");
    let specs: Vec<MeterSpec> = (0..2)
        .map(|i| {
            MeterSpec::new(
                &prefix,
                &format!("{name}-{i}"),
                dir.path().join(format!("s{i}")),
                PARTITIONS,
            )
        })
        .collect();
    let mut first = specs[0].start();
    wait_for_topics(&prefix);
    assert_eq!(first.terminate(), Some(0));
    let w = workload(&fleet(91), PARTITIONS);
    produce_accounts(&prefix, &w);
    produce_by_worker(
        &prefix,
        &w,
        &[Placement::Murmur2, Placement::ConsistentRandom, Placement::Keyless],
    );
    let (round1, round2) = adjustments(&w);
    let all: Vec<String> = round1.iter().chain(&round2).cloned().collect();
    let want = expected_in_merge_order_after(&prefix, &w, &all);
    let want_paid = paid(want.charges.values().cloned());
    let plain = expected_in_merge_order(&prefix, &w);
    assert_ne!(
        paid(plain.charges.values().cloned()),
        want_paid,
        "the overrides change what is paid"
    );

    let mut meters: Vec<MeterProc> = specs.iter().map(MeterSpec::start).collect();
    let charges_topic = format!("{prefix}.charges");
    {
        let refs: Vec<&MeterProc> = meters.iter().collect();
        wait_until("a quarter of the charges", Duration::from_secs(600), &refs, || {
            read_all(&charges_topic).len() * 4 >= plain.charges.len()
        });
    }
    produce_adjustments(&prefix, &round1);
    // A record that names no account cannot be routed: dead-lettered by
    // the forwarder.
    let p = producer();
    send_at(
        &p,
        &format!("{prefix}.adjustments"),
        None,
        Some(br#"{"adjustment_id":"x","type":"price_override"}"#),
        None,
        None,
    );
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
    meters[1].kill9();
    meters[1] = specs[1].start();
    std::thread::sleep(Duration::from_millis(1_500));
    produce_adjustments(&prefix, &round2);
    meters[0].kill9();
    meters[0] = specs[0].start();
    std::thread::sleep(Duration::from_millis(2_000));
    meters[1].kill9();
    meters[1] = specs[1].start();

    let mut want_reasons = want.reasons.clone();
    *want_reasons.entry("schema_violation".to_owned()).or_default() += 1;
    let refs: Vec<&MeterProc> = meters.iter().collect();
    wait_until("every account's total", Duration::from_secs(900), &refs, || {
        paid(read_all(&charges_topic)) == want_paid
    });
    let started = std::time::Instant::now();
    while read_outputs(&prefix).reasons != want_reasons && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_until("all statements", Duration::from_secs(60), &refs, || {
        read_all(&format!("{prefix}.statements")).len() >= want.statements.len()
    });
    std::thread::sleep(Duration::from_secs(2));
    // read_outputs fails on any charge, limit event or statement seen twice.
    let got = read_outputs(&prefix);
    for m in meters.iter_mut().rev() {
        assert_eq!(m.terminate(), Some(0), "clean exit after SIGTERM");
    }
    assert_eq!(paid(got.charges.values().cloned()), want_paid, "what each account paid");
    let adjusted = post_paid_without_spend_limit(&w);
    for c in got.commands.values() {
        let v: serde_json::Value = serde_json::from_str(c).expect("command");
        assert!(
            !adjusted.contains(&v["account_id"].as_str().unwrap_or_default()),
            "spend control acted on an adjusted account: {c}"
        );
    }
    assert_eq!(got.reasons, want_reasons, "dead letters by reason");
    // Overrides arrived after usage they cover had been charged: some
    // charges re-rate it (a reversal and a new charge, each adjusting the
    // original), and every charge an override rated names it.
    let docs: Vec<serde_json::Value> = got
        .charges
        .values()
        .map(|c| serde_json::from_str(c).expect("charge"))
        .collect();
    let reversals = docs
        .iter()
        .filter(|c| c["charge_id"].as_str().unwrap_or_default().contains("/rerate/"))
        .count();
    assert!(reversals > 0, "no usage charged before its override was re-rated");
    for c in docs
        .iter()
        .filter(|c| c["charge_id"].as_str().unwrap_or_default().contains("/rerate/"))
    {
        assert!(!c["adjusts"].is_null(), "{c}");
        assert!(
            c["adjustment_id"]
                .as_str()
                .is_some_and(|a| a.starts_with("adj-") || a == "end-3"),
            "{c}"
        );
    }
    let named: std::collections::BTreeSet<&str> = docs.iter().filter_map(|c| c["adjustment_id"].as_str()).collect();
    for id in ["adj-0", "adj-1", "adj-3", "end-3"] {
        assert!(named.contains(id), "no charge names {id}: {named:?}");
    }
    eprintln!(
        "{} charges, {} re-rating reversals, {} charges naming an adjustment",
        docs.len(),
        reversals,
        docs.iter().filter(|c| !c["adjustment_id"].is_null()).count()
    );
    assert_rebuild_matches(&specs[0], true);
}
