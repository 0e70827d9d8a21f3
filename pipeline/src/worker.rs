//! One unit of work: a chunk of lines from one stream, decoded, routed by table, sanitized
//! column-wise, and turned into output batches for each sink. Runs on the worker pool.

use std::borrow::Cow;
use std::collections::HashMap;

// Column and table names are looked up for every event: a fast non-cryptographic hash. Keys
// come from the source schema, so flooding it would need control of the database.
use rustc_hash::FxHashMap;
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch, StringArray};
use arrow_schema::ArrowError;
use sluice_connectors::debezium::{self, value_text};
use sluice_connectors::file::LineEnd;
use sluice_connectors::keystore::KeyStore;
use sluice_connectors::SourcePosition;
use sluice_transforms::crypto::DataKey;
use sluice_transforms::engine::TransformError;
use sluice_transforms::vault::vault_schema;
use sluice_transforms::{RawBatchBuilder, Sensitive, TableTransform};

use crate::config::UnknownTables;
use crate::quarantine::{QuarantineBuilder, Rejection};
use crate::summary::Summary;

/// Lines of one stream, read in order.
pub struct Chunk {
    pub seq: u64,
    pub stream: Arc<str>,
    pub data: Vec<u8>,
    /// (start, end) of each line in `data`, and where it ended in the stream.
    pub lines: Vec<(usize, usize, LineEnd)>,
    /// Positions the source keeps beside the stream's offset as of the last line (committed
    /// with it; e.g. a Kinesis sequence number).
    pub attached: Vec<SourcePosition>,
    /// Whether the last line ends a source transaction: the sink commits only after such a
    /// chunk, so a PostgreSQL transaction is never split across lake commits.
    pub boundary: bool,
}

impl Chunk {
    pub fn new(stream: Arc<str>, events: usize) -> Self {
        Self {
            seq: 0,
            stream,
            data: Vec::with_capacity(events.min(4096) * 256),
            lines: Vec::with_capacity(events),
            attached: Vec::new(),
            boundary: true,
        }
    }

    pub fn push(&mut self, line: &[u8], end: LineEnd) {
        let start = self.data.len();
        self.data.extend_from_slice(line);
        self.lines.push((start, self.data.len(), end));
    }

    pub fn last_offset(&self) -> u64 {
        self.lines.last().map(|l| l.2.end_offset).unwrap_or(0)
    }
    fn first_offset(&self) -> u64 {
        self.lines.first().map(|l| l.2.end_offset).unwrap_or(0)
    }
}

/// Output of a chunk, to be written in sequence order.
pub struct Processed {
    pub seq: u64,
    pub stream: Arc<str>,
    pub last_offset: u64,
    pub attached: Vec<SourcePosition>,
    pub boundary: bool,
    /// (sink index, rows) — see [`Sinks`](crate::runtime) for the numbering.
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
}

/// Everything the workers share; immutable during a run.
pub struct Router {
    pub transforms: Vec<TableTransform>,
    /// Qualified source table → index into `transforms`.
    tables: FxHashMap<String, usize>,
    /// Per table: source column → slot in the raw batch.
    columns: Vec<FxHashMap<String, usize>>,
    pub keys: Arc<KeyStore>,
    pub quarantine_key: Arc<DataKey>,
    pub unknown_tables: UnknownTables,
    pub max_event_bytes: usize,
    /// Per sink: stream → offset committed before this run (for skipping re-read rows).
    pub committed: Vec<HashMap<String, i64>>,
    /// Per table, its sinks (one per lake format); the first is its primary (summary, publish).
    table_sinks: Vec<Vec<usize>>,
}

impl Router {
    pub fn new(
        transforms: Vec<TableTransform>,
        keys: Arc<KeyStore>,
        quarantine_key: Arc<DataKey>,
        unknown_tables: UnknownTables,
        max_event_bytes: usize,
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
        Self {
            transforms,
            tables,
            columns,
            keys,
            quarantine_key,
            unknown_tables,
            max_event_bytes,
            committed,
            table_sinks: (0..transforms_len)
                .map(|t| (t * formats..(t + 1) * formats).collect())
                .collect(),
        }
    }

