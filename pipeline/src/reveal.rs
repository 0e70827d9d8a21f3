//! `sluice reveal`: re-identification with approval — a court order, a vulnerable customer's
//! case review — without handing anyone the master key.
//!
//! 1. **request**: who asks, why, for which subjects (tokenized at once: the ids are kept
//!    nowhere) and which `encrypt` or `vault` columns; the request expires after
//!    `[governance.reveal] expiry_hours`.
//! 2. **approve**: by someone other than the requester, as many distinct people as
//!    `[governance.reveal] approvals` says.
//! 3. **run**: once, before the request expires: decrypts exactly the approved subjects'
//!    values of exactly the approved columns (vault rows, and the `encrypt` columns of the
//!    table) into a file the operator names (or stdout) — never the lake, never a log. An erased
//!    subject's key is gone: the output says so instead.
//!
//! The request lives in the key store beside the keys (its reason is free text, which may
//! name the person). Every step, refusals included, is a row of the audit table (who, when,
//! request, subject tokens, columns, outcome); a step is saved before its row is written and
//! rows not yet written are written by the next command on the request, so none is lost.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use serde::{Deserialize, Serialize};
use sluice_connectors::arrow::compute::cast;
use sluice_connectors::datafusion::prelude::{col, lit, Expr, SessionContext};
use sluice_connectors::keystore::{KeyStore, KeyStoreError};
use sluice_connectors::lake::{delta_table, Catalogs, LakeError, TableLocation};
use sluice_transforms::actions::Action;
use sluice_transforms::crypto::{canonical_identifier, envelope_key_id, field_aad};
use sluice_transforms::keys::{KeyProvider, ERASED_FOR_GOOD};

use crate::audit_table::{self, event, AuditRow};
use crate::config::Config;
use crate::runtime::{self, RunError};

#[derive(Debug, thiserror::Error)]
pub enum RevealError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// The request is malformed (nothing recorded) or the step is refused (recorded).
    #[error("{0}")]
    Refused(String),
    #[error("reveal request {0}: its saved state is unreadable ({1})")]
    State(String, String),
    #[error("{path}: {source}")]
    Output { path: PathBuf, source: std::io::Error },
}

/// A re-identification request, as saved in the key store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevealRequest {
    pub id: String,
    pub token_domain: String,
    pub subject_tokens: Vec<String>,
    /// `table.column`: a policy's target and one of its `encrypt` or `vault` source columns.
    pub columns: Vec<String>,
    pub reason: String,
    pub requested_by: String,
    pub requested_at: String,
    pub expires_at: String,
    pub approvals_needed: u32,
    pub approvals: Vec<Approval>,
    /// Set when a run starts: a request is run once, even if that run fails.
    pub run: Option<Approval>,
    /// Every step, in order; `audited` once its audit row is written.
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub event: String,
    pub actor: String,
    pub at: String,
    pub outcome: String,
    pub audited: bool,
}

impl RevealRequest {
    pub fn status(&self, now: chrono::DateTime<chrono::Utc>) -> &'static str {
        if self.run.is_some() {
            "run"
        } else if self.expired(now) {
            "expired"
        } else if (self.approvals.len() as u32) < self.approvals_needed {
            "pending approval"
        } else {
            "approved"
        }
    }

    fn expired(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        chrono::DateTime::parse_from_rfc3339(&self.expires_at).map_or(true, |at| now >= at)
    }
}

/// What `sluice reveal request` is given.
pub struct NewRequest {
    /// Raw subject ids: tokenized at once, kept nowhere.
    pub subjects: Vec<String>,
    pub domain: Option<String>,
    pub columns: Vec<String>,
    pub reason: String,
    pub requested_by: String,
}

/// Where a run writes the revealed values.
pub enum Output {
    Stdout,
    /// A new file (never overwritten), readable by its owner only.
    File(PathBuf),
}

/// What a run found, per subject (no values): printed and audited.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub request: String,
    pub values_revealed: u64,
    /// Per subject token: values revealed, or why none (`erased`).
    pub subjects: BTreeMap<String, String>,
}

