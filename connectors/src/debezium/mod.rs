//! Decoding of Debezium JSON change events, with or without the `{"schema", "payload"}`
//! wrapper. Borrowing: a row image is a list of (column, raw JSON) pairs pointing into the line,
//! so nothing is copied until a policy asks for a column.

use std::borrow::Cow;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_transforms::{Op, Sensitive};

pub mod schema;

/// Why an event could not be decoded. Static text: never any part of the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed JSON")]
    Malformed,
    #[error("missing or unsupported op")]
    UnsupportedOp,
    #[error("missing source.table")]
    NoTable,
    #[error("missing row image (after for c/u/r, before for d)")]
    NoImage,
    #[error("a record without a Debezium envelope (flattened, e.g. by ExtractNewRecordState): configure the connector without that transform")]
    Flattened,
    #[error("event time (source.ts_ms, else ts_ms) missing, zero or outside source.event_time_window")]
    BadTimestamp,
}

impl DecodeError {
    /// Short stable name, used as a quarantine reason and metric label.
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::Malformed => "malformed_json",
            DecodeError::UnsupportedOp => "unsupported_op",
            DecodeError::NoTable => "no_table",
            DecodeError::NoImage => "no_row_image",
            DecodeError::Flattened => "flattened_record",
            DecodeError::BadTimestamp => "bad_timestamp",
        }
    }
}

/// A record on a change topic that is not a row change: Debezium writes these beside the
/// changes (transaction metadata, heartbeats, schema changes, logical decoding messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ControlKind {
    TransactionBegin,
    TransactionEnd,
    Heartbeat,
    SchemaChange,
    /// `op = "m"`: a message written with `pg_logical_emit_message`.
    Message,
}

impl ControlKind {
    /// Short stable name (summary key, metric label, quarantine detail).
    pub fn name(self) -> &'static str {
        match self {
            ControlKind::TransactionBegin => "transaction_begin",
            ControlKind::TransactionEnd => "transaction_end",
            ControlKind::Heartbeat => "heartbeat",
            ControlKind::SchemaChange => "schema_change",
            ControlKind::Message => "logical_message",
        }
    }

    /// What the record was, for a quarantine row.
    pub fn describe(self) -> &'static str {
        match self {
            ControlKind::TransactionBegin => "a transaction metadata record (status BEGIN), not a row change",
            ControlKind::TransactionEnd => "a transaction metadata record (status END), not a row change",
            ControlKind::Heartbeat => "a Debezium heartbeat (ts_ms only), not a row change",
            ControlKind::SchemaChange => "a schema change event (ddl/tableChanges), not a row change",
            ControlKind::Message => "a logical decoding message (op m), not a row change",
        }
    }
}

/// Decoding settings a source's configuration gives.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Event times (ms since the epoch) outside `[min, max)` are not plausible: the event is
    /// rejected (`bad_timestamp`) rather than written into a partition of year 54,000.
    pub event_time_window_ms: (i64, i64),
    /// Whether an event without a time is read all the same (its time 0): only to attribute.
    pub time_optional: bool,
}

impl DecodeOptions {
    /// 1900-01-01 and 2200-01-01.
    pub const DEFAULT_EVENT_TIME_WINDOW_MS: (i64, i64) = (-2_208_988_800_000, 7_258_118_400_000);

    /// Every structurally readable event, whatever its time: to find whose an event already
    /// refused is (an erased subject's is dropped, not quarantined; an erasure attributes it).
    pub fn any_time() -> Self {
        Self {
            event_time_window_ms: (i64::MIN, i64::MAX),
            time_optional: true,
        }
    }
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            event_time_window_ms: Self::DEFAULT_EVENT_TIME_WINDOW_MS,
            time_optional: false,
        }
    }
}

/// What one line of a change topic holds.
#[derive(Debug)]
pub enum Decoded<'a> {
    Change(Event<'a>),
    /// `null`, or a wrapper whose payload is null: Kafka's marker for log compaction.
    Tombstone,
    Control(ControlKind),
}

