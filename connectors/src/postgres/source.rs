//! PostgreSQL beside the daemon: a consistent snapshot of the policy tables, then every
//! committed change from a logical replication slot (pgoutput), as Debezium events.
//!
//! Streams and positions:
//! - `pg/<slot>/snapshot/<schema.table>`: the table's snapshot rows; offset = rows taken.
//! - `pg/<slot>`: the change stream; offset = the commit LSN of the last transaction taken.
//!   All events of a transaction carry its commit LSN and the lake commits only between
//!   transactions (`Chunk::boundary`), so a transaction is never split across lake commits.
//!
//! Snapshots are exactly once across crashes because a table's snapshot is first read whole
//! into an encrypted spool file (the spool key lives in the key store; nothing readable
//! touches the disk), then fed from there: re-reading a spool from any position gives the same
//! rows, which a live snapshot query would not. A crash while a spool is written throws it
//! away and that table alone is read again under a new snapshot. The first snapshot is the
//! one the slot exported when it was created; any later one records which transactions it saw
//! (`pg_current_snapshot()`), and the stream skips those transactions' changes to that table.
//!
//! The slot is acknowledged only up to what every sink committed (after the lake commit),
//! and, when nothing is in flight, up to the marker messages the source writes into the WAL
//! every `heartbeat_ms`, so an idle capture does not hold WAL back.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lake::TableLocation;
use crate::postgres::pgoutput::{self, Datum, Message};
use crate::postgres::values::{parse_copy_line, write_event, EventSource, TableShape, TypeCatalog};
use crate::postgres::{self as pg, PgError, PgSettings, SlotState, Snapshot};
use crate::SourcePosition;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use sluice_transforms::crypto::DataKey;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::file::CHUNK_BYTES;
use crate::source::SourceError;
use crate::source::{Chunk, LineEnd};
use crate::source::{ChunkSender, ProgressReporter, ReaderEnd, Source};

/// A chunk this old is handed over at the next transaction end, full or not.
const HAND_OVER_AFTER: Duration = Duration::from_millis(100);
/// Rows per encrypted spool frame.
const FRAME_ROWS: u64 = 1024;
/// Microseconds between the Unix and the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;

pub struct PostgresOptions {
    pub settings: PgSettings,
    /// Pipeline name (the events' `source.name`).
    pub name: String,
    /// The policy tables, `(schema, table)`.
    pub tables: Vec<(String, String)>,
    pub spool_dir: PathBuf,
    pub spool_key: Arc<DataKey>,
    pub chunk_events: usize,
    pub heartbeat: Duration,
    /// Stop once every change committed before the start has been taken.
    pub once: bool,
    /// Per table (in `tables` order), the Delta tables its snapshot rows land in (its own
    /// table, the vault, the quarantine), and the pipeline's position prefix: a table's
    /// snapshot is done when those hold it, whatever tables added later lack. Empty when
    /// nothing is written to the lake (raw mode).
    pub snapshot_sinks: Vec<Vec<TableLocation>>,
    pub app_prefix: String,
}

pub struct PostgresSource {
    o: PostgresOptions,
    rt: Arc<tokio::runtime::Runtime>,
    control: Option<Client>,
    slot: SlotState,
    /// The slot just created this run: its replication session (kept open and idle so its
    /// exported snapshot stays importable) and the snapshot's name.
    created: Option<(ReplicationClient, String)>,
    types: TypeCatalog,
    /// Highest commit LSN every sink has committed.
    durable: Arc<AtomicU64>,
    /// Unmapped column types already reported (once per table and column).
    reported: HashSet<(String, String)>,
    /// `schema.table` → primary-key columns (raw events are keyed by them).
    pub primary_keys: HashMap<String, Vec<String>>,
    /// Held for the process's life: one capture per slot and spool directory.
    lock: Option<File>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SpoolMeta {
    /// The transactions the snapshot saw.
    snapshot: Snapshot,
    /// The WAL insert position read after the snapshot: a transaction committed at or past it
    /// is not in the snapshot.
    snapshot_lsn: u64,
    rows: u64,
    /// When the snapshot was read (the rows' event time).
    read_ms: i64,
}

/// A relation of the stream.
struct Relation {
    shape: TableShape,
    /// The snapshot the table's rows were read under (and the WAL position read after it):
    /// its transactions are already in.
    seen: Option<(Snapshot, u64)>,
}

struct Txn {
    xid: u32,
    lsn: u64,
    commit_ms: i64,
    emitted: bool,
    /// Already in every sink: its changes are not sent again.
    done: bool,
}

impl PostgresSource {
    pub fn new(o: PostgresOptions) -> Result<Self, SourceError> {
        // The replication session's task keeps answering the server while the reader thread
        // waits on a full queue.
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(SourceError::Runtime)?,
        );
        Ok(Self {
            o,
            rt,
            control: None,
            slot: SlotState::Missing,
            created: None,
            types: TypeCatalog::default(),
            durable: Arc::new(AtomicU64::new(0)),
            reported: HashSet::new(),
            primary_keys: HashMap::new(),
            lock: None,
        })
    }

