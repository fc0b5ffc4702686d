//! The accounts table, co-partitioned with the events.
//!
//! Account records arrive on the accounts topic with whatever partitioner
//! their producer used. Every instance runs a **forwarder**, a member of
//! the consumer group `<group>.accounts`, which copies each valid record
//! into `<prefix>.accounts-by-partition`, in the partition that meters the
//! account (murmur2 of the account id over the input's partitions, as for
//! events), keyed by instant and account. An instance holds in RocksDB the
//! records of the partitions it owns only: a partition's restore first
//! reads its accounts partition from where the store last stopped, and a
//! tailer keeps the owned partitions current. Lookups go through a bounded
//! cache ([`StoredAccounts`]).
//!
//! The introductory pro fee goes to the first pro subscribers of the whole
//! platform, which no single partition knows. The forwarder therefore also
//! writes, for each record that puts an account on pro at an instant (or
//! replaces one that did), an entry in `<prefix>.pro-subscribers`, one
//! compacted partition that every instance reads whole ([`ProTable`]).
//! Memory holds that table (the pro subscribers, not the free accounts)
//! and the cache.
//!
//! Forwarding is at least once: a record forwarded twice is stored twice
//! under the same key, which changes nothing. At start-up an instance
//! waits until the forwarders have passed the accounts topic's end as it
//! was, so that records written before the meter started govern the usage
//! after them. A record is expected ahead of the usage it governs; one
//! that arrives later does not re-rate charges already emitted. Such
//! records are logged and counted
//! (`jobmeter_account_records_total{outcome="late"}`): a record whose
//! `effective_from` is earlier than the newest event time the meter had
//! seen when the record was forwarded.

use jobmeter_core::fasthash::FastMap;
use jobmeter_core::plans::FirstPro;
use jobmeter_core::{AccountId, AccountRecord, Accounts, LookupError, Plan, Timestamp};
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::partitioner::partition_for_key;
use jobmeter_kafka::reader::Reader;
use jobmeter_store::Store;
use prometheus::{IntCounterVec, Opts, Registry};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Counters of the accounts table.
#[derive(Debug, Clone)]
pub struct AccountsMetrics {
    records: IntCounterVec,
    from_cache: prometheus::IntCounter,
    from_store: prometheus::IntCounter,
}

impl AccountsMetrics {
    /// Registers into `r`.
    pub fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let records = IntCounterVec::new(
            Opts::new(
                "jobmeter_account_records_total",
                "Account records by outcome: forwarded to their account's partition, late (forwarded after usage it would govern), invalid (refused), applied (stored for a partition this instance owns)",
            ),
            &["outcome"],
        )?;
        r.register(Box::new(records.clone()))?;
        for o in ["forwarded", "applied", "late", "invalid"] {
            records.with_label_values(&[o]);
        }
        let lookups = IntCounterVec::new(
            Opts::new(
                "jobmeter_account_lookups_total",
                "Account lookups by the meters and the usage API, by where they were answered (cache, store)",
            ),
            &["from"],
        )?;
        r.register(Box::new(lookups.clone()))?;
        Ok(AccountsMetrics {
            records,
            from_cache: lookups.with_label_values(&["cache"]),
            from_store: lookups.with_label_values(&["store"]),
        })
    }
}

/// The key of a record on the internal topics: its instant and account,
/// so that compaction keeps the last record per instant and account (a
/// record replaces an earlier one with the same `effective_from`).
pub fn internal_key(r: &AccountRecord) -> Vec<u8> {
    format!("{} {}", r.effective_from.0, r.account_id).into_bytes()
}

fn parse_internal_key(k: &[u8]) -> Option<(Timestamp, AccountId)> {
    let s = std::str::from_utf8(k).ok()?;
    let (t, a) = s.split_once(' ')?;
    Some((Timestamp(t.parse().ok()?), AccountId::from(a)))
}

/// Which account records put accounts on pro, for the whole platform:
/// each pro account's instants of pro records, and the first subscribers.
#[derive(Debug)]
pub struct ProTable {
    instants: HashMap<AccountId, Vec<Timestamp>>,
    first: FirstPro,
}

