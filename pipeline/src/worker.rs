//! One unit of work: a chunk of lines from one stream, decoded, routed by table, sanitized
//! column-wise, and turned into output batches for each sink. Runs on the worker pool.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

// Column and table names are looked up for every event: a fast non-cryptographic hash. Keys
// come from the source schema, so flooding it would need control of the database.
use rustc_hash::FxHashMap;
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch, StringArray};
use arrow_schema::ArrowError;
use sluice_connectors::avro::{self, AvroReject, RegistryError, SchemaRegistry};
use sluice_connectors::debezium::schema::{canonical_text, ImageSchema, ValueKind};
use sluice_connectors::debezium::{self, value_text, DecodeOptions, Decoded, Event};
use sluice_connectors::keystore::KeyStore;
use sluice_connectors::source::Chunk;
use sluice_connectors::SourcePosition;
use sluice_transforms::actions::{Action, KeepType};
use sluice_transforms::crypto::{DataKey, Token};
use sluice_transforms::engine::TransformError;
use sluice_transforms::functions::IntegerTime;
use sluice_transforms::keys::{dropped_by_erasure, KeyError, KeyProvider};
use sluice_transforms::vault::vault_schema;
use sluice_transforms::{Policy, RawBatchBuilder, Sensitive, TableTransform};

use crate::config::{ControlRecords, InputSettings, UnknownTables};
use crate::quarantine::{QuarantineBuilder, Rejection, Seal};
use crate::sinks::SinkSet;
use crate::summary::{shown_name, Summary};

/// Output of a chunk, to be written in sequence order.
pub struct Processed {
    pub seq: u64,
    pub stream: Arc<str>,
    pub last_offset: u64,
    pub attached: Vec<SourcePosition>,
    pub boundary: bool,
    /// (sink index, rows) — see [`SinkSet`] for the numbering.
    pub outputs: Vec<(usize, RecordBatch)>,
    pub summary: Summary,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error("table {table}, position {position}: {source}")]
    Transform {
        table: String,
        position: String,
        source: TransformError,
    },
    #[error("quarantine at position {position}: encryption failed")]
    Quarantine { position: String },
    #[error("building output batches: {0}")]
    Arrow(#[from] ArrowError),
    #[error("a worker thread panicked while sanitizing a chunk")]
    Panicked,
    #[error("position {position}: {source}")]
    Registry { position: String, source: RegistryError },
}

/// Everything the workers share; immutable during a run.
pub struct Router {
    pub transforms: Vec<TableTransform>,
    /// Qualified source table (`schema.table`, `db.table` or `db.schema.table`) → index into
    /// `transforms`.
    tables: FxHashMap<String, usize>,
    /// The database each table named without one takes its events from: the first seen (or
    /// what the lake already holds), so that two databases' `public.orders` never merge.
    databases: std::sync::Mutex<FxHashMap<usize, Arc<str>>>,
    /// Whether any policy names `db.schema.table` (else that lookup is skipped).
    qualified_policies: bool,
    /// Per table: source column → slot in the raw batch.
    columns: Vec<FxHashMap<String, usize>>,
    /// Per table and slot: what the policy expects of the column's values.
    expects: Vec<Vec<Expected>>,
    pub keys: Arc<KeyStore>,
    pub quarantine_key: Arc<DataKey>,
    pub input: InputSettings,
    /// Where the writer schemas of Avro messages are (`source.format = "avro"`).
    registry: Option<Arc<SchemaRegistry>>,
    /// The unavailable-value placeholder as JSON text: as a string, and as base64 bytes (how
    /// Debezium writes it into a binary column).
    placeholders: [String; 2],
    /// Per sink: stream → offset committed before this run (for skipping re-read rows).
    pub committed: Vec<HashMap<String, i64>>,
    /// Where each table's sinks, the vault and the quarantine are among the run's sinks.
    sinks: SinkSet,
}

