//! The offline commands' flags and what each does with them:
//! `replay`, `reprice`, `simulate` (to files) and `check-config`. Both
//! command lines use them — `jobmeter-offline` and `jobmeter` — so a flag
//! means the same in each.

use crate::replay::{load_plans, load_rate_card, replay, ReplayArgs};
use crate::simulate::{accounts, events, FleetOptions};
use crate::sinks::Format;
use anyhow::Context as _;
use jobmeter_core::{MeterConfig, Timestamp};
use std::io::Write;
use std::path::PathBuf;

/// Output of `jobmeter reprice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepriceFormat {
    /// A readable table: the most affected rows, totals per plan and model.
    Table,
    /// Every row, exact amounts.
    Csv,
}

/// `jobmeter reprice`.
#[derive(Debug, clap::Args)]
pub struct RepriceCmd {
    /// Lifecycle events, one CloudEvent JSON per line (a period's worth).
    #[arg(long)]
    pub events: PathBuf,
    /// Account records, one JSON per line.
    #[arg(long)]
    pub accounts: Option<PathBuf>,
    /// Plan catalog (TOML); built-in defaults when omitted.
    #[arg(long)]
    pub plans: Option<PathBuf>,
    /// The rate card in force.
    #[arg(long, default_value = "config/rate-card.toml")]
    pub current: PathBuf,
    /// The proposed rate card (the current one when omitted: with
    /// `--override`, the preview of price overrides alone).
    #[arg(long)]
    pub proposed: Option<PathBuf>,
    /// Price overrides to preview, one adjustment record per line (as on
    /// the adjustments topic): applied in the proposed pass only.
    #[arg(long = "override")]
    pub overrides: Option<PathBuf>,
    /// Only this month (YYYY-MM); every month with a statement otherwise.
    #[arg(long, value_parser = parse_period)]
    pub period: Option<jobmeter_core::Period>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = RepriceFormat::Table)]
    pub format: RepriceFormat,
    /// Rows shown in the table.
    #[arg(long, default_value_t = 25)]
    pub top: usize,
    /// Write the report here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write an SVG chart of the distribution of changes here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Timeouts.
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

pub fn parse_period(s: &str) -> Result<jobmeter_core::Period, String> {
    jobmeter_core::Period::parse(s).ok_or_else(|| format!("{s:?} is not a month such as 2024-05"))
}

