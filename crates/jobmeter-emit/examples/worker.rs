//! An example GPU worker: takes jobs from a queue (here, a fixed list),
//! runs each inside a job guard, and lets the guard report start,
//! heartbeats and stop to jobmeter.
//!
//! ```sh
//! cargo run -p jobmeter-emit --example worker -- --brokers 127.0.0.1:9092 --account acct-0001
//! ```

use clap::Parser;
use jobmeter_emit::{Emitter, EmitterConfig, JobSpec, StopStatus};
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

/// Stands in for the real work: succeeds, except every third job fails.
fn generate_image(n: u32) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(700 + 300 * u64::from(n % 3)));
    if n % 3 == 2 {
        Err("CUDA out of memory".into())
    } else {
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let node = std::env::var("HOSTNAME").unwrap_or_else(|_| "example-node".into());
    let mut cfg = EmitterConfig::new(&args.brokers, format!("gpu-worker/example/{node}"));
    cfg.topic = format!("{}.job-events", args.topic_prefix);
    cfg.heartbeat_interval = Duration::from_millis(500);
    let emitter = Emitter::new(cfg)?;
    let run = std::process::id();
    for n in 0..args.jobs {
        let job_id = format!("example-{run}-{n}");
        let job = emitter.start(JobSpec::inference(&args.account, &job_id, "sdxl-1.0").gpu("A100-80GB"))?;
        // `?` or a panic inside the job would still send a stop: the guard
        // sends `cancelled` (or `failed` while panicking) when dropped.
        let status = match generate_image(n) {
            Ok(()) => StopStatus::Succeeded,
            Err(e) => {
                eprintln!("{job_id}: {e}");
                StopStatus::Failed
            }
        };
        job.finish(status)?;
        println!("{job_id}: {}", status.as_str());
    }
    emitter.flush(Duration::from_secs(10))?;
    Ok(())
}
