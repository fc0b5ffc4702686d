//! Input: job lifecycle CloudEvents (structured JSON mode) and their
//! validation into typed [`JobEvent`]s, with a machine-readable
//! [`RejectReason`] for everything refused.

use crate::money::{AccountId, JobId, ModelId};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// Why an input was refused. The `as_str` form is what the DLQ header
/// `jobmeter.reason` and the replay rejects file carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The bytes are not a JSON document.
    NotJson,
    /// JSON, but a required field is missing, empty or of the wrong type.
    SchemaViolation,
    /// `type` is not one of the job lifecycle types.
    UnknownType,
    /// `data.kind` is not inference, fine_tune or workflow_step.
    UnknownKind,
    /// The model is not in the rate-card version in force at job start.
    UnknownModel,
    /// The stop is earlier than the start.
    NegativeDuration,
    /// The job is longer than the configured maximum.
    DurationTooLong,
    /// A second, different start or stop for a job that already has one.
    Conflict,
    /// A stop whose start never arrived within the orphan timeout.
    StopWithoutStart,
}

impl RejectReason {
    /// Every reason, for metrics registries and docs.
    pub const ALL: [RejectReason; 9] = [
        RejectReason::NotJson,
        RejectReason::SchemaViolation,
        RejectReason::UnknownType,
        RejectReason::UnknownKind,
        RejectReason::UnknownModel,
        RejectReason::NegativeDuration,
        RejectReason::DurationTooLong,
        RejectReason::Conflict,
        RejectReason::StopWithoutStart,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotJson => "not_json",
            RejectReason::SchemaViolation => "schema_violation",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::UnknownKind => "unknown_kind",
            RejectReason::UnknownModel => "unknown_model",
            RejectReason::NegativeDuration => "negative_duration",
            RejectReason::DurationTooLong => "duration_too_long",
            RejectReason::Conflict => "conflict",
            RejectReason::StopWithoutStart => "stop_without_start",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused input with its reason and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// What exactly was wrong (field names, values).
    pub detail: String,
}

impl Invalid {
    pub(crate) fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Invalid {
            reason,
            detail: detail.into(),
        }
    }
}

/// What kind of work a job is; decides its rate and which limits it counts toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A model API call, billed at the model's per-second price.
    Inference,
    /// Fine-tuning, billed at the flat fine-tune rate.
    FineTune,
    /// One step of a workflow run, billed at its model's price.
    WorkflowStep,
}

impl JobKind {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Inference => "inference",
            JobKind::FineTune => "fine_tune",
            JobKind::WorkflowStep => "workflow_step",
        }
    }

    /// Every kind, for metrics registries.
    pub const ALL: [JobKind; 3] = [JobKind::Inference, JobKind::FineTune, JobKind::WorkflowStep];
}

/// How a job ended. `Orphaned` is set by the meter, never accepted as input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Finished normally.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled by the user or platform.
    Cancelled,
    /// Closed by the meter after the orphan timeout.
    Orphaned,
}

/// The idempotency key of an input event: CloudEvents `(source, id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventKey {
    /// CloudEvents `source`.
    pub source: std::sync::Arc<str>,
    /// CloudEvents `id`.
    pub id: std::sync::Arc<str>,
}

/// The fields of a `job.started` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInfo {
    /// Inference, fine-tune or workflow step.
    pub kind: JobKind,
    /// The model (absent for fine-tunes that name none).
    pub model: Option<ModelId>,
    /// The workflow run a step belongs to.
    pub workflow_run_id: Option<String>,
    /// GPU class, informational only.
    pub gpu: Option<String>,
}

/// What happened to the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// `job.started`.
    Started(StartInfo),
    /// `job.heartbeat`.
    Heartbeat,
    /// `job.stopped`.
    Stopped(JobStatus),
}

/// A validated job lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// Idempotency key.
    pub key: EventKey,
    /// Event time.
    pub time: Timestamp,
    /// The job (`subject`).
    pub job: JobId,
    /// The account billed.
    pub account: AccountId,
    /// The lifecycle step.
    pub body: EventBody,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow, default)]
    specversion: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<RawData<'a>>,
}

#[derive(Deserialize)]
struct RawData<'a> {
    #[serde(borrow, default)]
    account_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    workflow_run_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    gpu: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
}

fn required<'a>(v: &'a Option<Cow<'a, str>>, field: &str) -> Result<&'a str, Invalid> {
    match v.as_deref() {
        Some(s) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err(Invalid::new(
            RejectReason::SchemaViolation,
            format!("`{field}` is empty"),
        )),
        None => Err(Invalid::new(
            RejectReason::SchemaViolation,
            format!("`{field}` is missing"),
        )),
    }
}

