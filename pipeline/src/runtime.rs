//! The run loop: a reader thread, a pool of sanitizing workers, and the committing sink loop.
//!
//! ```text
//! reader ──chunks──▶ workers (N) ──processed──▶ sink loop: reorder, write, commit
//! ```
//! Chunks in flight (queued, in a worker, or waiting to be written in order) are bounded by
//! permits the sink loop returns as it writes: when the sink is slow the reader waits (a Kafka
//! reader, after a while, pauses its partitions and keeps polling). Memory is bounded by the
//! chunk size × chunks in flight plus the commit thresholds.
//!
//! Exactly once: every sink (each analytic table, the vault, the quarantine) commits its rows
//! together with the source positions they cover, in one Delta commit. On start every sink's
//! positions are read back; reading resumes at the lowest, and rows a sink already holds are
//! removed from its output.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use sluice_connectors::avro::{RegistryError, SchemaRegistry};
use sluice_connectors::error::{ErrorKind, Kind};
use sluice_connectors::keystore::{KeyStore, KeyStoreError, MasterKey};
use sluice_connectors::lake::current::ErasedRows;
use sluice_connectors::lake::{Catalogs, LakeError, StreamStanding, TableLayout, TableSink};
use sluice_connectors::source::{Chunk, ChunkSender, ProgressReporter, ReaderEnd, RuntimeHooks, Source, SourceError};
use sluice_connectors::SourcePosition;
use sluice_transforms::keys::{dropped_by_erasure, KeyProvider};
use sluice_transforms::TableTransform;
use tracing::{info, warn};

