//! The quarantine table: events that could not be sanitized, with the reason, table, column and
//! position, and the raw event encrypted (never plaintext): under its subject's key when the
//! subject can be read (so an erasure shreds it with the subject's other data, backups
//! included, and `_subject` holds the token an erasure finds it by), else under the quarantine
//! system key (events unreadable as JSON, of tables no policy names, without a subject value).
//!
//! The whole raw event is kept, default-denied columns included: reprocessing it after a fix
//! (a policy naming a new column, a decoder defect) must see the bytes as the source sent them
//! — the defect may be in reading them, so a re-serialized excerpt could lose the very bytes at
//! fault — and the event's position must replay exactly once. Its encryption under the subject
//! key is what keeps it from outliving an erasure.

use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, Date32Array, RecordBatch, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use sluice_transforms::actions::timestamp_type;
use sluice_transforms::crypto::{field_aad, CryptoError, DataKey};

pub const PARTITION_COLUMN: &str = "_date";

/// Quarantine columns whose per-file minimum/maximum may be kept in the log: not the position
/// (it points at the raw event) nor the encrypted event.
pub const STATS_COLUMNS: &[&str] = &["reason", "detail", "table", "column", "event_bytes", "_ingested_at"];

pub fn quarantine_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        // Stable code (`malformed_json`, `type_mismatch`, …) and a fixed human text.
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("table", DataType::Utf8, true),
        Field::new("column", DataType::Utf8, true),
        Field::new("_position", DataType::Utf8, false),
        // Encrypted raw event; for oversized events only the first `max_event_bytes`.
        Field::new("event_enc", DataType::Binary, false),
        Field::new("event_bytes", DataType::Int64, false),
        Field::new("_ingested_at", timestamp_type(), false),
        Field::new(PARTITION_COLUMN, DataType::Date32, false),
        // The subject's token when the event's subject could be read (its key encrypts
        // `event_enc`); null otherwise. Added after the others: older tables gain it.
        Field::new("_subject", DataType::Utf8, true),
    ]))
}

/// Whose key seals a quarantined event: its subject's (token and key), or the system key.
pub type Seal<'a> = Option<(&'a str, &'a DataKey)>;

/// The AAD of a quarantined event: bound to its position, so it cannot be swapped for another.
pub fn event_aad(position: &str) -> Vec<u8> {
    field_aad("_quarantine", "event", position)
}

/// Why an event is quarantined: names and fixed texts only, never a value.
pub struct Rejection<'a> {
    pub reason: &'a str,
    pub detail: &'a str,
    pub table: Option<&'a str>,
    pub column: Option<&'a str>,
}

impl<'a> Rejection<'a> {
    /// A rejection of a whole event, before its table is known.
    pub fn event(reason: &'a str, detail: &'a str) -> Self {
        Self {
            reason,
            detail,
            table: None,
            column: None,
        }
    }
}

pub struct QuarantineBuilder {
    key: Arc<DataKey>,
    reason: StringBuilder,
    detail: StringBuilder,
    table: StringBuilder,
    column: StringBuilder,
    position: StringBuilder,
    event: BinaryBuilder,
    event_bytes: Int64Builder,
    subject: StringBuilder,
    rows: usize,
}

impl QuarantineBuilder {
    pub fn new(key: Arc<DataKey>) -> Self {
        Self {
            key,
            reason: StringBuilder::new(),
            detail: StringBuilder::new(),
            table: StringBuilder::new(),
            column: StringBuilder::new(),
            position: StringBuilder::new(),
            event: BinaryBuilder::new(),
            event_bytes: Int64Builder::new(),
            subject: StringBuilder::new(),
            rows: 0,
        }
    }

    /// Adds an event; `full_len` is its real length when `event` was cut short.
    pub fn push(
        &mut self,
        why: Rejection<'_>,
        position: &str,
        event: &[u8],
        full_len: usize,
        seal: Seal<'_>,
    ) -> Result<(), CryptoError> {
        let key = seal.map_or(&*self.key, |(_, key)| key);
        self.event.append_value(key.seal(event, &event_aad(position))?);
        self.subject.append_option(seal.map(|(token, _)| token));
        self.reason.append_value(why.reason);
        self.detail.append_value(why.detail);
        self.table.append_option(why.table);
        self.column.append_option(why.column);
        self.position.append_value(position);
        self.event_bytes.append_value(full_len as i64);
        self.rows += 1;
        Ok(())
    }

    pub fn finish(mut self, ingested_at_us: i64) -> Option<RecordBatch> {
        if self.rows == 0 {
            return None;
        }
        let n = self.rows;
        let date = (ingested_at_us.div_euclid(86_400_000_000)) as i32;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.reason.finish()),
            Arc::new(self.detail.finish()),
            Arc::new(self.table.finish()),
            Arc::new(self.column.finish()),
            Arc::new(self.position.finish()),
            Arc::new(self.event.finish()),
            Arc::new(self.event_bytes.finish()),
            Arc::new(TimestampMicrosecondArray::from(vec![ingested_at_us; n]).with_timezone("UTC")),
            Arc::new(Date32Array::from(vec![date; n])),
            Arc::new(self.subject.finish()),
        ];
        Some(RecordBatch::try_new(quarantine_schema(), columns).expect("quarantine columns match their schema"))
    }
}
