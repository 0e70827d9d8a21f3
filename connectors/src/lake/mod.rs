//! A table of the lake in either format: where it is, its committed positions, and a sink that
//! appends to it. The pipeline sees one list of these whatever the format(s) configured.

use std::sync::Arc;

use arrow_array::RecordBatch;
use iceberg::Catalog;

pub mod current;
mod layout;
mod ops;
mod positions;
pub(crate) mod schema;
pub(crate) mod tags;
use current::CurrentSink;
pub use current::{current_schema, CurrentSettings};
pub use layout::{delta_table, table_locations, LakeFormat};
pub(crate) use positions::standings;
pub use positions::StreamStanding;
pub use schema::SchemaChange;
pub use tags::{ColumnTags, TableTags};

use crate::delta::{DeltaSink, DeltaSinkError};
use crate::iceberg::{IcebergLocation, IcebergSink, IcebergSinkError};
use crate::storage::LakePath;
use crate::SourcePosition;

/// How a table is laid out and described, beside its schema: its partition column, the columns
/// whose per-file minimum and maximum its log or manifests may keep, and its columns' classes
/// and tags (`None`: left as they are).
#[derive(Debug, Clone, Copy, Default)]
pub struct TableLayout<'a> {
    pub partition: Option<&'a str>,
    pub stats_columns: &'a [String],
    pub tags: Option<&'a TableTags>,
}

/// A column's Parquet dictionary is given up once it holds this much. Columns that repeat (a
/// status, a channel, an hour) stay far below it; tokens and other per-person values never do,
/// and the parquet crate's default of 1 MiB kept up to a mebibyte of them interned per column
/// and partition until each commit (~40 MiB of a 192 MiB budget, `heaptrack`) before falling
/// back to plain encoding anyway.
pub(crate) const DICTIONARY_PAGE_LIMIT: usize = 64 << 10;

/// Parquet settings every table of the lake starts from, whatever its format: snappy, and small
/// dictionaries (see [`DICTIONARY_PAGE_LIMIT`]).
pub(crate) fn parquet_properties() -> deltalake::parquet::file::properties::WriterPropertiesBuilder {
    deltalake::parquet::file::properties::WriterProperties::builder()
        .set_compression(deltalake::parquet::basic::Compression::SNAPPY)
        .set_dictionary_page_size_limit(DICTIONARY_PAGE_LIMIT)
}

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error(transparent)]
    Delta(#[from] DeltaSinkError),
    #[error(transparent)]
    Iceberg(#[from] IcebergSinkError),
    /// A table could not be registered for a query (DataFusion's message).
    #[error("{0}")]
    Query(String),
}

impl LakeError {
    /// Another writer's commit conflicted with this one's (a compaction, an erasure): prepare
    /// again on the new version.
    pub(crate) fn is_conflict(&self) -> bool {
        match self {
            LakeError::Delta(e) => e.is_conflict(),
            LakeError::Iceberg(e) => e.is_conflict(),
            LakeError::Query(_) => false,
        }
    }

    /// Another writer committed a stream this one holds: drop uncommitted work, read again.
    pub(crate) fn is_fenced(&self) -> bool {
        matches!(
            self,
            LakeError::Delta(DeltaSinkError::Fenced { .. }) | LakeError::Iceberg(IcebergSinkError::Fenced { .. })
        )
    }
}

/// Where a table of the lake is.
#[derive(Debug, Clone, PartialEq)]
pub enum TableLocation {
    Delta(LakePath),
    Iceberg { location: IcebergLocation, table: String },
}

impl TableLocation {
    /// Committed positions of `streams` (`None` where the table or the stream has none).
    pub async fn read_positions(&self, app_prefix: &str, streams: &[String]) -> Result<Vec<Option<i64>>, LakeError> {
        match self {
            TableLocation::Delta(path) => Ok(DeltaSink::read_positions(path, app_prefix, streams).await?),
            TableLocation::Iceberg { location, table } => {
                let catalog = location.connect().await?;
                Ok(crate::iceberg::read_positions(catalog.as_ref(), location, table, app_prefix, streams).await?)
            }
        }
    }

    /// For logs and errors: a path or `catalog.namespace.table`.
    pub fn describe(&self) -> String {
        match self {
            TableLocation::Delta(path) => path.to_string(),
            TableLocation::Iceberg { location, table } => {
                format!("{}.{}.{}", location.catalog_name, location.namespace, table)
            }
        }
    }
}

/// A table being appended to, in either format (which, only this module knows).
pub struct TableSink(Sink);

/// (A few per run, never moved in a hot loop: their size difference does not matter.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Sink {
    Delta(DeltaSink),
    Iceberg(IcebergSink),
    /// A current-state table, kept in either format.
    Current(Box<CurrentSink>),
}

