//! What a setting is when the file does not say: every default of `sluice.toml` by name, so a
//! reader (and the schema docs) find them in one place.

/// `[source] max_event_bytes`: events longer are quarantined unread.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// The smallest `max_event_bytes` taken (a smaller one is raised to it).
pub const MIN_MAX_EVENT_BYTES: usize = 1024;
/// `[source] poll_ms`: how often a quiet file or stream is looked at again.
pub const POLL_MS: u64 = 1000;
/// `[source] session_timeout_ms` of a Kafka consumer group member.
pub const KAFKA_SESSION_TIMEOUT_MS: u32 = 10_000;
/// `[source] heartbeat_ms` of PostgreSQL capture, and the least it may be.
pub const PG_HEARTBEAT_MS: u64 = 10_000;
pub const MIN_PG_HEARTBEAT_MS: u64 = 100;
/// Where a PostgreSQL server is (source and key store) when `host`/`port` are not given.
pub const PG_HOST: &str = "127.0.0.1";
pub const PG_PORT: u16 = 5432;
/// `[keys] schema` of a key store in PostgreSQL.
pub const PG_KEY_STORE_SCHEMA: &str = "sluice_keys";
/// `[lake.iceberg] catalog_name`.
pub const ICEBERG_CATALOG_NAME: &str = "sluice";
/// `[aggregates] lateness_ms`: how long after an hour ends its late events are waited for.
pub const AGGREGATE_LATENESS_MS: u64 = 10 * 60 * 1000;
/// `[http] ready_max_age_ms` is three batch ages, and at least this.
pub const MIN_READY_MAX_AGE_MS: u64 = 60_000;
/// `[compaction]`: every 6 hours, into files of about 128 MiB.
pub const COMPACTION_INTERVAL_MS: u64 = 6 * 3_600_000;
pub const COMPACTION_TARGET_FILE_MB: u64 = 128;
/// `[shutdown] timeout_ms`: how long a stop waits for the last commit.
pub const SHUTDOWN_TIMEOUT_MS: u64 = 30_000;
/// `[batch]`: a table commits at this many rows, bytes or milliseconds, whichever comes first.
pub const BATCH_MAX_ROWS: usize = 250_000;
pub const BATCH_MAX_BYTES: usize = 128 << 20;
pub const BATCH_MAX_AGE_MS: u64 = 10_000;
/// `[current]`: how far a current table may lag its log. A merge rewrites the buckets its keys
/// touch, so merging a minute of changes at once costs far less than one merge per log commit.
pub const CURRENT_MAX_LAG_MS: u64 = 60_000;
/// `[workers]`: events per chunk, chunks queued per worker, the memory budget (MiB).
pub const CHUNK_EVENTS: usize = 4096;
pub const QUEUE_DEPTH: usize = 2;
pub const MEMORY_MB: usize = 192;
/// The smallest `[workers] memory_mb`: below it a commit would follow every chunk.
pub const MIN_MEMORY_MB: usize = 64;