/// A decoded change event.
#[derive(Debug)]
pub struct Event<'a> {
    pub op: Op,
    /// `schema` (PostgreSQL) or `db` (MySQL), then the table.
    pub namespace: Option<Cow<'a, str>>,
    pub table: Cow<'a, str>,
    /// `source.db`: the database (PostgreSQL) or the database holding the table (MySQL).
    pub database: Option<Cow<'a, str>>,
    /// Whether the source names a schema apart from the database (PostgreSQL, SQL Server).
    pub has_schema: bool,
    /// `source.ts_ms`, else the envelope's `ts_ms` (a zero is absent: MySQL snapshot rows).
    pub event_ms: i64,
    /// `after` for creates, updates and reads; `before` for deletes; empty for truncates.
    pub image: Row<'a>,
    /// The `before` image of an update, when the source sends it: where an unchanged TOAST
    /// value Debezium left out (`__debezium_unavailable_value`) may still be found.
    pub previous: Option<Row<'a>>,
    /// Columns the capture could not carry faithfully (`source.sluice_unavailable`: an
    /// unsupported type, an unchanged TOAST value without the old row); absent from the image.
    pub unavailable: Vec<Cow<'a, str>>,
    /// The Kafka Connect schema of a wrapped event (`{"schema", "payload"}`), as JSON text.
    pub schema: Option<&'a str>,
}

impl Event<'_> {
    /// `namespace.table`, as policies name tables.
    pub fn qualified_table(&self, out: &mut String) {
        out.clear();
        if let Some(ns) = &self.namespace {
            out.push_str(ns);
            out.push('.');
        }
        out.push_str(&self.table);
    }
}

impl<'a> Event<'a> {
    /// The text of `column` in the row image, else in the before image: how a subject id is
    /// read wherever it is (ingest's quarantine, an erasure attributing a quarantined event).
    /// `None` when absent, null or not readable as JSON text.
    pub fn subject_text(&self, column: &str) -> Option<Cow<'a, str>> {
        [Some(&self.image), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|row| row.get(column))
            .find_map(|raw| value_text(raw).ok().flatten().map(Sensitive::into_inner))
    }
}

/// One row image: column names with their raw JSON values, in event order.
#[derive(Default)]
pub struct Row<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Row<'a> {
    /// The raw value of `column`, if the image has it.
    pub fn get(&self, column: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(c, _)| c == column).map(|(_, v)| *v)
    }
}

/// Column names only: a row's values must never reach a log line.
impl std::fmt::Debug for Row<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(name, _)| name)).finish()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Row<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Row<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row image object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Row<'a>, M::Error> {
                let mut cols = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(entry) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    cols.push(entry);
                }
                Ok(Row(cols))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    /// The Connect schema of a wrapped event.
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    /// `Some("null")` for a wrapper whose payload is null (a plain `Option` would lose that).
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    before: Option<Row<'a>>,
    #[serde(borrow, default)]
    after: Option<Row<'a>>,
    #[serde(borrow, default)]
    source: Option<Source<'a>>,
    #[serde(default)]
    ts_ms: Option<i64>,
    // What tells control records apart (none of these is in a change event).
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ddl: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "tableChanges")]
    table_changes: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Source<'a> {
    #[serde(borrow, default)]
    db: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    schema: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    table: Option<Cow<'a, str>>,
    #[serde(default)]
    ts_ms: Option<i64>,
    #[serde(borrow, default)]
    sluice_unavailable: Vec<Cow<'a, str>>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Decodes one line of a change topic. `known_schemas`: schema texts of wrapped events read
