//! Apache Iceberg sink: one table per target in a catalog (an embedded SQL catalog on SQLite,
//! or a REST catalog), written with the `iceberg` crate. Source positions ride in the summary
//! properties of the same snapshot as the data (as the Iceberg Kafka Connect sink does), so a
//! table's committed position is exactly the data it holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema as ArrowSchema, SchemaRef, TimeUnit};
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
use deltalake::parquet::schema::types::ColumnPath;
use iceberg::arrow::{arrow_type_to_type, schema_to_arrow_schema, RecordBatchPartitionSplitter};
use iceberg::spec::{DataFile, DataFileFormat, NestedField, Schema, Transform, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, DefaultLocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::partitioning::PartitioningWriter;
use iceberg::{Catalog, CatalogBuilder, ErrorKind, NamespaceIdent, TableCreation, TableIdent};

use crate::delta::erase::{count_matches, FileError};
use crate::lake::{TableLayout, TableTags};
use crate::storage::{LakePath, StorageOptions};
use crate::SourcePosition;

mod catalog;
mod compact;
pub(crate) mod erase;
mod rest;
pub(crate) mod rewrite;
mod schema;
pub(crate) mod store;

pub use catalog::*;
pub(crate) use compact::*;
pub(crate) use schema::schema_change;
use schema::*;

/// Snapshot summary property holding a stream's committed offset: `sluice.position.<app id>`.
const POSITION_PROPERTY_PREFIX: &str = "sluice.position.";

/// Commits are retried by us, after re-checking the fences, never blindly by the library.
const NO_LIBRARY_RETRIES: (&str, &str) = ("commit.retry.num-retries", "0");

/// Parquet files of about this size (the Iceberg default is 512 MiB; ours are per batch).
const TARGET_FILE_BYTES: usize = 256 << 20;

const MAX_COMMIT_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum IcebergSinkError {
    #[error("iceberg table {table}: {source}")]
    Iceberg { table: String, source: Box<iceberg::Error> },
    #[error("iceberg catalog: cannot create directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Another writer committed this stream since this one read its position.
    #[error("iceberg table {table}: stream {stream} was committed by another writer since this one read it at {expected:?}; dropping uncommitted work")]
    Fenced {
        table: String,
        stream: String,
        expected: Option<i64>,
    },
    #[error("iceberg table {0}")]
    SchemaChanged(Box<crate::lake::schema::Mismatch>),
    #[error("iceberg table {table}: column {column}: type {data_type} has no Iceberg equivalent")]
    UnsupportedType {
        table: String,
        column: String,
        data_type: String,
    },
}

/// The summary property of a stream's offset.
fn position_property(app_id: &str) -> String {
    format!("{POSITION_PROPERTY_PREFIX}{app_id}")
}

/// Every stream's newest committed offset: the current snapshot carries all of them; the walk
/// through its ancestry also finds those of snapshots written by other tools (which carry none).
pub(crate) fn committed_positions(table: &Table) -> HashMap<String, i64> {
    let metadata = table.metadata();
    let mut out = HashMap::new();
    let mut next = metadata.current_snapshot_id();
    while let Some(id) = next {
        let Some(snapshot) = metadata.snapshot_by_id(id) else {
            break;
        };
        for (k, v) in &snapshot.summary().additional_properties {
            if let (Some(app_id), Ok(offset)) = (k.strip_prefix(POSITION_PROPERTY_PREFIX), v.parse::<i64>()) {
                out.entry(app_id.to_string()).or_insert(offset);
            }
        }
        next = snapshot.parent_snapshot_id();
    }
    out
}

/// The summary properties that carry every stream's position forward (for a rewrite
/// snapshot, so that expiring older snapshots loses no position).
pub(crate) fn position_properties(positions: &HashMap<String, i64>) -> HashMap<String, String> {
    positions
        .iter()
        .map(|(app_id, offset)| (position_property(app_id), offset.to_string()))
        .collect()
}

/// Parquet properties: snappy; no statistics (hence no Iceberg bounds in the manifests) for
/// columns that link a row to a person; manifests are history an erasure must not leave
/// holding tokens.
fn writer_properties(schema: &ArrowSchema, stats_columns: &[String], bloom_filter: Option<&str>) -> WriterProperties {
    let mut props = crate::lake::parquet_properties();
    if let Some(column) = bloom_filter {
        props = crate::lake::current::key_bloom_filter(props, column);
    }
    for field in schema.fields() {
        if !stats_columns.contains(field.name()) {
            props =
                props.set_column_statistics_enabled(ColumnPath::from(field.name().as_str()), EnabledStatistics::None);
        }
    }
    props.build()
}

fn unique_prefix() -> String {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("system randomness");
    format!("sluice-{}", hex::encode(bytes))
}

type Writer =
    FanoutWriter<DataFileWriterBuilder<ParquetWriterBuilder, DefaultLocationGenerator, DefaultFileNameGenerator>>;

/// An Iceberg table being appended to.
pub(crate) struct IcebergSink {
    name: String,
    app_prefix: String,
    catalog: Arc<dyn Catalog>,
    location: IcebergLocation,
    ident: TableIdent,
    table: Table,
    /// The table's current schema as Arrow, with field ids: what written batches are cast to.
    arrow_schema: SchemaRef,
    stats_columns: Vec<String>,
    /// A column whose values each file keeps a Bloom filter of (a current table's key).
    bloom_filter: Option<String>,
    writer: Option<Writer>,
    /// `None` for an unpartitioned table.
    splitter: Option<RecordBatchPartitionSplitter>,
    buffered_rows: usize,
    /// Files written and not committed yet (invisible to readers until the commit adds them).
    written: Vec<DataFile>,
    known: HashMap<String, Option<i64>>,
}

impl IcebergSink {
    /// Opens the table `name` in `location`'s namespace, creating namespace and table (schema
    /// from `schema`, identity partition on `partition_column`) if absent. Columns the policy
    /// added since are added to the table (optional: older rows hold null). Only
    /// `stats_columns` get Parquet statistics and manifest bounds.
    pub(crate) async fn open_or_create(
        catalog: Arc<dyn Catalog>,
        location: &IcebergLocation,
        name: &str,
        app_prefix: &str,
        schema: SchemaRef,
        layout: TableLayout<'_>,
    ) -> Result<Self, IcebergSinkError> {
        let TableLayout {
            partition: partition_column,
            stats_columns,
            tags,
        } = layout;
        let err = |source| IcebergSinkError::Iceberg {
            table: name.to_string(),
            source: Box::new(source),
        };
        let namespace = location.namespace_ident();
        if !catalog.namespace_exists(&namespace).await.map_err(err)? {
            match catalog.create_namespace(&namespace, HashMap::new()).await {
                Ok(_) => {}
                // Another daemon created it first.
                Err(e) if e.kind() == ErrorKind::NamespaceAlreadyExists => {}
                Err(e) => return Err(err(e)),
            }
        }
        let ident = location.table_ident(name);
        let mut table = if catalog.table_exists(&ident).await.map_err(err)? {
            catalog.load_table(&ident).await.map_err(err)?
        } else {
            let ice = iceberg_schema(name, &schema, tags)?;
            let mut spec = UnboundPartitionSpec::builder();
            if let Some(column) = partition_column {
                let source_id = ice.field_by_name(column).map(|f| f.id).unwrap_or(0);
                spec = spec
                    .add_partition_field(source_id, column, Transform::Identity)
                    .map_err(err)?;
            }
            let creation = TableCreation::builder()
                .name(name.to_string())
                .schema(ice)
                .partition_spec(spec.build())
                .properties(
                    [
                        (NO_LIBRARY_RETRIES.0.to_string(), NO_LIBRARY_RETRIES.1.to_string()),
                        ("write.parquet.compression-codec".to_string(), "snappy".to_string()),
                    ]
                    .into_iter()
                    .chain(tags.iter().flat_map(|t| t.properties.clone())),
                )
                .build();
            match catalog.create_table(&namespace, creation).await {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::TableAlreadyExists => catalog.load_table(&ident).await.map_err(err)?,
                Err(e) => return Err(err(e)),
            }
        };
        if table
            .metadata()
            .properties()
            .get(NO_LIBRARY_RETRIES.0)
            .map(String::as_str)
            != Some(NO_LIBRARY_RETRIES.1)
        {
            let tx = Transaction::new(&table);
            let tx = tx
                .update_table_properties()
                .set(NO_LIBRARY_RETRIES.0.to_string(), NO_LIBRARY_RETRIES.1.to_string())
                .apply(tx)
                .map_err(err)?;
            table = tx
                .commit(catalog.as_ref())
                .await
                .and_then(|t| with_file_io_of(t, &table))
                .map_err(err)?;
        }
        table = evolve_schema(catalog.as_ref(), table, name, &schema).await?;
        if let Some(tags) = tags {
            table = apply_tags(&catalog, location, table, name, tags).await?;
        }
        let arrow_schema = Arc::new(schema_to_arrow_schema(table.metadata().current_schema()).map_err(err)?);
        let spec = table.metadata().default_partition_spec();
        let splitter = if spec.is_unpartitioned() {
            None
        } else {
            Some(
                RecordBatchPartitionSplitter::try_new_with_computed_values(
                    table.metadata().current_schema().clone(),
                    spec.clone(),
                )
                .map_err(err)?,
            )
        };
        Ok(Self {
            name: name.to_string(),
            app_prefix: app_prefix.to_string(),
            catalog,
            ident,
            location: location.clone(),
            table,
            arrow_schema,
            stats_columns: stats_columns.to_vec(),
            bloom_filter: None,
            writer: None,
            splitter,
            buffered_rows: 0,
            written: Vec::new(),
            known: HashMap::new(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Files written from now on carry a Bloom filter of `column` (a current table's key).
    pub(crate) fn with_bloom_filter(mut self, column: &str) -> Self {
        self.bloom_filter = Some(column.to_string());
        self
    }

    fn err(&self, source: iceberg::Error) -> IcebergSinkError {
        IcebergSinkError::Iceberg {
            table: self.name.clone(),
            source: Box::new(source),
        }
    }

    /// The application id of a stream (the same as the Delta sink's `txn` ids).
    pub(crate) fn app_id(&self, stream: &str) -> String {
        format!("sluice/{}/{}", self.app_prefix, stream)
    }

    /// Last position of `stream` committed to this table, if any; later commits of the
    /// stream are fenced on it.
    pub(crate) async fn committed(&mut self, stream: &str) -> Result<Option<i64>, IcebergSinkError> {
        self.table = self.catalog.load_table(&self.ident).await.map_err(|e| self.err(e))?;
        let position = committed_positions(&self.table).get(&self.app_id(stream)).copied();
        self.known.insert(stream.to_string(), position);
        Ok(position)
    }

    pub(crate) fn buffered_rows(&self) -> usize {
        self.buffered_rows
    }

    /// Buffers rows (accepted, not durable): written into open Parquet files per partition.
    pub(crate) async fn write(&mut self, batch: RecordBatch) -> Result<(), IcebergSinkError> {
        let batch = self.conform(batch)?;
        if self.writer.is_none() {
            let metadata = self.table.metadata();
            let parquet = ParquetWriterBuilder::new(
                writer_properties(&self.arrow_schema, &self.stats_columns, self.bloom_filter.as_deref()),
                metadata.current_schema().clone(),
            );
            let rolling = RollingFileWriterBuilder::new(
                parquet,
                TARGET_FILE_BYTES,
                self.table.file_io().clone(),
                DefaultLocationGenerator::new(metadata).map_err(|e| self.err(e))?,
                // Numbering restarts per writer: a unique prefix keeps files apart.
                DefaultFileNameGenerator::new(unique_prefix(), None, DataFileFormat::Parquet),
            );
            self.writer = Some(FanoutWriter::new(DataFileWriterBuilder::new(rolling)));
        }
        let parts = match &self.splitter {
            Some(splitter) => splitter.split(&batch).map_err(|e| self.err(e))?,
            None => {
                let metadata = self.table.metadata();
                let key = iceberg::spec::PartitionKey::new(
                    metadata.default_partition_spec().as_ref().clone(),
                    metadata.current_schema().clone(),
                    iceberg::spec::Struct::empty(),
                );
                vec![(key, batch.clone())]
            }
        };
        let writer = self.writer.as_mut().expect("writer opened above");
        for (key, part) in parts {
            writer
                .write(key, part)
                .await
                .map_err(|source| IcebergSinkError::Iceberg {
                    table: self.name.clone(),
                    source: Box::new(source),
                })?;
        }
        self.buffered_rows += batch.num_rows();
        Ok(())
    }

    /// The batch in the table's column order and Arrow types (with field ids); columns the
    /// table has and the batch lacks are null.
    fn conform(&self, batch: RecordBatch) -> Result<RecordBatch, IcebergSinkError> {
        let invalid = |e: deltalake::arrow::error::ArrowError| {
            self.err(iceberg::Error::new(ErrorKind::DataInvalid, e.to_string()))
        };
        let columns: Vec<ArrayRef> = self
            .arrow_schema
            .fields()
            .iter()
            .map(|field| match batch.schema().index_of(field.name()) {
                Ok(i) => retag(batch.column(i), field.data_type()),
                Err(_) => Ok(arrow_array::new_null_array(field.data_type(), batch.num_rows())),
            })
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        RecordBatch::try_new(self.arrow_schema.clone(), columns).map_err(invalid)
    }

    /// Closes the open files; they are committed by the next commit.
    pub(crate) async fn spill(&mut self) -> Result<(), IcebergSinkError> {
        if let Some(writer) = self.writer.take() {
            let files = writer.close().await.map_err(|e| self.err(e))?;
            self.written.extend(files);
        }
        Ok(())
    }

    async fn check_fences(&self, positions: &[SourcePosition]) -> Result<(), IcebergSinkError> {
        self.fences(positions)(&self.table)
    }

    /// Fencing: whether a table still holds what this writer last saw of every stream in
    /// `positions` (a check that owns what it needs: rewrites run it on each attempt's table).
    fn fences(&self, positions: &[SourcePosition]) -> impl Fn(&Table) -> Result<(), IcebergSinkError> + Sync {
        let expected: Vec<(String, String, Option<i64>)> = positions
            .iter()
            .map(|p| {
                let known = self.known.get(&p.stream).copied().flatten();
                (p.stream.clone(), self.app_id(&p.stream), known)
            })
            .collect();
        let name = self.name.clone();
        move |table: &Table| {
            let committed = committed_positions(table);
            for (stream, app_id, expected) in &expected {
                if committed.get(app_id).copied() != *expected {
                    return Err(IcebergSinkError::Fenced {
                        table: name.clone(),
                        stream: stream.clone(),
                        expected: *expected,
                    });
                }
            }
            Ok(())
        }
    }

    /// Commits the written files in one snapshot whose summary carries `positions` (and the
    /// unfenced `attached` ones): durable. Returns the new snapshot's sequence number.
    pub(crate) async fn commit(
        &mut self,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<i64, IcebergSinkError> {
        self.spill().await?;
        let ours: Vec<(String, i64)> = positions
            .iter()
            .chain(attached)
            .map(|p| (self.app_id(&p.stream), p.offset))
            .collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Fresh metadata each attempt: a concurrent commit (another stream's daemon, an
            // erasure, a compaction) is caught up with, one of our own streams fences us.
            self.table = self.catalog.load_table(&self.ident).await.map_err(|e| self.err(e))?;
            self.check_fences(positions).await?;
            // Every stream's position rides in every snapshot: expiring older snapshots (table
            // maintenance, an erasure) then loses none.
            let mut all = committed_positions(&self.table);
            all.extend(ours.iter().cloned());
            let properties = position_properties(&all);
            let tx = Transaction::new(&self.table);
            let tx = tx
                .fast_append()
                .with_check_duplicate(false)
                .add_data_files(self.written.clone())
                .set_snapshot_properties(properties)
                .apply(tx)
                .map_err(|e| self.err(e))?;
            crate::failpoint(&format!("iceberg-before-commit:{}", self.name));
            match tx.commit(self.catalog.as_ref()).await {
                Ok(table) => {
                    crate::failpoint(&format!("iceberg-after-commit:{}", self.name));
                    self.table = with_file_io_of(table, &self.table).map_err(|e| self.err(e))?;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::CatalogCommitConflicts && attempt < MAX_COMMIT_ATTEMPTS => {
                    tracing::info!(table = %self.name, "another writer committed first: catching up before committing");
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        self.written.clear();
        self.buffered_rows = 0;
        for p in positions {
            self.known.insert(p.stream.clone(), Some(p.offset));
        }
        Ok(self.table.metadata().last_sequence_number())
    }
}

impl IcebergSink {
    /// The data files of the table's current snapshot, read afresh, each with its first
    /// partition value when that is an integer (a current table's bucket).
    pub(crate) async fn live_files(&mut self) -> Result<Vec<(String, Option<i32>, u64)>, IcebergSinkError> {
        self.table = self.catalog.load_table(&self.ident).await.map_err(|e| self.err(e))?;
        Ok(rewrite::live_files(&self.table)
            .await
            .map_err(|e| self.err(e))?
            .into_iter()
            .map(|(file, _)| {
                let bucket = match file.partition().fields().first() {
                    Some(Some(iceberg::spec::Literal::Primitive(iceberg::spec::PrimitiveLiteral::Int(b)))) => Some(*b),
                    _ => None,
                };
                (file.file_path().to_string(), bucket, file.file_size_in_bytes())
            })
            .collect())
    }

    /// A data file's bytes (or bytes `range` of it), by its path as the manifests name it.
    pub(crate) async fn read_file(
        &self,
        path: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<bytes::Bytes, IcebergSinkError> {
        let input = self.table.file_io().new_input(path).map_err(|e| self.err(e))?;
        match range {
            Some(range) => {
                use iceberg::io::FileRead;
                let reader = input.reader().await.map_err(|e| self.err(e))?;
                reader.read(range).await.map_err(|e| self.err(e))
            }
            None => input.read().await.map_err(|e| self.err(e)),
        }
    }

    /// Drops what was written since the last commit, files included (see the Delta sink's).
    pub(crate) async fn discard_uncommitted(&mut self) -> Result<(), IcebergSinkError> {
        self.spill().await?;
        for file in std::mem::take(&mut self.written) {
            rewrite::delete_if_present(&self.table, file.file_path())
                .await
                .map_err(|e| self.err(e))?;
        }
        self.buffered_rows = 0;
        Ok(())
    }

    /// [`IcebergSink::commit`], removing the `removed` files in the same snapshot (an
    /// `overwrite`: a current-state merge's copy-on-write). A removed file another writer
    /// removed first is a conflict (see [`IcebergSinkError::is_conflict`]): read again.
    pub(crate) async fn commit_replacing(
        &mut self,
        removed: &std::collections::HashSet<String>,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<i64, IcebergSinkError> {
        if removed.is_empty() || self.table.metadata().current_snapshot().is_none() {
            return self.commit(positions, attached).await;
        }
        self.spill().await?;
        let rewriter = rewrite::Rewriter::new(self.catalog.clone(), &self.location, &self.name).await?;
        let properties = position_properties(
            &positions
                .iter()
                .chain(attached)
                .map(|p| (self.app_id(&p.stream), p.offset))
                .collect(),
        );
        let done = rewriter
            .replace(
                removed,
                self.written.clone(),
                iceberg::spec::Operation::Overwrite,
                properties,
                false,
                // On every attempt's table: a second writer of our streams fences us.
                &self.fences(positions),
            )
            .await?;
        self.table = done.table;
        self.written.clear();
        self.buffered_rows = 0;
        for p in positions {
            self.known.insert(p.stream.clone(), Some(p.offset));
        }
        Ok(self.table.metadata().last_sequence_number())
    }
}

impl IcebergSinkError {
    /// Another writer's commit conflicted with this one (try again on the new snapshot).
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(self, IcebergSinkError::Iceberg { source, .. } if source.kind() == ErrorKind::CatalogCommitConflicts)
    }
}

impl IcebergSink {
    /// Replaces the rows `drop` matches with the rows written since the last commit, in one
    /// `overwrite` snapshot carrying `positions`; older snapshots are expired (for small derived
    /// tables that are recomputed, such as aggregates). Files holding no matched row are kept.
    pub(crate) async fn replace_rows(
        &mut self,
        drop: &crate::delta::erase::RowMatcher,
        positions: &[SourcePosition],
    ) -> Result<(), IcebergSinkError> {
        use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let rewriter = rewrite::Rewriter::new(self.catalog.clone(), &self.location, &self.name).await?;
        self.table = rewriter.load().await?;
        let mut removed = std::collections::HashSet::new();
        let mut kept = Vec::new();
        for (file, _) in rewrite::live_files(&self.table).await.map_err(|e| self.err(e))? {
            let path = file.file_path().to_string();
            let input = self.table.file_io().new_input(&path).map_err(|e| self.err(e))?;
            let bytes = input.read().await.map_err(|e| self.err(e))?;
            let invalid = |e: FileError| self.err(iceberg::Error::new(ErrorKind::DataInvalid, format!("{path}: {e}")));
            if count_matches(bytes.clone(), drop).map_err(invalid)? == 0 {
                continue;
            }
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .map_err(|e| invalid(e.into()))?;
            for batch in reader {
                let batch = batch.map_err(|e| invalid(e.into()))?;
                let columns: Vec<usize> = drop
                    .columns
                    .iter()
                    .map(|c| batch.schema().index_of(c).map_err(|e| invalid(e.into())))
                    .collect::<Result<_, _>>()?;
                let matched = (drop.matches)(&batch.project(&columns).map_err(|e| invalid(e.into()))?)
                    .map_err(|e| invalid(FileError::Matcher(e)))?;
                let keep: arrow_array::BooleanArray = matched.iter().map(|m| Some(m != Some(true))).collect();
                kept.push(arrow_select::filter::filter_record_batch(&batch, &keep).map_err(|e| invalid(e.into()))?);
            }
            removed.insert(path);
        }
        for batch in kept {
            if batch.num_rows() > 0 {
                self.write(batch).await?;
            }
        }
        self.spill().await?;
        if self.table.metadata().current_snapshot().is_none() {
            // Nothing to replace yet: a plain first append.
            return self.commit(positions, &[]).await.map(|_| ());
        }
        let properties = positions
            .iter()
            .map(|p| (position_property(&self.app_id(&p.stream)), p.offset.to_string()))
            .collect();
        let done = rewriter
            .replace(
                &removed,
                std::mem::take(&mut self.written),
                iceberg::spec::Operation::Overwrite,
                properties,
                // Aggregates are recomputed (an erasure among the reasons): no stale history.
                true,
                rewrite::UNFENCED,
            )
            .await?;
        self.table = done.table;
        self.buffered_rows = 0;
        Ok(())
    }
}

/// The data files of a table's current snapshot, its schema as Arrow (UTC timestamps, no field
/// ids) and the object store holding them: for reading the files with another engine.
pub(crate) struct DataFiles {
    pub files: Vec<String>,
    pub schema: SchemaRef,
    /// The store's root URL (`s3://bucket`, `file:///`) and the store.
    pub store: (url::Url, Arc<dyn deltalake::logstore::object_store::ObjectStore>),
}

/// Table `name`'s [`DataFiles`]; `None` if there is no table.
pub(crate) async fn data_files(
    catalog: &dyn Catalog,
    location: &IcebergLocation,
    name: &str,
) -> Result<Option<DataFiles>, IcebergSinkError> {
    let err = |source| IcebergSinkError::Iceberg {
        table: name.to_string(),
        source: Box::new(source),
    };
    let Some(table) = load_existing(catalog, location, name).await? else {
        return Ok(None);
    };
    let files = rewrite::live_files(&table)
        .await
        .map_err(err)?
        .into_iter()
        .map(|(f, _)| f.file_path().to_string())
        .collect();
    let schema = schema_to_arrow_schema(table.metadata().current_schema()).map_err(err)?;
    let fields: Vec<arrow_schema::Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let data_type = match f.data_type() {
                DataType::Timestamp(unit, Some(_)) => DataType::Timestamp(*unit, Some("UTC".into())),
                other => other.clone(),
            };
            arrow_schema::Field::new(f.name(), data_type, f.is_nullable())
        })
        .collect();
    let store = store::table_store(&table).map_err(|e| err(iceberg::Error::new(ErrorKind::FeatureUnsupported, e)))?;
    Ok(Some(DataFiles {
        files,
        schema: Arc::new(ArrowSchema::new(fields)),
        store,
    }))
}

/// Positions of `streams` in table `name` as it is now (`None` where the table or the stream
/// has none), without opening a writer.
pub(crate) async fn read_positions(
    catalog: &dyn Catalog,
    location: &IcebergLocation,
    name: &str,
    app_prefix: &str,
    streams: &[String],
) -> Result<Vec<Option<i64>>, IcebergSinkError> {
    let Some(table) = load_existing(catalog, location, name).await? else {
        return Ok(vec![None; streams.len()]);
    };
    let committed = committed_positions(&table);
    Ok(streams
        .iter()
        .map(|s| committed.get(&format!("sluice/{app_prefix}/{s}")).copied())
        .collect())
}

/// Table `name` of `location`'s namespace; `None` if the catalog has no such table.
pub(crate) async fn load_existing(
    catalog: &dyn Catalog,
    location: &IcebergLocation,
    name: &str,
) -> Result<Option<Table>, IcebergSinkError> {
    let err = |source| IcebergSinkError::Iceberg {
        table: name.to_string(),
        source: Box::new(source),
    };
    let ident = location.table_ident(name);
    if !catalog.table_exists(&ident).await.map_err(err)? {
        return Ok(None);
    }
    Ok(Some(catalog.load_table(&ident).await.map_err(err)?))
}
