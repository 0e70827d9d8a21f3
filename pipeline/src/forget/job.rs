//! The erasure job: its saved state, and one method per phase (shred, erase the tables, run
//! the hooks, verify, write the audit record).

use super::*;

/// A job's saved progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct JobState {
    pub(super) receipt: Receipt,
    /// Raised each time a finished job whose verification found something is run again.
    pub(super) attempt: u32,
    /// When the keys were destroyed and the tombstones written.
    pub(super) shredded_at_ms: Option<i64>,
    /// Per table, what earlier attempts did (this attempt's numbers are added to them).
    pub(super) earlier: BTreeMap<String, TableReceipt>,
    /// Per table: the files its erasure commit removes, saved just before that commit.
    pub(super) pending_removal: BTreeMap<String, Vec<String>>,
    pub(super) tables_done: Vec<String>,
    /// Subjects whose rows some table held.
    pub(super) found: BTreeSet<String>,
    /// Positions of quarantined events to review.
    pub(super) review: BTreeSet<String>,
    /// Per hook, what it noted before the tables were rewritten.
    #[serde(default)]
    pub(super) hook_notes: BTreeMap<String, Vec<String>>,
    pub(super) hooks_done: bool,
    pub(super) verification_done: bool,
    pub(super) audit_written: bool,
}

/// Files no table version holds are deleted only when older than this (Delta's default
/// deleted-file retention): a younger one may be a running writer's transaction in flight.
pub(super) const ORPHAN_MIN_AGE_MS: i64 = 7 * 24 * 3600 * 1000;

// Returned once per job, never stored: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Started<'a> {
    /// The job finished before with a passing verification: its receipt.
    Finished(Receipt),
    Job(ErasureJob<'a>),
}

/// One erasure job, a method per phase; its state is saved (in the key store) after every step.
pub(super) struct ErasureJob<'a> {
    pub(super) config: &'a Config,
    pub(super) request: &'a ForgetRequest,
    pub(super) keys: KeyStore,
    pub(super) domain: String,
    pub(super) job_id: String,
    /// Canonical id → token: the one form ingest and every lookup use.
    pub(super) id_tokens: HashMap<String, String>,
    /// The subjects' tokens, sorted.
    pub(super) tokens: Vec<String>,
    pub(super) state: JobState,
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) catalogs: Catalogs,
}

