//! One unit of work: a chunk of lines from one stream, decoded, routed by table, sanitized
//! column-wise, and turned into output batches for each sink. Runs on the worker pool.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch, StringArray};
use arrow_schema::ArrowError;
use sluice_connectors::debezium::{self, value_text};
use sluice_connectors::file::LineEnd;
use sluice_connectors::keystore::KeyStore;
use sluice_transforms::crypto::DataKey;
use sluice_transforms::engine::TransformError;
use sluice_transforms::vault::vault_schema;
use sluice_transforms::{RawBatchBuilder, TableTransform};

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
}

impl Chunk {
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
}

/// Everything the workers share; immutable during a run.
pub struct Router {
    pub transforms: Vec<TableTransform>,
    /// Qualified source table → index into `transforms`.
    tables: HashMap<String, usize>,
    /// Per table: source column → slot in the raw batch.
    columns: Vec<HashMap<String, usize>>,
    pub keys: Arc<KeyStore>,
    pub quarantine_key: Arc<DataKey>,
    pub unknown_tables: UnknownTables,
    pub max_event_bytes: usize,
    /// Per sink: stream → offset committed before this run (for skipping re-read rows).
    pub committed: Vec<HashMap<String, i64>>,
}

impl Router {
    pub fn new(
        transforms: Vec<TableTransform>,
        keys: Arc<KeyStore>,
        quarantine_key: Arc<DataKey>,
        unknown_tables: UnknownTables,
        max_event_bytes: usize,
        committed: Vec<HashMap<String, i64>>,
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
        Self {
            transforms,
            tables,
            columns,
            keys,
            quarantine_key,
            unknown_tables,
            max_event_bytes,
            committed,
        }
    }

    pub fn vault_sink(&self) -> usize {
        self.transforms.len()
    }

    pub fn quarantine_sink(&self) -> usize {
        self.transforms.len() + 1
    }

    pub fn process(&self, chunk: Chunk, ingested_at_us: i64) -> Result<Processed, WorkError> {
        let mut summary = Summary::default();
        let n_tables = self.transforms.len();
        let mut builders: Vec<Option<RawBatchBuilder>> = (0..n_tables).map(|_| None).collect();
        let mut row_lines: Vec<Vec<usize>> = vec![Vec::new(); n_tables];
        let mut scratch: Vec<Vec<Option<Cow<'_, str>>>> = self.columns.iter().map(|c| vec![None; c.len()]).collect();
        let mut dropped: Vec<HashMap<String, u64>> = vec![HashMap::new(); n_tables];
        let mut quarantine = QuarantineBuilder::new(self.quarantine_key.clone());
        let mut positions: Vec<String> = Vec::with_capacity(chunk.lines.len());
        let mut table_name = String::new();

        for (line_no, &(start, end, line_end)) in chunk.lines.iter().enumerate() {
            let line = &chunk.data[start..end];
            positions.push(format!("{}:{}", chunk.stream, line_end.end_offset));
            let position = positions.last().expect("just pushed").as_str();
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
            let values = &mut scratch[t];
            let mut malformed = false;
            for (column, raw) in event.image.0 {
                match slots.get(column.as_ref()) {
                    Some(&slot) => match value_text(raw) {
                        Ok(v) => values[slot] = v,
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
            for reject in &out.rejects {
                let line_no = row_lines[t][reject.row];
                let (start, end, line_end) = chunk.lines[line_no];
                let position = &positions[line_no];
                *summary.quarantined.entry("type_mismatch".to_string()).or_default() += 1;
                quarantine
                    .push(
                        Rejection {
                            reason: "type_mismatch",
                            detail: reject.reason,
                            table: Some(&transform.policy().table),
                            column: Some(&reject.column),
                        },
                        position,
                        &chunk.data[start..end],
                        line_end.len,
                    )
                    .map_err(|_| WorkError::Quarantine {
                        position: position.clone(),
                    })?;
            }
            if out.table.num_rows() > 0 {
                outputs.push((t, out.table));
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
            if *sink < n_tables {
                *summary
                    .rows_written
                    .entry(self.transforms[*sink].policy().target.clone())
                    .or_default() += rows;
            } else if *sink == self.vault_sink() {
                summary.vault_rows_written += rows;
            }
        }
        Ok(Processed {
            seq: chunk.seq,
            stream: chunk.stream.clone(),
            last_offset: chunk.last_offset(),
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
            if sink < self.transforms.len() {
                summary.already_committed += (batch.num_rows() - filtered.num_rows()) as u64;
            }
            if filtered.num_rows() > 0 {
                kept.push((sink, filtered));
            }
        }
        Ok(kept)
    }
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
