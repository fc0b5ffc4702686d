//! # jobmeter-core: the billing domain, pure
//!
//! Job lifecycle events in, charges / limit events / statements / rejects
//! out. This crate is the part finance audits: pairing of start and stop
//! events under duplicates and any ordering, per-second rating against a
//! versioned rate card, plan effects (free credits, pro caps, enterprise
//! alerts), monthly periods with boundary splitting, orphans and late data.
//!
//! ## Invariants
//! - **No I/O, no clock.** Time comes from events ("stream time": the
//!   largest valid event time a partition has seen). `Timestamp::now` is
//!   there for the adapters; no billing code calls it (a test checks). The same input log
//!   always yields byte-identical outputs; output ids derive from inputs.
//! - **Exact money.** [`money::Money`] is a `rust_decimal::Decimal`; no
//!   floats, no rounding of charges. Statement totals are rounded once, to
//!   cents, half-even ([`money::Money::round_cents`]).
//! - **State is data.** [`state`] defines every persisted record with key
//!   and value codecs; [`meter::Meter::take_changes`] hands them to a store.
//!
//! ## Must never depend on
//! tokio, rdkafka, rocksdb, prometheus, or anything that does I/O. CI checks
//! this with `cargo tree -p jobmeter-core -e normal`.

// Money is exact: no float arithmetic anywhere in the billing domain.
#![deny(clippy::float_arithmetic)]

pub mod adjust;
pub mod archive;
mod billing;
pub mod codec;
mod cold;
mod config_error;
mod context;
pub mod cycle;
pub mod event;
pub mod fasthash;
mod fastjson;
mod jobs;
pub mod meter;
pub mod money;
pub mod order;
pub mod output;
mod persist;
pub mod plans;
mod pricing;
pub mod ratecard;
pub mod rating;
mod running;
mod spend;
pub mod state;
pub mod time;
mod timers;
pub mod values;
pub mod view;
pub mod wire;

pub use config_error::{ConfigError, Problem};
pub use event::{parse_job_event, parse_job_event_with, AccountIds, JobEvent, JobKind, JobStatus, RejectReason};
pub use meter::{ApplyError, Context, Meter, MeterConfig, Stats};
pub use money::{AccountId, JobId, ModelId, Money};
pub use output::{Charge, ChargeKind, Command, LimitEvent, Origin, Output, Rejected, Statement};
pub use plans::{AccountBook, AccountRecord, Accounts, LookupError, Plan, PlanCatalog, Policy};
pub use ratecard::RateCard;
pub use time::{Period, Timestamp};