/// The key-store job id of a request.
fn state_id(id: &str) -> String {
    format!("reveal/{id}")
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An operator's identity: recorded as given, compared without case or surrounding blanks.
fn identity(who: &str, flag: &str) -> Result<String, RevealError> {
    let who = who.trim();
    if who.is_empty() || who.len() > 200 || who.chars().any(char::is_control) {
        return Err(RevealError::Refused(format!(
            "{flag}: name who you are (1 to 200 printable characters)"
        )));
    }
    Ok(who.to_string())
}

fn same_person(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// Records a new request; returns it (its id is what approvers and the run name).
pub fn request(config: &Config, new: NewRequest) -> Result<RevealRequest, RevealError> {
    let requested_by = identity(&new.requested_by, "--requested-by")?;
    if new.reason.trim().is_empty() {
        return Err(RevealError::Refused(
            "--reason: say why the subjects must be re-identified (a court order, a case review)".into(),
        ));
    }
    if new.subjects.is_empty() || new.subjects.iter().any(|s| canonical_identifier(s).is_empty()) {
        return Err(RevealError::Refused(
            "give at least one subject id, none of them blank".into(),
        ));
    }
    if new.columns.is_empty() {
        return Err(RevealError::Refused(
            "--columns: name the columns to reveal (table.column, e.g. customers.email)".into(),
        ));
    }
    let domain = crate::forget::subject_domain(config, new.domain.as_deref())
        .map_err(|e| RevealError::Refused(e.to_string()))?;
    let mut columns = Vec::new();
    for c in &new.columns {
        let (policy, _) = revealable(config, c)?;
        // Its rows name their subjects by tokens of the policy's domain: ids of another domain
        // would match none of them.
        if policy.token_domain != domain {
            return Err(RevealError::Refused(format!(
                "--columns {c}: its subjects are of the token domain `{}`, the ids given of `{domain}` (--domain)",
                policy.token_domain
            )));
        }
        if !columns.contains(c) {
            columns.push(c.clone());
        }
    }
    let keys = runtime::open_key_store(config, runtime::SMALL_KEY_STORE_MEMORY)?;
    let tokenizer = keys.tokenizer()?.domain(&domain);
    let mut subject_tokens: Vec<String> = new
        .subjects
        .iter()
        .map(|s| tokenizer.token(s).as_str().to_string())
        .collect();
    subject_tokens.sort();
    subject_tokens.dedup();
    let at = now();
    let mut request = RevealRequest {
        id: new_id()?,
        token_domain: domain,
        subject_tokens,
        columns,
        reason: new.reason.trim().to_string(),
        requested_by: requested_by.clone(),
        requested_at: iso(at),
        expires_at: iso(at + chrono::Duration::hours(config.governance.reveal.expiry_hours.into())),
        approvals_needed: config.governance.reveal.approvals,
        approvals: Vec::new(),
        run: None,
        steps: Vec::new(),
    };
    let outcome = format!(
        "pending: needs {} approval(s) by others than the requester before {}",
        request.approvals_needed, request.expires_at
    );
    record(&mut request, event::REVEAL_REQUEST, &requested_by, outcome);
    let mut loaded = Loaded { request, saved: None };
    save(&keys, &mut loaded)?;
    let id = loaded.request.id.clone();
    flush_audit(config, &keys, &mut loaded).map_err(|e| {
        RevealError::Refused(format!(
            "request {id} is recorded, but its audit row is not written yet ({e}); `sluice reveal show` writes it"
        ))
    })?;
    Ok(loaded.request)
}

/// Approves a request: refused (and recorded) for the requester, a second approval by the same
/// person, an expired or already run request.
pub fn approve(config: &Config, id: &str, approved_by: &str) -> Result<RevealRequest, RevealError> {
    let approved_by = identity(approved_by, "--approved-by")?;
    let keys = runtime::open_key_store(config, runtime::SMALL_KEY_STORE_MEMORY)?;
    let mut loaded = load(&keys, id)?;
    let request = &mut loaded.request;
    let at = now();
    let refusal = if same_person(&request.requested_by, &approved_by) {
        Some("refused: the requester cannot approve their own request".to_string())
    } else if request.approvals.iter().any(|a| same_person(&a.by, &approved_by)) {
        Some("refused: already approved by this person; another approver is needed".to_string())
    } else if request.run.is_some() {
        Some("refused: the request was run already".to_string())
    } else if request.expired(at) {
        Some(format!("refused: the request expired at {}", request.expires_at))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        let step = step(event::REVEAL_REFUSED, &approved_by, format!("approve {refusal}"));
        commit_step(config, &keys, &mut loaded, step)?;
        return Err(RevealError::Refused(format!("request {id}: {refusal}")));
    }
    request.approvals.push(Approval {
        by: approved_by.clone(),
        at: iso(at),
    });
    let outcome = format!(
        "approval {} of {}{}",
        request.approvals.len(),
        request.approvals_needed,
        if request.approvals.len() as u32 >= request.approvals_needed {
            ": approved, may be run once before the request expires"
        } else {
            ""
        }
    );
    record(request, event::REVEAL_APPROVE, &approved_by, outcome);
    commit(config, &keys, &mut loaded)?;
    Ok(loaded.request)
}

/// Runs an approved request once: the approved subjects' values of the approved columns,
/// decrypted, as JSON lines to `output`.
pub fn run(config: &Config, id: &str, run_by: &str, output: Output) -> Result<RunSummary, RevealError> {
    let run_by = identity(run_by, "--run-by")?;
    let keys = runtime::open_key_store(config, runtime::SMALL_KEY_STORE_MEMORY)?;
    let mut loaded = load(&keys, id)?;
    let request = &mut loaded.request;
    let at = now();
    let refusal = match request.status(at) {
        "run" => Some("refused: the request was run already (a request is run once)".to_string()),
        "expired" => Some(format!("refused: the request expired at {}", request.expires_at)),
        "pending approval" => Some(format!(
            "refused: {} of {} approvals",
            request.approvals.len(),
            request.approvals_needed
        )),
        _ => None,
    };
    if let Some(refusal) = refusal {
        let step = step(event::REVEAL_REFUSED, &run_by, format!("run {refusal}"));
        commit_step(config, &keys, &mut loaded, step)?;
        return Err(RevealError::Refused(format!("request {id}: {refusal}")));
    }
    let mut out = open_output(config, &output)?;
    // Consumed before anything is decrypted (a run that dies half-way is not run again), and
    // only if no other command changed the request since it was read: of two runs at once,
    // one decrypts.
    request.run = Some(Approval {
        by: run_by.clone(),
        at: iso(at),
    });
    record(request, event::REVEAL_RUN, &run_by, "started".into());
    if let Err(e) = commit(config, &keys, &mut loaded) {
        // Not consumed (another command changed the request first): nothing written.
        drop(out);
        if let Output::File(path) = &output {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    let result = reveal(config, &keys, &loaded.request, &mut out);
    let outcome = match &result {
        Ok(summary) => format!(
            "revealed {} values of {} subjects ({})",
            summary.values_revealed,
            summary.subjects.values().filter(|s| !s.starts_with("erased")).count(),
            describe_subjects(summary)
        ),
        Err(e) => format!("failed: {}", kind_of(e)),
    };
    commit_step(config, &keys, &mut loaded, step(event::REVEAL_RUN, &run_by, outcome))?;
    result
}

/// A request's saved state (no values; its reason included). Writes the audit rows of steps
/// a crash left unwritten.
pub fn show(config: &Config, id: &str) -> Result<RevealRequest, RevealError> {
    let keys = runtime::open_key_store(config, runtime::SMALL_KEY_STORE_MEMORY)?;
    let mut loaded = load(&keys, id)?;
    flush_audit(config, &keys, &mut loaded)?;
    Ok(loaded.request)
}

fn describe_subjects(summary: &RunSummary) -> String {
    let erased = summary.subjects.values().filter(|s| s.starts_with("erased")).count();
    format!("{} subjects requested, {erased} erased", summary.subjects.len())
}

/// An error's kind for the audit row (an error's text may name a path, never a value; the
/// kind is enough there).
fn kind_of(e: &RevealError) -> &'static str {
    match e {
        RevealError::Run(_) => "run error",
        RevealError::Keys(_) => "key store error",
        RevealError::Lake(_) => "lake error",
        RevealError::Refused(_) => "refused",
        RevealError::State(..) => "state error",
        RevealError::Output { .. } => "output error",
    }
}

/// `table.column`: a policy's target, and a source column it encrypts or vaults (anything else
/// is in the lake already, or nowhere).
fn revealable<'a>(config: &'a Config, spec: &str) -> Result<(&'a sluice_transforms::Policy, Action), RevealError> {
    let (table, column) = spec.split_once('.').ok_or_else(|| {
        RevealError::Refused(format!(
            "--columns {spec}: write table.column (a policy's target and source column)"
        ))
    })?;
    let policy = config
        .policies
        .iter()
        .find(|p| p.target == table)
        .ok_or_else(|| RevealError::Refused(format!("--columns {spec}: no policy writes a table `{table}`")))?;
    let rule = policy.rules.iter().find(|r| r.column == column).ok_or_else(|| {
        RevealError::Refused(format!(
            "--columns {spec}: the policy of `{table}` names no column `{column}`"
        ))
    })?;
    match rule.action {
        Action::Encrypt | Action::Vault => Ok((policy, rule.action.clone())),
        ref other => Err(RevealError::Refused(format!(
            "--columns {spec}: `{}` keeps no ciphertext to reveal (only encrypt and vault do)",
            other.name()
        ))),
    }
}

fn new_id() -> Result<String, RevealError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 6];
    sluice_transforms::crypto::random()
        .fill(&mut bytes)
        .map_err(|_| RevealError::Refused("the system's random source failed".into()))?;
    Ok(format!("rv-{}", hex::encode(bytes)))
}

