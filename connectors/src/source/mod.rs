//! The source port: what the runtime asks of a source. Each pass a source names the streams
//! it will read, then reads them from the positions the lake holds into chunks of raw events,
//! which it hands to a [`ChunkSender`]. The sources themselves live in their connector's folder
//! (`file/`, `kafka/`, `kinesis/`, `postgres/`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};

use crate::SourcePosition;

mod config;
pub use config::{Behind, ReadProgress, Replay, Replaying, SourceConfig, SourceContext};

/// Why a source stopped: the connector's own error, or the spool / runtime around it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    File(#[from] crate::file::FileSourceError),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaSourceError),
    #[error(transparent)]
    Kinesis(#[from] crate::kinesis::KinesisError),
    #[error(transparent)]
    Postgres(#[from] crate::postgres::PgError),
    #[error(transparent)]
    Lake(#[from] crate::lake::LakeError),
    #[error("snapshot spool {0}")]
    Spool(String),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error("async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Internal(&'static str),
}

impl SourceError {
    pub(crate) fn from_kafka(e: rdkafka::error::KafkaError) -> Self {
        SourceError::Kafka(e.into())
    }
}

/// A line as read: where it ends in the stream, and how long it really was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineEnd {
    /// Offset just past the line's newline (in decompressed bytes for `.gz`).
    pub end_offset: u64,
    /// Full length of the line without its newline; more than the buffer holds if truncated.
    pub len: usize,
    /// Whether the line ended with a newline (the last line of a file may not).
    pub terminated: bool,
}

impl LineEnd {
    pub fn truncated(&self, max_line: usize) -> bool {
        self.len > max_line
    }
}

/// Lines of one stream, read in order.
pub struct Chunk {
    pub seq: u64,
    pub stream: Arc<str>,
    pub data: Vec<u8>,
    /// (start, end) of each line in `data`, and where it ended in the stream.
    pub lines: Vec<(usize, usize, LineEnd)>,
    /// Positions the source keeps beside the stream's offset as of the last line (committed
    /// with it; e.g. a Kinesis sequence number).
    pub attached: Vec<SourcePosition>,
    /// Whether the last line ends a source transaction: the sink commits only after such a
    /// chunk, so a PostgreSQL transaction is never split across lake commits.
    pub boundary: bool,
}

impl Chunk {
    pub fn new(stream: Arc<str>, events: usize) -> Self {
        Self {
            seq: 0,
            stream,
            data: Vec::with_capacity(events.min(4096) * 256),
            lines: Vec::with_capacity(events),
            attached: Vec::new(),
            boundary: true,
        }
    }

    pub fn push(&mut self, line: &[u8], end: LineEnd) {
        let start = self.data.len();
        self.data.extend_from_slice(line);
        self.lines.push((start, self.data.len(), end));
    }

    pub fn last_offset(&self) -> u64 {
        self.lines.last().map(|l| l.2.end_offset).unwrap_or(0)
    }
    pub fn first_offset(&self) -> u64 {
        self.lines.first().map(|l| l.2.end_offset).unwrap_or(0)
    }
}

/// How a reader's pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderEnd {
    /// End of input (`--once`, replay end) or the sink loop stopped: commit and finish.
    Done,
    /// Commit what was read, then start a new pass from the committed positions (new files).
    NewPass,
    /// Drop everything uncommitted and start a new pass (the assignment of partitions
    /// changed: another daemon may own some of them now).
    Abandon,
}

/// Told the positions the lake committed (e.g. to report consumer lag). Must not block.
pub type ProgressReporter = dyn Fn(&[SourcePosition]) + Send + Sync;

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    Earliest,
    Offset(i64),
    /// The first message of each partition (shard) stamped at or after this time (ms since
    /// epoch; Kinesis: arrival time).
    Time(i64),
}

/// Where a replay ends (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayTo {
    /// The end of each partition when the replay reaches it.
    Latest,
    Offset(i64),
    /// Before the first message stamped after this time.
    Time(i64),
}

/// What a source is asked by the runtime.
pub trait Source: Send {
    /// Prepares a pass and returns the streams it reads; their committed positions are read
    /// from every sink before [`Source::read`].
    fn begin_pass(&mut self) -> Result<Vec<String>, SourceError>;