fn optional(v: &Option<Cow<'_, str>>) -> Option<String> {
    v.as_deref().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Parses and validates one job lifecycle event.
///
/// Never panics, whatever the bytes. Checks everything that can be checked
/// without state (`unknown_model` needs the rate card, so the meter checks it).
pub fn parse_job_event(bytes: &[u8]) -> Result<JobEvent, Invalid> {
    let raw: RawEvent<'_> = serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => Invalid::new(RejectReason::SchemaViolation, e.to_string()),
            _ => Invalid::new(RejectReason::NotJson, e.to_string()),
        }
    })?;
    match raw.specversion.as_deref() {
        Some("1.0") => {}
        Some(v) => {
            return Err(Invalid::new(
                RejectReason::SchemaViolation,
                format!("`specversion` is {v:?}, expected \"1.0\""),
            ))
        }
        None => return Err(Invalid::new(RejectReason::SchemaViolation, "`specversion` is missing")),
    }
    let id = required(&raw.id, "id")?;
    let source = required(&raw.source, "source")?;
    let ty = required(&raw.ty, "type")?;
    let time = required(&raw.time, "time")?;
    let time =
        Timestamp::parse(time).map_err(|e| Invalid::new(RejectReason::SchemaViolation, format!("`time`: {e}")))?;
    let subject = required(&raw.subject, "subject")?;
    let data = raw
        .data
        .as_ref()
        .ok_or_else(|| Invalid::new(RejectReason::SchemaViolation, "`data` is missing"))?;
    let account = required(&data.account_id, "data.account_id")?;
    let body = match ty {
        "job.started" => {
            let kind = match required(&data.kind, "data.kind")? {
                "inference" => JobKind::Inference,
                "fine_tune" => JobKind::FineTune,
                "workflow_step" => JobKind::WorkflowStep,
                other => {
                    return Err(Invalid::new(
                        RejectReason::UnknownKind,
                        format!("`data.kind` {other:?} is not inference, fine_tune or workflow_step"),
                    ))
                }
            };
            let model = match kind {
                JobKind::FineTune => optional(&data.model).map(ModelId::from),
                _ => Some(ModelId::from(required(&data.model, "data.model")?)),
            };
            let workflow_run_id = match kind {
                JobKind::WorkflowStep => Some(required(&data.workflow_run_id, "data.workflow_run_id")?.to_owned()),
                _ => optional(&data.workflow_run_id),
            };
            EventBody::Started(StartInfo {
                kind,
                model,
                workflow_run_id,
                gpu: optional(&data.gpu),
            })
        }
        "job.heartbeat" => EventBody::Heartbeat,
        "job.stopped" => EventBody::Stopped(match required(&data.status, "data.status")? {
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            other => {
                return Err(Invalid::new(
                    RejectReason::SchemaViolation,
                    format!("`data.status` {other:?} is not succeeded, failed or cancelled"),
                ))
            }
        }),
        other => {
            return Err(Invalid::new(
                RejectReason::UnknownType,
                format!("`type` {other:?} is not job.started, job.heartbeat or job.stopped"),
            ))
        }
    };
    Ok(JobEvent {
        key: EventKey {
            source: source.into(),
            id: id.into(),
        },
        time,
        job: JobId::from(subject),
        account: AccountId::from(account),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"specversion":"1.0","id":"w17-000042","source":"gpu-worker/us-east-1/node-17",
 "type":"job.started","time":"2024-05-01T12:00:00.250Z","subject":"job-123",
 "data":{"account_id":"acct-42","kind":"inference","model":"sdxl-1.0","gpu":"A100-80GB"}}"#;

    fn reason(s: &str) -> Option<RejectReason> {
        parse_job_event(s.as_bytes()).err().map(|e| e.reason)
    }

    #[test]
    fn parses_the_spec_example() {
        let e = parse_job_event(EXAMPLE.as_bytes());
        let e = match e {
            Ok(e) => e,
            Err(err) => panic!("{err:?}"),
        };
        assert_eq!(e.job.as_str(), "job-123");
        assert_eq!(e.account.as_str(), "acct-42");
        assert_eq!(e.time.to_string(), "2024-05-01T12:00:00.250Z");
        assert!(matches!(e.body, EventBody::Started(ref s) if s.kind == JobKind::Inference));
    }

    #[test]
    fn classifies_rejections() {
        assert_eq!(reason("{not json"), Some(RejectReason::NotJson));
        assert_eq!(reason(""), Some(RejectReason::NotJson));
        assert_eq!(reason("[1,2]"), Some(RejectReason::SchemaViolation));
        assert_eq!(
            reason(&EXAMPLE.replace("job.started", "job.paused")),
            Some(RejectReason::UnknownType)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("\"inference\"", "\"training\"")),
            Some(RejectReason::UnknownKind)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("\"subject\":\"job-123\",", "")),
            Some(RejectReason::SchemaViolation)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("2024-05-01T12", "2024-05-01X12")),
            Some(RejectReason::SchemaViolation)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("\"1.0\"", "\"0.3\"")),
            Some(RejectReason::SchemaViolation)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("\"acct-42\"", "42")),
            Some(RejectReason::SchemaViolation)
        );
        let step = EXAMPLE.replace("\"inference\"", "\"workflow_step\"");
        assert_eq!(reason(&step), Some(RejectReason::SchemaViolation));
        let ft = EXAMPLE.replace("\"inference\",\"model\":\"sdxl-1.0\"", "\"fine_tune\"");
        assert_eq!(reason(&ft), None);
    }
}
