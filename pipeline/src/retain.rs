//! `sluice retain`: rows kept no longer than the law allows. A policy's `retention_days` (an
//! aggregate's own) bounds how long a row is kept after its source time: each run removes the
//! older rows from the policy's change logs and current-state tables (every format), the vault
//! rows of its table, its quarantined events, and the aggregate hours — physically, with the
//! history that held them (as an erasure does: Delta's older log and files, Iceberg's older
//! snapshots) — and records a receipt in the audit table. With `[retention] shred_keys`, the
//! keys of subjects none of whose rows remain anywhere are destroyed too.
//!
//! A run's state lives in the key store (`retention/current`), saved after every table: killed
//! at any point, the next run finishes it (same cut-offs) before starting another.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, BooleanArray, RecordBatch};
use arrow_schema::DataType;
use serde::{Deserialize, Serialize};
use sluice_connectors::arrow::compute::cast;
use sluice_connectors::datafusion::prelude::{col, lit, SessionContext};
use sluice_connectors::delta::erase::{RowMatcher, Treatment};
use sluice_connectors::error::{ErrorKind, Kind};
use sluice_connectors::keystore::{KeyStore, KeyStoreError};
use sluice_connectors::lake::{delta_table, Catalogs, ErasureTable, LakeError, TableLocation};
use tracing::{info, warn};

use crate::audit_table::{self, event, AuditRow};
use crate::config::Config;
use crate::forget::{drop_history, TableReceipt};
use crate::runtime::{self, RunError};

#[derive(Debug, thiserror::Error)]
pub enum RetainError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("retention run {0}: its saved state is unreadable ({1})")]
    State(String, String),
    #[error("another retention run (a daemon's, or another `sluice retain`) changed the run's state meanwhile; it finishes the run")]
    Concurrent,
}

const STATE_ID: &str = "retention/current";
const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

/// What a run did, table by table: printed (JSON) and recorded in the audit table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetentionReport {
    pub run_id: String,
    pub started_at: String,
    pub finished_at: String,
    pub dry_run: bool,
    /// Per table: the cut-off (RFC 3339: rows before it are removed) and what was done.
    pub cutoffs: BTreeMap<String, String>,
    pub tables: BTreeMap<String, TableReceipt>,
    /// Keys destroyed (`shred_keys`): of subjects none of whose rows remained anywhere.
    pub keys_shredded: u64,
}

/// A run's saved progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RunState {
    report: RetentionReport,
    /// Per table, the cut-off in microseconds since the epoch.
    cutoffs_us: BTreeMap<String, i64>,
    /// Per table: the files its commit removes, saved just before that commit.
    pending_removal: BTreeMap<String, Vec<String>>,
    tables_done: Vec<String>,
    /// Subjects some removed row belonged to (candidates for `shred_keys`).
    removed_subjects: BTreeSet<String>,
    /// The keys of those with nothing left are destroyed (not done again on a resumption).
    #[serde(default)]
    shredded: bool,
    finished: bool,
}

/// One table a run goes through.
struct Target {
    name: String,
    location: TableLocation,
    /// The timestamp column compared with the cut-off.
    time_column: &'static str,
    /// The column holding the subject token, if the table has one.
    subject_column: Option<&'static str>,
    /// Only rows whose `column` is `value` (the vault's and quarantine's rows of one table).
    only: Option<(&'static str, String)>,
    kind: TargetKind,
}

/// What a table is, for the receipt's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetKind {
    /// A policy's change log in its first format (the other format holds the same rows).
    Log,
    /// The same rows in a further format.
    LogCopy,
    Current,
    Vault,
    Quarantine,
    Aggregate,
}

/// Whether any policy or aggregate sets a retention (else a run has nothing to do).
pub fn configured(config: &Config) -> bool {
    config.policies.iter().any(|p| p.retention_days.is_some())
        || config.aggregates.iter().any(|a| a.retention_days.is_some())
        || config.retention.quarantine_days.is_some()
}