/// Catalogs opened once per run and shared by the tables in them.
#[derive(Default)]
pub struct Catalogs(Vec<(IcebergLocation, Arc<dyn Catalog>)>);

impl Catalogs {
    pub async fn get(&mut self, location: &IcebergLocation) -> Result<Arc<dyn Catalog>, LakeError> {
        if let Some((_, c)) = self.0.iter().find(|(l, _)| l.catalog == location.catalog) {
            return Ok(c.clone());
        }
        let catalog = location.connect().await?;
        self.0.push((location.clone(), catalog.clone()));
        Ok(catalog)
    }
}

/// A data file of a current table.
pub(crate) struct BucketFile {
    pub(crate) path: String,
    pub(crate) bucket: i32,
    pub(crate) size: u64,
    /// Delta: its `add` action (what removing it takes).
    add: Option<deltalake::kernel::Add>,
}

impl Sink {
    fn name(&self) -> &str {
        match self {
            Sink::Delta(s) => s.name(),
            Sink::Iceberg(s) => s.name(),
            Sink::Current(s) => s.table().name(),
        }
    }

    fn format(&self) -> &'static str {
        match self {
            Sink::Delta(_) => "delta",
            Sink::Iceberg(_) => "iceberg",
            Sink::Current(s) => s.table().format(),
        }
    }

    async fn committed(&mut self, stream: &str) -> Result<Option<i64>, LakeError> {
        Ok(match self {
            Sink::Delta(s) => s.committed(stream).await?,
            Sink::Iceberg(s) => s.committed(stream).await?,
            Sink::Current(s) => Box::pin(s.table_mut().committed(stream)).await?,
        })
    }

    fn buffered_rows(&self) -> usize {
        match self {
            Sink::Delta(s) => s.buffered_rows(),
            Sink::Iceberg(s) => s.buffered_rows(),
            Sink::Current(s) => s.buffered_rows(),
        }
    }

    /// Arrow bytes not yet in a file (Iceberg writes its files as rows come: none).
    fn buffered_bytes(&self) -> usize {
        match self {
            Sink::Delta(s) => s.buffered_bytes(),
            _ => 0,
        }
    }

    async fn write(&mut self, batch: RecordBatch) -> Result<(), LakeError> {
        match self {
            Sink::Delta(s) => s.write(batch).await?,
            Sink::Iceberg(s) => s.write(batch).await?,
            Sink::Current(s) => s.write(batch),
        }
        Ok(())
    }

    async fn spill(&mut self) -> Result<(), LakeError> {
        match self {
            Sink::Delta(s) => s.spill().await?,
            Sink::Iceberg(s) => s.spill().await?,
            // Inside a large source transaction: the changes are reduced, not written.
            Sink::Current(s) => s.hold()?,
        }
        Ok(())
    }

    async fn commit(&mut self, positions: &[SourcePosition], attached: &[SourcePosition]) -> Result<i64, LakeError> {
        Ok(match self {
            Sink::Delta(s) => s.commit(positions, attached).await? as i64,
            Sink::Iceberg(s) => s.commit(positions, attached).await?,
            Sink::Current(s) => s.commit(positions, attached).await?,
        })
    }

    /// A current table's files with their buckets, read afresh.
    async fn bucket_files(&mut self) -> Result<Vec<BucketFile>, LakeError> {
        Ok(match self {
            Sink::Delta(s) => s
                .live_files()
                .await?
                .into_iter()
                .map(|add| BucketFile {
                    path: add.path.clone(),
                    bucket: add
                        .partition_values
                        .get(current::BUCKET_COLUMN)
                        .and_then(|v| v.as_deref()?.parse().ok())
                        .unwrap_or(-1),
                    size: add.size.max(0) as u64,
                    add: Some(add),
                })
                .collect(),
            Sink::Iceberg(s) => s
                .live_files()
                .await?
                .into_iter()
                .map(|(path, bucket, size)| BucketFile {
                    path,
                    bucket: bucket.unwrap_or(-1),
                    size,
                    add: None,
                })
                .collect(),
            Sink::Current(_) => unreachable!("a current table's own table is Delta or Iceberg"),
        })
    }

    async fn read_file(&self, path: &str) -> Result<bytes::Bytes, LakeError> {
        Ok(match self {
            Sink::Delta(s) => s.read_file(path, None).await?,
            Sink::Iceberg(s) => s.read_file(path, None).await?,
            Sink::Current(_) => unreachable!("a current table's own table is Delta or Iceberg"),
        })
    }

    /// Bytes `range` of a data file (a footer, a Bloom filter: not the whole file).
    async fn read_range(&self, path: &str, range: std::ops::Range<u64>) -> Result<bytes::Bytes, LakeError> {
        Ok(match self {
            Sink::Delta(s) => s.read_file(path, Some(range)).await?,
            Sink::Iceberg(s) => s.read_file(path, Some(range)).await?,
            Sink::Current(_) => unreachable!("a current table's own table is Delta or Iceberg"),
        })
    }

    /// Commits what was written since the last commit, removing `removed` (files of the
    /// buckets in `scope`; every bucket when `None`), with `positions`.
    async fn commit_replacing(
        &mut self,
        removed: &[&BucketFile],
        scope: Option<Vec<i32>>,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<i64, LakeError> {
        Ok(match self {
            Sink::Delta(s) => {
                let adds: Vec<deltalake::kernel::Add> = removed.iter().filter_map(|f| f.add.clone()).collect();
                let predicate = scope.filter(|_| !adds.is_empty()).map(|buckets| {
                    let list: Vec<String> = buckets.iter().map(i32::to_string).collect();
                    format!("{} IN ({})", current::BUCKET_COLUMN, list.join(", "))
                });
                s.commit_replacing(&adds, predicate, positions, attached).await? as i64
            }
            Sink::Iceberg(s) => {
                let paths = removed.iter().map(|f| f.path.clone()).collect();
                s.commit_replacing(&paths, positions, attached).await?
            }
            Sink::Current(_) => unreachable!("a current table's own table is Delta or Iceberg"),
        })
    }

    async fn discard_uncommitted(&mut self) -> Result<(), LakeError> {
        match self {
            Sink::Delta(s) => s.discard_uncommitted().await?,
            Sink::Iceberg(s) => s.discard_uncommitted().await?,
            Sink::Current(_) => unreachable!("a current table's own table is Delta or Iceberg"),
        }
        Ok(())
    }
}

