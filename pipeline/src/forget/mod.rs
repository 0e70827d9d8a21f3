//! `sluice forget`: right-to-be-forgotten jobs (GDPR Art. 17).
//!
//! A job, for one subject or a batch, in steps that each survive kill -9 (the job's state lives
//! in the key store, saved before and after every step; a rerun of the same command resumes):
//!
//! 1. **Crypto-shredding**: the subjects' data keys are deleted and their tombstones written in
//!    one key-store transaction. Every `encrypt`/`vault` value of theirs — in any table, any
//!    older version, any backup or copy — is undecryptable from then on; no new key is ever
//!    made for them, and running daemons drop their events (within `keys.erasure_refresh_ms`).
//! 2. **Tables**: per analytic table (its policy's `[erasure]` mode: delete, or anonymize), the
//!    vault and the quarantine, the files holding the subjects' rows are rewritten without them
//!    in one commit, and the old files are deleted physically.
//! 3. **Verification**: every Parquet file under every table (current, older and orphaned) and
//!    the key store are scanned again for the subjects.
//! 4. **Receipt**: one row in the append-only audit table (tokens, never ids), printed.
//!
//! Aggregates computed from the tables (hourly pre-aggregations) register an [`ErasureHook`]
//! to be recomputed without the subjects.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use arrow_array::{Array, BinaryArray, BooleanArray, RecordBatch, StringArray};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sluice_connectors::delta::erase::{token_matcher, RowMatcher, TableErasure, Treatment};
use sluice_connectors::error::{ErrorKind, Kind};
use sluice_connectors::failpoint;
use sluice_connectors::keystore::{KeyStore, KeyStoreError};
use sluice_connectors::lake::{delta_table, Catalogs, ErasureTable, LakeError, TableLocation};
use sluice_transforms::crypto::{canonical_identifier, DataKey};
use sluice_transforms::engine::LINKING_META_COLUMNS;
use sluice_transforms::{Erasure, Policy};
use tracing::{info, warn};

use crate::config::Config;
use crate::quarantine::event_aad;
use crate::runtime::{self, RunError};

mod audit;
mod job;
mod targets;

pub use audit::*;
pub(crate) use job::drop_history;
use job::*;
use targets::*;

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("{0}")]
    Request(String),
    #[error("job {0}: its saved state is unreadable ({1}); it was written by another version?")]
    State(String, String),
}

/// Why a hook failed: its own error, shown with the hook's name.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Something computed from the tables that must be rebuilt without erased subjects (hourly
/// pre-aggregations register here). Called after the tables are rewritten, before the receipt.
pub trait ErasureHook {
    fn name(&self) -> &str;
    /// Called before the tables are rewritten: notes on what depends on the subjects' rows
    /// (saved with the job, so a resumed job still has them).
    fn before_erasure(&self, subject_tokens: &[String]) -> Result<Vec<String>, HookError>;
    /// Recomputes what depended on the subjects' rows; returns a line for the receipt.
    fn after_erasure(&self, subject_tokens: &[String], before: &[String]) -> Result<String, HookError>;
}

pub struct ForgetRequest {
    /// Raw subject ids (as the source has them, in any padding: see [`canonical_identifier`]).
    /// Held in memory only: tokenized at once.
    pub subjects: Vec<String>,
    /// Token domain of the ids; defaults to the one domain every policy's subject shares.
    pub domain: Option<String>,
    /// The request's reference (ticket number); the job id derives from it or the subjects.
    pub request_id: Option<String>,
    /// Who or what asked (recorded in the receipt).
    pub requested_by: String,
    pub dry_run: bool,
    /// What becomes of quarantined events that mention an id but cannot be attributed.
    pub unattributed: Unattributed,
    /// How long after the keys are destroyed the tables are rewritten: running daemons see
    /// the tombstones and commit the rows they sanitized before.
    pub settle: std::time::Duration,
}

/// Quarantined events that mention an erased id but that sluice cannot attribute (unreadable,
/// or of a table no policy names): a person decides, sluice does not guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Unattributed {
    /// Kept and listed in the receipt; the verification fails until a rerun says what to do.
    #[default]
    Fail,
    /// Reviewed as the subjects': deleted with their other data.
    Delete,
    /// Reviewed as someone else's: kept; the verification passes.
    Keep,
}