impl Router {
    pub fn new(
        transforms: Vec<TableTransform>,
        keys: Arc<KeyStore>,
        quarantine_key: Arc<DataKey>,
        input: InputSettings,
        registry: Option<Arc<SchemaRegistry>>,
        committed: Vec<HashMap<String, i64>>,
        formats: usize,
    ) -> Self {
        let transforms_len = transforms.len();
        let tables = transforms
            .iter()
            .enumerate()
            .map(|(i, t)| (t.policy().table.clone(), i))
            .collect();
        let columns = transforms
            .iter()
            .map(|t| {
                t.policy()
                    .source_columns()
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| (c, i))
                    .collect()
            })
            .collect();
        let expects = transforms.iter().map(|t| Expected::of_policy(t.policy())).collect();
        let qualified_policies = transforms.iter().any(|t| t.policy().table.split('.').count() > 2);
        let placeholder = input.unavailable_placeholder.as_str();
        let placeholders = [
            serde_json::Value::from(placeholder).to_string(),
            serde_json::Value::from(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                placeholder,
            ))
            .to_string(),
        ];
        Self {
            transforms,
            tables,
            databases: std::sync::Mutex::new(FxHashMap::default()),
            qualified_policies,
            columns,
            expects,
            keys,
            quarantine_key,
            input,
            registry,
            placeholders,
            committed,
            sinks: SinkSet::new(transforms_len, formats),
        }
    }

    pub fn vault_sink(&self) -> usize {
        self.sinks.vault()
    }

    pub fn quarantine_sink(&self) -> usize {
        self.sinks.quarantine()
    }

    /// The table whose primary sink `sink` is (its rows are counted and published once).
    pub fn primary_of(&self, sink: usize) -> Option<usize> {
        self.sinks.primary_of(sink)
    }

    pub fn process(&self, chunk: &Chunk, ingested_at_us: i64) -> Result<Processed, WorkError> {
        match &self.registry {
            None => self.process_events(chunk, &[], ingested_at_us),
            Some(registry) => {
                let (json, rejected) = transcode_avro(chunk, registry, self.input.max_event_bytes)?;
                self.process_events(&json, &rejected, ingested_at_us)
            }
        }
    }

    /// Decodes, routes and sanitizes a chunk of JSON events; `rejected[i]`, when given, says why
    /// line `i` was already found unreadable (its Avro message).
    fn process_events(
        &self,
        chunk: &Chunk,
        rejected: &[Option<AvroReject>],
        ingested_at_us: i64,
    ) -> Result<Processed, WorkError> {
        let mut summary = Summary::default();
        let n_tables = self.transforms.len();
        let mut builders: Vec<Option<RawBatchBuilder>> = (0..n_tables).map(|_| None).collect();
        let mut row_lines: Vec<Vec<usize>> = vec![Vec::new(); n_tables];
        let mut scratch: Vec<Vec<Option<Cow<'_, str>>>> = self.columns.iter().map(|c| vec![None; c.len()]).collect();
        let mut seen_scratch: Vec<Vec<bool>> = self.columns.iter().map(|c| vec![false; c.len()]).collect();
        let mut dropped: Vec<FxHashMap<String, u64>> = vec![FxHashMap::default(); n_tables];
        let mut quarantine = QuarantineBuilder::new(self.quarantine_key.clone());
        let mut schemas = SchemaCache::default();
        let mut bound: Vec<Option<Arc<str>>> = vec![None; n_tables];
        let mut position = String::new();
        let mut table_name = String::new();

        for (line_no, &(start, end, line_end)) in chunk.lines.iter().enumerate() {
            let line = &chunk.data[start..end];
            write_position(&mut position, &chunk.stream, line_end.end_offset);
            let position = position.as_str();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            #[cfg(test)]
            if line
                .windows(PANIC_FOR_TESTS.len())
                .any(|w| w == PANIC_FOR_TESTS.as_bytes())
            {
                panic!("a defect, as tests simulate it");
            }
            summary.events_read += 1;
            let mut quarantined = |summary: &mut Summary, rejection: Rejection<'_>, seal: Seal<'_>| {
                *summary.quarantined.entry(rejection.reason.to_string()).or_default() += 1;
                quarantine
                    .push(rejection, position, line, line_end.len, seal)
                    .map_err(|_| WorkError::Quarantine {
                        position: position.to_string(),
                    })
            };
            if let Some(Some(reject)) = rejected.get(line_no) {
                quarantined(&mut summary, Rejection::event(reject.reason(), reject.detail()), None)?;
                continue;
            }
            if line_end.truncated(self.input.max_event_bytes) {
                quarantined(
                    &mut summary,
                    Rejection::event(
                        "oversized_event",
                        "event larger than source.max_event_bytes (stored truncated)",
                    ),
                    None,
                )?;
                continue;
            }
            let event = match debezium::decode(line, &self.input.decode, schemas.known()) {
                Ok(Decoded::Change(e)) => e,
                Ok(Decoded::Tombstone) => {
                    summary.tombstones += 1;
                    continue;
                }
                Ok(Decoded::Control(kind)) => {
                    *summary.control_records.entry(kind.name().to_string()).or_default() += 1;
                    if self.input.control_records == ControlRecords::Quarantine {
                        quarantined(&mut summary, Rejection::event("control_record", kind.describe()), None)?;
                    }
                    continue;
                }
                Err(e) => {
                    // Refused (a bad time, a malformed value), but perhaps still whose it is. A
                    // refused event binds no database to its table.
                    let sealing = match debezium::decode(line, &DecodeOptions::any_time(), &[]) {
                        Ok(Decoded::Change(event)) => match self.table_of(&event, &mut table_name) {
                            Some((t, _)) => self.sealing(t, &event, position)?,
                            None => Sealing::Unknown,
                        },
                        _ => Sealing::Unknown,
                    };
                    if matches!(sealing, Sealing::Erased) {
                        summary.erased_subject_rows += 1;
                        continue;
                    }
                    quarantined(
                        &mut summary,
                        Rejection::event(e.reason(), &e.to_string()),
                        sealing.seal(),
                    )?;
                    continue;
                }
            };
            let Some(t) = self.route(&event, &mut table_name, &mut bound) else {
                let shown = shown_name(&table_name);
                *summary.unknown_tables.entry(shown.to_string()).or_default() += 1;
                if self.input.unknown_tables == UnknownTables::Quarantine {
                    quarantined(
                        &mut summary,
                        Rejection {
                            reason: "unknown_table",
                            detail: "no policy names this table",
                            table: Some(&shown),
                            column: None,
                        },
                        None,
                    )?;
                }
                continue;
            };
            let t = match t {
                Route::Table(t) => t,
                Route::Ambiguous => {
                    quarantined(
                        &mut summary,
                        Rejection {
                            reason: "ambiguous_table",
                            detail: "events of this schema.table come from more than one database: name the database in the policy (db.schema.table)",
                            table: Some(&table_name),
                            column: None,
                        },
                        None,
                    )?;
                    continue;
                }
            };
            let slots = &self.columns[t];
            // Whose event this is, asked only on the way to the quarantine: an erased subject's
            // event goes nowhere (as its rows), another is sealed under its subject's key.
            let sealing = |summary: &mut Summary| -> Result<Option<Sealing>, WorkError> {
                let sealing = self.sealing(t, &event, position)?;
                if matches!(sealing, Sealing::Erased) {
                    summary.erased_subject_rows += 1;
                    return Ok(None);
                }
                Ok(Some(sealing))
            };
            if let Some(column) = event.unavailable.iter().find(|c| slots.contains_key(c.as_ref())) {
                let Some(sealing) = sealing(&mut summary)? else {
                    continue;
                };
                quarantined(
                    &mut summary,
                    Rejection {
                        reason: "unavailable_value",
                        detail: "the capture could not carry a column the policy names (unsupported PostgreSQL type, or an unchanged TOAST value without the old row)",
                        table: Some(&table_name),
                        column: Some(column),
                    },
                    sealing.seal(),
                )?;
                continue;
            }
            let image_schema = match event.schema {
                None => None,
                Some(text) => match schemas.get(text) {
                    Some(schema) => Some(schema),
                    None => {
                        let Some(sealing) = sealing(&mut summary)? else {
                            continue;
                        };
                        quarantined(
                            &mut summary,
                            Rejection {
                                reason: "bad_schema",
                                detail: "the event's Connect schema has no readable before/after struct",
                                table: Some(&table_name),
                                column: None,
                            },
                            sealing.seal(),
                        )?;
                        continue;
                    }
                },
            };
            let values = &mut scratch[t];
            let seen = &mut seen_scratch[t];
            seen.iter_mut().for_each(|s| *s = false);
            let mut rejected: Option<(&'static str, &'static str, Cow<'_, str>)> = None;
            for (column, raw) in &event.image.0 {
                let Some(&slot) = slots.get(column.as_ref()) else {
                    match dropped[t].get_mut(column.as_ref()) {
                        Some(n) => *n += 1,
                        None => {
                            dropped[t].insert(column.to_string(), 1);
                        }
                    }
                    continue;
                };
                if rejected.is_some() {
                    continue;
                }
                // JSON readers disagree on which of two values they keep: never guess.
                if std::mem::replace(&mut seen[slot], true) {
                    rejected = Some((
                        "malformed_json",
                        "a column appears twice in the row image",
                        column.clone(),
                    ));
                    continue;
                }
                let kind = image_schema.as_ref().map_or(ValueKind::Plain, |s| s.kind(column));
                // The one place a raw value is unwrapped: straight into the table's raw batch.
                match self.column_value(&event, column, raw, kind, &self.expects[t][slot]) {
                    Ok(v) => values[slot] = v,
                    Err((code, reason)) => rejected = Some((code, reason, column.clone())),
                }
            }
            if let Some((reason, detail, column)) = rejected {
                values.iter_mut().for_each(|v| *v = None);
                let Some(sealing) = sealing(&mut summary)? else {
                    continue;
                };
                quarantined(
                    &mut summary,
                    Rejection {
                        reason,
                        detail,
                        table: Some(&table_name),
                        column: Some(&column),
                    },
                    sealing.seal(),
                )?;
                continue;
            }
            builders[t]
                .get_or_insert_with(|| RawBatchBuilder::new(values.len()))
                .push(
                    event.op,
                    event.event_ms,
                    position,
                    event.database.as_deref(),
                    values,
                    seen,
                );
            row_lines[t].push(line_no);
        }

        let mut outputs = Vec::new();
        let mut vault_batches = Vec::new();
        for (t, builder) in builders.iter_mut().enumerate() {
            let Some(builder) = builder else { continue };
            let transform = &self.transforms[t];
            let raw = builder.finish();
            let out = transform
                .apply(&raw, &*self.keys, ingested_at_us)
                .map_err(|source| WorkError::Transform {
                    table: transform.policy().table.clone(),
                    position: format!("{}:{}", chunk.stream, chunk.last_offset()),
                    source,
                })?;
            summary.erased_subject_rows += out.erased_rows as u64;
            for reject in &out.rejects {
                let line_no = row_lines[t][reject.row];
                let (start, end, line_end) = chunk.lines[line_no];
                write_position(&mut position, &chunk.stream, line_end.end_offset);
                let sealing = match reject.subject {
                    Some(token) => self.sealing_of(token, raw.event_ms.value(reject.row), t, &position)?,
                    None => Sealing::Unknown,
                };
                if matches!(sealing, Sealing::Erased) {
                    summary.erased_subject_rows += 1;
                    continue;
                }
                *summary.quarantined.entry(reject.code.to_string()).or_default() += 1;
                quarantine
                    .push(
                        Rejection {
                            reason: reject.code,
                            detail: reject.reason,
                            table: Some(&transform.policy().table),
                            column: Some(&reject.column),
                        },
                        &position,
                        &chunk.data[start..end],
                        line_end.len,
                        sealing.seal(),
                    )
                    .map_err(|_| WorkError::Quarantine {
                        position: position.clone(),
                    })?;
            }
            if out.table.num_rows() > 0 {
                for sink in self.sinks.tables_of(t) {
                    outputs.push((sink, out.table.clone()));
                }
            }
            vault_batches.extend(out.vault);
        }
        if !vault_batches.is_empty() {
            outputs.push((self.vault_sink(), arrow_select_concat(&vault_batches)?));
        }
        if let Some(q) = quarantine.finish(ingested_at_us) {
            outputs.push((self.quarantine_sink(), q));
        }
        for (t, cols) in dropped.into_iter().enumerate() {
            if !cols.is_empty() {
                // Names as shown, once per distinct name and chunk (not per event).
                let mut shown: BTreeMap<String, u64> = BTreeMap::new();
                for (column, n) in cols {
                    *shown.entry(shown_name(&column).into_owned()).or_default() += n;
                }
                summary
                    .dropped_columns
                    .insert(self.transforms[t].policy().table.clone(), shown);
            }
        }
        let outputs = self.skip_committed(chunk, outputs, &mut summary)?;
        for (sink, batch) in &outputs {
            let rows = batch.num_rows() as u64;
            if let Some(t) = self.primary_of(*sink) {
                *summary
                    .rows_written
                    .entry(self.transforms[t].policy().target.clone())
                    .or_default() += rows;
            } else if *sink == self.vault_sink() {
                summary.vault_rows_written += rows;
            }
        }
        Ok(Processed {
            seq: chunk.seq,
            stream: chunk.stream.clone(),
            last_offset: chunk.last_offset(),
            attached: chunk.attached.clone(),
            boundary: chunk.boundary,
            outputs,
            summary,
        })
    }

    /// Processes a chunk whose processing panicked, one event at a time: an event that makes
    /// the sanitizer panic is quarantined (`internal_error`) and the others go on, so neither
    /// this run nor a restart meets the same poison pill again.
    pub fn process_isolating(&self, chunk: &Chunk, ingested_at_us: i64) -> Result<Processed, WorkError> {
        let mut summary = Summary::default();
        let mut outputs = Vec::new();
        let mut quarantine = QuarantineBuilder::new(self.quarantine_key.clone());
        let mut position = String::new();
        for &(start, end, line_end) in &chunk.lines {
            let line = &chunk.data[start..end];
            let mut one = Chunk::new(chunk.stream.clone(), 1);
            one.push(line, line_end);
            match catching(|| self.process(&one, ingested_at_us)) {
                Ok(result) => {
                    let processed = result?;
                    outputs.extend(processed.outputs);
                    summary.merge(processed.summary);
                }
                Err(_) => {
                    write_position(&mut position, &chunk.stream, line_end.end_offset);
                    tracing::error!(position = %position, "sanitizing an event panicked: quarantined as internal_error");
                    summary.events_read += 1;
                    *summary.quarantined.entry("internal_error".to_string()).or_default() += 1;
                    quarantine
                        .push(
                            Rejection::event(
                                "internal_error",
                                "sanitizing this event panicked (a defect in sluice: report it with the position)",
                            ),
                            &position,
                            line,
                            line_end.len,
                            // Reading its subject could be what panicked: the system key.
                            None,
                        )
                        .map_err(|_| WorkError::Quarantine {
                            position: position.clone(),
                        })?;
                }
            }
        }
        if let Some(q) = quarantine.finish(ingested_at_us) {
            outputs.extend(self.skip_committed(chunk, vec![(self.quarantine_sink(), q)], &mut summary)?);
        }
        Ok(Processed {
            seq: chunk.seq,
            stream: chunk.stream.clone(),
            last_offset: chunk.last_offset(),
            attached: chunk.attached.clone(),
            boundary: chunk.boundary,
            outputs,
            summary,
        })
    }

    /// After a restart, rows a sink already committed are removed from its output. Only chunks
    /// that start at or before a committed position pay for this.
    fn skip_committed(
        &self,
        chunk: &Chunk,
        outputs: Vec<(usize, RecordBatch)>,
        summary: &mut Summary,
    ) -> Result<Vec<(usize, RecordBatch)>, ArrowError> {
        let first = chunk.first_offset() as i64;
        let mut kept = Vec::with_capacity(outputs.len());
        for (sink, batch) in outputs {
            let committed = self.committed[sink].get(chunk.stream.as_ref()).copied();
            let Some(committed) = committed.filter(|c| first <= *c) else {
                kept.push((sink, batch));
                continue;
            };
            let positions = batch.column(batch.schema().index_of("_position")?).clone();
            let positions = positions
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("_position is Utf8");
            let keep: BooleanArray = positions
                .iter()
                .map(|p| Some(offset_of(p.unwrap_or("")) > committed))
                .collect();
            let filtered = arrow_select::filter::filter_record_batch(&batch, &keep)?;
            if self.primary_of(sink).is_some() {
                summary.already_committed += (batch.num_rows() - filtered.num_rows()) as u64;
            }
            if filtered.num_rows() > 0 {
                kept.push((sink, filtered));
            }
        }
        Ok(kept)
    }
}