/// before; a line that repeats one exactly (`{"schema":<it>,"payload":…}`, as the JSON
/// converter writes every event of a table) is decoded without reading the schema again.
pub fn decode<'a>(line: &'a [u8], options: &DecodeOptions, known_schemas: &[&str]) -> Result<Decoded<'a>, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::Malformed)?;
    if let Some((schema, payload)) = known_schemas.iter().find_map(|known| split_known_wrapper(text, known)) {
        // Anything after the payload makes this fail: the full path then reads the line.
        if let Ok(env) = serde_json::from_str::<Envelope<'_>>(payload) {
            if env.op.is_some() {
                return decoded(env, payload, Some(schema), options);
            }
        }
    }
    if text.trim() == "null" {
        return Ok(Decoded::Tombstone);
    }
    let mut env: Envelope<'_> = serde_json::from_str(text).map_err(|_| DecodeError::Malformed)?;
    let mut body = text;
    let mut schema = None;
    if env.op.is_none() {
        if let Some(payload) = env.payload {
            if payload.get() == "null" {
                return Ok(Decoded::Tombstone);
            }
            schema = env.schema.filter(|s| s.get() != "null").map(RawValue::get);
            body = payload.get();
            env = serde_json::from_str(body).map_err(|_| DecodeError::Malformed)?;
        }
    }
    decoded(env, body, schema, options)
}

/// `(schema, payload)` of a line that is exactly `{"schema":<known>,"payload":<payload>}`.
fn split_known_wrapper<'a>(text: &'a str, known: &str) -> Option<(&'a str, &'a str)> {
    let rest = text.strip_prefix("{\"schema\":")?;
    if !rest.starts_with(known) {
        return None;
    }
    let (schema, rest) = rest.split_at(known.len());
    let payload = rest.strip_prefix(",\"payload\":")?.trim_end().strip_suffix('}')?;
    Some((schema, payload))
}

/// A change event (or control record) from its envelope.
fn decoded<'a>(
    env: Envelope<'a>,
    body: &'a str,
    schema: Option<&'a str>,
    options: &DecodeOptions,
) -> Result<Decoded<'a>, DecodeError> {
    let Some(code) = env.op.as_deref() else {
        return classify_without_op(&env, body);
    };
    if code == "m" {
        return Ok(Decoded::Control(ControlKind::Message));
    }
    let op = Op::from_code(code).ok_or(DecodeError::UnsupportedOp)?;
    let source = env.source.ok_or(DecodeError::NoTable)?;
    // Empty names are absent (Debezium writes `"schema": ""` for a logical message's source).
    let named = |name: Option<Cow<'a, str>>| name.filter(|n| !n.is_empty());
    let table = named(source.table).ok_or(DecodeError::NoTable)?;
    // MySQL snapshot rows carry `source.ts_ms: 0`: the envelope's time is the better one.
    let positive = |t: Option<i64>| t.filter(|t| *t > 0);
    let event_ms = positive(source.ts_ms)
        .or(positive(env.ts_ms))
        .filter(|t| (options.event_time_window_ms.0..options.event_time_window_ms.1).contains(t))
        .or(options.time_optional.then_some(0))
        .ok_or(DecodeError::BadTimestamp)?;
    let (image, previous) = match op {
        Op::Truncate => (Row::default(), None),
        Op::Delete => (env.before.ok_or(DecodeError::NoImage)?, None),
        _ => (env.after.ok_or(DecodeError::NoImage)?, env.before),
    };
    Ok(Decoded::Change(Event {
        op,
        has_schema: named(source.schema.clone()).is_some(),
        namespace: named(source.schema).or(named(source.db.clone())),
        table,
        database: named(source.db),
        event_ms,
        image,
        previous,
        unavailable: source.sluice_unavailable,
        schema,
    }))
}

