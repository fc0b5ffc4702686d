//! The usage API and the metrics, against a real run: a meter consuming a
//! simulated fleet from the local broker. What the API says must be what
//! the charges topic says; the counters must move as the workload says;
//! tokens must be enforced.

use crate::support;

use jobmeter_offline::simulate::FleetOptions;
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;
use support::*;

const ADMIN: &str = "it-admin-token-0123456789";
const ACCOUNT_TOKEN: &str = "it-account-token-0123456789";

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap_or("0")).unwrap_or_else(|e| panic!("{v}: {e}"))
}

#[derive(Default, Debug, PartialEq)]
struct Line {
    jobs: u64,
    seconds: Decimal,
    amount: Decimal,
}

/// Statement lines per (account, period) as the charges topic implies:
/// seconds and amounts summed by (kind, model); a charge adds a job unless
/// it adjusts a charge of the same service period.
fn lines_from_charges(charges: &[Value]) -> BTreeMap<(String, String), BTreeMap<(String, String), Line>> {
    let mut out: BTreeMap<(String, String), BTreeMap<(String, String), Line>> = BTreeMap::new();
    for c in charges {
        let key = (
            c["account_id"].as_str().expect("present").to_owned(),
            c["period"].as_str().expect("present").to_owned(),
        );
        let line_key = (
            c["kind"].as_str().expect("present").to_owned(),
            c["model"].as_str().unwrap_or_default().to_owned(),
        );
        let l = out.entry(key).or_default().entry(line_key).or_default();
        let new_job = match c["adjusts"].as_str() {
            None => true,
            Some(adjusted) => !adjusted.ends_with(c["service_period"].as_str().expect("present")),
        };
        l.jobs += u64::from(new_job);
        l.seconds += dec(&c["billable_seconds"]);
        l.amount += dec(&c["amount"]);
    }
    out
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn usage_api_and_metrics_match_the_run() {
    let prefix = fresh_prefix("api");
    let dir = tempfile::tempdir().expect("tempdir");
    let w = workload(
        &FleetOptions {
            seed: 11,
            jobs: 2_000,
            accounts: 40,
            mean_gap_ms: 3_000,
            // Across Apr 16 00:00: post-paid accounts' usage is in two half
            // months, asked for by their interval labels below.
            start: jobmeter_core::Timestamp::parse("2024-04-15T23:00:00Z").expect("time"),
            ..FleetOptions::default()
        },
        2,
    );
    let own_account = w.accounts[0].0.clone();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("# test tokens\n{ADMIN} *\n{ACCOUNT_TOKEN} {own_account}\n"),
    )
    .expect("tokens");
    let mut spec = MeterSpec::new(&prefix, "api-0", dir.path().join("state"), 2);
    spec.extra = vec!["--set".into(), format!("api.tokens_file={}", tokens.display())];
    let meter = spec.start();
    wait_for_topics(&prefix);
    wait_until("ready", Duration::from_secs(60), &[&meter], || {
        http_get(&meter.http, "/readyz").is_some()
    });
    assert_eq!(meter.metric("jobmeter_events_total").unwrap_or(0.0), 0.0);
    produce_accounts(&prefix, &w);

    // First half: the counters say exactly what the offline meter says.
    let half = w.events.len() / 2;
    produce_events(&prefix, &w, 0..half, 0);
    let want_half = expected(&w, half);
    wait_until("first half counted", Duration::from_secs(120), &[&meter], || {
        meter.metric("jobmeter_events_total") == Some(half as f64)
    });
    assert_eq!(
        meter.metric("jobmeter_charges_total"),
        Some(want_half.charges.len() as f64),
        "charges after the first half"
    );
    assert_eq!(
        meter.metric("jobmeter_limit_events_total").unwrap_or(0.0),
        want_half.limits.len() as f64
    );

    // The rest: counters move by the second half's outputs.
    produce_events(&prefix, &w, half..w.events.len(), 0);
    let want = expected(&w, w.events.len());
    wait_until("everything counted", Duration::from_secs(120), &[&meter], || {
        meter.metric("jobmeter_events_total") == Some(w.events.len() as f64)
    });
    assert_eq!(meter.metric("jobmeter_charges_total"), Some(want.charges.len() as f64));
    assert_eq!(
        meter.metric("jobmeter_limit_events_total").unwrap_or(0.0),
        want.limits.len() as f64
    );
    assert_eq!(
        meter.metric("jobmeter_statements_total").unwrap_or(0.0),
        want.statements.len() as f64
    );
    assert!(meter.metric("jobmeter_charged_usd_total").unwrap_or(0.0) > 0.0);
    assert_eq!(meter.metric("jobmeter_assigned_partitions"), Some(2.0));

    // The usage API agrees with the charges topic, line by line.
    let charges: Vec<Value> = read_all(&format!("{prefix}.charges"))
        .iter()
        .map(|c| serde_json::from_str(c).expect("charge json"))
        .collect();
    assert_eq!(charges.len(), want.charges.len());
    let by_account = lines_from_charges(&charges);
    let mut checked = 0;
    for ((account, period), lines) in &by_account {
        let (status, body) = http_call(
            &meter.http,
            &format!("/v1/accounts/{account}/usage?period={period}"),
            Some(ADMIN),
        );
        assert_eq!(status, 200, "{account} {period}: {body}");
        let v: Value = serde_json::from_str(&body).expect("usage json");
        let mut got: BTreeMap<(String, String), Line> = BTreeMap::new();
        for l in v["lines"].as_array().expect("lines") {
            let jobs = l["jobs"].as_u64().expect("present");
            let seconds = dec(&l["billable_seconds"]);
            if jobs > 0 {
                let avg = (seconds / Decimal::from(jobs)).round_dp(3);
                assert_eq!(dec(&l["average_duration_seconds"]), avg, "average duration");
            }
            got.insert(
                (
                    l["kind"].as_str().expect("present").to_owned(),
                    l["model"].as_str().unwrap_or_default().to_owned(),
                ),
                Line {
                    jobs,
                    seconds,
                    amount: dec(&l["amount"]),
                },
            );
        }
        assert_eq!(&got, lines, "usage of {account} in {period}");
        let total: Decimal = lines.values().map(|l| l.amount).sum();
        assert_eq!(dec(&v["totals"]["amount"]), total);
        // Workflow runs are the sum of their steps.
        for run in v["workflow_runs"].as_array().expect("runs") {
            let steps: Decimal = run["steps"]
                .as_array()
                .expect("present")
                .iter()
                .map(|s| dec(&s["amount"]))
                .sum();
            assert_eq!(dec(&run["amount"]), steps);
        }
        checked += 1;
    }
    assert!(checked >= 30, "checked {checked} account-periods");
    let halves = by_account.keys().filter(|(_, p)| p.contains('/')).count();
    assert!(halves >= 10, "half-month periods asked for by their labels: {halves}");

    // Limits: what the limit events say has fired is marked fired.
    for l in want.limits.values() {
        let l: Value = serde_json::from_str(l).expect("present");
        let (account, period) = (
            l["account_id"].as_str().expect("present"),
            l["period"].as_str().expect("present"),
        );
        let (status, body) = http_call(
            &meter.http,
            &format!("/v1/accounts/{account}/limits?period={period}"),
            Some(ADMIN),
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("present");
        let limit = v["limits"]
            .as_array()
            .expect("present")
            .iter()
            .find(|x| x["limit"] == l["limit"])
            .unwrap_or_else(|| panic!("{} missing from {body}", l["limit"]));
        let threshold = l["event_id"]
            .as_str()
            .expect("present")
            .rsplit('/')
            .next()
            .expect("present");
        if threshold.starts_with("runway-") {
            // A runway warning is listed with the runway, not the thresholds.
            let fired = limit["runway_events_fired"].as_array().expect("present");
            assert!(fired.iter().any(|f| f == threshold), "{threshold} missing from {body}");
            continue;
        }
        let t = limit["thresholds"]
            .as_array()
            .expect("present")
            .iter()
            .find(|t| t["threshold"] == threshold)
            .unwrap_or_else(|| panic!("threshold {threshold} missing from {body}"));
        assert_eq!(t["fired"], true, "{body}");
    }

    // Tokens.
    let usage = format!("/v1/accounts/{own_account}/usage");
    assert_eq!(http_call(&meter.http, &usage, None).0, 401);
    assert_eq!(http_call(&meter.http, &usage, Some("not-a-token-at-all-xx")).0, 401);
    assert_eq!(http_call(&meter.http, &usage, Some(ACCOUNT_TOKEN)).0, 200);
    let other = &w.accounts[1].0;
    assert_eq!(
        http_call(&meter.http, &format!("/v1/accounts/{other}/usage"), Some(ACCOUNT_TOKEN)).0,
        403
    );
    assert_eq!(
        http_call(&meter.http, "/v1/accounts/no-such-account/usage", Some(ADMIN)).0,
        404
    );
    assert_eq!(
        http_call(
            &meter.http,
            &format!("/v1/accounts/{own_account}/usage?period=May"),
            Some(ADMIN)
        )
        .0,
        400
    );
    let (s, card) = http_call(&meter.http, "/v1/rate-card", Some(ACCOUNT_TOKEN));
    assert_eq!(s, 200);
    assert!(card.contains("flux-schnell"), "{card}");
    assert_eq!(http_call(&meter.http, "/v1/rate-card", None).0, 401);
    let (s, model) = http_call(&meter.http, "/v1/models/flux-schnell", Some(ADMIN));
    assert_eq!(s, 200, "{model}");
    let m: Value = serde_json::from_str(&model).expect("present");
    assert_eq!(m["current"]["per_second"], "0.00045");
    assert_eq!(http_call(&meter.http, "/v1/models/no-such-model", Some(ADMIN)).0, 404);
    let (s, doc) = http_call(&meter.http, "/v1/openapi.json", None);
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&doc).expect("present"),
        serde_json::from_str::<Value>(jobmeter_service::api::OPENAPI).expect("present")
    );
    assert!(meter.metric("jobmeter_api_requests_total").unwrap_or(0.0) > 40.0);
}

