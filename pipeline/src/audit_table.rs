//! The append-only audit table (Delta, at `lake.audit`): one row per erasure receipt, subject
//! reuse, re-identification step (`sluice reveal`) and retention run. Readable by any Delta
//! reader; `sluice audit` prints it. Rows name subjects by token, never by id, and hold no value.

use std::sync::Arc;

use arrow_array::builder::{Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde_json::{Map, Value};
use sluice_connectors::arrow::compute::cast;
use sluice_connectors::datafusion::prelude::{col, SessionContext};
use sluice_connectors::lake::{delta_table, Catalogs, LakeError, TableLayout};
use sluice_connectors::SourcePosition;
use sluice_transforms::actions::timestamp_type;

use crate::config::Config;

/// The audit table's name (in logs and errors; its place is `lake.audit`).
pub const AUDIT_TABLE: &str = "erasure_audit";

/// What a row records (`event`). Rows written before the column existed are erasures and
/// subject reuses (told apart by their job id's `reuse-` prefix).
pub mod event {
    pub const ERASURE: &str = "erasure";
    pub const SUBJECT_REUSE: &str = "subject_reuse";
    pub const REVEAL_REQUEST: &str = "reveal_request";
    pub const REVEAL_APPROVE: &str = "reveal_approve";
    pub const REVEAL_RUN: &str = "reveal_run";
    pub const REVEAL_REFUSED: &str = "reveal_refused";
    pub const RETENTION: &str = "retention";
}

/// One row of the audit table.
#[derive(Debug, Clone, Default)]
pub struct AuditRow {
    pub event: &'static str,
    pub job_id: String,
    pub request_id: String,
    /// Who asked: a keyed token for erasures (operators put the subject's own email there), the
    /// operator's identity as given for re-identification (the accountable person).
    pub requested_by: String,
    /// Who did this step, as they named themselves (re-identification: the accountable
    /// operator); empty where the step has no operator of its own.
    pub actor: String,
    pub token_domain: String,
    pub subject_tokens: Vec<String>,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    pub keys_destroyed: u64,
    pub rows_removed: u64,
    pub rows_anonymized: u64,
    pub vault_rows_removed: u64,
    pub files_removed: u64,
    pub bytes_rewritten: u64,
    /// JSON: per table, what was done.
    pub tables: String,
    /// `table.column` the step concerns (re-identification).
    pub columns: Vec<String>,
    pub verified: bool,
    /// JSON of the verification (passed, findings).
    pub verification: String,
    /// What came of the step, in words (never a value).
    pub outcome: String,
}

pub fn audit_schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let count = |name: &str| Field::new(name, DataType::Int64, false);
    // Columns added after the table's first version are nullable: older rows hold none.
    let added = |name: &str| Field::new(name, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        text("job_id"),
        text("request_id"),
        text("requested_by"),
        text("token_domain"),
        count("subjects"),
        // JSON array of the subjects' tokens: never the raw ids.
        text("subject_tokens"),
        Field::new("started_at", timestamp_type(), false),
        Field::new("finished_at", timestamp_type(), false),
        count("keys_destroyed"),
        count("rows_removed"),
        count("rows_anonymized"),
        count("vault_rows_removed"),
        count("files_removed"),
        count("bytes_rewritten"),
        // JSON: per table, mode, rows, files, bytes and commit version.
        text("tables"),
        Field::new("verified", DataType::Boolean, false),
        text("verification"),
        added("event"),
        added("actor"),
        // JSON array of `table.column`.
        added("columns"),
        added("outcome"),
    ]))
}

