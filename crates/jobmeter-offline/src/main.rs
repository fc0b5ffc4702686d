//! The `jobmeter-offline` binary: jobmeter's file-based commands alone,
//! built without Kafka or RocksDB. The same subcommands and flags as
//! `jobmeter replay|reprice|simulate|check-config` (without `simulate`'s
//! Kafka flags).

use clap::{Parser, Subcommand};
use jobmeter_offline::cli;

/// jobmeter-offline: reproduce, preview and simulate bills from files.
#[derive(Debug, Parser)]
#[command(name = "jobmeter-offline", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the billing core over files: reproduce any bill.
    Replay(cli::ReplayCmd),
    /// Bill impact of a rate-card change: every account's monthly bill
    /// under the current and a proposed card, most affected first.
    Reprice(cli::RepriceCmd),
    /// Write a deterministic simulated fleet's accounts and events to files.
    Simulate(cli::FleetArgs),
    /// Validate a rate card and a plan catalog, reporting every problem.
    CheckConfig(cli::CheckConfigCmd),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Replay(cmd) => cli::run_replay(cmd),
        Command::Reprice(cmd) => cli::run_reprice(cmd),
        Command::Simulate(cmd) => {
            if cmd.events_out.is_none() && cmd.accounts_out.is_none() {
                Err(anyhow::anyhow!(
                    "say where the fleet goes: --events-out FILE and/or --accounts-out FILE"
                ))
            } else {
                cmd.generate().map(drop)
            }
        }
        Command::CheckConfig(cmd) => cmd.run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", jobmeter_offline::cli::error_text(&e));
            std::process::ExitCode::from(2)
        }
    }
}
