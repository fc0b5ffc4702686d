//! # jobmeter: the service and its command line
//!
//! The binary's `main` only calls [`cli::main`]. Everything here is library
//! code that tests call directly: [`service`] is the streaming meter (Kafka
//! in, RocksDB state, Kafka out, exactly once), beside the operator tools
//! that need Kafka (`rebuild`, `notify`, `emit`, `dump`).
//!
//! This crate wires adapters together; billing rules live only in
//! `jobmeter-core`, storage in `jobmeter-store`, Kafka in `jobmeter-kafka`,
//! and the file-based tools (replay, reprice, simulate, the output sinks,
//! the rate-card and plan loaders) in `jobmeter-offline`, one floor down:
//! re-exported here under their old paths.

pub use jobmeter_offline::{args, dur, progress, replay, reprice, simulate, sinks};

pub mod cli;
pub mod emit;
pub mod notify;
pub mod service;
pub mod signals;
pub mod tools;
