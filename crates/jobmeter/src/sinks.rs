//! Writing output events to files: JSON lines, or CSV for spreadsheets.

use jobmeter_core::{Charge, LimitEvent, Output, Rejected, Statement};
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

/// The four output files of a replay.
#[derive(Debug)]
pub struct OutputFiles {
    format: Format,
    charges: BufWriter<File>,
    limits: BufWriter<File>,
    statements: BufWriter<File>,
    rejects: BufWriter<File>,
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv_row(w: &mut impl Write, fields: &[String]) -> std::io::Result<()> {
    let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    writeln!(w, "{}", row.join(","))
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
    /// Creates `dir` and the four files in it (truncating old ones).
    pub fn create(dir: &Path, format: Format) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ext = match format {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        };
        let open =
            |name: &str| File::create(dir.join(format!("{name}.{ext}"))).map(|f| BufWriter::with_capacity(1 << 20, f));
        let mut files = OutputFiles {
            format,
            charges: open("charges")?,
            limits: open("limits")?,
            statements: open("statements")?,
            rejects: open("rejects")?,
        };
        if format == Format::Csv {
            let h = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
            csv_row(&mut files.charges, &h("charge_id,account_id,job_id,kind,model,workflow_run_id,status,started_at,stopped_at,duration_ms,billable_seconds,rate_per_second,rate_card_version,amount,amount_due,currency,period,service_period,adjusts"))?;
            csv_row(&mut files.limits, &h("event_id,account_id,plan,period,limit,threshold_pct,limit_value,usage_value,unit,triggered_by_job,at,action"))?;
            csv_row(&mut files.statements, &h("account_id,period,plan,kind,model,jobs,billable_seconds,average_duration_seconds,amount,subscription_fee,credits_applied,included_usage,total_due,currency"))?;
            csv_row(
                &mut files.rejects,
                &h("reason,detail,origin_topic,origin_partition,origin_offset,raw"),
            )?;
        }
        Ok(files)
    }

    /// Writes outputs, each to its file.
    pub fn write_all(&mut self, outputs: &[Output]) -> std::io::Result<()> {
        for o in outputs {
            match (self.format, o) {
                (Format::Jsonl, Output::Charge(c)) => json_line(&mut self.charges, c)?,
                (Format::Jsonl, Output::Limit(l)) => json_line(&mut self.limits, l)?,
                (Format::Jsonl, Output::Statement(s)) => json_line(&mut self.statements, s)?,
                (Format::Jsonl, Output::Reject(r)) => json_line(&mut self.rejects, &reject_json(r))?,
                (Format::Csv, Output::Charge(c)) => csv_charge(&mut self.charges, c)?,
                (Format::Csv, Output::Limit(l)) => csv_limit(&mut self.limits, l)?,
                (Format::Csv, Output::Statement(s)) => csv_statement(&mut self.statements, s)?,
                (Format::Csv, Output::Reject(r)) => csv_row(
                    &mut self.rejects,
                    &[
                        r.reason.as_str().to_owned(),
                        r.detail.clone(),
                        opt(&r.origin.as_ref().map(|o| o.topic.clone())),
                        opt(&r.origin.as_ref().map(|o| o.partition)),
                        opt(&r.origin.as_ref().map(|o| o.offset)),
                        String::from_utf8_lossy(&r.raw).into_owned(),
                    ],
                )?,
            }
        }
        Ok(())
    }

    /// Flushes every file.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.charges.flush()?;
        self.limits.flush()?;
        self.statements.flush()?;
        self.rejects.flush()
    }
}

fn json_line<T: serde::Serialize>(w: &mut impl Write, v: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")
}

fn csv_charge(w: &mut impl Write, c: &Charge) -> std::io::Result<()> {
    csv_row(
        w,
        &[
            c.charge_id.clone(),
            c.account_id.to_string(),
            c.job_id.to_string(),
            c.kind.as_str().to_owned(),
            opt(&c.model),
            opt(&c.workflow_run_id),
            enum_str(&c.status),
            c.started_at.to_string(),
            c.stopped_at.to_string(),
            c.duration_ms.to_string(),
            c.billable_seconds.to_string(),
            c.rate_per_second.to_string(),
            c.rate_card_version.clone(),
            c.amount.to_string(),
            c.amount_due.to_string(),
            c.currency.clone(),
            c.period.to_string(),
            c.service_period.to_string(),
            opt(&c.adjusts),
        ],
    )
}

fn csv_limit(w: &mut impl Write, l: &LimitEvent) -> std::io::Result<()> {
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
        ],
    )
}

fn csv_statement(w: &mut impl Write, s: &Statement) -> std::io::Result<()> {
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
