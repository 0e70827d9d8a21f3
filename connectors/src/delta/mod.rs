//! Delta Lake sink: one table per target, written with `deltalake`'s `RecordBatchWriter`.
//! Source positions ride in the same commit as the data (`txn` actions, as kafka-delta-ingest
//! does), so a table's committed position is exactly the data it holds.

use std::collections::HashMap;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitConflictError, CommitProperties, TransactionError};
use deltalake::kernel::{Action, MetadataExt, MetadataValue, StructField, StructType, Transaction};
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::DeltaTable;

use crate::lake::schema::{plan, Mismatch, SchemaChange};
use crate::lake::tags::{self, ColumnTags, TableTags};
use crate::storage::{LakePath, LakePathError};
use crate::SourcePosition;

pub mod erase;

#[derive(Debug, thiserror::Error)]
pub enum DeltaSinkError {
    #[error("table {table}: {source}")]
    Delta {
        table: String,
        source: Box<deltalake::DeltaTableError>,
    },
    #[error("table {table}: {source}")]
    Location { table: String, source: LakePathError },
    /// Another writer committed this stream since this one read its position (a partition
    /// moved to another daemon): the uncommitted work must be dropped and re-read.
    #[error("table {table}: stream {stream} was committed by another writer since this one read it at {expected:?}; dropping uncommitted work")]
    Fenced {
        table: String,
        stream: String,
        expected: Option<i64>,
    },
    #[error("table {0}")]
    SchemaChanged(Box<crate::lake::schema::Mismatch>),
}

/// The lake's Parquet settings, but no dictionary for columns whose values never repeat
/// (ciphertexts, positions) and no compression for ciphertext (random bytes do not compress):
/// both cost time and save nothing.
fn writer_properties(schema: &SchemaRef) -> WriterProperties {
    writer_properties_builder(schema).build()
}

fn writer_properties_builder(schema: &SchemaRef) -> deltalake::parquet::file::properties::WriterPropertiesBuilder {
    let mut props = crate::lake::parquet_properties();
    for field in schema.fields() {
        let column = ColumnPath::from(field.name().as_str());
        if matches!(field.data_type(), DataType::Binary) {
            props = props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_compression(column, Compression::UNCOMPRESSED);
        } else if field.name() == "_position" {
            props = props.set_column_dictionary_enabled(column, false);
        }
    }
    props
}

/// A Delta table being appended to.
pub(crate) struct DeltaSink {
    name: String,
    app_prefix: String,
    table: DeltaTable,
    writer: RecordBatchWriter,
    partition_by: Vec<String>,
    buffered_rows: usize,
    /// Per stream, the position this writer last read or committed: a commit proceeds only
    /// if the table still holds exactly that (fencing against a second writer).
    known: HashMap<String, Option<i64>>,
    /// Parquet files written by [`DeltaSink::spill`] and not committed yet: invisible to
    /// readers until the commit that adds them (orphans after a crash, which only a full-mode
    /// VACUUM removes).
    spilled: Vec<deltalake::kernel::Add>,
    /// The table's column order, where the policy's differs (see [`table_order`]).
    reorder: Option<(SchemaRef, Vec<usize>)>,
}

