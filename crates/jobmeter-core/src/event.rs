//! Input: job lifecycle CloudEvents (structured JSON mode) and their
//! validation into typed [`JobEvent`]s, with a machine-readable
//! [`RejectReason`] for everything refused.

use crate::money::{AccountId, JobId, ModelId};
use crate::time::Timestamp;
use crate::wire::RawEvent;
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
    /// The event's `time` is implausible: outside [`EVENT_TIME_MIN`,
    /// [`EVENT_TIME_MAX`]), too far ahead of its Kafka record's timestamp,
    /// or older than the duplicate-detection window allows.
    TimeOutOfRange,
    /// A field's value is outside what it may be: a negative multiplier,
    /// an amount that is not a decimal, a window that ends before it
    /// starts (adjustments).
    InvalidValue,
    /// A `job_refund` names a job the meter does not remember for the
    /// account (never seen, or forgotten after `meter.retention`).
    UnknownJob,
}

impl RejectReason {
    /// Every reason, for metrics registries and docs.
    pub const ALL: [RejectReason; 12] = [
        RejectReason::NotJson,
        RejectReason::SchemaViolation,
        RejectReason::UnknownType,
        RejectReason::UnknownKind,
        RejectReason::UnknownModel,
        RejectReason::NegativeDuration,
        RejectReason::DurationTooLong,
        RejectReason::Conflict,
        RejectReason::StopWithoutStart,
        RejectReason::TimeOutOfRange,
        RejectReason::InvalidValue,
        RejectReason::UnknownJob,
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
            RejectReason::TimeOutOfRange => "time_out_of_range",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::UnknownJob => "unknown_job",
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

/// The longest identifier accepted, in bytes of UTF-8: `id`, `source`,
/// `subject`, `data.account_id`, `data.model`, `data.workflow_run_id` and
/// `data.gpu`. A longer one is refused (`schema_violation` naming the
/// field), never truncated: two ids that differ only past a cut would
/// otherwise bill as one.
pub const MAX_ID_BYTES: usize = 256;

/// The earliest event time accepted, whatever the record's timestamp:
/// 2000-01-01T00:00:00Z.
pub const EVENT_TIME_MIN: Timestamp = Timestamp(946_684_800_000);

/// The first event time refused, whatever the record's timestamp:
/// 2100-01-01T00:00:00Z. With every configured duration at most
/// [`crate::time::MAX_DURATION_MS`], every deadline the meter derives from
/// an event time (orphan timeout, retention, a period's close plus grace)
/// stays far inside what the state codec and the calendar handle.
pub const EVENT_TIME_MAX: Timestamp = Timestamp(4_102_444_800_000);

/// Refuses a time outside [`EVENT_TIME_MIN`, `EVENT_TIME_MAX`).
pub(crate) fn in_range(time: Timestamp, field: &str) -> Result<Timestamp, Invalid> {
    if time < EVENT_TIME_MIN || time >= EVENT_TIME_MAX {
        return Err(Invalid::new(
            RejectReason::TimeOutOfRange,
            format!("`{field}` {time} is outside the accepted range [{EVENT_TIME_MIN}, {EVENT_TIME_MAX})"),
        ));
    }
    Ok(time)
}

/// Refuses an identifier longer than [`MAX_ID_BYTES`].
pub(crate) fn bounded<'a>(value: &'a str, field: &str) -> Result<&'a str, Invalid> {
    if value.len() > MAX_ID_BYTES {
        return Err(Invalid::new(
            RejectReason::SchemaViolation,
            format!(
                "`{field}` is {} bytes long; at most {MAX_ID_BYTES} are accepted",
                value.len()
            ),
        ));
    }
    Ok(value)
}