/// Test hook: an event holding this text makes [`Router::process`] panic, as a defect would.
#[cfg(test)]
const PANIC_FOR_TESTS: &str = "__sluice_test_panic__";

thread_local! {
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic (the panic hook lets such a panic pass: see
/// [`panic_is_caught`]).
pub fn catching<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    let outer = CATCHING.replace(true);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.set(outer);
    result
}

/// Whether a panic on this thread now is caught by [`catching`] (and handled there).
pub fn panic_is_caught() -> bool {
    CATCHING.get()
}

/// What a policy expects of one source column's values.
#[derive(Debug, Clone, Copy, Default)]
struct Expected {
    /// Whether anything reads the value (a `drop` without `derive` does not): an unused value
    /// is neither decoded nor checked.
    used: bool,
    keep: Option<KeepType>,
    unit: Option<IntegerTime>,
    /// Read as a date or time by `keep`, `generalize` or `derive`.
    temporal: bool,
}

impl Expected {
    /// Per slot of the table's raw batch (the order of [`Policy::source_columns`]).
    fn of_policy(policy: &Policy) -> Vec<Expected> {
        policy
            .source_columns()
            .iter()
            .map(|column| {
                let Some(rule) = policy.rules.iter().find(|r| &r.column == column) else {
                    // The subject column without a rule of its own: its value is the subject.
                    return Expected {
                        used: true,
                        ..Expected::default()
                    };
                };
                let keep = match rule.action {
                    Action::Keep(ty) => Some(ty),
                    _ => None,
                };
                let temporal = keep.is_some_and(KeepType::is_temporal)
                    || matches!(&rule.action, Action::Generalize(f) if f.is_temporal())
                    || rule.derive.iter().any(|d| d.function.is_temporal());
                Expected {
                    used: !matches!(rule.action, Action::Drop)
                        || !rule.derive.is_empty()
                        || rule.column == policy.subject,
                    keep,
                    unit: rule.unit,
                    temporal,
                }
            })
            .collect()
    }

    /// Why values of schema kind `kind` cannot be what the policy says, if they cannot.
    fn conflict(self, kind: ValueKind) -> Option<&'static str> {
        if let (Some(unit), Some(schema_unit)) = (self.unit, kind.unit_name()) {
            if unit.name() != schema_unit {
                return Some("the policy's unit differs from the time unit the event's schema gives");
            }
        }
        match (kind, self.keep?) {
            (
                ValueKind::Decimal { .. } | ValueKind::VariableScaleDecimal,
                KeepType::Date | KeepType::Timestamp | KeepType::Bool,
            ) => Some("the policy's type does not fit a decimal column"),
            (ValueKind::Decimal { scale: Some(scale) }, KeepType::Int64) if scale > 0 => {
                Some("the policy keeps as int64 a decimal column with a scale")
            }
            (ValueKind::Decimal { scale: Some(scale) }, KeepType::Decimal { scale: kept, .. })
                if scale > kept as u32 =>
            {
                Some("the schema's decimal scale is larger than the policy's")
            }
            (k, KeepType::Int64 | KeepType::Float64 | KeepType::Bool | KeepType::Decimal { .. }) if k.is_temporal() => {
                Some("the policy's type does not fit a date or time column")
            }
            _ => None,
        }
    }
}

/// A quarantine code and its fixed text.
type ValueReject = (&'static str, &'static str);

/// Where an event goes.
enum Route {
    Table(usize),
    /// A table named without its database, whose events come from another database than the
    /// one it took first.
    Ambiguous,
}

impl Router {
    /// The table of an event: `db.schema.table` when a policy names the database, else
    /// `schema.table` (`db.table` for MySQL, which has no schemas); `name` is left holding the
    /// name looked up last (for counters and the quarantine).
    fn route(&self, event: &Event<'_>, name: &mut String, bound: &mut [Option<Arc<str>>]) -> Option<Route> {
        let (t, named_with_database) = self.table_of(event, name)?;
        let database = event.database.as_deref().filter(|_| event.has_schema);
        if named_with_database {
            return Some(Route::Table(t));
        }
        if let Some(db) = database {
            // The shared binding is asked once per table and chunk, not once per event.
            let first = bound[t].get_or_insert_with(|| {
                let mut shared = self.databases.lock().unwrap_or_else(|p| p.into_inner());
                shared.entry(t).or_insert_with(|| Arc::from(db)).clone()
            });
            if first.as_ref() != db {
                return Some(Route::Ambiguous);
            }
        }
        Some(Route::Table(t))
    }

