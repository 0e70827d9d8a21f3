//! Current-state tables: beside a policy's change log (`<target>`), `<target>_current` holds one
//! row per live source row — the latest event of each key, deletes removed, emptied by a
//! truncate.
//!
//! A merge is copy-on-write by bucket: every row lives in bucket `crc32(key) % BUCKETS` (the
//! `_bucket` partition), so a merge reads only the buckets its keys fall in, one at a time, and
//! rewrites only the files that may hold one of its keys (each file carries a Parquet Bloom
//! filter of the key's first column, as Hudi's bloom index does: inserts of new keys rewrite
//! nothing). It commits the removed and the new files in one commit with the positions they cover
//! (Delta `txn` actions, Iceberg snapshot summary): the table always equals "the log up to its
//! positions, last event per key". The changes of several log commits are merged together (up to
//! `max_lag` or `max_rows` of them), reduced in memory to the last event per key meanwhile.
//!
//! No deletion vectors or position deletes: `deltalake` 0.32 reads deletion vectors but does not
//! write them, and `iceberg` 0.10 commits only appends (our rewrite snapshots are built by
//! hand, see `iceberg::rewrite`); equality deletes are avoided on purpose.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, BooleanArray, Int32Array, RecordBatch, StringArray};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{LakeError, Sink};
use crate::delta::DeltaSinkError;
use crate::iceberg::IcebergSinkError;
use crate::SourcePosition;

/// The partition column: which bucket of the key space a row is in.
pub const BUCKET_COLUMN: &str = "_bucket";
/// When the row's event was taken in (its `_ingested_at` in the log).
pub const UPDATED_AT_COLUMN: &str = "_updated_at";
/// Buckets of every current table. Fixed: a row's bucket is part of the table's layout, so a
/// different count would split a key between two buckets. A merge rewrites only the buckets
/// its keys fall in; a bucket is read and written a file at a time, so memory does not grow
/// with the table.
pub const BUCKETS: u32 = 64;
/// A merge compacts a bucket that holds this many files it would otherwise keep.
const MAX_BUCKET_FILES: usize = 16;
/// Rows written to a bucket's new files are flushed at about this many Arrow bytes.
const SPILL_BYTES: usize = 64 << 20;
/// A merge that meets another writer's commit (an erasure, a compaction) is computed again,
/// at most this many times.
const MAX_MERGE_ATTEMPTS: usize = 5;

/// Rows of a current table's row group, what its key Bloom filter is sized for, and the
/// filter's false-positive rate: about 64 KiB of filter per 50,000 rows.
const BLOOM_NDV: u64 = 50_000;
const BLOOM_FPP: f64 = 0.01;

/// Writer settings with a Bloom filter of the key's first column (see the module's notes).
pub(crate) fn key_bloom_filter(
    props: deltalake::parquet::file::properties::WriterPropertiesBuilder,
    column: &str,
) -> deltalake::parquet::file::properties::WriterPropertiesBuilder {
    let path = deltalake::parquet::schema::types::ColumnPath::from(column);
    props
        // All filters just before the footer: one read from the file's end finds them.
        .set_bloom_filter_position(deltalake::parquet::file::properties::BloomFilterPosition::End)
        // A row group holds at most what its filter is sized for.
        .set_max_row_group_row_count(Some(BLOOM_NDV as usize))
        .set_column_bloom_filter_enabled(path.clone(), true)
        .set_column_bloom_filter_ndv(path.clone(), BLOOM_NDV)
        .set_column_bloom_filter_fpp(path, BLOOM_FPP)
}

/// The log columns a current table does not keep (`_ingested_at` becomes `_updated_at`; the
/// log's date partition means nothing for a row that may be years old).
const LOG_ONLY_COLUMNS: &[&str] = &["_ingested_at", "_date"];

/// Columns of a current table's log or manifest statistics (the rule of the log's
/// `STATS_COLUMNS`: nothing that singles a person out).
pub const CURRENT_STATS_COLUMNS: &[&str] = &["_op", UPDATED_AT_COLUMN, "_source_db"];

/// The current table's columns, from its change log's: the data columns and `_op`,
/// `_subject`, `_source_ts`, `_position`, `_updated_at`, `_source_db`, then `_bucket`.
pub fn current_schema(log: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = Vec::with_capacity(log.fields().len() + 1);
    for field in log.fields() {
        match field.name().as_str() {
            "_ingested_at" => {
                fields.push(Field::new(UPDATED_AT_COLUMN, field.data_type().clone(), false));
            }
            name if LOG_ONLY_COLUMNS.contains(&name) => {}
            _ => fields.push(field.as_ref().clone()),
        }
    }
    // `_source_db` (nullable) last among the log's columns, as in the log.
    if let Some(i) = fields.iter().position(|f| f.name() == "_source_db") {
        let db = fields.remove(i);
        fields.push(db);
    }
    fields.push(Field::new(BUCKET_COLUMN, DataType::Int32, false));
    Arc::new(Schema::new(fields))
}

