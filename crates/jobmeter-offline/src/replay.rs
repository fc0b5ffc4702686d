//! `jobmeter replay`: the billing core over files, no Kafka.
//!
//! Reads account records and lifecycle events (JSON lines), runs them
//! through one meter in file order, and writes charges, limit events,
//! statements and rejects. The same input always gives byte-identical
//! output: this is how a bill is reproduced.

use crate::sinks::{Format, OutputFiles};
use jobmeter_core::{
    AccountBook, AccountRecord, Context, Meter, MeterConfig, Origin, Output, PlanCatalog, RateCard, Stats,
};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// What a replay needs.
#[derive(Debug, Clone)]
pub struct ReplayArgs {
    /// Lifecycle events, one JSON document per line.
    pub events: PathBuf,
    /// Account records, one per line.
    pub accounts: Option<PathBuf>,
    /// Pricing adjustments (records of the adjustments topic), one per
    /// line, applied before the events.
    pub adjustments: Option<PathBuf>,
    /// Rate card (TOML).
    pub rate_card: PathBuf,
    /// Plan catalog (TOML); built-in defaults when absent.
    pub plans: Option<PathBuf>,
    /// Output directory.
    pub out: PathBuf,
    /// JSON lines or CSV.
    pub format: Format,
    /// Close every open job and period at the end of input.
    pub flush: bool,
    /// Timeouts.
    pub meter: MeterConfig,
}