/// The tables a run goes through, with the retention (days) of each.
fn targets(config: &Config) -> Vec<(Target, u32)> {
    let mut out = Vec::new();
    for p in &config.policies {
        let Some(days) = p.retention_days else { continue };
        let current = crate::config::current_table_name(p);
        let logs = config.table_locations(p).into_iter().enumerate().map(|(i, l)| {
            (
                l,
                p.target.clone(),
                if i == 0 { TargetKind::Log } else { TargetKind::LogCopy },
            )
        });
        let currents = config
            .current_locations(p)
            .into_iter()
            .map(|l| (l, current.clone(), TargetKind::Current));
        for (location, table, kind) in logs.chain(currents) {
            out.push((
                Target {
                    name: location.label(&table),
                    location,
                    time_column: "_source_ts",
                    subject_column: Some("_subject"),
                    only: None,
                    kind,
                },
                days,
            ));
        }
        out.push((
            Target {
                name: format!("vault/{}", p.target),
                location: delta_table(config.vault_path.clone()),
                time_column: "_source_ts",
                subject_column: Some("subject_token"),
                only: Some(("table", p.target.clone())),
                kind: TargetKind::Vault,
            },
            days,
        ));
        out.push((
            Target {
                name: format!("quarantine/{}", p.table),
                location: delta_table(config.quarantine_path.clone()),
                time_column: "_ingested_at",
                subject_column: None,
                only: Some(("table", p.table.clone())),
                kind: TargetKind::Quarantine,
            },
            days,
        ));
    }
    if let Some(days) = config.retention.quarantine_days {
        out.push((
            Target {
                // Not `quarantine`: a policy's table may have that name.
                name: "quarantine/*".into(),
                location: delta_table(config.quarantine_path.clone()),
                time_column: "_ingested_at",
                subject_column: None,
                only: None,
                kind: TargetKind::Quarantine,
            },
            days,
        ));
    }
    for a in &config.aggregates {
        let Some(days) = a.retention_days else { continue };
        for table in [a.name.clone(), crate::aggregate::suppressions_table(a)] {
            for location in crate::aggregate::locations(config, &table) {
                out.push((
                    Target {
                        name: format!("aggregates/{}", location.label(&table)),
                        location,
                        time_column: "hour",
                        subject_column: None,
                        only: None,
                        kind: TargetKind::Aggregate,
                    },
                    days,
                ));
            }
        }
    }
    out
}

/// Rows older than `cutoff_us` (and of `only`, if given); with `seen`, their subjects are added
/// to it (only `shred_keys` needs them: a first run over years of rows meets many).
fn matcher(target: &Target, cutoff_us: i64, seen: Option<Arc<Mutex<BTreeSet<String>>>>) -> RowMatcher {
    let time = target.time_column;
    let subject = target.subject_column.filter(|_| seen.is_some());
    let only = target.only.clone();
    let mut columns = vec![time.to_string()];
    columns.extend(subject.map(String::from));
    columns.extend(only.as_ref().map(|(c, _)| c.to_string()));
    RowMatcher {
        columns,
        matches: Box::new(move |batch: &RecordBatch| {
            let times = batch
                .column_by_name(time)
                .ok_or_else(|| format!("column {time} is missing"))?;
            let times = times
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| format!("column {time} is not a timestamp"))?;
            let of_table = match &only {
                None => None,
                Some((column, value)) => {
                    let values = batch
                        .column_by_name(column)
                        .ok_or_else(|| format!("column {column} is missing"))?
                        .as_string_opt::<i32>()
                        .ok_or_else(|| format!("column {column} is not text"))?;
                    Some((values, value.clone()))
                }
            };
            let matched: BooleanArray = (0..batch.num_rows())
                .map(|i| {
                    let old = times.is_valid(i) && times.value(i) < cutoff_us;
                    let ours = of_table
                        .as_ref()
                        .is_none_or(|(values, value)| values.is_valid(i) && values.value(i) == value);
                    Some(old && ours)
                })
                .collect();
            if let (Some(subject), Some(seen), true) = (subject, &seen, matched.true_count() > 0) {
                if let Some(tokens) = batch.column_by_name(subject).and_then(|c| c.as_string_opt::<i32>()) {
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    for i in (0..batch.num_rows()).filter(|i| matched.value(*i) && tokens.is_valid(*i)) {
                        if !tokens.value(i).is_empty() {
                            seen.insert(tokens.value(i).to_string());
                        }
                    }
                }
            }
            Ok(matched)
        }),
    }
}

/// A run in progress: its state, and the text it was last saved as (a save succeeds only over
/// it, so two runs at once — a daemon's and `sluice retain` — cannot interleave: the second to
/// save stops).
struct Run<'a> {
    keys: &'a KeyStore,
    state: RunState,
    saved: Option<String>,
    dry_run: bool,
}

impl Run<'_> {
    fn save(&mut self) -> Result<(), RetainError> {
        if self.dry_run {
            return Ok(());
        }
        let text = serde_json::to_string(&self.state).expect("state serializes");
        let now_ms = chrono::Utc::now().timestamp_millis();
        if !self
            .keys
            .replace_job_state(STATE_ID, self.saved.as_deref(), &text, now_ms)?
        {
            return Err(RetainError::Concurrent);
        }
        self.saved = Some(text);
        Ok(())
    }
}