/// A request as read, with the text it was saved as: a save succeeds only over that text.
struct Loaded {
    request: RevealRequest,
    /// `None`: a new request, not saved yet.
    saved: Option<String>,
}

fn load(keys: &KeyStore, id: &str) -> Result<Loaded, RevealError> {
    let text = keys
        .job_state(&state_id(id))?
        .ok_or_else(|| RevealError::Refused(format!("no reveal request {id}")))?;
    // The error's category only: serde's text could quote the saved reason.
    let request =
        serde_json::from_str(&text).map_err(|e| RevealError::State(id.to_string(), format!("{:?}", e.classify())))?;
    Ok(Loaded {
        request,
        saved: Some(text),
    })
}

fn step(event: &str, actor: &str, outcome: String) -> Step {
    Step {
        event: event.to_string(),
        actor: actor.to_string(),
        at: iso(now()),
        outcome,
        audited: false,
    }
}

fn record(request: &mut RevealRequest, event: &str, actor: &str, outcome: String) {
    request.steps.push(step(event, actor, outcome));
}

/// Saves the request over the state it was read as; refused if another command changed it
/// since (approvals, runs and their audit rows stay in one order).
fn save(keys: &KeyStore, loaded: &mut Loaded) -> Result<(), RevealError> {
    let text = serde_json::to_string(&loaded.request).expect("request serializes");
    let id = &loaded.request.id;
    if !keys.replace_job_state(&state_id(id), loaded.saved.as_deref(), &text, now().timestamp_millis())? {
        return Err(RevealError::Refused(format!(
            "request {id} changed while this command ran (another command on it): run this one again"
        )));
    }
    loaded.saved = Some(text);
    Ok(())
}