    fn stream_name(&self) -> String {
        format!("pg/{}", self.o.settings.slot)
    }

    /// A table's snapshot stream, qualified by the snapshot (its WAL position): positions of an
    /// earlier snapshot of the table can never be applied to a later one's rows.
    fn snapshot_stream(&self, (schema, table): &(String, String), meta: &SpoolMeta) -> String {
        format!(
            "pg/{}/snapshot/{schema}.{table}@{:X}",
            self.o.settings.slot, meta.snapshot_lsn
        )
    }

    fn spool_paths(&self, (schema, table): &(String, String)) -> (PathBuf, PathBuf) {
        // Escaped so that no two (schema, table) pairs share a file name.
        let escape = |s: &str| -> String {
            s.chars()
                .map(|c| match c {
                    c if c.is_ascii_alphanumeric() || c == '_' => c.to_string(),
                    c => format!("%{:X}", c as u32),
                })
                .collect()
        };
        let name = format!("{}.{}", escape(schema), escape(table));
        let dir = self.o.spool_dir.join(&self.o.settings.slot);
        (dir.join(format!("{name}.meta.json")), dir.join(format!("{name}.spool")))
    }

    fn read_meta(&self, table: &(String, String)) -> Result<Option<SpoolMeta>, SourceError> {
        let (meta, _) = self.spool_paths(table);
        match std::fs::read(&meta) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| SourceError::Spool(format!("{}: {e}", meta.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SourceError::Spool(format!("{}: {e}", meta.display()))),
        }
    }

    /// How many rows of `stream` the tables table `i` lands in hold: (fewest, most). Without
    /// lake tables (raw mode) what `start` says.
    fn held(&self, i: usize, stream: &str, start: &HashMap<String, u64>) -> Result<(u64, u64), SourceError> {
        if self.o.snapshot_sinks.is_empty() {
            let n = start.get(stream).copied().unwrap_or(0);
            return Ok((n, n));
        }
        let (mut fewest, mut most) = (u64::MAX, 0);
        for location in &self.o.snapshot_sinks[i] {
            let held = self
                .rt
                .block_on(location.read_positions(&self.o.app_prefix, &[stream.to_string()]))?;
            let n = held[0].map_or(0, |p| p.max(0) as u64);
            (fewest, most) = (fewest.min(n), most.max(n));
        }
        Ok((fewest.min(most), most))
    }

    /// Whether table `i`'s own lake table holds any of `stream` (never in raw mode: no lake).
    fn own_table_holds(&self, i: usize, stream: &str) -> Result<bool, SourceError> {
        let Some(location) = self.o.snapshot_sinks.get(i).and_then(|s| s.first()) else {
            return Ok(false);
        };
        let held = self
            .rt
            .block_on(location.read_positions(&self.o.app_prefix, &[stream.to_string()]))?;
        Ok(held[0].is_some())
    }

    /// Binds a frame to its slot, table, snapshot and place in the spool.
    fn frame_aad(&self, table: &(String, String), snapshot_lsn: u64, frame: u64) -> Vec<u8> {
        format!(
            "sluice-spool\0{}\0{}\0{}\0{snapshot_lsn:X}\0{frame}",
            self.o.settings.slot, table.0, table.1
        )
        .into_bytes()
    }

