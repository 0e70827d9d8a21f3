//! A chunk's lines, decoded and routed by table into per-table raw batches; what cannot be
//! taken (malformed, unknown table, a value that does not fit) goes to the quarantine, sealed
//! under its subject's key, or nowhere when its subject is erased.

use std::borrow::Cow;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use sluice_connectors::avro::AvroReject;
use sluice_connectors::debezium::schema::ValueKind;
use sluice_connectors::debezium::{self, DecodeOptions, Decoded, Event};
use sluice_connectors::source::{Chunk, LineEnd};
use sluice_transforms::RawBatchBuilder;

use super::{write_position, Route, Router, SchemaCache, Sealing, WorkError};
use crate::config::{ControlRecords, UnknownTables};
use crate::quarantine::{QuarantineBuilder, Rejection, Seal};
use crate::summary::{shown_name, Summary};

/// What a chunk's events became before the policies run.
pub(super) struct DecodedChunk {
    pub summary: Summary,
    /// Per table, the raw batch of its rows (`None`: no row).
    pub builders: Vec<Option<RawBatchBuilder>>,
    /// Per table, the chunk line of each row (to quarantine a row the policy refuses).
    pub row_lines: Vec<Vec<usize>>,
    /// Per table, columns no policy names → events that carried them.
    pub dropped: Vec<FxHashMap<String, u64>>,
    pub quarantine: QuarantineBuilder,
}

impl DecodedChunk {
    /// Counts and quarantines one event.
    pub fn reject(
        &mut self,
        rejection: Rejection<'_>,
        position: &str,
        line: &[u8],
        line_end: LineEnd,
        seal: Seal<'_>,
    ) -> Result<(), WorkError> {
        *self
            .summary
            .quarantined
            .entry(rejection.reason.to_string())
            .or_default() += 1;
        self.quarantine
            .push(rejection, position, line, line_end.len, seal)
            .map_err(|_| WorkError::Quarantine {
                position: position.to_string(),
            })
    }
}

/// Decodes a chunk line by line, reusing its buffers across lines.
pub(super) struct ChunkDecoder<'r, 'c> {
    router: &'r Router,
    chunk: &'c Chunk,
    /// Per line, why the Avro path could not read it (empty for JSON).
    rejected: &'c [Option<AvroReject>],
    out: DecodedChunk,
    /// Per table, one value slot per policy column (emptied by each row).
    values: Vec<Vec<Option<Cow<'c, str>>>>,
    /// Per table, which slots the row image holds.
    seen: Vec<Vec<bool>>,
    schemas: SchemaCache<'c>,
    /// Per table, the database its events come from in this chunk.
    bound: Vec<Option<Arc<str>>>,
    /// The current line's position, `<stream>:<offset>`.
    position: String,
    /// The current event's table name, as looked up.
    table_name: String,
}

impl<'r, 'c> ChunkDecoder<'r, 'c> {
    pub fn decode(
        router: &'r Router,
        chunk: &'c Chunk,
        rejected: &'c [Option<AvroReject>],
    ) -> Result<DecodedChunk, WorkError> {
        let tables = router.transforms.len();
        let mut decoder = ChunkDecoder {
            router,
            chunk,
            rejected,
            out: DecodedChunk {
                summary: Summary::default(),
                builders: (0..tables).map(|_| None).collect(),
                row_lines: vec![Vec::new(); tables],
                dropped: vec![FxHashMap::default(); tables],
                quarantine: QuarantineBuilder::new(router.quarantine_key.clone()),
            },
            values: router.columns.iter().map(|c| vec![None; c.len()]).collect(),
            seen: router.columns.iter().map(|c| vec![false; c.len()]).collect(),
            schemas: SchemaCache::default(),
            bound: vec![None; tables],
            position: String::new(),
            table_name: String::new(),
        };
        for line_no in 0..chunk.lines.len() {
            decoder.line(line_no)?;
        }
        Ok(decoder.out)
    }