/// How a current table is kept.
#[derive(Debug, Clone)]
pub struct CurrentSettings {
    /// The key's output columns (`Policy::key_output_columns`).
    pub key: Vec<String>,
    /// Merge when the oldest waiting change is this old.
    pub max_lag: Duration,
    /// Merge when this many distinct keys, or this many Arrow bytes of them, wait.
    pub max_rows: usize,
    pub max_bytes: usize,
}

/// A key as text: each column's value in a form this module fixes (not Arrow's display, which
/// may change between releases: a row's bucket must not), length-prefixed so that no two keys
/// read alike. `None` where a key column is null: such a row identifies nothing.
fn key_texts(batch: &RecordBatch, key: &[String]) -> Result<Vec<Option<String>>, ArrowError> {
    let mut out: Vec<Option<String>> = vec![Some(String::new()); batch.num_rows()];
    for name in key {
        let column = batch
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("key column {name} is missing")))?;
        for (row, text) in out.iter_mut().enumerate() {
            let Some(key) = text else { continue };
            if column.is_null(row) {
                *text = None;
                continue;
            }
            let value = key_value(column.as_ref(), row)?;
            key.push_str(&value.len().to_string());
            key.push(':');
            key.push_str(&value);
            key.push(';');
        }
    }
    Ok(out)
}

/// One key column's value as key text: integers, days, microseconds and unscaled decimals in
/// decimal digits, floats by their bits, text as it is.
fn key_value(column: &dyn Array, row: usize) -> Result<String, ArrowError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Date32Type, Decimal128Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
    Ok(match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(row).to_string(),
        DataType::Int64 => column.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::Int32 => column.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::Date32 => column.as_primitive::<Date32Type>().value(row).to_string(),
        DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, _) => {
            column.as_primitive::<TimestampMicrosecondType>().value(row).to_string()
        }
        DataType::Boolean => column.as_boolean().value(row).to_string(),
        DataType::Decimal128(_, _) => column.as_primitive::<Decimal128Type>().value(row).to_string(),
        DataType::Float64 => format!("{:016x}", column.as_primitive::<Float64Type>().value(row).to_bits()),
        other => return Err(ArrowError::NotYetImplemented(format!("a key column of type {other}"))),
    })
}

/// The bucket of a key: stable across versions and platforms (CRC-32 of its text).
fn bucket_of(key: &str) -> i32 {
    (crc32fast::hash(key.as_bytes()) % BUCKETS) as i32
}

/// A window of the log reduced to what the current table needs: whether it holds a truncate,
/// and the last event of each key after the last truncate.
#[derive(Debug, Default)]
struct Reduced {
    truncated: bool,
    /// Key → (batch, row) of its last event, and whether that event leaves the row live.
    last: HashMap<String, ((usize, usize), bool)>,
    /// Key → its first column's value, as a file's Bloom filter is asked about it (`None`: a
    /// type the filters are not asked about: the file may hold it).
    probes: HashMap<String, Option<Probe>>,
    /// Rows left out: a key column is null.
    keyless: usize,
}

/// A key's first column, as its Parquet Bloom filter hashes it.
#[derive(Debug, Clone)]
enum Probe {
    Text(String),
    Int(i64),
}

/// The keys a merge touches in one bucket, as a file's rows are matched against them: by the
/// key column's own values when the key is one text or integer column (no text built per row:
/// files are matched whole when a merge asks whether they hold a key at all), else by key text.
enum KeySet {
    Ints(HashSet<i64>),
    Texts(HashSet<String>),
    Keys(HashSet<String>),
}

impl KeySet {
    fn of(keys: &HashSet<&str>, reduced: &Reduced, key: &[String]) -> Self {
        let probes: Vec<Option<&Probe>> = keys
            .iter()
            .map(|k| reduced.probes.get(*k).and_then(Option::as_ref))
            .collect();
        if key.len() == 1 && !probes.is_empty() {
            if let Some(ints) = probes
                .iter()
                .map(|p| match p {
                    Some(Probe::Int(i)) => Some(*i),
                    _ => None,
                })
                .collect::<Option<HashSet<i64>>>()
            {
                return KeySet::Ints(ints);
            }
            if let Some(texts) = probes
                .iter()
                .map(|p| match p {
                    Some(Probe::Text(t)) => Some(t.clone()),
                    _ => None,
                })
                .collect::<Option<HashSet<String>>>()
            {
                return KeySet::Texts(texts);
            }
        }
        KeySet::Keys(keys.iter().map(|k| k.to_string()).collect())
    }