impl ProTable {
    /// Empty; the first `limit` subscribers get the intro fee.
    pub fn new(limit: usize) -> Self {
        ProTable {
            instants: HashMap::new(),
            first: FirstPro::new(limit),
        }
    }

    /// The record of `account` at `t` is (`pro`) or is not a pro record.
    pub fn set(&mut self, account: &AccountId, t: Timestamp, pro: bool) {
        let list = self.instants.entry(account.clone()).or_default();
        let pos = list.partition_point(|x| *x < t);
        let present = list.get(pos) == Some(&t);
        match (pro, present) {
            (true, false) => list.insert(pos, t),
            (false, true) => {
                list.remove(pos);
            }
            _ => return,
        }
        let first = list.first().copied();
        if first.is_none() {
            self.instants.remove(account);
        }
        self.first.set(account, first);
    }

    /// True when the record of `account` at `t` is a pro record.
    pub fn is_pro(&self, account: &AccountId, t: Timestamp) -> bool {
        self.instants.get(account).is_some_and(|l| l.binary_search(&t).is_ok())
    }

    /// How many accounts have a pro record.
    pub fn len(&self) -> usize {
        self.instants.len()
    }

    /// True when none has.
    pub fn is_empty(&self) -> bool {
        self.instants.is_empty()
    }
}

/// A bounded cache of account records: two generations, a lookup that
/// hits the old one moves the entry to the new one; when the new one is
/// full, the old one is dropped. Unknown accounts are cached too (empty).
#[derive(Debug, Default)]
struct Cache {
    // The meter's own hasher: looked up once or twice for every event.
    young: FastMap<AccountId, Arc<[AccountRecord]>>,
    old: FastMap<AccountId, Arc<[AccountRecord]>>,
    half: usize,
    /// Bumped by every invalidation: a value read from the store before a
    /// bump may be stale and is not cached.
    version: u64,
}

impl Cache {
    fn get(&mut self, a: &AccountId) -> Option<Arc<[AccountRecord]>> {
        if let Some(v) = self.young.get(a) {
            return Some(v.clone());
        }
        let v = self.old.remove(a)?;
        self.put(a.clone(), v.clone());
        Some(v)
    }

    fn put(&mut self, a: AccountId, v: Arc<[AccountRecord]>) {
        if self.young.len() >= self.half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(a, v);
    }