impl TableSink {
    /// This table as the current-state table it is (opened with [`current_schema`] and
    /// partitioned by its bucket): it merges the change-log rows it is given. `erased` marks
    /// rows of subjects erased since they were read (asked at each merge).
    pub fn keeping_current(
        self,
        schema: arrow_schema::SchemaRef,
        settings: CurrentSettings,
        erased: Arc<current::ErasedRows>,
    ) -> Result<Self, LakeError> {
        let first_key = settings.key.first().cloned().unwrap_or_default();
        // A current table's own table is Delta or Iceberg, never another current table.
        let table = match self.0 {
            Sink::Delta(s) => Sink::Delta(s.with_bloom_filter(&first_key)?),
            Sink::Iceberg(s) => Sink::Iceberg(s.with_bloom_filter(&first_key)),
            current @ Sink::Current(_) => return Ok(TableSink(current)),
        };
        Ok(TableSink(Sink::Current(Box::new(CurrentSink::new(
            table, schema, settings, erased,
        )))))
    }

    pub fn name(&self) -> &str {
        self.0.name()
    }

    pub fn format(&self) -> &'static str {
        self.0.format()
    }

    pub async fn committed(&mut self, stream: &str) -> Result<Option<i64>, LakeError> {
        self.0.committed(stream).await
    }

    /// The distinct values a string column holds, per the table's file statistics (Delta's
    /// log); empty where the format's statistics are not read here (Iceberg, current tables).
    pub fn column_values_in_stats(&self, column: &str) -> Result<Vec<String>, LakeError> {
        Ok(match &self.0 {
            Sink::Delta(s) => s.column_values_in_stats(column)?,
            _ => Vec::new(),
        })
    }

    pub fn buffered_rows(&self) -> usize {
        self.0.buffered_rows()
    }

    pub async fn write(&mut self, batch: RecordBatch) -> Result<(), LakeError> {
        self.0.write(batch).await
    }

    pub async fn spill(&mut self) -> Result<(), LakeError> {
        self.0.spill().await
    }

    /// Whether this sink commits now: every sink does, but a current table merges only when
    /// due (see [`CurrentSettings::max_lag`]) or when the run ends (`closing`).
    pub fn commits_now(&self, closing: bool) -> bool {
        match &self.0 {
            Sink::Current(s) => s.due(closing),
            _ => true,
        }
    }

    /// A sink that does not commit now keeps what it holds for later (a current table
    /// reduces it to the last event per key).
    pub fn hold(&mut self) -> Result<(), LakeError> {
        match &mut self.0 {
            Sink::Current(s) => s.hold(),
            _ => Ok(()),
        }
    }

    /// Commits the buffered rows with `positions`; returns the table's new version (Delta) or
    /// sequence number (Iceberg).
    pub async fn commit(
        &mut self,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<i64, LakeError> {
        self.0.commit(positions, attached).await
    }
}