/// Refuses an account id that [`bounded`] refuses, one that starts or ends
/// with white space, and one with a control character: `" acct-1 "` would
/// otherwise bill as another customer than `"acct-1"` (a worker's
/// formatting bug creating a phantom account). White space inside is kept.
pub(crate) fn account_id<'a>(value: &'a str, field: &str) -> Result<&'a str, Invalid> {
    let value = bounded(value, field)?;
    let edge = |c: Option<char>| c.is_some_and(char::is_whitespace);
    if edge(value.chars().next()) || edge(value.chars().next_back()) {
        return Err(Invalid::new(
            RejectReason::SchemaViolation,
            format!("`{field}` {value:?} starts or ends with white space"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Invalid::new(
            RejectReason::SchemaViolation,
            format!("`{field}` {value:?} holds the control character {c:?}"),
        ));
    }
    Ok(value)
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

/// The idempotency key of an input event: a 128-bit fingerprint of its
/// CloudEvents `(source, id)`.
///
/// Stored instead of the strings to keep the dedup index and the state
/// small and allocation-free. The function is fixed here (not `std`'s
/// unspecified hasher), so stored keys stay valid across releases; with 128
/// bits the chance that two distinct ids collide is negligible (about
/// n²/2¹²⁹ for n ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey(pub u128);

impl EventKey {
    /// The fingerprint of `(source, id)`.
    pub fn of(source: &str, id: &str) -> EventKey {
        // Two independent 64-bit lanes over the length-prefixed fields,
        // each word mixed with a multiply-xorshift and finished with the
        // MurmurHash3 avalanche (fmix64).
        let mut a: u64 = 0x243f_6a88_85a3_08d3;
        let mut b: u64 = 0x1319_8a2e_0370_7344;
        let mut feed = |w: u64| {
            a = (a ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            a ^= a >> 29;
            b = (b ^ w.rotate_left(31)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
            b ^= b >> 32;
        };
        for field in [source.as_bytes(), id.as_bytes()] {
            feed(field.len() as u64);
            let mut chunks = field.chunks_exact(8);
            for c in &mut chunks {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                feed(u64::from_le_bytes(w));
            }
            let rest = chunks.remainder();
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            feed(u64::from_le_bytes(w) ^ 0xff);
        }
        let fmix = |mut k: u64| {
            k ^= k >> 33;
            k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
            k ^= k >> 33;
            k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
            k ^ (k >> 33)
        };
        EventKey((u128::from(fmix(a)) << 64) | u128::from(fmix(b ^ a.rotate_left(17))))
    }
}

impl Serialize for EventKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for EventKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        u128::from_str_radix(&s, 16)
            .map(EventKey)
            .map_err(|_| serde::de::Error::custom(format!("invalid event key {s:?}")))
    }
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
    /// Idempotency key (zero for heartbeats, which the meter deduplicates
    /// by time instead).
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

fn optional(v: &Option<Cow<'_, str>>, field: &str) -> Result<Option<String>, Invalid> {
    match v.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Ok(Some(bounded(s, field)?.to_owned())),
        None => Ok(None),
    }
}

/// Parses and validates one job lifecycle event.
///
/// Never panics, whatever the bytes. Checks everything that can be checked
/// without state (`unknown_model` needs the rate card, so the meter checks it).
pub fn parse_job_event(bytes: &[u8]) -> Result<JobEvent, Invalid> {
    match crate::fastjson::scan(bytes) {
        Some(raw) => validate(raw, None),
        None => parse_job_event_reference(bytes),
    }
}

/// [`parse_job_event`], sharing account ids through `ids`: the same event,
/// without a new allocation for an account seen before.
pub fn parse_job_event_with(bytes: &[u8], ids: &mut AccountIds) -> Result<JobEvent, Invalid> {
    match crate::fastjson::scan(bytes) {
        Some(raw) => validate(raw, Some(ids)),
        None => parse_job_event_reference(bytes),
    }
}

/// The account ids of recent events, shared: every event of an account
/// parsed through one of these carries the same id (a reference count, not
/// a copy; equal ids then compare by pointer first). Bounded: when
/// [`AccountIds::MAX`] different ids are held it starts again empty, so
/// events naming ever new accounts cost memory only up to that.
#[derive(Debug, Default)]
pub struct AccountIds(crate::fasthash::FastSet<AccountId>);

impl AccountIds {
    /// The most ids held at once.
    pub const MAX: usize = 1 << 16;

    /// The id spelled `s`.
    pub fn get(&mut self, s: &str) -> AccountId {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        let a = AccountId::from(s);
        self.0.insert(a.clone());
        a
    }

    /// How many ids are held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// [`parse_job_event`] through serde_json only: the reference the fast path
/// is checked against.
pub fn parse_job_event_reference(bytes: &[u8]) -> Result<JobEvent, Invalid> {
    let raw: RawEvent<'_> = serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            // The wrong shape — unless the bytes are not a JSON document at
            // all (serde stops at the first type mismatch, before it would
            // see that, say, 100,000 brackets never close).
            Category::Data => match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => Invalid::new(RejectReason::SchemaViolation, e.to_string()),
                Err(not_json) => Invalid::new(RejectReason::NotJson, not_json.to_string()),
            },
            _ => Invalid::new(RejectReason::NotJson, e.to_string()),
        }
    })?;
    validate(raw, None)
}

