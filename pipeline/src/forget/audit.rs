//! The audit table of erasure receipts, and `sluice reuse-subject` (a release recorded there).

use super::*;

/// Appends `receipt` to the audit table once: its commit under `stream` marks it written.
pub(super) fn write_audit(
    config: &Config,
    rt: &tokio::runtime::Runtime,
    receipt: &Receipt,
    stream: String,
) -> Result<(), ForgetError> {
    let stats = ["job_id", "started_at", "finished_at", "verified"].map(String::from);
    let mut audit = rt.block_on(delta_table(config.audit_path.clone()).open_sink(
        &mut Catalogs::default(),
        "erasure_audit",
        &config.name,
        audit_schema(),
        TableLayout {
            stats_columns: &stats,
            ..TableLayout::default()
        },
    ))?;
    if rt.block_on(audit.committed(&stream))?.is_none() {
        rt.block_on(audit.write(audit_row(receipt)))?;
        rt.block_on(audit.commit(&[SourcePosition { stream, offset: 1 }], &[]))?;
    }
    Ok(())
}

/// A request to let an erased subject's id belong to someone new (a recycled account number, a
/// person who registers again).
pub struct ReuseRequest {
    pub subject: String,
    pub domain: Option<String>,
    /// Events with a source time from here on are the new owner's (ms since the epoch).
    pub from_ms: i64,
    pub request_id: String,
    pub requested_by: String,
}

/// Releases an erased subject's id for reuse, and records it in the audit table (a row whose
/// job id starts with `reuse-`): from `from_ms` on its events are kept, under a new key; the
/// erased person's (earlier source times, on any replay) stay dropped. Without this every
/// future event of a reused id is dropped (counted as `erased_subject_rows`).
pub fn release_for_reuse(config: &Config, request: ReuseRequest) -> Result<Receipt, ForgetError> {
    if canonical_identifier(&request.subject).is_empty() {
        return Err(ForgetError::Request("the subject id is empty or blank".into()));
    }
    let domain = subject_domain(config, request.domain.as_deref())?;
    let keys = runtime::open_key_store(config, runtime::SMALL_KEY_STORE_MEMORY)?;
    let tokenizer = keys.tokenizer()?;
    let token = tokenizer.domain(&domain).token(&request.subject).as_str().to_string();
    let audit_tokens = tokenizer.domain(AUDIT_TOKEN_DOMAIN);
    if !keys.release_subject(&token, request.from_ms)? {
        return Err(ForgetError::Request(format!(
            "subject {token} (domain {domain}) has no erasure in force: nothing to release"
        )));
    }
    let request_ref = audit_tokens.token(&request.request_id).as_str().to_string();
    let now = iso(now_ms());
    let receipt = Receipt {
        job_id: format!("reuse-{}", &request_ref[..16]),
        request_id: request_ref,
        requested_by: audit_tokens.token(&request.requested_by).as_str().to_string(),
        token_domain: domain,
        subject_tokens: vec![token],
        started_at: now.clone(),
        finished_at: now,
        verification: Verification {
            passed: true,
            findings: vec![format!(
                "released for reuse: events from {} on are kept under a new key; earlier ones stay dropped",
                iso(request.from_ms)
            )],
        },
        ..Receipt::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    write_audit(config, &rt, &receipt, format!("subject-reuse/{}", receipt.job_id))?;
    Ok(receipt)
}

pub fn audit_schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let count = |name: &str| Field::new(name, DataType::Int64, false);
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
    ]))
}

pub(super) fn audit_row(r: &Receipt) -> RecordBatch {
    let analytic = |f: fn(&TableReceipt) -> u64| -> i64 {
        r.tables
            .iter()
            .filter(|(name, _)| *name != "vault")
            .map(|(_, t)| f(t) as i64)
            .sum()
    };
    let text = |v: &str| -> ArrayRef {
        let mut b = StringBuilder::new();
        b.append_value(v);
        Arc::new(b.finish())
    };
    let int = |v: i64| -> ArrayRef {
        let mut b = Int64Builder::new();
        b.append_value(v);
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
    let columns: Vec<ArrayRef> = vec![
        text(&r.job_id),
        text(&r.request_id),
        text(&r.requested_by),
        text(&r.token_domain),
        int(r.subject_tokens.len() as i64),
        text(&serde_json::to_string(&r.subject_tokens).expect("strings")),
        ts(&r.started_at),
        ts(&r.finished_at),
        int(r.keys_destroyed as i64),
        int(analytic(|t| t.rows_removed)),
        int(analytic(|t| t.rows_anonymized)),
        int(r.tables.get("vault").map(|t| t.rows_removed as i64).unwrap_or(0)),
        int(r.tables.values().map(|t| t.files_removed as i64).sum()),
        int(r.tables.values().map(|t| t.bytes_rewritten as i64).sum()),
        text(&serde_json::to_string(&r.tables).expect("receipt serializes")),
        Arc::new(arrow_array::BooleanArray::from(vec![r.verification.passed])),
        text(&serde_json::to_string(&r.verification).expect("receipt serializes")),
    ];
    RecordBatch::try_new(audit_schema(), columns).expect("audit row matches its schema")
}
