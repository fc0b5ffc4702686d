//! The streaming meter (`jobmeter run`).

/// `jobmeter run`.
#[derive(Debug, clap::Args)]
pub struct RunCmd {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Runs the streaming meter until SIGTERM/SIGINT.
pub fn main(_cmd: RunCmd) -> anyhow::Result<()> {
    anyhow::bail!("the streaming meter is not available in this build yet")
}