    /// Reads the tables that have no spool yet into spools, under one snapshot.
    fn build_spools(&mut self, tables: &[(String, String)]) -> Result<(), SourceError> {
        let control = self.control.as_ref().expect("connected in begin_pass");
        let exported = self.created.as_ref().map(|(_, name)| name.clone());
        let (snapshot, snapshot_lsn) = self.rt.block_on(pg::begin_snapshot(control, exported.as_deref()))?;
        let read_ms = chrono::Utc::now().timestamp_millis();
        for table in tables {
            let shape = self
                .rt
                .block_on(pg::table_shape(control, &table.0, &table.1, &self.types))?;
            let (meta_path, spool_path) = self.spool_paths(table);
            let dir = spool_path.parent().expect("spool dir");
            std::fs::create_dir_all(dir).map_err(|e| SourceError::Spool(format!("{}: {e}", dir.display())))?;
            // An earlier meta must never be paired with the spool written now.
            match std::fs::remove_file(&meta_path) {
                Ok(()) => File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| SourceError::Spool(format!("{}: {e}", dir.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SourceError::Spool(format!("{}: {e}", meta_path.display()))),
            }
            let partial = spool_path.with_extension("spool.partial");
            let io = |e: std::io::Error| SourceError::Spool(format!("{}: {e}", partial.display()));
            let mut file = BufWriter::new(File::create(&partial).map_err(io)?);
            let mut frame: Vec<u8> = Vec::new();
            let (mut rows, mut frames) = (0u64, 0u64);
            let source = EventSource {
                connector_name: &self.o.name,
                database: &self.o.settings.database,
                lsn: 0,
                xid: 0,
                commit_ms: read_ms,
                snapshot: true,
            };
            let key = self.o.spool_key.clone();
            let seal = |frame: &mut Vec<u8>, index: u64, file: &mut BufWriter<File>| -> std::io::Result<()> {
                let sealed = key
                    .seal(frame, &self.frame_aad(table, snapshot_lsn, index))
                    .map_err(|_| std::io::Error::other("spool encryption failed"))?;
                file.write_all(&(sealed.len() as u32).to_be_bytes())?;
                file.write_all(&sealed)?;
                frame.clear();
                Ok(())
            };
            let copied = self.rt.block_on(pg::copy_table(control, &shape, |line| {
                let fields = parse_copy_line(line);
                let datums: Vec<Datum<'_>> = fields
                    .iter()
                    .map(|f| match f {
                        None => Datum::Null,
                        Some(bytes) => Datum::Text(bytes),
                    })
                    .collect();
                write_event(&mut frame, b'r', &shape, None, Some(&datums), &source, read_ms);
                frame.push(b'\n');
                rows += 1;
                if rows % FRAME_ROWS == 0 {
                    seal(&mut frame, frames, &mut file)?;
                    frames += 1;
                }
                Ok(())
            }))?;
            debug_assert_eq!(copied, rows);
            if !frame.is_empty() {
                seal(&mut frame, frames, &mut file).map_err(io)?;
            }
            let file = file.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&partial, &spool_path).map_err(io)?;
            // The meta file is what marks a spool complete: written last, atomically.
            let meta = SpoolMeta {
                snapshot: snapshot.clone(),
                snapshot_lsn,
                rows,
                read_ms,
            };
            let tmp = meta_path.with_extension("json.partial");
            std::fs::write(&tmp, serde_json::to_vec(&meta).expect("meta serializes"))
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &meta_path))
                .and_then(|_| File::open(dir)?.sync_all())
                .map_err(|e| SourceError::Spool(format!("{}: {e}", meta_path.display())))?;
            info!(table = %format!("{}.{}", table.0, table.1), rows, "snapshot read into the spool");
        }
        self.rt
            .block_on(control.batch_execute("COMMIT"))
            .map_err(|e| PgError::Sql {
                what: "ending the snapshot transaction".into(),
                reason: pg::describe(&e),
            })?;
        // The exported snapshot is no longer needed: close the slot's creating session.
        // (Dropping a session that never started replication ends it.)
        drop(self.created.take());
        Ok(())
    }

    /// Feeds a table's spool from `from` (rows already taken) to its end.
    fn feed_spool(
        &self,
        table: &(String, String),
        meta: &SpoolMeta,
        from: u64,
        out: &mut ChunkSender,
    ) -> Result<bool, SourceError> {
        let (_, path) = self.spool_paths(table);
        let io = |e: std::io::Error| SourceError::Spool(format!("{}: {e}", path.display()));
        let mut file = BufReader::new(File::open(&path).map_err(io)?);
        let stream: Arc<str> = Arc::from(self.snapshot_stream(table, meta).as_str());
        let mut chunk = Chunk::new(stream.clone(), self.o.chunk_events);
        let mut frame = from / FRAME_ROWS;
        for _ in 0..frame {
            let len = read_len(&mut file).map_err(io)?;
            file.seek(SeekFrom::Current(len as i64)).map_err(io)?;
        }
        let mut ordinal = frame * FRAME_ROWS;
        let mut sealed = Vec::new();
        let size = file.get_ref().metadata().map_err(io)?.len();
        while ordinal < meta.rows {
            let len = read_len(&mut file).map_err(io)?;
            if u64::from(len) > size.saturating_sub(file.stream_position().map_err(io)?) {
                return Err(SourceError::Spool(format!(
                    "{}: frame {frame} is cut short",
                    path.display()
                )));
            }
            sealed.resize(len as usize, 0);
            file.read_exact(&mut sealed).map_err(io)?;
            let plain = self
                .o
                .spool_key
                .open(&sealed, &self.frame_aad(table, meta.snapshot_lsn, frame))
                .map_err(|_| SourceError::Spool(format!("{}: frame {frame} does not decrypt", path.display())))?;
            for line in plain.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                ordinal += 1;
                if ordinal <= from {
                    continue;
                }
                chunk.push(
                    line,
                    LineEnd {
                        end_offset: ordinal,
                        len: line.len(),
                        terminated: true,
                    },
                );
                let full = chunk.lines.len() >= self.o.chunk_events || chunk.data.len() >= CHUNK_BYTES;
                if full
                    && !out.send(std::mem::replace(
                        &mut chunk,
                        Chunk::new(stream.clone(), self.o.chunk_events),
                    ))
                {
                    return Ok(false);
                }
            }
            frame += 1;
        }
        if ordinal != meta.rows {
            return Err(SourceError::Spool(format!(
                "{}: holds {ordinal} rows, its meta says {}",
                path.display(),
                meta.rows
            )));
        }
        Ok(chunk.lines.is_empty() || out.send(chunk))
    }

    /// Streams changes from the slot until the sink stops (or, with `once`, until every change
    /// committed before the start is taken).
    async fn stream(
        &mut self,
        start_lsn: u64,
        seen: HashMap<String, (Snapshot, u64)>,
        out: &mut ChunkSender,
    ) -> Result<ReaderEnd, SourceError> {
        let mut client = pg::start_stream(&self.o.settings, start_lsn).await?;
        let result = self.stream_events(&mut client, start_lsn, seen, out).await;
        // Release the slot before a next pass (or process) wants it.
        client.stop();
        let _ = client.shutdown().await;
        result
    }

    async fn stream_events(
        &mut self,
        client: &mut ReplicationClient,
        start_lsn: u64,
        seen: HashMap<String, (Snapshot, u64)>,
        out: &mut ChunkSender,
    ) -> Result<ReaderEnd, SourceError> {
        let control = self.control.as_ref().expect("connected in begin_pass");
        let settings = &self.o.settings;
        let replication = |source| PgError::Replication {
            slot: settings.slot.clone(),
            source,
        };
        info!(slot = %settings.slot, from = %pg::lsn_text(start_lsn), "streaming changes");
        // `--once` ends at a marker of its own, written now.
        let end_marker = format!(
            "end-of-once {}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        if self.o.once {
            pg::emit_marker(control, &end_marker).await?;
        }
        let stream: Arc<str> = Arc::from(self.stream_name().as_str());
        let new_chunk = || Chunk::new(stream.clone(), self.o.chunk_events);
        let mut chunk = new_chunk();
        // A chunk is handed over at a transaction's end once it holds `chunk_events`; a larger
        // transaction is cut, before a row so that its last chunk is never empty, at this size.
        let cut_at = self.o.chunk_events.saturating_mul(4).max(1);
        // When the chunk got its first line: a transaction's end hands over a chunk that old,
        // so a steady trickle of small transactions does not wait for the chunk to fill.
        let mut chunk_since: Option<Instant> = None;
        macro_rules! hand_over {
            () => {
                chunk_since = None;
                if !chunk.lines.is_empty() {
                    if !out.send(std::mem::replace(&mut chunk, new_chunk())) {
                        return Ok(ReaderEnd::Done);
                    }
                }
            };
        }
        let mut relations: HashMap<u32, Relation> = HashMap::new();
        let mut txn: Option<Txn> = None;
        let mut line = Vec::with_capacity(1024);
        // The newest commit LSN whose events were sent, and what the slot was told.
        let mut last_sent = start_lsn;
        let mut acked = start_lsn;
        let mut skipped_seen = 0u64;
        let mut next_marker = Instant::now() + self.o.heartbeat;
        let mut next_report = Instant::now() + Duration::from_secs(30);
        let mut last_commit_ms = 0i64;
        loop {
            let durable = self.durable.load(Ordering::SeqCst);
            if durable > acked {
                client.update_applied_lsn(Lsn::from_u64(durable));
                acked = durable;
            }
            if out.stopped() {
                return Ok(ReaderEnd::Done);
            }
            let now = Instant::now();
            if now >= next_marker {
                next_marker = now + self.o.heartbeat;
                if let Err(e) = pg::emit_marker(control, "heartbeat").await {
                    warn!(error = %e, "could not write the heartbeat marker");
                }
            }
            if now >= next_report {
                next_report = now + Duration::from_secs(30);
                let retained = pg::retained_wal(control, &settings.slot).await.ok().flatten();
                let behind_ms = (last_commit_ms > 0).then(|| chrono::Utc::now().timestamp_millis() - last_commit_ms);
                if let Some(bytes) = retained {
                    out.report_lag("postgres", bytes);
                }
                info!(
                    slot = %settings.slot,
                    committed = %pg::lsn_text(durable),
                    retained_wal_bytes = retained,
                    last_commit_age_ms = behind_ms,
                    skipped_seen_by_snapshot = skipped_seen,
                    "replication progress"
                );
            }
            let event = match tokio::time::timeout(Duration::from_millis(100), client.recv()).await {
                Err(_) => {
                    // Quiet: hand over what finished transactions left in the chunk.
                    if txn.is_none() {
                        hand_over!();
                    }
                    continue;
                }
                Ok(event) => event.map_err(replication)?,
            };
            let Some(event) = event else {
                return Err(PgError::Protocol {
                    what: "replication stream ended",
                }
                .into());
            };
            match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    let commit_ms = commit_time_micros / 1000 + PG_EPOCH_UNIX_MS;
                    last_commit_ms = commit_ms;
                    txn = Some(Txn {
                        xid,
                        lsn: final_lsn.as_u64(),
                        commit_ms,
                        emitted: false,
                        // Sent again after a restart at its commit LSN: every sink holds it.
                        done: final_lsn.as_u64() <= start_lsn,
                    });
                }
                ReplicationEvent::Commit { .. } => {
                    if let Some(t) = txn.take() {
                        if t.emitted {
                            last_sent = t.lsn;
                        }
                    }
                    chunk.boundary = true;
                    if chunk.lines.len() >= self.o.chunk_events
                        || chunk.data.len() >= CHUNK_BYTES
                        || chunk_since.is_some_and(|t| t.elapsed() >= HAND_OVER_AFTER)
                    {
                        hand_over!();
                    }
                }
                ReplicationEvent::XLogData { data, wal_start, .. } => {
                    let message = pgoutput::decode(&data).map_err(|source| PgError::Decode {
                        lsn: wal_start.to_string(),
                        source,
                    })?;
                    let at = || wal_start.to_string();
                    let (op, relation_ids, before, after) = match message {
                        Message::Relation(r) => {
                            relation(&mut self.types, &mut self.reported, control, r, &seen, &mut relations).await?;
                            continue;
                        }
                        Message::Insert { relation, new } => (b'c', vec![relation], None, Some(new)),
                        Message::Update { relation, old, new } => (b'u', vec![relation], old, Some(new)),
                        Message::Delete { relation, old } => (b'd', vec![relation], Some(old), None),
                        Message::Truncate { relations } => (b't', relations, None, None),
                        Message::Other => continue,
                    };
                    let Some(t) = txn.as_mut() else {
                        return Err(PgError::Protocol {
                            what: "a row change outside a transaction",
                        }
                        .into());
                    };
                    if t.done {
                        continue;
                    }
                    for id in relation_ids {
                        let rel = relations.get(&id).ok_or_else(|| PgError::UnknownRelation {
                            relation: id,
                            lsn: at(),
                        })?;
                        if rel
                            .seen
                            .as_ref()
                            .is_some_and(|(snapshot, lsn)| t.lsn < *lsn && snapshot.saw(t.xid))
                        {
                            skipped_seen += 1;
                            continue;
                        }
                        if chunk.lines.len() >= cut_at || chunk.data.len() >= CHUNK_BYTES {
                            hand_over!();
                        }
                        line.clear();
                        let source = EventSource {
                            connector_name: &self.o.name,
                            database: &settings.database,
                            lsn: t.lsn,
                            xid: t.xid,
                            commit_ms: t.commit_ms,
                            snapshot: false,
                        };
                        let now_ms = chrono::Utc::now().timestamp_millis();
                        write_event(
                            &mut line,
                            op,
                            &rel.shape,
                            before.as_deref(),
                            after.as_deref(),
                            &source,
                            now_ms,
                        );
                        chunk.push(
                            &line,
                            LineEnd {
                                end_offset: t.lsn,
                                len: line.len(),
                                terminated: true,
                            },
                        );
                        chunk.boundary = false;
                        chunk_since.get_or_insert_with(Instant::now);
                        t.emitted = true;
                    }
                }
                ReplicationEvent::Message {
                    prefix, lsn, content, ..
                } if prefix == "sluice" && txn.is_none() => {
                    // Every transaction committed before the marker has arrived.
                    hand_over!();
                    if self.o.once && content.as_ref() == end_marker.as_bytes() {
                        return Ok(ReaderEnd::Done);
                    }
                    // Nothing in flight: the WAL up to the marker holds nothing left to take.
                    if self.durable.load(Ordering::SeqCst) >= last_sent && lsn.as_u64() > acked {
                        client.update_applied_lsn(lsn);
                        acked = lsn.as_u64();
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(ReaderEnd::Done),
                _ => {}
            }
        }
    }
}

