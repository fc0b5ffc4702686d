//! The `jobmeter` command line: argument parsing and dispatch only. Each
//! command's flags and body live in the crate that does it: the offline
//! commands in `jobmeter-offline` (its `cli` module, shared with the
//! `jobmeter-offline` binary), `run` in `jobmeter-service`, the operator
//! tools in `jobmeter-ops`.

use clap::{Parser, Subcommand};
pub use jobmeter_offline::cli::{
    run_replay, run_reprice, CheckConfigCmd, FleetArgs, ReplayCmd, RepriceCmd, RepriceFormat, TimeoutArgs,
};

/// jobmeter: an exactly-once, per-second usage meter for GPU jobs.
#[derive(Debug, Parser)]
#[command(name = "jobmeter", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the billing core over files (no Kafka): reproduce any bill.
    Replay(ReplayCmd),
    /// Generate a deterministic simulated fleet's accounts and events.
    Simulate(SimulateCmd),
    /// Validate a rate card and a plan catalog, reporting every problem.
    CheckConfig(CheckConfigCmd),
    /// Run the streaming meter against Kafka.
    Run(jobmeter_service::RunCmd),
    /// Print a topic's committed records (read_committed) as JSON lines.
    Dump(DumpCmd),
    /// Rebuild state and outputs from the input topics and check them
    /// against the changelog and the published topics (meter stopped).
    Rebuild(jobmeter_ops::rebuild::RebuildCmd),
    /// Bill impact of a rate-card change: every account's monthly bill
    /// under the current and a proposed card, most affected first.
    Reprice(RepriceCmd),
    /// Publish job lifecycle events (or run a command as a job) for workers
    /// that are scripts.
    #[command(subcommand)]
    Emit(jobmeter_ops::emit::EmitCmd),
    /// Deliver limit events to a webhook (signed, retried, dead-lettered).
    Notify(jobmeter_ops::notify::NotifyCmd),
}

/// `jobmeter dump`.
#[derive(Debug, clap::Args)]
pub struct DumpCmd {
    /// Topic to read.
    #[arg(long)]
    pub topic: String,
    /// How to reach Kafka (the meter's configuration).
    #[command(flatten)]
    pub kafka: jobmeter_service::KafkaArgs,
    /// Print only the last N records.
    #[arg(long)]
    pub last: Option<usize>,
    /// Start each line with the record's timestamp in milliseconds and a
    /// tab (the form `jobmeter replay --events` reads, so that a replay
    /// checks event times against record times as the meter did).
    #[arg(long)]
    pub timestamps: bool,
}

/// `jobmeter simulate`: the offline fleet flags, plus producing to Kafka.
#[derive(Debug, clap::Args)]
pub struct SimulateCmd {
    /// The fleet and the files it is written to.
    #[command(flatten)]
    pub fleet: jobmeter_offline::cli::FleetArgs,
    /// Produce to Kafka instead (accounts first, then events, keyed by account).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Topic prefix when producing to Kafka.
    #[arg(long, default_value = "jobmeter")]
    pub topic_prefix: String,
    /// Target events per second when producing to Kafka (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How event records are placed on partitions when producing to Kafka,
    /// as different Kafka clients would (the meter's results do not depend
    /// on it).
    #[arg(long, value_enum, default_value_t = jobmeter_ops::tools::Placement::Murmur2)]
    pub placement: jobmeter_ops::tools::Placement,
}

/// Runs the command line; the binary's `main` calls this. The exit status
/// of a command that ran: 0, or what the command reports (`rebuild`: 1
/// when the rebuild differs; `emit run`: the job's own status). An error
/// is for the binary to print; it exits 2.
pub fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let ok = std::process::ExitCode::SUCCESS;
    match cli.command {
        Command::Replay(cmd) => run_replay(cmd).map(|()| ok),
        Command::Simulate(cmd) => run_simulate(cmd).map(|()| ok),
        Command::CheckConfig(cmd) => cmd.run().map(|()| ok),
        Command::Run(cmd) => run(&cmd).map(|()| ok),
        Command::Dump(cmd) => {
            let settings = cmd.kafka.load()?.kafka_settings();
            jobmeter_ops::tools::dump(&settings, &cmd.topic, cmd.last, cmd.timestamps).map(|()| ok)
        }
        Command::Rebuild(cmd) => Ok(if jobmeter_ops::rebuild::main(cmd)? {
            ok
        } else {
            std::process::ExitCode::from(1)
        }),
        Command::Reprice(cmd) => run_reprice(cmd).map(|()| ok),
        Command::Notify(cmd) => jobmeter_ops::notify::main(cmd).map(|()| ok),
        // As a shell reports a status: its low eight bits.
        Command::Emit(cmd) => jobmeter_ops::emit::main(cmd)
            .map(|code| std::process::ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))),
    }
}

/// `jobmeter run`: the effective configuration, printed or run until a
/// signal.
fn run(cmd: &jobmeter_service::RunCmd) -> anyhow::Result<()> {
    jobmeter_service::init_tracing();
    let cfg = cmd.load_config()?;
    if cmd.print_config {
        println!("{}", toml::to_string_pretty(&cfg.redacted())?);
        return Ok(());
    }
    Ok(jobmeter_service::run_until_signalled(cfg)?)
}

fn run_simulate(cmd: SimulateCmd) -> anyhow::Result<()> {
    let fleet = cmd.fleet.generate()?;
    if let Some(brokers) = &cmd.brokers {
        let topics = jobmeter_kafka::topics::Topics::with_prefix(&cmd.topic_prefix);
        jobmeter_ops::tools::produce_fleet_placed(
            brokers,
            &topics,
            &fleet.accounts,
            &fleet.events,
            cmd.rate,
            cmd.placement,
        )?;
    } else if cmd.fleet.events_out.is_none() {
        anyhow::bail!("say where the fleet goes: --events-out FILE and/or --brokers HOST:PORT");
    }
    Ok(())
}
