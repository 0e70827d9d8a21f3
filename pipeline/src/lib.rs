//! `sluice`: sanitize change events into a lakehouse without letting raw personal data out.
//!
//! Sluice's runtime, jobs and command line (the `sluice` binary is [`cli::main`]): **when**
//! things happen — passes, the worker pool, batching, commits with source positions, erasure,
//! aggregation and compaction. What is done to a value is `sluice-transforms`; where data comes
//! from and goes is `sluice-connectors`.

pub mod aggregate;
pub mod audit;
pub mod audit_table;
pub mod cli;
pub mod compact;
pub mod config;
pub mod config_env;
pub mod failpoints;
pub mod forget;
pub mod generate;
pub mod manifest;
pub mod observe;
pub mod progress;
pub mod publish;
pub mod quarantine;
pub mod raw_capture;
pub mod retain;
pub mod reveal;
pub mod runtime;
pub mod shutdown;
pub mod sinks;
pub mod sources;
pub mod summary;
pub mod worker;
