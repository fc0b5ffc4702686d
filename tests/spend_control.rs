//! Spend control end to end, on the real broker: a free account with $1.00
//! of credits runs three long jobs through emitter-based workers (two
//! linked to `jobmeter-emit`, one wrapped by `jobmeter emit run`), and the
//! meter is SIGKILLed twice: midway, and about when the credits run out.
//! When the credits are used up every
//! worker is told to stop and stops; each `job.stop` is published once; the
//! charges exceed the credits by no more than the documented bound; and
//! everything published equals what an offline meter computes from the
//! input topic (the same commands too), as does `jobmeter rebuild`.

use crate::support;

use jobmeter_core::*;
use jobmeter_emit::{Emitter, EmitterConfig, JobSpec, StopStatus};
use jobmeter_kafka::client::KafkaSettings;
use rdkafka::producer::Producer;
use serde_json::Value;
use std::time::{Duration, Instant};
use support::*;

const ACCOUNT: &str = "acct-free-spend";
const RATE: &str = "0.02"; // USD per second, per job
const HEARTBEAT: Duration = Duration::from_secs(1);
const GRACE_S: i64 = 5;
const ADMIN: &str = "it-admin-token-0123456789";

const CARD: &str = r#"
[policy]
rounding = "ceil_seconds"

[[versions]]
version = "spend-test"
effective_from = "2024-01-01T00:00:00Z"
fine_tune_per_second = "0.02"
models."gpu-burner" = { per_second = "0.02" }
"#;

/// A library worker: runs until told to stop, then reports `cancelled`.
fn library_worker(emitter: Emitter, job: &str, kind: &str) -> std::thread::JoinHandle<Option<String>> {
    let spec = match kind {
        "fine_tune" => JobSpec::fine_tune(ACCOUNT, job),
        _ => JobSpec::inference(ACCOUNT, job, "gpu-burner"),
    };
    std::thread::spawn(move || {
        let guard = emitter.start(spec).expect("start");
        let stop = guard.cancellation();
        let told = stop.wait(Duration::from_secs(180));
        let reason = stop.command().map(|c| c.reason);
        guard
            .finish(if told {
                StopStatus::Cancelled
            } else {
                StopStatus::Succeeded
            })
            .expect("finish");
        reason
    })
}

