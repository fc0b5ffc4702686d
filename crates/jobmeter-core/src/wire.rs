//! The wire shape of a lifecycle CloudEvent as read, before validation:
//! every known field as borrowed text, filled by the fast scanner
//! ([`crate::fastjson`]) or by serde_json. [`crate::event`] validates it
//! into a typed event.

use serde::Deserialize;
use std::borrow::Cow;

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
