//! `jobmeter emit`: lifecycle events from the shell, for workers that are
//! scripts. `emit run -- CMD…` wraps a command: start, heartbeats while it
//! runs, and a stop whose status is the command's outcome (succeeded on
//! exit 0, failed otherwise, cancelled when interrupted).

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
        #[arg(long, default_value = "10s", value_parser = crate::args::parse_duration)]
        heartbeat: i64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn emitter(t: &Target, heartbeat: Duration) -> anyhow::Result<Emitter> {
    let mut cfg = EmitterConfig::new(
        &t.brokers,
        t.source
            .clone()
            .unwrap_or_else(|| format!("jobmeter-emit/{}", crate::tools::hostname())),
    );
    cfg.topic = format!("{}.job-events", t.topic_prefix);
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
            let e = emitter(&target, Duration::from_secs(10))?;
            e.emit(&s, EventType::Started)?;
            e.flush(FLUSH)?;
        }
        EmitCmd::Heartbeat { target, job, seq } => {
            let e = emitter(&target, Duration::from_secs(10))?;
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
            let e = emitter(&target, Duration::from_secs(10))?;
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
            command,
        } => return run(&target, &account, job, &start, heartbeat, &command),
    }
    Ok(0)
}

fn run(
    target: &Target,
    account: &str,
    job: Option<String>,
    start: &StartArgs,
    heartbeat_ms: i64,
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
    let e = emitter(target, Duration::from_millis(heartbeat_ms.max(1) as u64))?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .spawn()
        .map_err(|err| anyhow::anyhow!("cannot run {program:?}: {err}"))?;
    eprintln!("jobmeter emit: job {job} started ({program}, pid {})", child.id());
    let guard = e.start(s)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let interrupted = rt.block_on(async {
        let signalled = crate::signals::shutdown_requested();
        tokio::pin!(signalled);
        loop {
            tokio::select! {
                _ = &mut signalled => return true,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if !matches!(child.try_wait(), Ok(None)) {
                        return false;
                    }
                }
            }
        }
    });
    if interrupted {
        // Pass the interruption on and wait for the command to end.
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    let exit = child.wait()?;
    let st = match (interrupted, exit.success()) {
        (true, _) => StopStatus::Cancelled,
        (false, true) => StopStatus::Succeeded,
        (false, false) => StopStatus::Failed,
    };
    guard.finish(st)?;
    e.flush(FLUSH)?;
    eprintln!("jobmeter emit: job {job} {}", st.as_str());
    Ok(exit.code().unwrap_or(if interrupted { 130 } else { 1 }))
}
