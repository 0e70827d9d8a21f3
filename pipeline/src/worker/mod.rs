//! One unit of work: a chunk of lines from one stream, decoded, routed by table, sanitized
//! column-wise, and turned into output batches for each sink. Runs on the worker pool.

mod decode;
mod route;

use decode::{ChunkDecoder, DecodedChunk};
use route::{Expected, Route, Sealing};

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
use sluice_connectors::debezium::{value_text, Event};
use sluice_connectors::keystore::KeyStore;
use sluice_connectors::source::Chunk;
use sluice_connectors::SourcePosition;
use sluice_transforms::actions::{Action, KeepType};
use sluice_transforms::crypto::{DataKey, Token};
use sluice_transforms::engine::TransformError;
use sluice_transforms::functions::IntegerTime;
use sluice_transforms::keys::{dropped_by_erasure, KeyError, KeyProvider};
use sluice_transforms::vault::vault_schema;
use sluice_transforms::{Policy, Sensitive, TableTransform};

use crate::config::InputSettings;
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

impl Processed {
    /// A chunk's outputs, with the chunk's place in its stream.
    fn of(chunk: &Chunk, outputs: Vec<(usize, RecordBatch)>, summary: Summary) -> Self {
        Processed {
            seq: chunk.seq,
            stream: chunk.stream.clone(),
            last_offset: chunk.last_offset(),
            attached: chunk.attached.clone(),
            boundary: chunk.boundary,
            outputs,
            summary,
        }
    }
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
        sinks: SinkSet,
    ) -> Self {
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
            sinks,
        }
    }

    pub fn vault_sink(&self) -> usize {
        self.sinks.vault()
    }

    pub fn quarantine_sink(&self) -> usize {
        self.sinks.quarantine()
    }

    /// Whether `sink` is a current-state table (given the log's rows, merged later).
    pub fn is_current(&self, sink: usize) -> bool {
        matches!(self.sinks.id(sink), crate::sinks::SinkId::Current { .. })
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
        let decoded = ChunkDecoder::decode(self, chunk, rejected)?;
        let (outputs, mut summary, dropped) = self.sanitize(chunk, decoded, ingested_at_us)?;
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
        Ok(Processed::of(chunk, outputs, summary))
    }

    /// Runs each table's policy over its raw batch (column-wise): the output batches per sink,
    /// the vault's rows, and the quarantine's (rows the policy refused join it here).
    #[allow(clippy::type_complexity)]
    fn sanitize(
        &self,
        chunk: &Chunk,
        mut decoded: DecodedChunk,
        ingested_at_us: i64,
    ) -> Result<(Vec<(usize, RecordBatch)>, Summary, Vec<FxHashMap<String, u64>>), WorkError> {
        let mut position = String::new();
        let mut outputs = Vec::new();
        let mut vault_batches = Vec::new();
        for (t, builder) in std::mem::take(&mut decoded.builders).into_iter().enumerate() {
            let Some(mut builder) = builder else { continue };
            let transform = &self.transforms[t];
            let raw = builder.finish();
            let out = transform
                .apply(&raw, &*self.keys, ingested_at_us)
                .map_err(|source| WorkError::Transform {
                    table: transform.policy().table.clone(),
                    position: format!("{}:{}", chunk.stream, chunk.last_offset()),
                    source,
                })?;
            decoded.summary.erased_subject_rows += out.erased_rows as u64;
            for reject in &out.rejects {
                let line_no = decoded.row_lines[t][reject.row];
                let (start, end, line_end) = chunk.lines[line_no];
                write_position(&mut position, &chunk.stream, line_end.end_offset);
                let sealing = match reject.subject {
                    Some(token) => self.sealing_of(token, raw.event_ms.value(reject.row), t, &position)?,
                    None => Sealing::Unknown,
                };
                if matches!(sealing, Sealing::Erased) {
                    decoded.summary.erased_subject_rows += 1;
                    continue;
                }
                let rejection = Rejection {
                    reason: reject.code,
                    detail: reject.reason,
                    table: Some(&transform.policy().table),
                    column: Some(&reject.column),
                };
                decoded.reject(rejection, &position, &chunk.data[start..end], line_end, sealing.seal())?;
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
        if let Some(q) = decoded.quarantine.finish(ingested_at_us) {
            outputs.push((self.quarantine_sink(), q));
        }
        Ok((outputs, decoded.summary, decoded.dropped))
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
        Ok(Processed::of(chunk, outputs, summary))
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
mod tests;
