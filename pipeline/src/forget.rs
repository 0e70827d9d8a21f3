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

use arrow_array::builder::{Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{Array, ArrayRef, BinaryArray, BooleanArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sluice_connectors::delta::erase::{token_matcher, RowMatcher, TableErasure, Treatment};
use sluice_connectors::delta::{DeltaSink, DeltaSinkError};
use sluice_connectors::failpoint;
use sluice_connectors::keystore::{KeyStore, KeyStoreError};
use sluice_connectors::lake::{delta_table, Catalogs, ErasureTable, LakeError, TableLocation};
use sluice_connectors::SourcePosition;
use sluice_transforms::actions::timestamp_type;
use sluice_transforms::crypto::{canonical_identifier, DataKey};
use sluice_transforms::engine::LINKING_META_COLUMNS;
use sluice_transforms::{Erasure, Policy};
use tracing::{info, warn};

use crate::config::Config;
use crate::quarantine::event_aad;
use crate::runtime::{self, RunError};

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    #[error(transparent)]
    Table(#[from] DeltaSinkError),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("{0}")]
    Request(String),
    #[error("job {0}: its saved state is unreadable ({1}); it was written by another version?")]
    State(String, String),
}

/// Something computed from the tables that must be rebuilt without erased subjects (hourly
/// pre-aggregations register here). Called after the tables are rewritten, before the receipt.
pub trait ErasureHook {
    fn name(&self) -> &str;
    /// Called before the tables are rewritten: notes on what depends on the subjects' rows
    /// (saved with the job, so a resumed job still has them).
    fn before_erasure(&self, subject_tokens: &[String]) -> Result<Vec<String>, String>;
    /// Recomputes what depended on the subjects' rows; returns a line for the receipt.
    fn after_erasure(&self, subject_tokens: &[String], before: &[String]) -> Result<String, String>;
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

/// A job's saved progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct JobState {
    receipt: Receipt,
    /// Raised each time a finished job whose verification found something is run again.
    attempt: u32,
    /// When the keys were destroyed and the tombstones written.
    shredded_at_ms: Option<i64>,
    /// Per table, what earlier attempts did (this attempt's numbers are added to them).
    earlier: BTreeMap<String, TableReceipt>,
    /// Per table: the files its erasure commit removes, saved just before that commit.
    pending_removal: BTreeMap<String, Vec<String>>,
    tables_done: Vec<String>,
    /// Subjects whose rows some table held.
    found: BTreeSet<String>,
    /// Positions of quarantined events to review.
    review: BTreeSet<String>,
    /// Per hook, what it noted before the tables were rewritten.
    #[serde(default)]
    hook_notes: BTreeMap<String, Vec<String>>,
    hooks_done: bool,
    verification_done: bool,
    audit_written: bool,
}

/// One table the job goes through.
struct Target {
    name: String,
    location: TableLocation,
    matcher: RowMatcher,
    treatment: Treatment,
    mode: &'static str,
}

/// Token domain of the request's reference and requester in receipts and the audit table:
/// `sluice forget --dry-run --request-id R --requested-by W` prints the tokens of R and W.
pub const AUDIT_TOKEN_DOMAIN: &str = "sluice-audit";

/// Files no table version holds are deleted only when older than this (Delta's default
/// deleted-file retention): a younger one may be a running writer's transaction in flight.
const ORPHAN_MIN_AGE_MS: i64 = 7 * 24 * 3600 * 1000;

pub fn forget(
    config: &Config,
    request: ForgetRequest,
    hooks: &[Box<dyn ErasureHook + '_>],
) -> Result<Receipt, ForgetError> {
    check_request(config, &request)?;
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

/// Refused before any key is destroyed: an empty id, or tables that could not be rewritten.
fn check_request(config: &Config, request: &ForgetRequest) -> Result<(), ForgetError> {
    if request.subjects.is_empty() {
        return Err(ForgetError::Request("no subject given".into()));
    }
    if request.subjects.iter().any(|s| canonical_identifier(s).is_empty()) {
        return Err(ForgetError::Request("a subject id is empty or blank".into()));
    }
    if let Some(iceberg) = &config.iceberg {
        if matches!(
            iceberg.catalog,
            sluice_connectors::iceberg::CatalogSettings::Rest { .. }
        ) {
            return Err(ForgetError::Request(
                "the Iceberg tables are in a REST catalog, which this version can only append to (iceberg 0.10): erasure needs the SQL catalog".into(),
            ));
        }
    }
    Ok(())
}

/// Where a job stands, read from its saved state (whose fields stay as they are, so that a job
/// interrupted under an older version resumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Keys not destroyed yet (or a dry run).
    Shred,
    /// Keys destroyed; tables being rewritten (those in `tables_done` are), then the hooks
    /// (aggregates) run.
    Tables,
    Verify,
    Audit,
    Done,
}

impl JobState {
    fn phase(&self) -> Phase {
        if self.audit_written {
            Phase::Done
        } else if self.verification_done {
            Phase::Audit
        } else if self.hooks_done {
            Phase::Verify
        } else if self.shredded_at_ms.is_some() {
            Phase::Tables
        } else {
            Phase::Shred
        }
    }
}

// Returned once per job, never stored: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Started<'a> {
    /// The job finished before with a passing verification: its receipt.
    Finished(Receipt),
    Job(ErasureJob<'a>),
}

/// One erasure job, a method per phase; its state is saved (in the key store) after every step.
struct ErasureJob<'a> {
    config: &'a Config,
    request: &'a ForgetRequest,
    keys: KeyStore,
    domain: String,
    job_id: String,
    /// Canonical id → token: the one form ingest and every lookup use.
    id_tokens: HashMap<String, String>,
    /// The subjects' tokens, sorted.
    tokens: Vec<String>,
    state: JobState,
    rt: tokio::runtime::Runtime,
    catalogs: Catalogs,
}

impl<'a> ErasureJob<'a> {
    /// Tokenizes the request and loads the job's saved state (a rerun resumes it).
    fn start(config: &'a Config, request: &'a ForgetRequest) -> Result<Started<'a>, ForgetError> {
        let domain = subject_domain(config, request.domain.as_deref())?;
        let keys = runtime::open_key_store(config, runtime::SMALL_KEY_STORE_MEMORY)?;
        let subject_tokenizer = keys.tokenizer()?.domain(&domain);
        let id_tokens: HashMap<String, String> = request
            .subjects
            .iter()
            .map(|s| {
                (
                    canonical_identifier(s).into_owned(),
                    subject_tokenizer.token(s).as_str().to_string(),
                )
            })
            .collect();
        let mut tokens: Vec<String> = id_tokens.values().cloned().collect();
        tokens.sort();
        tokens.dedup();
        // The request's reference and requester are kept as keyed tokens: operators put emails
        // there, the subject's own among them, and the receipt outlives the erasure.
        let audit_tokenizer = keys.tokenizer()?.domain(AUDIT_TOKEN_DOMAIN);
        let request_ref = request
            .request_id
            .as_ref()
            .map(|r| audit_tokenizer.token(r).as_str().to_string());
        let requested_by = audit_tokenizer.token(&request.requested_by).as_str().to_string();
        let job_id = match &request_ref {
            Some(r) => format!("req-{}", &r[..16]),
            None => format!("subjects-{}", short_hash(&tokens.join(","))),
        };
        let saved: JobState = match keys.job_state(&job_id)? {
            Some(text) if !request.dry_run => {
                serde_json::from_str(&text).map_err(|e| ForgetError::State(job_id.clone(), e.to_string()))?
            }
            _ => JobState::default(),
        };
        if !saved.receipt.job_id.is_empty()
            && (saved.receipt.subject_tokens != tokens || saved.receipt.token_domain != domain)
        {
            return Err(ForgetError::Request(format!(
                "job {job_id} exists for other subjects: give the same subjects as its first run, or another --request-id"
            )));
        }
        if saved.phase() == Phase::Done && saved.receipt.verification.passed {
            info!(job = %job_id, "this erasure job finished before; printing its receipt");
            return Ok(Started::Finished(saved.receipt));
        }
        let mut state = if saved.phase() == Phase::Done {
            // Finished, but the verification found something: go through the tables again.
            info!(job = %job_id, "the job's verification found rows left; running it again");
            JobState {
                attempt: saved.attempt + 1,
                shredded_at_ms: saved.shredded_at_ms,
                found: saved.found.clone(),
                earlier: saved.receipt.tables.clone(),
                receipt: Receipt {
                    tables: saved.receipt.tables.clone(),
                    ..saved.receipt
                },
                ..JobState::default()
            }
        } else if saved.receipt.job_id.is_empty() {
            JobState {
                attempt: 1,
                receipt: Receipt {
                    job_id: job_id.clone(),
                    request_id: request_ref.clone().unwrap_or_default(),
                    requested_by,
                    token_domain: domain.clone(),
                    subject_tokens: tokens.clone(),
                    started_at: iso(now_ms()),
                    ..Receipt::default()
                },
                ..saved
            }
        } else {
            info!(job = %job_id, "resuming an interrupted erasure job");
            saved
        };
        state.receipt.dry_run = request.dry_run;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RunError::Runtime)?;
        let job = ErasureJob {
            config,
            request,
            keys,
            domain,
            job_id,
            id_tokens,
            tokens,
            state,
            rt,
            catalogs: Catalogs::default(),
        };
        job.save()?;
        Ok(Started::Job(job))
    }

    fn save(&self) -> Result<(), ForgetError> {
        if self.request.dry_run {
            return Ok(());
        }
        let text = serde_json::to_string(&self.state).expect("job state serializes");
        Ok(self.keys.save_job_state(&self.job_id, &text, now_ms())?)
    }

    fn app_id(&self, target: &str) -> String {
        erasure_app_id(&self.config.name, &self.job_id, self.state.attempt, target)
    }

    /// 1. Crypto-shredding first: from here on nothing new of theirs can be encrypted, and
    ///    daemons drop their events. Idempotent, so every run does it (a key some daemon minted
    ///    while an earlier run was killed is destroyed too).
    fn shred(&mut self) -> Result<(), ForgetError> {
        if self.request.dry_run {
            self.state.receipt.keys_destroyed = self.keys.subjects_with_keys(&self.tokens)?.len() as u64;
            return Ok(());
        }
        let destroyed = self.keys.erase_subjects(&self.job_id, &self.tokens, now_ms())?;
        self.state.receipt.keys_destroyed = destroyed.keys;
        self.state.receipt.tombstones_written = destroyed.tombstones;
        let shredded_at = *self.state.shredded_at_ms.get_or_insert_with(now_ms);
        self.save()?;
        info!(job = %self.job_id, keys = destroyed.keys, "subject keys destroyed");
        failpoint("after-shred");
        // Running daemons may hold rows of theirs sanitized before they saw the tombstones:
        // wait until those are committed, so the tables below include them.
        let settle_until = shredded_at + self.request.settle.as_millis() as i64;
        let wait = settle_until - now_ms();
        if wait > 0 && self.state.tables_done.is_empty() {
            info!(job = %self.job_id, seconds = wait as f64 / 1000.0, "waiting for running daemons to see the tombstones and commit what they hold");
            std::thread::sleep(std::time::Duration::from_millis(wait as u64));
        }
        Ok(())
    }

    /// What each hook notes before the tables are rewritten (saved: a resumed job has it).
    fn note_hooks(&mut self, hooks: &[Box<dyn ErasureHook + '_>]) -> Result<(), ForgetError> {
        if self.request.dry_run {
            return Ok(());
        }
        for hook in hooks {
            if !self.state.hook_notes.contains_key(hook.name()) {
                let notes = hook
                    .before_erasure(&self.tokens)
                    .map_err(|e| ForgetError::Request(format!("{}: {e}", hook.name())))?;
                self.state.hook_notes.insert(hook.name().to_string(), notes);
                self.save()?;
            }
        }
        Ok(())
    }

    /// 2. Tables: each rewritten without the subjects' rows in one commit, old files deleted.
    fn erase_tables(&mut self, targets: &[Target], sightings: &Sightings) -> Result<(), ForgetError> {
        let (pipeline, job_id, attempt) = (&self.config.name, &self.job_id, self.state.attempt);
        let bar = progress_bar(&self.rt, &mut self.catalogs, targets, &|t| {
            erasure_app_id(pipeline, job_id, attempt, t)
        })?;
        for target in targets {
            if self.state.tables_done.contains(&target.name) {
                continue;
            }
            if !self.erase_table(target, sightings, &bar)? {
                self.state.tables_done.push(target.name.clone());
                continue;
            }
            if !self.request.dry_run {
                self.state.tables_done.push(target.name.clone());
                self.save()?;
                failpoint(&format!("after-table:{}", target.name));
            }
        }
        bar.finish_and_clear();
        let (tokens, state) = (&self.tokens, &mut self.state);
        state.receipt.subjects_without_rows = tokens.iter().filter(|t| !state.found.contains(*t)).count() as u64;
        state.receipt.review_quarantined = state.review.iter().cloned().collect();
        if state.receipt.subjects_without_rows > 0 {
            warn!(job = %self.job_id, subjects = state.receipt.subjects_without_rows, "subjects with no rows in any table: never ingested, already erased, or a wrong id or --domain");
        }
        if !state.receipt.review_quarantined.is_empty() {
            warn!(job = %self.job_id, events = state.receipt.review_quarantined.len(), "quarantined events mention an id but cannot be attributed: kept, listed in the receipt for review");
        }
        Ok(())
    }

    fn open(&mut self, target: &Target) -> Result<Option<ErasureTable>, ForgetError> {
        let app_id = self.app_id(&target.name);
        Ok(self.rt.block_on(ErasureTable::open(
            &target.location,
            &mut self.catalogs,
            &target.name,
            app_id,
        ))?)
    }

    /// Erases the subjects' rows from one table; false when the table does not exist.
    fn erase_table(&mut self, target: &Target, sightings: &Sightings, bar: &ProgressBar) -> Result<bool, ForgetError> {
        let Some(mut table) = self.open(target)? else {
            return Ok(false);
        };
        self.state.receipt.tables.entry(target.name.clone()).or_default().mode = target.mode.to_string();
        if self.rt.block_on(table.committed())? {
            // Killed between the commit and the deletion of the old files: delete them now.
            let paths = self
                .state
                .pending_removal
                .get(&target.name)
                .cloned()
                .unwrap_or_default();
            self.rt.block_on(table.delete_files(&paths))?;
            let receipt = self.state.receipt.tables.entry(target.name.clone()).or_default();
            drop_history(&self.rt, &table, receipt)?;
            return Ok(true);
        }
        // A compaction (or another rewrite) committing in between replaces files this job
        // prepared to replace: prepare again on the new version, a few times at most.
        let mut attempt = 0;
        let prepared = loop {
            attempt += 1;
            let mut prepared = self.rt.block_on(table.prepare(
                &target.matcher,
                &target.treatment,
                self.request.dry_run,
                &|n| bar.inc(n),
            ))?;
            // Saved with the state below, so a resumed job still knows whom this table held.
            self.state.found.extend(std::mem::take(&mut *lock(&sightings.tokens)));
            self.state.review.extend(std::mem::take(&mut *lock(&sightings.review)));
            let base = self.state.earlier.get(&target.name).cloned().unwrap_or_default();
            let receipt = self.state.receipt.tables.entry(target.name.clone()).or_default();
            record(receipt, &base, prepared.outcome(), &target.treatment);
            if self.request.dry_run || prepared.outcome().files_removed.is_empty() {
                break prepared;
            }
            // Saved before the commit: a job killed right after it finds the files to
            // delete, and the numbers for its receipt, here.
            self.state
                .pending_removal
                .insert(target.name.clone(), prepared.outcome().files_removed.clone());
            self.save()?;
            failpoint(&format!("before-commit:{}", target.name));
            match self.rt.block_on(table.commit(&mut prepared)) {
                Ok(version) => {
                    failpoint(&format!("after-commit:{}", target.name));
                    self.rt
                        .block_on(table.delete_files(&prepared.outcome().files_removed))?;
                    let receipt = self.state.receipt.tables.entry(target.name.clone()).or_default();
                    receipt.version = version;
                    drop_history(&self.rt, &table, receipt)?;
                    break prepared;
                }
                Err(e) if e.is_conflict() && attempt < 3 => {
                    warn!(job = %self.job_id, table = %target.name, "another writer rewrote files of the table meanwhile (a compaction?): preparing again");
                    table = self
                        .open(target)?
                        .ok_or_else(|| ForgetError::Request(format!("table {} disappeared", target.name)))?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let result = prepared.outcome();
        info!(job = %self.job_id, table = %target.name, rows = result.rows_matched, files = result.files_removed.len(), "table erased");
        Ok(true)
    }

    fn dry_run_receipt(mut self) -> Receipt {
        self.state.receipt.finished_at = iso(now_ms());
        self.state.receipt.verification.findings = vec!["dry run: nothing was changed".into()];
        self.state.receipt
    }

    /// What depended on the subjects' rows (aggregates) is recomputed without them.
    fn run_hooks(&mut self, hooks: &[Box<dyn ErasureHook + '_>]) -> Result<(), ForgetError> {
        if self.state.hooks_done {
            return Ok(());
        }
        self.state.receipt.hooks.clear();
        for hook in hooks {
            let before = self.state.hook_notes.get(hook.name()).cloned().unwrap_or_default();
            let line = hook
                .after_erasure(&self.tokens, &before)
                .map_err(|e| ForgetError::Request(format!("{}: {e}", hook.name())))?;
            self.state.receipt.hooks.push(format!("{}: {line}", hook.name()));
        }
        self.state.hooks_done = true;
        self.save()
    }

    /// 3. Verification: every file of every table (current, older, orphaned), the commit logs
    ///    and the key store are scanned again for the subjects.
    fn verify(&mut self, targets: &[Target]) -> Result<(), ForgetError> {
        if self.state.verification_done {
            return Ok(());
        }
        let mut findings = Vec::new();
        let names_token =
            aho_corasick::AhoCorasick::new(&self.tokens).map_err(|e| ForgetError::Request(e.to_string()))?;
        for target in targets {
            let Some(table) = self.open(target)? else {
                continue;
            };
            findings.extend(self.verify_table(target, &table, &names_token)?);
        }
        if self.request.unattributed == Unattributed::Fail && !self.state.review.is_empty() {
            findings.push(format!(
                "quarantine: {} events mention an erased id but cannot be attributed (positions in review_quarantined): look at them, then run the job again with --unattributed delete (they are the subjects') or --unattributed keep (they are not)",
                self.state.review.len()
            ));
        }
        let left = self.keys.subjects_with_keys(&self.tokens)?;
        if !left.is_empty() {
            findings.push(format!("key store: {} subject keys still present", left.len()));
        }
        self.state.receipt.verification = Verification {
            passed: findings.is_empty(),
            findings,
        };
        self.state.receipt.finished_at = iso(now_ms());
        self.state.verification_done = true;
        self.save()?;
        failpoint("after-verify");
        Ok(())
    }

    /// One table's findings; orphaned files holding the subjects are deleted on the way.
    fn verify_table(
        &mut self,
        target: &Target,
        table: &ErasureTable,
        names_token: &aho_corasick::AhoCorasick,
    ) -> Result<Vec<String>, ForgetError> {
        let mut findings = Vec::new();
        let active: HashSet<String> = self.rt.block_on(table.active_files())?.into_iter().collect();
        // Files older versions still hold (a compaction's inputs): history, deleted now.
        let history = self.rt.block_on(table.history_files())?;
        let mut orphans = Vec::new();
        for (path, matched, modified_ms) in self.rt.block_on(table.scan_all_files(&target.matcher))? {
            if matched == 0 {
                continue;
            }
            if active.contains(&path) {
                // A current row of theirs: written after the rewrite by a daemon that had
                // not yet seen the tombstones. Running the job again erases it.
                findings.push(format!("{}: {matched} rows in {path}", target.name));
            } else if history.contains(&path) || now_ms() - modified_ms >= ORPHAN_MIN_AGE_MS {
                orphans.push(path);
            } else {
                findings.push(format!(
                    "{}: {matched} rows in {path}, a file no table version holds, written less than 7 days ago (possibly a writer's transaction in flight): it is deleted by a run of this job after that",
                    target.name
                ));
            }
        }
        if !orphans.is_empty() {
            let removed = self.rt.block_on(table.delete_files(&orphans))?;
            self.state
                .receipt
                .tables
                .entry(target.name.clone())
                .or_default()
                .files_removed += removed;
            self.save()?;
            warn!(table = %target.name, files = removed, "removed orphaned data files holding erased subjects");
        }
        let in_log = self
            .rt
            .block_on(table.log_files_where(&|bytes: &[u8]| names_token.is_match(bytes)))?;
        if !in_log.is_empty() {
            findings.push(format!(
                "{}: {} commit log files name an erased subject (file statistics written before they were restricted), e.g. {}",
                target.name,
                in_log.len(),
                in_log[0]
            ));
        }
        Ok(findings)
    }

    /// 4. The audit record (its own commit marks it written: a rerun adds no second row).
    fn write_audit(&mut self) -> Result<(), ForgetError> {
        write_audit(
            self.config,
            &self.rt,
            &self.state.receipt,
            format!("erasure-audit/{}/{}", self.job_id, self.state.attempt),
        )?;
        failpoint("after-audit");
        self.state.audit_written = true;
        self.save()
    }
}

/// The app id of an erasure's commit to `target`: its `txn` marks the rewrite done.
fn erasure_app_id(pipeline: &str, job_id: &str, attempt: u32, target: &str) -> String {
    format!("sluice/{pipeline}/erasure/{job_id}/{attempt}/{target}")
}

/// The token domain of the subjects: the one given, else the one every policy's subject shares.
fn subject_domain(config: &Config, given: Option<&str>) -> Result<String, ForgetError> {
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

/// Appends `receipt` to the audit table once: its commit under `stream` marks it written.
fn write_audit(
    config: &Config,
    rt: &tokio::runtime::Runtime,
    receipt: &Receipt,
    stream: String,
) -> Result<(), ForgetError> {
    let mut audit = rt.block_on(DeltaSink::open_or_create(
        &config.audit_path,
        "erasure_audit",
        &config.name,
        audit_schema(),
        &[],
        &["job_id", "started_at", "finished_at", "verified"].map(String::from),
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

/// Drops the table's versions before the erasure commit (their files and, Delta, their log
/// entries: statistics that could still describe the erased rows) and notes it in the receipt.
fn drop_history(
    rt: &tokio::runtime::Runtime,
    table: &ErasureTable,
    receipt: &mut TableReceipt,
) -> Result<(), ForgetError> {
    if let Some(dropped) = rt.block_on(table.drop_history())? {
        receipt.history_removed_before = Some(dropped.checkpoint_version);
        receipt.log_files_removed += dropped.log_files_deleted;
        receipt.history_files_removed += dropped.data_files_deleted;
    }
    Ok(())
}

/// One table's erasure in its receipt: earlier attempts' numbers plus this one's. Set, not
/// added to: a job killed after preparing a table prepares it again on its rerun.
fn record(receipt: &mut TableReceipt, earlier: &TableReceipt, result: &TableErasure, treatment: &Treatment) {
    let (removed, anonymized) = match treatment {
        Treatment::Delete => (result.rows_matched, 0),
        Treatment::Blank(_) => (0, result.rows_matched),
    };
    receipt.rows_removed = earlier.rows_removed + removed;
    receipt.rows_anonymized = earlier.rows_anonymized + anonymized;
    receipt.files_scanned = earlier.files_scanned + result.files_scanned;
    receipt.files_removed = earlier.files_removed + result.files_removed.len() as u64;
    receipt.files_written = earlier.files_written + result.files_added;
    receipt.bytes_rewritten = earlier.bytes_rewritten + result.bytes_read + result.bytes_written;
}

/// What the matchers met while the job ran: subjects with rows, and quarantined events that
/// may be the subjects' but cannot be attributed (kept, listed for review).
#[derive(Default, Clone)]
struct Sightings {
    tokens: Arc<Mutex<BTreeSet<String>>>,
    review: Arc<Mutex<BTreeSet<String>>>,
}

/// The analytic tables of the domain's policies, the vault and the quarantine.
fn targets(
    config: &Config,
    keys: &KeyStore,
    domain: &str,
    id_tokens: &HashMap<String, String>,
    unattributed: Unattributed,
    sightings: &Sightings,
) -> Result<Vec<Target>, ForgetError> {
    let set: HashSet<String> = id_tokens.values().cloned().collect();
    let in_domain: Vec<&Policy> = config.policies.iter().filter(|p| p.token_domain == domain).collect();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for policy in &in_domain {
        if !seen.insert(policy.target.clone()) {
            continue;
        }
        let (treatment, mode) = match &policy.erasure {
            Erasure::Delete => (Treatment::Delete, "delete"),
            Erasure::Anonymize { .. } => {
                let mut blank = policy.linking_columns();
                blank.extend(LINKING_META_COLUMNS.iter().map(|c| c.to_string()));
                (Treatment::Blank(blank), "anonymize")
            }
        };
        for location in config.table_locations(policy) {
            out.push(Target {
                name: location.label(&policy.target),
                location,
                matcher: token_matcher("_subject", set.clone(), sightings.tokens.clone()),
                treatment: treatment.clone(),
                mode,
            });
        }
    }
    out.push(Target {
        name: "vault".into(),
        location: delta_table(config.vault_path.clone()),
        matcher: token_matcher("subject_token", set, sightings.tokens.clone()),
        treatment: Treatment::Delete,
        mode: "vault",
    });
    out.push(Target {
        name: "quarantine".into(),
        location: delta_table(config.quarantine_path.clone()),
        matcher: quarantine_matcher(
            keys.system_key("quarantine")?,
            &config.policies,
            domain,
            id_tokens.clone(),
            sightings,
            unattributed == Unattributed::Delete,
        ),
        treatment: Treatment::Delete,
        mode: "quarantine",
    });
    Ok(out)
}

/// Quarantined events hold the raw event, encrypted: one whose subject ingest could read has
/// that subject's token in `_subject` (and is sealed under its key), and is deleted when the
/// token is one of the job's. The others (system key: unreadable, of a table no policy names,
/// without a subject value, or written before `_subject` existed) are decrypted and read with
/// ingest's own decoder: deleted when their table's subject column (a policy of the job's
/// domain) holds one of the ids. One that cannot be attributed — not readable, or of a table no
/// policy names — but mentions an id (as a subject column value, or as a whole word) is kept
/// and its position listed for review: deleting on a guess would lose others' events.
fn quarantine_matcher(
    key: Arc<DataKey>,
    policies: &[Policy],
    domain: &str,
    id_tokens: HashMap<String, String>,
    sightings: &Sightings,
    delete_unattributed: bool,
) -> RowMatcher {
    let subject_of: HashMap<String, Option<String>> = policies
        .iter()
        .map(|p| (p.table.clone(), (p.token_domain == domain).then(|| p.subject.clone())))
        .collect();
    let any_subject: HashSet<String> = policies
        .iter()
        .filter(|p| p.token_domain == domain)
        .map(|p| p.subject.clone())
        .collect();
    let tokens: HashSet<String> = id_tokens.values().cloned().collect();
    let (review, found) = (sightings.review.clone(), sightings.tokens.clone());
    RowMatcher {
        columns: vec!["_subject".into(), "_position".into(), "event_enc".into()],
        matches: Box::new(move |batch: &RecordBatch| {
            let text = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or(format!("quarantine: {name} is not text"))
            };
            let (subjects, positions) = (text("_subject")?, text("_position")?);
            let events = batch
                .column_by_name("event_enc")
                .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
                .ok_or("quarantine: event_enc is not binary")?;
            let mut out = Vec::with_capacity(batch.num_rows());
            for i in 0..batch.num_rows() {
                if subjects.is_valid(i) {
                    let token = subjects.value(i);
                    let hit = tokens.contains(token);
                    if hit {
                        lock(&found).insert(token.to_string());
                    }
                    out.push(Some(hit));
                    continue;
                }
                let Ok(event) = key.open(events.value(i), &event_aad(positions.value(i))) else {
                    return Err(format!(
                        "quarantine: the event at {} does not decrypt",
                        positions.value(i)
                    ));
                };
                let hit = match event_names_subject(&event, &subject_of, &any_subject, &id_tokens) {
                    Sighting::Subject(token) => {
                        lock(&found).insert(token);
                        true
                    }
                    Sighting::Unattributed => {
                        lock(&review).insert(positions.value(i).to_string());
                        delete_unattributed
                    }
                    Sighting::None => false,
                };
                out.push(Some(hit));
            }
            Ok(BooleanArray::from(out))
        }),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sighting {
    /// The subject column of the event's table holds this subject (its token).
    Subject(String),
    /// Mentions an id, but sluice cannot tell whose event it is.
    Unattributed,
    None,
}

/// Whose a quarantined event is, read as ingest reads events (`debezium::decode`, the subject
/// column by [`debezium::Event::subject_text`], ids in [`canonical_identifier`] form).
/// `id_tokens`: canonical id → token.
fn event_names_subject(
    event: &[u8],
    subject_of: &HashMap<String, Option<String>>,
    any_subject: &HashSet<String>,
    id_tokens: &HashMap<String, String>,
) -> Sighting {
    use sluice_connectors::debezium::{self, DecodeOptions, Decoded};
    let whose = |e: &debezium::Event<'_>, column: &str| {
        e.subject_text(column)
            .and_then(|id| id_tokens.get(canonical_identifier(&id).as_ref()).cloned())
    };
    // The decoder is ingest's: a defect that made ingest panic on this event may do so here.
    let decoded = std::panic::catch_unwind(|| match debezium::decode(event, &DecodeOptions::any_time(), &[]) {
        Ok(Decoded::Change(e)) => {
            let mut name = String::new();
            e.qualified_table(&mut name);
            let qualified = e.database.as_deref().map(|db| format!("{db}.{name}"));
            let policy = qualified
                .as_ref()
                .and_then(|q| subject_of.get(q))
                .or_else(|| subject_of.get(&name));
            Some(match policy {
                // A table of this domain: its own subject column decides.
                Some(Some(column)) => whose(&e, column).map_or(Sighting::None, Sighting::Subject),
                // Another domain's table.
                Some(None) => Sighting::None,
                // A table no policy names.
                None if any_subject.iter().any(|c| whose(&e, c).is_some()) => Sighting::Unattributed,
                None => Sighting::None,
            })
        }
        _ => None,
    });
    if let Ok(Some(sighting)) = decoded {
        return sighting;
    }
    let text = String::from_utf8_lossy(event).to_lowercase();
    if id_tokens.keys().any(|id| contains_word(&text, &id.to_lowercase())) {
        Sighting::Unattributed
    } else {
        Sighting::None
    }
}

/// `id` in `text` not touching other letters or digits.
fn contains_word(text: &str, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    text.match_indices(id).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + id.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric()) && !after.is_some_and(|c| c.is_alphanumeric())
    })
}

fn progress_bar(
    rt: &tokio::runtime::Runtime,
    catalogs: &mut Catalogs,
    targets: &[Target],
    app_id: &dyn Fn(&str) -> String,
) -> Result<ProgressBar, ForgetError> {
    if !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let mut files = 0;
    for t in targets {
        if let Some(table) = rt.block_on(ErasureTable::open(&t.location, catalogs, &t.name, app_id(&t.name)))? {
            files += rt.block_on(table.file_count())?;
        }
    }
    let bar = ProgressBar::new(files);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} files ({per_sec}, ETA {eta})").expect("valid template"),
    );
    Ok(bar)
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

fn audit_row(r: &Receipt) -> RecordBatch {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantined_events_are_deleted_only_when_their_tables_subject_column_names_the_subject() {
        let subject_of: HashMap<String, Option<String>> = [
            ("public.payments".to_string(), Some("customer_id".to_string())),
            ("public.orders".to_string(), None),
        ]
        .into();
        let any: HashSet<String> = ["customer_id".to_string()].into();
        let ids: HashMap<String, String> = [
            ("900001".to_string(), "t1".to_string()),
            ("Ab-9".to_string(), "t2".to_string()),
        ]
        .into();
        let sees = |event: &[u8]| event_names_subject(event, &subject_of, &any, &ids);
        let event = |table: &str, row: &str| {
            format!(r#"{{"source":{{"schema":"public","table":"{table}"}},"op":"c","after":{row}}}"#).into_bytes()
        };
        assert_eq!(
            sees(&event("payments", r#"{"customer_id":900001,"amount":5}"#)),
            Sighting::Subject("t1".into())
        );
        assert_eq!(
            sees(&event("payments", r#"{"customer_id":900003,"id":900001}"#)),
            Sighting::None
        );
        assert_eq!(
            sees(&event("orders", r#"{"customer_id":900001}"#)),
            Sighting::None,
            "another domain's table"
        );
        assert_eq!(
            sees(&event("secrets", r#"{"customer_id":"900001"}"#)),
            Sighting::Unattributed
        );
        let wrapped = br#"{"payload":{"source":{"schema":"public","table":"payments"},"op":"d","before":{"customer_id":900001}}}"#;
        assert_eq!(sees(wrapped), Sighting::Subject("t1".into()));
        // Read as ingest reads it: a lone surrogate in another value, padding in the id, a
        // time no window accepts.
        assert_eq!(
            sees(&event("payments", r#"{"customer_id":"900001  ","note":"\ud800"}"#)),
            Sighting::Subject("t1".into())
        );
        assert_eq!(sees(b"{not json customer 900001,"), Sighting::Unattributed);
        assert_eq!(
            sees(b"{not json AB-9}"),
            Sighting::Unattributed,
            "ids match in any letter case"
        );
        assert_eq!(sees(b"{not json 19000012"), Sighting::None);
    }
}
