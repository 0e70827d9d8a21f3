//! Sources as the runtime sees them: each pass a source names the streams it will read, then
//! reads them from the positions the lake holds into chunks of raw events.

pub mod file;
pub mod kafka;
pub mod kinesis;
pub mod postgres;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};
use sluice_connectors::SourcePosition;

use crate::runtime::RunError;
use crate::worker::Chunk;

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
    fn begin_pass(&mut self) -> Result<Vec<String>, RunError>;

    /// Reads from `start` (per stream: the lowest position any sink committed) until the pass
    /// ends.
    fn read(&mut self, start: &HashMap<String, u64>, out: &mut ChunkSender) -> Result<ReaderEnd, RunError>;

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
}

pub enum Sent {
    Yes,
    /// The queue is full (backpressure); the chunk comes back.
    Full(Chunk),
    /// The sink loop is gone.
    Closed,
}

impl ChunkSender {
    pub fn new(tx: Sender<Chunk>, permits: Sender<()>, abandoned: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> Self {
        Self {
            tx,
            permits,
            seq: 0,
            abandoned,
            stop,
        }
    }

    /// Whether the sink loop has stopped (the pass is over) or a shutdown was asked for: the
    /// reader ends its pass, what it sent is committed.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || crate::shutdown::requested()
    }

    /// Sends, waiting while too many chunks are in flight. False when the sink loop is gone.
    pub fn send(&mut self, mut chunk: Chunk) -> bool {
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
    pub fn send_within(&mut self, mut chunk: Chunk, wait: Duration) -> Sent {
        if crate::shutdown::requested() {
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

    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }
}