use crate::config::{Config, InputFormat};
use crate::observe::metrics;
use crate::publish::Publisher;
use crate::sinks::{sink_specs, SinkId};
use crate::summary::Summary;
use crate::worker::{catching, Processed, Router, WorkError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    #[error(transparent)]
    Sink(#[from] LakeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("snapshot spool {0}")]
    Spool(String),
    #[error("encoding rows as JSON: {0}")]
    Encode(arrow_schema::ArrowError),
    #[error(transparent)]
    Work(#[from] WorkError),
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("a worker thread stopped unexpectedly")]
    WorkerLost,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl Kind for RunError {
    fn kind(&self) -> ErrorKind {
        match self {
            RunError::Keys(e) => e.kind(),
            RunError::Sink(e) => e.kind(),
            RunError::Source(e) => e.kind(),
            RunError::Spool(_) => ErrorKind::Data,
            RunError::Work(WorkError::Registry { .. }) | RunError::Registry(_) => ErrorKind::SourceUnavailable,
            RunError::Work(WorkError::Transform {
                source: sluice_transforms::engine::TransformError::Keys(_),
                ..
            }) => ErrorKind::Keys,
            RunError::MasterKey(_) => ErrorKind::Config,
            RunError::Encode(_) | RunError::Work(_) | RunError::Runtime(_) | RunError::WorkerLost => {
                ErrorKind::Internal
            }
        }
    }
}

/// The publishers (`sluice publish`) share their connector's error with its source.
impl From<sluice_connectors::kafka::KafkaSourceError> for RunError {
    fn from(e: sluice_connectors::kafka::KafkaSourceError) -> Self {
        RunError::Source(e.into())
    }
}

impl From<sluice_connectors::kinesis::KinesisError> for RunError {
    fn from(e: sluice_connectors::kinesis::KinesisError) -> Self {
        RunError::Source(e.into())
    }
}

/// The sources' view of this process: its shutdown flag and its source-lag gauge.
pub fn source_hooks() -> RuntimeHooks {
    RuntimeHooks {
        shutdown_requested: crate::shutdown::requested,
        report_lag: |source, lag| {
            crate::observe::metrics().source_lag(source).set(lag);
        },
    }
}

/// Reads the master key from the environment variable (if set) or the file.
pub fn load_master_key(config: &Config) -> Result<MasterKey, RunError> {
    if let Some(var) = &config.master_key.env {
        if let Ok(text) = sluice_connectors::secret::Secret::from_env(var, "keys.master_key_env") {
            return MasterKey::from_hex(text.expose()).map_err(|e| RunError::MasterKey(format!("${var}: {e}")));
        }
    }
    let file = config.master_key.file.as_ref().ok_or_else(|| {
        RunError::MasterKey("no master key: set keys.master_key_file or the environment variable".into())
    })?;
    let text = std::fs::read_to_string(file).map_err(|e| RunError::MasterKey(format!("{}: {e}", file.display())))?;
    MasterKey::from_hex(&text).map_err(|e| RunError::MasterKey(format!("{}: {e}", file.display())))
}

/// What a job that reads a few keys (erasure, reuse, audit) lets the key store keep.
pub const SMALL_KEY_STORE_MEMORY: usize = 4 << 20;

/// The configured key store, keeping at most `memory` bytes in memory.
pub fn open_key_store(config: &Config, memory: usize) -> Result<KeyStore, RunError> {
    Ok(KeyStore::open(&config.key_store, load_master_key(config)?, memory)?
        .with_erasure_refresh(config.erasure_refresh))
}

/// Runs passes until the source is done. A pass ends early when the source asks for a new
/// one (new files, a changed partition assignment) or a sink is fenced by another writer.
pub fn run(config: &Config, source: &mut dyn Source) -> Result<Summary, RunError> {
    let started = Instant::now();
    let mut summary = Summary::default();
    // One async runtime for the whole run: the sinks and a publisher's pooled connections
    // live across passes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        // File reads run on blocking threads and their buffers are freed elsewhere: a thread
        // that exits leaves that memory to mimalloc's abandoned heaps, reclaimed late. Few,
        // long-lived blocking threads keep peak RSS from growing with the reads (a current
        // table's merges read every file they check).
        .max_blocking_threads(4)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let publisher = match &config.publish {
        Some(p) => Some(rt.block_on(Publisher::open(p))?),
        None => None,
    };
    loop {
        match run_pass(config, source, publisher.as_ref(), &rt) {
            Ok((pass, ReaderEnd::Abandon)) => summary.commits += pass.commits,
            Ok((pass, end)) => {
                summary.merge(pass);
                if end == ReaderEnd::Done || crate::shutdown::requested() {
                    break;
                }
                info!("starting a new pass from the committed positions");
            }
            Err(e) if e.kind() == ErrorKind::Fenced => {
                warn!("{e}");
            }
            Err(e) => return Err(e),
        }
    }
    source.finish();
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Where each sink stands (per sink: stream → committed offset), and where reading resumes:
/// per stream, the lowest position any sink committed. A stream some sink never committed is
/// absent: its source starts it from the beginning (or wherever its settings say).
#[allow(clippy::type_complexity)]
fn read_committed(
    rt: &tokio::runtime::Runtime,
    sinks: &mut [TableSink],
    streams: &[String],
) -> Result<(Vec<HashMap<String, i64>>, HashMap<String, u64>), RunError> {
    let mut committed: Vec<HashMap<String, i64>> = Vec::with_capacity(sinks.len());
    for sink in sinks.iter_mut() {
        let mut positions = HashMap::new();
        for stream in streams {
            if let Some(offset) = rt.block_on(sink.committed(stream))? {
                positions.insert(stream.clone(), offset);
            }
        }
        committed.push(positions);
    }
    let start: HashMap<String, u64> = streams
        .iter()
        .filter_map(|stream| {
            let standing = StreamStanding::over(committed.iter().map(|c| c.get(stream).copied()));
            Some((stream.clone(), standing.resume_at()?.max(0) as u64))
        })
        .collect();
    Ok((committed, start))
}

/// One pass: open keys and sinks, read back committed positions, process until the reader ends.
fn run_pass(
    config: &Config,
    source: &mut dyn Source,
    publisher: Option<&Publisher>,
    rt: &tokio::runtime::Runtime,
) -> Result<(Summary, ReaderEnd), RunError> {
    let keys = Arc::new(open_key_store(config, config.memory().key_store)?);
    sluice_transforms::crypto::set_token_cache_bytes(config.memory().tokens_per_thread);
    let tokenizer = keys.tokenizer()?;
    let quarantine_key = keys.system_key("quarantine")?;
    let transforms: Vec<TableTransform> = config
        .policies
        .iter()
        .map(|p| TableTransform::new(p.clone(), &tokenizer))
        .collect();

    let registry = match &config.input.format {
        InputFormat::Json => None,
        InputFormat::Avro(registry) => Some(Arc::new(SchemaRegistry::new(
            registry.settings().map_err(RegistryError::from)?,
        )?)),
    };
    let mut sinks = rt.block_on(open_sinks(config, &transforms, &keys))?;
    let streams = source.begin_pass()?;

    let (committed, start) = read_committed(rt, &mut sinks, &streams)?;
    for (stream, offset) in &start {
        if *offset > 0 {
            info!(stream = %stream, offset, "resuming after committed position");
        }
    }

    let router = Arc::new(Router::new(
        transforms,
        keys.clone(),
        quarantine_key,
        config.input.clone(),
        registry,
        committed,
        config.sink_set(),
    ));
    // Tables named without their database take it from the rows they already hold.
    for t in 0..router.transforms.len() {
        if let [database] = sinks[config.sink_set().index(SinkId::Table { policy: t, format: 0 })]
            .column_values_in_stats("_source_db")?
            .as_slice()
        {
            router.bind_databases([(t, database.clone())]);
        }
    }
    let threads = config.worker_threads();
    // Chunks in flight (queued, in a worker, or waiting to be written in order) are bounded
    // by permits the sink returns as it writes: a slow chunk cannot make the others pile up.
    let in_flight = threads * config.workers.queue_depth.max(1) + threads;
    let (chunk_tx, chunk_rx) = bounded::<Chunk>(in_flight);
    let (done_tx, done_rx) = bounded::<Result<Processed, WorkError>>(in_flight);
    let (permit_tx, permit_rx) = bounded::<()>(in_flight);
    let abandoned = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = source.progress_reporter();
    metrics().set_connected(true);

    let (result, reader_result) = std::thread::scope(|scope| {
        let mut out = ChunkSender::new(chunk_tx, permit_tx, abandoned.clone(), stop.clone(), source_hooks());
        let reader = std::thread::Builder::new()
            .name("sluice-reader".into())
            .spawn_scoped(scope, move || source.read(&start, &mut out))
            .expect("spawn reader");
        for i in 0..threads {
            let (rx, tx, router) = (chunk_rx.clone(), done_tx.clone(), router.clone());
            std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn_scoped(scope, move || work(rx, tx, router))
                .expect("spawn worker");
        }
        drop((chunk_rx, done_tx));
        let sink = SinkLoop {
            config,
            router: &router,
            abandoned: &abandoned,
            publisher,
            reporter: reporter.as_deref(),
            permits: permit_rx,
            keys: &keys,
            cache_seen: std::cell::Cell::new((0, 0)),
        };
        let result = rt.block_on(sink.run(&mut sinks, done_rx));
        // The reader may be waiting on a quiet source, not on the queue: tell it to stop.
        stop.store(true, Ordering::SeqCst);
        (result, reader.join())
    });
    metrics().set_connected(false);
    metrics().all_committed();
    let reader_result = reader_result.map_err(|_| RunError::WorkerLost)?;
    let end = match (result, reader_result) {
        (Ok(summary), Ok(end)) => (summary, end),
        (_, Ok(ReaderEnd::Abandon)) => (Summary::default(), ReaderEnd::Abandon),
        (Err(e), _) => return Err(e),
        (_, Err(e)) => return Err(e.into()),
    };
    let (hits, misses) = keys.cache_stats();
    info!(hits, misses, "key cache");
    Ok(end)
}

/// Opens every sink in [`SinkSet`](crate::sinks::SinkSet) order (that of [`Config::sink_locations`]).
async fn open_sinks(
    config: &Config,
    transforms: &[TableTransform],
    keys: &Arc<KeyStore>,
) -> Result<Vec<TableSink>, LakeError> {
    let mut catalogs = Catalogs::default();
    let mut sinks = Vec::new();
    for spec in sink_specs(config, transforms) {
        let sink = spec
            .location
            .open_sink(
                &mut catalogs,
                &spec.name,
                &config.name,
                spec.schema.clone(),
                TableLayout {
                    partition: spec.partition,
                    stats_columns: &spec.stats_columns,
                    tags: spec.tags.as_ref(),
                },
            )
            .await?;
        sinks.push(match spec.current {
            Some(settings) => sink.keeping_current(spec.schema, settings, erased_rows(keys.clone()))?,
            None => sink,
        });
    }
    Ok(sinks)
}

/// Which rows of a batch of a log belong to subjects erased (before the row's source time)
/// per the key store's tombstones: what a current table leaves out of a merge of changes
/// that waited while an erasure ran.
fn erased_rows(keys: Arc<KeyStore>) -> Arc<ErasedRows> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::TimestampMicrosecondType;
    use arrow_array::Array;
    Arc::new(move |batch: &arrow_array::RecordBatch| {
        let column = |name: &str| batch.column_by_name(name).ok_or_else(|| format!("{name} is missing"));
        let subjects = column("_subject")?.as_string::<i32>();
        let times = column("_source_ts")?.as_primitive::<TimestampMicrosecondType>();
        let distinct: Vec<&str> = subjects
            .iter()
            .flatten()
            .collect::<BTreeSet<&str>>()
            .into_iter()
            .collect();
        let cutoffs = keys.erased_subjects(&distinct).map_err(|e| e.to_string())?;
        let cutoff: HashMap<&str, Option<i64>> = distinct.into_iter().zip(cutoffs).collect();
        Ok((0..batch.num_rows())
            .map(|row| {
                let subject = subjects.is_valid(row).then(|| subjects.value(row));
                Some(
                    subject
                        .is_some_and(|s| dropped_by_erasure(cutoff.get(s).copied().flatten(), times.value(row) / 1000)),
                )
            })
            .collect())
    })
}

fn work(rx: Receiver<Chunk>, tx: Sender<Result<Processed, WorkError>>, router: Arc<Router>) {
    for chunk in rx {
        let now_us = chrono::Utc::now().timestamp_micros();
        // A panic must not stall the ordered sink (a missing chunk) nor come back after a
        // restart: the chunk is done again one event at a time, and what panics is quarantined.
        let result = match catching(|| router.process(&chunk, now_us)) {
            Ok(result) => result,
            Err(_) => catching(|| router.process_isolating(&chunk, now_us)).unwrap_or(Err(WorkError::Panicked)),
        };
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}

const MAX_REPORTED_DROPS: usize = 1000;

/// When a sink still holds uncommitted streams (a current table waiting for its merge), the
/// commit clock keeps running so that it is asked again without new events.
fn waiting(dirty: &[BTreeSet<String>]) -> Option<Instant> {
    dirty.iter().any(|d| !d.is_empty()).then(Instant::now)
}

/// The newest position read of a stream, and what its source keeps beside it (committed in the
/// same Delta commit, e.g. a Kinesis sequence number that does not fit a `txn` version).
struct StreamPosition {
    offset: i64,
    attached: Vec<SourcePosition>,
}

struct SinkLoop<'a> {
    config: &'a Config,
    router: &'a Router,
    abandoned: &'a AtomicBool,
    publisher: Option<&'a Publisher>,
    reporter: Option<&'a ProgressReporter>,
    /// One permit back to the reader per chunk written.
    permits: Receiver<()>,
    keys: &'a KeyStore,
    /// The key cache's (hits, misses) already counted in the metrics.
    cache_seen: std::cell::Cell<(u64, u64)>,
}

impl SinkLoop<'_> {
    /// Writes processed chunks in sequence order and commits by size and age.
    async fn run(
        &self,
        sinks: &mut [TableSink],
        done: Receiver<Result<Processed, WorkError>>,
    ) -> Result<Summary, RunError> {
        let config = self.config;
        let mut summary = Summary::default();
        let mut pending: BTreeMap<u64, Processed> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut positions: BTreeMap<String, StreamPosition> = BTreeMap::new();
        // Per sink, the streams read since it last committed.
        let mut dirty: Vec<BTreeSet<String>> = vec![BTreeSet::new(); sinks.len()];
        let mut buffered_rows = 0usize;
        let mut buffered_bytes = 0usize;
        let mut oldest: Option<Instant> = None;
        // Commits happen only between source transactions (see `Chunk::boundary`); files
        // spilled inside one are committed as soon as it ends.
        let mut at_boundary = true;
        let mut spilled = false;
        let mut reported_drops: BTreeSet<(String, String)> = BTreeSet::new();
        let max_age = Duration::from_millis(config.batch.max_age_ms.max(1));
        let buffered_limit = config.memory().buffered;

        loop {
            let wait = match oldest {
                // Inside a transaction the commit waits for its end, not for the clock.
                Some(_) if !at_boundary => max_age,
                Some(t) => max_age.saturating_sub(t.elapsed()),
                None => max_age,
            };
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
                let _ = self.permits.try_recv();
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
                    // A current table's rows are the log's (shared buffers): counted once.
                    if !self.router.is_current(sink) {
                        buffered_rows += batch.num_rows();
                        buffered_bytes += batch.get_array_memory_size();
                    }
                    if let (Some(publisher), Some(_)) = (self.publisher, self.router.primary_of(sink)) {
                        publisher.publish(sinks[sink].name(), &batch).await?;
                    }
                    sinks[sink].write(batch).await?;
                }
                positions.insert(
                    p.stream.to_string(),
                    StreamPosition {
                        offset: p.last_offset as i64,
                        attached: p.attached,
                    },
                );
                for streams in dirty.iter_mut() {
                    streams.insert(p.stream.to_string());
                }
                oldest.get_or_insert_with(Instant::now);
                metrics().record(&p.summary);
                summary.merge(p.summary);
                at_boundary = p.boundary;
                let full = buffered_rows >= config.batch.max_rows || buffered_bytes >= buffered_limit;
                let aged = oldest.is_some_and(|t| t.elapsed() >= max_age);
                if at_boundary && (full || spilled || aged) {
                    summary.commits += self.commit_all(sinks, &positions, &mut dirty, false).await?;
                    (buffered_rows, buffered_bytes, oldest, spilled) = (0, 0, waiting(&dirty), false);
                } else if full {
                    // Inside a large source transaction: files now, the commit at its end.
                    for sink in sinks.iter_mut() {
                        sink.spill().await?;
                    }
                    (buffered_rows, buffered_bytes, spilled) = (0, 0, true);
                }
            }
            if at_boundary && oldest.is_some_and(|t| t.elapsed() >= max_age) {
                summary.commits += self.commit_all(sinks, &positions, &mut dirty, false).await?;
                (buffered_rows, buffered_bytes, oldest, spilled) = (0, 0, waiting(&dirty), false);
            }
            if oldest.is_none() {
                metrics().idle();
            }
        }
        if self.abandoned.load(Ordering::SeqCst) {
            return Ok(summary);
        }
        if !pending.is_empty() {
            return Err(RunError::WorkerLost);
        }
        // A pass that ends inside a transaction leaves it uncommitted: it is read again.
        if at_boundary {
            summary.commits += self.commit_all(sinks, &positions, &mut dirty, true).await?;
        }
        Ok(summary)
    }

    /// Commits every sink with the positions of the streams read since its last commit; a
    /// current table only when its merge is due (always when `closing`: the pass ends).
    async fn commit_all(
        &self,
        sinks: &mut [TableSink],
        positions: &BTreeMap<String, StreamPosition>,
        dirty: &mut [BTreeSet<String>],
        closing: bool,
    ) -> Result<u64, RunError> {
        if dirty.iter().all(BTreeSet::is_empty) || self.abandoned.load(Ordering::SeqCst) {
            return Ok(0);
        }
        // Keys are durable before the ciphertext made with them (key transactions are not
        // synced one by one).
        self.keys.sync()?;
        // Published rows are acknowledged before the lake records them as done (at least once).
        if let Some(publisher) = self.publisher {
            publisher.flush().await?;
        }
        let router = self.router;
        let mut commits = 0;
        for (i, sink) in sinks.iter_mut().enumerate() {
            if dirty[i].is_empty() {
                continue;
            }
            if !sink.commits_now(closing) {
                sink.hold()?;
                continue;
            }
            // After a restart a sink may already stand past what was re-read: it never moves back
            // (the re-read rows it held were filtered out), and with nothing new it is not touched.
            let before = &router.committed[i];
            let mut covered = Vec::with_capacity(dirty[i].len());
            let mut attached = Vec::new();
            let mut advances = false;
            for s in dirty[i].iter() {
                let now = &positions[s];
                match before.get(s) {
                    Some(&b) if b >= now.offset => covered.push(SourcePosition {
                        stream: s.clone(),
                        offset: b,
                    }),
                    _ => {
                        advances = true;
                        covered.push(SourcePosition {
                            stream: s.clone(),
                            offset: now.offset,
                        });
                        // What a source keeps beside an offset belongs with that offset only.
                        attached.extend(now.attached.iter().cloned());
                    }
                }
            }
            if !advances && sink.buffered_rows() == 0 {
                dirty[i].clear();
                continue;
            }
            let rows = sink.buffered_rows();
            let started = Instant::now();
            let version = sink.commit(&covered, &attached).await?;
            #[cfg(feature = "failpoints")]
            crate::failpoints::hit(&format!("after-commit:{i}"));
            commits += 1;
            dirty[i].clear();
            metrics().committed(sink.name(), sink.format(), rows, started.elapsed());
            info!(
                table = sink.name(),
                format = sink.format(),
                version,
                rows,
                ms = started.elapsed().as_millis() as u64,
                "committed"
            );
        }
        // A stream is done (its source may let go of it, e.g. a replication slot's WAL) up to
        // what every sink has committed: not while a current table still holds its changes.
        if let Some(report) = self.reporter {
            let done: Vec<SourcePosition> = positions
                .iter()
                .filter(|(s, _)| dirty.iter().all(|d| !d.contains(*s)))
                .map(|(s, p)| SourcePosition {
                    stream: s.clone(),
                    offset: p.offset,
                })
                .collect();
            report(&done);
        }
        // (Readiness follows the logs: a current table's lag is by design, `max_lag_ms`.)
        metrics().all_committed();
        let (hits, misses) = self.keys.cache_stats();
        let (seen_hits, seen_misses) = self.cache_seen.replace((hits, misses));
        metrics().key_cache(hits.saturating_sub(seen_hits), misses.saturating_sub(seen_misses));
        metrics().erased_subjects(self.keys.erased_known());
        Ok(commits)
    }
}
