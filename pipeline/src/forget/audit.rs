//! Erasure receipts as rows of the audit table, and `sluice reuse-subject` (a release recorded
//! there).

use super::*;
use crate::audit_table::{self, event, AuditRow};

/// Appends `receipt` to the audit table once: its commit under `stream` marks it written.
pub(super) fn write_audit(
    config: &Config,
    rt: &tokio::runtime::Runtime,
    receipt: &Receipt,
    stream: String,
) -> Result<(), ForgetError> {
    Ok(audit_table::append(config, rt, &receipt_row(receipt), stream)?)
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

/// A receipt as an audit row: analytic tables' numbers summed, the vault's apart.
fn receipt_row(r: &Receipt) -> AuditRow {
    let analytic = |f: fn(&TableReceipt) -> u64| -> u64 {
        r.tables
            .iter()
            .filter(|(name, _)| *name != "vault")
            .map(|(_, t)| f(t))
            .sum()
    };
    AuditRow {
        event: if r.job_id.starts_with("reuse-") {
            event::SUBJECT_REUSE
        } else {
            event::ERASURE
        },
        job_id: r.job_id.clone(),
        request_id: r.request_id.clone(),
        requested_by: r.requested_by.clone(),
        actor: String::new(),
        token_domain: r.token_domain.clone(),
        subject_tokens: r.subject_tokens.clone(),
        started_at: r.started_at.clone(),
        finished_at: r.finished_at.clone(),
        keys_destroyed: r.keys_destroyed,
        rows_removed: analytic(|t| t.rows_removed),
        rows_anonymized: analytic(|t| t.rows_anonymized),
        vault_rows_removed: r.tables.get("vault").map(|t| t.rows_removed).unwrap_or(0),
        files_removed: r.tables.values().map(|t| t.files_removed).sum(),
        bytes_rewritten: r.tables.values().map(|t| t.bytes_rewritten).sum(),
        tables: serde_json::to_string(&r.tables).expect("receipt serializes"),
        columns: Vec::new(),
        verified: r.verification.passed,
        verification: serde_json::to_string(&r.verification).expect("receipt serializes"),
        outcome: if r.verification.passed {
            "verified".into()
        } else {
            format!("{} findings", r.verification.findings.len())
        },
    }
}
