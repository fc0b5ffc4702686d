//! # jobmeter-offline: the billing core over files
//!
//! What finance and support run on a laptop to reproduce or preview a
//! bill, with no Kafka and no state store: [`replay`] meters files of
//! account records and lifecycle events exactly as the streaming meter
//! does, [`reprice`] shows what a rate-card change does to every bill,
//! [`simulate`] writes a reproducible fleet, and [`cli`] holds the flags of
//! these commands (shared by the `jobmeter-offline` and `jobmeter` command
//! lines). [`sinks`] writes outputs as JSON lines or CSV.
//!
//! This crate depends on `jobmeter-core` and small pure-Rust crates only.
//! It must never depend on Kafka, RocksDB or any crate that compiles C or
//! C++ (a `-sys` crate): `./dev test` checks that with `cargo tree`, so that
//! `cargo install --path crates/jobmeter-offline` needs nothing but Rust.
//! The streaming service sits one floor up and uses this crate's file
//! loaders, sinks and duration parser; nothing here knows about it.

pub mod args;
pub mod cli;
pub mod dur;
pub mod progress;
pub mod replay;
pub mod reprice;
pub mod simulate;
pub mod sinks;