use crate::delta::erase::{ErasureTarget, FileProgress, PreparedErasure, RowMatcher, TableErasure, Treatment};
use crate::iceberg::erase::{IcebergErasureTarget, PreparedIcebergErasure};

/// A table opened for erasure, in either format (see `delta::erase` and `iceberg::erase`).
pub struct ErasureTable(Erasing);

#[allow(clippy::large_enum_variant)]
enum Erasing {
    Delta(ErasureTarget),
    Iceberg(IcebergErasureTarget),
}

/// Where a table still holds matched rows (see [`ErasureTable::residue`]).
#[derive(Debug, Default)]
pub struct Residue {
    /// Current files, with their matched rows: written after the rewrite by a writer that had
    /// not yet seen the erasure.
    pub current: Vec<(String, u64)>,
    /// Files only older versions hold, or no version holds and old enough: safe to delete.
    pub deletable: Vec<String>,
    /// Files no version holds, written recently, with their matched rows.
    pub recent: Vec<(String, u64)>,
    /// History files (commit log, metadata, manifests) naming what was looked for.
    pub log_files: Vec<String>,
}

/// Replacement files written for an erasure, not committed yet.
pub struct PreparedTableErasure(Prepared);

enum Prepared {
    Delta(PreparedErasure),
    Iceberg(PreparedIcebergErasure),
}

impl PreparedTableErasure {
    pub fn outcome(&self) -> &TableErasure {
        match &self.0 {
            Prepared::Delta(p) => &p.outcome,
            Prepared::Iceberg(p) => &p.outcome,
        }
    }
}

impl ErasureTable {
    /// `None` where there is no table (yet). `app_id` marks the erasure commit of the job.
    pub async fn open(
        location: &TableLocation,
        catalogs: &mut Catalogs,
        name: &str,
        app_id: String,
    ) -> Result<Option<Self>, LakeError> {
        Ok(match location {
            TableLocation::Delta(path) => ErasureTarget::open(path, name, app_id)
                .await?
                .map(|t| ErasureTable(Erasing::Delta(t))),
            TableLocation::Iceberg { location, table } => {
                IcebergErasureTarget::open(catalogs.get(location).await?, location, table, app_id)
                    .await?
                    .map(|t| ErasureTable(Erasing::Iceberg(t)))
            }
        })
    }

    pub async fn committed(&self) -> Result<bool, LakeError> {
        Ok(match &self.0 {
            Erasing::Delta(t) => t.committed().await?,
            Erasing::Iceberg(t) => t.committed().await?,
        })
    }

    pub async fn file_count(&self) -> Result<u64, LakeError> {
        Ok(match &self.0 {
            Erasing::Delta(t) => t.file_count()?,
            Erasing::Iceberg(t) => t.file_count().await?,
        })
    }

    pub async fn prepare(
        &mut self,
        matcher: &RowMatcher,
        treatment: &Treatment,
        dry_run: bool,
        progress: FileProgress<'_>,
    ) -> Result<PreparedTableErasure, LakeError> {
        Ok(match &mut self.0 {
            Erasing::Delta(t) => {
                PreparedTableErasure(Prepared::Delta(t.prepare(matcher, treatment, dry_run, progress).await?))
            }
            Erasing::Iceberg(t) => PreparedTableErasure(Prepared::Iceberg(
                t.prepare(matcher, treatment, dry_run, progress).await?,
            )),
        })
    }

