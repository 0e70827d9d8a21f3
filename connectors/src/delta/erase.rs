//! Erasure inside a Delta table: every data file holding an erased subject's rows is rewritten
//! without them (or with them unlinked) in one commit, and the old files are then deleted
//! physically, so no table version — time travel included — can bring the rows back.
//!
//! No DataFusion (a large build for one predicate): the files are read with `parquet`, the rows
//! chosen with a caller's matcher over a few columns, and the commit built from `remove`/`add`
//! actions like any other. Each file is read and rewritten at most once per job, whatever the
//! number of subjects.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{
    new_null_array, ArrayRef, BooleanArray, RecordBatch, Scalar, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, TimeUnit};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Remove, Transaction};
use deltalake::logstore::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::arrow::{ArrowWriter, ProjectionMask};
use deltalake::parquet::file::reader::ChunkReader;
use deltalake::protocol::DeltaOperation;
use deltalake::{DeltaTable, Path as StorePath};

use super::{writer_properties, DeltaSinkError};

/// Why a data file could not be read or rewritten for an erasure (never a value: names only).
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    #[error(transparent)]
    Parquet(#[from] deltalake::parquet::errors::ParquetError),
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("column {0} is missing")]
    MissingColumn(String),
    #[error("column {0} is not a timestamp")]
    NotTimestamp(String),
    #[error("column {0} is neither nullable nor text: cannot blank it")]
    CannotBlank(String),
    /// The caller's matcher refused a batch.
    #[error("{0}")]
    Matcher(String),
}

/// Marks the rows of a batch (holding a matcher's columns) that belong to erased subjects.
pub(crate) type MatchRows = dyn Fn(&RecordBatch) -> Result<BooleanArray, String> + Send + Sync;

/// Which rows belong to the erased subjects: reads only `columns` of each file.
pub struct RowMatcher {
    pub columns: Vec<String>,
    pub matches: Box<MatchRows>,
}

/// What happens to matched rows.
#[derive(Debug, Clone)]
pub enum Treatment {
    Delete,
    /// Set these columns to null (or to "" where the column is not nullable); the rows stay.
    Blank(Vec<String>),
}

/// What erasure did, or in a dry run would do, to one table.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TableErasure {
    pub files_scanned: u64,
    pub rows_matched: u64,
    /// Files rewritten (or dropped when nothing of them remained) and then deleted.
    pub files_removed: Vec<String>,
    pub files_added: u64,
    /// Bytes of the files read in full and written anew.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Table version of the erasure commit; `None` when nothing matched.
    pub version: Option<u64>,
}

/// Replacement files written, their commit not made yet.
pub(crate) struct PreparedErasure {
    pub outcome: TableErasure,
    actions: Vec<Action>,
}

/// A table opened for erasure.
pub(crate) struct ErasureTarget {
    name: String,
    location: crate::storage::LakePath,
    table: DeltaTable,
    app_id: String,
}

/// Progress of a long job: called after each file.
pub(crate) type FileProgress<'a> = &'a (dyn Fn(u64) + Sync);

impl ErasureTarget {
    /// Opens the table at `location`; `None` if there is no table there. `app_id` marks the
    /// erasure commit (one per job), so a rerun knows it is done.
    pub(crate) async fn open(
        location: &crate::storage::LakePath,
        name: &str,
        app_id: String,
    ) -> Result<Option<Self>, DeltaSinkError> {
        let Some(table) = super::open_existing(location, name).await? else {
            return Ok(None);
        };
        Ok(Some(Self {
            name: name.to_string(),
            location: location.clone(),
            table,
            app_id,
        }))
    }

    fn err(&self, source: deltalake::DeltaTableError) -> DeltaSinkError {
        DeltaSinkError::Delta {
            table: self.name.clone(),
            source: Box::new(source),
        }
    }

    fn store_err(&self, e: impl std::fmt::Display) -> DeltaSinkError {
        self.err(deltalake::DeltaTableError::Generic(e.to_string()))
    }

