//! `jobmeter emit`: lifecycle events from the shell, for workers that are
//! scripts. `emit run -- CMD…` wraps a command: start, heartbeats while it
//! runs, and a stop whose status is the command's outcome (succeeded on
//! exit 0, failed otherwise, cancelled when interrupted or when the meter
//! sends the job a `job.stop`: the command gets SIGTERM, then SIGKILL after
//! `--kill-after`).

use jobmeter_core::{JobKind, Timestamp};
use jobmeter_emit::{Emitter, EmitterConfig, EventType, JobSpec, StopStatus};
use std::time::Duration;

/// Where events go.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Kafka brokers.
    #[arg(long, env = "JOBMETER_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic prefix of the meter (events go to `<prefix>.job-events`).
    #[arg(long, default_value = "jobmeter")]
    pub topic_prefix: String,
    /// CloudEvents source: one stable value per worker (default
    /// `jobmeter-emit/<hostname>`).
    #[arg(long)]
    pub source: Option<String>,
    /// The meter's configuration file: its `kafka.properties` (SASL, SSL)
    /// are used, as every other tool uses them.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Override a setting: `--set kafka.properties.security.protocol=SASL_SSL`
    /// (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl Target {
    /// The librdkafka properties of the meter's configuration (file,
    /// `JOBMETER__…` environment, `--set`), checked as the tools check them.
    fn properties(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let over = jobmeter_service::overrides(&self.sets, Some(&self.brokers))?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        let cfg = jobmeter_service::config::Config::load_for_kafka(self.config.as_deref(), &env, &over)?;
        Ok(cfg.kafka.properties)
    }
}

/// Which job.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// The account billed.
    #[arg(long)]
    pub account: String,
    /// The job id.
    #[arg(long)]
    pub job: String,
}

/// What kind of job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Model inference.
    Inference,
    /// Fine-tuning.
    FineTune,
    /// A step of a workflow run.
    WorkflowStep,
}