    fn invalidate(&mut self, a: &AccountId) {
        self.young.remove(a);
        self.old.remove(a);
        self.version += 1;
    }

    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// The accounts of the partitions this instance owns, in RocksDB behind a
/// bounded cache, and the platform's pro subscribers: what the meters and
/// the usage API consult.
#[derive(Debug)]
pub struct StoredAccounts {
    store: Arc<Store>,
    partitions: Arc<AtomicI32>,
    cache: Mutex<Cache>,
    /// The pro table, kept current by the pro tailer and the forwarder.
    pub pro: RwLock<ProTable>,
    metrics: AccountsMetrics,
    /// Newest event time (ms) any local meter has seen, to detect late records.
    pub newest_event_ms: Arc<AtomicI64>,
}

impl StoredAccounts {
    /// Accounts in `store`, `cache_entries` of them cached; `partitions`
    /// is the input's partition count (set once known).
    pub fn new(
        store: Arc<Store>,
        partitions: Arc<AtomicI32>,
        cache_entries: usize,
        intro_limit: usize,
        metrics: AccountsMetrics,
    ) -> Self {
        StoredAccounts {
            store,
            partitions,
            cache: Mutex::new(Cache {
                half: (cache_entries / 2).max(1),
                ..Cache::default()
            }),
            pro: RwLock::new(ProTable::new(intro_limit)),
            metrics,
            newest_event_ms: Arc::new(AtomicI64::new(i64::MIN)),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many accounts the cache holds.
    pub fn cached(&self) -> usize {
        self.cache().len()
    }

    /// How many accounts have a pro record (the pro table's size).
    pub fn pro_subscribers(&self) -> usize {
        self.pro.read().map_or(0, |t| t.len())
    }

    /// The account's stored records, or why they cannot be read.
    fn read(&self, account: &AccountId) -> Result<Vec<AccountRecord>, LookupError> {
        let p = partition_for_key(account.as_str().as_bytes(), self.partitions.load(Ordering::Relaxed));
        let failed = |reason: String, corrupt: bool| LookupError {
            account: account.clone(),
            reason,
            corrupt,
        };
        let rows = self
            .store
            .account_records(p, account.as_str())
            .map_err(|e| failed(e.to_string(), false))?;
        rows.iter()
            .map(|v| {
                AccountRecord::parse(v)
                    .map_err(|e| failed(format!("a stored record cannot be decoded: {}", e.detail), true))
            })
            .collect()
    }

    /// Stores `rows` (records of partition `p`, read up to `next_offset` of
    /// its accounts partition when given) and drops their accounts from
    /// the cache.
    pub fn apply(
        &self,
        p: i32,
        rows: &[AccountRecord],
        next_offset: Option<i64>,
    ) -> Result<(), jobmeter_store::StoreError> {
        let values: Vec<String> = rows
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .collect();
        let keyed: Vec<jobmeter_store::AccountRow<'_>> = rows
            .iter()
            .zip(&values)
            .map(|(r, v)| (r.account_id.as_str(), r.effective_from.0, v.as_bytes()))
            .collect();
        self.store.put_account_records(p, &keyed, next_offset)?;
        let mut cache = self.cache();
        for r in rows {
            cache.invalidate(&r.account_id);
        }
        self.metrics
            .records
            .with_label_values(&["applied"])
            .inc_by(rows.len() as u64);
        Ok(())
    }
}

impl Accounts for StoredAccounts {
    fn records_of(&self, account: &AccountId) -> Result<Arc<[AccountRecord]>, LookupError> {
        let version = {
            let mut cache = self.cache();
            if let Some(v) = cache.get(account) {
                self.metrics.from_cache.inc();
                return Ok(v);
            }
            cache.version
        };
        self.metrics.from_store.inc();
        let list = self.read(account).inspect_err(|e| {
            tracing::error!(account = %account, error = %e.reason, corrupt = e.corrupt, "account records cannot be read from the store");
        })?;
        let v: Arc<[AccountRecord]> = list.into();
        let mut cache = self.cache();
        if cache.version == version {
            cache.put(account.clone(), v.clone());
        }
        Ok(v)
    }

    fn has_intro_price(&self, account: &AccountId) -> bool {
        self.pro.read().is_ok_and(|t| t.first.has_intro_price(account))
    }

    fn pro_accounts(&self, keep: &dyn Fn(&AccountId) -> bool) -> Vec<AccountId> {
        let mut v: Vec<AccountId> = self
            .pro
            .read()
            .map(|t| t.instants.keys().filter(|a| keep(a)).cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Records of the accounts partitions read at once before they are stored.
const CHUNK: usize = 10_000;

/// Why a partition's account records could not be caught up.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    /// Reading the accounts partition failed.
    #[error(transparent)]
    Kafka(#[from] jobmeter_kafka::KafkaAdapterError),
    /// Storing its records failed.
    #[error(transparent)]
    Store(#[from] jobmeter_store::StoreError),
}

/// Reads partition `p` of the accounts by partition from where the store
/// stopped to its end into the store. Returns the records read.
pub fn catch_up(
    accounts: &StoredAccounts,
    reader: &Reader,
    topic: &str,
    p: i32,
    deadline: Duration,
) -> Result<u64, CatchUpError> {
    let from = accounts.store.accounts_offset(p)?;
    let mut rows = Vec::new();
    let mut failed = None;
    let mut last = None;
    let n = reader.read_to_end(topic, &[(p, from)], deadline, |rec| {
        last = Some(rec.offset + 1);
        if let Some(r) = rec.value.as_deref().and_then(|v| AccountRecord::parse(v).ok()) {
            rows.push(r);
        }
        if rows.len() >= CHUNK && failed.is_none() {
            failed = accounts
                .apply(p, &std::mem::take(&mut rows), Some(rec.offset + 1))
                .err();
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if let Some(next) = last {
        accounts.apply(p, &rows, Some(next))?;
    }
    Ok(n)
}

/// Where the live tail of the accounts topic starts: its end when the
/// instance starts (what is before it reaches the instance through the
/// forwarders and each partition's catch-up).
pub fn source_ends(
    settings: &KafkaSettings,
    client_id: &str,
    source: &str,
    partitions: i32,
) -> Result<Vec<(i32, i64)>, jobmeter_kafka::KafkaAdapterError> {
    let reader = Reader::new(settings, client_id)?;
    (0..partitions)
        .map(|p| {
            reader
                .watermarks(source, p, Duration::from_secs(60))
                .map(|(_, high)| (p, high))
        })
        .collect()
}

/// Keeps the owned partitions' accounts current until `stop` (runs on its
/// own thread). It reads two things with one consumer:
///
/// - the accounts topic itself, live, from `source_from` on: every record
///   is stored at once, whatever its partition (a partition being restored
///   here, or moving here a moment later, must not meter usage before
///   it), and the pro table learns it;
/// - the accounts partitions of the owned partitions, from where their
///   catch-up left off (a partition is tailed once its restore has caught
///   it up and it is in `owned`): records forwarded while the partition
///   was not owned yet.
///
/// Both are idempotent: a record stored twice changes nothing.
pub fn tail_owned(
    accounts: &StoredAccounts,
    settings: &KafkaSettings,
    client_id: &str,
    topics: (&str, &str),
    source_from: Vec<(i32, i64)>,
    owned: &RwLock<BTreeSet<i32>>,
    stop: &CancellationToken,
) {
    let source = topics.0;
    let consumer = match tailer(settings, client_id, "accounts tailer") {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the accounts tailer");
            return;
        }
    };
    let mut source_next: HashMap<i32, i64> = source_from.into_iter().collect();
    let mut assigned: Option<BTreeSet<i32>> = None;
    let mut checked = Instant::now() - Duration::from_secs(1);
    // Rows by partition, and the accounts partition offset they reach.
    let mut pending: HashMap<i32, (Vec<AccountRecord>, Option<i64>)> = HashMap::new();
    let mut held = 0usize;
    while !stop.is_cancelled() {
        if checked.elapsed() >= Duration::from_millis(200) {
            checked = Instant::now();
            let want = owned.read().map(|o| o.clone()).unwrap_or_default();
            if assigned.as_ref() != Some(&want) {
                flush(accounts, &mut pending);
                held = 0;
                if assign_tails(accounts, &consumer, topics, &source_next, &want) {
                    assigned = Some(want);
                }
            }
        }
        // Block for the first record, then take what is queued without
        // waiting: records are stored as soon as they are read.
        let mut wait = Duration::from_millis(100);
        loop {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    wait = Duration::ZERO;
                    let parsed = m.payload().and_then(|v| AccountRecord::parse(v).ok());
                    if m.topic() == source {
                        source_next.insert(m.partition(), m.offset() + 1);
                        let Some(r) = parsed else { continue };
                        if let Ok(mut t) = accounts.pro.write() {
                            if r.plan == Plan::Pro || t.is_pro(&r.account_id, r.effective_from) {
                                t.set(&r.account_id, r.effective_from, r.plan == Plan::Pro);
                            }
                        }
                        let p = partition_for_key(
                            r.account_id.as_str().as_bytes(),
                            accounts.partitions.load(Ordering::Relaxed),
                        );
                        pending.entry(p).or_default().0.push(r);
                        held += 1;
                    } else {
                        let entry = pending.entry(m.partition()).or_default();
                        entry.1 = Some(m.offset() + 1);
                        if let Some(r) = parsed {
                            entry.0.push(r);
                            held += 1;
                        }
                    }
                    if held >= CHUNK {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accounts tailer");
                    std::thread::sleep(Duration::from_millis(500));
                    break;
                }
            }
        }
        flush(accounts, &mut pending);
        held = 0;
    }
    flush(accounts, &mut pending);
}

/// Assigns the tailer the accounts topic (every partition, from
/// `source_next`) and the accounts partitions of the `owned` partitions
/// (each from where its stored records reach). False when the assignment
/// failed (it is tried again).
fn assign_tails(
    accounts: &StoredAccounts,
    consumer: &BaseConsumer<jobmeter_kafka::reader::ReaderContext>,
    (source, by_partition): (&str, &str),
    source_next: &HashMap<i32, i64>,
    owned: &BTreeSet<i32>,
) -> bool {
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in source_next {
        let _ = tpl.add_partition_offset(source, p, Offset::Offset(o));
    }
    for &p in owned {
        match accounts.store.accounts_offset(p) {
            Ok(o) => {
                let _ = tpl.add_partition_offset(by_partition, p, o.map_or(Offset::Beginning, Offset::Offset));
            }
            Err(e) => tracing::error!(error = %e, partition = p, "accounts tailer cannot read its offset"),
        }
    }
    match consumer.assign(&tpl) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "accounts tailer assignment");
            false
        }
    }
}

/// A consumer that reads assigned partitions without end-of-partition
/// events (it tails them).
fn tailer(
    settings: &KafkaSettings,
    client_id: &str,
    what: &'static str,
) -> Result<BaseConsumer<jobmeter_kafka::reader::ReaderContext>, jobmeter_kafka::KafkaAdapterError> {
    settings
        .reader(client_id)
        .set("enable.partition.eof", "false")
        .create_with_context(jobmeter_kafka::reader::ReaderContext)
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Client { what, source })
}

fn flush(accounts: &StoredAccounts, pending: &mut HashMap<i32, (Vec<AccountRecord>, Option<i64>)>) {
    for (p, (rows, next)) in pending.drain() {
        if let Err(e) = accounts.apply(p, &rows, next) {
            // Not stored, and the offset did not move: the next catch-up
            // of the partition reads these records again.
            tracing::error!(error = %e, partition = p, "account records not stored");
        }
    }
}

/// Reads the pro subscribers topic to its end into the pro table, then
/// (with `stop`) keeps tailing it. Returns after the first read when
/// `stop` is `None`, with the next offset.
pub fn read_pro(
    accounts: &StoredAccounts,
    settings: &KafkaSettings,
    client_id: &str,
    topic: &str,
    from: Option<i64>,
    stop: Option<&CancellationToken>,
) -> Result<i64, jobmeter_kafka::KafkaAdapterError> {
    let apply = |key: Option<&[u8]>, value: Option<&[u8]>| {
        if let Some((t, a)) = key.and_then(parse_internal_key) {
            if let Ok(mut table) = accounts.pro.write() {
                table.set(&a, t, value.is_some());
            }
        }
    };
    let Some(stop) = stop else {
        let mut next = from.unwrap_or(0);
        Reader::new(settings, client_id)?.read_to_end(topic, &[(0, from)], Duration::from_secs(300), |rec| {
            next = rec.offset + 1;
            apply(rec.key.as_deref(), rec.value.as_deref());
        })?;
        return Ok(next);
    };
    let consumer = tailer(settings, client_id, "pro subscribers tailer")?;
    let mut tpl = TopicPartitionList::new();
    let assign = |source| jobmeter_kafka::KafkaAdapterError::Op {
        op: "assign the pro subscribers",
        source,
    };
    tpl.add_partition_offset(topic, 0, from.map_or(Offset::Beginning, Offset::Offset))
        .map_err(assign)?;
    consumer.assign(&tpl).map_err(assign)?;
    let mut next = from.unwrap_or(0);
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                apply(m.key(), m.payload());
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pro subscribers tailer");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Ok(next)
}

/// What the forwarder needs.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// Kafka settings.
    pub settings: KafkaSettings,
    /// The forwarders' consumer group.
    pub group: String,
    /// This instance's client id.
    pub client_id: String,
    /// The accounts topic (input).
    pub source: String,
    /// The accounts by partition.
    pub by_partition: String,
    /// The pro subscribers.
    pub pro: String,
}

/// The consumer group of the forwarders of the meter's group `group`.
pub fn forwarder_group(group: &str) -> String {
    format!("{group}.accounts")
}

/// How often the forwarder commits what it forwarded.
const FORWARD_COMMIT_EVERY: Duration = Duration::from_millis(200);

/// Forwards account records until `stop` (runs on its own thread): see
/// the module docs. Records are produced, flushed, then their offsets
/// committed; a crash in between forwards them again.
pub fn forward(accounts: &StoredAccounts, f: &Forwarding, forwarded: &AtomicU64, stop: &CancellationToken) {
    let consumer: BaseConsumer<jobmeter_kafka::reader::ReaderContext> = match f
        .settings
        .group_consumer(&f.group, &f.client_id)
        .create_with_context(jobmeter_kafka::reader::ReaderContext)
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the accounts forwarder");
            return;
        }
    };
    let producer: ThreadedProducer<DefaultProducerContext> = match f.settings.producer().create() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the accounts forwarder's producer");
            return;
        }
    };
    if let Err(e) = consumer.subscribe(&[&f.source]) {
        tracing::error!(error = %e, "accounts forwarder cannot subscribe");
        return;
    }
    // What this forwarder last wrote for an instant and account on the pro
    // topic: newer than what the pro table may have read back yet.
    let mut sent: HashMap<(AccountId, Timestamp), bool> = HashMap::new();
    let mut dirty = false;
    let mut last_commit = Instant::now();
    let mut committed: Vec<(i32, i64)> = Vec::new();
    while !stop.is_cancelled() {
        let polled = consumer.poll(Duration::from_millis(50));
        let idle = polled.is_none();
        match polled {
            Some(Ok(m)) => {
                if let Some(bytes) = m.payload() {
                    dirty |= forward_one(accounts, f, &producer, &mut sent, bytes, forwarded);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accounts forwarder");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        if (dirty || idle) && last_commit.elapsed() >= FORWARD_COMMIT_EVERY {
            last_commit = Instant::now();
            if dirty {
                if let Err(e) = producer.flush(Duration::from_secs(30)) {
                    tracing::warn!(error = %e, "accounts forwarder flush; records are forwarded again");
                    continue;
                }
            }
            // The position: past every record handed to the producer (and
            // past transaction markers at the end of a partition).
            let Ok(pos) = consumer.position() else { continue };
            let mut tpl = TopicPartitionList::new();
            let mut now = Vec::new();
            for e in pos.elements() {
                if let Some(o) = e.offset().to_raw().filter(|o| *o >= 0) {
                    let _ = tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
                    now.push((e.partition(), o));
                }
            }
            if !now.is_empty() && now != committed {
                if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                    tracing::debug!(error = %e, "accounts forwarder commit");
                    continue;
                }
                committed = now;
            }
            dirty = false;
        }
    }
    let _ = producer.flush(Duration::from_secs(10));
}