/// Outcome of one table, as recorded in the receipt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableReceipt {
    /// `delete`, `anonymize` (analytic tables), `vault`, `quarantine`.
    pub mode: String,
    pub rows_removed: u64,
    pub rows_anonymized: u64,
    pub files_scanned: u64,
    pub files_removed: u64,
    pub files_written: u64,
    pub bytes_rewritten: u64,
    /// Table version of the erasure commit (unknown when the job was resumed after it).
    pub version: Option<u64>,
    /// Delta: every commit before this version was deleted from the log, with the data files
    /// only older versions referenced (a checkpoint at this version keeps the table whole): no
    /// time travel, and no old commit's statistics, reach back before the erasure. Iceberg:
    /// the erasure expired every older snapshot instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_removed_before: Option<u64>,
    #[serde(default)]
    pub log_files_removed: u64,
    /// Data files only those older versions referenced (rows of others, replaced before).
    #[serde(default)]
    pub history_files_removed: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Verification {
    pub passed: bool,
    /// What was still found (table and file names, counts: never values).
    pub findings: Vec<String>,
}

/// The receipt: what the job did. Printed, and written to the audit table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Receipt {
    pub job_id: String,
    /// Keyed token of the request's reference (see [`AUDIT_TOKEN_DOMAIN`]).
    pub request_id: String,
    /// Keyed token of who asked.
    pub requested_by: String,
    pub dry_run: bool,
    pub token_domain: String,
    pub subject_tokens: Vec<String>,
    pub started_at: String,
    pub finished_at: String,
    pub keys_destroyed: u64,
    pub tombstones_written: u64,
    pub tables: BTreeMap<String, TableReceipt>,
    /// Subjects none of whose rows any table held (never ingested, erased before, or a wrong
    /// id or token domain).
    pub subjects_without_rows: u64,
    /// Positions of quarantined events that mention an id but cannot be attributed (not JSON,
    /// or of a table no policy names): kept; a person should look at them.
    pub review_quarantined: Vec<String>,
    pub hooks: Vec<String>,
    pub verification: Verification,
}

/// Token domain of the request's reference and requester in receipts and the audit table:
/// `sluice forget --dry-run --request-id R --requested-by W` prints the tokens of R and W.
pub const AUDIT_TOKEN_DOMAIN: &str = "sluice-audit";

pub fn forget(
    config: &Config,
    request: ForgetRequest,
    hooks: &[Box<dyn ErasureHook + '_>],
) -> Result<Receipt, ForgetError> {
    check_request(&request)?;
    let mut job = match ErasureJob::start(config, &request)? {
        Started::Finished(receipt) => return Ok(receipt),
        Started::Job(job) => job,
    };
    job.shred()?;
    let sightings = Sightings::default();
    let targets = targets(
        config,
        &job.keys,
        &job.domain,
        &job.id_tokens,
        request.unattributed,
        &sightings,
    )?;
    job.note_hooks(hooks)?;
    job.erase_tables(&targets, &sightings)?;
    if request.dry_run {
        return Ok(job.dry_run_receipt());
    }
    job.run_hooks(hooks)?;
    job.verify(&targets)?;
    job.write_audit()?;
    Ok(job.state.receipt)
}

/// Refused before any key is destroyed: no subject, or an empty id.
fn check_request(request: &ForgetRequest) -> Result<(), ForgetError> {
    if request.subjects.is_empty() {
        return Err(ForgetError::Request("no subject given".into()));
    }
    if request.subjects.iter().any(|s| canonical_identifier(s).is_empty()) {
        return Err(ForgetError::Request("a subject id is empty or blank".into()));
    }
    Ok(())
}

/// The token domain of the subjects: the one given, else the one every policy's subject shares.
pub(crate) fn subject_domain(config: &Config, given: Option<&str>) -> Result<String, ForgetError> {
    if let Some(d) = given {
        return Ok(d.to_string());
    }
    let domains: HashSet<&str> = config.policies.iter().map(|p| p.token_domain.as_str()).collect();
    if domains.len() != 1 {
        let mut list: Vec<&str> = domains.into_iter().collect();
        list.sort();
        return Err(ForgetError::Request(format!(
            "the policies' subjects have several token domains ({}): choose one with --domain",
            list.join(", ")
        )));
    }
    Ok(domains.into_iter().next().expect("one").to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn short_hash(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    hex::encode(&digest.as_ref()[..8])
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