impl<'a> ErasureJob<'a> {
    /// Tokenizes the request and loads the job's saved state (a rerun resumes it).
    pub(super) fn start(config: &'a Config, request: &'a ForgetRequest) -> Result<Started<'a>, ForgetError> {
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
        if saved.audit_written && saved.receipt.verification.passed {
            info!(job = %job_id, "this erasure job finished before; printing its receipt");
            return Ok(Started::Finished(saved.receipt));
        }
        let mut state = if saved.audit_written {
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

    pub(super) fn save(&self) -> Result<(), ForgetError> {
        if self.request.dry_run {
            return Ok(());
        }
        let text = serde_json::to_string(&self.state).expect("job state serializes");
        Ok(self.keys.save_job_state(&self.job_id, &text, now_ms())?)
    }

    pub(super) fn app_id(&self, target: &str) -> String {
        erasure_app_id(&self.config.name, &self.job_id, self.state.attempt, target)
    }

    /// 1. Crypto-shredding first: from here on nothing new of theirs can be encrypted, and
    ///    daemons drop their events. Idempotent, so every run does it (a key some daemon minted
    ///    while an earlier run was killed is destroyed too).
    pub(super) fn shred(&mut self) -> Result<(), ForgetError> {
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
    pub(super) fn note_hooks(&mut self, hooks: &[Box<dyn ErasureHook + '_>]) -> Result<(), ForgetError> {
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
    pub(super) fn erase_tables(&mut self, targets: &[Target], sightings: &Sightings) -> Result<(), ForgetError> {
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

    pub(super) fn open(&mut self, target: &Target) -> Result<Option<ErasureTable>, ForgetError> {
        let app_id = self.app_id(&target.name);
        Ok(self.rt.block_on(ErasureTable::open(
            &target.location,
            &mut self.catalogs,
            &target.name,
            app_id,
        ))?)
    }

    /// Erases the subjects' rows from one table; false when the table does not exist.
    pub(super) fn erase_table(
        &mut self,
        target: &Target,
        sightings: &Sightings,
        bar: &ProgressBar,
    ) -> Result<bool, ForgetError> {
        let Some(mut table) = self.open(target)? else {
            return Ok(false);
        };
        self.state.receipt.tables.entry(target.name.clone()).or_default().mode = target.mode.to_string();
        if self.rt.block_on(table.committed())? {
            // Killed between the commit and the clean-up: expire the history and delete the
            // old files now.
            let paths = self
                .state
                .pending_removal
                .get(&target.name)
                .cloned()
                .unwrap_or_default();
            self.rt.block_on(table.delete_files(&paths))?;
            let receipt = self.state.receipt.tables.entry(target.name.clone()).or_default();
            drop_history(&self.rt, &mut table, receipt)?;
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
                    drop_history(&self.rt, &mut table, receipt)?;
                    break prepared;
                }
                Err(e) if e.kind() == ErrorKind::Conflict && attempt < 3 => {
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

    pub(super) fn dry_run_receipt(mut self) -> Receipt {
        self.state.receipt.finished_at = iso(now_ms());
        self.state.receipt.verification.findings = vec!["dry run: nothing was changed".into()];
        self.state.receipt
    }

    /// What depended on the subjects' rows (aggregates) is recomputed without them.
    pub(super) fn run_hooks(&mut self, hooks: &[Box<dyn ErasureHook + '_>]) -> Result<(), ForgetError> {
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
    pub(super) fn verify(&mut self, targets: &[Target]) -> Result<(), ForgetError> {
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
    pub(super) fn verify_table(
        &mut self,
        target: &Target,
        table: &ErasureTable,
        names_token: &aho_corasick::AhoCorasick,
    ) -> Result<Vec<String>, ForgetError> {
        let mut findings = Vec::new();
        let residue = self.rt.block_on(table.residue(
            &target.matcher,
            &|bytes: &[u8]| names_token.is_match(bytes),
            ORPHAN_MIN_AGE_MS,
            now_ms(),
        ))?;
        for (path, matched) in &residue.current {
            // Running the job again erases it.
            findings.push(format!("{}: {matched} rows in {path}", target.name));
        }
        for (path, matched) in &residue.recent {
            findings.push(format!(
                "{}: {matched} rows in {path}, a file no table version holds, written less than 7 days ago (possibly a writer's transaction in flight): it is deleted by a run of this job after that",
                target.name
            ));
        }
        let orphans = residue.deletable;
        if !orphans.is_empty() {
            let removed = self.rt.block_on(table.delete_files(&orphans))?;
            if removed < orphans.len() as u64 {
                // Still referenced (history that was not expired) or not deletable: left holding
                // the subjects, so the job cannot say it is done.
                findings.push(format!(
                    "{}: {} of {} files holding erased rows outside the current version could not be deleted (still referenced by an older version?), e.g. {}",
                    target.name,
                    orphans.len() as u64 - removed,
                    orphans.len(),
                    orphans[0]
                ));
            }
            self.state
                .receipt
                .tables
                .entry(target.name.clone())
                .or_default()
                .files_removed += removed;
            self.save()?;
            warn!(table = %target.name, files = removed, "removed orphaned data files holding erased subjects");
        }
        let in_log = residue.log_files;
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
    pub(super) fn write_audit(&mut self) -> Result<(), ForgetError> {
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
pub(super) fn erasure_app_id(pipeline: &str, job_id: &str, attempt: u32, target: &str) -> String {
    format!("sluice/{pipeline}/erasure/{job_id}/{attempt}/{target}")
}

/// Drops the table's versions before the erasure commit (their files and, Delta, their log
/// entries: statistics that could still describe the erased rows) and notes it in the receipt.
pub(crate) fn drop_history(
    rt: &tokio::runtime::Runtime,
    table: &mut ErasureTable,
    receipt: &mut TableReceipt,
) -> Result<(), LakeError> {
    if let Some(dropped) = rt.block_on(table.drop_history())? {
        receipt.history_removed_before = Some(dropped.checkpoint_version);
        receipt.log_files_removed += dropped.log_files_deleted;
        receipt.history_files_removed += dropped.data_files_deleted;
    }
    Ok(())
}

/// One table's erasure in its receipt: earlier attempts' numbers plus this one's. Set, not
/// added to: a job killed after preparing a table prepares it again on its rerun.
pub(super) fn record(receipt: &mut TableReceipt, earlier: &TableReceipt, result: &TableErasure, treatment: &Treatment) {
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

pub(super) fn progress_bar(
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