/// Forwards one record; returns true when something was produced.
fn forward_one(
    accounts: &StoredAccounts,
    f: &Forwarding,
    producer: &ThreadedProducer<DefaultProducerContext>,
    sent: &mut HashMap<(AccountId, Timestamp), bool>,
    bytes: &[u8],
    forwarded: &AtomicU64,
) -> bool {
    let r = match AccountRecord::parse(bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(reason = %e.reason, detail = %e.detail, "invalid account record ignored");
            accounts.metrics.records.with_label_values(&["invalid"]).inc();
            return false;
        }
    };
    if r.effective_from.0 < accounts.newest_event_ms.load(Ordering::Relaxed) {
        tracing::warn!(account = %r.account_id, effective_from = %r.effective_from, "account record arrived after usage it would govern; charges already emitted are not re-rated");
        accounts.metrics.records.with_label_values(&["late"]).inc();
    }
    let partitions = accounts.partitions.load(Ordering::Relaxed);
    let key = internal_key(&r);
    let owner = partition_for_key(r.account_id.as_str().as_bytes(), partitions);
    send(
        producer,
        BaseRecord::to(&f.by_partition)
            .key(&key[..])
            .payload(bytes)
            .partition(owner),
    );
    let pro = r.plan == Plan::Pro;
    let slot = (r.account_id.clone(), r.effective_from);
    let was_pro = sent.get(&slot).copied().unwrap_or_else(|| {
        accounts
            .pro
            .read()
            .is_ok_and(|t| t.is_pro(&r.account_id, r.effective_from))
    });
    if pro || was_pro {
        let rec = BaseRecord::<[u8], [u8]>::to(&f.pro).key(&key[..]).partition(0);
        send(producer, if pro { rec.payload(b"pro") } else { rec });
        sent.insert(slot, pro);
        if let Ok(mut t) = accounts.pro.write() {
            t.set(&r.account_id, r.effective_from, pro);
        }
    }
    accounts.metrics.records.with_label_values(&["forwarded"]).inc();
    forwarded.fetch_add(1, Ordering::Relaxed);
    true
}