    /// Reads from `start` (per stream: the lowest position any sink committed) until the pass
    /// ends.
    fn read(&mut self, start: &HashMap<String, u64>, out: &mut ChunkSender) -> Result<ReaderEnd, SourceError>;

    /// Called by the sink loop after the lake committed `positions` (e.g. to report consumer
    /// lag). Must not block.
    fn progress_reporter(&self) -> Option<Arc<ProgressReporter>> {
        None
    }

    /// Called once the run is over and everything read is committed (e.g. to acknowledge the
    /// last commit to the source). Must not fail the run.
    fn finish(&mut self) {}
}

/// The reader's end of the work queue: numbers chunks in reading order, and holds a permit per
/// chunk in flight (returned by the sink loop as it writes them).
pub struct ChunkSender {
    tx: Sender<Chunk>,
    permits: Sender<()>,
    seq: u64,
    /// Set when the reader abandons the pass; the sink loop then commits nothing more.
    pub abandoned: Arc<AtomicBool>,
    /// Set when the sink loop has stopped: a reader waiting on a quiet source ends its pass.
    stop: Arc<AtomicBool>,
    hooks: RuntimeHooks,
}

/// What the process around the sources provides: whether a shutdown was asked for (signals),
/// and the source-lag gauge (metrics). Plain functions: a source calls them from any thread.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeHooks {
    pub shutdown_requested: fn() -> bool,
    /// `(source kind, lag)`: Kafka messages, Kinesis milliseconds, PostgreSQL retained WAL bytes.
    pub report_lag: fn(&'static str, i64),
}

pub(crate) enum Sent {
    Yes,
    /// The queue is full (backpressure); the chunk comes back.
    Full(Chunk),
    /// The sink loop is gone.
    Closed,
}

impl ChunkSender {
    pub fn new(
        tx: Sender<Chunk>,
        permits: Sender<()>,
        abandoned: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
        hooks: RuntimeHooks,
    ) -> Self {
        Self {
            tx,
            permits,
            seq: 0,
            abandoned,
            stop,
            hooks,
        }
    }

    /// Sets the source's lag gauge.
    pub(crate) fn report_lag(&self, source: &'static str, lag: i64) {
        (self.hooks.report_lag)(source, lag)
    }

    /// Whether the sink loop has stopped (the pass is over) or a shutdown was asked for: the
    /// reader ends its pass, what it sent is committed.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || (self.hooks.shutdown_requested)()
    }

    /// Sends, waiting while too many chunks are in flight. False when the sink loop is gone.
    pub(crate) fn send(&mut self, mut chunk: Chunk) -> bool {
        loop {
            match self.send_within(chunk, Duration::from_millis(200)) {
                Sent::Yes => return true,
                Sent::Closed => return false,
                Sent::Full(_) if self.stopped() => return false,
                Sent::Full(c) => chunk = c,
            }
        }
    }

    /// Sends, waiting at most `wait` for a permit. After a shutdown request nothing more is
    /// sent: the reader ends its pass and what it sent before is committed.
    pub(crate) fn send_within(&mut self, mut chunk: Chunk, wait: Duration) -> Sent {
        if (self.hooks.shutdown_requested)() {
            return Sent::Closed;
        }
        let permit = if wait.is_zero() {
            self.permits.try_send(()).map_err(|e| match e {
                TrySendError::Full(()) => SendTimeoutError::Timeout(()),
                TrySendError::Disconnected(()) => SendTimeoutError::Disconnected(()),
            })
        } else {
            self.permits.send_timeout((), wait)
        };
        match permit {
            Ok(()) => {}
            Err(SendTimeoutError::Timeout(())) => return Sent::Full(chunk),
            Err(SendTimeoutError::Disconnected(())) => return Sent::Closed,
        }
        chunk.seq = self.seq;
        // Never blocks for long: the queue holds as many chunks as there are permits.
        if self.tx.send(chunk).is_err() {
            return Sent::Closed;
        }
        self.seq += 1;
        Sent::Yes
    }

    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }
}
