//! Writing output events to files: JSON lines, or CSV for spreadsheets.

use jobmeter_core::{Charge, Command, LimitEvent, Output, Rejected, Statement};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// File format of replay outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// One JSON document per line (the Kafka payloads, byte for byte).
    #[default]
    Jsonl,
    /// Comma-separated values with a header row; statements one row per line item.
    Csv,
}

/// The output files of a replay.
#[derive(Debug)]
pub struct OutputFiles {
    charges: Sink,
    limits: Sink,
    statements: Sink,
    commands: Sink,
    rejects: Sink,
}

/// One output file in its format.
#[derive(Debug)]
enum Sink {
    Jsonl(BufWriter<File>),
    Csv(Box<csv::Writer<File>>),
}

impl Sink {
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Jsonl(w) => w.flush(),
            Sink::Csv(w) => w.flush(),
        }
    }
}

/// A CSV writer as every CSV file of jobmeter is written: RFC 4180
/// quoting (a field with a comma, quote, CR or LF is quoted, quotes
/// doubled), `\n` between records.
pub fn csv_writer<W: Write>(w: W) -> csv::Writer<W> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .buffer_capacity(1 << 16)
        .from_writer(w)
}

/// The JSON document of a reject: reason, detail, origin and the original
/// text (lossy only if the input was not UTF-8).
#[derive(Debug, serde::Serialize)]
pub struct RejectDoc<'a> {
    /// Machine-readable reason.
    pub reason: &'static str,
    /// What was wrong.
    pub detail: &'a str,
    /// Where the input came from.
    pub origin: &'a Option<jobmeter_core::Origin>,
    /// The original input.
    pub raw: std::borrow::Cow<'a, str>,
}

/// The reject document of `r`.
pub fn reject_json(r: &Rejected) -> RejectDoc<'_> {
    RejectDoc {
        reason: r.reason.as_str(),
        detail: &r.detail,
        origin: &r.origin,
        raw: String::from_utf8_lossy(&r.raw),
    }
}

fn csv_row<W: Write>(w: &mut csv::Writer<W>, fields: &[String]) -> std::io::Result<()> {
    Ok(w.write_record(fields)?)
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

impl OutputFiles {
    /// Creates `dir` and the five files in it (truncating old ones).
    pub fn create(dir: &Path, format: Format) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ext = match format {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        };
        // CSV files start with their header row.
        let open = |name: &str, header: &str| -> std::io::Result<Sink> {
            let f = File::create(dir.join(format!("{name}.{ext}")))?;
            Ok(match format {
                Format::Jsonl => Sink::Jsonl(BufWriter::with_capacity(1 << 20, f)),
                Format::Csv => {
                    let mut w = csv_writer(f);
                    w.write_record(header.split(','))?;
                    Sink::Csv(Box::new(w))
                }
            })
        };
        Ok(OutputFiles {
            charges: open("charges", "charge_id,account_id,job_id,kind,model,workflow_run_id,status,started_at,stopped_at,duration_ms,billable_seconds,rate_per_second,rate_card_version,amount,amount_due,currency,period,service_period,adjusts")?,
            limits: open("limits", "event_id,account_id,plan,period,limit,threshold_pct,limit_value,usage_value,unit,triggered_by_job,at,action,horizon_seconds,runway_seconds,burn_rate_per_second")?,
            statements: open("statements", "account_id,period,plan,kind,model,jobs,billable_seconds,average_duration_seconds,amount,subscription_fee,credits_applied,included_usage,total_due,currency")?,
            commands: open("commands", "command_id,type,account_id,job_id,reason,limit,at")?,
            rejects: open("rejects", "reason,detail,origin_topic,origin_partition,origin_offset,raw")?,
        })
    }

    /// Writes outputs, each to its file.
    pub fn write_all(&mut self, outputs: &[Output]) -> std::io::Result<()> {
        for o in outputs {
            match o {
                Output::Charge(c) => match &mut self.charges {
                    Sink::Jsonl(w) => json_line(w, c)?,
                    Sink::Csv(w) => csv_charge(w, c)?,
                },
                Output::Limit(l) => match &mut self.limits {
                    Sink::Jsonl(w) => json_line(w, l)?,
                    Sink::Csv(w) => csv_limit(w, l)?,
                },
                Output::Statement(s) => match &mut self.statements {
                    Sink::Jsonl(w) => json_line(w, s)?,
                    Sink::Csv(w) => csv_statement(w, s)?,
                },
                Output::Command(c) => match &mut self.commands {
                    Sink::Jsonl(w) => json_line(w, c)?,
                    Sink::Csv(w) => csv_command(w, c)?,
                },
                Output::Reject(r) => match &mut self.rejects {
                    Sink::Jsonl(w) => json_line(w, &reject_json(r))?,
                    Sink::Csv(w) => csv_row(
                        w,
                        &[
                            r.reason.as_str().to_owned(),
                            r.detail.clone(),
                            opt(&r.origin.as_ref().map(|o| o.topic.clone())),
                            opt(&r.origin.as_ref().map(|o| o.partition)),
                            opt(&r.origin.as_ref().map(|o| o.offset)),
                            String::from_utf8_lossy(&r.raw).into_owned(),
                        ],
                    )?,
                },
            }
        }
        Ok(())
    }

    /// Flushes every file.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.charges.flush()?;
        self.limits.flush()?;
        self.statements.flush()?;
        self.commands.flush()?;
        self.rejects.flush()
    }
}