    /// The policy table an event's table name selects, and whether the policy names its
    /// database; no database is bound to a table here (see [`Router::route`]).
    fn table_of(&self, event: &Event<'_>, name: &mut String) -> Option<(usize, bool)> {
        event.qualified_table(name);
        // A schema apart from the database (PostgreSQL, SQL Server): `db.schema.table` first.
        let database = event.database.as_deref().filter(|_| event.has_schema);
        if let (true, Some(db)) = (self.qualified_policies, database) {
            let short_len = name.len();
            name.insert(0, '.');
            name.insert_str(0, db);
            if let Some(&t) = self.tables.get(name.as_str()) {
                return Some((t, true));
            }
            name.drain(..name.len() - short_len);
        }
        self.tables.get(name.as_str()).map(|&t| (t, false))
    }

    /// How an event of table `t` about to be quarantined is sealed: its subject read as ingest
    /// reads it, then dropped if erased or sealed under the subject's key.
    fn sealing(&self, t: usize, event: &Event<'_>, position: &str) -> Result<Sealing, WorkError> {
        let transform = &self.transforms[t];
        match event
            .subject_text(&transform.policy().subject)
            .and_then(|id| transform.subject_token(&id))
        {
            Some(token) => self.sealing_of(token, event.event_ms, t, position),
            None => Ok(Sealing::Unknown),
        }
    }

    /// `event_ms`: the event's source time (0 when it has none: as old as can be).
    fn sealing_of(&self, token: Token, event_ms: i64, t: usize, position: &str) -> Result<Sealing, WorkError> {
        let failed = |source: KeyError| WorkError::Transform {
            table: self.transforms[t].policy().table.clone(),
            position: position.to_string(),
            source: TransformError::Keys(source),
        };
        let cutoff = self.keys.erased_subjects(&[token.as_str()]).map_err(failed)?[0];
        if dropped_by_erasure(cutoff, event_ms) {
            return Ok(Sealing::Erased);
        }
        // No key: erased since the last tombstone refresh.
        Ok(
            match self
                .keys
                .subject_keys(&[token.as_str()])
                .map_err(failed)?
                .pop()
                .flatten()
            {
                Some(key) => Sealing::Subject(token, key),
                None => Sealing::Erased,
            },
        )
    }

    /// Binds tables named without a database to the one their lake table already holds rows of.
    pub fn bind_databases(&self, known: impl IntoIterator<Item = (usize, String)>) {
        let mut bound = self.databases.lock().unwrap_or_else(|p| p.into_inner());
        for (t, db) in known {
            bound.insert(t, Arc::from(db.as_str()));
        }
    }

    /// Whether a value is Debezium's unavailable-value placeholder: the text itself, its
    /// base64 (binary columns), or an array or map holding it (PostgreSQL arrays, hstore).
    fn is_placeholder(&self, raw: &serde_json::value::RawValue) -> bool {
        let json = raw.get();
        match json.as_bytes().first() {
            Some(b'[' | b'{') => self.placeholders.iter().any(|p| json.contains(p.as_str())),
            _ => self.placeholders.iter().any(|p| p == json),
        }
    }

    /// The text of one value the policy names, read as its schema says (`kind`), or why the
    /// event cannot be taken.
    fn column_value<'a>(
        &self,
        event: &Event<'a>,
        column: &str,
        raw: &'a serde_json::value::RawValue,
        kind: ValueKind,
        expected: &Expected,
    ) -> Result<Option<Cow<'a, str>>, ValueReject> {
        if !expected.used {
            return Ok(None);
        }
        let mut raw = raw;
        if self.is_placeholder(raw) {
            // Debezium left an unchanged value out (a TOAST column): the before image may hold it.
            raw = event
                .previous
                .as_ref()
                .and_then(|before| before.get(column))
                .filter(|old| !self.is_placeholder(old))
                .ok_or((
                    "unavailable_value",
                    "Debezium sent its unavailable-value placeholder (an unchanged TOAST value) and no before image holds the value",
                ))?;
        }
        if kind != ValueKind::Plain {
            if let Some(reason) = expected.conflict(kind) {
                return Err(("schema_mismatch", reason));
            }
            let mut text = String::new();
            return match canonical_text(kind, raw, &mut text) {
                Ok(true) => Ok(Some(Cow::Owned(text))),
                Ok(false) => Ok(None),
                Err(reason) => Err(("type_mismatch", reason)),
            };
        }
        let text = value_text(raw)
            .map_err(|_| ("malformed_json", "a column value is not valid JSON"))?
            .map(Sensitive::into_inner);
        // An integer date is an epoch only when it is a JSON number: a digit string (a card
        // number in a date column, `20240701`) is not a date.
        if expected.temporal && raw.get().starts_with('"') {
            if let Some(t) = &text {
                let digits = t.trim().strip_prefix('-').unwrap_or(t.trim());
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(("type_mismatch", "a digit string is not a date or time"));
                }
            }
        }
        Ok(text)
    }
}

/// Whose key seals a quarantined event.
enum Sealing {
    /// An erased subject's: the event is dropped, not quarantined.
    Erased,
    Subject(Token, Arc<DataKey>),
    /// No readable subject: the quarantine's system key.
    Unknown,
}

impl Sealing {
    fn seal(&self) -> Seal<'_> {
        match self {
            Sealing::Subject(token, key) => Some((token.as_str(), key)),
            _ => None,
        }
    }
}

/// Row-image schemas of wrapped events, parsed once per distinct schema text in a chunk (every
/// event of a table repeats its schema), most recently used first: distinct schemas differ
/// within their first bytes, so finding one costs a comparison per table, not a hash of the
/// text. The decoder is given the same texts, to recognize a line that repeats one of them.
#[derive(Default)]
struct SchemaCache<'a> {
    texts: Vec<&'a str>,
    parsed: Vec<Option<std::rc::Rc<ImageSchema>>>,
}

impl<'a> SchemaCache<'a> {
    /// Distinct schemas kept; an input that varies them without end is not kept without end.
    const KEPT: usize = 64;

    /// The schema texts seen, most recent first.
    fn known(&self) -> &[&'a str] {
        &self.texts
    }

    /// `None`: the schema text has no readable row image.
    fn get(&mut self, text: &'a str) -> Option<std::rc::Rc<ImageSchema>> {
        let (text, parsed) = match self.texts.iter().position(|known| *known == text) {
            Some(i) => (self.texts.remove(i), self.parsed.remove(i)),
            None => {
                if self.texts.len() == Self::KEPT {
                    self.texts.pop();
                    self.parsed.pop();
                }
                (text, ImageSchema::from_connect_envelope(text).map(std::rc::Rc::new))
            }
        };
        self.texts.insert(0, text);
        self.parsed.insert(0, parsed.clone());
        parsed
    }
}

/// A chunk of Avro messages as JSON-converter events, and why each unreadable one is: the JSON
/// path then decodes, routes and quarantines as for any other source. Tombstones (empty) and
/// oversized messages pass unchanged (the JSON path skips or quarantines them).
fn transcode_avro(
    chunk: &Chunk,
    registry: &SchemaRegistry,
    max_event_bytes: usize,
) -> Result<(Chunk, Vec<Option<AvroReject>>), WorkError> {
    let mut json = Chunk::new(chunk.stream.clone(), chunk.lines.len());
    json.seq = chunk.seq;
    json.attached = chunk.attached.clone();
    json.boundary = chunk.boundary;
    let mut rejected = Vec::with_capacity(chunk.lines.len());
    let mut event = Vec::new();
    for &(start, end, line_end) in &chunk.lines {
        let message = &chunk.data[start..end];
        if message.is_empty() || line_end.truncated(max_event_bytes) {
            json.push(message, line_end);
            rejected.push(None);
            continue;
        }
        let outcome = avro::transcode(message, registry, &mut event).map_err(|source| WorkError::Registry {
            position: format!("{}:{}", chunk.stream, line_end.end_offset),
            source,
        })?;
        match outcome {
            Ok(()) => {
                json.push(&event, line_end);
                rejected.push(None);
            }
            // The message as it came, for the quarantine.
            Err(reject) => {
                json.push(message, line_end);
                rejected.push(Some(reject));
            }
        }
    }
    Ok((json, rejected))
}

/// `<stream>:<offset>`, written into a reused buffer (one per line would be an allocation).
fn write_position(out: &mut String, stream: &str, offset: u64) {
    use std::fmt::Write;
    out.clear();
    out.push_str(stream);
    let _ = write!(out, ":{offset}");
}

fn offset_of(position: &str) -> i64 {
    position
        .rsplit_once(':')
        .and_then(|(_, o)| o.parse().ok())
        .unwrap_or(i64::MAX)
}