/// A Relation message: the table's current columns (after DDL too).
async fn relation(
    types: &mut TypeCatalog,
    reported: &mut HashSet<(String, String)>,
    control: &Client,
    r: pgoutput::Relation,
    seen: &HashMap<String, (Snapshot, u64)>,
    relations: &mut HashMap<u32, Relation>,
) -> Result<(), SourceError> {
    if r.columns.iter().any(|c| types.kind(c.type_oid).is_none()) {
        // A type created since start-up (an enum, a domain).
        *types = pg::load_types(control).await?;
    }
    let qualified = format!("{}.{}", r.namespace, r.name);
    let shape = TableShape {
            schema: r.namespace.clone(),
            table: r.name.clone(),
            columns: r
                .columns
                .iter()
                .map(|c| {
                    let kind = types.kind(c.type_oid).cloned().unwrap_or(pg::values::TypeKind::Unsupported);
                    if kind == pg::values::TypeKind::Unsupported && reported.insert((qualified.clone(), c.name.clone())) {
                        warn!(table = %qualified, column = %c.name, pg_type = types.name(c.type_oid), "column type has no mapping: events whose policy names it are quarantined");
                    }
                    (c.name.clone(), kind)
                })
                .collect(),
        };
    if let Some(old) = relations.get(&r.id) {
        let names = |s: &TableShape| s.columns.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let (before, now) = (names(&old.shape), names(&shape));
        let added: Vec<&String> = now.iter().filter(|c| !before.contains(c)).collect();
        let removed: Vec<&String> = before.iter().filter(|c| !now.contains(c)).collect();
        if !added.is_empty() || !removed.is_empty() {
            info!(table = %qualified, ?added, ?removed, "table columns changed (new columns reach the lake only when a policy names them)");
        }
    }
    relations.insert(
        r.id,
        Relation {
            shape,
            seen: seen.get(&qualified).cloned(),
        },
    );
    Ok(())
}

