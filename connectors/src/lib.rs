//! Sources and sinks. One folder per component; the engine in `sluice-transforms` never sees
//! any of this I/O.
//!
//! - [`file`]: Debezium change events in `.jsonl` / `.jsonl.gz` files (and dumped topics).
//! - [`debezium`]: the change-event envelope decoder shared by every source.
//! - [`avro`]: Confluent-framed Avro events and the Schema Registry they name.
//! - [`secret`]: credentials from the environment or files, never printed.
//! - [`kafka`]: a consumer-group source whose positions live in the lake; a publisher.
//! - [`kinesis`]: shards of a Kinesis stream, positions in the lake; a publisher.
//! - [`postgres`]: logical replication (pgoutput) and snapshots of PostgreSQL tables.
//! - [`delta`]: Delta Lake tables, with source positions committed in the same commit.
//! - [`iceberg`]: Apache Iceberg tables (SQL or REST catalog), positions in snapshot summaries.
//! - [`lake`]: a table sink of either format, and where a table is.
//! - [`storage`]: where Delta tables live (a local directory or an S3 prefix).
//! - [`keystore`]: the embedded key store (per-subject data keys wrapped by a master key).

pub mod avro;
pub mod debezium;
pub mod delta;
pub mod error;
pub mod file;
pub mod iceberg;
pub mod kafka;
pub mod keystore;
pub mod kinesis;
pub mod lake;
pub mod postgres;
pub mod secret;
pub mod source;
pub mod storage;

/// Where a source stands: a stream (a file, later a topic partition or shard) and an offset in
/// it. Committed inside the data commit, never before.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePosition {
    pub stream: String,
    pub offset: i64,
}

/// Test hook: `SLUICE_FAILPOINT=<step>` aborts the process at that step (like kill -9), so
/// tests can interrupt a job or a commit at a chosen step deterministically.
pub fn failpoint(step: &str) {
    if std::env::var("SLUICE_FAILPOINT").is_ok_and(|at| at == step) {
        std::process::abort();
    }
}

/// The Arrow and Parquet versions the sinks write with, for readers elsewhere in the workspace.
pub use deltalake::arrow;
/// The query engine aggregations run on (the one `deltalake` embeds).
pub use deltalake::datafusion;
pub use deltalake::parquet;
