//! Pricing adjustments through Kafka: price overrides written to the
//! adjustments topic while two meters catch up on a mixed fleet's backlog,
//! with SIGKILLs in between, reach the meter of their account exactly once
//! and re-rate what was charged before they arrived; a credit grant, its
//! void and a fee go the same way. What each account pays in all must equal
//! the contract's computation with the adjustments in force from the start
//! (an override costs the same whenever it arrives), every
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

/// About 47,000 events of 150 accounts, none changing plan, over two days from Apr 29
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
    // A credit grant (amounts are unchanged by it; what is due is not
    // compared), voided again; a fee on another account.
    second.push(format!(
        r#"{{"adjustment_id":"grant-4","account_id":"{}","type":"credit_grant","amount":"1.00","reason":"goodwill","requested_by":"support@example.com"}}"#,
        accounts[4]
    ));
    second.push(format!(
        r#"{{"adjustment_id":"fee-5","account_id":"{}","type":"manual_charge","amount":"2.50","description":"onboarding","reason":"contract","requested_by":"support@example.com","created_at":"2024-04-30T09:00:00Z"}}"#,
        accounts[5]
    ));
    second.push(format!(
        r#"{{"adjustment_id":"void-4","account_id":"{}","type":"credit_void","voids":"grant-4","reason":"granted twice","requested_by":"support@example.com"}}"#,
        accounts[4]
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

/// The accounts whose totals differ between `got` and `want`.
fn differing<'a>(got: &'a BTreeMap<String, Decimal>, want: &'a BTreeMap<String, Decimal>) -> Vec<&'a String> {
    let accounts: std::collections::BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    accounts.into_iter().filter(|a| got.get(*a) != want.get(*a)).collect()
}

/// The accounts whose totals differ, then the charges of the first few of
/// them: what a timeout shows.
fn paid_difference(got: &BTreeMap<String, Decimal>, want: &BTreeMap<String, Decimal>, charges: &[String]) -> String {
    let differ = differing(got, want);
    let mut out = format!(
        "{} charges read; {} accounts' totals differ:\n",
        charges.len(),
        differ.len()
    );
    for a in &differ {
        out += &format!(
            "  {a}: paid {:?}, expected {:?}\n",
            got.get(*a).map(Decimal::to_string),
            want.get(*a).map(Decimal::to_string)
        );
    }
    for a in differ.iter().take(3) {
        let needle = format!("\"account_id\":\"{a}\"");
        let of: Vec<&String> = charges.iter().filter(|c| c.contains(&needle)).collect();
        out += &format!("charges of {a} ({}, the last 25):\n", of.len());
        for c in &of[of.len().saturating_sub(25)..] {
            let v: serde_json::Value = serde_json::from_str(c).unwrap_or_default();
            out += &format!(
                "    {} {} adjustment {} adjusts {}\n",
                v["charge_id"], v["amount"], v["adjustment_id"], v["adjusts"]
            );
        }
    }
    out
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

/// How the meters of [`paid_offline`] keep their state.
#[derive(Debug, Clone, Copy)]
enum Keeping {
    /// All in memory.
    Memory,
    /// All in memory, and every meter is rebuilt from its stored state
    /// before the given event (a restart).
    RestoredAt(usize),
    /// Finished jobs in an archive that, as in the service, holds every
    /// batch of `batch` events but the last one; with `restart`, every
    /// meter is rebuilt from its durable state (the store caught up from
    /// the changelog, as after a kill) at the first batch end from that
    /// event on.
    Archived { batch: usize, restart: Option<usize> },
}

/// One partition's meter of [`paid_offline`] and what it made durable.
struct Part {
    meter: jobmeter_core::Meter,
    archive: jobmeter_core::archive::SharedMemArchive,
    /// The batch taken last, not yet in the archive.
    handed_over: Vec<jobmeter_core::state::StateChange>,
    /// Every record of the batches in the archive, as a store holds them.
    durable: BTreeMap<(jobmeter_core::state::Table, Vec<u8>), Vec<u8>>,
}

impl Part {
    /// The batch handed over is durable: in the archive and the store.
    fn store_handed_over(&mut self) {
        self.archive.apply(&self.handed_over);
        for c in self.handed_over.drain(..) {
            match c.value {
                Some(v) => self.durable.insert((c.table, c.key), v),
                None => self.durable.remove(&(c.table, c.key)),
            };
        }
    }
}

/// What each account pays when the meters of the workload's partitions
/// take its events in order, with `round1` applied before event `at.0` and
/// `round2` before event `at.1` (each record to its account's meter).
fn paid_offline(
    w: &Workload,
    (round1, round2): (&[String], &[String]),
    at: (usize, usize),
    keeping: Keeping,
) -> BTreeMap<String, Decimal> {
    use jobmeter_core::archive::SharedMemArchive;
    use jobmeter_core::{Context, Meter, MeterConfig, Output};
    let (rates, plans, book) = billing(w);
    let config = MeterConfig::default();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let mut parts: BTreeMap<i32, Part> = (0..w.partitions)
        .map(|p| {
            let archive = SharedMemArchive::default();
            let meter = match keeping {
                Keeping::Archived { .. } => Meter::tracking_changes().with_archive(Box::new(archive.clone())),
                _ => Meter::default(),
            };
            let part = Part {
                meter,
                archive,
                handed_over: Vec::new(),
                durable: BTreeMap::new(),
            };
            (p, part)
        })
        .collect();
    let mut restarted = false;
    let mut out = Vec::new();
    let ctx_of = |p: i32| ctx.with_partition(p, w.partitions, jobmeter_kafka::partitioner::partition_for_key);
    let adjust = |parts: &mut BTreeMap<i32, Part>, records: &[String], out: &mut Vec<Output>| {
        for a in records {
            let account = jobmeter_core::adjust::adjustment_account(a.as_bytes()).expect("an account");
            let p = partition_of(account.as_str(), w.partitions);
            let m = &mut parts.get_mut(&p).expect("meter").meter;
            m.apply_adjustment(&ctx_of(p), a.as_bytes(), None, out)
                .expect("apply an adjustment");
        }
    };
    for (i, e) in w.events.iter().enumerate() {
        if matches!(keeping, Keeping::RestoredAt(r) if r == i) {
            for part in parts.values_mut() {
                let stored = part.meter.snapshot().expect("snapshot");
                let records = stored.into_iter().filter_map(|c| c.value.map(|v| (c.table, c.key, v)));
                part.meter = Meter::restore(records, &config).expect("restore");
            }
        }
        if i == at.0 {
            adjust(&mut parts, round1, &mut out);
        }
        if i == at.1 {
            adjust(&mut parts, round2, &mut out);
        }
        let p = partition_of(&e.key, w.partitions);
        let m = &mut parts.get_mut(&p).expect("meter").meter;
        m.apply(&ctx_of(p), e.json.as_bytes(), None, &mut out).expect("apply");
        let Keeping::Archived { batch, restart } = keeping else {
            continue;
        };
        if (i + 1) % batch != 0 {
            continue;
        }
        for part in parts.values_mut() {
            // The previous batch is durable now; this one is handed over.
            part.store_handed_over();
            part.handed_over = part.meter.take_changes().expect("changes");
            part.meter.release_stored();
        }
        if !restarted && restart.is_some_and(|r| i >= r) {
            restarted = true;
            for part in parts.values_mut() {
                // Killed once the batch handed over was committed: the
                // store is caught up from the changelog, and the meter
                // rebuilt from it.
                part.store_handed_over();
                let records = part.durable.iter().map(|((t, k), v)| (*t, k.clone(), v.clone()));
                part.meter = Meter::restore(records, &config)
                    .expect("restore")
                    .with_archive(Box::new(part.archive.clone()));
            }
        }
    }
    if at.0 >= w.events.len() {
        adjust(&mut parts, round1, &mut out);
    }
    if at.1 >= w.events.len() {
        adjust(&mut parts, round2, &mut out);
    }
    let charges = out.into_iter().filter_map(|o| match o {
        Output::Charge(c) => Some(serde_json::to_string(&c).expect("charge")),
        _ => None,
    });
    paid(charges)
}

/// The rule the test below checks through Kafka, offline and everywhere:
/// wherever the two rounds of adjustments fall in the stream, whether
/// finished jobs are in memory or archived, and with a restart from stored
/// or durable state between the rounds, each account pays what it pays
/// with the adjustments applied first.
#[test]
fn adjustments_cost_the_same_wherever_they_fall_in_the_stream() {
    let w = workload(&fleet(91), PARTITIONS);
    let (round1, round2) = adjustments(&w);
    let rounds = (round1.as_slice(), round2.as_slice());
    let want = paid_offline(&w, rounds, (0, 0), Keeping::Memory);
    let n = w.events.len();
    let mut tried = 0;
    for k in 0..5 {
        for step in 0..=2 {
            let first = (n * step / 2 + k * 131) % (n + 1);
            for second in [(first + n / 10).min(n), n] {
                let between = (first + second) / 2;
                let keeping = match k {
                    0 => Keeping::Memory,
                    1 => Keeping::Archived {
                        batch: 1,
                        restart: None,
                    },
                    2 => Keeping::Archived {
                        batch: 97,
                        restart: None,
                    },
                    3 => Keeping::RestoredAt(between),
                    _ => Keeping::Archived {
                        batch: 97,
                        restart: Some(between),
                    },
                };
                let got = paid_offline(&w, rounds, (first, second), keeping);
                tried += 1;
                if got != want {
                    let diff: Vec<String> = differing(&got, &want)
                        .into_iter()
                        .map(|a| format!("{a}: {:?} instead of {:?}", got.get(a), want.get(a)))
                        .collect();
                    panic!("rounds at events {first} and {second} of {n}, {keeping:?}: {diff:?}");
                }
            }
        }
    }
    eprintln!("{tried} placements, each account paying the same");
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
    wait_until_explained("every account's total", Duration::from_secs(900), &refs, || {
        let charges = read_all(&charges_topic);
        let got = paid(charges.iter().cloned());
        if got == want_paid {
            Ok(())
        } else {
            Err(paid_difference(&got, &want_paid, &charges))
        }
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

const ADMIN: &str = "it-admin-token-0123456789";
const SUPPORT: &str = "it-support-token-0123456789";
const ACCOUNT_TOKEN: &str = "it-account-token-0123456789";

/// `GET /v1/accounts/{account}/adjustments` until `id` has `status`.
fn wait_status(m: &MeterProc, account: &str, id: &str, status: &str) -> serde_json::Value {
    let path = format!("/v1/accounts/{account}/adjustments");
    let mut last = String::new();
    for _ in 0..200 {
        let (code, body) = http_request("GET", &m.http, &path, Some(SUPPORT), None);
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            if let Some(a) = v["adjustments"]
                .as_array()
                .and_then(|l| l.iter().find(|a| a["adjustment_id"] == id))
            {
                if a["status"] == status {
                    return a.clone();
                }
            }
        }
        last = format!("{code} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{id} of {account} never {status}: {last}\n{}", m.log_tail());
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn support_writes_adjustments_through_the_api_and_the_command_line() {
    let prefix = fresh_prefix("adjust-api");
    let dir = tempfile::tempdir().expect("tempdir");
    let account = "acct-api-7";
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{ADMIN} *\n{SUPPORT} * support\n{ACCOUNT_TOKEN} {account}\n"),
    )
    .expect("tokens file");
    let mut spec = MeterSpec::new(&prefix, "adjust-api", dir.path().join("state"), 2);
    spec.extra
        .extend(["--set".to_owned(), format!("api.tokens_file={}", tokens.display())]);
    let mut m = spec.start();
    wait_for_topics(&prefix);
    // One job, so that the account is known and its partition restored.
    let p = producer();
    let events = format!("{prefix}.job-events");
    for (t, ty, data) in [
        (
            "2024-05-01T10:00:00Z",
            "job.started",
            r#""kind":"inference","model":"sdxl-1.0""#,
        ),
        ("2024-05-01T10:01:40Z", "job.stopped", r#""status":"succeeded""#),
    ] {
        let ev = format!(
            r#"{{"specversion":"1.0","id":"{ty}-1","source":"it","type":"{ty}","time":"{t}","subject":"job-1","data":{{"account_id":"{account}",{data}}}}}"#
        );
        send(&p, &events, account, Some(ev.as_bytes()), None);
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
    wait_until("the job's charge", Duration::from_secs(60), &[&m], || {
        read_all(&format!("{prefix}.charges")).len() == 1
    });

    let path = format!("/v1/accounts/{account}/adjustments");
    let record = |id: &str, multiplier: &str| {
        format!(
            r#"{{"adjustment_id":"{id}","type":"price_override","selector":{{"model":"sdxl-1.0"}},"multiplier":"{multiplier}","effective_from":"2024-05-01T00:00:00Z","reason":"outage goodwill","requested_by":"support@example.com"}}"#
        )
    };
    let post = |token: Option<&str>, body: &str| http_request("POST", &m.http, &path, token, Some(body));
    // Scopes: only a support token writes.
    assert_eq!(post(None, &record("a-1", "0.5")).0, 401);
    assert_eq!(post(Some(ACCOUNT_TOKEN), &record("a-1", "0.5")).0, 403);
    assert_eq!(post(Some(ADMIN), &record("a-1", "0.5")).0, 403);
    // Checked before anything is written, the field named.
    let (code, body) = post(Some(SUPPORT), &record("a-1", "-0.5"));
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("invalid_value") && body.contains("multiplier"), "{body}");
    let (code, body) = post(
        Some(SUPPORT),
        &record("a-1", "0.5").replace("sdxl-1.0", "no-such-model"),
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("unknown_model"), "{body}");
    let (code, body) = post(
        Some(SUPPORT),
        &record("a-1", "0.5").replace(r#""adjustment_id""#, r#""account_id":"someone-else","adjustment_id""#),
    );
    assert_eq!(code, 422, "{body}");
    // Written, pending, then applied; the charge is re-rated at half price.
    let (code, body) = post(Some(SUPPORT), &record("a-1", "0.5"));
    assert_eq!(code, 202, "{body}");
    assert!(body.contains(r#""status":"pending""#), "{body}");
    let applied = wait_status(&m, account, "a-1", "applied");
    assert_eq!(applied["type"], "price_override");
    assert_eq!(applied["requested_by"], "support@example.com");
    // The same record again answers the same; other content is a conflict.
    let (code, body) = post(Some(SUPPORT), &record("a-1", "0.5"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""status":"applied""#), "{body}");
    let (code, body) = post(Some(SUPPORT), &record("a-1", "0.25"));
    assert_eq!(code, 409, "{body}");
    // The account reads its own adjustments; not another's.
    assert_eq!(http_request("GET", &m.http, &path, Some(ACCOUNT_TOKEN), None).0, 200);
    assert_eq!(
        http_request(
            "GET",
            &m.http,
            "/v1/accounts/other/adjustments",
            Some(ACCOUNT_TOKEN),
            None
        )
        .0,
        403
    );
    wait_until("the re-rating charges", Duration::from_secs(30), &[&m], || {
        read_all(&format!("{prefix}.charges")).len() == 3
    });
    let charges: Vec<serde_json::Value> = read_all(&format!("{prefix}.charges"))
        .iter()
        .map(|c| serde_json::from_str(c).expect("charge"))
        .collect();
    let total: Decimal = charges
        .iter()
        .map(|c| Decimal::from_str(c["amount"].as_str().expect("amount")).expect("decimal"))
        .sum();
    let first = Decimal::from_str(charges[0]["amount"].as_str().expect("amount")).expect("decimal");
    assert_eq!(
        total * Decimal::TWO,
        first,
        "half price after the override: {charges:?}"
    );
    assert!(charges[1..].iter().all(|c| c["adjustment_id"] == "a-1"));

    // From a shell: a file with a refused line writes nothing (exit 2,
    // the line named); a good one is written and applied.
    let file = dir.path().join("adjust.jsonl");
    let end = format!(
        r#"{{"adjustment_id":"e-1","account_id":"{account}","type":"override_end","ends":"a-1","effective_until":"2024-05-01T10:00:50Z","reason":"goodwill ends","requested_by":"support@example.com"}}"#
    );
    let bad = record("b-1", "x").replace(
        r#""adjustment_id""#,
        &format!(r#""account_id":"{account}","adjustment_id""#),
    );
    std::fs::write(&file, format!("{end}\n{bad}\n")).expect("file");
    let adjust = |file: &std::path::Path| {
        std::process::Command::new(bin())
            .current_dir(root())
            .args(["adjust", file.to_str().expect("path"), "--brokers", &brokers()])
            .args(["--set", &format!("topics.prefix={prefix}")])
            .output()
            .expect("jobmeter adjust")
    };
    let out = adjust(&file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("line 2: invalid_value") && err.contains("nothing written"),
        "{err}"
    );
    std::fs::write(&file, format!("{end}\n")).expect("file");
    let out = adjust(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_status(&m, account, "e-1", "applied");
    // Half of the job (the first 50 s) at half price, the rest at list.
    let three_quarters = first * Decimal::from_str("0.75").expect("decimal");
    wait_until("the end's re-rating charges", Duration::from_secs(30), &[&m], || {
        paid(read_all(&format!("{prefix}.charges"))).get(account) == Some(&three_quarters)
    });
    // Every write through the API, and every refused request, is logged with
    // the token's id (a digest prefix), the route and the outcome; never the
    // token itself.
    let log = std::fs::read_to_string(&m.log).expect("log");
    let id_of = |t: &str| {
        use sha2::Digest;
        let d = sha2::Sha256::digest(t.as_bytes());
        format!(
            "sha256:{}",
            d.iter().take(6).map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    // Without the terminal colours.
    let plain: String = {
        let mut out = String::new();
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let lines: Vec<&str> = plain.lines().filter(|l| l.contains("jobmeter_audit")).collect();
    let has = |what: &str, token: &str, status: &str| {
        lines
            .iter()
            .any(|l| l.contains(what) && l.contains(&id_of(token)) && l.contains(status))
    };
    assert!(has("adjustment write", SUPPORT, "202"), "{lines:#?}");
    assert!(has("adjustment write", SUPPORT, "409"), "{lines:#?}");
    assert!(has("api request refused", ACCOUNT_TOKEN, "403"), "{lines:#?}");
    assert!(has("api request refused", ADMIN, "403"), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("api request refused") && l.contains("token=none") && l.contains("401")),
        "{lines:#?}"
    );
    assert!(
        !log.contains(SUPPORT) && !log.contains(ADMIN) && !log.contains(ACCOUNT_TOKEN),
        "a token in the log"
    );

    // A refund reverses every charge of the job: the account pays nothing.
    let refund = |id: &str| {
        format!(
            r#"{{"adjustment_id":"{id}","type":"job_refund","job_id":"job-1","reason":"the worker hung","requested_by":"support@example.com"}}"#
        )
    };
    let (code, body) = post(Some(SUPPORT), &refund("r-1"));
    assert_eq!(code, 202, "{body}");
    wait_status(&m, account, "r-1", "applied");
    wait_until("the refund's charges", Duration::from_secs(30), &[&m], || {
        paid(read_all(&format!("{prefix}.charges"))).get(account) == Some(&Decimal::ZERO)
    });
    // A credit grant covers the next job in full; /credits shows it drawn.
    let (code, body) = post(
        Some(SUPPORT),
        r#"{"adjustment_id":"g-1","type":"credit_grant","amount":"100.00","reason":"goodwill","requested_by":"support@example.com"}"#,
    );
    assert_eq!(code, 202, "{body}");
    wait_status(&m, account, "g-1", "applied");
    for (t, ty, data) in [
        (
            "2024-05-01T11:00:00Z",
            "job.started",
            r#""kind":"inference","model":"sdxl-1.0""#,
        ),
        ("2024-05-01T11:00:20Z", "job.stopped", r#""status":"succeeded""#),
    ] {
        let ev = format!(
            r#"{{"specversion":"1.0","id":"{ty}-2","source":"it","type":"{ty}","time":"{t}","subject":"job-2","data":{{"account_id":"{account}",{data}}}}}"#
        );
        send(&p, &events, account, Some(ev.as_bytes()), None);
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
    let charge_of_job_2 = || {
        read_all(&format!("{prefix}.charges"))
            .iter()
            .map(|c| serde_json::from_str::<serde_json::Value>(c).expect("charge"))
            .find(|c| c["job_id"] == "job-2")
    };
    wait_until("job-2's charge", Duration::from_secs(30), &[&m], || {
        charge_of_job_2().is_some()
    });
    let c2 = charge_of_job_2().expect("charge");
    let dec = |v: &serde_json::Value| Decimal::from_str(v.as_str().expect("decimal string")).expect("decimal");
    assert_eq!(dec(&c2["amount_due"]), Decimal::ZERO, "{c2}");
    let amount2 = dec(&c2["amount"]);
    let credits_path = format!("/v1/accounts/{account}/credits");
    let (code, body) = http_request("GET", &m.http, &credits_path, Some(ACCOUNT_TOKEN), None);
    assert_eq!(code, 200, "{body}");
    let credits: serde_json::Value = serde_json::from_str(&body).expect("json");
    let g = &credits["grants"][0];
    assert_eq!(g["adjustment_id"], "g-1");
    assert_eq!(dec(&g["used"]), amount2, "{body}");
    assert_eq!(dec(&g["remaining"]), Decimal::ONE_HUNDRED - amount2, "{body}");
    assert_eq!(dec(&credits["balance"]), Decimal::ONE_HUNDRED - amount2, "{body}");

    // After a restart (state from RocksDB), a second refund of the job is
    // refused by the meter: it was refunded already.
    assert_eq!(m.terminate(), Some(0));
    let m = spec.start();
    wait_until("ready again", Duration::from_secs(60), &[&m], || {
        http_get(&m.http, "/readyz").is_some()
    });
    let (code, body) = http_request("POST", &m.http, &path, Some(SUPPORT), Some(&refund("r-2")));
    assert_eq!(code, 202, "{body}");
    wait_until(
        "the second refund dead-lettered",
        Duration::from_secs(60),
        &[&m],
        || read_outputs(&prefix).reasons.get("invalid_value") == Some(&1),
    );
    assert_eq!(
        paid(read_all(&format!("{prefix}.charges"))).get(account),
        Some(&amount2),
        "job-1 refunded, job-2 charged (and covered by the grant)"
    );
    // The grant's use survived the restart.
    let (_, body) = http_request("GET", &m.http, &credits_path, Some(SUPPORT), None);
    let credits: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(dec(&credits["grants"][0]["used"]), amount2, "{body}");
    let mut m = m;
    assert_eq!(m.terminate(), Some(0));
}