/// With two instances, each answers for its own partitions and names the
/// owner of the others.
#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn misdirected_requests_name_the_owner() {
    let prefix = fresh_prefix("api-owner");
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{ADMIN} *\n")).expect("tokens");
    let extra = vec!["--set".to_owned(), format!("api.tokens_file={}", tokens.display())];
    let mut a = MeterSpec::new(&prefix, "own-a", dir.path().join("a"), 4);
    a.extra = extra.clone();
    let mut b = MeterSpec::new(&prefix, "own-b", dir.path().join("b"), 4);
    b.extra = extra;
    let ma = a.start();
    wait_for_topics(&prefix);
    let mb = b.start();
    let w = workload(
        &FleetOptions {
            seed: 5,
            jobs: 400,
            accounts: 20,
            ..FleetOptions::default()
        },
        4,
    );
    produce_accounts(&prefix, &w);
    // Produce with Kafka's default partitioner (keyed by account), as
    // workers do.
    let p = producer();
    for e in &w.events {
        send(
            &p,
            &format!("{prefix}.job-events"),
            &e.key,
            Some(e.json.as_bytes()),
            None,
        );
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("present");
    // Split 2/2 and restored (ready) on both.
    let both_own = || {
        ma.metric("jobmeter_assigned_partitions") == Some(2.0)
            && mb.metric("jobmeter_assigned_partitions") == Some(2.0)
            && http_get(&ma.http, "/readyz").is_some()
            && http_get(&mb.http, "/readyz").is_some()
    };
    wait_until(
        "partitions split 2/2 and restored",
        Duration::from_secs(90),
        &[&ma, &mb],
        both_own,
    );
    // The counts as they stand are part of a failure's message: what each
    // instance counted and how far behind each is.
    let counted = std::cell::RefCell::new(String::new());
    let all_counted = || {
        let (a, b) = (ma.metric("jobmeter_events_total"), mb.metric("jobmeter_events_total"));
        *counted.borrow_mut() = format!(
            "{} events; a counted {a:?} (lag {:?}, batches {:?}), b {b:?} (lag {:?}, batches {:?})",
            w.events.len(),
            ma.metric("jobmeter_consumer_lag"),
            ma.metric("jobmeter_batch_events_count"),
            mb.metric("jobmeter_consumer_lag"),
            mb.metric("jobmeter_batch_events_count"),
        );
        a.unwrap_or(0.0) + b.unwrap_or(0.0) == w.events.len() as f64
    };
    let started = std::time::Instant::now();
    while !all_counted() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "timed out waiting for all events counted: {}\n--- a ---\n{}\n--- b ---\n{}",
            counted.borrow(),
            ma.log_tail(),
            mb.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // `/readyz` can say ready for a moment after a rebalance hands an
    // instance new partitions and before it has restored them; its usage
    // API then answers 503 `not_ready` ("retry shortly"). Wait until both
    // answer for real.
    let first = format!("/v1/accounts/{}/usage", w.accounts[0].0);
    wait_until("both instances answering", Duration::from_secs(30), &[&ma, &mb], || {
        http_call(&ma.http, &first, Some(ADMIN)).0 != 503 && http_call(&mb.http, &first, Some(ADMIN)).0 != 503
    });
    let mut misdirected = 0;
    for (account, _) in &w.accounts {
        let path = format!("/v1/accounts/{account}/usage");
        let (sa, ba) = http_call(&ma.http, &path, Some(ADMIN));
        let (sb, bb) = http_call(&mb.http, &path, Some(ADMIN));
        let mut answers = [(sa, ba), (sb, bb)];
        answers.sort_by_key(|x| x.0);
        assert_eq!(
            (answers[0].0, answers[1].0),
            (200, 421),
            "{account}: {answers:?}\n--- logs ---\n{}\n---\n{}",
            ma.log_tail(),
            mb.log_tail(),
            answers = [&answers[0].1, &answers[1].1]
        );
        let v: Value = serde_json::from_str(&answers[1].1).expect("present");
        let owner_url = v["owner"]["url"]
            .as_str()
            .unwrap_or_else(|| panic!("no owner url: {}", answers[1].1));
        // The owner named is the instance that answered 200.
        let answered_by: Value = serde_json::from_str(&answers[0].1).expect("present");
        let owner_is_a = answered_by["served_by"] == "own-a";
        assert_eq!(owner_url, if owner_is_a { ma.http.as_str() } else { mb.http.as_str() });
        assert_eq!(
            v["partition"].as_i64(),
            Some(jobmeter_kafka::group::partition_for_key(account.as_bytes(), 4) as i64)
        );
        misdirected += 1;
    }
    assert_eq!(misdirected, w.accounts.len());
}