fn read_len(file: &mut impl Read) -> std::io::Result<u32> {
    let mut len = [0u8; 4];
    file.read_exact(&mut len)?;
    Ok(u32::from_be_bytes(len))
}

impl Source for PostgresSource {
    fn begin_pass(&mut self) -> Result<Vec<String>, SourceError> {
        if self.lock.is_none() {
            let dir = self.o.spool_dir.join(&self.o.settings.slot);
            let path = dir.join("lock");
            let fail = |e: std::io::Error| SourceError::Spool(format!("{}: {e}", path.display()));
            std::fs::create_dir_all(&dir).map_err(fail)?;
            let file = File::create(&path).map_err(fail)?;
            file.try_lock().map_err(|_| {
                SourceError::Spool(format!(
                    "{}: another capture of slot `{}` is running",
                    path.display(),
                    self.o.settings.slot
                ))
            })?;
            self.lock = Some(file);
        }
        let settings = self.o.settings.clone();
        let tables = self.o.tables.clone();
        let (control, slot, types, keys) = self.rt.block_on(async {
            let control = pg::connect(&settings).await?;
            let slot = pg::prepare(&control, &settings, &tables).await?;
            let types = pg::load_types(&control).await?;
            let mut keys = HashMap::new();
            for (schema, table) in &tables {
                keys.insert(
                    format!("{schema}.{table}"),
                    pg::primary_key(&control, schema, table).await?,
                );
            }
            Ok::<_, PgError>((control, slot, types, keys))
        })?;
        self.primary_keys = keys;
        self.control = Some(control);
        self.types = types;
        self.slot = slot;
        if slot == SlotState::Missing {
            let (session, snapshot) = self.rt.block_on(pg::create_slot(&settings))?;
            self.created = Some((session, snapshot));
        }
        // The snapshot streams of the spools that exist; a snapshot read in this pass has a
        // stream no table holds yet.
        let mut streams = Vec::new();
        for table in &self.o.tables {
            if let Some(meta) = self.read_meta(table)? {
                streams.push(self.snapshot_stream(table, &meta));
            }
        }
        streams.push(self.stream_name());
        Ok(streams)
    }