/// The outputs an offline meter computes from the input topic as it stands.
fn offline(prefix: &str, card: &RateCard, plans: &PlanCatalog, book: &AccountBook, config: &MeterConfig) -> Outputs {
    let settings = KafkaSettings::new(brokers());
    let topic = format!("{prefix}.job-events");
    let n = jobmeter_kafka::topics::partition_count(&settings, &topic).expect("partitions");
    let ctx = Context::new(card, plans, book, config);
    let mut out = Vec::new();
    let name: std::sync::Arc<str> = topic.as_str().into();
    for p in 0..n {
        let mut meter = Meter::new();
        let ctx = ctx.with_partition(p, n, jobmeter_kafka::partitioner::partition_for_key);
        jobmeter_kafka::reader::read_to_end(
            &settings,
            "it-offline",
            &topic,
            &[(p, None)],
            Duration::from_secs(60),
            |r| {
                let origin = Origin {
                    topic: name.clone(),
                    partition: p,
                    offset: r.offset,
                    record_time: r.timestamp_ms.map(Timestamp),
                };
                meter
                    .apply(&ctx, r.value.as_deref().unwrap_or_default(), Some(&origin), &mut out)
                    .expect("apply");
            },
        )
        .expect("read");
    }
    collect(out)
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn a_free_account_out_of_credits_has_its_workers_stopped_once_within_the_bound() {
    let prefix = fresh_prefix("spend");
    let dir = tempfile::tempdir().expect("tempdir");
    let card_path = dir.path().join("rate-card.toml");
    std::fs::write(&card_path, CARD).expect("rate card");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{ADMIN} *\n")).expect("tokens");
    let mut spec = MeterSpec::new(&prefix, "spend-0", dir.path().join("state"), 2);
    spec.extra = [
        format!("billing.rate_card={}", card_path.display()),
        format!("meter.stop_grace={GRACE_S}s"),
        format!("api.tokens_file={}", tokens.display()),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_owned(), s])
    .collect();

    let record = format!(
        r#"{{"account_id":"{ACCOUNT}","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"1.00"}}"#
    );
    let mut meter = spec.start();
    wait_for_topics(&prefix);
    let p = producer();
    send(
        &p,
        &format!("{prefix}.accounts"),
        ACCOUNT,
        Some(record.as_bytes()),
        Some(0),
    );
    p.flush(Duration::from_secs(30)).expect("flush");
    wait_until("the meter is ready", Duration::from_secs(60), &[&meter], || {
        http_get(&meter.http, "/readyz").is_some_and(|b| b.starts_with("ready"))
    });
    // The account record is read before the jobs start.
    std::thread::sleep(Duration::from_secs(2));

    // Three jobs at $0.02/s each: $1.00 lasts about 17 s.
    let mut cfg = EmitterConfig::new(brokers(), "gpu-worker/test/spend").with_prefix(&prefix);
    cfg.heartbeat_interval = HEARTBEAT;
    let emitter = Emitter::new(cfg).expect("emitter");
    let started = Instant::now();
    let w1 = library_worker(emitter.clone(), "job-inference", "inference");
    let w2 = library_worker(emitter.clone(), "job-fine-tune", "fine_tune");
    let mut w3 = std::process::Command::new(bin())
        .args(["emit", "run", "--brokers", &brokers(), "--topic-prefix", &prefix])
        .args(["--account", ACCOUNT, "--job", "job-wrapped", "--kind", "inference"])
        .args(["--model", "gpu-burner", "--heartbeat", "1s", "--kill-after", "5s", "--"])
        .args(["sleep", "600"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("jobmeter emit run");

    // SIGKILL the meter in the middle of the jobs, and again about when the
    // credits run out (17 s in), bringing it back each time.
    for at in [6, 16] {
        std::thread::sleep(Duration::from_secs(at).saturating_sub(started.elapsed()));
        meter.kill9();
        std::thread::sleep(Duration::from_millis(500));
        meter = spec.start();
    }

    let r1 = w1.join().expect("worker 1");
    let r2 = w2.join().expect("worker 2");
    let out3 = {
        let deadline = Instant::now() + Duration::from_secs(120);
        while matches!(w3.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = w3.kill();
        w3.wait_with_output().expect("emit run output")
    };
    let stopped_after = started.elapsed();
    let log3 = String::from_utf8_lossy(&out3.stderr).into_owned();
    assert_eq!(
        r1.as_deref(),
        Some("free_credits_exhausted"),
        "worker 1 was told to stop"
    );
    assert_eq!(
        r2.as_deref(),
        Some("free_credits_exhausted"),
        "worker 2 was told to stop"
    );
    assert!(
        log3.contains("the meter sent job.stop (free_credits_exhausted)"),
        "{log3}"
    );
    assert!(log3.contains("job job-wrapped cancelled"), "{log3}");
    assert!(stopped_after < Duration::from_secs(90), "{stopped_after:?}");
    emitter.flush(Duration::from_secs(30)).expect("delivered");

    // Every job charged, each command published once (read_outputs panics
    // on a repeated id).
    let jobs = ["job-fine-tune", "job-inference", "job-wrapped"];
    wait_until("three jobs charged", Duration::from_secs(60), &[&meter], || {
        read_outputs(&prefix).charges.len() == 3
    });
    let got = read_outputs(&prefix);
    let commands: Vec<Value> = got
        .commands
        .values()
        .map(|c| serde_json::from_str(c).expect("command json"))
        .collect();
    assert_eq!(commands.len(), 3, "{commands:#?}");
    for (c, job) in commands.iter().zip(jobs) {
        assert_eq!(c["type"], "job.stop");
        assert_eq!(c["job_id"], job);
        assert_eq!(c["reason"], "free_credits_exhausted");
        assert_eq!(c["limit"], "free_credits");
    }
    let mut charged = Money::ZERO;
    for c in got.charges.values() {
        let v: Value = serde_json::from_str(c).expect("charge json");
        assert_eq!(v["status"], "cancelled", "{c}");
        charged += Money::parse(v["amount"].as_str().unwrap_or_default()).expect("amount");
    }
    // The documented bound: per job, rate × (heartbeat interval + stop
    // grace + 1 s of rounding).
    let overshoot = charged - Money::parse("1.00").expect("credits");
    let rate = Money::parse(RATE).expect("rate");
    let bound = rate * rust_decimal::Decimal::from(3 * (HEARTBEAT.as_secs() as i64 + GRACE_S + 1));
    println!("charged {charged} for $1.00 of credits: overshoot {overshoot} (bound {bound})");
    assert!(
        overshoot >= Money::ZERO && overshoot <= bound,
        "overshoot {overshoot} > bound {bound}"
    );
    assert!(
        got.limits.keys().any(|id| id.ends_with("/runway-600s")),
        "a runway warning came first: {:?}",
        got.limits.keys()
    );

    // The API agrees: no more jobs for this account.
    let (status, body) = http_call(
        &meter.http,
        &format!("/v1/accounts/{ACCOUNT}/admission?kind=inference&model=gpu-burner&max_seconds=60"),
        Some(ADMIN),
    );
    assert_eq!(status, 200, "{body}");
    let a: Value = serde_json::from_str(&body).expect("admission json");
    assert_eq!(
        (a["allow"].as_bool(), a["reason"].as_str()),
        (Some(false), Some("free_credits_exhausted")),
        "{body}"
    );
    assert!(
        a["committed_offsets"].as_object().is_some_and(|o| !o.is_empty()),
        "{body}"
    );
    let (status, body) = http_call(&meter.http, &format!("/v1/accounts/{ACCOUNT}/limits"), Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    let l: Value = serde_json::from_str(&body).expect("limits json");
    let credits = &l["limits"][0];
    assert_eq!(
        (credits["limit"].as_str(), credits["policy"].as_str()),
        (Some("free_credits"), Some("stop")),
        "{body}"
    );
    assert_eq!(credits["runway_seconds"], "0", "{body}");

    // Offline, from the input topic: the same charges, limit events and
    // commands.
    let card = RateCard::from_toml(CARD).expect("card");
    let plans = PlanCatalog::from_toml(&std::fs::read_to_string(root().join("config/plans.toml")).expect("plans"))
        .expect("plans");
    let mut book = AccountBook::new(&plans);
    book.insert(AccountRecord::parse(record.as_bytes()).expect("record"));
    let config = MeterConfig {
        stop_grace_ms: GRACE_S * 1000,
        ..MeterConfig::default()
    };
    let want = offline(&prefix, &card, &plans, &book, &config);
    assert_eq!(got.charges, want.charges, "charges");
    assert_eq!(got.limits, want.limits, "limit events");
    assert_eq!(got.commands, want.commands, "commands");
    assert_same(&got, &want);
    drop(meter);
    assert_rebuild_matches(&spec, true);
}