    pub fn vault_sink(&self) -> usize {
        self.transforms.len() * self.formats()
    }

    pub fn quarantine_sink(&self) -> usize {
        self.vault_sink() + 1
    }

    fn formats(&self) -> usize {
        self.table_sinks.first().map_or(1, Vec::len)
    }

    /// The table whose primary sink `sink` is (its rows are counted and published once).
    pub fn primary_of(&self, sink: usize) -> Option<usize> {
        let formats = self.formats();
        (sink < self.vault_sink() && sink.is_multiple_of(formats)).then_some(sink / formats)
    }

    pub fn process(&self, mut chunk: Chunk, ingested_at_us: i64) -> Result<Processed, WorkError> {
        let mut summary = Summary::default();
        let n_tables = self.transforms.len();
        let mut builders: Vec<Option<RawBatchBuilder>> = (0..n_tables).map(|_| None).collect();
        let mut row_lines: Vec<Vec<usize>> = vec![Vec::new(); n_tables];
        let mut scratch: Vec<Vec<Option<Cow<'_, str>>>> = self.columns.iter().map(|c| vec![None; c.len()]).collect();
        let mut dropped: Vec<FxHashMap<String, u64>> = vec![FxHashMap::default(); n_tables];
        let mut quarantine = QuarantineBuilder::new(self.quarantine_key.clone());
        let mut position = String::new();
        let mut table_name = String::new();

        for (line_no, &(start, end, line_end)) in chunk.lines.iter().enumerate() {
            let line = &chunk.data[start..end];
            write_position(&mut position, &chunk.stream, line_end.end_offset);
            let position = position.as_str();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            summary.events_read += 1;
            let mut quarantined = |summary: &mut Summary, reason: &'static str, detail: &str, table: Option<&str>| {
                *summary.quarantined.entry(reason.to_string()).or_default() += 1;
                quarantine
                    .push(
                        Rejection {
                            reason,
                            detail,
                            table,
                            column: None,
                        },
                        position,
                        line,
                        line_end.len,
                    )
                    .map_err(|_| WorkError::Quarantine {
                        position: position.to_string(),
                    })
            };
            if line_end.truncated(self.max_event_bytes) {
                quarantined(
                    &mut summary,
                    "oversized_event",
                    "event larger than source.max_event_bytes (stored truncated)",
                    None,
                )?;
                continue;
            }
            let event = match debezium::decode(line) {
                Ok(Some(e)) => e,
                Ok(None) => {
                    summary.tombstones += 1;
                    continue;
                }
                Err(e) => {
                    quarantined(&mut summary, e.reason(), &e.to_string(), None)?;
                    continue;
                }
            };
            event.qualified_table(&mut table_name);
            let Some(&t) = self.tables.get(table_name.as_str()) else {
                *summary.unknown_tables.entry(table_name.clone()).or_default() += 1;
                if self.unknown_tables == UnknownTables::Quarantine {
                    quarantined(
                        &mut summary,
                        "unknown_table",
                        "no policy names this table",
                        Some(&table_name),
                    )?;
                }
                continue;
            };
            let slots = &self.columns[t];
            if let Some(column) = event.unavailable.iter().find(|c| slots.contains_key(c.as_ref())) {
                *summary.quarantined.entry("unavailable_value".to_string()).or_default() += 1;
                quarantine
                    .push(
                        Rejection {
                            reason: "unavailable_value",
                            detail: "the capture could not carry a column the policy names (unsupported PostgreSQL type, or an unchanged TOAST value without the old row)",
                            table: Some(&table_name),
                            column: Some(column),
                        },
                        position,
                        line,
                        line_end.len,
                    )
                    .map_err(|_| WorkError::Quarantine {
                        position: position.to_string(),
                    })?;
                continue;
            }
            let values = &mut scratch[t];
            let mut malformed = false;
            for (column, raw) in event.image.0 {
                match slots.get(column.as_ref()) {
                    // The one place a raw value is unwrapped: straight into the table's raw batch.
                    Some(&slot) => match value_text(raw) {
                        Ok(v) => values[slot] = v.map(Sensitive::into_inner),
                        Err(_) => malformed = true,
                    },
                    None => match dropped[t].get_mut(column.as_ref()) {
                        Some(n) => *n += 1,
                        None => {
                            dropped[t].insert(column.into_owned(), 1);
                        }
                    },
                }
            }
            if malformed {
                values.iter_mut().for_each(|v| *v = None);
                quarantined(
                    &mut summary,
                    "malformed_json",
                    "a column value is not valid JSON",
                    Some(&table_name),
                )?;
                continue;
            }
            builders[t]
                .get_or_insert_with(|| RawBatchBuilder::new(values.len()))
                .push(event.op, event.event_ms, position, values);
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
                    )
                    .map_err(|_| WorkError::Quarantine {
                        position: position.clone(),
                    })?;
            }
            if out.table.num_rows() > 0 {
                for &sink in &self.table_sinks[t] {
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
                summary
                    .dropped_columns
                    .insert(self.transforms[t].policy().table.clone(), cols.into_iter().collect());
            }
        }
        let outputs = self.skip_committed(&chunk, outputs, &mut summary)?;
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
            attached: std::mem::take(&mut chunk.attached),
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
    use sluice_connectors::file::LineEnd;
    use sluice_connectors::keystore::{KeyStoreLocation, MasterKey};
    use sluice_transforms::crypto::Tokenizer;
    use sluice_transforms::Policy;
    use std::path::Path;
    use std::sync::OnceLock;

    const POLICY: &str = r#"
