//! `jobmeter rebuild`: the event-sourced claim, checked.
//!
//! With the meter stopped, for every input partition: read the job events
//! from the beginning up to the group's committed position and run them
//! through a fresh meter (the accounts table is read first, as `run` does),
//! together with the events other partitions forwarded to it and the
//! pricing adjustments of its accounts, in the order the live meter applied
//! them (the repartition topic's markers);
//! read the compacted changelog to its end; compare the two states record by
//! record; then discard the local RocksDB state of the partition and write
//! the rebuilt one (so the next `run` starts from state rebuilt from inputs).
//! The outputs the rebuild computes are compared with the charges, limit
//! events and statements topics by id, and can be written to files.
//!
//! Exit status 0 when everything matches; 1, after the report, when
//! anything differs; 2 when the rebuild cannot run (an error).

use jobmeter_core::state::Table;
use jobmeter_core::values;
use jobmeter_core::{AccountBook, Context, Meter, Origin, Output};
use jobmeter_kafka::reader::{read_range, read_to_end};
use jobmeter_kafka::repartition::{source_of, Copies, Marker, Replayer, Source, MARKER, PROGRESS};
use jobmeter_kafka::topics::{partition_count, Topics};
use jobmeter_offline::sinks::{Format, OutputFiles};
use jobmeter_service::config::Config;
use jobmeter_service::engine::route;
use jobmeter_service::engine::StateMap;
use jobmeter_service::RunCmd;
use jobmeter_store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// `jobmeter rebuild`.
#[derive(Debug, clap::Args)]
pub struct RebuildCmd {
    /// The same settings as `jobmeter run`.
    #[command(flatten)]
    pub run: RunCmd,
    /// Also write the rebuilt outputs to this directory (JSON lines).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Compare only; leave the local state as it is.
    #[arg(long)]
    pub dry_run: bool,
}

/// What a rebuild reads everything with.
struct Rebuild<'a> {
    cfg: &'a Config,
    settings: jobmeter_kafka::client::KafkaSettings,
    topics: Topics,
    /// The input topic's partition count.
    parts: i32,
    /// Where the group stands: the rebuild covers exactly what was committed.
    committed: TopicPartitionList,
    meter_cfg: jobmeter_core::MeterConfig,
}

/// One partition rebuilt: its outputs and state, and how it compares.
struct Rebuilt {
    outputs: Vec<Output>,
    changes: Vec<jobmeter_core::state::StateChange>,
    /// The changelog offset the local store reflects once `changes` are in.
    last_offset: Option<i64>,
    /// State records and misplaced events that differ.
    differ: usize,
}

/// Runs the rebuild; returns whether everything matched (a difference is
/// reported, not an error).
pub fn main(cmd: RebuildCmd) -> anyhow::Result<bool> {
    jobmeter_service::init_tracing();
    let cfg: Config = cmd.run.load_config()?;
    let rates = jobmeter_offline::replay::load_rate_card(&cfg.billing.rate_card)?;
    let plans = jobmeter_offline::replay::load_plans(cfg.billing.plans.as_deref())?;
    let r = Rebuild::new(&cfg)?;
    // The whole accounts table, in memory: the rebuild meters every
    // partition, with the meter stopped.
    let book = r.accounts(&plans)?;
    let ctx = Context::new(&rates, &plans, &book, &r.meter_cfg);
    let store = if cmd.dry_run {
        None
    } else {
        Some(Store::open(&cfg.state.dir)?)
    };
    let mut sinks = match &cmd.out {
        Some(d) => Some(OutputFiles::create(d, Format::Jsonl)?),
        None => None,
    };
    let mut outputs: Vec<Output> = Vec::new();
    let mut mismatched_state = 0usize;
    for p in 0..r.parts {
        let rebuilt = r.partition(&ctx, p)?;
        mismatched_state += rebuilt.differ;
        if let Some(store) = &store {
            store.drop_partition(p)?;
            // Derived from the accounts topic: read again at the next
            // restore (one stored here may be what could not be decoded).
            store.drop_account_records(p)?;
            store.commit(p, &rebuilt.changes, rebuilt.last_offset)?;
        }
        if let Some(s) = sinks.as_mut() {
            s.write_all(&rebuilt.outputs)?;
        }
        outputs.extend(rebuilt.outputs);
    }
    if let Some(s) = sinks {
        s.finish()?;
    }
    let bad = r.compare_published(&outputs)? + mismatched_state;
    let replaced = if cmd.dry_run {
        ""
    } else {
        "; local state replaced with the rebuilt state"
    };
    if bad > 0 {
        println!(
            "rebuild differs: the rebuild from the input topics differs from what the meter published or stored ({bad} differences){replaced}"
        );
        return Ok(false);
    }
    println!(
        "rebuild matches: state and outputs rebuilt from the input topics equal the changelog and the published topics{replaced}"
    );
    Ok(true)
}