    fn line(&mut self, line_no: usize) -> Result<(), WorkError> {
        let chunk = self.chunk;
        let (start, end, line_end) = chunk.lines[line_no];
        let line: &'c [u8] = &chunk.data[start..end];
        write_position(&mut self.position, &chunk.stream, line_end.end_offset);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        #[cfg(test)]
        if line
            .windows(super::PANIC_FOR_TESTS.len())
            .any(|w| w == super::PANIC_FOR_TESTS.as_bytes())
        {
            panic!("a defect, as tests simulate it");
        }
        self.out.summary.events_read += 1;
        if let Some(Some(reject)) = self.rejected.get(line_no) {
            let rejection = Rejection::event(reject.reason(), reject.detail());
            return self.out.reject(rejection, &self.position, line, line_end, None);
        }
        if line_end.truncated(self.router.input.max_event_bytes) {
            let rejection = Rejection::event(
                "oversized_event",
                "event larger than source.max_event_bytes (stored truncated)",
            );
            return self.out.reject(rejection, &self.position, line, line_end, None);
        }
        let event = match debezium::decode(line, &self.router.input.decode, self.schemas.known()) {
            Ok(Decoded::Change(e)) => e,
            Ok(Decoded::Tombstone) => {
                self.out.summary.tombstones += 1;
                return Ok(());
            }
            Ok(Decoded::Control(kind)) => {
                *self
                    .out
                    .summary
                    .control_records
                    .entry(kind.name().to_string())
                    .or_default() += 1;
                if self.router.input.control_records == ControlRecords::Quarantine {
                    let rejection = Rejection::event("control_record", kind.describe());
                    return self.out.reject(rejection, &self.position, line, line_end, None);
                }
                return Ok(());
            }
            Err(e) => {
                // Refused (a bad time, a malformed value), but perhaps still whose it is. A
                // refused event binds no database to its table.
                let sealing = match debezium::decode(line, &DecodeOptions::any_time(), &[]) {
                    Ok(Decoded::Change(event)) => match self.router.table_of(&event, &mut self.table_name) {
                        Some((t, _)) => self.router.sealing(t, &event, &self.position)?,
                        None => Sealing::Unknown,
                    },
                    _ => Sealing::Unknown,
                };
                if matches!(sealing, Sealing::Erased) {
                    self.out.summary.erased_subject_rows += 1;
                    return Ok(());
                }
                let detail = e.to_string();
                let rejection = Rejection::event(e.reason(), &detail);
                return self
                    .out
                    .reject(rejection, &self.position, line, line_end, sealing.seal());
            }
        };
        let Some(route) = self.router.route(&event, &mut self.table_name, &mut self.bound) else {
            let shown = shown_name(&self.table_name);
            *self.out.summary.unknown_tables.entry(shown.to_string()).or_default() += 1;
            if self.router.input.unknown_tables == UnknownTables::Quarantine {
                let rejection = Rejection {
                    reason: "unknown_table",
                    detail: "no policy names this table",
                    table: Some(&shown),
                    column: None,
                };
                return self.out.reject(rejection, &self.position, line, line_end, None);
            }
            return Ok(());
        };
        match route {
            Route::Table(t) => self.row(t, event, line_no),
            Route::Ambiguous => {
                let rejection = Rejection {
                    reason: "ambiguous_table",
                    detail: "events of this schema.table come from more than one database: name the database in the policy (db.schema.table)",
                    table: Some(&self.table_name),
                    column: None,
                };
                self.out.reject(rejection, &self.position, line, line_end, None)
            }
        }
    }

    /// Whose event of table `t` this is, asked only on the way to the quarantine: `None` for
    /// an erased subject's (it goes nowhere, as its rows), else how it is sealed.
    fn sealing_unless_erased(&mut self, t: usize, event: &Event<'_>) -> Result<Option<Sealing>, WorkError> {
        let sealing = self.router.sealing(t, event, &self.position)?;
        if matches!(sealing, Sealing::Erased) {
            self.out.summary.erased_subject_rows += 1;
            return Ok(None);
        }
        Ok(Some(sealing))
    }

    /// Quarantines the current event of table `t` (or drops it, its subject erased).
    fn refuse(
        &mut self,
        t: usize,
        event: &Event<'_>,
        line_no: usize,
        reason: &'static str,
        detail: &'static str,
        column: Option<&str>,
    ) -> Result<(), WorkError> {
        let Some(sealing) = self.sealing_unless_erased(t, event)? else {
            return Ok(());
        };
        let (start, end, line_end) = self.chunk.lines[line_no];
        let rejection = Rejection {
            reason,
            detail,
            table: Some(&self.table_name),
            column,
        };
        self.out.reject(
            rejection,
            &self.position,
            &self.chunk.data[start..end],
            line_end,
            sealing.seal(),
        )
    }

    /// One event of table `t`: its values read into the table's raw batch, or the event refused.
    fn row(&mut self, t: usize, event: Event<'c>, line_no: usize) -> Result<(), WorkError> {
        let router = self.router;
        let slots = &router.columns[t];
        if let Some(column) = event.unavailable.iter().find(|c| slots.contains_key(c.as_ref())) {
            return self.refuse(
                t,
                &event,
                line_no,
                "unavailable_value",
                "the capture could not carry a column the policy names (unsupported PostgreSQL type, or an unchanged TOAST value without the old row)",
                Some(column),
            );
        }
        let image_schema = match event.schema {
            None => None,
            Some(text) => match self.schemas.get(text) {
                Some(schema) => Some(schema),
                None => {
                    return self.refuse(
                        t,
                        &event,
                        line_no,
                        "bad_schema",
                        "the event's Connect schema has no readable before/after struct",
                        None,
                    );
                }
            },
        };
        let values = &mut self.values[t];
        let seen = &mut self.seen[t];
        seen.iter_mut().for_each(|s| *s = false);
        let mut rejected: Option<(&'static str, &'static str, Cow<'_, str>)> = None;
        for (column, raw) in &event.image.0 {
            let Some(&slot) = slots.get(column.as_ref()) else {
                let dropped = &mut self.out.dropped[t];
                match dropped.get_mut(column.as_ref()) {
                    Some(n) => *n += 1,
                    None => {
                        dropped.insert(column.to_string(), 1);
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
            match router.column_value(&event, column, raw, kind, &router.expects[t][slot]) {
                Ok(v) => values[slot] = v,
                Err((code, reason)) => rejected = Some((code, reason, column.clone())),
            }
        }
        if let Some((reason, detail, column)) = rejected {
            values.iter_mut().for_each(|v| *v = None);
            return self.refuse(t, &event, line_no, reason, detail, Some(&column));
        }
        self.out.builders[t]
            .get_or_insert_with(|| RawBatchBuilder::new(values.len()))
            .push(
                event.op,
                event.event_ms,
                &self.position,
                event.database.as_deref(),
                values,
                seen,
            );
        self.out.row_lines[t].push(line_no);
        Ok(())
    }
}
