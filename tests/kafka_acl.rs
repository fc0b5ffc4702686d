//! The Kafka ACLs of `deploy/kafka-acls.sh` on the local broker's
//! SASL/SCRAM listener (where ACLs apply and a principal without one is
//! refused): the meter, its workers, the account service and the readers
//! each authenticate as their own principal. The meter bills the fleet
//! exactly as offline under those ACLs alone; a worker, the meter and a
//! reader that try to write account records or adjustments are refused by
//! the broker; `emit`, `dump` and `rebuild` run with the same security
//! properties as the meter.

use crate::support;

use jobmeter_kafka::client::KafkaSettings;
use jobmeter_offline::simulate::FleetOptions;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer};
use std::process::Command;
use std::time::Duration;
use support::*;

/// The SASL/SCRAM listener of the local broker: its client port + 2
/// (`deploy/local/kafka.sh`), or `JOBMETER_KAFKA_SASL_BROKERS`.
fn sasl_brokers() -> (String, String) {
    let plain = brokers();
    let port: u16 = plain.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(9092);
    let sasl = std::env::var("JOBMETER_KAFKA_SASL_BROKERS").unwrap_or_else(|_| format!("127.0.0.1:{}", port + 2));
    (port.to_string(), sasl)
}

fn password(user: &str) -> String {
    format!("{user}-test-secret-8c1f")
}

/// The `--set` flags of `user`'s SASL/SCRAM properties.
fn sasl_sets(user: &str) -> Vec<String> {
    [
        "security.protocol=SASL_PLAINTEXT".to_owned(),
        "sasl.mechanisms=SCRAM-SHA-512".to_owned(),
        format!("sasl.username={user}"),
        format!("sasl.password={}", password(user)),
    ]
    .iter()
    .flat_map(|kv| ["--set".to_owned(), format!("kafka.properties.{kv}")])
    .collect()
}

fn sasl_settings(brokers: &str, user: &str) -> KafkaSettings {
    let mut s = KafkaSettings::new(brokers);
    for (k, v) in [
        ("security.protocol", "SASL_PLAINTEXT".to_owned()),
        ("sasl.mechanisms", "SCRAM-SHA-512".to_owned()),
        ("sasl.username", user.to_owned()),
        ("sasl.password", password(user)),
    ] {
        s.properties.insert(k.to_owned(), v);
    }
    s
}

fn sasl_producer(brokers: &str, user: &str) -> ThreadedProducer<DefaultProducerContext> {
    sasl_settings(brokers, user).producer().create().expect("producer")
}

/// Writes one record as `user`; the broker's answer (its delivery report).
fn try_write(brokers: &str, user: &str, topic: &str, key: &str, value: &str) -> Result<(), String> {
    let p: FutureProducer = sasl_settings(brokers, user).producer().create().expect("producer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(p.send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(30)))
        .map(|_| ())
        .map_err(|(e, _)| e.to_string())
}

/// Runs one of the repository's scripts with bash; panics with its
/// standard error when it fails.
fn script(path: &str, args: &[&str], env: &[(&str, String)]) {
    let out = Command::new("bash")
        .arg(root().join(path))
        .args(args)
        .current_dir(root())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        out.status.success(),
        "{path} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn local_kafka(port: &str, args: &[&str]) {
    script(
        "deploy/local/kafka.sh",
        args,
        &[("JOBMETER_KAFKA_PORT", port.to_owned())],
    );
}

/// The ACLs of a test's prefix, removed again when it ends.
struct Acls<'a> {
    port: &'a str,
    prefix: &'a str,
}

impl<'a> Acls<'a> {
    fn add(port: &'a str, prefix: &'a str) -> Acls<'a> {
        acls(port, prefix, "add");
        Acls { port, prefix }
    }
}

impl Drop for Acls<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            acls(self.port, self.prefix, "remove");
        }
    }
}