/// Runs retention once (finishing an interrupted run first). `dry_run`: counts, changes
/// nothing, records nothing.
pub fn retain(config: &Config, dry_run: bool) -> Result<RetentionReport, RetainError> {
    let keys = runtime::open_key_store(config, runtime::SMALL_KEY_STORE_MEMORY)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let saved_text = keys.job_state(STATE_ID)?;
    let saved: Option<RunState> = match &saved_text {
        // The error's category only: serde's text could quote the state.
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| RetainError::State(STATE_ID.into(), format!("{:?}", e.classify())))?,
        ),
        None => None,
    };
    let targets = targets(config);
    let now = chrono::Utc::now();
    let state = match saved.filter(|s| !s.finished && !dry_run) {
        Some(s) => {
            info!(run = %s.report.run_id, "finishing an interrupted retention run");
            s
        }
        None => RunState {
            report: RetentionReport {
                run_id: format!("retention-{}", now.timestamp_millis()),
                started_at: iso(now),
                dry_run,
                ..RetentionReport::default()
            },
            cutoffs_us: targets
                .iter()
                .map(|(t, days)| {
                    (
                        t.name.clone(),
                        now.timestamp_micros() - i64::from(*days) * MICROS_PER_DAY,
                    )
                })
                .collect(),
            ..RunState::default()
        },
    };
    let mut run = Run {
        keys: &keys,
        state,
        saved: saved_text,
        dry_run,
    };
    run.save()?;
    let mut catalogs = Catalogs::default();
    for (target, _) in &targets {
        let Some(&cutoff) = run.state.cutoffs_us.get(&target.name) else {
            continue; // a table the config added since the interrupted run began: next run
        };
        if run.state.tables_done.contains(&target.name) {
            continue;
        }
        run.state.report.cutoffs.insert(target.name.clone(), iso_us(cutoff));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let app_id = format!("sluice/{}/{}/{}", config.name, run.state.report.run_id, target.name);
        retain_table(
            &rt,
            &mut catalogs,
            target,
            app_id,
            &matcher(target, cutoff, config.retention.shred_keys.then(|| seen.clone())),
            &seen,
            &mut run,
        )?;
        run.state.tables_done.push(target.name.clone());
        run.save()?;
    }
    let mut state = run.state;
    if dry_run {
        state.report.finished_at = iso(chrono::Utc::now());
        return Ok(state.report);
    }
    let mut run = Run { state, ..run };
    if config.retention.shred_keys && !run.state.shredded && !run.state.removed_subjects.is_empty() {
        run.state.report.keys_shredded = shred_unreferenced(config, &rt, &keys, &run.state)?;
        run.state.shredded = true;
        run.save()?;
    }
    run.state.report.finished_at = iso(chrono::Utc::now());
    audit_table::append(
        config,
        &rt,
        &audit_row(&run.state.report, &targets),
        format!("retention/{}", run.state.report.run_id),
    )?;
    run.state.finished = true;
    run.save()?;
    Ok(run.state.report)
}

