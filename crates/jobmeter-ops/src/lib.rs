//! # jobmeter-ops: the Kafka operator tools
//!
//! The commands an operator runs beside the meter, each reaching Kafka
//! with the meter's own settings (`kafka.brokers`, `kafka.properties` —
//! SASL, SSL — and `topics.prefix`, loaded by
//! [`jobmeter_service::KafkaArgs`] or [`jobmeter_service::RunCmd`]):
//! [`rebuild`] (state and outputs rebuilt from the input topics and
//! checked), [`adjust`] (pricing adjustments written from a shell), [`notify`] (limit events to a signed webhook), [`emit`]
//! (job lifecycle events from scripts), [`tools`] (`dump`, and producing a
//! simulated fleet to Kafka).
//!
//! Boundary: this crate uses the service library's configuration and
//! engine pieces; the service never depends on it, and neither do the
//! core or the offline tools (`./dev test` checks it).

pub mod adjust;
pub mod emit;
pub mod notify;
pub mod rebuild;
pub mod tools;
