//! Helpers for the end-to-end tests: a fresh topic prefix per test, the
//! `jobmeter` binary as a child process, producing a simulated fleet to
//! explicit partitions, reading committed outputs, and the expected outputs
//! computed offline by the same core, one meter per partition.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use jobmeter_core::{AccountBook, AccountRecord, Context, Meter, MeterConfig, Output, PlanCatalog, RateCard};
use jobmeter_kafka::client::{brokers_from_env, KafkaSettings};
use jobmeter_kafka::reader::read_to_end;
use jobmeter_offline::simulate::{accounts, events, FleetOptions, SimEvent};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

thread_local! {
    /// The broker this test thread uses instead of the shared one (see
    /// [`use_brokers`]).
    static BROKERS: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The broker the tests use: this thread's own when [`use_brokers`] set
/// one, else `JOBMETER_KAFKA_BROKERS` (default 127.0.0.1:9092).
pub fn brokers() -> String {
    BROKERS.with(|b| b.borrow().clone()).unwrap_or_else(brokers_from_env)
}

/// Until the guard drops, this test (its thread) uses `brokers` instead
/// of the shared broker. Not the environment: the suites share one process,
/// and the others must keep the shared broker meanwhile.
#[must_use = "the override ends when the guard drops"]
pub fn use_brokers(brokers: &str) -> BrokersGuard {
    BROKERS.with(|b| *b.borrow_mut() = Some(brokers.to_owned()));
    BrokersGuard(())
}

/// See [`use_brokers`].
pub struct BrokersGuard(());

impl Drop for BrokersGuard {
    fn drop(&mut self) {
        BROKERS.with(|b| *b.borrow_mut() = None);
    }
}

/// A topic prefix no other test (or run) uses. Its topics are deleted when
/// the test passes and kept after a failure, to be looked at: a broker that
/// piles up the topics of every run starts slower each time.
pub struct Prefix {
    name: String,
    keep: bool,
}

impl Prefix {
    /// Leaves the topics in place (the test's broker is gone by then).
    pub fn keep_topics(&mut self) {
        self.keep = true;
    }
}

impl std::ops::Deref for Prefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            return;
        }
        let (name, brokers) = (self.name.clone(), brokers());
        // Its own thread and runtime: the test may be inside one already.
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(jobmeter_kafka::topics::delete_prefixed(
                &KafkaSettings::new(brokers),
                &name,
            ))
            .map_err(|e| eprintln!("could not delete the topics of {name}: {e}"))
            .ok()
        })
        .join();
        if let Ok(Some(names)) = deleted {
            eprintln!("deleted {} topics of {}", names.len(), self.name);
        }
    }
}

pub fn fresh_prefix(name: &str) -> Prefix {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Prefix {
        name: format!("it-{name}-{}-{}", std::process::id(), nanos % 1_000_000_000),
        keep: false,
    }
}