    /// Which rows of `batch` (holding the key columns) have one of the keys.
    fn matches(&self, batch: &RecordBatch, key: &[String]) -> Result<BooleanArray, ArrowError> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::Int64Type;
        let first = || {
            batch
                .column_by_name(&key[0])
                .ok_or_else(|| ArrowError::SchemaError(format!("key column {} is missing", key[0])))
        };
        Ok(match self {
            KeySet::Ints(set) => first()?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| ArrowError::SchemaError("an integer key column is not int64".into()))?
                .iter()
                .map(|v| Some(v.is_some_and(|v| set.contains(&v))))
                .collect(),
            KeySet::Texts(set) => first()?
                .as_string_opt::<i32>()
                .ok_or_else(|| ArrowError::SchemaError("a text key column is not text".into()))?
                .iter()
                .map(|v| Some(v.is_some_and(|v| set.contains(v))))
                .collect(),
            KeySet::Keys(set) => key_texts(batch, key)?
                .iter()
                .map(|k| Some(k.as_deref().is_some_and(|k| set.contains(k))))
                .collect(),
        })
    }
}

/// Whether a data file holds a row with one of `keys`, reading only its key columns.
fn holds_any(bytes: &bytes::Bytes, keys: &KeySet, key: &[String]) -> Result<bool, ArrowError> {
    use deltalake::parquet::arrow::ProjectionMask;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())?;
    let roots: Vec<usize> = key
        .iter()
        .map(|k| builder.schema().index_of(k))
        .collect::<Result<_, _>>()?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    for batch in builder.with_projection(mask).with_batch_size(65_536).build()? {
        if keys.matches(&batch?, key)?.true_count() > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The first key column's values, where its type is one the Bloom filters are asked about.
fn probes(batch: &RecordBatch, key: &[String]) -> Vec<Option<Probe>> {
    let column = key.first().and_then(|k| batch.column_by_name(k));
    let rows = batch.num_rows();
    match column {
        Some(c) if c.data_type() == &DataType::Utf8 => {
            let text = c.as_any().downcast_ref::<StringArray>().expect("Utf8");
            (0..rows)
                .map(|i| (!text.is_null(i)).then(|| Probe::Text(text.value(i).to_string())))
                .collect()
        }
        Some(c) if c.data_type() == &DataType::Int64 => {
            let ints = c.as_any().downcast_ref::<arrow_array::Int64Array>().expect("Int64");
            (0..rows)
                .map(|i| (!ints.is_null(i)).then(|| Probe::Int(ints.value(i))))
                .collect()
        }
        _ => vec![None; rows],
    }
}

impl Reduced {
    /// `batches` in source order (the order the sink received them, rows in event order).
    fn of(batches: &[RecordBatch], key: &[String]) -> Result<Self, ArrowError> {
        let mut out = Reduced::default();
        for (b, batch) in batches.iter().enumerate() {
            let ops = batch
                .column_by_name("_op")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| ArrowError::SchemaError("_op is missing or not text".into()))?;
            let keys = key_texts(batch, key)?;
            let mut probes = probes(batch, key).into_iter();
            for (row, k) in keys.into_iter().enumerate() {
                let probe = probes.next().flatten();
                match (ops.value(row), k) {
                    ("t", _) => {
                        out.last.clear();
                        out.probes.clear();
                        out.truncated = true;
                    }
                    (_, None) => out.keyless += 1,
                    (op, Some(k)) => {
                        out.probes.insert(k.clone(), probe);
                        out.last.insert(k, ((b, row), op != "d"));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The rows of `batches` that are some key's last event (deletes included), in source order.
    fn rows(&self, live_only: bool) -> Vec<(usize, usize)> {
        let mut rows: Vec<(usize, usize)> = self
            .last
            .values()
            .filter(|(_, live)| *live || !live_only)
            .map(|(at, _)| *at)
            .collect();
        rows.sort_unstable();
        rows
    }

    /// Bucket → the keys whose rows the merge replaces or removes there.
    fn touched(&self) -> BTreeMap<i32, HashSet<&str>> {
        let mut out: BTreeMap<i32, HashSet<&str>> = BTreeMap::new();
        for key in self.last.keys() {
            out.entry(bucket_of(key)).or_default().insert(key.as_str());
        }
        out
    }
}

/// The end of a data file: its footer and, written just before it, its Bloom filters (see
/// [`key_bloom_filter`]). Read instead of the whole file to ask the filters.
struct FileTail {
    /// Where `bytes` start in the file.
    start: u64,
    size: u64,
    bytes: bytes::Bytes,
}

/// Bytes read first from a file's end to ask its Bloom filters: the footer and a few row
/// groups' filters (about 64 KiB each); more are read when the file has more.
const TAIL_BYTES: u64 = 256 << 10;

impl deltalake::parquet::file::reader::Length for FileTail {
    fn len(&self) -> u64 {
        self.size
    }
}

impl deltalake::parquet::file::reader::ChunkReader for FileTail {
    type T = bytes::buf::Reader<bytes::Bytes>;

    fn get_read(&self, start: u64) -> deltalake::parquet::errors::Result<Self::T> {
        use bytes::Buf;
        let length = (self.size - start.min(self.size)) as usize;
        Ok(self.get_bytes(start, length)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> deltalake::parquet::errors::Result<bytes::Bytes> {
        let from = start
            .checked_sub(self.start)
            .map(|f| f as usize)
            .filter(|f| f + length <= self.bytes.len())
            .ok_or_else(|| deltalake::parquet::errors::ParquetError::General("outside the bytes read".into()))?;
        Ok(self.bytes.slice(from..from + length))
    }
}

impl FileTail {
    /// The end of file `file` of `table`: enough of it to hold the footer and every row
    /// group's Bloom filter (read again from the first filter when the first read is short).
    async fn read(table: &Sink, file: &super::BucketFile) -> Result<Self, LakeError> {
        let start = file.size.saturating_sub(TAIL_BYTES);
        let mut tail = FileTail {
            start,
            size: file.size,
            bytes: table.read_range(&file.path, start..file.size).await?,
        };
        let first_filter = tail.metadata().and_then(|m| {
            m.row_groups()
                .iter()
                .flat_map(|g| g.columns())
                .filter_map(|c| c.bloom_filter_offset())
                .min()
        });
        if let Some(first) = first_filter.and_then(|f| u64::try_from(f).ok()).filter(|f| *f < start) {
            let head = table.read_range(&file.path, first..start).await?;
            let mut joined = Vec::with_capacity(head.len() + tail.bytes.len());
            joined.extend_from_slice(&head);
            joined.extend_from_slice(&tail.bytes);
            tail = FileTail {
                start: first,
                size: file.size,
                bytes: joined.into(),
            };
        }
        Ok(tail)
    }

    /// The file's footer, if these bytes hold it whole.
    fn metadata(&self) -> Option<deltalake::parquet::file::metadata::ParquetMetaData> {
        use deltalake::parquet::file::metadata::{FooterTail, ParquetMetaDataReader};
        let n = self.bytes.len();
        let footer = <[u8; 8]>::try_from(self.bytes.get(n.checked_sub(8)?..)?).ok()?;
        let tail = FooterTail::try_from(footer).ok()?;
        let at = n.checked_sub(8 + tail.metadata_length())?;
        ParquetMetaDataReader::decode_metadata(&self.bytes[at..n - 8]).ok()
    }

    /// Whether the file may hold one of the keys `probes` (their first column's values), per the
    /// Bloom filters of its `column`: false only when every row group has a filter in these
    /// bytes and each rules out every value. A file without filters (written by an erasure)
    /// may hold any.
    fn may_hold_any(&self, column: &str, probes: &[Option<Probe>]) -> bool {
        use deltalake::parquet::bloom_filter::Sbbf;
        use deltalake::parquet::file::statistics::Statistics;
        let Some(metadata) = self.metadata() else {
            return true;
        };
        let Some(index) = metadata
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .position(|c| c.path().string() == column)
        else {
            return true;
        };
        // Per row group: its filter, and an integer key's range where the file's own
        // statistics give it (increasing ids: a snapshot's or a growing table's new keys lie
        // past every older file's range, however many there are).
        let mut groups = Vec::new();
        for group in metadata.row_groups() {
            let column = group.column(index);
            let range = match column.statistics() {
                Some(Statistics::Int64(s)) => s.min_opt().zip(s.max_opt()).map(|(lo, hi)| (*lo, *hi)),
                _ => None,
            };
            match Sbbf::read_from_column_chunk(column, self) {
                Ok(Some(filter)) => groups.push((filter, range)),
                _ => return true,
            }
        }
        probes.iter().any(|probe| match probe {
            None => true,
            Some(Probe::Text(t)) => groups.iter().any(|(f, _)| f.check(t.as_str())),
            Some(Probe::Int(i)) => groups
                .iter()
                .any(|(f, range)| range.is_none_or(|(lo, hi)| lo <= *i && *i <= hi) && f.check(i)),
        })
    }
}

/// The rows `at` of `batches`, column by column.
fn take_rows(batches: &[RecordBatch], at: &[(usize, usize)]) -> Result<Vec<ArrayRef>, ArrowError> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    (0..first.num_columns())
        .map(|c| {
            let columns: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            arrow_select::interleave::interleave(&columns, at)
        })
        .collect()
}

/// An unreadable or inconsistent batch during a merge, as the table's format reports it.
fn data_error(table: &str, format: &str, e: ArrowError) -> LakeError {
    let table = table.to_string();
    match format {
        "iceberg" => LakeError::Iceberg(IcebergSinkError::Iceberg {
            table,
            source: Box::new(iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string())),
        }),
        _ => LakeError::Delta(DeltaSinkError::Delta {
            table,
            source: Box::new(e.into()),
        }),
    }
}

/// What a merge did (logged: the cost of keeping the table).
#[derive(Debug, Default)]
struct MergeStats {
    keys: usize,
    buckets: usize,
    files_rewritten: usize,
    /// Files of touched buckets whose Bloom filter ruled out every touched key.
    files_kept: usize,
    /// Rows copied from rewritten files into their replacements.
    rows_kept: usize,
}

/// A current table being kept: the log's rows since its last merge, and its table.
pub(crate) struct CurrentSink {
    table: Sink,
    schema: SchemaRef,
    settings: CurrentSettings,
    /// Log batches since the last merge, in source order (reduced to one row per key when
    /// they pile up: see [`CurrentSink::hold`]).
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    /// A truncate came before the pending rows (they were reduced past it).
    truncated: bool,
    /// When the oldest pending change came.
    oldest: Option<Instant>,
    /// Rows of subjects erased since they were read.
    erased: Arc<ErasedRows>,
}

/// Marks the rows of a batch of the log whose subject has been erased since they were read
/// (see [`CurrentSink::commit`]).
pub type ErasedRows = dyn Fn(&RecordBatch) -> Result<BooleanArray, String> + Send + Sync;

impl CurrentSink {
    pub(crate) fn new(table: Sink, schema: SchemaRef, settings: CurrentSettings, erased: Arc<ErasedRows>) -> Self {
        Self {
            table,
            schema,
            settings,
            pending: Vec::new(),
            pending_rows: 0,
            truncated: false,
            oldest: None,
            erased,
        }
    }

    pub(crate) fn table(&self) -> &Sink {
        &self.table
    }

    pub(crate) fn table_mut(&mut self) -> &mut Sink {
        &mut self.table
    }

    pub(crate) fn buffered_rows(&self) -> usize {
        self.pending_rows
    }

    fn pending_bytes(&self) -> usize {
        self.pending.iter().map(RecordBatch::get_array_memory_size).sum()
    }

    /// Takes a batch of the change log (rows in source order).
    pub(crate) fn write(&mut self, batch: RecordBatch) {
        self.oldest.get_or_insert_with(Instant::now);
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
    }

    /// Whether the next commit should merge: at the end of a run, when enough keys (or bytes)
    /// wait, or when the oldest waiting change is `max_lag` old.
    pub(crate) fn due(&self, closing: bool) -> bool {
        closing
            || self.pending_rows >= self.settings.max_rows
            || self.pending_bytes() >= self.settings.max_bytes
            || self.oldest.is_some_and(|t| t.elapsed() >= self.settings.max_lag)
    }

    /// Keeps the pending rows for a later merge, reduced to the last event per key (memory
    /// grows with the keys changed, not with the changes).
    pub(crate) fn hold(&mut self) -> Result<(), LakeError> {
        if self.pending.len() <= 1 {
            return Ok(());
        }
        let reduced = Reduced::of(&self.pending, &self.settings.key).map_err(|e| self.arrow_err(e))?;
        let rows = reduced.rows(false);
        let schema = self.pending[0].schema();
        let columns = take_rows(&self.pending, &rows).map_err(|e| self.arrow_err(e))?;
        let batch = RecordBatch::try_new(schema, columns).map_err(|e| self.arrow_err(e))?;
        self.truncated |= reduced.truncated;
        self.pending_rows = batch.num_rows();
        self.pending = vec![batch];
        Ok(())
    }

    fn arrow_err(&self, e: ArrowError) -> LakeError {
        data_error(self.table.name(), self.table.format(), e)
    }

    /// Drops the pending rows `erased` marks: rows of subjects erased while they waited for
    /// this merge (an erasure job rewrote the table meanwhile and must not see them come back).
    fn drop_erased(&mut self) -> Result<(), LakeError> {
        let erased = self.erased.clone();
        for batch in self.pending.iter_mut() {
            let marked = erased(batch)
                .map_err(|e| data_error(self.table.name(), self.table.format(), ArrowError::ComputeError(e)))?;
            if marked.true_count() > 0 {
                let keep: BooleanArray = marked.iter().map(|m| Some(m != Some(true))).collect();
                *batch = arrow_select::filter::filter_record_batch(batch, &keep)
                    .map_err(|e| data_error(self.table.name(), self.table.format(), e))?;
            }
        }
        Ok(())
    }

    /// Merges the pending changes into the table, committed with `positions` (with none, the
    /// positions alone), leaving out rows of subjects erased meanwhile. Returns the table's new
    /// version or sequence number.
    pub(crate) async fn commit(
        &mut self,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<i64, LakeError> {
        let mut attempt = 0;
        let version = loop {
            attempt += 1;
            // Asked again on every attempt: a conflict may be an erasure's rewrite.
            self.drop_erased()?;
            let reduced = Reduced::of(&self.pending, &self.settings.key).map_err(|e| self.arrow_err(e))?;
            if reduced.keyless > 0 {
                tracing::warn!(
                    table = self.table.name(),
                    rows = reduced.keyless,
                    "rows whose key has a null column: kept in the log, not in the current table"
                );
            }
            let truncated = self.truncated || reduced.truncated;
            let upserts = self.upserts(&reduced)?;
            match self.merge(&reduced, truncated, &upserts, positions, attached).await {
                Ok(version) => break version,
                // A conflict is found before anything is committed: this attempt's files are
                // garbage (rows read before another writer's change), deleted now.
                Err(e) if e.is_conflict() && attempt < MAX_MERGE_ATTEMPTS => {
                    tracing::info!(
                        table = self.table.name(),
                        "another writer changed the table during a merge: merging again"
                    );
                    self.discard().await?;
                }
                // Any other error may come after the commit landed (a post-commit hook, a lost
                // reply): the files are left alone; the run stops and a restart reads the
                // table's position.
                Err(e) => return Err(e),
            }
        };
        self.pending.clear();
        self.pending_rows = 0;
        self.truncated = false;
        self.oldest = None;
        Ok(version)
    }

    /// The pending rows that stay live, as the current table's rows, with their buckets.
    fn upserts(&self, reduced: &Reduced) -> Result<Option<(RecordBatch, Vec<i32>)>, LakeError> {
        let rows = reduced.rows(true);
        if rows.is_empty() {
            return Ok(None);
        }
        let log = take_rows(&self.pending, &rows).map_err(|e| self.arrow_err(e))?;
        let log = RecordBatch::try_new(self.pending[0].schema(), log).map_err(|e| self.arrow_err(e))?;
        let buckets: Vec<i32> = key_texts(&log, &self.settings.key)
            .map_err(|e| self.arrow_err(e))?
            .iter()
            .map(|k| k.as_deref().map(bucket_of).unwrap_or_default())
            .collect();
        let columns: Vec<ArrayRef> = self
            .schema
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                BUCKET_COLUMN => Ok(Arc::new(Int32Array::from(buckets.clone())) as ArrayRef),
                UPDATED_AT_COLUMN => log
                    .column_by_name("_ingested_at")
                    .cloned()
                    .ok_or_else(|| ArrowError::SchemaError("_ingested_at is missing".into())),
                name => log
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| ArrowError::SchemaError(format!("{name} is missing"))),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| self.arrow_err(e))?;
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| self.arrow_err(e))?;
        Ok(Some((batch, buckets)))
    }

    /// One attempt: read the touched buckets' files, write them again without the touched
    /// keys and with the new rows, commit all of it with the positions.
    async fn merge(
        &mut self,
        reduced: &Reduced,
        truncated: bool,
        upserts: &Option<(RecordBatch, Vec<i32>)>,
        positions: &[SourcePosition],
        attached: &[SourcePosition],
    ) -> Result<i64, LakeError> {
        let touched = reduced.touched();
        let files = self.table.bucket_files().await?;
        // Bucket → its files that the merge replaces (every file, after a truncate).
        let mut replaced: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            if truncated || touched.contains_key(&file.bucket) {
                replaced.entry(file.bucket).or_default().push(i);
            }
        }
        let mut new_rows: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
        if let Some((_, buckets)) = upserts {
            for (row, bucket) in buckets.iter().enumerate() {
                new_rows.entry(*bucket).or_default().push(row as u32);
            }
        }
        let buckets: std::collections::BTreeSet<i32> = replaced.keys().chain(new_rows.keys()).copied().collect();
        let mut stats = MergeStats {
            keys: reduced.last.len(),
            buckets: buckets.len(),
            ..MergeStats::default()
        };
        for bucket in buckets {
            if !truncated {
                let keys = touched.get(&bucket);
                let mut rewritten = Vec::new();
                let probes: Vec<Option<Probe>> = keys
                    .into_iter()
                    .flatten()
                    .map(|k| reduced.probes.get(*k).cloned().flatten())
                    .collect();
                let mut untouched = Vec::new();
                for &i in replaced.get(&bucket).map(Vec::as_slice).unwrap_or_default() {
                    let file = &files[i];
                    // A file whose Bloom filter rules out every touched key stays as it is:
                    // inserts of new keys (a snapshot, a growing table) rewrite nothing.
                    let tail = FileTail::read(&self.table, file).await?;
                    if tail.may_hold_any(&self.settings.key[0], &probes) {
                        rewritten.push(i);
                    } else {
                        untouched.push(i);
                    }
                }
                // The filters answer for one key at ~1%, for thousands at once hardly ever (a
                // snapshot's keys): a file they cannot rule out is asked exactly, by its key
                // columns alone, before it is rewritten.
                let key_set = keys.map(|k| KeySet::of(k, reduced, &self.settings.key));
                let mut holding = Vec::new();
                for i in rewritten {
                    let file = &files[i];
                    let bytes = self.table.read_file(&file.path).await?;
                    let holds = match &key_set {
                        Some(set) => holds_any(&bytes, set, &self.settings.key).map_err(|e| {
                            self.arrow_err(ArrowError::ExternalError(format!("{}: {e}", file.path).into()))
                        })?,
                        None => true,
                    };
                    if holds {
                        holding.push((i, bytes));
                    } else {
                        untouched.push(i);
                    }
                }
                // Inserts add a file per merge: a bucket with too many is compacted by the
                // merge that would add one more (its files become one).
                if untouched.len() >= MAX_BUCKET_FILES {
                    for i in std::mem::take(&mut untouched) {
                        let bytes = self.table.read_file(&files[i].path).await?;
                        holding.push((i, bytes));
                    }
                }
                stats.files_kept += untouched.len();
                let mut rewritten = Vec::with_capacity(holding.len());
                for (i, bytes) in holding {
                    stats.rows_kept += self
                        .keep_untouched(&files[i].path, bytes, bucket, key_set.as_ref())
                        .await?;
                    rewritten.push(i);
                }
                replaced.insert(bucket, rewritten);
            }
            if let (Some((batch, _)), Some(rows)) = (upserts, new_rows.get(&bucket)) {
                let rows = arrow_array::UInt32Array::from(rows.clone());
                let part = arrow_select::take::take_record_batch(batch, &rows).map_err(|e| self.arrow_err(e))?;
                self.table.write(part).await?;
            }
            self.table.spill().await?;
        }
        let removed: Vec<&super::BucketFile> = replaced.values().flatten().map(|&i| &files[i]).collect();
        let scope = if truncated {
            None
        } else {
            Some(
                replaced
                    .iter()
                    .filter(|(_, f)| !f.is_empty())
                    .map(|(b, _)| *b)
                    .collect::<Vec<_>>(),
            )
        };
        stats.files_rewritten = removed.len();
        let version = self
            .table
            .commit_replacing(&removed, scope, positions, attached)
            .await?;
        tracing::info!(
            table = self.table.name(),
            keys = stats.keys,
            buckets = stats.buckets,
            files_rewritten = stats.files_rewritten,
            files_kept = stats.files_kept,
            rows_kept = stats.rows_kept,
            truncated,
            "merged"
        );
        Ok(version)
    }

    /// Writes the rows of file `path` (`bytes`, in `bucket`) whose key is not in `touched`.
    async fn keep_untouched(
        &mut self,
        path: &str,
        bytes: bytes::Bytes,
        bucket: i32,
        touched: Option<&KeySet>,
    ) -> Result<usize, LakeError> {
        let mut kept = 0;
        let (name, format) = (self.table.name().to_string(), self.table.format());
        let invalid = |e: &dyn std::fmt::Display| {
            data_error(&name, format, ArrowError::ExternalError(format!("{path}: {e}").into()))
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.with_batch_size(65_536).build())
            .map_err(|e| invalid(&e))?;
        for batch in reader {
            let batch = self
                .conform(batch.map_err(|e| invalid(&e))?, bucket)
                .map_err(|e| invalid(&e))?;
            let batch = match touched {
                None => batch,
                Some(keys) => {
                    let matched = keys.matches(&batch, &self.settings.key).map_err(|e| invalid(&e))?;
                    let keep: BooleanArray = matched.iter().map(|m| Some(m != Some(true))).collect();
                    arrow_select::filter::filter_record_batch(&batch, &keep).map_err(|e| invalid(&e))?
                }
            };
            kept += batch.num_rows();
            if batch.num_rows() > 0 {
                self.table.write(batch).await?;
            }
            if self.table.buffered_bytes() >= SPILL_BYTES {
                self.table.spill().await?;
            }
        }
        Ok(kept)
    }

    /// A batch read from a table file in the current schema: columns by name, cast where the
    /// file's type differs (a time zone), null where the file predates a column, the bucket
    /// from the partition where the format keeps it out of the file (Delta).
    fn conform(&self, batch: RecordBatch, bucket: i32) -> Result<RecordBatch, ArrowError> {
        let rows = batch.num_rows();
        let columns: Vec<ArrayRef> = self
            .schema
            .fields()
            .iter()
            .map(|f| match batch.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
                Some(c) => deltalake::arrow::compute::cast(c, f.data_type()),
                None if f.name() == BUCKET_COLUMN => Ok(Arc::new(Int32Array::from(vec![bucket; rows])) as ArrayRef),
                None => Ok(arrow_array::new_null_array(f.data_type(), rows)),
            })
            .collect::<Result<_, _>>()?;
        RecordBatch::try_new(self.schema.clone(), columns)
    }

    async fn discard(&mut self) -> Result<(), LakeError> {
        self.table.discard_uncommitted().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(ops: &[&str], ids: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("_op", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(StringArray::from(ops.to_vec())),
            ],
        )
        .unwrap()
    }

    fn live(reduced: &Reduced, batches: &[RecordBatch]) -> Vec<(String, String)> {
        reduced
            .rows(true)
            .into_iter()
            .map(|(b, r)| {
                let batch = &batches[b];
                let text = |c: &str| {
                    batch
                        .column_by_name(c)
                        .unwrap()
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .unwrap()
                        .value(r)
                        .to_string()
                };
                (text("id"), text("_op"))
            })
            .collect()
    }

    #[test]
    fn the_last_event_of_each_key_wins_in_source_order() {
        let key = vec!["id".to_string()];
        let batches = vec![
            log(&["c", "c", "u", "c"], &["a", "b", "a", "c"]),
            // Two changes to one row in one transaction: the second wins.
            log(&["u", "d", "u", "r"], &["b", "c", "b", "d"]),
        ];
        let reduced = Reduced::of(&batches, &key).unwrap();
        assert!(!reduced.truncated);
        assert_eq!(
            live(&reduced, &batches),
            [
                ("a".into(), "u".into()),
                ("b".into(), "u".into()),
                ("d".into(), "r".into())
            ]
        );
        // The deleted key is touched (its row goes) but not live.
        assert_eq!(reduced.last.len(), 4);
        assert_eq!(reduced.rows(false).len(), 4);
    }

    #[test]
    fn a_truncate_forgets_what_came_before_it() {
        let key = vec!["id".to_string()];
        let batches = vec![log(&["c", "c", "t", "c", "d"], &["a", "b", "", "c", "a"])];
        let reduced = Reduced::of(&batches, &key).unwrap();
        assert!(reduced.truncated);
        assert_eq!(live(&reduced, &batches), [("c".into(), "c".into())]);
        assert_eq!(reduced.last.len(), 2);
    }

    #[test]
    fn keys_are_unambiguous_and_buckets_stable() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("x;1:"), Some("x"), None])),
                Arc::new(StringArray::from(vec![Some("y"), Some(";1:y"), Some("")])),
            ],
        )
        .unwrap();
        let keys = key_texts(&batch, &["a".into(), "b".into()]).unwrap();
        let distinct: HashSet<&Option<String>> = keys.iter().collect();
        assert_eq!(distinct.len(), 3, "{keys:?}");
        // The layout of existing tables depends on it: CRC-32 of the key text.
        assert_eq!(bucket_of("2:42;"), (crc32fast::hash(b"2:42;") % 64) as i32);
        assert_eq!(bucket_of("2:42;"), 39);
    }

    #[test]
    fn a_files_bloom_filter_read_from_its_end_rules_out_absent_keys_only() {
        use deltalake::parquet::arrow::ArrowWriter;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ]));
        let ids: Vec<i64> = (0..5000).map(|i| i * 2).collect();
        let notes: Vec<String> = ids.iter().map(|i| format!("n{i}").repeat(20)).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(arrow_array::Int64Array::from(ids)),
                Arc::new(StringArray::from(notes)),
            ],
        )
        .unwrap();
        let mut written = Vec::new();
        let props = key_bloom_filter(crate::lake::parquet_properties(), "id").build();
        let mut writer = ArrowWriter::try_new(&mut written, schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let size = written.len() as u64;
        assert!(size > TAIL_BYTES / 4, "the data is not all in the tail read");
        let bytes = bytes::Bytes::from(written);
        let start = size.saturating_sub(TAIL_BYTES / 4);
        let tail = FileTail {
            start,
            size,
            bytes: bytes.slice(start as usize..),
        };
        assert!(tail.may_hold_any("id", &[Some(Probe::Int(4242))]));
        assert!(tail.may_hold_any("id", &[Some(Probe::Int(1)), Some(Probe::Int(9998))]));
        assert!(tail.may_hold_any("id", &[None]), "a null key may be anywhere");
        let absent = (0..1000)
            .filter(|i| tail.may_hold_any("id", &[Some(Probe::Int(i * 2 + 1))]))
            .count();
        assert!(absent < 50, "{absent} of 1000 absent keys not ruled out (1% expected)");
        // Past the file's range (its statistics), any number of keys at once.
        let later: Vec<Option<Probe>> = (10_000..20_000).map(|i| Some(Probe::Int(i))).collect();
        assert!(!tail.may_hold_any("id", &later));
        assert!(tail.may_hold_any("id", &[later[0].clone(), Some(Probe::Int(9998))]));
        // A file without a filter on the column (another column asked, or written without).
        assert!(tail.may_hold_any("note", &[Some(Probe::Text("x".into()))]));
    }

    #[test]
    fn the_current_schema_replaces_the_log_only_columns() {
        let log = Schema::new(vec![
            Field::new("balance", DataType::Int64, true),
            Field::new("_op", DataType::Utf8, false),
            Field::new("_ingested_at", DataType::Int64, false),
            Field::new("_date", DataType::Date32, false),
            Field::new("_source_db", DataType::Utf8, true),
        ]);
        let names: Vec<String> = current_schema(&log).fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["balance", "_op", "_updated_at", "_source_db", "_bucket"]);
    }
}