    /// Whether this job's erasure commit is in the table already.
    pub(crate) async fn committed(&self) -> Result<bool, DeltaSinkError> {
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        Ok(snapshot
            .transaction_version(self.table.log_store().as_ref(), self.app_id.clone())
            .await
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// Number of data files in the current version (for progress bars).
    pub(crate) fn file_count(&self) -> Result<u64, DeltaSinkError> {
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        Ok(snapshot.log_data().into_iter().count() as u64)
    }

    /// Finds the matched rows and, unless `dry_run`, writes the files that replace those
    /// holding them (not committed yet: see [`ErasureTarget::commit`]). The outcome names the
    /// files the commit will remove: save it before committing, so that a job killed after the
    /// commit deletes them on its rerun.
    pub(crate) async fn prepare(
        &mut self,
        matcher: &RowMatcher,
        treatment: &Treatment,
        dry_run: bool,
        progress: FileProgress<'_>,
    ) -> Result<PreparedErasure, DeltaSinkError> {
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        // The `add` actions as written: their partition values and sizes go into the new
        // files' actions unchanged.
        #[allow(deprecated)]
        let files: Vec<Add> = snapshot.log_data().into_iter().map(|f| f.add_action()).collect();
        let store = self.table.object_store();
        let mut out = TableErasure::default();
        let mut actions: Vec<Action> = Vec::new();
        for add in &files {
            out.files_scanned += 1;
            let location = StorePath::from(add.path.as_str());
            let bytes = store
                .get(&location)
                .await
                .map_err(|e| self.store_err(format!("{}: {e}", add.path)))?
                .bytes()
                .await
                .map_err(|e| self.store_err(format!("{}: {e}", add.path)))?;
            // First only the matcher's columns: most files hold none of the subjects.
            let matched =
                count_matches(bytes.clone(), matcher).map_err(|e| self.store_err(format!("{}: {e}", add.path)))?;
            progress(1);
            if matched == 0 {
                continue;
            }
            out.rows_matched += matched;
            if dry_run {
                out.files_removed.push(add.path.clone());
                out.bytes_read += add.size as u64;
                continue;
            }
            let (rewritten, rows) =
                rewrite(bytes, matcher, treatment).map_err(|e| self.store_err(format!("{}: {e}", add.path)))?;
            out.bytes_read += add.size as u64;
            actions.push(Action::Remove(remove_of(add)));
            out.files_removed.push(add.path.clone());
            if rows > 0 {
                let path = sibling_path(&add.path);
                let size = rewritten.len() as i64;
                store
                    .put(&StorePath::from(path.as_str()), PutPayload::from(rewritten))
                    .await
                    .map_err(|e| self.store_err(format!("{path}: {e}")))?;
                out.bytes_written += size as u64;
                out.files_added += 1;
                actions.push(Action::Add(Add {
                    path,
                    partition_values: add.partition_values.clone(),
                    size,
                    modification_time: chrono::Utc::now().timestamp_millis(),
                    data_change: true,
                    stats: Some(format!("{{\"numRecords\":{rows}}}")),
                    tags: None,
                    deletion_vector: None,
                    base_row_id: None,
                    default_row_commit_version: None,
                    clustering_provider: None,
                }));
            }
        }
        Ok(PreparedErasure { outcome: out, actions })
    }

    /// Commits a prepared erasure (nothing to do when nothing matched). The old files stay
    /// until [`ErasureTarget::delete_files`].
    pub(crate) async fn commit(&mut self, prepared: &mut PreparedErasure) -> Result<(), DeltaSinkError> {
        if prepared.actions.is_empty() {
            return Ok(());
        }
        let actions = std::mem::take(&mut prepared.actions);
        let operation = DeltaOperation::Delete {
            // The commit log is read by anyone with the lake: names, never tokens or ids.
            predicate: Some("rows of erased subjects (sluice forget)".into()),
        };
        let properties =
            CommitProperties::default().with_application_transactions(vec![Transaction::new(self.app_id.clone(), 1)]);
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), self.table.log_store(), operation)
            .await
            .map_err(|e| self.err(e))?;
        prepared.outcome.version = Some(finalized.version());
        self.table.state = Some(finalized.snapshot());
        Ok(())
    }

    /// Drops every version before the current one (see [`super::drop_history`]).
    pub(crate) async fn drop_history(&self) -> Result<super::DroppedHistory, DeltaSinkError> {
        let table = super::open_existing(&self.location, &self.name)
            .await?
            .ok_or_else(|| self.store_err("the table disappeared"))?;
        super::drop_history(&table, &self.name).await
    }

    /// Deletes data files by their table-relative paths; files already gone are fine (a rerun).
    pub(crate) async fn delete_files(&self, paths: &[String]) -> Result<u64, DeltaSinkError> {
        super::delete_paths(&self.table.object_store(), paths)
            .await
            .map_err(|e| self.store_err(e))
    }

