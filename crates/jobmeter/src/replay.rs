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

/// Runs a replay; `progress` is called every 65 536 lines with the byte offset.
pub fn replay(args: &ReplayArgs, mut progress: impl FnMut(u64, u64)) -> Result<ReplaySummary, ReplayError> {
    let rates = load_rate_card(&args.rate_card)?;
    let plans = load_plans(args.plans.as_deref())?;
    let mut sinks = OutputFiles::create(&args.out, args.format).map_err(io(&args.out))?;
    let mut book = AccountBook::new(&plans);
    let mut out = Vec::new();
    if let Some(path) = &args.accounts {
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
                Err(inv) => out.push(Output::Reject(jobmeter_core::Rejected {
                    reason: inv.reason,
                    detail: format!("account record: {}", inv.detail),
                    raw: line,
                    origin: Some(origin(path, i)),
                })),
            }
        }
    }
    sinks.write_all(&out).map_err(io(&args.out))?;
    out.clear();
    let ctx = Context::new(&rates, &plans, &book, &args.meter);
    let mut meter = Meter::new();
    let f = File::open(&args.events).map_err(io(&args.events))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::with_capacity(1 << 20, f);
    let events_topic: std::sync::Arc<str> = args.events.display().to_string().into();
    let mut line = Vec::with_capacity(1024);
    let (mut n, mut read) = (0u64, 0u64);
    loop {
        line.clear();
        let got = reader.read_until(b'\n', &mut line).map_err(io(&args.events))?;
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
        let o = Origin {
            topic: events_topic.clone(),
            partition: 0,
            offset: n as i64,
        };
        meter.apply(&ctx, &line, Some(&o), &mut out);
        if !out.is_empty() {
            sinks.write_all(&out).map_err(io(&args.out))?;
            out.clear();
        }
        if n % 65_536 == 0 {
            progress(read, total);
        }
    }
    if args.flush {
        meter.flush(&ctx, &mut out);
        sinks.write_all(&out).map_err(io(&args.out))?;
    }
    sinks.finish().map_err(io(&args.out))?;
    progress(read, total);
    Ok(ReplaySummary {
        lines: n,
        accounts: book.len(),
        stats: meter.stats().clone(),
        open_jobs: meter.open_jobs(),
    })
}

fn origin(path: &Path, line_index: usize) -> Origin {
    Origin {
        topic: path.display().to_string().into(),
        partition: 0,
        offset: line_index as i64 + 1,
    }
}