/// A record without `op`: a control record Debezium writes beside the changes, a flattened
/// record, or something else.
fn classify_without_op<'a>(env: &Envelope<'a>, body: &'a str) -> Result<Decoded<'a>, DecodeError> {
    // Rare path: the keys decide, so that a flattened row with a `status` or `ddl` column is
    // not taken for a control record.
    let fields: Row<'_> = serde_json::from_str(body).map_err(|_| DecodeError::Malformed)?;
    let only = |allowed: &[&str]| fields.0.iter().all(|(k, _)| allowed.contains(&k.as_ref()));
    const TRANSACTION: &[&str] = &["status", "id", "ts_ms", "event_count", "data_collections"];
    const SCHEMA_CHANGE: &[&str] = &["source", "ts_ms", "databaseName", "schemaName", "ddl", "tableChanges"];
    match env.status.as_deref() {
        Some("BEGIN") if only(TRANSACTION) => return Ok(Decoded::Control(ControlKind::TransactionBegin)),
        Some("END") if only(TRANSACTION) => return Ok(Decoded::Control(ControlKind::TransactionEnd)),
        _ => {}
    }
    if (env.ddl.is_some() || env.table_changes.is_some()) && only(SCHEMA_CHANGE) {
        return Ok(Decoded::Control(ControlKind::SchemaChange));
    }
    if env.before.is_some() || env.after.is_some() || env.source.is_some() {
        return Err(DecodeError::UnsupportedOp);
    }
    // A heartbeat is `{"ts_ms": …}` and nothing else.
    if !fields.0.is_empty() && only(&["ts_ms"]) {
        return Ok(Decoded::Control(ControlKind::Heartbeat));
    }
    Err(DecodeError::Flattened)
}

/// Objects and arrays nested deeper than this are malformed: readers downstream refuse them
/// (Python's `json`, serde_json's `Value`: 128 levels).
pub(crate) const MAX_NESTING: usize = 128;

/// The text of a JSON scalar (strings unescaped); objects and arrays stay JSON; null is `None`.
pub fn value_text(raw: &RawValue) -> Result<Option<Sensitive<Cow<'_, str>>>, DecodeError> {
    let s = raw.get();
    let text = match s.as_bytes().first() {
        Some(b'n') => return Ok(None),
        Some(b'"') => serde_json::from_str::<Cow<'_, str>>(s).map_err(|_| DecodeError::Malformed)?,
        Some(b'[' | b'{') if nesting_exceeds(s, MAX_NESTING) => return Err(DecodeError::Malformed),
        _ => Cow::Borrowed(s),
    };
    Ok(Some(Sensitive::new(text)))
}

