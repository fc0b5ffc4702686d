//! An example GPU worker: takes jobs from a queue (here, a fixed list),
//! runs each inside a job guard, and lets the guard report start,
//! heartbeats and stop to jobmeter. Between steps of its work it checks
//! whether the meter has told the job to stop (the account's credits or
//! spend limit are used up) and, if so, stops and reports `cancelled`.
//!
//! ```sh
//! cargo run -p jobmeter-emit --example worker -- --brokers 127.0.0.1:9092 --account acct-0001
//! ```

use clap::Parser;
use jobmeter_emit::{Cancellation, Emitter, EmitterConfig, JobSpec, StopStatus};
use std::time::Duration;

#[derive(Debug, Parser)]
struct Args {
    /// Kafka brokers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Topic prefix of the meter.
    #[arg(long, default_value = "jobmeter")]
    topic_prefix: String,
    /// The account the jobs bill to.
    #[arg(long, default_value = "acct-0001")]
    account: String,
    /// Jobs to run.
    #[arg(long, default_value_t = 3)]
    jobs: u32,
}

/// How a job's work ended.
enum Outcome {
    Done,
    Failed(String),
    Stopped(String),
}

/// Stands in for the real work, in steps: succeeds, except every third job
/// fails; gives up between steps when the job is told to stop.
fn generate_image(n: u32, stop: &Cancellation) -> Outcome {
    for _step in 0..(7 + 3 * (n % 3)) {
        // Waiting on the cancellation doubles as the step's work here.
        if stop.wait(Duration::from_millis(100)) {
            let reason = stop.command().map(|c| c.reason).unwrap_or_default();
            return Outcome::Stopped(reason);
        }
    }
    if n % 3 == 2 {
        Outcome::Failed("CUDA out of memory".into())
    } else {
        Outcome::Done
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let node = std::env::var("HOSTNAME").unwrap_or_else(|_| "example-node".into());
    let mut cfg =
        EmitterConfig::new(&args.brokers, format!("gpu-worker/example/{node}")).with_prefix(&args.topic_prefix);
    cfg.heartbeat_interval = Duration::from_millis(500);
    let emitter = Emitter::new(cfg)?;
    let run = std::process::id();
    for n in 0..args.jobs {
        let job_id = format!("example-{run}-{n}");
        let job = emitter.start(JobSpec::inference(&args.account, &job_id, "sdxl-1.0").gpu("A100-80GB"))?;
        // `?` or a panic inside the job would still send a stop: the guard
        // sends `cancelled` (or `failed` while panicking) when dropped.
        let status = match generate_image(n, &job.cancellation()) {
            Outcome::Done => StopStatus::Succeeded,
            Outcome::Failed(e) => {
                eprintln!("{job_id}: {e}");
                StopStatus::Failed
            }
            Outcome::Stopped(reason) => {
                eprintln!("{job_id}: stopped by the meter ({reason})");
                StopStatus::Cancelled
            }
        };
        job.finish(status)?;
        println!("{job_id}: {}", status.as_str());
    }
    emitter.flush(Duration::from_secs(10))?;
    Ok(())
}