pub fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("JOBMETER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let p = dir.join("jobmeter");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --bin jobmeter)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `jobmeter run` child process.
pub struct MeterProc {
    pub child: Child,
    pub http: String,
    pub log: PathBuf,
}

#[derive(Clone)]
pub struct MeterSpec {
    pub prefix: String,
    pub instance: String,
    pub state: PathBuf,
    pub partitions: i32,
    pub brokers: String,
    pub extra: Vec<String>,
}

impl MeterSpec {
    pub fn new(prefix: &str, instance: &str, state: PathBuf, partitions: i32) -> Self {
        MeterSpec {
            prefix: prefix.to_owned(),
            instance: instance.to_owned(),
            state,
            partitions,
            brokers: brokers(),
            extra: Vec::new(),
        }
    }

    /// `jobmeter <sub>` with this instance's settings.
    pub fn command(&self, sub: &str, http_port: u16) -> Command {
        let mut cmd = Command::new(bin());
        cmd.current_dir(root())
            .arg(sub)
            .arg("--brokers")
            .arg(&self.brokers)
            .arg("--instance-id")
            .arg(&self.instance)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(["--set", &format!("topics.prefix={}", self.prefix)])
            .args(["--set", &format!("topics.partitions={}", self.partitions)])
            .args(["--set", "topics.output_partitions=2"])
            // One group per test: meters of tests running side by side must
            // not rebalance each other.
            .args(["--set", &format!("kafka.group_id={}-group", self.prefix)])
            .args(["--set", "kafka.transaction_timeout=10s"])
            .args(["--set", "batch.max_events=500"])
            .args(["--set", "batch.interval=50ms"])
            .args(["--set", "billing.plans=config/plans.toml"])
            .args(&self.extra)
            .env("JOBMETER_LOG", "info,librdkafka=warn,rdkafka=warn")
            .stdin(Stdio::null());
        cmd
    }

    pub fn start(&self) -> MeterProc {
        let port = free_port();
        let log = self.state.with_extension(format!("{}.log", self.instance));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = self.command("run", port);
        cmd.stdout(logf.try_clone().unwrap()).stderr(logf);
        let child = cmd.spawn().unwrap();
        MeterProc {
            child,
            http: format!("http://127.0.0.1:{port}"),
            log,
        }
    }
}

impl MeterProc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let started = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Its log is a file: plain text, no terminal colour codes.
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                assert!(!log.contains('\u{1b}'), "colour codes in {}", self.log.display());
                return st.code();
            }
            if started.elapsed() > Duration::from_secs(60) {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of a metric line (first match, summed over label sets).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(&self.http, "/metrics")?;
        let mut total = None;
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let (key, value) = line.rsplit_once(' ')?;
            let metric = key.split('{').next()?;
            if metric == name {
                *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
            }
        }
        total
    }

    /// The last 60 distinct log lines: a line that repeats one of the few
    /// before it but for its timestamp (clients retrying while the broker
    /// is away) is counted, not repeated, so the tail still shows what came
    /// before the retries.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut lines: Vec<(String, usize)> = Vec::new();
        for line in text.lines() {
            let body = |l: &str| l.split_once(' ').map_or(l, |(_, rest)| rest).to_owned();
            let b = body(line);
            let recent = lines.len().saturating_sub(4);
            match lines[recent..].iter_mut().find(|(l, _)| body(l) == b) {
                Some((_, n)) => *n += 1,
                None => lines.push((line.to_owned(), 1)),
            }
        }
        lines[lines.len().saturating_sub(60)..]
            .iter()
            .map(|(l, n)| if *n > 1 { format!("{l}   (×{n})") } else { l.clone() })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for MeterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET (no client dependency needed in tests).
pub fn http_get(base: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// A GET with an optional bearer token: (status, body).
pub fn http_call(base: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_request("GET", base, path, token, None)
}

/// A request with an optional bearer token and JSON body: (status, body).
pub fn http_request(method: &str, base: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").expect("http:// base");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = body
        .map(|b| format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content}Connection: close\r\n\r\n{}",
        body.unwrap_or_default()
    )
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let (head, body) = buf.split_once("\r\n\r\n").expect("response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A fleet and where each event goes.
pub struct Workload {
    pub accounts: Vec<(String, String)>,
    pub events: Vec<SimEvent>,
    pub partitions: i32,
}

/// The partition an account's events go to: Kafka's default partitioner,
/// named explicitly so the offline expectation uses the same split.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    jobmeter_kafka::partitioner::partition_for_key(key.as_bytes(), partitions)
}

pub fn workload(opts: &FleetOptions, partitions: i32) -> Workload {
    Workload {
        accounts: accounts(opts),
        events: events(opts),
        partitions,
    }
}

pub fn producer() -> ThreadedProducer<DefaultProducerContext> {
    KafkaSettings::new(brokers()).producer().create().unwrap()
}

/// Sends one record. A payload that is a valid job event gets its event
/// time as the record timestamp (how history is loaded); anything else is
/// stamped now by the client.
pub fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: Option<&[u8]>,
    partition: Option<i32>,
) {
    let at = payload
        .and_then(|b| jobmeter_core::parse_job_event(b).ok())
        .map(|e| e.time.0);
    send_at(p, topic, Some(key.as_bytes()), payload, partition, at)
}

