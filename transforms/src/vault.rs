//! Rows of the PII vault: ciphertext only, keyed by subject token, table and column.

use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, BooleanArray, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use arrow_select::filter::filter_record_batch;

use crate::actions::timestamp_type;
use crate::raw::RawBatch;

/// Vault columns whose per-file minimum/maximum may be kept in the log: none that names a
/// subject (token), holds ciphertext or an exact source time (the rule of
/// [`crate::engine::STATS_COLUMNS`]).
pub const VAULT_STATS_COLUMNS: &[&str] = &["table", "column", "_op", "_ingested_at"];

pub fn vault_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("subject_token", DataType::Utf8, false),
                Field::new("table", DataType::Utf8, false),
                Field::new("column", DataType::Utf8, false),
                Field::new("ciphertext", DataType::Binary, false),
                Field::new("_op", DataType::Utf8, false),
                Field::new("_position", DataType::Utf8, false),
                Field::new("_source_ts", timestamp_type(), false),
                Field::new("_ingested_at", timestamp_type(), false),
            ]))
        })
        .clone()
}

/// Vault rows built straight into Arrow columns; `rows` remembers each one's source row.
#[derive(Default)]
pub struct VaultRowsBuilder {
    rows: Vec<usize>,
    subject: StringBuilder,
    table: StringBuilder,
    column: StringBuilder,
    ciphertext: BinaryBuilder,
}

impl VaultRowsBuilder {
    pub fn push(&mut self, row: usize, subject: &str, table: &str, column: &str, envelope: &[u8]) {
        self.rows.push(row);
        self.subject.append_value(subject);
        self.table.append_value(table);
        self.column.append_value(column);
        self.ciphertext.append_value(envelope);
    }

    /// The vault batch, without rows whose source row was rejected. `None` when empty.
    pub fn finish(
        mut self,
        raw: &RawBatch,
        rejected: &[bool],
        ingested_at_us: i64,
    ) -> Result<Option<RecordBatch>, ArrowError> {
        if self.rows.is_empty() {
            return Ok(None);
        }
        let n = self.rows.len();
        let mut op = StringBuilder::with_capacity(n, n);
        let mut position = StringBuilder::with_capacity(n, n * 24);
        let mut source_ts = TimestampMicrosecondBuilder::with_capacity(n);
        let mut ingested = TimestampMicrosecondBuilder::with_capacity(n);
        for &row in &self.rows {
            op.append_value(raw.ops[row].code());
            position.append_value(raw.positions.value(row));
            source_ts.append_value(raw.event_ms.value(row).saturating_mul(1000));
            ingested.append_value(ingested_at_us);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.subject.finish()),
            Arc::new(self.table.finish()),
            Arc::new(self.column.finish()),
            Arc::new(self.ciphertext.finish()),
            Arc::new(op.finish()),
            Arc::new(position.finish()),
            Arc::new(source_ts.finish().with_timezone("UTC")),
            Arc::new(ingested.finish().with_timezone("UTC")),
        ];
        let batch = RecordBatch::try_new(vault_schema(), columns)?;
        if !self.rows.iter().any(|&r| rejected[r]) {
            return Ok(Some(batch));
        }
        let keep: BooleanArray = self.rows.iter().map(|&r| Some(!rejected[r])).collect();
        let batch = filter_record_batch(&batch, &keep)?;
        Ok((batch.num_rows() > 0).then_some(batch))
    }
}
