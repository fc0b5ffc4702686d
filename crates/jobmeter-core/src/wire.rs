//! The wire shape of a lifecycle CloudEvent (structured JSON mode).
//!
//! Written: [`CloudEvent`], the one type every jobmeter producer of events
//! serialises (the worker emitter, the simulator and so the benchmarks and
//! the demo, and the tests). Read: `RawEvent`, every known field as
//! borrowed text, filled by the fast scanner or by serde_json before
//! `event.rs` validates it into a typed event.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// A job lifecycle event as jobmeter's own producers write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloudEvent<'a> {
    /// Always `"1.0"`.
    pub specversion: &'static str,
    /// Unique per `source`: the idempotency key.
    pub id: &'a str,
    /// The emitting worker.
    pub source: &'a str,
    /// `job.started`, `job.heartbeat` or `job.stopped`.
    #[serde(rename = "type")]
    pub ty: &'a str,
    /// When it happened.
    pub time: Timestamp,
    /// The job id.
    pub subject: &'a str,
    /// The job's facts.
    pub data: EventData<'a>,
}

/// The `data` object of a lifecycle event; absent fields are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EventData<'a> {
    /// The account billed.
    pub account_id: &'a str,
    /// `inference`, `fine_tune` or `workflow_step` (on `job.started`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'a str>,
    /// The model (on `job.started`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<&'a str>,
    /// The workflow run of a step (on `job.started`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_run_id: Option<&'a str>,
    /// The GPU type, informational (on `job.started`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<&'a str>,
    /// `succeeded`, `failed` or `cancelled` (on `job.stopped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a str>,
}

impl<'a> CloudEvent<'a> {
    /// An event of type `ty` for `subject` at `time`.
    pub fn new(
        id: &'a str,
        source: &'a str,
        ty: &'a str,
        time: Timestamp,
        subject: &'a str,
        data: EventData<'a>,
    ) -> Self {
        CloudEvent {
            specversion: "1.0",
            id,
            source,
            ty,
            time,
            subject,
            data,
        }
    }

    /// The JSON document.
    pub fn to_json(&self) -> String {
        // Strings, a timestamp and optional strings: cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct RawEvent<'a> {
    #[serde(borrow, default)]
    pub(crate) specversion: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) source: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    pub(crate) ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) subject: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) data: Option<RawData<'a>>,
}

#[derive(Deserialize, Default)]
pub(crate) struct RawData<'a> {
    #[serde(borrow, default)]
    pub(crate) account_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) workflow_run_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) gpu: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) status: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_events_read_back_as_the_same_event() {
        let time = Timestamp::parse("2024-05-01T12:00:00.250Z").unwrap_or_default();
        let data = EventData {
            account_id: "acct \"q\"",
            kind: Some("inference"),
            model: Some("sdxl-1.0"),
            ..EventData::default()
        };
        let json = CloudEvent::new("e-1", "gpu/1", "job.started", time, "job-1", data).to_json();
        assert_eq!(
            json,
            r#"{"specversion":"1.0","id":"e-1","source":"gpu/1","type":"job.started","time":"2024-05-01T12:00:00.250Z","subject":"job-1","data":{"account_id":"acct \"q\"","kind":"inference","model":"sdxl-1.0"}}"#
        );
        let ev = crate::parse_job_event(json.as_bytes()).expect("valid");
        assert_eq!(ev.account.as_str(), "acct \"q\"");
        assert_eq!(ev.time, time);
    }
}