    /// Every Parquet file under the table, referenced by a version or not (an orphan of a
    /// crashed writer, a file an older version still names): rows the matcher finds in each.
    /// The verification of a job, and the sweep of files no current version holds.
    pub(crate) async fn scan_all_files(&self, matcher: &RowMatcher) -> Result<Vec<(String, u64, i64)>, DeltaSinkError> {
        use futures_util::StreamExt;
        let store = self.table.object_store();
        let mut listing = store.list(None);
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.store_err(e))?;
            let path = meta.location.to_string();
            if !path.ends_with(".parquet") || path.starts_with("_delta_log") {
                continue;
            }
            let bytes = store
                .get(&meta.location)
                .await
                .map_err(|e| self.store_err(format!("{path}: {e}")))?
                .bytes()
                .await
                .map_err(|e| self.store_err(format!("{path}: {e}")))?;
            let matched = count_matches(bytes, matcher).map_err(|e| self.store_err(format!("{path}: {e}")))?;
            out.push((path, matched, meta.last_modified.timestamp_millis()));
        }
        Ok(out)
    }

    /// Commit files and checkpoints of the log in which `found` finds something (file
    /// statistics written before they were restricted can hold a token).
    pub(crate) async fn log_files_where(
        &self,
        found: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<Vec<String>, DeltaSinkError> {
        use futures_util::StreamExt;
        let store = self.table.object_store();
        let prefix = StorePath::from("_delta_log");
        let mut listing = store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.store_err(e))?;
            let bytes = store
                .get(&meta.location)
                .await
                .map_err(|e| self.store_err(format!("{}: {e}", meta.location)))?
                .bytes()
                .await
                .map_err(|e| self.store_err(format!("{}: {e}", meta.location)))?;
            let hit = if meta.location.as_ref().ends_with(".parquet") {
                // A checkpoint: its statistics are a (compressed) string column; look at them
                // as JSON text.
                let text = checkpoint_as_json(bytes).map_err(|e| self.store_err(format!("{}: {e}", meta.location)))?;
                found(&text)
            } else {
                found(&bytes)
            };
            if hit {
                out.push(meta.location.to_string());
            }
        }
        Ok(out)
    }

    /// Paths of data files that committed versions removed (compaction, earlier rewrites):
    /// history, still readable by time travel until deleted.
    pub(crate) async fn history_files(&self) -> Result<std::collections::HashSet<String>, DeltaSinkError> {
        use futures_util::StreamExt;
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        let log_store = self.table.log_store();
        let mut tombstones = snapshot.all_tombstones(log_store.as_ref());
        let mut out = std::collections::HashSet::new();
        while let Some(t) = tombstones.next().await {
            out.insert(t.map_err(|e| self.err(e))?.path().to_string());
        }
        Ok(out)
    }

    /// Paths of the data files the current version holds.
    pub(crate) fn active_files(&self) -> Result<Vec<String>, DeltaSinkError> {
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        Ok(snapshot.log_data().into_iter().map(|f| f.path().to_string()).collect())
    }
}

fn checkpoint_as_json<T: ChunkReader + 'static>(bytes: T) -> Result<Vec<u8>, FileError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).and_then(|b| b.build())?;
    let mut writer = deltalake::arrow::json::LineDelimitedWriter::new(Vec::new());
    for batch in reader {
        writer.write(&batch?)?;
    }
    writer.finish()?;
    Ok(writer.into_inner())
}

pub(crate) fn remove_of(add: &Add) -> Remove {
    Remove {
        path: add.path.clone(),
        data_change: true,
        deletion_timestamp: Some(chrono::Utc::now().timestamp_millis()),
        extended_file_metadata: Some(true),
        partition_values: Some(add.partition_values.clone()),
        size: Some(add.size),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
    }
}

/// A new file beside the old one (same partition directory), under a fresh random name.
fn sibling_path(old: &str) -> String {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(sluice_transforms::crypto::random(), &mut id).expect("system RNG");
    let name = format!("part-erased-{}.snappy.parquet", hex::encode(id));
    match old.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name,
    }
}

/// The matcher's columns a file has, and those it lacks. Only `_subject` may be missing: a
/// column added to the quarantine later (schema evolution), null in older files.
fn matcher_columns(
    schema: &arrow_schema::Schema,
    matcher: &RowMatcher,
) -> Result<(Vec<usize>, Vec<String>), FileError> {
    let mut present = Vec::new();
    let mut missing = Vec::new();
    for c in &matcher.columns {
        match schema.index_of(c) {
            Ok(i) => present.push(i),
            Err(_) if c == EVOLVED_SUBJECT_COLUMN => missing.push(c.clone()),
            Err(_) => return Err(FileError::MissingColumn(c.clone())),
        }
    }
    Ok((present, missing))
}

/// A text column tables gained after files were written: matchers see it as null there.
const EVOLVED_SUBJECT_COLUMN: &str = "_subject";

/// `batch` (matched columns only) with the `missing` ones added as nulls.
fn with_missing(batch: RecordBatch, missing: &[String]) -> Result<RecordBatch, FileError> {
    if missing.is_empty() {
        return Ok(batch);
    }
    let mut fields: Vec<arrow_schema::FieldRef> = batch.schema().fields().iter().cloned().collect();
    let mut columns = batch.columns().to_vec();
    for name in missing {
        fields.push(Arc::new(arrow_schema::Field::new(name, DataType::Utf8, true)));
        columns.push(new_null_array(&DataType::Utf8, batch.num_rows()));
    }
    RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), columns).map_err(FileError::from)
}

