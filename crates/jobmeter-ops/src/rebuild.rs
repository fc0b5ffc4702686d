//! `jobmeter rebuild`: the event-sourced claim, checked.
//!
//! With the meter stopped, for every input partition: read the job events
//! from the beginning up to the group's committed position and run them
//! through a fresh meter (the accounts table is read first, as `run` does),
//! together with the events other partitions forwarded to it, in the order
//! the live meter applied them (the repartition topic's markers);
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
use jobmeter_kafka::repartition::{source_of, Marker, Replayer, Source, MARKER, PROGRESS};
use jobmeter_kafka::topics::{partition_count, Topics};
use jobmeter_offline::sinks::{Format, OutputFiles};
use jobmeter_service::config::Config;
use jobmeter_service::engine::route;
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

use jobmeter_service::engine::StateMap;

/// Runs the rebuild; returns whether everything matched (a difference is
/// reported, not an error).
pub fn main(cmd: RebuildCmd) -> anyhow::Result<bool> {
    jobmeter_service::init_tracing();
    let cfg: Config = cmd.run.load_config()?;
    let settings = cfg.kafka_settings();
    let topics = Topics::with_prefix(&cfg.topics.prefix);
    let rates = jobmeter_offline::replay::load_rate_card(&cfg.billing.rate_card)?;
    let plans = jobmeter_offline::replay::load_plans(cfg.billing.plans.as_deref())?;
    // The whole accounts table, in memory: the rebuild meters every
    // partition, with the meter stopped.
    let mut book = AccountBook::new(&plans);
    let acc_parts = partition_count(&settings, &topics.accounts)?;
    let all: Vec<(i32, Option<i64>)> = (0..acc_parts).map(|p| (p, None)).collect();
    jobmeter_kafka::reader::read_to_end(
        &settings,
        &format!("{}-rebuild-accounts", cfg.instance_id),
        &topics.accounts,
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
    let parts = partition_count(&settings, &topics.job_events)?;
    if parts == 0 {
        anyhow::bail!("topic {} does not exist", topics.job_events);
    }
    // Where the group stands: the rebuild covers exactly what was committed.
    let group: BaseConsumer = settings
        .group_consumer(&cfg.kafka.group_id, &format!("{}-rebuild", cfg.instance_id))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition(&topics.job_events, p);
        tpl.add_partition(&topics.repartition, p);
    }
    let committed = group.committed_offsets(tpl, Duration::from_secs(10))?;
    let meter_cfg = cfg.meter_config();
    let ctx = Context::new(&rates, &plans, &book, &meter_cfg);
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
    // Where an input record was read, for dead letters and time checks.
    let input_origin = |partition: i32, r: &jobmeter_kafka::reader::Record| Origin {
        topic: topics.job_events.as_str().into(),
        partition,
        offset: r.offset,
        record_time: r.timestamp_ms.map(jobmeter_core::Timestamp),
    };
    for p in 0..parts {
        let position = |topic: &str| {
            committed
                .find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(0)
        };
        let (until, rp_until) = (position(&topics.job_events), position(&topics.repartition));
        // The markers saying in which order the live meter applied this
        // partition's records, and the events forwarded to it.
        let mut markers = Vec::new();
        let mut foreign: BTreeMap<(Source, i64), (Origin, jobmeter_kafka::reader::Record)> = BTreeMap::new();
        read_range(
            &settings,
            &format!("{}-rebuild-rp-{p}", cfg.instance_id),
            &topics.repartition,
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
                    .unwrap_or_else(|| (topics.repartition.clone(), p, r.offset));
                let origin = Origin {
                    topic: topic.into(),
                    partition,
                    offset,
                    record_time: r.timestamp_ms.map(jobmeter_core::Timestamp),
                };
                foreign.insert((Source::Forwarded, r.offset), (origin, r));
            },
        )?;
        let forwarded = foreign.len();
        // Events of this partition's accounts that arrived on another
        // partition of the same instance and were applied here directly.
        let mut local = 0usize;
        for (q, runs) in Replayer::<()>::input_runs(&markers) {
            let (from, to) = (runs[0].0, runs.iter().map(|r| r.1).max().unwrap_or(runs[0].1));
            read_range(
                &settings,
                &format!("{}-rebuild-{p}-from-{q}", cfg.instance_id),
                &topics.job_events,
                &[(q, Some(from), Some(to))],
                Duration::from_secs(3600),
                |r| {
                    if Replayer::<()>::in_runs(&runs, r.offset)
                        && route(r.value.as_deref().unwrap_or_default(), q, parts).0 == p
                    {
                        local += 1;
                        let origin = input_origin(q, &r);
                        foreign.insert((Source::Input(q), r.offset), (origin, r));
                    }
                },
            )?;
        }
        let mut replayer = Replayer::new(markers, foreign);
        let mut meter = Meter::tracking_changes().with_state_format(cfg.state.format);
        let mut out = Vec::new();
        // The first event the meter could not apply (the rebuild stops).
        let mut failed: Option<jobmeter_core::ApplyError> = None;
        let pctx = ctx.with_partition(p, parts, jobmeter_kafka::partitioner::partition_for_key);
        let mut n = 0u64;
        // As live: another partition's records reach this meter in offset
        // order, so one at or below the last applied from its partition is
        // a copy (forwarded again after its forwarder restarted behind what
        // it had read ahead) and is not applied.
        let mut applied_from: BTreeMap<i32, i64> = BTreeMap::new();
        let input_topic = topics.job_events.as_str();
        let mut first = |origin: &Origin| {
            if origin.partition == p || &*origin.topic != input_topic {
                return true;
            }
            let last = applied_from.entry(origin.partition).or_insert(-1);
            let fresh = origin.offset > *last;
            *last = (*last).max(origin.offset);
            fresh
        };
        read_range(
            &settings,
            &format!("{}-rebuild-{p}", cfg.instance_id),
            &topics.job_events,
            &[(p, None, Some(until))],
            Duration::from_secs(3600),
            |r| {
                let (owner, ev) = route(r.value.as_deref().unwrap_or_default(), p, parts);
                let here = owner == p;
                // The input watermark covers every record of the partition,
                // wherever it was applied.
                if let Some(t) = ev.and_then(|ev| {
                    jobmeter_core::order::merge_time(&meter_cfg, ev.time, r.timestamp_ms.map(jobmeter_core::Timestamp))
                }) {
                    meter.raise_input_watermark(t);
                }
                n += u64::from(here);
                let origin = input_origin(p, &r);
                replayer.own(r.offset, (origin, r), here, |(origin, r)| {
                    if failed.is_none() && first(&origin) {
                        if let Err(e) =
                            meter.apply(&pctx, r.value.as_deref().unwrap_or_default(), Some(&origin), &mut out)
                        {
                            failed = Some(e);
                        }
                    }
                });
            },
        )?;
        let misplaced = replayer.misplaced;
        let left = replayer.finish(|(origin, r)| {
            if failed.is_none() && first(&origin) {
                if let Err(e) = meter.apply(&pctx, r.value.as_deref().unwrap_or_default(), Some(&origin), &mut out) {
                    failed = Some(e);
                }
            }
        });
        if let Some(e) = failed {
            anyhow::bail!("partition {p}: {e}");
        }
        // A record no marker placed is a defect, unless it is a copy of one
        // applied already (passed over live as well).
        let unplaced = left
            .iter()
            .filter(|(origin, _)| {
                origin.partition == p
                    || &*origin.topic != input_topic
                    || applied_from
                        .get(&origin.partition)
                        .is_none_or(|last| origin.offset > *last)
            })
            .count();
        if misplaced + unplaced > 0 {
            println!(
                "partition {p}: {misplaced} own and {unplaced} other events below the committed positions are not where the markers place them"
            );
            mismatched_state += misplaced + unplaced;
        }
        let mut from_changelog: StateMap = BTreeMap::new();
        let mut last_offset = None;
        read_to_end(
            &settings,
            &format!("{}-rebuild-cl-{p}", cfg.instance_id),
            &topics.changelog,
            &[(p, None)],
            Duration::from_secs(3600),
            |r| {
                last_offset = Some(r.offset);
                let _ = jobmeter_service::engine::overlay(&mut from_changelog, r);
            },
        )?;
        // How the live meter orders its inputs is a mode, not a result of
        // them: the rebuilt state keeps the stored one.
        if from_changelog.contains_key(&(Table::Meta, jobmeter_core::state::keys::EVENT_ORDER.to_vec())) {
            meter.set_merge_order();
        }
        // So is what it knew of the inputs other instances forwarded.
        if let Some(v) = from_changelog.get(&(Table::Meta, jobmeter_core::state::keys::MERGE_SOURCES.to_vec())) {
            meter.set_merge_sources(v.clone());
        }
        // Every record the replay wrote (closed statements included), with
        // deletions as `None`.
        let changes = meter.take_changes()?;
        let rebuilt: StateMap = changes
            .iter()
            .cloned()
            .filter_map(|c| c.value.map(|v| ((c.table, c.key), v)))
            .collect();
        // Compared by content: the changelog may hold values of an older
        // format version than the rebuild writes.
        // A value no decoder reads stays as it is, and so differs.
        let canonical = |k: &(Table, Vec<u8>), v: Option<&Vec<u8>>| {
            v.map(|v| values::canonical(k.0, v).unwrap_or_else(|_| v.clone()))
        };
        // The input watermark of a deployment that ran an older release
        // covers only what it read since: not compared (the rebuilt one,
        // from every input record, is the one written).
        let watermark = (Table::Meta, jobmeter_core::state::keys::INPUT_WATERMARK.to_vec());
        let keys: BTreeSet<_> = rebuilt
            .keys()
            .chain(from_changelog.keys())
            .filter(|k| **k != watermark)
            .collect();
        let differ = keys
            .iter()
            .filter(|k| canonical(k, rebuilt.get(**k)) != canonical(k, from_changelog.get(**k)))
            .count();
        mismatched_state += differ;
        println!(
            "partition {p}: {n} own input events up to offset {until}, {local} from other partitions of its instance, {forwarded} forwarded up to offset {rp_until}; rebuilt {} state records, changelog holds {}; {} differ",
            rebuilt.len(),
            from_changelog.len(),
            differ
        );
        if let Some(store) = &store {
            store.drop_partition(p)?;
            store.commit(p, &changes, last_offset)?;
        }
        if let Some(s) = sinks.as_mut() {
            s.write_all(&out)?;
        }
        outputs.extend(out);
    }
    if let Some(s) = sinks {
        s.finish()?;
    }
    let published = |topic: &str, field: &str| -> anyhow::Result<BTreeMap<String, String>> {
        let n = partition_count(&settings, topic)?;
        let parts: Vec<(i32, Option<i64>)> = (0..n).map(|p| (p, None)).collect();
        let mut m = BTreeMap::new();
        read_to_end(
            &settings,
            &format!("{}-rebuild-out", cfg.instance_id),
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
    };
    let mut want_c = BTreeMap::new();
    let mut want_l = BTreeMap::new();
    let mut want_s = BTreeMap::new();
    let mut want_cmd = BTreeMap::new();
    for o in &outputs {
        match o {
            Output::Charge(c) => {
                want_c.insert(c.charge_id.clone(), serde_json::to_string(c)?);
            }
            Output::Limit(l) => {
                want_l.insert(l.event_id.clone(), serde_json::to_string(l)?);
            }
            Output::Statement(s) => {
                want_s.insert(format!("{}/{}", s.account_id, s.period), serde_json::to_string(s)?);
            }
            Output::Command(c) => {
                want_cmd.insert(c.command_id.clone(), serde_json::to_string(c)?);
            }
            Output::Reject(_) => {}
        }
    }
    let diff = |name: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>| -> usize {
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
    };
    let bad = diff("charges", &want_c, &published(&topics.charges, "charge_id")?)
        + diff("limit events", &want_l, &published(&topics.limits, "event_id")?)
        + diff("statements", &want_s, &published(&topics.statements, "statement")?)
        + diff("commands", &want_cmd, &published(&topics.commands, "command_id")?)
        + mismatched_state;
    if bad > 0 {
        println!(
            "rebuild differs: the rebuild from the input topics differs from what the meter published or stored ({bad} differences){}",
            if cmd.dry_run { "" } else { "; local state replaced with the rebuilt state" }
        );
        return Ok(false);
    }
    println!(
        "rebuild matches: state and outputs rebuilt from the input topics equal the changelog and the published topics{}",
        if cmd.dry_run { "" } else { "; local state replaced with the rebuilt state" }
    );
    Ok(true)
}