/// Errors of the replay command.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The rate card or plan catalog is invalid.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        source: jobmeter_core::ConfigError,
    },
    /// State could not be encoded.
    #[error("{0}")]
    State(#[from] jobmeter_core::state::DecodeError),
    /// The meter could not read a fact it needs (an account's records).
    #[error("{0}")]
    Apply(#[from] jobmeter_core::ApplyError),
    /// An adjustments file holds a record that cannot apply.
    #[error("adjustments: {0}")]
    Adjustment(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
    move |source| ReplayError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads and validates a rate card file.
pub fn load_rate_card(path: &Path) -> Result<RateCard, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    RateCard::from_toml(&text).map_err(|source| ReplayError::Config {
        path: path.to_owned(),
        source,
    })
}

/// Loads and validates a plan catalog file (defaults when `None`).
pub fn load_plans(path: Option<&Path>) -> Result<PlanCatalog, ReplayError> {
    let Some(path) = path else {
        return Ok(PlanCatalog::default());
    };
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    PlanCatalog::from_toml(&text).map_err(|source| ReplayError::Config {
        path: path.to_owned(),
        source,
    })
}

/// Summary of a replay.
#[derive(Debug, Clone)]
pub struct ReplaySummary {
    /// Input lines read.
    pub lines: u64,
    /// Account records loaded.
    pub accounts: usize,
    /// What the meter did.
    pub stats: Stats,
    /// Jobs still open at the end (when not flushed).
    pub open_jobs: usize,
}

/// Loads account records (JSON lines) into a book; malformed lines come
/// back as rejects naming the file and line.
pub fn load_accounts(path: Option<&Path>, plans: &PlanCatalog) -> Result<(AccountBook, Vec<Output>), ReplayError> {
    let mut book = AccountBook::new(plans);
    let mut rejects = Vec::new();
    let Some(path) = path else {
        return Ok((book, rejects));
    };
    let f = File::open(path).map_err(io(path))?;
    for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
        let line = line.map_err(io(path))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match AccountRecord::parse(&line) {
            Ok(r) => {
                book.insert(r);
            }
            Err(inv) => rejects.push(Output::Reject(jobmeter_core::Rejected {
                reason: inv.reason,
                detail: format!("account record: {}", inv.detail),
                raw: line,
                origin: Some(origin(path, i)),
            })),
        }
    }
    Ok((book, rejects))
}

/// Runs every line of `events` through `meter` in file order, handing
/// outputs to `sink` as they come (and, with `flush`, closing every open
/// job and period at the end). `progress` gets (bytes read, file size).
/// Returns the number of lines read.
pub fn meter_file(
    events: &Path,
    ctx: &Context<'_>,
    meter: &mut Meter,
    flush: bool,
    mut sink: impl FnMut(&[Output]) -> Result<(), ReplayError>,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, ReplayError> {
    let f = File::open(events).map_err(io(events))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::with_capacity(1 << 20, f);
    let events_topic: std::sync::Arc<str> = events.display().to_string().into();
    let mut line = Vec::with_capacity(1024);
    let mut out = Vec::new();
    let (mut n, mut read) = (0u64, 0u64);
    loop {
        line.clear();
        let got = reader.read_until(b'\n', &mut line).map_err(io(events))?;
        if got == 0 {
            break;
        }
        read += got as u64;
        n += 1;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (record_time, event) = split_record_time(&line);
        let o = Origin {
            topic: events_topic.clone(),
            partition: 0,
            offset: n as i64,
            record_time,
        };
        meter.apply(ctx, event, Some(&o), &mut out)?;
        if !out.is_empty() {
            sink(&out)?;
            out.clear();
        }
        if n % 16_384 == 0 {
            progress(read, total);
        }
    }
    if flush {
        meter.flush(ctx, &mut out)?;
        sink(&out)?;
    }
    progress(read, total);
    Ok(n)
}

/// Runs a replay; `progress` gets (bytes read, file size) now and then.
pub fn replay(args: &ReplayArgs, progress: impl FnMut(u64, u64)) -> Result<ReplaySummary, ReplayError> {
    let rates = load_rate_card(&args.rate_card)?;
    let plans = load_plans(args.plans.as_deref())?;
    let mut sinks = OutputFiles::create(&args.out, args.format).map_err(io(&args.out))?;
    let (book, rejects) = load_accounts(args.accounts.as_deref(), &plans)?;
    sinks.write_all(&rejects).map_err(io(&args.out))?;
    let ctx = Context::new(&rates, &plans, &book, &args.meter);
    let mut meter = Meter::new();
    if let Some(path) = &args.adjustments {
        let rejects = apply_adjustments(path, &ctx, &mut meter)?;
        sinks.write_all(&rejects).map_err(io(&args.out))?;
    }
    let n = meter_file(
        &args.events,
        &ctx,
        &mut meter,
        args.flush,
        |out| sinks.write_all(out).map_err(io(&args.out)),
        progress,
    )?;
    sinks.finish().map_err(io(&args.out))?;
    Ok(ReplaySummary {
        lines: n,
        accounts: book.len(),
        stats: meter.stats().clone(),
        open_jobs: meter.open_jobs(),
    })
}

/// Applies every line of an adjustments file to `meter`, in file order
/// (before any event: a price override rates the charges emitted after it).
/// Returns what could not apply, as rejects naming the file and line.
pub fn apply_adjustments(path: &Path, ctx: &Context<'_>, meter: &mut Meter) -> Result<Vec<Output>, ReplayError> {
    let f = File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
        let line = line.map_err(io(path))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        meter.apply_adjustment(ctx, &line, Some(&origin(path, i)), &mut out)?;
    }
    Ok(out)
}

fn origin(path: &Path, line_index: usize) -> Origin {
    Origin {
        topic: path.display().to_string().into(),
        partition: 0,
        offset: line_index as i64 + 1,
        record_time: None,
    }
}

/// A line of an events file is an event, or `<ms><TAB><event>`: the Kafka
/// record timestamp (milliseconds since the epoch) the event carried, as
/// `jobmeter dump --timestamps` writes it. With it, a replay checks event
/// times against record times exactly as the running meter did; without
/// it, only the absolute bounds apply.
pub fn split_record_time(line: &[u8]) -> (Option<jobmeter_core::Timestamp>, &[u8]) {
    let Some(tab) = line.iter().take(21).position(|b| *b == b'\t') else {
        return (None, line);
    };
    let (head, rest) = (&line[..tab], &line[tab + 1..]);
    let digits = head.strip_prefix(b"-").unwrap_or(head);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return (None, line);
    }
    match std::str::from_utf8(head).ok().and_then(|h| h.parse::<i64>().ok()) {
        Some(ms) => (Some(jobmeter_core::Timestamp(ms)), rest),
        None => (None, line),
    }
}
