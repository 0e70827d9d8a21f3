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

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use sluice_transforms::crypto::DataKey;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::file::CHUNK_BYTES;
use crate::lake::TableLocation;
use crate::postgres::pgoutput::{self, Datum, Message};
use crate::postgres::values::{parse_copy_line, write_event, EventSource, TableShape, TypeCatalog};
use crate::postgres::{self as pg, PgError, PgSettings, SlotState, Snapshot};
use crate::source::{Chunk, ChunkSender, LineEnd, ProgressReporter, ReaderEnd, Source, SourceError};
use crate::SourcePosition;

mod spool;
mod stream;

use spool::SpoolMeta;

pub(crate) struct PostgresOptions {
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

impl PostgresSource {
    pub(crate) fn new(o: PostgresOptions) -> Result<Self, SourceError> {
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

    /// How many rows of `stream` the tables table `i` lands in hold: (fewest, most). Without
    /// lake tables (raw mode) what `start` says.
    fn held(&self, i: usize, stream: &str, start: &HashMap<String, u64>) -> Result<(u64, u64), SourceError> {
        if self.o.snapshot_sinks.is_empty() {
            let n = start.get(stream).copied().unwrap_or(0);
            return Ok((n, n));
        }
        let standing = self.rt.block_on(crate::lake::standings(
            &self.o.snapshot_sinks[i],
            &self.o.app_prefix,
            &[stream.to_string()],
        ))?[0];
        let rows = |offset: Option<i64>| offset.map_or(0, |p| p.max(0) as u64);
        // A table that holds none of the stream holds 0 rows of it.
        let fewest = if standing.missing_somewhere {
            0
        } else {
            rows(standing.lowest)
        };
        Ok((fewest, rows(standing.highest)))
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
