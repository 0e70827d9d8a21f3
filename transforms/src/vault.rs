//! Rows of the PII vault: ciphertext only, keyed by subject token, table and column.

use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};

use crate::actions::timestamp_type;
use crate::raw::RawBatch;

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

struct VaultRow {
    row: usize,
    subject: String,
    table: String,
    column: String,
    envelope: Vec<u8>,
}

#[derive(Default)]
pub struct VaultRowsBuilder {
    rows: Vec<VaultRow>,
}

impl VaultRowsBuilder {
    pub fn push(&mut self, row: usize, subject: &str, table: &str, column: &str, envelope: &[u8]) {
        self.rows.push(VaultRow {
            row,
            subject: subject.to_string(),
            table: table.to_string(),
            column: column.to_string(),
            envelope: envelope.to_vec(),
        });
    }

    /// The vault batch, without rows whose source row was rejected. `None` when empty.
    pub fn finish(
        self,
        raw: &RawBatch,
        rejected: &[bool],
        ingested_at_us: i64,
    ) -> Result<Option<RecordBatch>, ArrowError> {
        let kept: Vec<&VaultRow> = self.rows.iter().filter(|r| !rejected[r.row]).collect();
        if kept.is_empty() {
            return Ok(None);
        }
        let n = kept.len();
        let mut subject = StringBuilder::with_capacity(n, n * 32);
        let mut table = StringBuilder::with_capacity(n, n * 16);
        let mut column = StringBuilder::with_capacity(n, n * 16);
        let mut ciphertext = BinaryBuilder::with_capacity(n, n * 64);
        let mut op = StringBuilder::with_capacity(n, n);
        let mut position = StringBuilder::with_capacity(n, n * 24);
        let mut source_ts = TimestampMicrosecondBuilder::with_capacity(n);
        let mut ingested = TimestampMicrosecondBuilder::with_capacity(n);
        for r in kept {
            subject.append_value(&r.subject);
            table.append_value(&r.table);
            column.append_value(&r.column);
            ciphertext.append_value(&r.envelope);
            op.append_value(raw.ops[r.row].code());
            position.append_value(raw.positions.value(r.row));
            source_ts.append_value(raw.event_ms.value(r.row).saturating_mul(1000));
            ingested.append_value(ingested_at_us);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(subject.finish()),
            Arc::new(table.finish()),
            Arc::new(column.finish()),
            Arc::new(ciphertext.finish()),
            Arc::new(op.finish()),
            Arc::new(position.finish()),
            Arc::new(source_ts.finish().with_timezone("UTC")),
            Arc::new(ingested.finish().with_timezone("UTC")),
        ];
        RecordBatch::try_new(vault_schema(), columns).map(Some)
    }
}