impl DeltaSink {
    /// Opens the table at `location`, creating it with `schema` if absent. `app_prefix` scopes
    /// the `txn` application ids (the pipeline's name). Only `stats_columns` get per-file
    /// minimum/maximum statistics in the log: the log is history that erasure cannot rewrite,
    /// so columns that link a row to a person (tokens, ciphertexts, positions) get none.
    pub(crate) async fn open_or_create(
        location: &LakePath,
        name: &str,
        app_prefix: &str,
        schema: SchemaRef,
        partition_by: &[&str],
        stats_columns: &[String],
        tags: Option<&TableTags>,
    ) -> Result<Self, DeltaSinkError> {
        let err = |source| DeltaSinkError::Delta {
            table: name.to_string(),
            source: Box::new(source),
        };
        let (url, options) = location
            .table_url(true)
            .map_err(|source| DeltaSinkError::Location {
                table: name.to_string(),
                source,
            })?
            .ok_or_else(|| err(deltalake::DeltaTableError::InvalidTableLocation(location.to_string())))?;
        let mut table = DeltaTable::try_from_url_with_storage_options(url.clone(), options.clone())
            .await
            .map_err(err)?;
        if table.version().is_none() {
            let kernel: StructType = schema.as_ref().try_into_kernel().map_err(|e| err(e.into()))?;
            let no_tags = TableTags::default();
            let tags = tags.unwrap_or(&no_tags);
            let created = table
                .clone()
                .create()
                .with_table_name(name)
                .with_columns(kernel.fields().map(|f| tagged(f, tags.columns.get(f.name()))))
                .with_partition_columns(partition_by.iter().map(|s| s.to_string()))
                .with_configuration(tags.properties.iter().map(|(k, v)| (k.clone(), Some(v.clone()))))
                // sluice's own properties (`sluice.*`) are not Delta's.
                .with_raise_if_key_not_exists(false)
                .with_configuration_property(
                    deltalake::TableProperty::DataSkippingStatsColumns,
                    Some(stats_columns.join(",")),
                )
                .with_save_mode(SaveMode::Ignore)
                // Two daemons creating the table at once: without this, the library retries the
                // loser's create as version 1 — a second metadata action that fails every
                // other writer's next commit. The loser opens the winner's table instead.
                .with_commit_properties(CommitProperties::default().with_max_retries(0))
                .await;
            table = match created {
                Ok(t) => t,
                // Another writer (a second daemon) may have created it first: use theirs.
                Err(e) => {
                    let theirs = DeltaTable::try_from_url_with_storage_options(url, options)
                        .await
                        .map_err(err)?;
                    if theirs.version().is_none() {
                        return Err(err(e));
                    }
                    theirs
                }
            };
        }
        let table = evolve_schema(table, name, &schema).await?;
        let mut table = restrict_stats(table, name, stats_columns).await?;
        if let Some(tags) = tags {
            table = apply_tags(table, name, tags).await?;
        }
        let writer = RecordBatchWriter::for_table(&table)
            .map_err(err)?
            .with_writer_properties(writer_properties(&schema));
        let reorder = table_order(&schema, &writer.arrow_schema());
        Ok(Self {
            name: name.to_string(),
            app_prefix: app_prefix.to_string(),
            table,
            writer,
            partition_by: partition_by.iter().map(|s| s.to_string()).collect(),
            buffered_rows: 0,
            known: HashMap::new(),
            spilled: Vec::new(),
            reorder,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Files written from now on carry a Bloom filter of `column` (a current table's key).
    pub(crate) fn with_bloom_filter(mut self, column: &str) -> Result<Self, DeltaSinkError> {
        let schema = self.writer.arrow_schema();
        let props = crate::lake::current::key_bloom_filter(writer_properties_builder(&schema), column).build();
        self.writer = RecordBatchWriter::for_table(&self.table)
            .map_err(|e| self.err(e))?
            .with_writer_properties(props);
        Ok(self)
    }

    /// The distinct values of a string column, from the minimum and maximum each file's
    /// statistics record (no data file is read).
    pub(crate) fn column_values_in_stats(&self, column: &str) -> Result<Vec<String>, DeltaSinkError> {
        let err = |e: deltalake::DeltaTableError| DeltaSinkError::Delta {
            table: self.name.clone(),
            source: Box::new(e),
        };
        let files = self
            .table
            .snapshot()
            .map_err(err)?
            .add_actions_table(true)
            .map_err(err)?;
        let mut values = std::collections::BTreeSet::new();
        for bound in ["min", "max"] {
            let Some(array) = files.column_by_name(&format!("{bound}.{column}")) else {
                continue;
            };
            let text = deltalake::arrow::compute::cast(array, &DataType::Utf8).map_err(|e| err(e.into()))?;
            let text = text
                .as_any()
                .downcast_ref::<deltalake::arrow::array::StringArray>()
                .expect("cast to Utf8");
            values.extend(text.iter().flatten().map(str::to_string));
        }
        Ok(values.into_iter().collect())
    }

    /// The `txn` application id of a stream.
    pub(crate) fn app_id(&self, stream: &str) -> String {
        format!("sluice/{}/{}", self.app_prefix, stream)
    }

    /// Last position of `stream` committed to this table, if any. This writer's later commits
    /// of the stream are fenced on it.
    pub(crate) async fn committed(&mut self, stream: &str) -> Result<Option<i64>, DeltaSinkError> {
        let position = self.table_position(stream).await?;
        self.known.insert(stream.to_string(), position);
        Ok(position)
    }

    async fn table_position(&self, stream: &str) -> Result<Option<i64>, DeltaSinkError> {
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), self.app_id(stream))
            .await
            .map_err(|e| self.err(e))
    }

    fn err(&self, source: deltalake::DeltaTableError) -> DeltaSinkError {
        DeltaSinkError::Delta {
            table: self.name.clone(),
            source: Box::new(source),
        }
    }

    /// Positions of `streams` in the table at `location` as it is now (`None` where the table
    /// or the stream has none), without opening a writer.
    pub(crate) async fn read_positions(
        location: &LakePath,
        app_prefix: &str,
        streams: &[String],
    ) -> Result<Vec<Option<i64>>, DeltaSinkError> {
        let name = location.to_string();
        let err = |source| DeltaSinkError::Delta {
            table: name.clone(),
            source: Box::new(source),
        };
        let Some(table) = open_existing(location, &name).await? else {
            return Ok(vec![None; streams.len()]);
        };
        let snapshot = table.snapshot().map_err(err)?;
        let mut out = Vec::with_capacity(streams.len());
        for stream in streams {
            let app_id = format!("sluice/{app_prefix}/{stream}");
            out.push(
                snapshot
                    .transaction_version(table.log_store().as_ref(), app_id)
                    .await
                    .map_err(err)?,
            );
        }
        Ok(out)
    }

    /// Buffers rows (accepted, not durable).
    pub(crate) async fn write(&mut self, batch: RecordBatch) -> Result<(), DeltaSinkError> {
        self.buffered_rows += batch.num_rows();
        let batch = match &self.reorder {
            None => batch,
            Some((schema, order)) => {
                RecordBatch::try_new(schema.clone(), order.iter().map(|&i| batch.column(i).clone()).collect()).map_err(
                    |source| DeltaSinkError::Delta {
                        table: self.name.clone(),
                        source: Box::new(source.into()),
                    },
                )?
            }
        };
        self.writer.write(batch).await.map_err(|source| DeltaSinkError::Delta {
            table: self.name.clone(),
            source: Box::new(source),
        })
    }

    fn fenced(&self, stream: &str, expected: Option<i64>) -> DeltaSinkError {
        DeltaSinkError::Fenced {
            table: self.name.clone(),
            stream: stream.to_string(),
            expected,
        }
    }

    pub(crate) fn buffered_rows(&self) -> usize {
        self.buffered_rows
    }

    /// Writes the buffered rows out as Parquet files without committing them, so a source
    /// transaction larger than memory can wait for its end: the next commit adds the files.
    pub(crate) async fn spill(&mut self) -> Result<(), DeltaSinkError> {
        let adds = self.writer.flush().await.map_err(|source| DeltaSinkError::Delta {
            table: self.name.clone(),
            source: Box::new(source),
        })?;
        self.spilled.extend(adds);
        Ok(())
    }

    /// The data files of the table's current version (as their `add` actions: partition
    /// values, sizes), read afresh.
    pub(crate) async fn live_files(&mut self) -> Result<Vec<deltalake::kernel::Add>, DeltaSinkError> {
        self.reload().await.map_err(|e| self.err(e))?;
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        #[allow(deprecated)]
        Ok(snapshot.log_data().into_iter().map(|f| f.add_action()).collect())
    }

    /// A data file's bytes (or bytes `range` of it), by its table-relative path.
    pub(crate) async fn read_file(
        &self,
        path: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<bytes::Bytes, DeltaSinkError> {
        use deltalake::logstore::object_store::ObjectStoreExt;
        let failed =
            |e: deltalake::ObjectStoreError| self.err(deltalake::DeltaTableError::Generic(format!("{path}: {e}")));
        let store = self.table.object_store();
        let location = deltalake::Path::from(path);
        match range {
            Some(range) => store.get_range(&location, range).await.map_err(failed),
            None => store
                .get(&location)
                .await
                .map_err(failed)?
                .bytes()
                .await
                .map_err(failed),
        }
    }

    /// Arrow bytes buffered in the writer (not yet in a file).
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.writer.buffer_len()
    }

    /// Drops what was written since the last commit, files included (a merge that must be
    /// computed again: its files would be orphans holding rows read before a conflict).
    pub(crate) async fn discard_uncommitted(&mut self) -> Result<(), DeltaSinkError> {
        let adds = self.writer.flush().await.map_err(|e| self.err(e))?;
        let paths: Vec<String> = self.spilled.drain(..).chain(adds).map(|a| a.path).collect();
        delete_paths(&self.table.object_store(), &paths)
            .await
            .map_err(|e| self.err(deltalake::DeltaTableError::Generic(e)))?;
        self.buffered_rows = 0;
        Ok(())
    }

    /// Fencing: the table must still hold what this writer last saw of every stream it
    /// commits. A concurrent commit of the same stream after our snapshot is caught by Delta's
    /// conflict check (same `txn` app id). One that reached our snapshot through an earlier
    /// commit of ours (retried past it), or that came in while we caught up, here.
    async fn check_fences(&self, positions: &[SourcePosition]) -> Result<(), DeltaSinkError> {
        for p in positions {
            let expected = self.known.get(&p.stream).copied().flatten();
            let found = self.table_position(&p.stream).await?;
            if found != expected {
                return Err(self.fenced(&p.stream, expected));
            }
        }
        Ok(())
    }

    /// The table as it is now, read afresh from its latest checkpoint (not from this writer's
    /// snapshot onwards: those commits may have been removed).
    async fn reload(&mut self) -> Result<(), deltalake::DeltaTableError> {
        let mut fresh = DeltaTable::new(self.table.log_store(), self.table.config.clone());
        fresh.load().await?;
        self.table = fresh;
        Ok(())
    }

    /// An erasure removed the log this writer's snapshot was read from: the table is read again
    /// from its latest checkpoint, and the fences checked on what it holds now.
    async fn read_again(
        &mut self,
        positions: &[SourcePosition],
        why: &deltalake::DeltaTableError,
    ) -> Result<(), DeltaSinkError> {
        tracing::info!(table = %self.name, error = %why, "the log before the table's latest checkpoint was removed under this writer (an erasure): reading the table again before committing");
        self.reload().await.map_err(|e| self.err(e))?;
        self.check_fences(positions).await
    }

    /// Writes the buffered rows as Parquet files and commits them together with `positions`:
    /// durable. With no rows, commits the positions alone. Returns the new table version.
    /// `attached` positions ride along unfenced (a source's extra state kept beside an offset).
    pub(crate) async fn commit(
        &mut self,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<u64, DeltaSinkError> {
        self.commit_replacing(&[], None, positions, attached).await
    }

    /// [`DeltaSink::commit`], removing the `removed` files in the same commit (a current-state
    /// merge's copy-on-write); `predicate` (SQL over partition columns) says which part of the
    /// table the removed files were chosen from. A commit that removes files is not caught up
    /// over a concurrent removal: its files were computed from what it read, so the conflict is
    /// returned (see [`DeltaSinkError::is_conflict`]) for the caller to read again.
    pub(crate) async fn commit_replacing(
        &mut self,
        removed: &[deltalake::kernel::Add],
        predicate: Option<String>,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<u64, DeltaSinkError> {
        let name = self.name.clone();
        let err = |source| DeltaSinkError::Delta {
            table: name.clone(),
            source: Box::new(source),
        };
        // What a commit that removes files read is computed from cannot be caught up: the files
        // it removes (and copied rows from) may be gone under it. Such a commit is told to read
        // again instead (a conflict).
        let stale = || {
            err(deltalake::DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(CommitConflictError::ConcurrentDeleteRead),
            })
        };
        match self.check_fences(positions).await {
            // The log this writer's snapshot was read from is gone (see below).
            Err(DeltaSinkError::Delta { source, .. })
                if matches!(*source, deltalake::DeltaTableError::KernelError(_)) =>
            {
                if !removed.is_empty() {
                    return Err(stale());
                }
                self.read_again(positions, &source).await?
            }
            other => other?,
        }
        let adds = self.writer.flush().await.map_err(err)?;
        self.spilled.extend(adds);
        let actions: Vec<Action> = removed
            .iter()
            .map(|add| Action::Remove(erase::remove_of(add)))
            .chain(self.spilled.iter().cloned().map(Action::Add))
            .collect();
        let txns: Vec<Transaction> = positions
            .iter()
            .chain(attached)
            .map(|p| Transaction::new(self.app_id(&p.stream), p.offset))
            .collect();
        let operation = DeltaOperation::Write {
            mode: if removed.is_empty() {
                SaveMode::Append
            } else {
                SaveMode::Overwrite
            },
            partition_by: (!self.partition_by.is_empty()).then(|| self.partition_by.clone()),
            predicate,
        };
        // Erasures that committed since this writer's snapshot: catch up, a few times at most.
        let mut catch_ups = 0;
        let finalized = loop {
            let snapshot = self.table.snapshot().map_err(err)?;
            let attempt = CommitBuilder::from(CommitProperties::default().with_application_transactions(txns.clone()))
                .with_actions(actions.clone())
                .build(Some(snapshot), self.table.log_store(), operation.clone())
                .await;
            match attempt {
                Ok(f) => break f,
                Err(deltalake::DeltaTableError::Transaction {
                    source: TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction),
                }) => {
                    let stream = positions.first().map(|p| p.stream.clone()).unwrap_or_default();
                    let expected = self.known.get(&stream).copied().flatten();
                    return Err(self.fenced(&stream, expected));
                }
                // An erasure job (`sluice forget`) removed files this writer's snapshot holds.
                // Our commit only appends: catch up with the table and commit again.
                Err(deltalake::DeltaTableError::Transaction {
                    source: TransactionError::CommitConflict(CommitConflictError::ConcurrentDeleteRead),
                }) if catch_ups < 5 && removed.is_empty() => {
                    catch_ups += 1;
                    tracing::info!(table = %self.name, "files were removed under this writer (an erasure): catching up before committing");
                    self.reload().await.map_err(err)?;
                    self.check_fences(positions).await?;
                }
                // The commits after this writer's snapshot are gone from the log (an erasure
                // dropped the history before it, leaving a checkpoint).
                Err(deltalake::DeltaTableError::KernelError(_)) if !removed.is_empty() => return Err(stale()),
                Err(e @ deltalake::DeltaTableError::KernelError(_)) if catch_ups < 5 => {
                    catch_ups += 1;
                    self.read_again(positions, &e).await?;
                }
                Err(e) => return Err(err(e)),
            }
        };
        let version = finalized.version();
        self.table.state = Some(finalized.snapshot());
        self.spilled.clear();
        self.buffered_rows = 0;
        for p in positions {
            self.known.insert(p.stream.clone(), Some(p.offset));
        }
        Ok(version)
    }
}

/// The table's schema, or `wanted` when it only appends nullable columns (a metadata column a
/// newer sluice writes: older rows read them as null); any other difference is refused.
async fn evolve_schema(mut table: DeltaTable, name: &str, schema: &SchemaRef) -> Result<DeltaTable, DeltaSinkError> {
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    let existing: StructType = table.snapshot().map_err(err)?.schema().as_ref().clone();
    let wanted: StructType = schema.as_ref().try_into_kernel().map_err(|e| err(e.into()))?;
    let (old, new) = (delta_columns(&existing), delta_columns(&wanted));
    match plan(&old, &new) {
        SchemaChange::Create | SchemaChange::Same => {}
        refused @ SchemaChange::Refused { .. } => {
            return Err(DeltaSinkError::SchemaChanged(Mismatch::new(name, &old, &new, &refused)))
        }
        SchemaChange::Add(columns) => {
            tracing::info!(table = name, columns = %columns.join(", "), "adding the policy's new columns to the table");
            // Nullable whatever the policy says: the rows already written have no value.
            let added: Vec<StructField> = wanted
                .fields()
                .filter(|f| columns.contains(f.name()))
                .map(|f| StructField::new(f.name().clone(), f.data_type().clone(), true))
                .collect();
            table = table.add_columns().with_fields(added).await.map_err(err)?;
        }
    }
    Ok(table)
}

/// What opening the table at `location` with `schema` would do to it; nothing is changed.
pub(crate) async fn schema_change(
    location: &LakePath,
    name: &str,
    schema: &SchemaRef,
) -> Result<SchemaChange, DeltaSinkError> {
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    let Some(table) = open_existing(location, name).await? else {
        return Ok(SchemaChange::Create);
    };
    let existing: StructType = table.snapshot().map_err(err)?.schema().as_ref().clone();
    let wanted: StructType = schema.as_ref().try_into_kernel().map_err(|e| err(e.into()))?;
    Ok(plan(&delta_columns(&existing), &delta_columns(&wanted)))
}

/// A Delta schema's columns as the schema rule compares them.
fn delta_columns(schema: &StructType) -> Vec<(String, String)> {
    schema
        .fields()
        .map(|f| (f.name().clone(), f.data_type().to_string()))
        .collect()
}

/// Where each of the table's columns is in a policy batch, when the two orders differ (a column
/// added to a policy is appended to the table, wherever the policy has it): the batch's columns
/// in the table's order, nullable as the table's are and with its column metadata (the writer
/// refuses a batch whose schema differs in either).
fn table_order(batch: &arrow_schema::Schema, table: &arrow_schema::Schema) -> Option<(SchemaRef, Vec<usize>)> {
    let same =
        batch.fields().len() == table.fields().len()
            && batch.fields().iter().zip(table.fields()).all(|(b, t)| {
                b.name() == t.name() && b.is_nullable() == t.is_nullable() && b.metadata() == t.metadata()
            });
    if same {
        return None;
    }
    let order: Vec<usize> = table
        .fields()
        .iter()
        .map(|t| batch.index_of(t.name()).ok())
        .collect::<Option<_>>()?;
    let fields: Vec<arrow_schema::Field> = order
        .iter()
        .zip(table.fields())
        .map(|(&i, t)| {
            batch
                .field(i)
                .clone()
                .with_nullable(t.is_nullable())
                .with_metadata(t.metadata().clone())
        })
        .collect();
    Some((std::sync::Arc::new(arrow_schema::Schema::new(fields)), order))
}

/// Restricts the statistics in the log to `stats_columns`.
async fn restrict_stats(
    mut table: DeltaTable,
    name: &str,
    stats_columns: &[String],
) -> Result<DeltaTable, DeltaSinkError> {
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    // Tables created before statistics were restricted get the property now: their future
    // commits name no token (older commits still do; `sluice forget` reports those).
    let wanted_stats = stats_columns.join(",");
    let current_stats = table
        .snapshot()
        .map_err(err)?
        .metadata()
        .configuration()
        .get("delta.dataSkippingStatsColumns")
        .cloned();
    if current_stats.as_deref() != Some(wanted_stats.as_str()) {
        tracing::info!(
            table = name,
            "restricting the columns with statistics in the table's log"
        );
        table = table
            .set_tbl_properties()
            .with_properties(HashMap::from([(
                "delta.dataSkippingStatsColumns".to_string(),
                wanted_stats,
            )]))
            .await
            .map_err(err)?;
    }
    Ok(table)
}

/// `field` with its description, class and tags set to `tags` (a class or tags the policy no
/// longer gives removed); other keys kept. A column `tags` does not describe (a metadata
/// column, a table without tags) is left as it is.
fn tagged(field: &StructField, tags: Option<&ColumnTags>) -> StructField {
    let mut field = field.clone();
    let Some(tags) = tags else {
        return field;
    };
    field
        .metadata
        .retain(|key, _| ![tags::COMMENT_KEY, tags::CLASS_KEY, tags::TAGS_KEY].contains(&key.as_str()));
    for (key, value) in tags.delta_metadata() {
        field.metadata.insert(key.to_string(), MetadataValue::String(value));
    }
    field
}

/// Brings the table's column metadata and `sluice.*` properties to `tags`, in one metadata
/// commit, if they differ (a policy that changed a class since the table was written).
async fn apply_tags(mut table: DeltaTable, name: &str, tags: &TableTags) -> Result<DeltaTable, DeltaSinkError> {
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    let snapshot = table.snapshot().map_err(err)?;
    let schema = snapshot.schema();
    let fields: Vec<StructField> = schema.fields().map(|f| tagged(f, tags.columns.get(f.name()))).collect();
    let columns_changed = fields.iter().zip(schema.fields()).any(|(new, old)| new != old);
    let properties = tags.property_changes(snapshot.metadata().configuration());
    if !columns_changed && properties.is_empty() {
        return Ok(table);
    }
    tracing::info!(
        table = name,
        "writing the policy's column classes and tags to the table"
    );
    let mut metadata = snapshot.metadata().clone();
    if columns_changed {
        metadata = metadata
            .with_schema(&StructType::try_new(fields).map_err(|e| err(e.into()))?)
            .map_err(|e| err(e.into()))?;
    }
    let mut set = HashMap::new();
    for (key, value) in properties {
        metadata = match value {
            Some(value) => {
                set.insert(key.clone(), value.clone());
                metadata.add_config_key(key, value)
            }
            None => metadata.remove_config_key(&key),
        }
        .map_err(|e| err(e.into()))?;
    }
    CommitBuilder::default()
        .with_actions(vec![Action::Metadata(metadata)])
        .build(
            Some(snapshot.snapshot()),
            table.log_store(),
            DeltaOperation::SetTableProperties { properties: set },
        )
        .await
        .map_err(err)?;
    table.update_state().await.map_err(err)?;
    Ok(table)
}

/// The table at `location` as it is now (for reading); `None` where there is no table (yet).
pub(crate) async fn open_table(location: &LakePath, name: &str) -> Result<Option<DeltaTable>, DeltaSinkError> {
    open_existing(location, name).await
}

/// The table at `location` as it is now; `None` where there is no table (yet).
pub(crate) async fn open_existing(location: &LakePath, name: &str) -> Result<Option<DeltaTable>, DeltaSinkError> {
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    let Some((url, options)) = location.table_url(false).map_err(|source| DeltaSinkError::Location {
        table: name.to_string(),
        source,
    })?
    else {
        return Ok(None);
    };
    let table = DeltaTable::try_from_url_with_storage_options(url, options)
        .await
        .map_err(err)?;
    if table.version().is_none() {
        return Ok(None);
    }
    Ok(Some(table))
}

/// Deletes files by their table-relative paths; files already gone count as done (a rerun).
/// Returns how many were deleted; an error names the path.
pub(crate) async fn delete_paths(store: &deltalake::logstore::ObjectStoreRef, paths: &[String]) -> Result<u64, String> {
    use deltalake::logstore::object_store::ObjectStoreExt;
    let mut deleted = 0;
    for path in paths {
        match store.delete(&deltalake::Path::from(path.as_str())).await {
            Ok(()) => deleted += 1,
            Err(deltalake::ObjectStoreError::NotFound { .. }) => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    Ok(deleted)
}

/// What [`drop_history`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DroppedHistory {
    /// The version a checkpoint was written at: every commit before it is gone.
    pub checkpoint_version: u64,
    /// Commit files and older checkpoints deleted from `_delta_log`.
    pub log_files_deleted: u64,
    /// Data files only older versions referenced, deleted.
    pub data_files_deleted: u64,
}

/// Removes the table's history, so no older version can be read back: the data files only
/// older versions reference are deleted, a checkpoint is written at the current version and
/// every commit file before it deleted (their `add` actions' statistics described the rows
/// those files held). The checkpoint keeps the `txn` positions; time travel to before it ends.
/// For a table whose older versions hold what must not be recovered: an erasure's tables, a
/// recomputed aggregate (before minus after would be the erased person's contribution).
pub(crate) async fn drop_history(table: &DeltaTable, name: &str) -> Result<DroppedHistory, DeltaSinkError> {
    use futures_util::StreamExt;
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    let snapshot = table.snapshot().map_err(err)?;
    let version = snapshot.version();
    let store = table.object_store();
    let mut tombstones = snapshot.all_tombstones(table.log_store().as_ref());
    let mut paths = Vec::new();
    while let Some(t) = tombstones.next().await {
        paths.push(t.map_err(err)?.path().to_string());
    }
    let data_files_deleted = delete_paths(&store, &paths)
        .await
        .map_err(|e| err(deltalake::DeltaTableError::Generic(e)))?;
    deltalake::checkpoints::create_checkpoint(table, None)
        .await
        .map_err(err)?;
    // Everything before the checkpoint, however recent: the cut-off is now.
    let log_files_deleted = deltalake::checkpoints::cleanup_expired_logs_for(
        version,
        table.log_store().as_ref(),
        chrono::Utc::now().timestamp_millis() + 1,
        None,
    )
    .await
    .map_err(err)?;
    Ok(DroppedHistory {
        checkpoint_version: version,
        log_files_deleted: log_files_deleted as u64,
        data_files_deleted,
    })
}

/// Replaces the rows `predicate` selects with `batches` in one commit carrying `positions`
/// (`txn` actions), creating the table if absent: for small derived tables that are
/// recomputed, such as aggregates. Older versions are dropped ([`drop_history`]). Returns the
/// new version.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replace_where(
    location: &LakePath,
    name: &str,
    app_prefix: &str,
    schema: SchemaRef,
    stats_columns: &[String],
    batches: Vec<RecordBatch>,
    predicate: deltalake::datafusion::prelude::Expr,
    positions: &[SourcePosition],
) -> Result<u64, DeltaSinkError> {
    DeltaSink::open_or_create(location, name, app_prefix, schema.clone(), &[], stats_columns, None).await?;
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    let table = open_existing(location, name)
        .await?
        .ok_or_else(|| err(deltalake::DeltaTableError::NotATable(location.to_string())))?;
    let txns: Vec<Transaction> = positions
        .iter()
        .map(|p| Transaction::new(format!("sluice/{app_prefix}/{}", p.stream), p.offset))
        .collect();
    let batches = if batches.is_empty() {
        vec![RecordBatch::new_empty(schema.clone())]
    } else {
        batches
    };
    let table = table
        .write(batches)
        .with_save_mode(SaveMode::Overwrite)
        .with_replace_where(predicate)
        .with_writer_properties(writer_properties(&schema))
        .with_commit_properties(CommitProperties::default().with_application_transactions(txns))
        .await
        .map_err(err)?;
    // Recomputed rows leave no older version to compare with (as the Iceberg path expires).
    drop_history(&table, name).await?;
    Ok(table.version().unwrap_or_default() as u64)
}

/// What a compaction did to one table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Compaction {
    pub files_removed: u64,
    pub files_added: u64,
}

/// Bin-packs the table's small files into files of about `target_bytes` (Delta OPTIMIZE; one
/// commit, data unchanged). The replaced files stay for time travel (an erasure deletes those
/// holding its subjects). `None` if there is no table.
pub(crate) async fn compact(
    location: &LakePath,
    name: &str,
    target_bytes: u64,
) -> Result<Option<Compaction>, DeltaSinkError> {
    let err = |source| DeltaSinkError::Delta {
        table: name.to_string(),
        source: Box::new(source),
    };
    let Some(table) = open_existing(location, name).await? else {
        return Ok(None);
    };
    let schema: SchemaRef = table.snapshot().map_err(err)?.snapshot().arrow_schema();
    let target = std::num::NonZeroU64::new(target_bytes.max(1)).expect("at least 1");
    let (_, metrics) = table
        .optimize()
        .with_target_size(target)
        .with_writer_properties(writer_properties(&schema))
        .await
        .map_err(err)?;
    Ok(Some(Compaction {
        files_removed: metrics.num_files_removed,
        files_added: metrics.num_files_added,
    }))
}

impl DeltaSinkError {
    /// Another writer's commit conflicted with this one (try again on the new version).
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(
            self,
            DeltaSinkError::Delta { source, .. }
                if matches!(source.as_ref(), deltalake::DeltaTableError::Transaction { source: TransactionError::CommitConflict(_) })
        )
    }
}

#[cfg(test)]
mod tests;
