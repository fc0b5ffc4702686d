//! `jobmeter notify` against a flaky webhook receiver: the receiver fails
//! some requests with 500, drops some connections without answering, and
//! always refuses one poisoned event. Every other event is accepted exactly
//! once under its idempotency key with a valid signature — across a
//! restart of the notifier — and the poisoned one is dead-lettered.

use crate::support;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const SECRET: &str = "test-webhook-secret-0123456789";

#[derive(Default)]
struct Received {
    /// 2xx answers given, per idempotency key.
    accepted: BTreeMap<String, u32>,
    /// Requests whose signature did not verify.
    bad_signatures: u32,
    /// Requests seen.
    requests: u64,
}

fn verify(ts: &str, body: &[u8], sig: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()) else {
        return false;
    };
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    sig == format!("v1={want}")
}

/// A webhook receiver that misbehaves on purpose.
fn flaky_receiver(state: Arc<Mutex<Received>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counter = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (state, counter) = (state.clone(), counter.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut headers = BTreeMap::new();
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                    }
                }
                let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let key = headers.get("idempotency-key").cloned().unwrap_or_default();
                let mut out = stream;
                let reply = |out: &mut std::net::TcpStream, status: &str| {
                    let _ = write!(
                        out,
                        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                };
                let mut st = state.lock().expect("lock");
                st.requests += 1;
                let signed = verify(
                    headers.get("x-jobmeter-timestamp").map_or("", String::as_str),
                    &body,
                    headers.get("x-jobmeter-signature").map_or("", String::as_str),
                );
                if !signed {
                    st.bad_signatures += 1;
                    drop(st);
                    reply(&mut out, "401 Unauthorized");
                } else if key.contains("poison") || n % 3 == 1 {
                    drop(st);
                    reply(&mut out, "500 Internal Server Error");
                } else if n % 7 == 5 {
                    // Hang up without an answer.
                    drop(st);
                } else {
                    *st.accepted.entry(key).or_default() += 1;
                    drop(st);
                    reply(&mut out, "200 OK");
                }
            });
        }
    });
    format!("http://{addr}/hooks/limits")
}

fn start_notifier(prefix: &str, webhook: &str, log: &std::path::Path) -> std::process::Child {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    std::process::Command::new(bin())
        .args(["notify", "--brokers", &brokers(), "--topic-prefix", prefix])
        .args(["--group", &format!("{prefix}-notify"), "--webhook", webhook])
        .args([
            "--initial-backoff",
            "20ms",
            "--max-backoff",
            "200ms",
            "--give-up-after",
            "3s",
        ])
        .args(["--request-timeout", "2s"])
        .env("JOBMETER_WEBHOOK_SECRET", SECRET)
        .env("JOBMETER_LOG", "info,librdkafka=warn")
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("jobmeter notify")
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn delivers_every_limit_event_once_and_dead_letters_the_undeliverable() {
    let prefix = fresh_prefix("notify");
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let topics = jobmeter_kafka::topics::Topics::with_prefix(&prefix);
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(jobmeter_kafka::topics::ensure_topics(
            &settings,
            &topics,
            &jobmeter_kafka::topics::TopicLayout {
                partitions: 2,
                output_partitions: 2,
                replication: 1,
            },
        ))
        .expect("topics");
    let ids: Vec<String> = (0..40)
        .map(|i| {
            if i == 17 {
                format!("acct-{:03}/poison/2024-05/80", i % 9)
            } else {
                format!("acct-{:03}/model_api_cap/2024-05/{}", i % 9, 80 + i)
            }
        })
        .collect();
    let p = producer();
    for id in &ids {
        let account = id.split('/').next().expect("account");
        let json =
            format!(r#"{{"event_id":"{id}","account_id":"{account}","limit":"model_api_cap","threshold_pct":80}}"#);
        send(&p, &topics.limits, account, Some(json.as_bytes()), None);
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");

    let state = Arc::new(Mutex::new(Received::default()));
    let webhook = flaky_receiver(state.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("notify.log");
    let mut n = start_notifier(&prefix, &webhook, &log);
    let accepted = || state.lock().expect("lock").accepted.len();
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("a first part delivered", &|| accepted() >= 12);
    // A graceful restart in the middle: what was delivered is committed.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &n.id().to_string()])
        .status();
    let st = n.wait().expect("wait");
    assert!(st.success(), "notify exits 0 on SIGTERM: {st:?}");
    n = start_notifier(&prefix, &webhook, &log);
    wait("every good event delivered", &|| accepted() >= ids.len() - 1);
    wait("the poisoned event dead-lettered", &|| {
        !read_all(&format!("{}-dlq", topics.limits)).is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &n.id().to_string()])
        .status();
    assert!(n.wait().expect("wait").success());

    let st = state.lock().expect("lock");
    assert_eq!(st.bad_signatures, 0, "every request is signed with the secret");
    let want: Vec<&String> = ids.iter().filter(|i| !i.contains("poison")).collect();
    assert_eq!(st.accepted.keys().collect::<Vec<_>>(), {
        let mut w = want.clone();
        w.sort();
        w
    });
    for (k, c) in &st.accepted {
        assert_eq!(*c, 1, "{k} accepted {c} times");
    }
    assert!(
        st.requests > ids.len() as u64 + 5,
        "the receiver failed some requests ({} requests)",
        st.requests
    );

    // The dead letter keeps the event and says why.
    let mut dlq = Vec::new();
    jobmeter_kafka::reader::read_to_end(
        &settings,
        "it-notify-dlq",
        &format!("{}-dlq", topics.limits),
        &[(0, None)],
        Duration::from_secs(30),
        |r| dlq.push(r),
    )
    .expect("read dlq");
    assert_eq!(dlq.len(), 1);
    let value = String::from_utf8_lossy(dlq[0].value.as_deref().unwrap_or_default()).into_owned();
    assert!(value.contains("poison"), "{value}");
    let headers: BTreeMap<_, _> = dlq[0].headers.iter().cloned().collect();
    assert_eq!(
        headers.get("jobmeter.reason").map(String::as_str),
        Some("webhook_undeliverable")
    );
    assert_eq!(headers.get("jobmeter.last_status").map(String::as_str), Some("500"));
    // The same source layout as the meter's dead letters.
    assert!(headers
        .get("jobmeter.source.topic")
        .is_some_and(|t| t.ends_with(".limits")));
    assert!(headers
        .get("jobmeter.source.partition")
        .is_some_and(|p| p.parse::<i32>().is_ok()));
    assert!(headers
        .get("jobmeter.source.offset")
        .is_some_and(|o| o.parse::<i64>().is_ok()));
    assert!(!headers.contains_key("jobmeter.source"));
    assert!(
        headers
            .get("jobmeter.attempts")
            .and_then(|a| a.parse::<u32>().ok())
            .unwrap_or(0)
            >= 2
    );
}