pub(crate) fn count_matches<T: ChunkReader + 'static>(bytes: T, matcher: &RowMatcher) -> Result<u64, FileError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let schema = builder.schema().clone();
    let (indices, missing) = matcher_columns(&schema, matcher)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let reader = builder.with_projection(mask).with_batch_size(65_536).build()?;
    let mut n = 0;
    for batch in reader {
        let batch = with_missing(batch?, &missing)?;
        n += (matcher.matches)(&batch).map_err(FileError::Matcher)?.true_count() as u64;
    }
    Ok(n)
}

/// The file again without the matched rows (or with them blanked), and its row count.
pub(crate) fn rewrite<T: ChunkReader + 'static>(
    bytes: T,
    matcher: &RowMatcher,
    treatment: &Treatment,
) -> Result<(Vec<u8>, u64), FileError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let schema = builder.schema().clone();
    let reader = builder.with_batch_size(65_536).build()?;
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, schema.clone(), Some(writer_properties(&schema)))?;
    let mut rows = 0u64;
    let (indices, missing) = matcher_columns(&schema, matcher)?;
    for batch in reader {
        let batch = batch?;
        let projected = with_missing(batch.project(&indices)?, &missing)?;
        let matched = (matcher.matches)(&projected).map_err(FileError::Matcher)?;
        let out = match treatment {
            Treatment::Delete => {
                let keep: BooleanArray = matched.iter().map(|m| Some(m != Some(true))).collect();
                arrow_select::filter::filter_record_batch(&batch, &keep)?
            }
            Treatment::Blank(columns) => blank(&batch, &matched, columns)?,
        };
        rows += out.num_rows() as u64;
        if out.num_rows() > 0 {
            writer.write(&out)?;
        }
    }
    writer.close()?;
    Ok((buffer, rows))
}

/// Matched rows' `columns` set to null, or to "" in non-nullable string columns.
fn blank(batch: &RecordBatch, matched: &BooleanArray, columns: &[String]) -> Result<RecordBatch, FileError> {
    let schema = batch.schema();
    let mut arrays: Vec<ArrayRef> = batch.columns().to_vec();
    let wanted: HashMap<&str, ()> = columns.iter().map(|c| (c.as_str(), ())).collect();
    for (i, field) in schema.fields().iter().enumerate() {
        if !wanted.contains_key(field.name().as_str()) {
            continue;
        }
        let blank: ArrayRef = if field.is_nullable() {
            new_null_array(field.data_type(), 1)
        } else if field.data_type() == &DataType::Utf8 {
            Arc::new(StringArray::from(vec![""]))
        } else if let DataType::Timestamp(TimeUnit::Microsecond, _) = field.data_type() {
            // A time that cannot be null (`_source_ts`, `_ingested_at`) keeps its day only.
            let times = arrays[i]
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .ok_or_else(|| FileError::NotTimestamp(field.name().clone()))?;
            const DAY_US: i64 = 86_400_000_000;
            let days = times.unary::<_, TimestampMicrosecondType>(|t| t.div_euclid(DAY_US) * DAY_US);
            let days: ArrayRef = Arc::new(days.with_data_type(field.data_type().clone()));
            arrays[i] = arrow_select::zip::zip(matched, &days, &arrays[i])?;
            continue;
        } else {
            return Err(FileError::CannotBlank(field.name().clone()));
        };
        arrays[i] = arrow_select::zip::zip(matched, &Scalar::new(blank), &arrays[i])?;
    }
    RecordBatch::try_new(schema, arrays).map_err(FileError::from)
}

/// Rows whose `column` (text) is one of `tokens`; the tokens met are added to `seen`.
pub fn token_matcher(
    column: &str,
    tokens: std::collections::HashSet<String>,
    seen: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
) -> RowMatcher {
    let name = column.to_string();
    RowMatcher {
        columns: vec![column.to_string()],
        matches: Box::new(move |batch: &RecordBatch| {
            let values = batch
                .column_by_name(&name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| format!("column {name} is not text"))?;
            let matched: BooleanArray = values
                .iter()
                .map(|v| Some(v.is_some_and(|v| tokens.contains(v))))
                .collect();
            if matched.true_count() > 0 {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                for (v, m) in values.iter().zip(matched.iter()) {
                    if let (Some(v), Some(true)) = (v, m) {
                        seen.insert(v.to_string());
                    }
                }
            }
            Ok(matched)
        }),
    }
}
