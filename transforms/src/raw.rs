//! The decoded, not yet sanitized shape of one table's events: one text column per column the
//! policy names. Columns no policy names are never decoded into it.

use std::borrow::Cow;

use arrow_array::builder::{BooleanBuilder, Int64Builder, StringBuilder};
use arrow_array::{Array, BooleanArray, Int64Array, StringArray};

/// Change operation, as Debezium spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    /// Snapshot read.
    Read,
    Delete,
    /// The table was emptied (PostgreSQL TRUNCATE): a row with no values and no subject.
    Truncate,
}

impl Op {
    pub fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "c" => Op::Create,
            "u" => Op::Update,
            "r" => Op::Read,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            _ => return None,
        })
    }

    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Read => "r",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }
}

/// Rows of one table. JSON scalars are kept as their text (strings unescaped, numbers and
/// booleans as written, objects and arrays as JSON); null and absent are both null.
pub struct RawBatch {
    pub columns: Vec<StringArray>,
    /// Per column: whether the row image lacked the column altogether (a key-only `before`).
    pub absent: Vec<BooleanArray>,
    pub ops: Vec<Op>,
    /// Event time in milliseconds since the epoch (`source.ts_ms`, else `ts_ms`).
    pub event_ms: Int64Array,
    /// Source position of each row, e.g. `events-000.jsonl:81723`.
    pub positions: StringArray,
    /// The database each row came from (`source.db`), when the event names it.
    pub databases: StringArray,
}

impl RawBatch {
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Whether the event says nothing about column `column` of row `row`: the image lacks it,
    /// or it is null in a delete's `before` image (with PostgreSQL's default replica identity
    /// that image holds the key only), or the row is a truncate.
    pub fn unknown(&self, column: usize, row: usize) -> bool {
        match self.ops[row] {
            Op::Truncate => true,
            Op::Delete => self.columns[column].is_null(row),
            _ => self.absent[column].value(row),
        }
    }
}

pub struct RawBatchBuilder {
    columns: Vec<StringBuilder>,
    absent: Vec<BooleanBuilder>,
    ops: Vec<Op>,
    event_ms: Int64Builder,
    positions: StringBuilder,
    databases: StringBuilder,
}

impl RawBatchBuilder {
    pub fn new(column_count: usize) -> Self {
        Self {
            columns: (0..column_count).map(|_| StringBuilder::new()).collect(),
            absent: (0..column_count).map(|_| BooleanBuilder::new()).collect(),
            ops: Vec::new(),
            event_ms: Int64Builder::new(),
            positions: StringBuilder::new(),
            databases: StringBuilder::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends a row; `values[i]` belongs to column `i` and is taken (left `None`);
    /// `present[i]` says whether the image had column `i` at all (null or not).
    pub fn push(
        &mut self,
        op: Op,
        event_ms: i64,
        position: &str,
        database: Option<&str>,
        values: &mut [Option<Cow<'_, str>>],
        present: &[bool],
    ) {
        self.databases.append_option(database);
        debug_assert_eq!(values.len(), self.columns.len());
        for (builder, value) in self.columns.iter_mut().zip(values.iter_mut()) {
            match value.take() {
                Some(v) => builder.append_value(v),
                None => builder.append_null(),
            }
        }
        for (builder, present) in self.absent.iter_mut().zip(present) {
            builder.append_value(!present);
        }
        self.ops.push(op);
        self.event_ms.append_value(event_ms);
        self.positions.append_value(position);
    }

    pub fn finish(&mut self) -> RawBatch {
        RawBatch {
            columns: self.columns.iter_mut().map(|b| b.finish()).collect(),
            absent: self.absent.iter_mut().map(|b| b.finish()).collect(),
            ops: std::mem::take(&mut self.ops),
            event_ms: self.event_ms.finish(),
            positions: self.positions.finish(),
            databases: self.databases.finish(),
        }
    }
}