pub fn run_reprice(cmd: RepriceCmd) -> anyhow::Result<()> {
    let args = crate::reprice::RepriceArgs {
        events: cmd.events,
        accounts: cmd.accounts,
        plans: cmd.plans,
        before: cmd.current.clone(),
        after: cmd.proposed.clone().unwrap_or_else(|| cmd.current.clone()),
        overrides: cmd.overrides.clone(),
        period: cmd.period,
        meter: cmd.timeouts.meter_config(),
    };
    let mut bar = crate::progress::Progress::new("reprice", 0, crate::progress::Unit::Bytes);
    let mut pass = String::new();
    let report = crate::reprice::reprice(&args, |p, done, total| {
        if pass != p {
            bar.finish();
            pass = p.to_owned();
            bar = crate::progress::Progress::new(format!("reprice ({p})"), total, crate::progress::Unit::Bytes);
        }
        bar.set(done);
    })?;
    bar.finish();
    let text = match cmd.format {
        RepriceFormat::Table => crate::reprice::table(&report, cmd.top),
        RepriceFormat::Csv => crate::reprice::csv(&report),
    };
    match &cmd.out {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{text}"),
    }
    if let Some(path) = &cmd.svg {
        let title = format!(
            "Bill impact: {} → {}{}",
            cmd.current.display(),
            match (&cmd.proposed, &cmd.overrides) {
                (Some(p), None) => p.display().to_string(),
                (Some(p), Some(o)) => format!("{} with {}", p.display(), o.display()),
                (None, Some(o)) => format!("overrides {}", o.display()),
                (None, None) => cmd.current.display().to_string(),
            },
            cmd.period.map(|p| format!(", {p}")).unwrap_or_default()
        );
        std::fs::write(path, crate::reprice::svg(&report, &title))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

/// Timeouts shared by replay and run.
#[derive(Debug, Clone, clap::Args)]
pub struct TimeoutArgs {
    /// Orphan timeout (event time), e.g. "10m".
    #[arg(long, default_value = "10m", value_parser = crate::args::parse_duration)]
    pub orphan_timeout: i64,
    /// Grace after a period's end before it closes, e.g. "1h".
    #[arg(long, default_value = "1h", value_parser = crate::args::parse_duration)]
    pub period_grace: i64,
    /// Longest accepted job, e.g. "7d".
    #[arg(long, default_value = "7d", value_parser = crate::args::parse_duration)]
    pub max_duration: i64,
    /// How long finished jobs are remembered for duplicate detection.
    #[arg(long, default_value = "35d", value_parser = crate::args::parse_duration)]
    pub retention: i64,
    /// Refuse events whose time is further than this ahead of their
    /// record timestamp (lines of the form `<ms><TAB><event>`).
    #[arg(long, default_value = "5m", value_parser = crate::args::parse_duration)]
    pub max_clock_skew: i64,
    /// Refuse events whose time is further than this behind their record
    /// timestamp (default: the retention).
    #[arg(long, value_parser = crate::args::parse_duration)]
    pub max_event_age: Option<i64>,
    /// A `runway` limit event fires when a limit would be used up within
    /// this (repeat the flag for several horizons).
    #[arg(long = "runway-horizon", default_value = "10m", value_parser = crate::args::parse_duration)]
    pub runway_horizons: Vec<i64>,
    /// A job sent a `job.stop` is charged to at most the command's instant
    /// plus this.
    #[arg(long, default_value = "30s", value_parser = crate::args::parse_duration)]
    pub stop_grace: i64,
}

impl TimeoutArgs {
    /// As the core's config.
    pub fn meter_config(&self) -> MeterConfig {
        MeterConfig {
            orphan_timeout_ms: self.orphan_timeout,
            period_grace_ms: self.period_grace,
            max_duration_ms: self.max_duration,
            retention_ms: self.retention,
            max_clock_skew_ms: self.max_clock_skew,
            max_event_age_ms: self.max_event_age.unwrap_or(self.retention),
            state_format: Default::default(),
            runway_horizons_ms: self.runway_horizons.clone(),
            stop_grace_ms: self.stop_grace,
        }
    }
}

/// `jobmeter replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayCmd {
    /// Lifecycle events, one CloudEvent JSON per line.
    #[arg(long)]
    pub events: PathBuf,
    /// Account records, one JSON per line.
    #[arg(long)]
    pub accounts: Option<PathBuf>,
    /// Pricing adjustments (price overrides), one JSON record per line, as
    /// on the adjustments topic; applied before the events.
    #[arg(long)]
    pub adjustments: Option<PathBuf>,
    /// Rate card (TOML).
    #[arg(long, default_value = "config/rate-card.toml")]
    pub rate_card: PathBuf,
    /// Plan catalog (TOML); built-in defaults when omitted.
    #[arg(long)]
    pub plans: Option<PathBuf>,
    /// Output directory (charges, limits, statements, rejects).
    #[arg(long, default_value = "jobmeter-out")]
    pub out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,
    /// At the end, close open jobs as orphans and emit every open period's statements.
    #[arg(long)]
    pub flush: bool,
    /// Timeouts.
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

/// The simulated fleet's flags and the files it is written to (`jobmeter
/// simulate`; the service's command line adds the flags that produce it to
/// Kafka).
#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Seed: the same seed gives the same fleet.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Accounts.
    #[arg(long, default_value_t = 200)]
    pub accounts: usize,
    /// Jobs.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Event time of the first job (RFC 3339).
    #[arg(long, default_value = "2024-05-01T00:00:00Z")]
    pub start: String,
    /// Mean gap between job starts, e.g. "200ms".
    #[arg(long, default_value = "200ms", value_parser = crate::args::parse_duration)]
    pub mean_gap: i64,
    /// Heartbeat interval.
    #[arg(long, default_value = "10s", value_parser = crate::args::parse_duration)]
    pub heartbeat: i64,
    /// Per-mille of events delivered twice.
    #[arg(long, default_value_t = 50)]
    pub duplicates: u32,
    /// Per-mille of events swapped with a neighbour.
    #[arg(long, default_value_t = 20)]
    pub reorder: u32,
    /// Per-mille of jobs whose stop is lost.
    #[arg(long, default_value_t = 5)]
    pub lost_stops: u32,
    /// Per-mille of extra malformed events.
    #[arg(long, default_value_t = 2)]
    pub bad: u32,
    /// Largest worker clock skew.
    #[arg(long, default_value = "300ms", value_parser = crate::args::parse_duration)]
    pub max_skew: i64,
    /// Per-mille of workers whose clock is skewed (by up to --max-skew).
    #[arg(long, default_value_t = 100)]
    pub skewed_workers: u32,
    /// Per-mille of accounts that change plan mid-run (free to pro; half as
    /// many pro to enterprise).
    #[arg(long, default_value_t = 100)]
    pub plan_changes: u32,
    /// Per-mille of jobs that are fine-tunes (10 min to 3 h).
    #[arg(long, default_value_t = 15)]
    pub fine_tunes: u32,
    /// Write events (JSON lines) here.
    #[arg(long)]
    pub events_out: Option<PathBuf>,
    /// Write account records (JSON lines) here.
    #[arg(long)]
    pub accounts_out: Option<PathBuf>,
}

impl FleetArgs {
    /// As fleet options.
    pub fn options(&self) -> anyhow::Result<FleetOptions> {
        for (flag, v) in [
            ("--duplicates", self.duplicates),
            ("--reorder", self.reorder),
            ("--lost-stops", self.lost_stops),
            ("--bad", self.bad),
            ("--skewed-workers", self.skewed_workers),
            ("--plan-changes", self.plan_changes),
        ] {
            if v > 1000 {
                anyhow::bail!("{flag} {v}: a per-mille rate is at most 1000");
            }
        }
        Ok(FleetOptions {
            seed: self.seed,
            accounts: self.accounts.max(1),
            jobs: self.jobs,
            start: Timestamp::parse(&self.start).map_err(|e| anyhow::anyhow!("--start: {e}"))?,
            mean_gap_ms: self.mean_gap,
            heartbeat_interval_ms: self.heartbeat.max(1),
            duplicate_permille: self.duplicates,
            reorder_permille: self.reorder,
            lost_stop_permille: self.lost_stops,
            bad_permille: self.bad,
            max_skew_ms: self.max_skew,
            skewed_worker_permille: self.skewed_workers,
            plan_change_permille: self.plan_changes,
            fine_tune_permille: self.fine_tunes,
        })
    }

    /// Generates the fleet and writes it to the files named (none is fine
    /// when the caller sends it elsewhere): its account records and events.
    pub fn generate(&self) -> anyhow::Result<Fleet> {
        let opts = self.options()?;
        let evs = events(&opts);
        let accs = accounts(&opts);
        if let Some(path) = &self.events_out {
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            );
            let mut bar =
                crate::progress::Progress::new("write", evs.len() as u64, crate::progress::Unit::Items("events"));
            for (i, e) in evs.iter().enumerate() {
                writeln!(w, "{}", e.json)?;
                if i % 8192 == 0 {
                    bar.set(i as u64);
                }
            }
            w.flush()?;
            bar.set(evs.len() as u64);
            bar.finish();
            eprintln!("wrote {} events to {}", evs.len(), path.display());
        }
        if let Some(path) = &self.accounts_out {
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            );
            for (_, rec) in &accs {
                writeln!(w, "{rec}")?;
            }
            w.flush()?;
        }
        Ok(Fleet {
            accounts: accs,
            events: evs,
        })
    }
}

