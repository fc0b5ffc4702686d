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
    Simulate(jobmeter_ops::tools::SimulateCmd),
    /// Validate a rate card and a plan catalog, reporting every problem.
    CheckConfig(CheckConfigCmd),
    /// Run the streaming meter against Kafka.
    Run(jobmeter_service::RunCmd),
    /// Print a topic's committed records (read_committed) as JSON lines.
    Dump(jobmeter_ops::tools::DumpCmd),
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
    /// Write pricing adjustments (price overrides, their ends, job refunds, manual charges) to the
    /// adjustments topic, each checked first as the meter will check it.
    Adjust(jobmeter_ops::adjust::AdjustCmd),
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
        Command::Simulate(cmd) => cmd.run().map(|()| ok),
        Command::CheckConfig(cmd) => cmd.run().map(|()| ok),
        Command::Run(cmd) => Ok(cmd.run().map(|()| ok)?),
        Command::Dump(cmd) => cmd.run().map(|()| ok),
        Command::Rebuild(cmd) => Ok(if jobmeter_ops::rebuild::main(cmd)? {
            ok
        } else {
            std::process::ExitCode::from(1)
        }),
        Command::Reprice(cmd) => run_reprice(cmd).map(|()| ok),
        Command::Notify(cmd) => jobmeter_ops::notify::main(cmd).map(|()| ok),
        Command::Adjust(cmd) => jobmeter_ops::adjust::main(cmd).map(|()| ok),
        // As a shell reports a status: its low eight bits.
        Command::Emit(cmd) => jobmeter_ops::emit::main(cmd)
            .map(|code| std::process::ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))),
    }
}
