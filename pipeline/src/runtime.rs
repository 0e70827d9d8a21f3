//! The run loop: a reader thread, a pool of sanitizing workers, and the committing sink loop.
//!
//! ```text
//! reader ──chunks──▶ workers (N) ──processed──▶ sink loop: reorder, write, commit
//! ```
//! Both channels are bounded: when the sink is slow, workers block, then the reader blocks.
//! Memory is bounded by the chunk size × queue depth plus the commit thresholds.
//!
//! Exactly once: every sink (each analytic table, the vault, the quarantine) commits its rows
//! together with the source positions they cover, in one Delta commit. On start every sink's
//! positions are read back; reading resumes at the lowest, and rows a sink already holds are
//! removed from its output.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use sluice_connectors::delta::{DeltaSink, DeltaSinkError};
use sluice_connectors::file::{list_files, FileSourceError, LineReader, SourceFile};
use sluice_connectors::keystore::{KeyStore, KeyStoreError, MasterKey};
use sluice_connectors::SourcePosition;
use sluice_transforms::engine::PARTITION_COLUMN;
use sluice_transforms::vault::vault_schema;
use sluice_transforms::TableTransform;
use tracing::{info, warn};

use crate::config::Config;
use crate::quarantine::quarantine_schema;
use crate::summary::Summary;
use crate::worker::{Chunk, Processed, Router, WorkError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    #[error(transparent)]
    Sink(#[from] DeltaSinkError),
    #[error(transparent)]
    Source(#[from] FileSourceError),
    #[error(transparent)]
    Work(#[from] WorkError),
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("a worker thread stopped unexpectedly")]
    WorkerLost,
}

pub struct RunOptions {
    /// Stop at the end of the input instead of waiting for more.
    pub once: bool,
}

/// Reads the master key from the environment variable (if set) or the file.
pub fn load_master_key(config: &Config) -> Result<MasterKey, RunError> {
    if let Some(var) = &config.master_key.env {
        if let Ok(text) = std::env::var(var) {
            return MasterKey::from_hex(&text).map_err(|e| RunError::MasterKey(format!("${var}: {e}")));
        }
    }
    let file = config.master_key.file.as_ref().ok_or_else(|| {
        RunError::MasterKey("no master key: set keys.master_key_file or the environment variable".into())
    })?;
    let text = std::fs::read_to_string(file).map_err(|e| RunError::MasterKey(format!("{}: {e}", file.display())))?;
    MasterKey::from_hex(&text).map_err(|e| RunError::MasterKey(format!("{}: {e}", file.display())))
}

/// How the reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderEnd {
    /// End of input (`--once`) or the sink loop stopped.
    Done,
    /// Daemon mode saw files that were not there at start.
    NewFiles,
}

pub fn run(config: &Config, options: &RunOptions) -> Result<Summary, RunError> {
    let started = Instant::now();
    let mut summary = Summary::default();
    loop {
        let (pass, end) = run_pass(config, options)?;
        summary.merge(pass);
        if end == ReaderEnd::Done {
            break;
        }
        info!("new source files: starting a new pass from the committed positions");
    }
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// One pass: open keys and sinks, read back committed positions, process until the reader ends.
fn run_pass(config: &Config, options: &RunOptions) -> Result<(Summary, ReaderEnd), RunError> {
    let keys = Arc::new(KeyStore::open(
        &config.key_store,
        load_master_key(config)?,
        config.key_cache,
    )?);
    let tokenizer = keys.tokenizer()?;
    let quarantine_key = keys.system_key("quarantine")?;
    let transforms: Vec<TableTransform> = config
        .policies
        .iter()
        .map(|p| TableTransform::new(p.clone(), &tokenizer))
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let mut sinks = rt.block_on(open_sinks(config, &transforms))?;
    let files = list_files(&config.source_path)?;

    // Where each sink stands, and where reading resumes: the lowest position of any sink.
    let mut committed: Vec<HashMap<String, i64>> = Vec::with_capacity(sinks.len());
    for sink in &sinks {
        let mut positions = HashMap::new();
        for f in &files {
            if let Some(offset) = rt.block_on(sink.committed(&f.stream))? {
                positions.insert(f.stream.clone(), offset);
            }
        }
        committed.push(positions);
    }
    let start: HashMap<String, u64> = files
        .iter()
        .map(|f| {
            let lowest = committed
                .iter()
                .map(|c| c.get(&f.stream).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            (f.stream.clone(), lowest.max(0) as u64)
        })
        .collect();
    for (stream, offset) in &start {
        if *offset > 0 {
            info!(stream = %stream, offset, "resuming after committed position");
        }
    }

    let router = Arc::new(Router::new(
        transforms,
        keys.clone(),
        quarantine_key,
        config.unknown_tables,
        config.max_event_bytes,
        committed,
    ));
    let threads = config.worker_threads();
    let depth = threads * config.workers.queue_depth.max(1);
    let (chunk_tx, chunk_rx) = bounded::<Chunk>(depth);
    let (done_tx, done_rx) = bounded::<Result<Processed, WorkError>>(depth);

    let reader = {
        let source = ReaderState {
            root: config.source_path.clone(),
            files,
            start,
            max_line: config.max_event_bytes,
            chunk_events: config.workers.chunk_events.max(1),
        };
        let once = options.once;
        let poll = Duration::from_millis(config.poll_ms);
        std::thread::Builder::new()
            .name("sluice-reader".into())
            .spawn(move || source.read_all(chunk_tx, once, poll))
            .expect("spawn reader")
    };
    let mut workers = Vec::with_capacity(threads);
    for i in 0..threads {
        let (rx, tx, router) = (chunk_rx.clone(), done_tx.clone(), router.clone());
        workers.push(
            std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || work(rx, tx, router))
                .expect("spawn worker"),
        );
    }
    drop((chunk_rx, done_tx));

    let result = rt.block_on(sink_loop(config, &mut sinks, done_rx, &router));
    // On error the receivers are gone: workers and reader see closed channels and stop.
    let reader_result = reader.join().map_err(|_| RunError::WorkerLost)?;
    for w in workers {
        w.join().map_err(|_| RunError::WorkerLost)?;
    }
    let summary = result?;
    let end = reader_result?;
    let (hits, misses) = keys.cache_stats();
    info!(hits, misses, "key cache");
    Ok((summary, end))
}

async fn open_sinks(config: &Config, transforms: &[TableTransform]) -> Result<Vec<DeltaSink>, DeltaSinkError> {
    let mut sinks = Vec::with_capacity(transforms.len() + 2);
    for t in transforms {
        let target = &t.policy().target;
        sinks.push(
            DeltaSink::open_or_create(
                &config.tables_root.join(target),
                target,
                &config.name,
                t.schema(),
                &[PARTITION_COLUMN],
            )
            .await?,
        );
    }
    sinks.push(DeltaSink::open_or_create(&config.vault_path, "vault", &config.name, vault_schema(), &[]).await?);
    sinks.push(
        DeltaSink::open_or_create(
            &config.quarantine_path,
            "quarantine",
            &config.name,
            quarantine_schema(),
            &[crate::quarantine::PARTITION_COLUMN],
        )
        .await?,
    );
    Ok(sinks)
}

fn work(rx: Receiver<Chunk>, tx: Sender<Result<Processed, WorkError>>, router: Arc<Router>) {
    for chunk in rx {
        let now_us = chrono::Utc::now().timestamp_micros();
        // A panic must surface as an error: a silently missing chunk would stall the ordered
        // sink forever. The payload is not shown (it could quote data).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| router.process(chunk, now_us)))
            .unwrap_or(Err(WorkError::Panicked));
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}

const MAX_REPORTED_DROPS: usize = 1000;

/// Writes processed chunks in sequence order and commits by size and age.
async fn sink_loop(
    config: &Config,
    sinks: &mut [DeltaSink],
    done: Receiver<Result<Processed, WorkError>>,
    router: &Router,
) -> Result<Summary, RunError> {
    let mut summary = Summary::default();
    let mut pending: BTreeMap<u64, Processed> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut positions: BTreeMap<String, i64> = BTreeMap::new();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut buffered_rows = 0usize;
    let mut buffered_bytes = 0usize;
    let mut oldest: Option<Instant> = None;
    let mut reported_drops: BTreeSet<(String, String)> = BTreeSet::new();
    let max_age = Duration::from_millis(config.batch.max_age_ms.max(1));

    loop {
        let wait = oldest.map(|t| max_age.saturating_sub(t.elapsed())).unwrap_or(max_age);
        let received = match done.recv_timeout(wait) {
            Ok(r) => Some(r?),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Some(p) = received {
            pending.insert(p.seq, p);
        }
        while let Some(p) = pending.remove(&next_seq) {
            next_seq += 1;
            for (table, cols) in &p.summary.dropped_columns {
                for column in cols.keys() {
                    // Logged once per name; a schema that drifts without end is not logged without end.
                    let key = (table.clone(), column.clone());
                    if reported_drops.len() < MAX_REPORTED_DROPS && reported_drops.insert(key) {
                        warn!(table = %table, column = %column, "column not named by the policy: dropped (default deny)");
                        if reported_drops.len() == MAX_REPORTED_DROPS {
                            warn!("further dropped columns are counted in the summary but not logged");
                        }
                    }
                }
            }
            for (sink, batch) in p.outputs {
                buffered_rows += batch.num_rows();
                buffered_bytes += batch.get_array_memory_size();
                sinks[sink].write(batch).await?;
            }
            positions.insert(p.stream.to_string(), p.last_offset as i64);
            dirty.insert(p.stream.to_string());
            oldest.get_or_insert_with(Instant::now);
            summary.merge(p.summary);
            if buffered_rows >= config.batch.max_rows || buffered_bytes >= config.batch.max_bytes {
                summary.commits += commit_all(sinks, &positions, &mut dirty, router).await?;
                (buffered_rows, buffered_bytes, oldest) = (0, 0, None);
            }
        }
        if oldest.is_some_and(|t| t.elapsed() >= max_age) {
            summary.commits += commit_all(sinks, &positions, &mut dirty, router).await?;
            (buffered_rows, buffered_bytes, oldest) = (0, 0, None);
        }
    }
    if !pending.is_empty() {
        return Err(RunError::WorkerLost);
    }
    summary.commits += commit_all(sinks, &positions, &mut dirty, router).await?;
    Ok(summary)
}

/// Commits every sink with the positions of the streams read since the last commit.
async fn commit_all(
    sinks: &mut [DeltaSink],
    positions: &BTreeMap<String, i64>,
    dirty: &mut BTreeSet<String>,
    router: &Router,
) -> Result<u64, RunError> {
    if dirty.is_empty() {
        return Ok(0);
    }
    let mut commits = 0;
    for (i, sink) in sinks.iter_mut().enumerate() {
        // After a restart a sink may already stand past what was re-read: it never moves back
        // (the re-read rows it held were filtered out), and with nothing new it is not touched.
        let before = &router.committed[i];
        let covered: Vec<SourcePosition> = dirty
            .iter()
            .map(|s| SourcePosition {
                stream: s.clone(),
                offset: positions[s].max(before.get(s).copied().unwrap_or(0)),
            })
            .collect();
        let advances = covered
            .iter()
            .any(|p| before.get(&p.stream).is_none_or(|c| p.offset > *c));
        if !advances && sink.buffered_rows() == 0 {
            continue;
        }
        let rows = sink.buffered_rows();
        let started = Instant::now();
        let version = sink.commit(&covered).await?;
        commits += 1;
        info!(
            table = sink.name(),
            version,
            rows,
            ms = started.elapsed().as_millis() as u64,
            "committed"
        );
    }
    dirty.clear();
    Ok(commits)
}

/// The reader's view of the file source.
struct ReaderState {
    root: PathBuf,
    files: Vec<SourceFile>,
    start: HashMap<String, u64>,
    max_line: usize,
    chunk_events: usize,
}

/// Bytes of line data per chunk at most, so a chunk of huge events stays bounded too.
const CHUNK_BYTES: usize = 8 << 20;

impl ReaderState {
    fn read_all(mut self, tx: Sender<Chunk>, once: bool, poll: Duration) -> Result<ReaderEnd, RunError> {
        let mut seq = 0u64;
        let mut offsets: HashMap<String, u64> = std::mem::take(&mut self.start);
        for f in &self.files {
            offsets.entry(f.stream.clone()).or_insert(0);
        }
        loop {
            for file in &self.files {
                let start = offsets.get(&file.stream).copied().unwrap_or(0);
                let end = match self.read_file(file, start, once, &tx, &mut seq)? {
                    Some(end) => end,
                    None => return Ok(ReaderEnd::Done), // the sink loop has stopped
                };
                offsets.insert(file.stream.clone(), end);
            }
            if once {
                return Ok(ReaderEnd::Done);
            }
            // Daemon mode on files: wait for appended lines or new files.
            std::thread::sleep(poll);
            if let Ok(files) = list_files(&self.root) {
                // A file this run did not list at start has no committed positions loaded
                // (it may have been ingested before and moved back): end this pass so the
                // next one starts from what every sink has committed.
                if files.iter().any(|f| !offsets.contains_key(&f.stream)) {
                    return Ok(ReaderEnd::NewFiles);
                }
                self.files = files;
            }
        }
    }

    /// Sends the file's lines from `start` in chunks; returns where it stopped, or `None` when
    /// the receiving side is gone.
    fn read_file(
        &self,
        file: &SourceFile,
        start: u64,
        once: bool,
        tx: &Sender<Chunk>,
        seq: &mut u64,
    ) -> Result<Option<u64>, RunError> {
        let mut reader = LineReader::open(file, start, self.max_line)?;
        let stream: Arc<str> = Arc::from(file.stream.as_str());
        let mut line = Vec::new();
        let mut offset = start;
        let new_chunk = || Chunk {
            seq: 0,
            stream: stream.clone(),
            data: Vec::with_capacity(1 << 20),
            lines: Vec::with_capacity(self.chunk_events),
        };
        let mut chunk = new_chunk();
        loop {
            let next = reader.next_line(&mut line).map_err(|source| FileSourceError::Io {
                path: file.path.clone(),
                source,
            })?;
            // In daemon mode a last line without its newline may still be being written:
            // leave it for the next pass.
            // A compressed file is never appended to: its last line is complete.
            let next = next.filter(|end| end.terminated || once || file.gzipped());
            if let Some(end) = next {
                let s = chunk.data.len();
                chunk.data.extend_from_slice(&line);
                chunk.lines.push((s, chunk.data.len(), end));
                offset = end.end_offset;
            }
            let full = chunk.lines.len() >= self.chunk_events || chunk.data.len() >= CHUNK_BYTES;
            if (full || next.is_none()) && !chunk.lines.is_empty() {
                let mut ready = std::mem::replace(&mut chunk, new_chunk());
                ready.seq = *seq;
                *seq += 1;
                if tx.send(ready).is_err() {
                    return Ok(None);
                }
            }
            if next.is_none() {
                return Ok(Some(offset));
            }
        }
    }
}