impl<'a> Rebuild<'a> {
    fn new(cfg: &'a Config) -> anyhow::Result<Rebuild<'a>> {
        let settings = cfg.kafka_settings();
        let topics = Topics::with_prefix(&cfg.topics.prefix);
        let parts = partition_count(&settings, &topics.job_events)?;
        if parts == 0 {
            anyhow::bail!("topic {} does not exist", topics.job_events);
        }
        let group: BaseConsumer = settings
            .group_consumer(&cfg.kafka.group_id, &format!("{}-rebuild", cfg.instance_id))
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..parts {
            tpl.add_partition(&topics.job_events, p);
            tpl.add_partition(&topics.repartition, p);
        }
        let committed = group.committed_offsets(tpl, Duration::from_secs(10))?;
        Ok(Rebuild {
            cfg,
            settings,
            topics,
            parts,
            committed,
            meter_cfg: cfg.meter_config(),
        })
    }

    /// A client id for one of the rebuild's readers.
    fn client(&self, what: &str) -> String {
        format!("{}-rebuild-{what}", self.cfg.instance_id)
    }

    /// The whole accounts topic as a table.
    fn accounts(&self, plans: &jobmeter_core::PlanCatalog) -> anyhow::Result<AccountBook> {
        let mut book = AccountBook::new(plans);
        let acc_parts = partition_count(&self.settings, &self.topics.accounts)?;
        let all: Vec<(i32, Option<i64>)> = (0..acc_parts).map(|p| (p, None)).collect();
        read_to_end(
            &self.settings,
            &self.client("accounts"),
            &self.topics.accounts,
            &all,
            Duration::from_secs(300),
            |rec| {
                if let Some(r) = rec
                    .value
                    .as_deref()
                    .and_then(|v| jobmeter_core::AccountRecord::parse(v).ok())
                {
                    book.insert(r);
                }
            },
        )?;
        Ok(book)
    }

    /// The group's committed position in partition `p` of `topic` (0 when
    /// none is committed).
    fn position(&self, topic: &str, p: i32) -> i64 {
        self.committed
            .find_partition(topic, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0)
            .unwrap_or(0)
    }

    /// Where an input record was read, for dead letters and time checks.
    fn input_origin(&self, partition: i32, r: &jobmeter_kafka::reader::Record) -> Origin {
        Origin {
            topic: self.topics.job_events.as_str().into(),
            partition,
            offset: r.offset,
            record_time: r.timestamp_ms.map(jobmeter_core::Timestamp),
        }
    }

    /// Partition `p` rebuilt from its inputs and compared with its changelog.
    fn partition(&self, ctx: &Context<'_>, p: i32) -> anyhow::Result<Rebuilt> {
        let (until, rp_until) = (
            self.position(&self.topics.job_events, p),
            self.position(&self.topics.repartition, p),
        );
        let (markers, mut foreign, copies) = self.forwarded(p, rp_until)?;
        let forwarded = foreign.len();
        let local = self.local_inputs(p, &markers, &mut foreign)?;
        let mut meter = Meter::tracking_changes().with_state_format(self.cfg.state.format);
        let replayed = self.replay(ctx, p, until, markers, foreign, &mut meter)?;
        let (from_changelog, last_offset) = self.changelog(p)?;
        // How the live meter orders its inputs is a mode, not a result of
        // them: the rebuilt state keeps the stored one.
        if from_changelog.contains_key(&(Table::Meta, jobmeter_core::state::keys::EVENT_ORDER.to_vec())) {
            meter.set_merge_order();
        }
        // So is what it knew of the inputs other instances forwarded.
        if let Some(v) = from_changelog.get(&(Table::Meta, jobmeter_core::state::keys::MERGE_SOURCES.to_vec())) {
            meter.set_merge_sources(v.clone());
        }
        // And the cadence schedule it recorded billing by.
        if let Some(v) = from_changelog.get(&(Table::Meta, jobmeter_core::state::keys::BILLING_CYCLE.to_vec())) {
            meter.set_billed_schedule_raw(v.clone());
        }
        // Every record the replay wrote (closed statements included), with
        // deletions as `None`.
        let changes = meter.take_changes()?;
        let rebuilt: StateMap = changes
            .iter()
            .cloned()
            .filter_map(|c| c.value.map(|v| ((c.table, c.key), v)))
            .collect();
        let differ = state_differences(&rebuilt, &from_changelog);
        println!(
            "partition {p}: {} own input events up to offset {until}, {local} from other partitions of its instance, {forwarded} forwarded up to offset {rp_until} ({copies} forwarded twice, applied once); rebuilt {} state records, changelog holds {}; {differ} differ",
            replayed.own,
            rebuilt.len(),
            from_changelog.len(),
        );
        Ok(Rebuilt {
            outputs: replayed.outputs,
            changes,
            last_offset,
            differ: differ + replayed.misplaced,
        })
    }

    /// The markers saying in which order the live meter applied partition
    /// `p`'s records, and the events other instances forwarded to it, up to
    /// the committed position `rp_until` of its repartition partition, but
    /// the copies among them (forwarded again; left out and counted).
    fn forwarded(&self, p: i32, rp_until: i64) -> anyhow::Result<(Vec<Marker>, Foreign, usize)> {
        let mut markers = Vec::new();
        let mut foreign: Foreign = BTreeMap::new();
        let mut copies = Copies::default();
        let mut skipped = 0usize;
        read_range(
            &self.settings,
            &self.client(&format!("rp-{p}")),
            &self.topics.repartition,
            &[(p, None, Some(rp_until))],
            Duration::from_secs(3600),
            |r| {
                if r.headers.iter().any(|(k, _)| k == PROGRESS) {
                    // Another instance's word on its inputs: not an event.
                    return;
                }
                if r.headers.iter().any(|(k, _)| k == MARKER) {
                    if let Some(m) = Marker::decode(r.value.as_deref().unwrap_or_default()) {
                        markers.push(m);
                    }
                    return;
                }
                let (topic, partition, offset) = source_of(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
                    .unwrap_or_else(|| (self.topics.repartition.clone(), p, r.offset));
                if topic == self.topics.job_events && !copies.first(partition, offset) {
                    // Forwarded again by a restarted forwarder: the live
                    // meter skipped it as it read it, and a marker's run
                    // may span it while its original was still waiting.
                    skipped += 1;
                    return;
                }
                let origin = Origin {
                    topic: topic.into(),
                    partition,
                    offset,
                    record_time: r.timestamp_ms.map(jobmeter_core::Timestamp),
                };
                foreign.insert((Source::Forwarded, r.offset), (origin, r));
            },
        )?;
        Ok((markers, foreign, skipped))
    }

    /// Events of partition `p`'s accounts that arrived on another partition
    /// of the same instance and were applied here directly (the runs the
    /// markers name), added to `foreign`; how many.
    fn local_inputs(&self, p: i32, markers: &[Marker], foreign: &mut Foreign) -> anyhow::Result<usize> {
        let mut local = 0usize;
        for (q, runs) in Replayer::<()>::input_runs(markers) {
            let (from, to) = (runs[0].0, runs.iter().map(|r| r.1).max().unwrap_or(runs[0].1));
            read_range(
                &self.settings,
                &self.client(&format!("{p}-from-{q}")),
                &self.topics.job_events,
                &[(q, Some(from), Some(to))],
                Duration::from_secs(3600),
                |r| {
                    if Replayer::<()>::in_runs(&runs, r.offset)
                        && route(r.value.as_deref().unwrap_or_default(), q, self.parts).0 == p
                    {
                        local += 1;
                        let origin = self.input_origin(q, &r);
                        foreign.insert((Source::Input(q), r.offset), (origin, r));
                    }
                },
            )?;
        }
        Ok(local)
    }

    /// Replays partition `p`'s own inputs up to `until`, with the foreign
    /// ones, in the order the markers say the live meter applied them.
    fn replay(
        &self,
        ctx: &Context<'_>,
        p: i32,
        until: i64,
        markers: Vec<Marker>,
        foreign: Foreign,
        meter: &mut Meter,
    ) -> anyhow::Result<Replayed> {
        let mut replayer = Replayer::new(markers, foreign);
        let mut out = Vec::new();
        // The first event the meter could not apply (the rebuild stops).
        let mut failed: Option<jobmeter_core::ApplyError> = None;
        let pctx = ctx.with_partition(p, self.parts, jobmeter_kafka::partitioner::partition_for_key);
        let mut own = 0u64;
        let mut applied = Applied::new(p, self.topics.job_events.as_str());
        let adjustments = self.topics.adjustments.as_str();
        let mut apply = |meter: &mut Meter, (origin, r): (Origin, jobmeter_kafka::reader::Record)| {
            if failed.is_none() && applied.first(&origin) {
                let raw = r.value.as_deref().unwrap_or_default();
                let done = if &*origin.topic == adjustments {
                    meter.apply_adjustment(&pctx, raw, Some(&origin), &mut out)
                } else {
                    meter.apply(&pctx, raw, Some(&origin), &mut out)
                };
                if let Err(e) = done {
                    failed = Some(e);
                }
            }
        };
        read_range(
            &self.settings,
            &self.client(&p.to_string()),
            &self.topics.job_events,
            &[(p, None, Some(until))],
            Duration::from_secs(3600),
            |r| {
                let (owner, ev) = route(r.value.as_deref().unwrap_or_default(), p, self.parts);
                let here = owner == p;
                // The input watermark covers every record of the partition,
                // wherever it was applied.
                if let Some(t) = ev.and_then(|ev| {
                    jobmeter_core::order::merge_time(
                        &self.meter_cfg,
                        ev.time,
                        r.timestamp_ms.map(jobmeter_core::Timestamp),
                    )
                }) {
                    meter.raise_input_watermark(t);
                }
                own += u64::from(here);
                let origin = self.input_origin(p, &r);
                replayer.own(r.offset, (origin, r), here, |x| apply(meter, x));
            },
        )?;
        let misplaced = replayer.misplaced;
        let left = replayer.finish(|x| apply(meter, x));
        if let Some(e) = failed {
            anyhow::bail!("partition {p}: {e}");
        }
        // A record no marker placed is a defect, unless it is a copy of one
        // applied already (passed over live as well).
        let unplaced = left.iter().filter(|(origin, _)| applied.would_apply(origin)).count();
        if misplaced + unplaced > 0 {
            println!(
                "partition {p}: {misplaced} own and {unplaced} other events below the committed positions are not where the markers place them"
            );
        }
        Ok(Replayed {
            outputs: out,
            own,
            misplaced: misplaced + unplaced,
        })
    }

    /// Partition `p`'s changelog as a state map, and its last offset.
    fn changelog(&self, p: i32) -> anyhow::Result<(StateMap, Option<i64>)> {
        let mut from_changelog: StateMap = BTreeMap::new();
        let mut last_offset = None;
        read_to_end(
            &self.settings,
            &self.client(&format!("cl-{p}")),
            &self.topics.changelog,
            &[(p, None)],
            Duration::from_secs(3600),
            |r| {
                last_offset = Some(r.offset);
                let _ = jobmeter_service::engine::overlay(&mut from_changelog, r);
            },
        )?;
        Ok((from_changelog, last_offset))
    }

    /// Every output topic against the rebuilt outputs, by id; how many differ.
    fn compare_published(&self, outputs: &[Output]) -> anyhow::Result<usize> {
        let mut want: [BTreeMap<String, String>; 4] = Default::default();
        for o in outputs {
            let (i, id, json) = match o {
                Output::Charge(c) => (0, c.charge_id.clone(), serde_json::to_string(c)?),
                Output::Limit(l) => (1, l.event_id.clone(), serde_json::to_string(l)?),
                Output::Statement(s) => (2, format!("{}/{}", s.account_id, s.period), serde_json::to_string(s)?),
                Output::Command(c) => (3, c.command_id.clone(), serde_json::to_string(c)?),
                Output::Reject(_) => continue,
            };
            want[i].insert(id, json);
        }
        let t = &self.topics;
        let mut bad = 0;
        for (i, (name, topic, field)) in [
            ("charges", &t.charges, "charge_id"),
            ("limit events", &t.limits, "event_id"),
            ("statements", &t.statements, "statement"),
            ("commands", &t.commands, "command_id"),
        ]
        .into_iter()
        .enumerate()
        {
            bad += report_difference(name, &want[i], &self.published(topic, field)?);
        }
        Ok(bad)
    }

    /// A published topic's records by id (`field` of each; `statement`: the
    /// account and period).
    fn published(&self, topic: &str, field: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let n = partition_count(&self.settings, topic)?;
        let parts: Vec<(i32, Option<i64>)> = (0..n).map(|p| (p, None)).collect();
        let mut m = BTreeMap::new();
        read_to_end(
            &self.settings,
            &self.client("out"),
            topic,
            &parts,
            Duration::from_secs(3600),
            |r| {
                let text = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
                let id = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .map(|v| match field {
                        "statement" => format!(
                            "{}/{}",
                            v["account_id"].as_str().unwrap_or(""),
                            v["period"].as_str().unwrap_or("")
                        ),
                        f => v[f].as_str().unwrap_or("").to_owned(),
                    })
                    .unwrap_or_default();
                m.insert(id, text);
            },
        )?;
        Ok(m)
    }
}

/// Records forwarded to a partition or applied to it from another, by
/// where they came from and their offset there.
type Foreign = BTreeMap<(Source, i64), (Origin, jobmeter_kafka::reader::Record)>;

/// What a partition's replay produced.
struct Replayed {
    outputs: Vec<Output>,
    /// Own input events (those of the partition's accounts).
    own: u64,
    /// Events not where the markers place them.
    misplaced: usize,
}

/// As live: another partition's records reach a meter in offset order, so
/// one at or below the last applied from its partition is a copy
/// (forwarded again after its forwarder restarted behind what it had read
/// ahead) and is not applied.
struct Applied<'t> {
    p: i32,
    input_topic: &'t str,
    from: BTreeMap<i32, i64>,
}

impl<'t> Applied<'t> {
    fn new(p: i32, input_topic: &'t str) -> Applied<'t> {
        Applied {
            p,
            input_topic,
            from: BTreeMap::new(),
        }
    }

    /// True when the record from `origin` is to be applied (and now counts
    /// as applied).
    fn first(&mut self, origin: &Origin) -> bool {
        if origin.partition == self.p || &*origin.topic != self.input_topic {
            return true;
        }
        let last = self.from.entry(origin.partition).or_insert(-1);
        let fresh = origin.offset > *last;
        *last = (*last).max(origin.offset);
        fresh
    }

    /// True when a record from `origin` would be applied (not a copy).
    fn would_apply(&self, origin: &Origin) -> bool {
        origin.partition == self.p
            || &*origin.topic != self.input_topic
            || self
                .from
                .get(&origin.partition)
                .is_none_or(|last| origin.offset > *last)
    }
}

/// State records that differ, compared by content: the changelog may hold
/// values of an older format version than the rebuild writes (a value no
/// decoder reads stays as it is, and so differs). The input watermark of a
/// deployment that ran an older release covers only what it read since:
/// not compared (the rebuilt one, from every input record, is the one
/// written).
fn state_differences(rebuilt: &StateMap, from_changelog: &StateMap) -> usize {
    let canonical =
        |k: &(Table, Vec<u8>), v: Option<&Vec<u8>>| v.map(|v| values::canonical(k.0, v).unwrap_or_else(|_| v.clone()));
    let watermark = (Table::Meta, jobmeter_core::state::keys::INPUT_WATERMARK.to_vec());
    let keys: BTreeSet<_> = rebuilt
        .keys()
        .chain(from_changelog.keys())
        .filter(|k| **k != watermark)
        .collect();
    keys.iter()
        .filter(|k| canonical(k, rebuilt.get(**k)) != canonical(k, from_changelog.get(**k)))
        .count()
}

/// Prints how one output topic compares; how many ids differ.
fn report_difference(name: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) -> usize {
    let keys: BTreeSet<_> = want.keys().chain(got.keys()).collect();
    let bad: Vec<_> = keys.into_iter().filter(|k| want.get(*k) != got.get(*k)).collect();
    println!(
        "{name}: rebuilt {}, published {}, {} differ{}",
        want.len(),
        got.len(),
        bad.len(),
        bad.first().map(|k| format!(" (first: {k})")).unwrap_or_default()
    );
    bad.len()
}
