//! What the jobs do to a table of the lake, whatever its format: open it for appends, compact
//! it, query it, replace some of its rows. The pipeline calls these; only here (and in the
//! rest of `lake`) is the format matched.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch, TimestampMicrosecondArray};
use arrow_schema::SchemaRef;
use deltalake::datafusion::common::ScalarValue;
use deltalake::datafusion::datasource::file_format::parquet::ParquetFormat;
use deltalake::datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use deltalake::datafusion::prelude::{col, lit, SessionContext};

use super::{Catalogs, LakeError, SchemaChange, Sink, TableLayout, TableLocation, TableSink};
use crate::delta::erase::RowMatcher;
use crate::delta::{Compaction, DeltaSink};
use crate::iceberg::IcebergSink;
use crate::SourcePosition;

impl TableLocation {
    /// The format's name, for logs and metrics: `delta` or `iceberg`.
    pub fn format(&self) -> &'static str {
        match self {
            TableLocation::Delta(_) => "delta",
            TableLocation::Iceberg { .. } => "iceberg",
        }
    }

    /// How a report names the table `name` in this format: `name` for Delta, `iceberg/name`.
    pub fn label(&self, name: &str) -> String {
        match self {
            TableLocation::Delta(_) => name.to_string(),
            TableLocation::Iceberg { .. } => format!("iceberg/{name}"),
        }
    }

    /// Opens the table for appends (creating it with `schema`), laid out and described as
    /// `layout` says. `name` names a Delta table in logs and errors (an Iceberg table's name
    /// is its location's).
    pub async fn open_sink(
        &self,
        catalogs: &mut Catalogs,
        name: &str,
        app_prefix: &str,
        schema: SchemaRef,
        layout: TableLayout<'_>,
    ) -> Result<TableSink, LakeError> {
        Ok(match self {
            TableLocation::Delta(path) => TableSink(Sink::Delta(
                DeltaSink::open_or_create(
                    path,
                    name,
                    app_prefix,
                    schema,
                    layout.partition.as_slice(),
                    layout.stats_columns,
                    layout.tags,
                )
                .await?,
            )),
            TableLocation::Iceberg { location, table } => TableSink(Sink::Iceberg(
                IcebergSink::open_or_create(
                    catalogs.get(location).await?,
                    location,
                    table,
                    app_prefix,
                    schema,
                    layout,
                )
                .await?,
            )),
        })
    }

    /// What opening this table with `schema` would do to it — create it, leave it, add
    /// columns, or refuse — changing nothing (`sluice check`).
    pub async fn schema_change(
        &self,
        catalogs: &mut Catalogs,
        name: &str,
        schema: &SchemaRef,
    ) -> Result<SchemaChange, LakeError> {
        Ok(match self {
            TableLocation::Delta(path) => crate::delta::schema_change(path, name, schema).await?,
            TableLocation::Iceberg { location, .. } if !location.may_exist() => SchemaChange::Create,
            TableLocation::Iceberg { location, table } => {
                let catalog = catalogs.get(location).await?;
                crate::iceberg::schema_change(catalog.as_ref(), location, table, schema).await?
            }
        })
    }

    /// Rewrites small files into files of about `target_bytes`; `None` if the table does not
    /// exist. Iceberg rewrites keep statistics to `stats_columns` (all when `None`).
    pub async fn compact(
        &self,
        catalogs: &mut Catalogs,
        name: &str,
        app_prefix: &str,
        stats_columns: Option<&[String]>,
        target_bytes: u64,
    ) -> Result<Option<Compaction>, LakeError> {
        Ok(match self {
            TableLocation::Delta(path) => crate::delta::compact(path, name, target_bytes).await?,
            TableLocation::Iceberg { location, table } => {
                let catalog = catalogs.get(location).await?;
                crate::iceberg::compact(catalog, location, table, app_prefix, stats_columns, target_bytes).await?
            }
        })
    }

    /// Registers the table in `session` as `as_name`; false when it does not exist yet (or,
    /// Iceberg, holds no file). `name` names a Delta table in errors.
    pub async fn register(
        &self,
        catalogs: &mut Catalogs,
        session: &SessionContext,
        name: &str,
        as_name: &str,
    ) -> Result<bool, LakeError> {
        let query = |e: &dyn std::fmt::Display| LakeError::Query(e.to_string());
        match self {
            TableLocation::Delta(path) => {
                let Some(table) = crate::delta::open_table(path, name).await? else {
                    return Ok(false);
                };
                table
                    .update_datafusion_session(&session.state())
                    .map_err(|e| query(&e))?;
                let provider = table.table_provider().await.map_err(|e| query(&e))?;
                session.register_table(as_name, provider).map_err(|e| query(&e))?;
            }
            TableLocation::Iceberg { location, table } => {
                let catalog = catalogs.get(location).await?;
                let Some(found) = crate::iceberg::data_files(catalog.as_ref(), location, table).await? else {
                    return Ok(false);
                };
                if found.files.is_empty() {
                    return Ok(false);
                }
                let (files, schema) = (found.files, found.schema);
                // Files on object storage are read through the table's own store (its
                // credentials, vended ones included).
                session
                    .runtime_env()
                    .register_object_store(&found.store.0, found.store.1);
                // The live Parquet files of the current snapshot; columns added later are null
                // in older files.
                let urls = files
                    .iter()
                    .map(|f| ListingTableUrl::parse(f).map_err(|e| query(&e)))
                    .collect::<Result<Vec<_>, _>>()?;
                let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
                let listing = ListingTableConfig::new_with_multi_paths(urls)
                    .with_listing_options(options)
                    .with_schema(schema);
                let provider = ListingTable::try_new(listing).map_err(|e| query(&e))?;
                session
                    .register_table(as_name, Arc::new(provider))
                    .map_err(|e| query(&e))?;
            }
        }
        Ok(true)
    }

    /// Replaces the rows whose timestamp `column` (UTC microseconds) is one of `values` with
    /// `batches`, committed with `positions` in one commit (creating the table with `schema`).
    /// Statistics on every column: these tables hold no per-person value.
    #[allow(clippy::too_many_arguments)]
    pub async fn replace_where_time_in(
        &self,
        catalogs: &mut Catalogs,
        name: &str,
        app_prefix: &str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        column: &str,
        values: &[i64],
        positions: &[SourcePosition],
    ) -> Result<(), LakeError> {
        let stats: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        match self {
            TableLocation::Delta(path) => {
                let at = |us: i64| lit(ScalarValue::TimestampMicrosecond(Some(us), Some("UTC".into())));
                let predicate = col(column).in_list(values.iter().map(|v| at(*v)).collect(), false);
                crate::delta::replace_where(path, name, app_prefix, schema, &stats, batches, predicate, positions)
                    .await?;
            }
            TableLocation::Iceberg { location, table } => {
                let catalog = catalogs.get(location).await?;
                let mut sink = IcebergSink::open_or_create(
                    catalog,
                    location,
                    table,
                    app_prefix,
                    schema,
                    TableLayout {
                        stats_columns: &stats,
                        ..TableLayout::default()
                    },
                )
                .await?;
                for batch in batches {
                    sink.write(batch).await?;
                }
                let wanted: BTreeSet<i64> = values.iter().copied().collect();
                let name = column.to_string();
                let matcher = RowMatcher {
                    columns: vec![name.clone()],
                    matches: Box::new(move |batch: &RecordBatch| {
                        let times = batch
                            .column_by_name(&name)
                            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
                            .ok_or_else(|| format!("column {name} is not a microsecond timestamp"))?;
                        Ok((0..batch.num_rows())
                            .map(|i| Some(!times.is_null(i) && wanted.contains(&times.value(i))))
                            .collect::<BooleanArray>())
                    }),
                };
                sink.replace_rows(&matcher, positions).await?;
            }
        }
        Ok(())
    }
}