table = "public.people"
target = "people"
subject = "id"
token_domain = "person"
[columns.id]
action = "tokenize"
[columns.email]
action = "vault"
derive = [{ name = "has_email", fn = "is_present" }]
[columns.balance]
action = "keep"
type = "int64"
"#;

    fn router() -> &'static Router {
        static ROUTER: OnceLock<(tempfile::TempDir, Router)> = OnceLock::new();
        &ROUTER
            .get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let master = MasterKey::from_hex(&"ab".repeat(32)).unwrap();
                let keys = Arc::new(
                    KeyStore::open(&KeyStoreLocation::Sqlite(dir.path().join("keys.db")), master, 100).unwrap(),
                );
                let policy = Policy::from_toml(Path::new("people.toml"), POLICY).unwrap();
                let transform = TableTransform::new(policy, &Tokenizer::new(&[1; 32]));
                let quarantine_key = keys.system_key("quarantine").unwrap();
                let router = Router::new(
                    vec![transform],
                    keys,
                    quarantine_key,
                    UnknownTables::Skip,
                    1 << 20,
                    vec![HashMap::new(); 3],
                    1,
                );
                (dir, router)
            })
            .1
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
    fn a_policy_column_the_capture_could_not_carry_quarantines_the_event_and_truncates_land() {
        let lines = [
            // `email` is named by the policy but was unavailable: never a row with it missing.
            r#"{"op":"u","after":{"id":7,"balance":3},"source":{"schema":"public","table":"people","ts_ms":1,"sluice_unavailable":["email"]}}"#.to_string(),
            // An unavailable column no policy names changes nothing.
            r#"{"op":"u","after":{"id":8,"email":"c@d.test","balance":4},"source":{"schema":"public","table":"people","ts_ms":1,"sluice_unavailable":["geom"]}}"#.to_string(),
            r#"{"op":"t","before":null,"after":null,"source":{"schema":"public","table":"people","ts_ms":1}}"#.to_string(),
        ];
        let out = router().process(chunk(&lines), 0).unwrap();
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
            let out = router().process(chunk(&[event.to_string()]), 0).unwrap();
            let table = out.outputs.iter().find(|(sink, _)| *sink == 0).map(|(_, b)| b).expect("a table row");
            let names: Vec<&str> = table.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
            prop_assert_eq!(names, vec!["id_token", "has_email", "balance", "_op", "_subject", "_source_ts", "_position", "_ingested_at", "_date"]);
            for (k, v) in &extra {
                for (_, batch) in &out.outputs {
                    prop_assert!(!contains(batch, v), "value of extra column {} reached an output", k);
                }
                prop_assert_eq!(out.summary.dropped_columns["public.people"][k], 1);
            }
        }
    }
}