/// Sends one record, keyless when `key` is `None`, with an explicit record
/// timestamp (`None`: now).
pub fn send_at(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    partition: Option<i32>,
    timestamp_ms: Option<i64>,
) {
    let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(b) = payload {
        rec = rec.payload(b);
    }
    if let Some(ms) = timestamp_ms {
        rec = rec.timestamp(ms);
    }
    if let Some(part) = partition {
        rec = rec.partition(part);
    }
    jobmeter_kafka::produce::send_waiting(p, rec, None).expect("produce");
}

pub fn produce_accounts(prefix: &str, w: &Workload) {
    let p = producer();
    for (k, v) in &w.accounts {
        send(&p, &format!("{prefix}.accounts"), k, Some(v.as_bytes()), Some(0));
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

pub fn produce_events(prefix: &str, w: &Workload, range: std::ops::Range<usize>, per_second: u64) {
    let p = producer();
    let started = Instant::now();
    for (n, e) in w.events[range].iter().enumerate() {
        send(
            &p,
            &format!("{prefix}.job-events"),
            &e.key,
            Some(e.json.as_bytes()),
            Some(partition_of(&e.key, w.partitions)),
        );
        if let Some(us) = (n as u64 * 1_000_000).checked_div(per_second) {
            let due = Duration::from_micros(us);
            let elapsed = started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// How a client of a mixed fleet places its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Keyed by account, Kafka's murmur2 partitioner (Java's default).
    Murmur2,
    /// Keyed by account, librdkafka's default `consistent_random` (CRC32:
    /// Python's, C's, .NET's and Go's confluent clients).
    ConsistentRandom,
    /// No key at all.
    Keyless,
}

/// A producer that places records like `placement`.
pub fn producer_for(placement: Placement) -> ThreadedProducer<DefaultProducerContext> {
    producer_batching(placement, None)
}

/// [`producer_for`], with record batches of at most `batch_bytes` when
/// given (a fetch returns whole batches, whatever its byte limit).
pub fn producer_batching(placement: Placement, batch_bytes: Option<usize>) -> ThreadedProducer<DefaultProducerContext> {
    let mut c = KafkaSettings::new(brokers()).producer();
    if let Some(b) = batch_bytes {
        c.set("batch.size", b.to_string());
    }
    c.set(
        "partitioner",
        match placement {
            Placement::Murmur2 => "murmur2_random",
            _ => "consistent_random",
        },
    );
    c.create().unwrap()
}

/// Produces `w.events[range]` through one client per placement at once.
/// The clients send `chunk` events at a time and wait for each other
/// between chunks, at about `per_second`. Within a chunk an account's
/// events go through one client (a hash of account and chunk picks it), so
/// they keep their order; from chunk to chunk the client changes, so one
/// job's start, heartbeats and stop come from different clients.
pub fn produce_mixed(
    prefix: &str,
    w: &Workload,
    range: std::ops::Range<usize>,
    placements: &[Placement],
    chunk: usize,
    per_second: u64,
) {
    let topic = format!("{prefix}.job-events");
    let events = &w.events[range];
    let barrier = std::sync::Barrier::new(placements.len());
    let started = Instant::now();
    // Made on this thread: it is the one that knows the test's broker.
    let producers: Vec<_> = placements.iter().map(|pl| (pl, producer_for(*pl))).collect();
    std::thread::scope(|s| {
        for (client, (placement, p)) in producers.into_iter().enumerate() {
            let (topic, barrier) = (&topic, &barrier);
            s.spawn(move || {
                for (c, part) in events.chunks(chunk).enumerate() {
                    for e in part {
                        let pick = e
                            .key
                            .bytes()
                            .chain((c as u64).to_le_bytes())
                            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                            });
                        if (pick % placements.len() as u64) as usize != client {
                            continue;
                        }
                        let key = (*placement != Placement::Keyless).then_some(e.key.as_bytes());
                        let at = jobmeter_core::parse_job_event(e.json.as_bytes())
                            .ok()
                            .map(|ev| ev.time.0);
                        send_at(&p, topic, key, Some(e.json.as_bytes()), None, at);
                    }
                    p.flush(Duration::from_secs(60)).unwrap();
                    barrier.wait();
                    if let Some(us) = ((c + 1) as u64 * chunk as u64 * 1_000_000).checked_div(per_second) {
                        let due = Duration::from_micros(us);
                        let elapsed = started.elapsed();
                        if due > elapsed {
                            std::thread::sleep(due - elapsed);
                        }
                    }
                }
            });
        }
    });
}

/// A fleet of 2,500 jobs starting at May 31, 23:00 with about 2 h 45 min of
/// event time: past June 1, 01:00, when May closes (statements, pro fees).
pub fn month_close_fleet(seed: u64, accounts: usize) -> FleetOptions {
    FleetOptions {
        seed,
        jobs: 2_500,
        accounts,
        start: jobmeter_core::Timestamp::parse("2024-05-31T23:00:00Z").expect("time"),
        mean_gap_ms: 4_000,
        ..FleetOptions::default()
    }
}

/// Runs `jobmeter rebuild` (with `--dry-run` when asked) for `spec`'s
/// deployment and asserts that the state and outputs rebuilt from the
/// input topics equal what the meter stored and published.
pub fn assert_rebuild_matches(spec: &MeterSpec, dry_run: bool) {
    let mut cmd = spec.command("rebuild", 0);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().expect("jobmeter rebuild");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "rebuild failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("rebuild matches"), "{text}");
}

/// Waits until the topics exist (the meter creates them at start).
pub fn wait_for_topics(prefix: &str) {
    let settings = KafkaSettings::new(brokers());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if jobmeter_kafka::topics::partition_count(&settings, &format!("{prefix}.changelog")).unwrap_or(0) > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("topics of {prefix} were not created");
}

/// Every committed record of `topic` (values).
pub fn read_all(topic: &str) -> Vec<String> {
    let settings = KafkaSettings::new(brokers());
    let n = jobmeter_kafka::topics::partition_count(&settings, topic).unwrap();
    let parts: Vec<(i32, Option<i64>)> = (0..n).map(|p| (p, None)).collect();
    let mut out = Vec::new();
    read_to_end(&settings, "it-reader", topic, &parts, Duration::from_secs(120), |r| {
        out.push(String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned());
    })
    .unwrap();
    out
}

/// Output documents keyed by id, as the Kafka topics carry them.
#[derive(Debug, Default, PartialEq)]
pub struct Outputs {
    pub charges: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
    pub statements: BTreeMap<String, String>,
    pub commands: BTreeMap<String, String>,
    pub rejects: usize,
    /// Dead letters by reason (`jobmeter.reason`).
    pub reasons: BTreeMap<String, usize>,
}

fn id_of(json: &str, field: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v[field].as_str().unwrap_or_default().to_owned()
}

/// Reads the outputs; panics on any id seen twice (a double effect).
pub fn read_outputs(prefix: &str) -> Outputs {
    let mut o = Outputs::default();
    for c in read_all(&format!("{prefix}.charges")) {
        let id = id_of(&c, "charge_id");
        assert!(o.charges.insert(id.clone(), c).is_none(), "charge {id} emitted twice");
    }
    for l in read_all(&format!("{prefix}.limits")) {
        let id = id_of(&l, "event_id");
        assert!(
            o.limits.insert(id.clone(), l).is_none(),
            "limit event {id} emitted twice"
        );
    }
    for s in read_all(&format!("{prefix}.statements")) {
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let id = format!(
            "{}/{}",
            v["account_id"].as_str().unwrap_or_default(),
            v["period"].as_str().unwrap_or_default()
        );
        assert!(
            o.statements.insert(id.clone(), s).is_none(),
            "statement {id} emitted twice"
        );
    }
    for c in read_all(&format!("{prefix}.commands")) {
        let id = id_of(&c, "command_id");
        assert!(
            o.commands.insert(id.clone(), c).is_none(),
            "command {id} published twice"
        );
    }
    let settings = KafkaSettings::new(brokers());
    let dlq = format!("{prefix}.dlq");
    let n = jobmeter_kafka::topics::partition_count(&settings, &dlq).unwrap();
    let parts: Vec<(i32, Option<i64>)> = (0..n).map(|p| (p, None)).collect();
    read_to_end(&settings, "it-dlq", &dlq, &parts, Duration::from_secs(120), |r| {
        o.rejects += 1;
        if let Some((_, reason)) = r.headers.iter().find(|(k, _)| k == jobmeter_kafka::dlq::REASON) {
            *o.reasons.entry(reason.clone()).or_default() += 1;
        }
    })
    .unwrap();
    o
}

/// The outputs computed offline: one meter per partition, events in the
/// order they were produced to it, same rate card, plans and timeouts.
pub fn expected(w: &Workload, upto: usize) -> Outputs {
    let (rates, plans, book) = billing(w);
    expected_with(w, upto, &rates, &plans, &book)
}

/// [`expected`] with the given prices, plans and accounts.
pub fn expected_with(w: &Workload, upto: usize, rates: &RateCard, plans: &PlanCatalog, book: &AccountBook) -> Outputs {
    let config = MeterConfig::default();
    let ctx = Context::new(rates, plans, book, &config);
    let mut meters: BTreeMap<i32, Meter> = BTreeMap::new();
    let mut out = Vec::new();
    for e in &w.events[..upto] {
        let p = partition_of(&e.key, w.partitions);
        meters
            .entry(p)
            .or_default()
            .apply(
                &ctx.with_partition(p, w.partitions, jobmeter_kafka::partitioner::partition_for_key),
                e.json.as_bytes(),
                None,
                &mut out,
            )
            .expect("apply");
    }
    collect(out)
}

/// The rate card and plans of `config/`, and the workload's accounts.
pub fn billing(w: &Workload) -> (RateCard, PlanCatalog, AccountBook) {
    let rates = RateCard::from_toml(&std::fs::read_to_string(root().join("config/rate-card.toml")).unwrap()).unwrap();
    let plans = PlanCatalog::from_toml(&std::fs::read_to_string(root().join("config/plans.toml")).unwrap()).unwrap();
    let mut book = AccountBook::new(&plans);
    for (_, r) in &w.accounts {
        book.insert(AccountRecord::parse(r.as_bytes()).unwrap());
    }
    (rates, plans, book)
}

/// Outputs by id, as the topics would carry them.
pub fn collect(out: Vec<Output>) -> Outputs {
    let mut o = Outputs::default();
    for x in out {
        match x {
            Output::Charge(c) => {
                o.charges
                    .insert(c.charge_id.clone(), serde_json::to_string(&c).unwrap());
            }
            Output::Limit(l) => {
                o.limits.insert(l.event_id.clone(), serde_json::to_string(&l).unwrap());
            }
            Output::Statement(s) => {
                o.statements.insert(
                    format!("{}/{}", s.account_id, s.period),
                    serde_json::to_string(&s).unwrap(),
                );
            }
            Output::Command(c) => {
                o.commands
                    .insert(c.command_id.clone(), serde_json::to_string(&c).unwrap());
            }
            Output::Reject(r) => {
                o.rejects += 1;
                *o.reasons.entry(r.reason.as_str().to_owned()).or_default() += 1;
            }
        }
    }
    o
}

/// The metrics a timed-out wait shows of each meter.
const PROGRESS_METRICS: [&str; 8] = [
    "jobmeter_assigned_partitions",
    "jobmeter_records_consumed_total",
    "jobmeter_events_total",
    "jobmeter_adjustments_read_total",
    "jobmeter_consumer_lag",
    "jobmeter_merge_wait_seconds_total",
    "jobmeter_pipeline_restarts_total",
    "jobmeter_partition_failed",
];

/// Waits until `f` holds, or panics with `what` and the meter logs.
pub fn wait_until(what: &str, timeout: Duration, logs: &[&MeterProc], mut f: impl FnMut() -> bool) {
    wait_until_explained(what, timeout, logs, || if f() { Ok(()) } else { Err(String::new()) });
}

/// Waits until `f` is `Ok`, or panics with `what`, what `f` last said
/// was still wrong, and the meter logs.
pub fn wait_until_explained(
    what: &str,
    timeout: Duration,
    logs: &[&MeterProc],
    mut f: impl FnMut() -> Result<(), String>,
) {
    let started = Instant::now();
    let mut wrong = String::new();
    while started.elapsed() < timeout {
        match f() {
            Ok(()) => return,
            Err(w) => wrong = w,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // First where each meter stands (whether the process is still there,
    // "Z": exited, not yet reaped; what /readyz says; what its pipeline
    // read, applied and waits for), then the logs: a long output may be
    // cut in the middle, and the states of all meters stay at its top.
    let states: Vec<String> = logs
        .iter()
        .map(|m| {
            let pid = m.child.id();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| rest.chars().next().unwrap_or('?')))
                .map_or("gone".to_owned(), |c| c.to_string());
            let ready =
                http_get(&m.http, "/readyz").map_or("not ready or unreachable".to_owned(), |b| b.trim().to_owned());
            let progress: Vec<String> = http_get(&m.http, "/metrics")
                .unwrap_or_default()
                .lines()
                .filter(|l| PROGRESS_METRICS.iter().any(|n| l.starts_with(n)))
                .map(str::to_owned)
                .collect();
            format!("pid {pid} state {state}; /readyz: {ready}\n{}", progress.join("\n"))
        })
        .collect();
    let tails: Vec<String> = logs.iter().map(|m| m.log_tail()).collect();
    panic!(
        "timed out waiting for {what}\n{wrong}\n--- meters ---\n{}\n--- meter logs ---\n{}",
        states.join("\n---\n"),
        tails.join("\n---\n")
    );
}

pub fn assert_same(got: &Outputs, want: &Outputs) {
    let extra: Vec<&String> = got
        .charges
        .iter()
        .filter(|(id, _)| !want.charges.contains_key(*id))
        .map(|(_, c)| c)
        .take(5)
        .collect();
    let missing: Vec<&String> = want
        .charges
        .iter()
        .filter(|(id, _)| !got.charges.contains_key(*id))
        .map(|(_, c)| c)
        .take(5)
        .collect();
    assert_eq!(
        got.charges.len(),
        want.charges.len(),
        "number of charges; first unexpected: {extra:#?}; first missing: {missing:#?}"
    );
    for (id, c) in &want.charges {
        assert_eq!(got.charges.get(id), Some(c), "charge {id}");
    }
    assert_eq!(got.limits, want.limits, "limit events");
    assert_eq!(got.statements, want.statements, "statements");
    assert_eq!(got.rejects, want.rejects, "dead letters");
}

/// A meter over 2 partitions that has metered the first half of a small
/// fleet (`seed`, `jobs` jobs, 40 accounts) and stopped cleanly: the
/// workload, how many events it has, and the outputs of the first half.
pub fn meter_first_half(prefix: &str, spec: &MeterSpec, seed: u64, jobs: usize) -> (Workload, usize, Outputs) {
    let meter = spec.start();
    wait_for_topics(prefix);
    let opts = FleetOptions {
        seed,
        jobs,
        accounts: 40,
        mean_gap_ms: 2_000,
        ..FleetOptions::default()
    };
    let w = workload(&opts, 2);
    produce_accounts(prefix, &w);
    let n = w.events.len();
    let half = expected(&w, n / 2);
    produce_events(prefix, &w, 0..n / 2, 20_000);
    wait_until("the first half's charges", Duration::from_secs(120), &[&meter], || {
        read_all(&format!("{prefix}.charges")).len() >= half.charges.len()
    });
    let mut meter = meter;
    assert_eq!(meter.terminate(), Some(0));
    (w, n, half)
}

/// Charges by id, counted by the input partition of their account.
pub fn charges_by_partition(charges: &BTreeMap<String, String>, partitions: i32) -> BTreeMap<i32, usize> {
    let mut n = BTreeMap::new();
    for c in charges.values() {
        let v: serde_json::Value = serde_json::from_str(c).expect("charge JSON");
        let account = v["account_id"].as_str().unwrap_or_default();
        *n.entry(partition_of(account, partitions)).or_default() += 1;
    }
    n
}

/// Starts `spec` again (after a rebuild) and checks that it ends with
/// exactly the charges and limit events of `all`, and ready.
pub fn restart_and_expect_everything(spec: &MeterSpec, prefix: &str, all: &Outputs) {
    let mut meter = spec.start();
    wait_until(
        "every charge after the rebuild",
        Duration::from_secs(120),
        &[&meter],
        || read_all(&format!("{prefix}.charges")).len() >= all.charges.len(),
    );
    wait_until("ready", Duration::from_secs(60), &[&meter], || {
        http_get(&meter.http, "/readyz").is_some_and(|b| b.starts_with("ready"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let got = read_outputs(prefix);
    assert_eq!(got.charges, all.charges);
    assert_eq!(got.limits, all.limits);
    assert_eq!(meter.terminate(), Some(0));
}

/// Produces `w.events` as a mixed fleet does: each worker (the event's
/// `source`) sends all its events through one client, the client picked
/// by a hash of the worker's name from `placements`. Events go out in the
/// workload's order, each client at full speed.
pub fn produce_by_worker(prefix: &str, w: &Workload, placements: &[Placement]) {
    produce_by_worker_padded(prefix, w, placements, None);
}

/// [`produce_by_worker`], where the records the murmur2 client puts on
/// partition `pad.0` carry an extra top-level field of `pad.1` bytes (a
/// field the meter does not read): that partition's fetches then hold few
/// records while the others' hold thousands — a slow partition.
pub fn produce_by_worker_padded(prefix: &str, w: &Workload, placements: &[Placement], pad: Option<(i32, usize)>) {
    let topic = format!("{prefix}.job-events");
    let padding = pad.map(|(_, n)| format!("{{\"padding\":\"{}\",", "p".repeat(n)));
    // Small batches when padding: one padded record a batch, so that the
    // meter's small fetches hold two or three of them.
    let batch = pad.map(|(_, n)| n + 8 * 1024);
    let clients: Vec<_> = placements.iter().map(|p| producer_batching(*p, batch)).collect();
    for (i, e) in w.events.iter().enumerate() {
        if pad.is_some() && i % 200 == 0 {
            // The clients stay within 200 events of each other, so each
            // partition's log keeps to event order (the big records of the
            // padded client would otherwise fall behind the others').
            for c in &clients {
                c.flush(Duration::from_secs(60)).unwrap();
            }
        }
        let source = serde_json::from_str::<serde_json::Value>(&e.json)
            .ok()
            .and_then(|v| v["source"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let pick = source.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let c = (pick % placements.len() as u64) as usize;
        let key = (placements[c] != Placement::Keyless).then_some(e.key.as_bytes());
        let at = jobmeter_core::parse_job_event(e.json.as_bytes())
            .ok()
            .map(|ev| ev.time.0);
        let padded = match (&padding, pad, key) {
            (Some(fill), Some((p, _)), Some(k))
                if placements[c] == Placement::Murmur2
                    && jobmeter_kafka::partitioner::partition_for_key(k, w.partitions) == p
                    && e.json.starts_with('{') =>
            {
                Some(format!("{fill}{}", &e.json[1..]))
            }
            _ => None,
        };
        let payload = padded.as_deref().unwrap_or(&e.json);
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&topic).payload(payload.as_bytes());
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(ms) = at {
            rec = rec.timestamp(ms);
        }
        jobmeter_kafka::produce::send_waiting(&clients[c], rec, None).expect("produce");
    }
    for c in &clients {
        c.flush(Duration::from_secs(60)).unwrap();
    }
}

/// Per input partition, the latest event time among the records one fetch
/// of it brings at most: those that fit, in offset order, in `bytes` of
/// record values (librdkafka's `max.partition.fetch.bytes`, 1 MiB by
/// default). How far a merge that went on with what it had after one
/// fetch per partition would have run each partition's stream time.
pub fn first_fetch_reach(prefix: &str, partitions: i32, bytes: usize) -> Vec<Option<i64>> {
    let settings = KafkaSettings::new(brokers());
    let parts: Vec<(i32, Option<i64>)> = (0..partitions).map(|p| (p, None)).collect();
    let mut used = vec![0usize; partitions as usize];
    let mut reach: Vec<Option<i64>> = vec![None; partitions as usize];
    read_to_end(
        &settings,
        "it-first-fetch",
        &format!("{prefix}.job-events"),
        &parts,
        Duration::from_secs(120),
        |r| {
            let p = r.partition as usize;
            let value = r.value.as_deref().unwrap_or_default();
            used[p] += value.len();
            if used[p] <= bytes {
                if let Ok(ev) = jobmeter_core::parse_job_event(value) {
                    reach[p] = reach[p].max(Some(ev.time.0));
                }
            }
        },
    )
    .expect("read the input topic");
    reach
}

/// The outputs the contract alone gives for the input topic as it is in
/// Kafka: every record read back with its partition, offset and
/// timestamp, put in the merge order of `jobmeter_core::order` (computed
/// here from the records, not from anything the meter did), and applied
/// to the meter of its account's partition (murmur2 of `data.account_id`;
/// a record that is not an event, to the partition it is on).
pub fn expected_in_merge_order(prefix: &str, w: &Workload) -> Outputs {
    expected_in_merge_order_after(prefix, w, &[])
}

/// [`expected_in_merge_order`] with the records of the adjustments topic
/// `adjustments` applied first, each to its account's partition.
pub fn expected_in_merge_order_after(prefix: &str, w: &Workload, adjustments: &[String]) -> Outputs {
    let (rates, plans, book) = billing(w);
    let config = MeterConfig::default();
    let settings = KafkaSettings::new(brokers());
    let parts: Vec<(i32, Option<i64>)> = (0..w.partitions).map(|p| (p, None)).collect();
    let mut log: Vec<Vec<jobmeter_kafka::reader::Record>> = (0..w.partitions).map(|_| Vec::new()).collect();
    read_to_end(
        &settings,
        "it-merge-order",
        &format!("{prefix}.job-events"),
        &parts,
        Duration::from_secs(120),
        |r| log[r.partition as usize].push(r),
    )
    .expect("read the input topic");
    let times: Vec<Vec<Option<jobmeter_core::Timestamp>>> = log
        .iter()
        .map(|records| {
            records
                .iter()
                .map(|r| {
                    let ev = jobmeter_core::parse_job_event(r.value.as_deref().unwrap_or_default()).ok()?;
                    jobmeter_core::order::merge_time(&config, ev.time, r.timestamp_ms.map(jobmeter_core::Timestamp))
                })
                .collect()
        })
        .collect();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let mut meters: BTreeMap<i32, Meter> = BTreeMap::new();
    let mut out = Vec::new();
    for a in adjustments {
        let Ok(account) = jobmeter_core::adjust::adjustment_account(a.as_bytes()) else {
            continue;
        };
        let owner = partition_of(account.as_str(), w.partitions);
        meters
            .entry(owner)
            .or_default()
            .apply_adjustment(
                &ctx.with_partition(owner, w.partitions, jobmeter_kafka::partitioner::partition_for_key),
                a.as_bytes(),
                None,
                &mut out,
            )
            .expect("apply an adjustment");
    }
    for (p, o) in jobmeter_core::order::merge_order(&times) {
        let r = &log[p as usize][o as usize];
        assert_eq!(r.offset, o, "offsets of a fresh topic are dense");
        let payload = r.value.as_deref().unwrap_or_default();
        let owner =
            jobmeter_core::parse_job_event(payload).map_or(p, |ev| partition_of(ev.account.as_str(), w.partitions));
        let origin = jobmeter_core::Origin {
            topic: format!("{prefix}.job-events").into(),
            partition: p,
            offset: o,
            record_time: r.timestamp_ms.map(jobmeter_core::Timestamp),
        };
        meters
            .entry(owner)
            .or_default()
            .apply(
                &ctx.with_partition(owner, w.partitions, jobmeter_kafka::partitioner::partition_for_key),
                payload,
                Some(&origin),
                &mut out,
            )
            .expect("apply");
    }
    collect(out)
}