    /// Commits a prepared erasure; returns the table's new version (Delta) or sequence number
    /// (Iceberg), `None` when nothing matched.
    pub async fn commit(&mut self, prepared: &mut PreparedTableErasure) -> Result<Option<u64>, LakeError> {
        match (&mut self.0, &mut prepared.0) {
            (Erasing::Delta(t), Prepared::Delta(p)) => {
                t.commit(p).await?;
                Ok(p.outcome.version)
            }
            (Erasing::Iceberg(t), Prepared::Iceberg(p)) => {
                t.commit(p).await?;
                Ok(p.outcome.version)
            }
            _ => unreachable!("an erasure is prepared and committed on the same table"),
        }
    }

    /// After the erasure commit: no older version may hold the rows (or, in a Delta log's
    /// statistics, describe them). Delta: [`crate::delta::drop_history`]; Iceberg's erasure
    /// commit already expired every older snapshot (`None`).
    /// Removes the history older than the erasure: Delta's log before a checkpoint and the
    /// files only it named; Iceberg's older snapshots and the files only they referenced
    /// (`checkpoint_version` = the erasure snapshot's sequence number).
    pub async fn drop_history(&mut self) -> Result<Option<crate::delta::DroppedHistory>, LakeError> {
        Ok(match &mut self.0 {
            Erasing::Delta(t) => Some(t.drop_history().await?),
            Erasing::Iceberg(t) => {
                t.expire_history()
                    .await?
                    .map(|(data_files_deleted, sequence_number)| crate::delta::DroppedHistory {
                        checkpoint_version: sequence_number,
                        log_files_deleted: 0,
                        data_files_deleted,
                    })
            }
        })
    }

    pub async fn delete_files(&self, paths: &[String]) -> Result<u64, LakeError> {
        Ok(match &self.0 {
            Erasing::Delta(t) => t.delete_files(paths).await?,
            Erasing::Iceberg(t) => t.delete_files(paths).await?,
        })
    }

    async fn scan_all_files(&self, matcher: &RowMatcher) -> Result<Vec<(String, u64, i64)>, LakeError> {
        Ok(match &self.0 {
            Erasing::Delta(t) => t.scan_all_files(matcher).await?,
            Erasing::Iceberg(t) => t.scan_all_files(matcher).await?,
        })
    }

    /// What the table still holds of `matcher`'s rows, file by file, after an erasure: in its
    /// current files, in files only older versions hold or no version holds (deletable, unless
    /// written less than `orphan_min_age_ms` before `now_ms`: maybe a writer's transaction in
    /// flight), and its history (Delta log, Iceberg metadata and manifests) in which `in_log`
    /// finds something.
    pub async fn residue(
        &self,
        matcher: &RowMatcher,
        in_log: &(dyn Fn(&[u8]) -> bool + Sync),
        orphan_min_age_ms: i64,
        now_ms: i64,
    ) -> Result<Residue, LakeError> {
        let active: std::collections::HashSet<String> = self.active_files().await?.into_iter().collect();
        let history = self.history_files().await?;
        let mut residue = Residue::default();
        for (path, matched, modified_ms) in self.scan_all_files(matcher).await? {
            if matched == 0 {
                continue;
            }
            if active.contains(&path) {
                residue.current.push((path, matched));
            } else if history.contains(&path) || now_ms - modified_ms >= orphan_min_age_ms {
                residue.deletable.push(path);
            } else {
                residue.recent.push((path, matched));
            }
        }
        residue.log_files = self.log_files_where(in_log).await?;
        Ok(residue)
    }

    /// Table history (Delta log, Iceberg metadata and manifests) in which `found` finds
    /// something.
    async fn log_files_where(&self, found: &(dyn Fn(&[u8]) -> bool + Sync)) -> Result<Vec<String>, LakeError> {
        Ok(match &self.0 {
            Erasing::Delta(t) => t.log_files_where(found).await?,
            Erasing::Iceberg(t) => t.log_files_where(found).await?,
        })
    }

    /// Data files only older versions hold (readable by time travel).
    async fn history_files(&self) -> Result<std::collections::HashSet<String>, LakeError> {
        Ok(match &self.0 {
            Erasing::Delta(t) => t.history_files().await?,
            Erasing::Iceberg(t) => t.history_files().await?,
        })
    }

    async fn active_files(&self) -> Result<Vec<String>, LakeError> {
        Ok(match &self.0 {
            Erasing::Delta(t) => t.active_files()?,
            Erasing::Iceberg(t) => t.active_files().await?,
        })
    }
}
