//! jobmeter's end-to-end tests, as one test binary: each module is a
//! suite (most run the `jobmeter` binary against a real local Kafka
//! broker; `./dev test` starts one and turns on the `broker` feature). One
//! binary links RocksDB and librdkafka once instead of once per suite.
//!
//! Run one suite with `cargo test --features jobmeter-it/broker --test e2e
//! -- backlog_order::`.

mod support;

mod accounts_partitioned;
mod adjustments;
mod any_partitioner;
mod api;
mod backlog_order;
mod broker_restart;
mod corrupt_archive;
mod corrupt_state;
mod cycle_upgrade;
mod deploy_files;
mod dev_deps;
mod emitter;
mod exactly_once;
mod https;
mod kafka_acl;
mod kafka_roundtrip;
mod module_graph;
mod notify;
mod poison;
mod spend_control;
mod state_upgrade;