/// Saves a step that consumes something (an approval, a run's start) over exactly the state
/// it was decided on, then writes its audit row.
fn commit(config: &Config, keys: &KeyStore, loaded: &mut Loaded) -> Result<(), RevealError> {
    save(keys, loaded)?;
    flush_audit(config, keys, loaded)
}

/// Adds a step that consumes nothing (a refusal, a run's outcome) over whatever another command
/// saved meanwhile, then writes its audit row: it is never lost to a concurrent command.
fn commit_step(config: &Config, keys: &KeyStore, loaded: &mut Loaded, step: Step) -> Result<(), RevealError> {
    save_merging(keys, loaded, &|r| r.steps.push(step.clone()))?;
    flush_audit(config, keys, loaded)
}

/// Applies `change` and saves; if another command saved meanwhile, reads the request again and
/// applies `change` to that, a few times.
fn save_merging(keys: &KeyStore, loaded: &mut Loaded, change: &dyn Fn(&mut RevealRequest)) -> Result<(), RevealError> {
    change(&mut loaded.request);
    for _ in 0..MERGE_ATTEMPTS {
        match save(keys, loaded) {
            Err(RevealError::Refused(_)) => {
                *loaded = load(keys, &loaded.request.id)?;
                change(&mut loaded.request);
            }
            other => return other,
        }
    }
    Err(RevealError::Refused(format!(
        "request {} kept changing while this command ran: run it again",
        loaded.request.id
    )))
}