fn arrow_select_concat(batches: &[RecordBatch]) -> Result<RecordBatch, ArrowError> {
    arrow_select::concat::concat_batches(&vault_schema(), batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::BinaryArray;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
    use sluice_connectors::keystore::{KeyStoreLocation, MasterKey};
    use sluice_connectors::source::LineEnd;
    use sluice_transforms::crypto::Tokenizer;
    use sluice_transforms::Policy;
    use std::path::Path;
    use std::sync::OnceLock;

    const POLICY: &str = include_str!("../../fixtures/test-policies/people-router.toml");

    fn router_of(policy: &str, input: InputSettings) -> (tempfile::TempDir, Router) {
        router_of_all(&[policy], input)
    }

    fn router_of_all(policies: &[&str], input: InputSettings) -> (tempfile::TempDir, Router) {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::from_hex(&"ab".repeat(32)).unwrap();
        let keys =
            Arc::new(KeyStore::open(&KeyStoreLocation::Sqlite(dir.path().join("keys.db")), master, 100).unwrap());
        let transforms: Vec<TableTransform> = policies
            .iter()
            .map(|p| {
                let policy = Policy::from_toml(Path::new("policy.toml"), p).unwrap();
                TableTransform::new(policy, &Tokenizer::new(&[1; 32]))
            })
            .collect();
        let quarantine_key = keys.system_key("quarantine").unwrap();
        let sinks = transforms.len() + 2;
        let router = Router::new(
            transforms,
            keys,
            quarantine_key,
            input,
            None,
            vec![HashMap::new(); sinks],
            1,
        );
        (dir, router)
    }

    fn router() -> &'static Router {
        static ROUTER: OnceLock<(tempfile::TempDir, Router)> = OnceLock::new();
        &ROUTER.get_or_init(|| router_of(POLICY, InputSettings::default())).1
    }

    fn chunk(lines: &[String]) -> Chunk {
        let mut data = Vec::new();
        let mut spans = Vec::new();
        for l in lines {
            let start = data.len();
            data.extend_from_slice(l.as_bytes());
            spans.push((
                start,
                data.len(),
                LineEnd {
                    end_offset: data.len() as u64,
                    len: l.len(),
                    terminated: true,
                },
            ));
        }
        Chunk {
            seq: 0,
            stream: Arc::from("s.jsonl"),
            data,
            lines: spans,
            attached: Vec::new(),
            boundary: true,
        }
    }

    fn contains(batch: &RecordBatch, needle: &str) -> bool {
        batch.columns().iter().any(|c| {
            if let Some(s) = c.as_any().downcast_ref::<StringArray>() {
                s.iter().flatten().any(|v| v.contains(needle))
            } else if let Some(b) = c.as_any().downcast_ref::<BinaryArray>() {
                b.iter()
                    .flatten()
                    .any(|v| v.windows(needle.len()).any(|w| w == needle.as_bytes()))
            } else {
                false
            }
        })
    }

    #[test]
    fn names_from_the_input_are_shown_plain_or_hashed_in_the_summary_and_the_quarantine() {
        let forged = "x\\\"} 1\\nsluice_erased_subjects 424242\\n";
        let long = "c".repeat(300);
        let lines = [
            format!(
                r#"{{"op":"c","after":{{"id":1,"{forged}":1,"{long}":2,"plain_extra":3}},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
            ),
            format!(
                r#"{{"op":"c","after":{{"id":2,"{forged}":1}},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
            ),
            format!(r#"{{"op":"c","after":{{"id":3}},"source":{{"schema":"public","table":"{forged}","ts_ms":1}}}}"#),
        ];
        let (_dir, router) = router_of(
            POLICY,
            InputSettings {
                unknown_tables: UnknownTables::Quarantine,
                ..InputSettings::default()
            },
        );
        let out = router.process(&chunk(&lines), 0).unwrap();
        let dropped = &out.summary.dropped_columns["public.people"];
        assert_eq!(dropped.len(), 3, "{dropped:?}");
        assert_eq!(dropped["plain_extra"], 1);
        let hashed: Vec<_> = dropped.iter().filter(|(k, _)| k.starts_with('~')).collect();
        assert_eq!(hashed.len(), 2);
        assert!(
            hashed.iter().any(|(_, n)| **n == 2),
            "one forged name counted twice: {hashed:?}"
        );
        let unknown: Vec<&String> = out.summary.unknown_tables.keys().collect();
        assert!(
            unknown.len() == 1 && unknown[0].starts_with('~') && unknown[0].len() == 17,
            "{unknown:?}"
        );
        let quarantine = &out
            .outputs
            .iter()
            .find(|(sink, _)| *sink == router.quarantine_sink())
            .unwrap()
            .1;
        assert!(!contains(quarantine, "424242") && contains(quarantine, unknown[0]));
    }

    #[test]
    fn a_refused_event_binds_no_database_to_its_table() {
        let (_dir, router) = router_of(POLICY, InputSettings::default());
        let event = |db: &str, ts: &str| {
            format!(
                r#"{{"op":"c","after":{{"id":1,"balance":3}},"source":{{"db":"{db}","schema":"public","table":"people"{ts}}}}}"#
            )
        };
        // No event time: refused, from database `a`; then a good event from database `b`.
        let out = router
            .process(&chunk(&[event("a", ""), event("b", r#","ts_ms":1"#)]), 0)
            .unwrap();
        assert_eq!(out.summary.quarantined.get("bad_timestamp"), Some(&1));
        assert_eq!(
            out.summary.quarantined.get("ambiguous_table"),
            None,
            "{:?}",
            out.summary
        );
        assert_eq!(out.summary.rows_written.get("people"), Some(&1));
    }

    #[test]
    fn a_quarantined_event_is_sealed_under_its_subjects_key_and_an_erased_subjects_goes_nowhere() {
        let (_dir, router) = router_of(POLICY, InputSettings::default());
        let people = |id: u32, row: &str, extra: &str| {
            format!(
                r#"{{"op":"u","after":{{"id":{id},{row}}},"source":{{"schema":"public","table":"people"{extra}}}}}"#
            )
        };
        let lines = [
            // Unavailable, a lone surrogate, no event time: each quarantined before the engine.
            people(7, r#""balance":3"#, r#","ts_ms":1,"sluice_unavailable":["email"]"#),
            people(7, r#""email":"\ud800","balance":3"#, r#","ts_ms":1"#),
            people(7, r#""balance":3"#, ""),
            // A value error found by the engine.
            people(7, r#""balance":"three""#, r#","ts_ms":1"#),
            // Not JSON at all: nobody's, under the system key.
            r#"{"op":"c","after":{"id":7,"#.to_string(),
        ];
        let token = router.transforms[0].subject_token("7").unwrap();
        let out = router.process(&chunk(&lines), 0).unwrap();
        let quarantine = &out
            .outputs
            .iter()
            .find(|(sink, _)| *sink == router.quarantine_sink())
            .unwrap()
            .1;
        assert_eq!(quarantine.num_rows(), 5);
        let text = |name: &str| {
            quarantine
                .column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        let (subjects, positions) = (text("_subject"), text("_position"));
        let events = quarantine
            .column_by_name("event_enc")
            .unwrap()
            .as_any()
            .downcast_ref::<BinaryArray>()
            .unwrap();
        let subject_key = router
            .keys
            .subject_keys(&[token.as_str()])
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        let unreadable = format!("s.jsonl:{}", lines.iter().map(|l| l.len()).sum::<usize>());
        for i in 0..5 {
            let aad = crate::quarantine::event_aad(positions.value(i));
            if positions.value(i) == unreadable {
                assert!(subjects.is_null(i));
                assert!(router.quarantine_key.open(events.value(i), &aad).is_ok());
                continue;
            }
            assert_eq!(subjects.value(i), token.as_str(), "row {i}");
            assert!(
                subject_key.open(events.value(i), &aad).is_ok(),
                "row {i}: sealed under the subject's key"
            );
            assert!(router.quarantine_key.open(events.value(i), &aad).is_err(), "row {i}");
        }

        router
            .keys
            .erase_subjects("job", &[token.as_str().to_string()], 0)
            .unwrap();
        let out = router.process(&chunk(&lines), 0).unwrap();
        assert_eq!(out.summary.erased_subject_rows, 4, "{:?}", out.summary);
        assert_eq!(out.summary.quarantined_total(), 1, "only the unreadable one");
    }

    #[test]
    fn a_policy_column_the_capture_could_not_carry_quarantines_the_event_and_truncates_land() {
        let lines = [
            // `email` is named by the policy but was unavailable: never a row with it missing.
            r#"{"op":"u","after":{"id":7,"balance":3},"source":{"schema":"public","table":"people","ts_ms":1,"sluice_unavailable":["email"]}}"#.to_string(),
            // An unavailable column no policy names changes nothing.
            r#"{"op":"u","after":{"id":8,"email":"c@d.test","balance":4},"source":{"schema":"public","table":"people","ts_ms":1,"sluice_unavailable":["geom"]}}"#.to_string(),
            r#"{"op":"t","before":null,"after":null,"source":{"schema":"public","table":"people","ts_ms":1}}"#.to_string(),
        ];
        let out = router().process(&chunk(&lines), 0).unwrap();
        assert_eq!(out.summary.quarantined["unavailable_value"], 1);
        let table = out
            .outputs
            .iter()
            .find(|(sink, _)| *sink == 0)
            .map(|(_, b)| b)
            .expect("table rows");
        let ops = table
            .column_by_name("_op")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(ops.iter().flatten().collect::<Vec<_>>(), vec!["u", "t"]);
        let subjects = table
            .column_by_name("_subject")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(subjects.value(1), "", "a truncate has no subject");
    }

    const ORDERS: &str = r#"
table = "inventory.orders"
target = "orders"
subject = "customer"
token_domain = "customer"
[columns.customer]
action = "tokenize"
[columns.price]
action = "keep"
type = "decimal(10,2)"
[columns.order_date]
action = "keep"
type = "date"
[columns.placed_at]
action = "keep"
type = "timestamp"
[columns.legacy_ms]
action = "keep"
type = "timestamp"
unit = "ms"
[columns.doc]
action = "keep"
type = "string"
[columns.notes]
action = "drop"
"#;

    fn table_of(out: &Processed) -> &RecordBatch {
        out.outputs
            .iter()
            .find(|(sink, _)| *sink == 0)
            .map(|(_, b)| b)
            .expect("table rows")
    }

    /// A column's values as text (Arrow's display form).
    fn text_column(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
        let column = batch.column_by_name(name).unwrap();
        let formatter =
            sluice_connectors::arrow::util::display::ArrayFormatter::try_new(column.as_ref(), &Default::default())
                .unwrap();
        (0..column.len())
            .map(|i| column.is_valid(i).then(|| formatter.value(i).to_string()))
            .collect()
    }

    const ORDERS_SCHEMA: &str = r#"{"type":"struct","name":"s.inventory.orders.Envelope","fields":[{"type":"struct","optional":true,"field":"before","fields":[]},{"type":"struct","optional":true,"field":"after","name":"s.inventory.orders.Value","fields":[{"type":"int32","field":"customer"},{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"10"},"field":"price"},{"type":"int32","name":"io.debezium.time.Date","field":"order_date"},{"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"placed_at"},{"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"legacy_ms"},{"type":"string","field":"doc"}]}]}"#;

    fn wrapped(payload: &str) -> String {
        format!(r#"{{"schema":{ORDERS_SCHEMA},"payload":{payload}}}"#)
    }

    #[test]
    fn wrapped_events_are_read_by_their_schema() {
        let (_dir, router) = router_of(ORDERS, InputSettings::default());
        let lines = [
            wrapped(
                r#"{"op":"c","after":{"customer":1,"price":"MDk=","order_date":19905,"placed_at":1719835200123456,"doc":"x"},"source":{"db":"inventory","table":"orders","ts_ms":1719835200000}}"#,
            ),
            // The policy's `unit = "ms"` contradicts the schema's microseconds: never guessed.
            wrapped(
                r#"{"op":"c","after":{"customer":2,"legacy_ms":1719835200123456},"source":{"db":"inventory","table":"orders","ts_ms":1719835200000}}"#,
            ),
            // Base64 that is not a decimal's bytes.
            wrapped(
                r#"{"op":"c","after":{"customer":3,"price":"12.50"},"source":{"db":"inventory","table":"orders","ts_ms":1719835200000}}"#,
            ),
        ];
        let out = router.process(&chunk(&lines), 0).unwrap();
        let table = table_of(&out);
        assert_eq!(table.num_rows(), 1);
        assert_eq!(text_column(table, "price"), vec![Some("123.45".into())]);
        assert_eq!(text_column(table, "order_date"), vec![Some("2024-07-01".into())]);
        assert_eq!(
            text_column(table, "placed_at"),
            vec![Some("2024-07-01T12:00:00.123456Z".into())]
        );
        assert_eq!(out.summary.quarantined["schema_mismatch"], 1);
        assert_eq!(out.summary.quarantined["type_mismatch"], 1);
    }

    #[test]
    fn placeholders_digit_strings_control_records_and_bad_times() {
        let (_dir, router) = router_of(ORDERS, InputSettings::default());
        let event = |after: &str, before: &str| {
            format!(
                r#"{{"op":"u","before":{before},"after":{after},"source":{{"db":"inventory","table":"orders","ts_ms":1719835200000}}}}"#
            )
        };
        let lines = [
            // Unchanged TOAST value: taken from the before image…
            event(r#"{"customer":1,"doc":"__debezium_unavailable_value"}"#, r#"{"customer":1,"doc":"old text"}"#),
            // …or, without one, quarantined — never written as if it were the value.
            event(r#"{"customer":2,"doc":"__debezium_unavailable_value"}"#, "null"),
            // A binary column's placeholder is its base64; an array's holds the placeholder.
            event(r#"{"customer":3,"doc":"X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="}"#, "null"),
            event(r#"{"customer":3,"doc":["__debezium_unavailable_value"]}"#, "null"),
            // A column the policy drops without deriving anything: its placeholder harms nothing.
            event(r#"{"customer":3,"notes":"__debezium_unavailable_value"}"#, "null"),
            // A 16-digit string in a date column is not an epoch.
            event(r#"{"customer":4,"order_date":"4111111111111111"}"#, "null"),
            // A number there is (days, by magnitude), and a date text is a date.
            event(r#"{"customer":5,"order_date":19905}"#, "null"),
            event(r#"{"customer":6,"order_date":"2024-07-01"}"#, "null"),
            // Far-future values are refused, not written into the log's statistics.
            event(r#"{"customer":7,"placed_at":"+55969-09-28T00:00:00Z"}"#, "null"),
            r#"{"status":"BEGIN","id":"571","ts_ms":1}"#.to_string(),
            r#"{"ts_ms":1588252618953}"#.to_string(),
            r#"{"op":"c","after":{"customer":8},"source":{"db":"inventory","table":"orders","ts_ms":1704067200000000000}}"#.to_string(),
            // Two values for one column: readers disagree on which counts.
            event(r#"{"customer":9,"doc":"a","doc":"b"}"#, "null"),
            r#"{"op":"c","op":"d","after":{"customer":10},"source":{"db":"inventory","table":"orders","ts_ms":1}}"#.to_string(),
        ];
        let out = router.process(&chunk(&lines), 0).unwrap();
        let table = table_of(&out);
        assert_eq!(text_column(table, "doc")[0], Some("old text".into()));
        assert_eq!(
            text_column(table, "order_date")[2..],
            [Some("2024-07-01".into()), Some("2024-07-01".into())]
        );
        assert_eq!(table.num_rows(), 4);
        assert_eq!(out.summary.quarantined["unavailable_value"], 3);
        assert_eq!(out.summary.quarantined["type_mismatch"], 2);
        assert_eq!(out.summary.quarantined["bad_timestamp"], 1);
        assert_eq!(out.summary.quarantined["malformed_json"], 2);
        assert_eq!(out.summary.control_records["transaction_begin"], 1);
        assert_eq!(out.summary.control_records["heartbeat"], 1);
        assert!(!out.summary.quarantined.contains_key("control_record"));

        let (_dir, router) = router_of(
            ORDERS,
            InputSettings {
                control_records: ControlRecords::Quarantine,
                ..InputSettings::default()
            },
        );
        let out = router.process(&chunk(&lines[9..11]), 0).unwrap();
        assert_eq!(out.summary.quarantined["control_record"], 2);
    }

    #[test]
    fn databases_are_told_apart_and_never_merged_silently() {
        let qualified = POLICY
            .replace("table = \"public.people\"", "table = \"crm.public.people\"")
            .replace("target = \"people\"", "target = \"crm_people\"");
        let (_dir, router) = router_of_all(&[&qualified, POLICY], InputSettings::default());
        let event = |db: &str, id: u32| {
            format!(
                r#"{{"op":"c","after":{{"id":{id},"balance":1}},"source":{{"db":"{db}","schema":"public","table":"people","ts_ms":1}}}}"#
            )
        };
        let lines = [
            event("crm", 1),
            event("billing", 2),
            event("billing", 3),
            // Another database for the table named without one: not merged in.
            event("archive", 4),
        ];
        let out = router.process(&chunk(&lines), 0).unwrap();
        assert_eq!(out.summary.rows_written["crm_people"], 1);
        assert_eq!(out.summary.rows_written["people"], 2);
        assert_eq!(out.summary.quarantined["ambiguous_table"], 1);
        let people = out.outputs.iter().find(|(sink, _)| *sink == 1).map(|(_, b)| b).unwrap();
        assert_eq!(text_column(people, "_source_db"), vec![Some("billing".into()); 2]);
        // A table the lake already holds rows of keeps its database after a restart.
        let (_dir, router) = router_of_all(&[POLICY], InputSettings::default());
        router.bind_databases([(0, "archive".to_string())]);
        let out = router.process(&chunk(&lines[1..]), 0).unwrap();
        assert_eq!(out.summary.rows_written["people"], 1);
        assert_eq!(out.summary.quarantined["ambiguous_table"], 2);
        // A schema named like its database is still a schema (PostgreSQL db `public`).
        let (_dir, router) = router_of_all(&[POLICY], InputSettings::default());
        let out = router
            .process(&chunk(&[event("public", 5), event("other", 6)]), 0)
            .unwrap();
        assert_eq!(out.summary.rows_written["people"], 1);
        assert_eq!(out.summary.quarantined["ambiguous_table"], 1);
    }

    #[test]
    fn is_present_is_unknown_where_the_image_does_not_say() {
        let event = |op: &str, image: &str| {
            let (before, after) = if op == "d" { (image, "null") } else { ("null", image) };
            format!(
                r#"{{"op":"{op}","before":{before},"after":{after},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
            )
        };
        let lines = [
            event("c", r#"{"id":1,"email":"a@b.test","balance":1}"#),
            event("c", r#"{"id":2,"email":null,"balance":1}"#),
            // The image lacks the column: unknown, not absent.
            event("u", r#"{"id":3,"balance":1}"#),
            // A key-only delete image (PostgreSQL's default replica identity): unknown.
            event("d", r#"{"id":4,"email":null,"balance":null}"#),
            event("d", r#"{"id":5,"email":"e@b.test","balance":1}"#),
        ];
        let out = router().process(&chunk(&lines), 0).unwrap();
        let table = table_of(&out);
        let has_email = table
            .column_by_name("has_email")
            .unwrap()
            .as_any()
            .downcast_ref::<BooleanArray>()
            .unwrap();
        let got: Vec<Option<bool>> = has_email.iter().collect();
        assert_eq!(got, vec![Some(true), Some(false), None, None, Some(true)]);
    }

    #[test]
    fn an_event_that_panics_is_quarantined_and_the_rest_goes_on() {
        let lines = [
            r#"{"op":"c","after":{"id":1,"balance":1},"source":{"schema":"public","table":"people","ts_ms":1}}"#
                .to_string(),
            format!(
                r#"{{"op":"c","after":{{"id":2,"balance":2,"x":"{PANIC_FOR_TESTS}"}},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
            ),
            r#"{"op":"c","after":{"id":3,"balance":3},"source":{"schema":"public","table":"people","ts_ms":1}}"#
                .to_string(),
        ];
        let chunk = chunk(&lines);
        assert!(catching(|| router().process(&chunk, 0)).is_err());
        let out = router().process_isolating(&chunk, 0).unwrap();
        assert_eq!(out.summary.events_read, 3);
        assert_eq!(out.summary.quarantined["internal_error"], 1);
        assert_eq!(out.summary.rows_written["people"], 2);
        assert_eq!(out.last_offset, chunk.last_offset());
    }

    /// Policies over tables of the real Debezium corpus (fixtures/debezium), touching every
    /// value path: tokens, vault, decimals, timestamps, dates, derived and generalized columns.
    const FUZZ_POLICIES: [&str; 3] = [
        r#"
table = "public.payment"
target = "payment"
subject = "customer_id"
token_domain = "customer"
[columns.customer_id]
action = "tokenize"
[columns.amount]
action = "keep"
type = "decimal(5,2)"
derive = [{ name = "amount_band", fn = "bucket", edges = [0, 5] }]
[columns.payment_date]
action = "keep"
type = "timestamp"
[columns.staff_id]
action = "keep"
type = "int64"
"#,
        r#"
table = "inventory.customers"
target = "customers"
subject = "id"
token_domain = "customer"
[columns.id]
action = "tokenize"
[columns.email]
action = "vault"
derive = [{ name = "has_email", fn = "is_present" }, { name = "email_domain", fn = "email_domain" }]
[columns.first_name]
action = "encrypt"
[columns.last_name]
action = "generalize"
fn = "prefix"
length = 1
"#,
        r#"
table = "public.film"
target = "film"
subject = "film_id"
token_domain = "film"
[columns.film_id]
action = "tokenize"
[columns.rental_rate]
action = "keep"
type = "decimal(4,2)"
[columns.last_update]
action = "generalize"
fn = "month"
[columns.release_year]
action = "keep"
type = "int64"
[columns.special_features]
action = "keep"
type = "string"
[columns.title]
action = "drop"
derive = [{ name = "title_length", fn = "length" }]
[columns.length]
action = "keep"
type = "float64"
"#,
    ];

    /// Lines of the real corpus, the seeds of the fuzzing below.
    fn corpus() -> &'static [Vec<u8>] {
        static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
        CORPUS.get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/debezium");
            let mut lines = Vec::new();
            let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "jsonl")) {
                let data = std::fs::read(f).unwrap();
                lines.extend(
                    data.split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .map(<[u8]>::to_vec),
                );
            }
            assert!(lines.len() > 100, "the corpus is there");
            lines
        })
    }

    /// Fragments that tend to break decoders, spliced into real events.
    const SPLICES: &[&str] = &[
        r#""__debezium_unavailable_value""#,
        "99999999999999999999999999999999",
        "-9223372036854775808",
        "1e999",
        "null",
        "{",
        "[",
        "}",
        r#""\ud800""#,
        r#""op":"d","#,
        r#""ts_ms":1704067200000000000,"#,
        r#""ts_ms":0,"#,
        r#""MDk=""#,
        r#""AQEBAQEBAQEBAQEBAQEBAQE=""#,
        r#"{"scale":40,"value":"AQ=="}"#,
        r#""+55969-09-28T00:00:00Z""#,
        r#""4111111111111111""#,
        "\u{0}",
        "\u{feff}",
        r#""name":"io.debezium.time.NanoTimestamp","#,
        r#""name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"40"},"#,
        r#""name":"io.debezium.data.VariableScaleDecimal","#,
    ];

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(usize, u8),
        Splice(usize, usize),
        Delete(usize, usize),
        Truncate(usize),
    }

    fn mutate(line: &[u8], mutations: &[Mutation]) -> Vec<u8> {
        let mut out = line.to_vec();
        for m in mutations {
            let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
            match *m {
                Mutation::Flip(i, b) if !out.is_empty() => {
                    let i = i % out.len();
                    out[i] ^= b.max(1);
                }
                Mutation::Splice(i, s) => {
                    let i = at(i, out.len());
                    let splice = SPLICES[s % SPLICES.len()].as_bytes();
                    out.splice(i..i, splice.iter().copied());
                }
                Mutation::Delete(i, n) if !out.is_empty() => {
                    let i = i % out.len();
                    out.drain(i..(i + n % 64).min(out.len()));
                }
                Mutation::Truncate(i) => out.truncate(at(i, out.len())),
                _ => {}
            }
        }
        out
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
            (any::<usize>(), any::<usize>()).prop_map(|(i, s)| Mutation::Splice(i, s)),
            (any::<usize>(), any::<usize>()).prop_map(|(i, n)| Mutation::Delete(i, n)),
            any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    /// Mutation fuzzing of the decode + sanitize path, seeded by the real corpus: no event
    /// panics, and every event is accounted for exactly once (a row, a quarantine entry, a
    /// control record, a tombstone, an unknown table or an erased subject's row). Cases per run:
    /// `SLUICE_FUZZ_CASES` (CI runs the default; longer runs are recorded in the README).
    #[test]
    fn mutated_real_events_never_panic_and_are_all_accounted_for() {
        let (_dir, router) = router_of_all(&FUZZ_POLICIES, InputSettings::default());
        let cases = std::env::var("SLUICE_FUZZ_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(2000);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let corpus = corpus();
        let started = std::time::Instant::now();
        let lines = proptest::collection::vec((0..corpus.len(), proptest::collection::vec(mutation(), 0..4)), 1..24);
        runner
            .run(&lines, |picks| {
                let events: Vec<Vec<u8>> = picks.iter().map(|(i, m)| mutate(&corpus[*i], m)).collect();
                let events: Vec<Vec<u8>> = events
                    .into_iter()
                    .map(|e| e.into_iter().filter(|b| *b != b'\n').collect())
                    .collect();
                let mut chunk = Chunk::new(Arc::from("fuzz.jsonl"), events.len());
                let mut offset = 0u64;
                for e in &events {
                    offset += e.len() as u64 + 1;
                    chunk.push(
                        e,
                        LineEnd {
                            end_offset: offset,
                            len: e.len(),
                            terminated: true,
                        },
                    );
                }
                let out = match catching(|| router.process(&chunk, 0)) {
                    Ok(result) => result.map_err(|e| TestCaseError::fail(format!("error: {e}")))?,
                    Err(_) => return Err(TestCaseError::fail("panicked")),
                };
                let s = &out.summary;
                let non_blank = events.iter().filter(|e| !e.iter().all(u8::is_ascii_whitespace)).count() as u64;
                let accounted = s.rows_written.values().sum::<u64>()
                    + s.quarantined.values().sum::<u64>()
                    + s.control_records.values().sum::<u64>()
                    + s.unknown_tables.values().sum::<u64>()
                    + s.tombstones
                    + s.erased_subject_rows;
                prop_assert_eq!(s.events_read, non_blank);
                prop_assert_eq!(accounted, non_blank, "every event exactly once: {:?}", s);
                Ok(())
            })
            .unwrap();
        eprintln!(
            "fuzzed {cases} chunks of mutated corpus events clean in {:.1?}",
            started.elapsed()
        );
    }

    /// The Avro schema Confluent's converter registers for a Connect schema (records named
    /// apart), for the benchmark below.
    fn avro_of_connect(connect: &serde_json::Value, names: &mut u32) -> serde_json::Value {
        use serde_json::json;
        let avro = match connect["type"].as_str().unwrap_or_default() {
            "struct" => {
                *names += 1;
                let name = format!("r{names}");
                let fields: Vec<serde_json::Value> = connect["fields"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        let mut field = json!({"name": f["field"], "type": avro_of_connect(f, names)});
                        if f["optional"] == true {
                            field["default"] = serde_json::Value::Null;
                        }
                        field
                    })
                    .collect();
                json!({"type": "record", "name": name, "fields": fields})
            }
            t => {
                let primitive = match t {
                    "int8" | "int16" | "int32" => "int",
                    "int64" => "long",
                    "boolean" => "boolean",
                    _ => "string",
                };
                match connect["name"].as_str() {
                    Some(name) => json!({"type": primitive, "connect.name": name}),
                    None => json!(primitive),
                }
            }
        };
        if connect["optional"] == true {
            json!(["null", avro])
        } else {
            avro
        }
    }

    /// Decode cost per event of the same generated events bare, wrapped with their Connect
    /// schema, and as Confluent-framed Avro, through the whole sanitizer (demo policies).
    /// A benchmark, not a test:
    /// `cargo test -p sluice --config 'profile.dev.package."*".opt-level=3' -- --ignored decode_cost --nocapture`
    #[test]
    #[ignore = "a benchmark; run explicitly"]
    fn decode_cost_bare_wrapped_avro() {
        use sluice_connectors::avro::{RegistryAuth, RegistrySettings};
        let events: usize = std::env::var("SLUICE_BENCH_EVENTS")
            .ok()
            .and_then(|e| e.parse().ok())
            .unwrap_or(50_000);
        let dir = tempfile::tempdir().unwrap();
        let read = |wrapped: bool| {
            let path = dir.path().join(format!("e-{wrapped}.jsonl"));
            crate::generate::write_events(&path, events as u64, 7, wrapped, 24, 0).unwrap();
            std::fs::read(&path)
                .unwrap()
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>()
        };
        let (bare, wrapped) = (read(false), read(true));
        let registry = Arc::new(
            SchemaRegistry::new(RegistrySettings {
                url: "http://127.0.0.1:9".into(),
                auth: RegistryAuth::None,
                ca_file: None,
            })
            .unwrap(),
        );
        let mut ids: HashMap<String, (u32, apache_avro::Schema)> = HashMap::new();
        let mut names = 0;
        let avro: Vec<Vec<u8>> = wrapped
            .iter()
            .map(|line| {
                let event: serde_json::Value = serde_json::from_slice(line).unwrap();
                let key = event["schema"].to_string();
                let next = ids.len() as u32 + 1;
                let (id, schema) = ids.entry(key).or_insert_with(|| {
                    let text = avro_of_connect(&event["schema"], &mut names).to_string();
                    registry.preload(next, &text).unwrap();
                    (next, apache_avro::Schema::parse_str(&text).unwrap())
                });
                let value = apache_avro::types::Value::from(event["payload"].clone())
                    .resolve(schema)
                    .unwrap();
                let mut message = vec![0];
                message.extend_from_slice(&id.to_be_bytes());
                message.extend(apache_avro::to_avro_datum(schema, value).unwrap());
                message
            })
            .collect();
        let policies: Vec<String> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/demo"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        let policies: Vec<&str> = policies.iter().map(String::as_str).collect();
        let (_dir, mut router) = router_of_all(&policies, InputSettings::default());
        let measure = |router: &Router, name: &str, lines: &[Vec<u8>]| {
            let bytes: usize = lines.iter().map(Vec::len).sum();
            let started = std::time::Instant::now();
            let mut rows = 0;
            for part in lines.chunks(4096) {
                let mut chunk = Chunk::new(Arc::from("bench"), part.len());
                let mut offset = 0;
                for l in part {
                    offset += l.len() as u64 + 1;
                    chunk.push(
                        l,
                        LineEnd {
                            end_offset: offset,
                            len: l.len(),
                            terminated: true,
                        },
                    );
                }
                let out = router.process(&chunk, 0).unwrap();
                rows += out.summary.rows_written.values().sum::<u64>();
                assert!(
                    out.summary.quarantined.is_empty(),
                    "{name}: {:?}",
                    out.summary.quarantined
                );
            }
            let us = started.elapsed().as_secs_f64() * 1e6 / lines.len() as f64;
            eprintln!(
                "{name:<8} {:>7.2} µs/event  {:>6} B/event  {rows} rows",
                us,
                bytes / lines.len()
            );
            us
        };
        // Warm the key store's subject keys first, so each variant pays the same.
        measure(&router, "warm-up", &bare);
        let b = measure(&router, "bare", &bare);
        let w = measure(&router, "wrapped", &wrapped);
        router.registry = Some(registry);
        let a = measure(&router, "avro", &avro);
        eprintln!("wrapped/bare {:.2}  avro/bare {:.2}", w / b, a / b);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn default_deny_holds_for_random_extra_columns(
            extra in proptest::collection::btree_map("[a-z_]{1,12}", "[A-Za-z0-9@. -]{10,24}", 1..6),
        ) {
            prop_assume!(extra.keys().all(|k| !["id", "email", "balance"].contains(&k.as_str())));
            let mut after = serde_json::json!({"id": 7, "email": "a@b.test", "balance": 12});
            for (k, v) in &extra {
                after[k.as_str()] = serde_json::Value::from(v.as_str());
            }
            let event = serde_json::json!({"op": "c", "after": after, "source": {"schema": "public", "table": "people", "ts_ms": 1}});
            let out = router().process(&chunk(&[event.to_string()]), 0).unwrap();
            let table = out.outputs.iter().find(|(sink, _)| *sink == 0).map(|(_, b)| b).expect("a table row");
            let names: Vec<&str> = table.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
            prop_assert_eq!(names, vec!["id_token", "has_email", "balance", "_op", "_subject", "_source_ts", "_position", "_ingested_at", "_date", "_source_db"]);
            for (k, v) in &extra {
                for (_, batch) in &out.outputs {
                    prop_assert!(!contains(batch, v), "value of extra column {} reached an output", k);
                }
                prop_assert_eq!(out.summary.dropped_columns["public.people"][k], 1);
            }
        }
    }
}