/// What a start carries.
#[derive(Debug, Clone, clap::Args)]
pub struct StartArgs {
    /// Job kind.
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Model (required unless fine-tune).
    #[arg(long)]
    pub model: Option<String>,
    /// Workflow run (required for workflow steps).
    #[arg(long)]
    pub workflow_run: Option<String>,
    /// GPU class.
    #[arg(long)]
    pub gpu: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    /// Finished normally.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

/// `jobmeter emit`.
#[derive(Debug, clap::Subcommand)]
pub enum EmitCmd {
    /// Publish `job.started`.
    Start {
        /// Target.
        #[command(flatten)]
        target: Target,
        /// Job.
        #[command(flatten)]
        job: JobArgs,
        /// Start fields.
        #[command(flatten)]
        start: StartArgs,
    },
    /// Publish one `job.heartbeat`.
    Heartbeat {
        /// Target.
        #[command(flatten)]
        target: Target,
        /// Job.
        #[command(flatten)]
        job: JobArgs,
        /// Heartbeat number (part of the event id; default: the current
        /// Unix time in ms).
        #[arg(long)]
        seq: Option<u64>,
    },
    /// Publish `job.stopped`.
    Stop {
        /// Target.
        #[command(flatten)]
        target: Target,
        /// Job.
        #[command(flatten)]
        job: JobArgs,
        /// How it ended.
        #[arg(long, value_enum)]
        status: StatusArg,
    },
    /// Run a command as a job: start, heartbeats, and a stop with its outcome.
    Run {
        /// Target.
        #[command(flatten)]
        target: Target,
        /// The account billed.
        #[arg(long)]
        account: String,
        /// The job id (default: `<hostname>-<pid>-<unix ms>`).
        #[arg(long)]
        job: Option<String>,
        /// Start fields.
        #[command(flatten)]
        start: StartArgs,
        /// Heartbeat interval.
        #[arg(long, default_value = "10s", value_parser = jobmeter_offline::args::parse_duration)]
        heartbeat: i64,
        /// After a `job.stop` from the meter (or an interruption), how long
        /// the command has to exit after SIGTERM before it is sent SIGKILL.
        #[arg(long, default_value = "10s", value_parser = jobmeter_offline::args::parse_duration)]
        kill_after: i64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// An emitter; `listen`: also read stop commands (a wrapped command).
fn emitter(t: &Target, heartbeat: Duration, listen: bool) -> anyhow::Result<Emitter> {
    let mut cfg = EmitterConfig::new(
        &t.brokers,
        t.source
            .clone()
            .unwrap_or_else(|| format!("jobmeter-emit/{}", crate::tools::hostname())),
    );
    if !listen {
        cfg.commands_topic = None;
    }
    cfg.properties = t.properties()?;
    cfg = cfg.with_prefix(&t.topic_prefix);
    cfg.heartbeat_interval = heartbeat;
    Ok(Emitter::new(cfg)?)
}

fn spec(account: &str, job: &str, s: &StartArgs) -> JobSpec {
    JobSpec {
        account_id: account.to_owned(),
        job_id: job.to_owned(),
        kind: match s.kind {
            KindArg::Inference => JobKind::Inference,
            KindArg::FineTune => JobKind::FineTune,
            KindArg::WorkflowStep => JobKind::WorkflowStep,
        },
        model: s.model.clone(),
        workflow_run_id: s.workflow_run.clone(),
        gpu: s.gpu.clone(),
    }
}

fn status(s: StatusArg) -> StopStatus {
    match s {
        StatusArg::Succeeded => StopStatus::Succeeded,
        StatusArg::Failed => StopStatus::Failed,
        StatusArg::Cancelled => StopStatus::Cancelled,
    }
}

const FLUSH: Duration = Duration::from_secs(30);

/// Runs `jobmeter emit …`; returns the process exit code.
pub fn main(cmd: EmitCmd) -> anyhow::Result<i32> {
    match cmd {
        EmitCmd::Start { target, job, start } => {
            let s = spec(&job.account, &job.job, &start);
            if let Some(p) = s.problem() {
                anyhow::bail!("{p}");
            }
            let e = emitter(&target, Duration::from_secs(10), false)?;
            e.emit(&s, EventType::Started)?;
            e.flush(FLUSH)?;
        }
        EmitCmd::Heartbeat { target, job, seq } => {
            let e = emitter(&target, Duration::from_secs(10), false)?;
            let s = JobSpec::fine_tune(&job.account, &job.job);
            let n = seq.unwrap_or_else(|| Timestamp::now().0.max(0) as u64);
            e.emit(&s, EventType::Heartbeat(n))?;
            e.flush(FLUSH)?;
        }
        EmitCmd::Stop {
            target,
            job,
            status: st,
        } => {
            let e = emitter(&target, Duration::from_secs(10), false)?;
            e.emit(
                &JobSpec::fine_tune(&job.account, &job.job),
                EventType::Stopped(status(st)),
            )?;
            e.flush(FLUSH)?;
        }
        EmitCmd::Run {
            target,
            account,
            job,
            start,
            heartbeat,
            kill_after,
            command,
        } => {
            let timing = (
                Duration::from_millis(heartbeat.max(1) as u64),
                Duration::from_millis(kill_after.max(0) as u64),
            );
            return run(&target, &account, job, &start, timing, &command);
        }
    }
    Ok(0)
}

/// How a wrapped command's wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// It exited by itself.
    Exited,
    /// This process was asked to stop.
    Interrupted,
    /// The meter sent the job a `job.stop`.
    StopCommand,
}

fn run(
    target: &Target,
    account: &str,
    job: Option<String>,
    start: &StartArgs,
    (heartbeat, kill_after): (Duration, Duration),
    command: &[String],
) -> anyhow::Result<i32> {
    let job = job.unwrap_or_else(|| {
        let ms = Timestamp::now().0;
        format!("{}-{}-{ms}", crate::tools::hostname(), std::process::id())
    });
    let s = spec(account, &job, start);
    if let Some(p) = s.problem() {
        anyhow::bail!("{p}");
    }
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no command given after --"))?;
    let e = emitter(target, heartbeat, true)?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .spawn()
        .map_err(|err| anyhow::anyhow!("cannot run {program:?}: {err}"))?;
    eprintln!("jobmeter emit: job {job} started ({program}, pid {})", child.id());
    let guard = e.start(s)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ended = rt.block_on(async {
        let signalled = jobmeter_service::signals::shutdown_requested();
        tokio::pin!(signalled);
        loop {
            tokio::select! {
                _ = &mut signalled => return Ended::Interrupted,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if !matches!(child.try_wait(), Ok(None)) {
                        return Ended::Exited;
                    }
                    if guard.cancelled() {
                        return Ended::StopCommand;
                    }
                }
            }
        }
    });
    if ended != Ended::Exited {
        if let Some(c) = guard.cancellation().command() {
            eprintln!(
                "jobmeter emit: job {job}: the meter sent job.stop ({}); stopping the command",
                c.reason
            );
        }
        // Pass the stop on; a command that outlives the grace is killed.
        signal(child.id(), "TERM");
        let deadline = std::time::Instant::now() + kill_after;
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("jobmeter emit: job {job}: still running {kill_after:?} after SIGTERM; sending SIGKILL");
            signal(child.id(), "KILL");
        }
    }
    let exit = child.wait()?;
    let st = match (ended, exit.success()) {
        (Ended::Interrupted | Ended::StopCommand, _) => StopStatus::Cancelled,
        (Ended::Exited, true) => StopStatus::Succeeded,
        (Ended::Exited, false) => StopStatus::Failed,
    };
    guard.finish(st)?;
    e.flush(FLUSH)?;
    eprintln!("jobmeter emit: job {job} {}", st.as_str());
    Ok(exit.code().unwrap_or(if ended == Ended::Exited { 1 } else { 130 }))
}

/// Sends `SIG<name>` to `pid`.
fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}
