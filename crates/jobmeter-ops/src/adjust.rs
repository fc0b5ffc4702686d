//! `jobmeter adjust`: writes pricing adjustments (price overrides, their
//! early ends, job refunds) to the adjustments topic from a shell, each
//! checked first as the meter will check it. Nothing is written when any record is refused.

use jobmeter_service::adjustments::Writer;
use jobmeter_service::KafkaArgs;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

/// `jobmeter adjust`.
#[derive(Debug, clap::Args)]
pub struct AdjustCmd {
    /// Adjustment records, one JSON document per line (`-`: standard
    /// input); blank lines are skipped.
    pub file: PathBuf,
    /// How to reach Kafka and the topic prefix (the meter's configuration).
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The rate card a selector's model is checked against (default: the
    /// configuration's `billing.rate_card`).
    #[arg(long)]
    pub rate_card: Option<PathBuf>,
    /// Check the records only; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Why `jobmeter adjust` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum AdjustError {
    /// Records were refused (one line each).
    #[error("{} of {total} records refused; nothing written:\n{}", .refused.len(), .refused.join("\n"))]
    Refused {
        /// `line N: reason: detail`, per refused record.
        refused: Vec<String>,
        /// Records read.
        total: usize,
    },
    /// The adjustments topic does not exist.
    #[error("topic {0} does not exist: start the meter once (it creates its topics) or create it")]
    NoTopic(String),
}

/// Runs `jobmeter adjust`.
pub fn main(cmd: AdjustCmd) -> anyhow::Result<()> {
    let cfg = cmd.kafka.load()?;
    let rates = Arc::new(jobmeter_offline::replay::load_rate_card(
        cmd.rate_card.as_ref().unwrap_or(&cfg.billing.rate_card),
    )?);
    let lines = read_lines(&cmd.file)?;
    let topics = jobmeter_kafka::topics::Topics::with_prefix(&cfg.topics.prefix);
    let settings = cfg.kafka_settings();
    let writer = Writer::new(&settings, topics.adjustments.clone(), rates)?;
    let mut checked = Vec::new();
    let mut refused = Vec::new();
    for (n, line) in &lines {
        match writer.check(line.as_bytes()) {
            Ok(a) => checked.push((a, line)),
            Err(inv) => refused.push(format!("line {n}: {}: {}", inv.reason.as_str(), inv.detail)),
        }
    }
    if !refused.is_empty() {
        return Err(AdjustError::Refused {
            refused,
            total: lines.len(),
        }
        .into());
    }
    if cmd.dry_run {
        println!("{} records checked; nothing written (--dry-run)", checked.len());
        return Ok(());
    }
    if jobmeter_kafka::topics::partition_count(&settings, writer.topic())? == 0 {
        return Err(AdjustError::NoTopic(writer.topic().to_owned()).into());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for (a, line) in &checked {
        let (partition, offset) = rt.block_on(writer.write(a, line.as_bytes()))?;
        println!(
            "{} {} {} written to {} partition {partition} offset {offset}",
            a.account_id,
            a.adjustment_id,
            a.kind(),
            writer.topic()
        );
    }
    println!(
        "{} adjustments written; the meter applies each as it reads it (one it refuses, such as an id used before with other content, goes to {} with the reason)",
        checked.len(),
        topics.dlq
    );
    Ok(())
}

/// The non-blank lines of `file` (`-`: standard input), numbered from 1.
fn read_lines(file: &PathBuf) -> anyhow::Result<Vec<(usize, String)>> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
        ))
    };
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if !line.trim().is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}