/// Whether JSON text (already valid) nests objects and arrays deeper than `max`.
fn nesting_exceeds(json: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(line: &[u8]) -> Event<'_> {
        match decode(line, &DecodeOptions::default(), &[]) {
            Ok(Decoded::Change(e)) => e,
            other => panic!("not a change: {other:?}"),
        }
    }

    fn fails(line: &[u8]) -> DecodeError {
        decode(line, &DecodeOptions::default(), &[]).unwrap_err()
    }

    fn control(line: &[u8]) -> ControlKind {
        match decode(line, &DecodeOptions::default(), &[]) {
            Ok(Decoded::Control(kind)) => kind,
            other => panic!("not a control record: {other:?}"),
        }
    }

    #[test]
    fn bare_and_wrapped_events_decode_alike() {
        let bare = br#"{"op":"c","before":null,"after":{"id":1,"email":"a\"b@x.test","tags":[1,2]},"source":{"db":"crm","schema":"public","table":"customers","lsn":5,"ts_ms":1700000000000},"ts_ms":1}"#;
        let wrapped = format!(
            r#"{{"schema":{{"type":"struct","fields":[]}},"payload":{}}}"#,
            std::str::from_utf8(bare).unwrap()
        );
        for (line, wrapped) in [(bare.to_vec(), false), (wrapped.into_bytes(), true)] {
            let e = change(&line);
            let mut name = String::new();
            e.qualified_table(&mut name);
            assert_eq!(name, "public.customers");
            assert_eq!(e.database.as_deref(), Some("crm"));
            assert_eq!(e.op, Op::Create);
            assert_eq!(e.event_ms, 1_700_000_000_000);
            assert_eq!(e.schema.is_some(), wrapped);
            let cols: Vec<(String, Option<String>)> = e
                .image
                .0
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        value_text(v).unwrap().map(|c| c.into_inner().into_owned()),
                    )
                })
                .collect();
            assert_eq!(
                cols,
                vec![
                    ("id".into(), Some("1".into())),
                    ("email".into(), Some("a\"b@x.test".into())),
                    ("tags".into(), Some("[1,2]".into()))
                ]
            );
        }
    }

    #[test]
    fn a_repeated_schema_is_not_read_again_and_anything_else_takes_the_full_path() {
        let schema = r#"{"type":"struct","fields":[{"type":"struct","field":"after","fields":[]}]}"#;
        let payload = r#"{"op":"c","after":{"id":1},"source":{"table":"t","ts_ms":5}}"#;
        let line = format!(r#"{{"schema":{schema},"payload":{payload}}}"#);
        assert_eq!(split_known_wrapper(&line, schema), Some((schema, payload)));
        let options = DecodeOptions::default();
        for known in [&[][..], &[schema]] {
            let Ok(Decoded::Change(e)) = decode(line.as_bytes(), &options, known) else {
                panic!("a change")
            };
            assert_eq!((e.schema, e.image.0.len()), (Some(schema), 1));
        }
        // A key after the payload, a second payload: not the fast path's shape, so the full
        // reader decides (and refuses the duplicate).
        let extra = format!(r#"{{"schema":{schema},"payload":{payload},"x":1}}"#);
        assert!(matches!(
            decode(extra.as_bytes(), &options, &[schema]),
            Ok(Decoded::Change(_))
        ));
        let twice = format!(r#"{{"schema":{schema},"payload":{payload},"payload":{payload}}}"#);
        assert_eq!(
            decode(twice.as_bytes(), &options, &[schema]).unwrap_err(),
            DecodeError::Malformed
        );
        let tombstone = format!(r#"{{"schema":{schema},"payload":null}}"#);
        assert!(matches!(
            decode(tombstone.as_bytes(), &options, &[schema]),
            Ok(Decoded::Tombstone)
        ));
    }

    #[test]
    fn deletes_use_before_and_bad_events_say_why() {
        let d = br#"{"op":"d","before":{"id":7},"after":null,"source":{"db":"crm","table":"t","ts_ms":5}}"#;
        let e = change(d);
        assert_eq!(
            (e.op, e.namespace.as_deref(), e.image.0.len()),
            (Op::Delete, Some("crm"), 1)
        );
        assert_eq!(fails(b"{not json"), DecodeError::Malformed);
        assert_eq!(
            fails(br#"{"op":"x","source":{"table":"t"}}"#),
            DecodeError::UnsupportedOp
        );
        assert_eq!(fails(br#"{"op":"c","after":{}}"#), DecodeError::NoTable);
        assert_eq!(
            fails(br#"{"op":"c","after":{},"source":{"table":""}}"#),
            DecodeError::NoTable
        );
        let e = change(br#"{"op":"c","after":{},"source":{"db":"d","schema":"","table":"t","ts_ms":5}}"#);
        assert_eq!(e.namespace.as_deref(), Some("d"));
        assert_eq!(
            fails(br#"{"op":"c","source":{"table":"t","ts_ms":5}}"#),
            DecodeError::NoImage
        );
        assert!(matches!(
            decode(b"null", &DecodeOptions::default(), &[]),
            Ok(Decoded::Tombstone)
        ));
        assert!(matches!(
            decode(br#"{"schema":null,"payload":null}"#, &DecodeOptions::default(), &[]),
            Ok(Decoded::Tombstone)
        ));
    }

    #[test]
    fn event_times_fall_back_and_must_be_plausible() {
        // MySQL snapshot rows: source.ts_ms 0, the envelope's ts_ms is the time.
        let e = change(
            br#"{"op":"r","after":{"id":1},"source":{"db":"inventory","table":"t","ts_ms":0},"ts_ms":1700000000000}"#,
        );
        assert_eq!(e.event_ms, 1_700_000_000_000);
        assert_eq!(e.namespace.as_deref(), Some("inventory"));
        // Nanoseconds by mistake, or no time at all: rejected, never a partition in year 54,000.
        for line in [
            &br#"{"op":"c","after":{"id":1},"source":{"table":"t","ts_ms":1704067200000000000}}"#[..],
            br#"{"op":"c","after":{"id":1},"source":{"table":"t","ts_ms":0},"ts_ms":0}"#,
            br#"{"op":"c","after":{"id":1},"source":{"table":"t"}}"#,
            br#"{"op":"c","after":{"id":1},"source":{"table":"t","ts_ms":-9223372036854775808}}"#,
        ] {
            assert_eq!(fails(line), DecodeError::BadTimestamp);
        }
        let narrow = DecodeOptions {
            event_time_window_ms: (0, 1000),
            ..DecodeOptions::default()
        };
        assert!(decode(
            br#"{"op":"c","after":{"id":1},"source":{"table":"t","ts_ms":999}}"#,
            &narrow,
            &[]
        )
        .is_ok());
        assert!(decode(
            br#"{"op":"c","after":{"id":1},"source":{"table":"t","ts_ms":1000}}"#,
            &narrow,
            &[]
        )
        .is_err());
    }

    #[test]
    fn values_nested_too_deep_are_malformed() {
        let raw = |t: &str| serde_json::from_str::<Box<RawValue>>(t).unwrap();
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert_eq!(value_text(&raw(&deep)).unwrap_err(), DecodeError::Malformed);
        let fine = format!("{}\"[[[{{\\\"\"{}", "[".repeat(128), "]".repeat(128));
        assert_eq!(value_text(&raw(&fine)).unwrap().unwrap().expose().len(), fine.len());
    }

    #[test]
    fn updates_keep_their_before_image() {
        let e = change(br#"{"op":"u","before":{"id":1,"doc":"old"},"after":{"id":1,"doc":"__debezium_unavailable_value"},"source":{"table":"t","ts_ms":5}}"#);
        assert_eq!(e.previous.unwrap().get("doc").unwrap().get(), r#""old""#);
    }

    #[test]
    fn control_records_are_named_and_flattened_records_refused() {
        // Debezium's transaction metadata topic records, a heartbeat, a MySQL schema change.
        assert_eq!(
            control(br#"{"status":"BEGIN","id":"571:53195829","event_count":null,"data_collections":null,"ts_ms":1486500577125}"#),
            ControlKind::TransactionBegin
        );
        assert_eq!(
            control(br#"{"schema":{"type":"struct","fields":[]},"payload":{"status":"END","id":"571:53195832","ts_ms":1486500577691,"event_count":2,"data_collections":[]}}"#),
            ControlKind::TransactionEnd
        );
        assert_eq!(control(br#"{"ts_ms":1588252618953}"#), ControlKind::Heartbeat);
        assert_eq!(
            control(br#"{"source":{"db":"inventory","table":"t"},"databaseName":"inventory","ddl":"ALTER TABLE t ADD c INT","tableChanges":[]}"#),
            ControlKind::SchemaChange
        );
        assert_eq!(
            control(br#"{"op":"m","ts_ms":1,"source":{"table":""},"message":{"prefix":"p","content":"Ynl0ZXM="}}"#),
            ControlKind::Message
        );
        // ExtractNewRecordState's output: the row itself, with `__`-prefixed metadata.
        assert_eq!(
            fails(br#"{"id":1,"email":"a@b.test","__op":"c","__table":"customers","__deleted":"false"}"#),
            DecodeError::Flattened
        );
        assert_eq!(fails(br#"{"id":1,"ts_ms":5}"#), DecodeError::Flattened);
        // Rows that merely have a `status` or `ddl` column are not control records.
        assert_eq!(
            fails(br#"{"id":"7","status":"END","ts_ms":5,"amount":3}"#),
            DecodeError::Flattened
        );
        assert_eq!(fails(br#"{"id":7,"ddl":"x","owner":"y"}"#), DecodeError::Flattened);
        assert_eq!(
            fails(br#"{"before":{"id":1},"source":{"table":"t"}}"#),
            DecodeError::UnsupportedOp
        );
    }
}