    fn read(&mut self, start: &HashMap<String, u64>, out: &mut ChunkSender) -> Result<ReaderEnd, SourceError> {
        let tables = self.o.tables.clone();
        let mut metas: Vec<Option<SpoolMeta>> = tables.iter().map(|t| self.read_meta(t)).collect::<Result<_, _>>()?;
        let change_stream = self.stream_name();
        // Per table: (fewest, most) rows of its snapshot the tables it lands in hold, and
        // whether its own table holds any of the change stream (it was captured before).
        let mut taken = Vec::with_capacity(tables.len());
        let mut captured = Vec::with_capacity(tables.len());
        for (i, meta) in metas.iter().enumerate() {
            taken.push(match meta {
                Some(m) => self.held(i, &self.snapshot_stream(&tables[i], m), start)?,
                None => (0, 0),
            });
            captured.push(self.own_table_holds(i, &change_stream)?);
        }
        if self.created.is_some() {
            // A new slot cannot continue what an earlier one captured.
            let lost = tables
                .iter()
                .zip(&metas)
                .zip(&captured)
                .find(|((_, m), &c)| m.is_some() || c);
            let what = match lost {
                Some(((t, _), _)) => Some(format!("{}.{}", t.0, t.1)),
                None if start.contains_key(&change_stream) => Some("the change stream".to_string()),
                None => None,
            };
            if let Some(what) = what {
                return Err(PgError::SlotLost {
                    slot: self.o.settings.slot.clone(),
                    what,
                }
                .into());
            }
        }
        // Which tables need a (new) snapshot. A spool is removed once every table it lands in
        // holds it: a snapshot is read again only if none of them holds any of it; a part
        // missing somewhere cannot be refilled (other tables would get its rows twice).
        let mut missing: Vec<(String, String)> = Vec::new();
        for (((table, meta), &(fewest, most)), &was_captured) in tables.iter().zip(&metas).zip(&taken).zip(&captured) {
            let name = format!("{}.{}", table.0, table.1);
            match meta {
                None if was_captured => {
                    return Err(SourceError::Spool(format!(
                        "{name}: captured before, but its snapshot record in {} is gone; \
                         restore the spool directory, or recreate the pipeline's tables to start over",
                        self.o.spool_dir.display()
                    )))
                }
                None => missing.push(table.clone()),
                Some(m) if fewest < m.rows && !self.spool_paths(table).1.exists() => {
                    if most > 0 {
                        return Err(SourceError::Spool(format!(
                            "{name}: some of the lake's tables hold {most} of the snapshot's {} rows, \
                             others {fewest}, and the spool is gone; recreate the pipeline's tables to start over",
                            m.rows
                        )));
                    }
                    missing.push(table.clone());
                }
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            self.build_spools(&missing)?;
            metas = tables.iter().map(|t| self.read_meta(t)).collect::<Result<_, _>>()?;
        } else {
            drop(self.created.take());
        }
        let mut seen = HashMap::new();
        for ((table, meta), &(taken, _)) in tables.iter().zip(&metas).zip(&taken) {
            let meta = meta.as_ref().expect("every spool exists now");
            // A table just read under a new snapshot starts from its first row.
            let taken = if missing.contains(table) { 0 } else { taken };
            if taken < meta.rows {
                if !self.feed_spool(table, meta, taken, out)? {
                    return Ok(ReaderEnd::Done);
                }
            } else {
                // Every sink holds the whole snapshot: the spool's rows are no longer needed.
                let (_, spool) = self.spool_paths(table);
                if spool.exists() {
                    let _ = std::fs::remove_file(&spool);
                }
            }
            seen.insert(
                format!("{}.{}", table.0, table.1),
                (meta.snapshot.clone(), meta.snapshot_lsn),
            );
        }
        let start_lsn = start.get(&self.stream_name()).copied().unwrap_or(0);
        self.durable.fetch_max(start_lsn, Ordering::SeqCst);
        // What every sink committed and a run that ended (`--once`) did not acknowledge yet.
        if let SlotState::Ready { confirmed_flush } = self.slot {
            if start_lsn > confirmed_flush {
                let control = self.control.as_ref().expect("connected in begin_pass");
                self.rt
                    .block_on(pg::advance_slot(control, &self.o.settings.slot, start_lsn))?;
            }
        }
        let rt = self.rt.clone();
        rt.block_on(self.stream(start_lsn, seen, out))
    }

    /// A run that ended (`--once`) acknowledges its last commit on the now idle slot, so the
    /// server does not keep the WAL until the next run.
    fn finish(&mut self) {
        let durable = self.durable.load(Ordering::SeqCst);
        let (Some(control), true) = (self.control.as_ref(), durable > 0) else {
            return;
        };
        if let Err(e) = self
            .rt
            .block_on(pg::advance_slot(control, &self.o.settings.slot, durable))
        {
            warn!(error = %e, "could not acknowledge the last commit to the slot");
        }
    }

    fn progress_reporter(&self) -> Option<Arc<ProgressReporter>> {
        let durable = self.durable.clone();
        let stream = self.stream_name();
        Some(Arc::new(move |positions: &[SourcePosition]| {
            for p in positions.iter().filter(|p| p.stream == stream) {
                durable.fetch_max(p.offset.max(0) as u64, Ordering::SeqCst);
            }
        }))
    }
}
