//! The run's own sections: `[batch]`, `[workers]` (the memory budget), `[compaction]`,
//! `[http]` and `[shutdown]`.

use super::*;

/// Scheduled compaction of small files (`[compaction]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// A daemon compacts every table this often (milliseconds; 0: never).
    pub interval_ms: u64,
    /// Files are bin-packed to about this size.
    pub target_file_mb: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            interval_ms: defaults::COMPACTION_INTERVAL_MS,
            target_file_mb: defaults::COMPACTION_TARGET_FILE_MB,
        }
    }
}

/// The HTTP endpoints of a daemon (`/metrics`, `/health`, `/ready`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` to serve on (port 0: any free port, logged); no server when absent.
    pub listen: Option<String>,
    /// `/ready` fails when rows have waited this long without a commit (milliseconds; default
    /// three times `batch.max_age_ms`, at least a minute).
    pub ready_max_age_ms: Option<u64>,
}

/// How long a daemon may take to stop after SIGTERM/SIGINT (`[shutdown]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout_ms: defaults::SHUTDOWN_TIMEOUT_MS,
        }
    }
}

/// Bytes of the memory budget given to each part of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Unwrapped keys and the key store's page cache.
    pub key_store: usize,
    /// Arrow rows buffered across all sinks before a commit (at most `[batch] max_bytes`).
    pub buffered: usize,
    /// Tokens each sanitizing thread remembers (see `crypto::set_token_cache_bytes`).
    pub tokens_per_thread: usize,
}

/// When buffered rows are committed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Commit when this many rows are buffered across all tables.
    pub max_rows: usize,
    /// Commit when buffered Arrow data reaches this many bytes.
    pub max_bytes: usize,
    /// Commit at least this often while events flow (milliseconds).
    pub max_age_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: defaults::BATCH_MAX_ROWS,
            max_bytes: defaults::BATCH_MAX_BYTES,
            max_age_ms: defaults::BATCH_MAX_AGE_MS,
        }
    }
}

/// How current-state tables (`current = true` in a policy) are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurrentConfig {
    /// Merge the log's changes into the current tables at least this often (milliseconds);
    /// between merges they are reduced in memory to the last event per key. The current table
    /// lags its log by up to this much (plus a merge's time).
    pub max_lag_ms: u64,
}

impl Default for CurrentConfig {
    fn default() -> Self {
        Self {
            max_lag_ms: defaults::CURRENT_MAX_LAG_MS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Sanitizing threads; 0 means one per core.
    pub threads: usize,
    /// Events per unit of work handed to a thread.
    pub chunk_events: usize,
    /// Chunks in flight per thread (bounds memory: backpressure, not buffering).
    pub queue_depth: usize,
    /// The memory budget the run's buffers are sized from (see [`Config::memory`]).
    pub memory_mb: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            chunk_events: defaults::CHUNK_EVENTS,
            queue_depth: defaults::QUEUE_DEPTH,
            memory_mb: defaults::MEMORY_MB,
        }
    }
}
