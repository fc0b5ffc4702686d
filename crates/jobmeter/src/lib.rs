//! # jobmeter: the command line
//!
//! The binary's `main` only calls [`cli::main`], which parses the command
//! line and hands each command to the crate that does it: the streaming
//! meter to `jobmeter-service`, the Kafka operator tools (`rebuild`,
//! `notify`, `emit`, `dump`, producing a simulated fleet) to
//! `jobmeter-ops`, the file-based tools (`replay`, `reprice`, `simulate`,
//! `check-config`) to `jobmeter-offline`. Nothing here bills, stores or
//! talks to Kafka: it parses and dispatches, and its only dependencies are
//! those three crates, clap, anyhow and the allocator.

pub mod cli;