/// Removes one table's old rows and the history that held them (nothing when the table does
/// not exist). Its receipt and the subjects its rows belonged to are saved before its commit:
/// a run killed after the commit finds them on its resumption.
fn retain_table(
    rt: &tokio::runtime::Runtime,
    catalogs: &mut Catalogs,
    target: &Target,
    app_id: String,
    matcher: &RowMatcher,
    seen: &Mutex<BTreeSet<String>>,
    run: &mut Run<'_>,
) -> Result<(), RetainError> {
    let open = |catalogs: &mut Catalogs| {
        rt.block_on(ErasureTable::open(
            &target.location,
            catalogs,
            &target.name,
            app_id.clone(),
        ))
    };
    let Some(mut table) = open(catalogs)? else {
        return Ok(());
    };
    let mut receipt = run.state.report.tables.get(&target.name).cloned().unwrap_or_default();
    receipt.mode = "retention".into();
    if rt.block_on(table.committed())? {
        // Killed between the commit and the clean-up: finish it.
        let paths = run.state.pending_removal.get(&target.name).cloned().unwrap_or_default();
        rt.block_on(table.delete_files(&paths))?;
        drop_history(rt, &mut table, &mut receipt)?;
        run.state.report.tables.insert(target.name.clone(), receipt);
        return Ok(());
    }
    for attempt in 1.. {
        let mut prepared = rt.block_on(table.prepare(matcher, &Treatment::Delete, run.dry_run, &|_| {}))?;
        let result = prepared.outcome().clone();
        receipt.rows_removed = result.rows_matched;
        receipt.files_scanned = result.files_scanned;
        receipt.files_removed = result.files_removed.len() as u64;
        receipt.files_written = result.files_added;
        receipt.bytes_rewritten = result.bytes_read + result.bytes_written;
        if result.files_removed.is_empty() && !run.dry_run {
            if let Some(paths) = run.state.pending_removal.get(&target.name).cloned() {
                // A resumed run whose commit made it, though the table no longer shows it (an
                // Iceberg expiry took its snapshot): keep its receipt, finish the clean-up.
                let mut done = run.state.report.tables.get(&target.name).cloned().unwrap_or_default();
                rt.block_on(table.delete_files(&paths))?;
                drop_history(rt, &mut table, &mut done)?;
                run.state.report.tables.insert(target.name.clone(), done);
                return Ok(());
            }
        }
        run.state.report.tables.insert(target.name.clone(), receipt.clone());
        if run.dry_run || result.files_removed.is_empty() {
            break;
        }
        run.state
            .pending_removal
            .insert(target.name.clone(), result.files_removed.clone());
        run.state
            .removed_subjects
            .extend(std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner())));
        run.save()?;
        match rt.block_on(table.commit(&mut prepared)) {
            Ok(version) => {
                receipt.version = version;
                rt.block_on(table.delete_files(&result.files_removed))?;
                drop_history(rt, &mut table, &mut receipt)?;
                break;
            }
            // A busy current table merges often: prepare again on its new version.
            Err(e) if e.kind() == ErrorKind::Conflict && attempt < MAX_ATTEMPTS => {
                warn!(table = %target.name, "another writer rewrote files of the table meanwhile: preparing again");
                table = open(catalogs)?
                    .ok_or_else(|| LakeError::Query(format!("table {} disappeared during retention", target.name)))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if receipt.rows_removed > 0 && !run.dry_run {
        info!(table = %target.name, rows = receipt.rows_removed, "removed rows past their retention");
    }
    run.state.report.tables.insert(target.name.clone(), receipt);
    Ok(())
}

/// Attempts at one table's commit over other writers' (a daemon's merges and appends).
const MAX_ATTEMPTS: u32 = 10;

/// Destroys the keys of the subjects whose rows were removed and of whom no row remains in any
/// policy table, current table, the vault or the quarantine (whose events their keys seal).
/// Deleting the keys and releasing the ids is one key-store transaction: any later event of
/// theirs, whatever its time, gets a new key — nothing is left to link it to. A row of theirs
/// committed between the check and the shredding keeps its other columns but its `encrypt` and
/// `vault` values can no longer be read; a daemon that cached the key uses it until its next
/// tombstone refresh (`keys.erasure_refresh_ms`).
fn shred_unreferenced(
    config: &Config,
    rt: &tokio::runtime::Runtime,
    keys: &KeyStore,
    state: &RunState,
) -> Result<u64, RetainError> {
    let mut orphans: BTreeSet<String> = state.removed_subjects.clone();
    let query = |e: &dyn std::fmt::Display| LakeError::Query(e.to_string());
    rt.block_on(async {
        let mut catalogs = Catalogs::default();
        let mut tables: Vec<(TableLocation, String, &str)> = Vec::new();
        for p in &config.policies {
            let current = crate::config::current_table_name(p);
            for location in config.table_locations(p).into_iter().take(1) {
                tables.push((location, p.target.clone(), "_subject"));
            }
            for location in config.current_locations(p).into_iter().take(1) {
                tables.push((location, current.clone(), "_subject"));
            }
        }
        tables.push((delta_table(config.vault_path.clone()), "vault".into(), "subject_token"));
        tables.push((
            delta_table(config.quarantine_path.clone()),
            "quarantine".into(),
            "_subject",
        ));
        for (location, name, column) in tables {
            let session = SessionContext::new();
            if orphans.is_empty() || !location.register(&mut catalogs, &session, &name, "t").await? {
                continue;
            }
            // The candidates a chunk at a time: memory bounded by the chunk, not the table.
            let candidates: Vec<String> = orphans.iter().cloned().collect();
            for chunk in candidates.chunks(ORPHAN_CHECK_CHUNK) {
                let listed = chunk.iter().map(|t| lit(t.as_str())).collect();
                let batches = session
                    .table("t")
                    .await
                    .map_err(|e| query(&e))?
                    .filter(col(column).in_list(listed, false))
                    .map_err(|e| query(&e))?
                    .select(vec![col(column)])
                    .map_err(|e| query(&e))?
                    .distinct()
                    .map_err(|e| query(&e))?
                    .collect()
                    .await
                    .map_err(|e| query(&e))?;
                for b in batches {
                    let tokens = cast(b.column(0), &DataType::Utf8).map_err(|e| query(&e))?;
                    for t in tokens.as_string::<i32>().iter().flatten() {
                        orphans.remove(t);
                    }
                }
            }
        }
        Ok::<(), LakeError>(())
    })?;
    if orphans.is_empty() {
        return Ok(0);
    }
    let tokens: Vec<String> = orphans.into_iter().collect();
    let destroyed = keys.shred_keys(&state.report.run_id, &tokens, chrono::Utc::now().timestamp_millis())?;
    info!(
        subjects = tokens.len(),
        keys = destroyed.keys,
        "destroyed the keys of subjects with no rows left"
    );
    Ok(destroyed.keys)
}

/// Candidate subjects looked up per query when checking that nothing of them is left.
const ORPHAN_CHECK_CHUNK: usize = 1_000;

/// The run's receipt row: `rows_removed` counts change-log rows once (whatever the number of
/// formats), `vault_rows_removed` the vault's; every table's numbers are in `tables`.
fn audit_row(r: &RetentionReport, targets: &[(Target, u32)]) -> AuditRow {
    let removed = |kind: TargetKind| -> u64 {
        targets
            .iter()
            .filter(|(t, _)| t.kind == kind)
            .filter_map(|(t, _)| r.tables.get(&t.name))
            .map(|t| t.rows_removed)
            .sum()
    };
    let sum = |f: fn(&TableReceipt) -> u64| -> u64 { r.tables.values().map(f).sum() };
    let (log, vault) = (removed(TargetKind::Log), removed(TargetKind::Vault));
    AuditRow {
        event: event::RETENTION,
        job_id: r.run_id.clone(),
        started_at: r.started_at.clone(),
        finished_at: r.finished_at.clone(),
        keys_destroyed: r.keys_shredded,
        rows_removed: log,
        vault_rows_removed: vault,
        files_removed: sum(|t| t.files_removed),
        bytes_rewritten: sum(|t| t.bytes_rewritten),
        tables: serde_json::to_string(&r.tables).expect("report serializes"),
        columns: Vec::new(),
        verified: true,
        verification: serde_json::to_string(&r.cutoffs).expect("cut-offs serialize"),
        outcome: format!(
            "removed past their retention: {log} change-log rows, {} current-state rows, {vault} vault rows, {} quarantined events, {} aggregate rows; {} keys destroyed",
            removed(TargetKind::Current),
            removed(TargetKind::Quarantine),
            removed(TargetKind::Aggregate),
            r.keys_shredded
        ),
        ..AuditRow::default()
    }
}

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn iso_us(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us).map(iso).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{RecordBatch, StringArray, TimestampMicrosecondArray};
    use arrow_schema::{DataType, Field, Schema, TimeUnit};

    use super::*;

    #[test]
    fn only_rows_of_the_table_older_than_the_cutoff_match_and_their_subjects_are_noted() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "_source_ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("subject_token", DataType::Utf8, true),
            Field::new("table", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from(vec![Some(10), Some(10), Some(30), None]).with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec![Some("a"), Some("b"), Some("c"), Some("d")])),
                Arc::new(StringArray::from(vec![
                    Some("people"),
                    Some("orders"),
                    Some("people"),
                    Some("people"),
                ])),
            ],
        )
        .unwrap();
        let target = Target {
            name: "vault/people".into(),
            location: delta_table(sluice_connectors::storage::LakePath::Local("/nowhere".into())),
            time_column: "_source_ts",
            subject_column: Some("subject_token"),
            only: Some(("table", "people".into())),
            kind: TargetKind::Vault,
        };
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let matched = (matcher(&target, 20, Some(seen.clone())).matches)(&batch).unwrap();
        assert_eq!(
            matched.iter().collect::<Vec<_>>(),
            [Some(true), Some(false), Some(false), Some(false)]
        );
        assert_eq!(*seen.lock().unwrap(), BTreeSet::from(["a".to_string()]));
        // A table without the time column is refused by name, not guessed at.
        let other = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, true)])),
            vec![Arc::new(StringArray::from(vec!["x"]))],
        )
        .unwrap();
        let e = (matcher(&target, 20, Some(seen)).matches)(&other).unwrap_err();
        assert!(e.contains("_source_ts"), "{e}");
    }
}
