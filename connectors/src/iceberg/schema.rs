//! Arrow schemas as Iceberg schemas, and a table's schema evolved to a policy's.

use super::*;
use crate::lake::schema::{plan, Mismatch, SchemaChange};
use iceberg::spec::Type;

pub(super) fn type_error(table: &str, field: &arrow_schema::Field) -> IcebergSinkError {
    IcebergSinkError::UnsupportedType {
        table: table.to_string(),
        column: field.name().clone(),
        data_type: field.data_type().to_string(),
    }
}

/// The Iceberg schema of `schema`, ids from 1 in column order; timestamps as `timestamptz`;
/// tagged columns documented.
pub(super) fn iceberg_schema(
    table: &str,
    schema: &ArrowSchema,
    tags: Option<&TableTags>,
) -> Result<Schema, IcebergSinkError> {
    let mut fields = Vec::with_capacity(schema.fields().len());
    for (i, f) in schema.fields().iter().enumerate() {
        let ty = arrow_type_to_type(f.data_type()).map_err(|_| type_error(table, f))?;
        let id = i as i32 + 1;
        let mut field = if f.is_nullable() {
            NestedField::optional(id, f.name(), ty)
        } else {
            NestedField::required(id, f.name(), ty)
        };
        field.doc = column_doc(tags, f.name());
        fields.push(Arc::new(field));
    }
    Schema::builder()
        .with_fields(fields)
        .build()
        .map_err(|source| IcebergSinkError::Iceberg {
            table: table.to_string(),
            source: Box::new(source),
        })
}

/// The table's columns, and the policy's with their Iceberg types.
#[allow(clippy::type_complexity)]
fn columns(
    table: &Table,
    name: &str,
    schema: &ArrowSchema,
) -> Result<(Vec<(String, String)>, Vec<(String, Type)>), IcebergSinkError> {
    let existing = table
        .metadata()
        .current_schema()
        .as_struct()
        .fields()
        .iter()
        .map(|f| (f.name.clone(), f.field_type.to_string()))
        .collect();
    let mut wanted = Vec::new();
    for f in schema.fields() {
        let ty = arrow_type_to_type(f.data_type()).map_err(|_| type_error(name, f))?;
        wanted.push((f.name().clone(), ty));
    }
    Ok((existing, wanted))
}

/// What opening the table `name` with `schema` would do to it; nothing is changed.
pub(crate) async fn schema_change(
    catalog: &dyn Catalog,
    location: &IcebergLocation,
    name: &str,
    schema: &ArrowSchema,
) -> Result<SchemaChange, IcebergSinkError> {
    let Some(table) = super::load_existing(catalog, location, name).await? else {
        return Ok(SchemaChange::Create);
    };
    let (existing, wanted) = columns(&table, name, schema)?;
    let wanted: Vec<(String, String)> = wanted.iter().map(|(n, t)| (n.clone(), t.to_string())).collect();
    Ok(plan(&existing, &wanted))
}

/// Adds the columns of `schema` the table lacks; any other difference is an error.
pub(super) async fn evolve_schema(
    catalog: &dyn Catalog,
    table: Table,
    name: &str,
    schema: &ArrowSchema,
) -> Result<Table, IcebergSinkError> {
    let err = |source| IcebergSinkError::Iceberg {
        table: name.to_string(),
        source: Box::new(source),
    };
    let (existing, wanted) = columns(&table, name, schema)?;
    let wanted_text: Vec<(String, String)> = wanted.iter().map(|(n, t)| (n.clone(), t.to_string())).collect();
    let added: Vec<AddColumn> = match plan(&existing, &wanted_text) {
        SchemaChange::Create | SchemaChange::Same => return Ok(table),
        refused @ SchemaChange::Refused { .. } => {
            return Err(IcebergSinkError::SchemaChanged(Mismatch::new(
                name,
                &existing,
                &wanted_text,
                &refused,
            )))
        }
        SchemaChange::Add(columns) => wanted
            .into_iter()
            .filter(|(n, _)| columns.contains(n))
            .map(|(n, ty)| AddColumn::optional(&n, ty))
            .collect(),
    };
    tracing::info!(
        table = name,
        columns = added.len(),
        "adding the policy's new columns to the table"
    );
    let tx = Transaction::new(&table);
    let mut update = tx.update_schema();
    for column in added {
        update = update.add_column(column);
    }
    let tx = update.apply(tx).map_err(err)?;
    tx.commit(catalog)
        .await
        .and_then(|t| with_file_io_of(t, &table))
        .map_err(err)
}

/// The same values under the table's Arrow type: timestamps differ only in how UTC is spelled,
/// binary is Iceberg's large binary.
pub(super) fn retag(array: &ArrayRef, want: &DataType) -> Result<ArrayRef, deltalake::arrow::error::ArrowError> {
    match (array.data_type(), want) {
        (have, want) if have == want => Ok(array.clone()),
        (DataType::Timestamp(TimeUnit::Microsecond, _), DataType::Timestamp(TimeUnit::Microsecond, Some(tz))) => {
            Ok(Arc::new(
                array
                    .as_primitive::<TimestampMicrosecondType>()
                    .clone()
                    .with_timezone(tz.clone()),
            ))
        }
        _ => deltalake::arrow::compute::cast(array, want),
    }
}

/// A column's doc: its comment (class, how it was made, tags); `None` for an untagged column.
fn column_doc(tags: Option<&TableTags>, column: &str) -> Option<String> {
    tags.and_then(|t| t.columns.get(column))
        .map(|c| c.comment.clone())
        .filter(|c| !c.is_empty())
}

/// Brings the table's `sluice.*` properties and its columns' docs to `tags`, committing only
/// what differs (a policy that changed a class since the table was written).
pub(super) async fn apply_tags(
    catalog: &Arc<dyn Catalog>,
    location: &IcebergLocation,
    mut table: Table,
    name: &str,
    tags: &TableTags,
) -> Result<Table, IcebergSinkError> {
    let err = |source| IcebergSinkError::Iceberg {
        table: name.to_string(),
        source: Box::new(source),
    };
    let changes = tags.property_changes(table.metadata().properties());
    if !changes.is_empty() {
        tracing::info!(table = name, "writing the policy's classes to the table's properties");
        let tx = Transaction::new(&table);
        let mut update = tx.update_table_properties();
        for (key, value) in changes {
            update = match value {
                Some(value) => update.set(key, value),
                None => update.remove(key),
            };
        }
        let tx = update.apply(tx).map_err(err)?;
        table = tx
            .commit(catalog.as_ref())
            .await
            .and_then(|t| with_file_io_of(t, &table))
            .map_err(err)?;
    }
    let docs: std::collections::BTreeMap<String, Option<String>> = tags
        .columns
        .keys()
        .map(|column| (column.clone(), column_doc(Some(tags), column)))
        .collect();
    let differs = table
        .metadata()
        .current_schema()
        .as_struct()
        .fields()
        .iter()
        .any(|f| docs.get(&f.name).is_some_and(|doc| f.doc != *doc));
    if differs {
        tracing::info!(table = name, "writing the policy's column classes to the table's docs");
        let rewriter = super::rewrite::Rewriter::new(catalog.clone(), location, name).await?;
        table = rewriter.set_docs(&docs).await?;
    }
    Ok(table)
}