/// Runs `deploy/kafka-acls.sh mode` for `prefix` against the local broker.
fn acls(port: &str, prefix: &str, mode: &str) {
    let env = [
        ("KAFKA_ACLS", "bash deploy/local/kafka.sh acls".to_owned()),
        ("JOBMETER_KAFKA_PORT", port.to_owned()),
        ("PREFIX", prefix.to_owned()),
        ("GROUP", format!("{prefix}-group")),
        ("METER", "User:it-meter".to_owned()),
        ("WORKERS", "User:it-workers".to_owned()),
        ("ACCOUNTS", "User:it-accounts".to_owned()),
        ("SUPPORT", "User:it-support".to_owned()),
        ("NOTIFY", "User:it-notify".to_owned()),
        ("READERS", "User:it-readers".to_owned()),
        ("READERS_GROUP", format!("{prefix}-readers")),
    ];
    script("deploy/kafka-acls.sh", &[mode], &env);
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn only_the_principals_of_the_acls_write_the_inputs_that_move_money() {
    let (port, sasl) = sasl_brokers();
    for user in ["it-meter", "it-workers", "it-accounts", "it-readers"] {
        local_kafka(&port, &["scram-user", user, &password(user)]);
    }
    let prefix = fresh_prefix("acl");
    let _acls = Acls::add(&port, &prefix);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = MeterSpec::new(&prefix, "acl-0", dir.path().join("state"), 2);
    spec.brokers = sasl.clone();
    spec.extra = sasl_sets("it-meter");
    let meter = spec.start();
    // The meter created its topics as it-meter (the Create ACL).
    wait_for_topics(&prefix);

    let opts = FleetOptions {
        seed: 31,
        jobs: 300,
        accounts: 12,
        mean_gap_ms: 2_000,
        ..FleetOptions::default()
    };
    let w = workload(&opts, spec.partitions);
    let accounts = sasl_producer(&sasl, "it-accounts");
    for (k, v) in &w.accounts {
        send(&accounts, &format!("{prefix}.accounts"), k, Some(v.as_bytes()), Some(0));
    }
    accounts.flush(Duration::from_secs(30)).expect("flush");
    let workers = sasl_producer(&sasl, "it-workers");
    for e in &w.events {
        send(
            &workers,
            &format!("{prefix}.job-events"),
            &e.key,
            Some(e.json.as_bytes()),
            Some(partition_of(&e.key, w.partitions)),
        );
    }
    workers.flush(Duration::from_secs(60)).expect("flush");

    // Everyone but the account service is refused on the accounts topic,
    // everyone but support (and the meter's own API) on adjustments.
    let enterprise = r#"{"account_id":"acct-0001","plan":"enterprise"}"#;
    for who in ["it-workers", "it-meter", "it-readers"] {
        let refused = try_write(&sasl, who, &format!("{prefix}.accounts"), "acct-0001", enterprise)
            .expect_err(&format!("{who} must not write account records"));
        assert!(refused.contains("TopicAuthorizationFailed"), "{who}: {refused}");
    }
    for who in ["it-workers", "it-readers"] {
        let refused = try_write(&sasl, who, &format!("{prefix}.adjustments"), "acct-0001", "{}")
            .expect_err(&format!("{who} must not write adjustments"));
        assert!(refused.contains("TopicAuthorizationFailed"), "{who}: {refused}");
    }

    let want = expected(&w, w.events.len());
    wait_until("every charge", Duration::from_secs(120), &[&meter], || {
        read_all(&format!("{prefix}.charges")).len() >= want.charges.len()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_same(&read_outputs(&prefix), &want);

    // The emitter, as a worker: start, heartbeats, stop, and the commands
    // listener, through the same properties.
    let (acct, _) = &w.accounts[0];
    let emitted = Command::new(bin())
        .args(["emit", "run", "--brokers", &sasl, "--topic-prefix", &prefix])
        .args(["--account", acct, "--job", "job-acl-emit", "--kind", "inference"])
        .args(["--model", "sdxl-turbo", "--heartbeat", "200ms"])
        .args(sasl_sets("it-workers"))
        .args(["--", "sleep", "1"])
        .output()
        .expect("jobmeter emit run");
    assert!(emitted.status.success(), "{}", String::from_utf8_lossy(&emitted.stderr));
    wait_until("the emitted job's charge", Duration::from_secs(60), &[&meter], || {
        read_all(&format!("{prefix}.charges"))
            .iter()
            .any(|c| c.contains("\"job-acl-emit\""))
    });

    // A reader dumps the charges under its own group prefix.
    let dumped = Command::new(bin())
        .args(["dump", "--topic", &format!("{prefix}.charges"), "--brokers", &sasl])
        .args(["--set", &format!("kafka.group_id={prefix}-readers")])
        .args(sasl_sets("it-readers"))
        .output()
        .expect("jobmeter dump");
    assert!(dumped.status.success(), "{}", String::from_utf8_lossy(&dumped.stderr));
    assert_eq!(
        String::from_utf8_lossy(&dumped.stdout).lines().count(),
        want.charges.len() + 1,
        "every charge, and the emitted job's"
    );

    let mut meter = meter;
    assert_eq!(meter.terminate(), Some(0), "clean exit");
    // The rebuild reads the inputs and internal topics as the meter.
    assert_rebuild_matches(&spec, true);
}