/// Saves over concurrent commands before giving up.
const MERGE_ATTEMPTS: usize = 5;

/// Writes the audit rows of the request's saved steps not yet written (each once: its commit
/// names the step), then saves that they are. If another command changed the request
/// meanwhile, that one (or the next) marks them: writing a row twice writes it once.
fn flush_audit(config: &Config, keys: &KeyStore, loaded: &mut Loaded) -> Result<(), RevealError> {
    if loaded.request.steps.iter().all(|s| s.audited) {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let request = &loaded.request;
    let mut written = Vec::new();
    for n in 0..request.steps.len() {
        if request.steps[n].audited {
            continue;
        }
        let row = audit_row(request, &request.steps[n]);
        audit_table::append(config, &rt, &row, format!("reveal/{}/{n}", request.id))?;
        written.push(n);
    }
    // Steps only ever follow each other: step n is the same step in any later state.
    let mark = |r: &mut RevealRequest| {
        for &n in &written {
            if let Some(s) = r.steps.get_mut(n) {
                s.audited = true;
            }
        }
    };
    match save_merging(keys, loaded, &mark) {
        // Unmarked, a row is written again by the next command: once, as its commit names it.
        Ok(()) | Err(RevealError::Refused(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn audit_row(request: &RevealRequest, step: &Step) -> AuditRow {
    let event = match step.event.as_str() {
        event::REVEAL_REQUEST => event::REVEAL_REQUEST,
        event::REVEAL_APPROVE => event::REVEAL_APPROVE,
        event::REVEAL_RUN => event::REVEAL_RUN,
        _ => event::REVEAL_REFUSED,
    };
    AuditRow {
        event,
        job_id: format!("reveal-{}", request.id),
        request_id: request.id.clone(),
        requested_by: request.requested_by.clone(),
        actor: step.actor.clone(),
        token_domain: request.token_domain.clone(),
        subject_tokens: request.subject_tokens.clone(),
        started_at: request.requested_at.clone(),
        finished_at: step.at.clone(),
        columns: request.columns.clone(),
        verified: event != event::REVEAL_REFUSED && !step.outcome.starts_with("failed"),
        outcome: step.outcome.clone(),
        ..AuditRow::default()
    }
}

/// A new file (refused if it exists, or lies inside the lake), mode 0600; or stdout.
fn open_output(config: &Config, output: &Output) -> Result<Box<dyn Write>, RevealError> {
    let path = match output {
        Output::Stdout => return Ok(Box::new(std::io::stdout().lock())),
        Output::File(path) => path,
    };
    let err = |source| RevealError::Output {
        path: path.clone(),
        source,
    };
    // Where the file really lands: its directory with `..` and links resolved.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let landing = std::fs::canonicalize(parent)
        .map_err(err)?
        .join(path.file_name().unwrap_or_default());
    let lake_places = [
        &config.lake_root,
        &config.vault_path,
        &config.quarantine_path,
        &config.audit_path,
    ];
    for place in lake_places.iter().filter_map(|p| p.local()) {
        // A place not made yet holds nothing to be inside of, but its path still counts.
        let place = std::fs::canonicalize(place).unwrap_or_else(|_| std::path::absolute(place).unwrap_or_default());
        if landing.starts_with(&place) {
            return Err(RevealError::Refused(format!(
                "--out {}: inside the lake; revealed values go to a file outside it",
                path.display()
            )));
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    Ok(Box::new(std::io::BufWriter::new(options.open(path).map_err(err)?)))
}

/// Decrypts the request's values into `out`, one JSON line per value: subject token, table,
/// column, source position and time, value; one line per erased subject saying so.
fn reveal(
    config: &Config,
    keys: &KeyStore,
    request: &RevealRequest,
    out: &mut dyn Write,
) -> Result<RunSummary, RevealError> {
    let mut summary = RunSummary {
        request: request.id.clone(),
        ..RunSummary::default()
    };
    let tokens: Vec<&str> = request.subject_tokens.iter().map(String::as_str).collect();
    let cutoffs = keys
        .erased_subjects(&tokens)
        .map_err(|e| RevealError::Refused(e.to_string()))?;
    let erased: HashMap<&str, i64> = tokens
        .iter()
        .zip(cutoffs)
        .filter_map(|(t, c)| c.map(|c| (*t, c)))
        .collect();
    let write = |out: &mut dyn Write, line: serde_json::Value| {
        writeln!(out, "{line}").map_err(|source| RevealError::Output {
            path: PathBuf::from("output"),
            source,
        })
    };
    let mut counts: BTreeMap<&str, u64> = tokens.iter().map(|t| (*t, 0)).collect();
    let mut destroyed: BTreeMap<&str, u64> = BTreeMap::new();
    for (token, cutoff) in &erased {
        if *cutoff == ERASED_FOR_GOOD {
            write(
                out,
                serde_json::json!({"subject_token": token, "erased": true,
                    "note": "erased: the subject's keys were destroyed; nothing can be revealed"}),
            )?;
        }
    }
    let live: Vec<&str> = tokens
        .iter()
        .copied()
        .filter(|t| erased.get(t) != Some(&ERASED_FOR_GOOD))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    for spec in &request.columns {
        let (policy, action) = revealable(config, spec)?;
        let column = spec.split_once('.').map(|(_, c)| c).unwrap_or_default();
        let rows = rt.block_on(ciphertexts(config, policy, column, &action, &live))?;
        for batch in rows {
            // As the readers give them (views, large or plain), in one form.
            let as_type = |i: usize, to: &DataType| {
                cast(batch.column(i), to).map_err(|e| RevealError::Lake(LakeError::Query(e.to_string())))
            };
            let (subjects, positions) = (as_type(0, &DataType::Utf8)?, as_type(1, &DataType::Utf8)?);
            let (subjects, positions) = (subjects.as_string::<i32>(), positions.as_string::<i32>());
            let times = as_type(2, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
            let times = times.as_primitive::<TimestampMicrosecondType>();
            let envelopes = as_type(3, &DataType::Binary)?;
            let envelopes = envelopes.as_binary::<i32>();
            for i in (0..batch.num_rows()).filter(|i| envelopes.is_valid(*i) && subjects.is_valid(*i)) {
                let token = subjects.value(i);
                let envelope = envelopes.value(i);
                let key = envelope_key_id(envelope)
                    .ok()
                    .map(|id| keys.key_by_id(&id))
                    .transpose()?
                    .flatten();
                let plain = key.and_then(|k| k.open(envelope, &field_aad(&policy.target, column, token)).ok());
                let Some(plain) = plain else {
                    // A key destroyed by an erasure before the id was released for reuse.
                    *destroyed
                        .entry(tokens.iter().find(|t| **t == token).copied().unwrap_or(""))
                        .or_default() += 1;
                    continue;
                };
                let time = chrono::DateTime::from_timestamp_micros(times.value(i))
                    .map(iso)
                    .unwrap_or_default();
                write(
                    out,
                    serde_json::json!({
                        "subject_token": token,
                        "table": policy.target,
                        "column": column,
                        "position": positions.value(i),
                        "source_ts": time,
                        "value": String::from_utf8_lossy(&plain),
                    }),
                )?;
                summary.values_revealed += 1;
                if let Some(n) = counts.get_mut(token) {
                    *n += 1;
                }
            }
        }
    }
    out.flush().map_err(|source| RevealError::Output {
        path: PathBuf::from("output"),
        source,
    })?;
    for (token, n) in counts {
        let line = if erased.get(token) == Some(&ERASED_FOR_GOOD) {
            "erased: keys destroyed".to_string()
        } else {
            match destroyed.get(token) {
                Some(d) => format!("{n} values; {d} older values erased before the id was reused"),
                None => format!("{n} values"),
            }
        };
        summary.subjects.insert(token.to_string(), line);
    }
    Ok(summary)
}

/// The subjects' ciphertexts of `column`: from the vault (`vault`), or the policy's table
/// (`encrypt`: its first format, Delta where there is one). Columns: subject token, position,
/// source time, envelope.
async fn ciphertexts(
    config: &Config,
    policy: &sluice_transforms::Policy,
    column: &str,
    action: &Action,
    tokens: &[&str],
) -> Result<Vec<RecordBatch>, RevealError> {
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let query = |e: &dyn std::fmt::Display| RevealError::Lake(LakeError::Query(e.to_string()));
    let session = SessionContext::new();
    let mut catalogs = Catalogs::default();
    let listed: Vec<Expr> = tokens.iter().map(|t| lit(*t)).collect();
    let (location, name, subject, envelope, filter): (TableLocation, &str, &str, String, Expr) = match action {
        Action::Vault => (
            delta_table(config.vault_path.clone()),
            "vault",
            "subject_token",
            "ciphertext".to_string(),
            col("table")
                .eq(lit(policy.target.as_str()))
                .and(col("column").eq(lit(column))),
        ),
        _ => {
            let rule = policy
                .rules
                .iter()
                .find(|r| r.column == column)
                .expect("checked revealable");
            let Some(location) = config.table_locations(policy).into_iter().next() else {
                return Ok(Vec::new());
            };
            (
                location,
                policy.target.as_str(),
                "_subject",
                rule.output_name().unwrap_or_default(),
                lit(true),
            )
        }
    };
    if !location.register(&mut catalogs, &session, name, "t").await? {
        return Ok(Vec::new());
    }
    let df = session
        .table("t")
        .await
        .map_err(|e| query(&e))?
        .filter(col(subject).in_list(listed, false).and(filter))
        .map_err(|e| query(&e))?
        .select(vec![
            col(subject),
            col("_position"),
            col("_source_ts"),
            col(envelope.as_str()),
        ])
        .map_err(|e| query(&e))?
        .sort(vec![
            col("_source_ts").sort(true, true),
            col("_position").sort(true, true),
        ])
        .map_err(|e| query(&e))?;
    df.collect().await.map_err(|e| query(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(expires_in_hours: i64, approvals: usize) -> RevealRequest {
        let now = now();
        RevealRequest {
            id: "rv-1".into(),
            token_domain: "d".into(),
            subject_tokens: vec!["t".into()],
            columns: vec!["people.email".into()],
            reason: "r".into(),
            requested_by: "alice".into(),
            requested_at: iso(now),
            expires_at: iso(now + chrono::Duration::hours(expires_in_hours)),
            approvals_needed: 2,
            approvals: (0..approvals)
                .map(|i| Approval {
                    by: format!("approver {i}"),
                    at: iso(now),
                })
                .collect(),
            run: None,
            steps: Vec::new(),
        }
    }

    #[test]
    fn a_request_is_runnable_only_fully_approved_unexpired_and_not_run() {
        let now = now();
        assert_eq!(request(1, 1).status(now), "pending approval");
        assert_eq!(request(1, 2).status(now), "approved");
        assert_eq!(request(-1, 2).status(now), "expired");
        let mut run = request(1, 2);
        run.run = Some(Approval {
            by: "alice".into(),
            at: iso(now),
        });
        assert_eq!(run.status(now), "run");
        let mut unreadable = request(1, 2);
        unreadable.expires_at = "tomorrow".into();
        assert_eq!(unreadable.status(now), "expired", "an unreadable expiry is no licence");
    }

    #[test]
    fn identities_are_compared_without_case_or_blanks_and_must_be_printable() {
        assert!(same_person(" Alice@Bank.example", "alice@bank.example "));
        assert!(!same_person("alice", "alicia"));
        assert!(identity("  ", "--approved-by").is_err());
        assert!(identity("bob\u{7}", "--approved-by").is_err());
        assert_eq!(identity(" bob ", "--approved-by").unwrap(), "bob");
    }
}