/// Produces `rec`, waiting while the producer's queue is full.
fn send(producer: &ThreadedProducer<DefaultProducerContext>, mut rec: BaseRecord<'_, [u8], [u8]>) {
    loop {
        match producer.send(rec) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => {
                // Not committed past: forwarded again after the next
                // failed flush or restart.
                tracing::error!(error = %e, "accounts forwarder cannot produce");
                return;
            }
        }
    }
}

/// Waits until the forwarders' group has committed, on every partition of
/// the accounts topic, at least the end the partition has now (so the
/// records there are in the accounts by partition), or `deadline`
/// passes. Returns false on timeout.
pub fn wait_forwarded(
    settings: &KafkaSettings,
    group: &str,
    client_id: &str,
    source: &str,
    partitions: i32,
    deadline: Duration,
) -> Result<bool, jobmeter_kafka::KafkaAdapterError> {
    let consumer: BaseConsumer<jobmeter_kafka::reader::ReaderContext> = settings
        .group_consumer(group, client_id)
        .create_with_context(jobmeter_kafka::reader::ReaderContext)
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Client {
            what: "forwarding monitor",
            source,
        })?;
    let mut ends = HashMap::new();
    for p in 0..partitions {
        let (low, high) = jobmeter_kafka::reader::watermarks(&consumer, source, p, deadline)?;
        if high > low {
            ends.insert(p, high);
        }
    }
    let started = Instant::now();
    let mut logged = Instant::now();
    while !ends.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition(source, *p);
        }
        if let Ok(c) = consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            for e in c.elements() {
                let done = e.offset().to_raw().unwrap_or(-1);
                if ends.get(&e.partition()).is_some_and(|end| done >= *end) {
                    ends.remove(&e.partition());
                }
            }
        }
        if ends.is_empty() {
            break;
        }
        if started.elapsed() > deadline {
            return Ok(false);
        }
        if logged.elapsed() > Duration::from_secs(10) {
            logged = Instant::now();
            tracing::info!(
                partitions_left = ends.len(),
                "waiting for the account records to be forwarded to their partitions"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(account: &str, plan: &str, from: &str) -> AccountRecord {
        let json = format!(r#"{{"account_id":{account:?},"plan":"{plan}","effective_from":"{from}"}}"#);
        AccountRecord::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// A record's `billing_cycle` goes through the store and back as it
    /// came, beside one without it (stored exactly as before).
    #[test]
    fn a_billing_cycle_survives_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = prometheus::Registry::new();
        let table = StoredAccounts::new(
            store.clone(),
            Arc::new(AtomicI32::new(1)),
            16,
            0,
            AccountsMetrics::new(&registry).unwrap(),
        );
        let long = format!("é {}", "ü".repeat(126)); // 255 bytes: near the 256 accepted
        let mut semi = record(&long, "enterprise", "9999-12-31T23:59:59.999Z");
        semi.billing_cycle = Some(jobmeter_core::plans::Cadence::SemiMonthly);
        let plain = record(&long, "payg", "0001-01-01T00:00:00Z");
        table.apply(0, &[semi.clone(), plain.clone()], Some(7)).unwrap();
        drop(table);
        let table = StoredAccounts::new(
            store.clone(),
            Arc::new(AtomicI32::new(1)),
            16,
            0,
            AccountsMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        let got = table.records_of(&long.as_str().into()).unwrap();
        assert_eq!(&got[..], &[plain, semi][..]);
        let raw = store.account_records(0, &long).unwrap();
        assert!(!String::from_utf8_lossy(&raw[0]).contains("billing_cycle"));
        assert!(String::from_utf8_lossy(&raw[1]).contains(r#""billing_cycle":"semi_monthly""#));
    }

    /// A stored account record that cannot be decoded fails the lookup
    /// (marked corrupt) and so the event that needed it; it is never read
    /// as "no records", which would bill the account as pay-as-you-go.
    #[test]
    fn an_undecodable_stored_record_fails_the_lookup_and_the_event() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = prometheus::Registry::new();
        let parts = Arc::new(AtomicI32::new(1));
        let table = StoredAccounts::new(store.clone(), parts, 16, 0, AccountsMetrics::new(&registry).unwrap());
        table
            .apply(0, &[record("good", "pro", "2024-01-01T00:00:00Z")], None)
            .unwrap();
        store
            .put_account_records(0, &[("bad", 1_704_067_200_000, b"{not json".as_slice())], None)
            .unwrap();
        assert_eq!(table.records_of(&"good".into()).unwrap().len(), 1);
        let err = table.records_of(&"bad".into()).unwrap_err();
        assert!(err.corrupt && err.account.as_str() == "bad", "{err:?}");
        // Asked again, the lookup fails again (nothing was cached).
        assert!(table.records_of(&"bad".into()).is_err());

        let rates = jobmeter_core::RateCard::from_toml(
            r#"
[[versions]]
version = "v1"
effective_from = "2024-01-01T00:00:00Z"
fine_tune_per_second = "0.001"
models."llm" = { per_second = "0.002" }
"#,
        )
        .unwrap();
        let plans = jobmeter_core::PlanCatalog::default();
        let config = jobmeter_core::MeterConfig::default();
        let ctx = jobmeter_core::Context::new(&rates, &plans, &table, &config);
        let mut meter = jobmeter_core::Meter::new();
        let mut out = Vec::new();
        let event = |id: &str, ty: &str, t: &str, data: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"w","type":"{ty}","time":"{t}","subject":"j","data":{{"account_id":"bad"{data}}}}}"#
            )
        };
        let start = event(
            "1",
            "job.started",
            "2024-05-01T00:00:00Z",
            r#","kind":"inference","model":"llm""#,
        );
        // A start already needs the account's terms (for its limits).
        let err = meter.apply(&ctx, start.as_bytes(), None, &mut out).unwrap_err();
        assert!(
            matches!(&err, jobmeter_core::ApplyError::Lookup(e) if e.corrupt),
            "{err:?}"
        );
        assert!(
            !out.iter().any(|o| matches!(o, jobmeter_core::Output::Charge(_))),
            "{out:?}"
        );
    }

    #[test]
    fn internal_keys_hold_any_instant_and_any_account_id() {
        let long = format!("é a {}", "ü".repeat(120));
        for (account, from) in [
            ("acct-1", "2024-01-01T00:00:00Z"),
            ("with space", "0001-01-01T00:00:00Z"),
            (long.as_str(), "9999-12-31T23:59:59.999Z"),
            ("inner  spaces", "1970-01-01T00:00:00Z"),
        ] {
            let r = record(account, "pro", from);
            let k = internal_key(&r);
            assert_eq!(
                parse_internal_key(&k),
                Some((r.effective_from, r.account_id.clone())),
                "{account} at {from}"
            );
        }
        assert_eq!(parse_internal_key(b"not-a-number acct"), None);
        assert_eq!(parse_internal_key(b"12"), None);
    }

    #[test]
    fn the_pro_table_follows_replacements_at_the_same_instant() {
        let mut t = ProTable::new(1);
        let (a, b) = (AccountId::from("a"), AccountId::from("b"));
        let (t1, t2) = (Timestamp(1), Timestamp(2));
        t.set(&b, t2, true);
        assert!(t.first.has_intro_price(&b));
        t.set(&a, t1, true);
        assert!(t.first.has_intro_price(&a) && !t.first.has_intro_price(&b));
        // A free record replaces a's pro record at the same instant: a is
        // no longer a subscriber and b moves up.
        t.set(&a, t1, false);
        assert!(!t.is_pro(&a, t1) && t.first.has_intro_price(&b));
        assert_eq!(t.len(), 1);
        t.set(&b, t2, false);
        assert!(t.is_empty());
    }
}
