//! # jobmeter: the service and its command line
//!
//! The binary's `main` only calls [`cli::main`]. Everything here is library
//! code that tests call directly: [`replay`] runs the billing core over
//! files, [`simulate`] generates a reproducible fleet, [`service`] is the
//! streaming meter (Kafka in, RocksDB state, Kafka out, exactly once).
//!
//! This crate wires adapters together; billing rules live only in
//! `jobmeter-core`, storage in `jobmeter-store`, Kafka in `jobmeter-kafka`.

pub mod args;
pub mod cli;
pub mod dur;
pub mod emit;
pub mod notify;
pub mod progress;
pub mod replay;
pub mod reprice;
pub mod service;
pub mod signals;
pub mod simulate;
pub mod sinks;
pub mod tools;