fn json_line<T: serde::Serialize>(w: &mut impl Write, v: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")
}

fn csv_charge<W: Write>(w: &mut csv::Writer<W>, c: &Charge) -> std::io::Result<()> {
    csv_row(
        w,
        &[
            c.charge_id.clone(),
            c.account_id.to_string(),
            opt(&c.job_id),
            c.kind.as_str().to_owned(),
            opt(&c.model),
            opt(&c.workflow_run_id),
            c.status.as_ref().map(enum_str).unwrap_or_default(),
            c.started_at.to_string(),
            c.stopped_at.to_string(),
            c.duration_ms.to_string(),
            c.billable_seconds.to_string(),
            c.rate_per_second.to_string(),
            opt(&c.rate_card_version),
            c.amount.to_string(),
            c.amount_due.to_string(),
            c.currency.clone(),
            c.period.to_string(),
            c.service_period.to_string(),
            opt(&c.adjusts),
        ],
    )
}

fn csv_limit<W: Write>(w: &mut csv::Writer<W>, l: &LimitEvent) -> std::io::Result<()> {
    csv_row(
        w,
        &[
            l.event_id.clone(),
            l.account_id.to_string(),
            l.plan.as_str().to_owned(),
            l.period.to_string(),
            l.limit.as_str().to_owned(),
            opt(&l.threshold_pct),
            l.limit_value.to_string(),
            l.usage_value.to_string(),
            l.unit.clone(),
            l.triggered_by_job.to_string(),
            l.at.to_string(),
            enum_str(&l.action),
            opt(&l.horizon_seconds),
            opt(&l.runway_seconds),
            opt(&l.burn_rate_per_second),
        ],
    )
}

fn csv_command<W: Write>(w: &mut csv::Writer<W>, c: &Command) -> std::io::Result<()> {
    csv_row(
        w,
        &[
            c.command_id.clone(),
            enum_str(&c.kind),
            c.account_id.to_string(),
            c.job_id.to_string(),
            c.reason.clone(),
            c.limit.as_str().to_owned(),
            c.at.to_string(),
        ],
    )
}

fn csv_statement<W: Write>(w: &mut csv::Writer<W>, s: &Statement) -> std::io::Result<()> {
    let tail = [
        s.subscription_fee.to_string(),
        s.credits_applied.to_string(),
        s.included_usage.to_string(),
        s.total_due.to_string(),
        s.currency.clone(),
    ];
    let head = [
        s.account_id.to_string(),
        s.period.to_string(),
        s.plan.as_str().to_owned(),
    ];
    if s.lines.is_empty() {
        let row: Vec<String> = head
            .iter()
            .cloned()
            .chain(std::iter::repeat_n(String::new(), 6))
            .chain(tail.iter().cloned())
            .collect();
        return csv_row(w, &row);
    }
    for l in &s.lines {
        let mid = [
            l.kind.as_str().to_owned(),
            opt(&l.model),
            l.jobs.to_string(),
            l.billable_seconds.to_string(),
            l.average_duration_seconds.to_string(),
            l.amount.to_string(),
        ];
        let row: Vec<String> = head.iter().chain(mid.iter()).chain(tail.iter()).cloned().collect();
        csv_row(w, &row)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobmeter_core::RejectReason;

    #[test]
    fn csv_fields_with_separators_read_back_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let awkward = "a,b \"quoted\"\r\nnext line\rcr only";
        let mut files = OutputFiles::create(dir.path(), Format::Csv).expect("create");
        files
            .write_all(&[Output::Reject(Rejected {
                reason: RejectReason::NotJson,
                detail: awkward.to_owned(),
                raw: awkward.as_bytes().to_vec(),
                origin: None,
            })])
            .expect("write");
        files.finish().expect("finish");
        let mut r = csv::Reader::from_path(dir.path().join("rejects.csv")).expect("read");
        let rows: Vec<csv::StringRecord> = r.records().collect::<Result<_, _>>().expect("parse");
        assert_eq!(rows.len(), 1);
        assert_eq!(&rows[0][0], "not_json");
        assert_eq!(&rows[0][1], awkward);
        assert_eq!(&rows[0][5], awkward);
        let text = std::fs::read_to_string(dir.path().join("rejects.csv")).expect("text");
        assert!(text.starts_with("reason,detail,origin_topic,origin_partition,origin_offset,raw\n"));
    }
}