fn validate(raw: RawEvent<'_>, ids: Option<&mut AccountIds>) -> Result<JobEvent, Invalid> {
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
    let id = bounded(required(&raw.id, "id")?, "id")?;
    let source = bounded(required(&raw.source, "source")?, "source")?;
    let ty = required(&raw.ty, "type")?;
    let time = required(&raw.time, "time")?;
    let time =
        Timestamp::parse(time).map_err(|e| Invalid::new(RejectReason::SchemaViolation, format!("`time`: {e}")))?;
    let time = in_range(time, "time")?;
    let subject = bounded(required(&raw.subject, "subject")?, "subject")?;
    let data = raw
        .data
        .as_ref()
        .ok_or_else(|| Invalid::new(RejectReason::SchemaViolation, "`data` is missing"))?;
    let account = account_id(required(&data.account_id, "data.account_id")?, "data.account_id")?;
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
                JobKind::FineTune => optional(&data.model, "data.model")?.map(ModelId::from),
                _ => Some(ModelId::from(bounded(
                    required(&data.model, "data.model")?,
                    "data.model",
                )?)),
            };
            let workflow_run_id = match kind {
                JobKind::WorkflowStep => Some(
                    bounded(
                        required(&data.workflow_run_id, "data.workflow_run_id")?,
                        "data.workflow_run_id",
                    )?
                    .to_owned(),
                ),
                _ => optional(&data.workflow_run_id, "data.workflow_run_id")?,
            };
            EventBody::Started(StartInfo {
                kind,
                model,
                workflow_run_id,
                gpu: optional(&data.gpu, "data.gpu")?,
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
        // Heartbeats are deduplicated by time, not by id: skip the hash.
        key: if matches!(body, EventBody::Heartbeat) {
            EventKey(0)
        } else {
            EventKey::of(source, id)
        },
        time,
        job: JobId::from(subject),
        account: match ids {
            Some(ids) => ids.get(account),
            None => AccountId::from(account),
        },
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
    fn shared_account_ids_parse_the_same_events() {
        let mut ids = AccountIds::default();
        let a = parse_job_event_with(EXAMPLE.as_bytes(), &mut ids);
        let b = parse_job_event_with(EXAMPLE.replace("w17-000042", "w17-000043").as_bytes(), &mut ids);
        let (Ok(a), Ok(b)) = (a, b) else {
            panic!("the example parses")
        };
        assert_eq!(Ok(a.clone()), parse_job_event(EXAMPLE.as_bytes()));
        assert!(std::sync::Arc::ptr_eq(&a.account.0, &b.account.0));
        assert_eq!(ids.len(), 1);
        // Bad events are refused the same way.
        for bad in ["{}", "[", r#"{"specversion":"1.0"}"#] {
            assert_eq!(
                parse_job_event_with(bad.as_bytes(), &mut ids).err(),
                parse_job_event(bad.as_bytes()).err()
            );
        }
    }

    #[test]
    fn shared_account_ids_are_bounded() {
        let mut ids = AccountIds::default();
        for i in 0..AccountIds::MAX + 10 {
            let a = ids.get(&format!("acct-{i}"));
            assert_eq!(a.as_str(), format!("acct-{i}"));
        }
        // Started again empty at the bound: the last 10 are held.
        assert_eq!(ids.len(), 10);
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
    fn event_keys_separate_fields_and_round_trip() {
        assert_ne!(EventKey::of("ab", "c"), EventKey::of("a", "bc"));
        assert_ne!(EventKey::of("w-1", "000000001"), EventKey::of("w-1", "000000002"));
        assert_eq!(EventKey::of("s", "i"), EventKey::of("s", "i"));
        let k = EventKey::of("gpu-worker/us-east-1/node-17", "w17-000042");
        let json = serde_json::to_string(&k).unwrap_or_default();
        assert_eq!(serde_json::from_str::<EventKey>(&json).ok(), Some(k));
        // Pinned: stored state depends on this function never changing.
        assert_eq!(json, "\"ad50c30be537aeb6ccf44f1363902865\"");
    }

    #[test]
    fn hostile_documents_are_refused_without_harm() {
        let deep = "[".repeat(100_000);
        assert_eq!(reason(&deep), Some(RejectReason::NotJson));
        let deep_obj = format!("{}{}", r#"{"a":"#.repeat(50_000), "1");
        assert_eq!(reason(&deep_obj), Some(RejectReason::NotJson));
        assert_eq!(reason("null"), Some(RejectReason::SchemaViolation));
        assert_eq!(reason("\"job.started\""), Some(RejectReason::SchemaViolation));
        assert_eq!(
            reason(&EXAMPLE.replace("2024-05-01", "2024-13-01")),
            Some(RejectReason::SchemaViolation)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("2024-05-01", "9999-12-31")),
            Some(RejectReason::TimeOutOfRange)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("2024-05-01", "1999-12-31")),
            Some(RejectReason::TimeOutOfRange)
        );
        assert_eq!(
            reason(&EXAMPLE.replace("2024-05-01T12:00:00.250Z", "2099-12-31T23:59:59.999Z")),
            None
        );
        // A number no float can hold, in a field nobody reads: both parsers
        // agree on what to do with it.
        for huge in [r#""weight":1e999999,"#, r#""weight":-1e-999999,"#] {
            let doc = EXAMPLE.replace(r#""gpu":"A100-80GB""#, &format!(r#"{huge}"gpu":"A100-80GB""#));
            let fast = parse_job_event(doc.as_bytes()).map_err(|e| e.reason);
            let reference = parse_job_event_reference(doc.as_bytes()).map_err(|e| e.reason);
            assert_eq!(fast, reference, "{doc}");
        }
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