fn batch(r: &AuditRow) -> RecordBatch {
    let text = |v: &str| -> ArrayRef {
        let mut b = StringBuilder::new();
        b.append_value(v);
        Arc::new(b.finish())
    };
    let int = |v: u64| -> ArrayRef {
        let mut b = Int64Builder::new();
        b.append_value(v as i64);
        Arc::new(b.finish())
    };
    let ts = |v: &str| -> ArrayRef {
        let us = chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| t.timestamp_micros())
            .unwrap_or_default();
        let mut b = TimestampMicrosecondBuilder::new();
        b.append_value(us);
        Arc::new(b.finish().with_timezone("UTC"))
    };
    let json = |v: &Vec<String>| serde_json::to_string(v).expect("strings serialize");
    let columns: Vec<ArrayRef> = vec![
        text(&r.job_id),
        text(&r.request_id),
        text(&r.requested_by),
        text(&r.token_domain),
        int(r.subject_tokens.len() as u64),
        text(&json(&r.subject_tokens)),
        ts(&r.started_at),
        ts(&r.finished_at),
        int(r.keys_destroyed),
        int(r.rows_removed),
        int(r.rows_anonymized),
        int(r.vault_rows_removed),
        int(r.files_removed),
        int(r.bytes_rewritten),
        text(if r.tables.is_empty() { "{}" } else { &r.tables }),
        Arc::new(arrow_array::BooleanArray::from(vec![r.verified])),
        text(if r.verification.is_empty() {
            "{}"
        } else {
            &r.verification
        }),
        text(r.event),
        text(&r.actor),
        text(&json(&r.columns)),
        text(&r.outcome),
    ];
    RecordBatch::try_new(audit_schema(), columns).expect("audit row matches its schema")
}

/// Appends `row` once: its commit under `stream` marks it written, so a rerun of the step that
/// wrote it adds no second row.
pub fn append(config: &Config, rt: &tokio::runtime::Runtime, row: &AuditRow, stream: String) -> Result<(), LakeError> {
    let stats = ["job_id", "started_at", "finished_at", "verified"].map(String::from);
    let mut audit = rt.block_on(delta_table(config.audit_path.clone()).open_sink(
        &mut Catalogs::default(),
        AUDIT_TABLE,
        &config.name,
        audit_schema(),
        TableLayout {
            stats_columns: &stats,
            ..TableLayout::default()
        },
    ))?;
    if rt.block_on(audit.committed(&stream))?.is_none() {
        rt.block_on(audit.write(batch(row)))?;
        rt.block_on(audit.commit(&[SourcePosition { stream, offset: 1 }], &[]))?;
    }
    Ok(())
}

/// Every row of the audit table, oldest first, each as a JSON object (JSON columns parsed);
/// empty when there is no table yet.
pub fn read(config: &Config) -> Result<Vec<Map<String, Value>>, LakeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LakeError::Query(e.to_string()))?;
    let query = |e: &dyn std::fmt::Display| LakeError::Query(e.to_string());
    rt.block_on(async {
        let session = SessionContext::new();
        let table = delta_table(config.audit_path.clone());
        if !table
            .register(&mut Catalogs::default(), &session, AUDIT_TABLE, "audit")
            .await?
        {
            return Ok(Vec::new());
        }
        let batches = session
            .table("audit")
            .await
            .map_err(|e| query(&e))?
            .sort(vec![
                col("finished_at").sort(true, true),
                col("job_id").sort(true, true),
            ])
            .map_err(|e| query(&e))?
            .collect()
            .await
            .map_err(|e| query(&e))?;
        let mut rows = Vec::new();
        for b in batches {
            let columns: Vec<(String, ArrayRef)> = b
                .schema()
                .fields()
                .iter()
                .zip(b.columns())
                .map(|(f, c)| Ok((f.name().clone(), cast(c, &DataType::Utf8)?)))
                .collect::<Result<_, sluice_connectors::arrow::error::ArrowError>>()
                .map_err(|e| query(&e))?;
            for i in 0..b.num_rows() {
                let mut row = Map::new();
                for (name, values) in &columns {
                    let values = values.as_any().downcast_ref::<StringArray>().expect("cast to text");
                    let value = values.is_valid(i).then(|| values.value(i).to_string());
                    row.insert(name.clone(), cell(name, b.schema().field_with_name(name).ok(), value));
                }
                rows.push(row);
            }
        }
        Ok(rows)
    })
}

/// A cell as JSON: counts as numbers, `verified` as a boolean, JSON columns parsed.
fn cell(name: &str, field: Option<&Field>, value: Option<String>) -> Value {
    let Some(value) = value else {
        return Value::Null;
    };
    match field.map(|f| f.data_type()) {
        Some(DataType::Int64) => value.parse::<i64>().map(Value::from).unwrap_or(Value::String(value)),
        Some(DataType::Boolean) => Value::Bool(value == "true"),
        _ if matches!(name, "subject_tokens" | "tables" | "verification" | "columns") => {
            serde_json::from_str(&value).unwrap_or(Value::String(value))
        }
        _ => Value::String(value),
    }
}