/// A generated fleet: account records (key, JSON) and events.
#[derive(Debug)]
pub struct Fleet {
    /// (account id, record JSON), in the order they are produced.
    pub accounts: Vec<(String, String)>,
    /// Events, in the order they are produced.
    pub events: Vec<crate::simulate::SimEvent>,
}

/// `jobmeter check-config`.
#[derive(Debug, clap::Args)]
pub struct CheckConfigCmd {
    /// Rate card (TOML).
    #[arg(long, default_value = "config/rate-card.toml")]
    pub rate_card: PathBuf,
    /// Plan catalog (TOML).
    #[arg(long)]
    pub plans: Option<PathBuf>,
}

impl CheckConfigCmd {
    /// Loads both files, reporting every problem; prints a summary.
    pub fn run(&self) -> anyhow::Result<()> {
        let card = load_rate_card(&self.rate_card)?;
        let plans = load_plans(self.plans.as_deref())?;
        let models: usize = card.versions.last().map_or(0, |v| v.models.len());
        println!(
            "ok: {} rate-card version(s), {} model(s) in the latest; pro fee {} (intro {} for the first {})",
            card.versions.len(),
            models,
            plans.pro_fee,
            plans.pro_intro_fee,
            plans.pro_intro_subscribers
        );
        Ok(())
    }
}

/// Runs `replay`.
pub fn run_replay(cmd: ReplayCmd) -> anyhow::Result<()> {
    let args = ReplayArgs {
        events: cmd.events,
        accounts: cmd.accounts,
        adjustments: cmd.adjustments,
        rate_card: cmd.rate_card,
        plans: cmd.plans,
        out: cmd.out.clone(),
        format: cmd.format,
        flush: cmd.flush,
        meter: cmd.timeouts.meter_config(),
    };
    let started = std::time::Instant::now();
    let mut bar = crate::progress::Progress::new("replay", 0, crate::progress::Unit::Bytes);
    let summary = replay(&args, |done, total| {
        bar.set_total(total);
        bar.set(done);
    })?;
    bar.finish();
    let s = &summary.stats;
    let rejected: u64 = s.rejected.iter().sum();
    eprintln!(
        "replayed {} lines ({} accounts) in {:.2}s: {} events, {} duplicates, {} rejected, {} charges ({} adjustments, {} late), {} orphans, {} limit events ({} runway warnings), {} job.stop commands, {} statements, {} jobs still open",
        summary.lines,
        summary.accounts,
        started.elapsed().as_secs_f64(),
        s.events,
        s.duplicates,
        rejected,
        s.charges,
        s.adjustments,
        s.late_charges,
        s.orphans,
        s.limit_events + s.runway_events,
        s.runway_events,
        s.stop_commands,
        s.statements,
        summary.open_jobs
    );
    eprintln!("outputs in {}", cmd.out.display());
    Ok(())
}

/// An error and its causes as one line, each said once (library errors
/// already name their cause in their own message): what both binaries
/// print after `error: ` before they exit with status 2.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.is_empty() {
            msg = text;
        } else if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}
