//! Decoding of Debezium JSON change events, with or without the `{"schema", "payload"}`
//! wrapper. Borrowing: a row image is a list of (column, raw JSON) pairs pointing into the line,
//! so nothing is copied until a policy asks for a column.

use std::borrow::Cow;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_transforms::{Op, Sensitive};

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
}

impl DecodeError {
    /// Short stable name, used as a quarantine reason and metric label.
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::Malformed => "malformed_json",
            DecodeError::UnsupportedOp => "unsupported_op",
            DecodeError::NoTable => "no_table",
            DecodeError::NoImage => "no_row_image",
        }
    }
}

/// A decoded change event.
#[derive(Debug)]
pub struct Event<'a> {
    pub op: Op,
    /// `schema` (PostgreSQL) or `db` (MySQL), then the table.
    pub namespace: Option<Cow<'a, str>>,
    pub table: Cow<'a, str>,
    /// `source.ts_ms`, else the envelope's `ts_ms`, else 0.
    pub event_ms: i64,
    /// `after` for creates, updates and reads; `before` for deletes; empty for truncates.
    pub image: Row<'a>,
    /// Columns the capture could not carry faithfully (`source.sluice_unavailable`: an
    /// unsupported type, an unchanged TOAST value without the old row); absent from the image.
    pub unavailable: Vec<Cow<'a, str>>,
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

/// One row image: column names with their raw JSON values, in event order.
#[derive(Default)]
pub struct Row<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

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

/// Decodes one line. `Ok(None)` is a tombstone (`null`, or a wrapper whose payload is null):
/// Kafka's marker for log compaction, not a change.
pub fn decode(line: &[u8]) -> Result<Option<Event<'_>>, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::Malformed)?;
    if text.trim() == "null" {
        return Ok(None);
    }
    let mut env: Envelope<'_> = serde_json::from_str(text).map_err(|_| DecodeError::Malformed)?;
    if env.op.is_none() {
        if let Some(payload) = env.payload {
            if payload.get() == "null" {
                return Ok(None);
            }
            env = serde_json::from_str(payload.get()).map_err(|_| DecodeError::Malformed)?;
        }
    }
    let op = env
        .op
        .as_deref()
        .and_then(Op::from_code)
        .ok_or(DecodeError::UnsupportedOp)?;
    let source = env.source.ok_or(DecodeError::NoTable)?;
    let table = source.table.ok_or(DecodeError::NoTable)?;
    let image = match op {
        Op::Truncate => Row::default(),
        Op::Delete => env.before.ok_or(DecodeError::NoImage)?,
        _ => env.after.ok_or(DecodeError::NoImage)?,
    };
    Ok(Some(Event {
        op,
        namespace: source.schema.or(source.db),
        table,
        event_ms: source.ts_ms.or(env.ts_ms).unwrap_or(0),
        image,
        unavailable: source.sluice_unavailable,
    }))
}

/// The text of a JSON scalar (strings unescaped); objects and arrays stay JSON; null is `None`.
pub fn value_text(raw: &RawValue) -> Result<Option<Sensitive<Cow<'_, str>>>, DecodeError> {
    let s = raw.get();
    let text = match s.as_bytes().first() {
        Some(b'n') => return Ok(None),
        Some(b'"') => serde_json::from_str::<Cow<'_, str>>(s).map_err(|_| DecodeError::Malformed)?,
        _ => Cow::Borrowed(s),
    };
    Ok(Some(Sensitive::new(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_and_wrapped_events_decode_alike() {
        let bare = br#"{"op":"c","before":null,"after":{"id":1,"email":"a\"b@x.test","tags":[1,2]},"source":{"db":"crm","schema":"public","table":"customers","lsn":5,"ts_ms":1700000000000},"ts_ms":1}"#;
        let wrapped = format!(
            r#"{{"schema":{{"type":"struct","fields":[]}},"payload":{}}}"#,
            std::str::from_utf8(bare).unwrap()
        );
        for line in [bare.to_vec(), wrapped.into_bytes()] {
            let e = decode(&line).unwrap().unwrap();
            let mut name = String::new();
            e.qualified_table(&mut name);
            assert_eq!(name, "public.customers");
            assert_eq!(e.op, Op::Create);
            assert_eq!(e.event_ms, 1_700_000_000_000);
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
    fn deletes_use_before_and_bad_events_say_why() {
        let d = br#"{"op":"d","before":{"id":7},"after":null,"source":{"db":"crm","table":"t"}}"#;
        let e = decode(d).unwrap().unwrap();
        assert_eq!(
            (e.op, e.namespace.as_deref(), e.image.0.len()),
            (Op::Delete, Some("crm"), 1)
        );
        assert_eq!(decode(b"{not json").unwrap_err(), DecodeError::Malformed);
        assert_eq!(
            decode(br#"{"op":"x","source":{"table":"t"}}"#).unwrap_err(),
            DecodeError::UnsupportedOp
        );
        assert_eq!(decode(br#"{"op":"c","after":{}}"#).unwrap_err(), DecodeError::NoTable);
        assert_eq!(
            decode(br#"{"op":"c","source":{"table":"t"}}"#).unwrap_err(),
            DecodeError::NoImage
        );
        assert!(decode(b"null").unwrap().is_none());
        assert!(decode(br#"{"schema":null,"payload":null}"#).unwrap().is_none());
    }
}
