//! Compaction of an Iceberg table: small files rewritten into files of the target size.

use super::*;
use crate::lake::TableLayout;

/// Rewrites each partition's small files (under `target_bytes`, two or more) into files of
/// about `target_bytes`, in one `replace` snapshot (data unchanged; older snapshots kept for
/// time travel). Only `stats_columns` get statistics in the new files. `None` if there is no
/// table.
pub(crate) async fn compact(
    catalog: Arc<dyn Catalog>,
    location: &IcebergLocation,
    name: &str,
    app_prefix: &str,
    stats_columns: Option<&[String]>,
    target_bytes: u64,
) -> Result<Option<crate::delta::Compaction>, IcebergSinkError> {
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let err = |source| IcebergSinkError::Iceberg {
        table: name.to_string(),
        source: Box::new(source),
    };
    let Some(table) = load_existing(catalog.as_ref(), location, name).await? else {
        return Ok(None);
    };
    let schema = Arc::new(strip_field_ids(
        &schema_to_arrow_schema(table.metadata().current_schema()).map_err(err)?,
    ));
    let all: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let mut sink = IcebergSink::open_or_create(
        catalog.clone(),
        location,
        name,
        app_prefix,
        schema,
        TableLayout {
            stats_columns: stats_columns.unwrap_or(&all),
            ..TableLayout::default()
        },
    )
    .await?;
    let mut by_partition: HashMap<iceberg::spec::Struct, Vec<DataFile>> = HashMap::new();
    for (file, _) in rewrite::live_files(&sink.table).await.map_err(err)? {
        if file.file_size_in_bytes() < target_bytes {
            by_partition.entry(file.partition().clone()).or_default().push(file);
        }
    }
    let mut removed = std::collections::HashSet::new();
    for files in by_partition.into_values().filter(|f| f.len() > 1) {
        for file in files {
            let path = file.file_path().to_string();
            let bytes = sink
                .table
                .file_io()
                .new_input(&path)
                .map_err(err)?
                .read()
                .await
                .map_err(err)?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.with_batch_size(65_536).build())
                .map_err(|e| err(iceberg::Error::new(ErrorKind::DataInvalid, format!("{path}: {e}"))))?;
            for batch in reader {
                let batch =
                    batch.map_err(|e| err(iceberg::Error::new(ErrorKind::DataInvalid, format!("{path}: {e}"))))?;
                sink.write(batch).await?;
            }
            removed.insert(path);
        }
        // One partition's files closed before the next is read: memory stays one partition's.
        sink.spill().await?;
    }
    if removed.is_empty() {
        return Ok(Some(crate::delta::Compaction::default()));
    }
    let added = std::mem::take(&mut sink.written);
    let files_added = added.len() as u64;
    rewrite::Rewriter::new(catalog, location, name)
        .await?
        .replace(
            &removed,
            added,
            iceberg::spec::Operation::Replace,
            HashMap::new(),
            false,
            rewrite::UNFENCED,
        )
        .await?;
    Ok(Some(crate::delta::Compaction {
        files_removed: removed.len() as u64,
        files_added,
    }))
}

pub(super) fn strip_field_ids(schema: &ArrowSchema) -> ArrowSchema {
    ArrowSchema::new(
        schema
            .fields()
            .iter()
            .map(|f| arrow_schema::Field::new(f.name(), f.data_type().clone(), f.is_nullable()))
            .collect::<Vec<_>>(),
    )
}
