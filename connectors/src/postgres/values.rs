//! PostgreSQL text values → the JSON a Debezium PostgreSQL connector would emit, and the
//! Debezium change-event envelope around a row. The snapshot (COPY text) and the stream
//! (pgoutput text) both come through here, so a row reads the same either way.
//!
//! Sessions are pinned to `TimeZone=UTC`, `DateStyle=ISO`, `bytea_output=hex`,
//! `extra_float_digits=3` so every value has one text form.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine;

use super::pgoutput::Datum;

/// Session settings every connection sluice opens uses (as a libpq `options` string).
pub(crate) const SESSION_OPTIONS: &str =
    "-c TimeZone=UTC -c DateStyle=ISO -c bytea_output=hex -c extra_float_digits=3 -c IntervalStyle=iso_8601";

/// How a PostgreSQL type is written to JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TypeKind {
    Bool,
    /// Integers: the text is a JSON number.
    Integer,
    /// float and numeric: a JSON number when finite, else a string (`NaN`, `Infinity`).
    Decimal,
    /// Text, varchar, uuid, enums, time, interval, inet…: a JSON string.
    Text,
    /// json / jsonb: the document as a string (Debezium's `io.debezium.data.Json`).
    Json,
    /// bytea: base64 (Debezium's default `binary.handling.mode`).
    Bytes,
    /// date: `YYYY-MM-DD`.
    Date,
    /// timestamp without time zone: `YYYY-MM-DDTHH:MM:SS[.ffffff]`.
    Timestamp,
    /// timestamp with time zone: `…Z` (sessions run in UTC).
    TimestampTz,
    Array(Box<TypeKind>),
    /// Not mapped (geometry, composite, range, money…): such a value is never written; an
    /// event whose policy names the column is quarantined.
    Unsupported,
}

/// A row of `pg_type`: oid, typname, typtype, typelem, typcategory, typbasetype.
pub(crate) struct TypeRow {
    pub oid: u32,
    pub name: String,
    pub typtype: u8,
    pub elem: u32,
    pub category: u8,
    pub base: u32,
}

/// Type OID → how its values are written.
#[derive(Default)]
pub(crate) struct TypeCatalog {
    kinds: HashMap<u32, TypeKind>,
    names: HashMap<u32, String>,
}

fn kind_by_name(name: &str) -> TypeKind {
    match name {
        "bool" => TypeKind::Bool,
        "int2" | "int4" | "int8" | "oid" => TypeKind::Integer,
        "float4" | "float8" | "numeric" => TypeKind::Decimal,
        "text" | "varchar" | "bpchar" | "char" | "name" | "uuid" | "citext" | "inet" | "cidr" | "macaddr"
        | "macaddr8" | "time" | "timetz" | "interval" | "xml" | "bit" | "varbit" => TypeKind::Text,
        "json" | "jsonb" => TypeKind::Json,
        "bytea" => TypeKind::Bytes,
        "date" => TypeKind::Date,
        "timestamp" => TypeKind::Timestamp,
        "timestamptz" => TypeKind::TimestampTz,
        _ => TypeKind::Unsupported,
    }
}

impl TypeCatalog {
    pub(crate) fn new(rows: &[TypeRow]) -> Self {
        let by_oid: HashMap<u32, &TypeRow> = rows.iter().map(|r| (r.oid, r)).collect();
        fn resolve(row: &TypeRow, by_oid: &HashMap<u32, &TypeRow>, depth: u8) -> TypeKind {
            if depth > 8 {
                return TypeKind::Unsupported;
            }
            match row.typtype {
                b'e' => TypeKind::Text,
                b'd' => by_oid
                    .get(&row.base)
                    .map(|b| resolve(b, by_oid, depth + 1))
                    .unwrap_or(TypeKind::Unsupported),
                _ if row.category == b'A' && row.elem != 0 => {
                    match by_oid.get(&row.elem).map(|e| resolve(e, by_oid, depth + 1)) {
                        Some(TypeKind::Unsupported) | None => TypeKind::Unsupported,
                        Some(k) => TypeKind::Array(Box::new(k)),
                    }
                }
                b'b' => kind_by_name(&row.name),
                _ => TypeKind::Unsupported,
            }
        }
        Self {
            kinds: rows.iter().map(|r| (r.oid, resolve(r, &by_oid, 0))).collect(),
            names: rows.iter().map(|r| (r.oid, r.name.clone())).collect(),
        }
    }

    /// `None` for a type created after the catalog was read (reload it).
    pub(crate) fn kind(&self, oid: u32) -> Option<&TypeKind> {
        self.kinds.get(&oid)
    }

    pub(crate) fn name(&self, oid: u32) -> &str {
        self.names.get(&oid).map(String::as_str).unwrap_or("unknown")
    }
}

/// A value that cannot be written faithfully (unsupported type, unparsable text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unwritable;

/// Appends `text` (a value's PostgreSQL text form) as JSON; on `Err` nothing is appended.
pub(crate) fn write_value(kind: &TypeKind, text: &[u8], out: &mut Vec<u8>) -> Result<(), Unwritable> {
    let s = std::str::from_utf8(text).map_err(|_| Unwritable)?;
    match kind {
        TypeKind::Bool => out.extend_from_slice(match s {
            "t" => b"true",
            "f" => b"false",
            _ => return Err(Unwritable),
        }),
        TypeKind::Integer => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Unwritable);
            }
            out.extend_from_slice(s.as_bytes());
        }
        TypeKind::Decimal => match s.parse::<f64>() {
            // JSON has no leading `+`, no bare `.5`, no `NaN`: keep the exact text when it is a
            // JSON number, else write a string.
            Ok(v) if v.is_finite() && is_json_number(s) => out.extend_from_slice(s.as_bytes()),
            _ => write_string(s, out),
        },
        TypeKind::Text | TypeKind::Json | TypeKind::Date => write_string(s, out),
        TypeKind::Timestamp => write_string(&s.replacen(' ', "T", 1), out),
        TypeKind::TimestampTz => write_string(&timestamptz_iso(s), out),
        TypeKind::Bytes => {
            let hex_text = s.strip_prefix("\\x").ok_or(Unwritable)?;
            let bytes = hex::decode(hex_text).map_err(|_| Unwritable)?;
            write_string(&base64::engine::general_purpose::STANDARD.encode(bytes), out);
        }
        TypeKind::Array(elem) => {
            let start = out.len();
            let mut p = ArrayParser { s: s.as_bytes(), i: 0 };
            if p.array(elem, out).is_err() || p.i != p.s.len() {
                out.truncate(start);
                return Err(Unwritable);
            }
        }
        TypeKind::Unsupported => return Err(Unwritable),
    }
    Ok(())
}

fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    let leading_digit = digits.first().is_some_and(u8::is_ascii_digit);
    let leading_zero = digits.len() > 1 && digits[0] == b'0' && digits[1].is_ascii_digit();
    leading_digit && !leading_zero && !s.ends_with('.') && !s.contains(".e")
}

/// `2024-01-02 03:04:05.5+00` → `2024-01-02T03:04:05.5Z`; other offsets become `±HH:MM`.
fn timestamptz_iso(s: &str) -> String {
    let t = s.replacen(' ', "T", 1);
    if let Some(base) = t.strip_suffix("+00") {
        return format!("{base}Z");
    }
    let bytes = t.as_bytes();
    let n = bytes.len();
    if n > 3 && (bytes[n - 3] == b'+' || bytes[n - 3] == b'-') && bytes[n - 2..].iter().all(u8::is_ascii_digit) {
        return format!("{t}:00");
    }
    t
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// PostgreSQL array literals: `{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`.
struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn array(&mut self, elem: &TypeKind, out: &mut Vec<u8>) -> Result<(), Unwritable> {
        if self.peek() != Some(b'{') {
            return Err(Unwritable); // includes `[1:2]={…}` bounds decoration
        }
        self.i += 1;
        out.push(b'[');
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            match self.peek() {
                Some(b'{') => self.array(elem, out)?,
                Some(b'"') => {
                    self.i += 1;
                    let mut text = Vec::new();
                    loop {
                        match self.peek().ok_or(Unwritable)? {
                            b'\\' => {
                                text.push(*self.s.get(self.i + 1).ok_or(Unwritable)?);
                                self.i += 2;
                            }
                            b'"' => {
                                self.i += 1;
                                break;
                            }
                            c => {
                                text.push(c);
                                self.i += 1;
                            }
                        }
                    }
                    write_value(elem, &text, out)?;
                }
                Some(_) => {
                    let start = self.i;
                    while !matches!(self.peek(), Some(b',') | Some(b'}') | None) {
                        self.i += 1;
                    }
                    let token = &self.s[start..self.i];
                    if token.eq_ignore_ascii_case(b"NULL") {
                        out.extend_from_slice(b"null");
                    } else {
                        write_value(elem, token, out)?;
                    }
                }
                None => return Err(Unwritable),
            }
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    out.push(b',');
                }
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return Ok(());
                }
                _ => return Err(Unwritable),
            }
        }
    }
}

/// One line of `COPY … TO STDOUT` text format: tab-separated, `\N` for null, backslash escapes.
pub(crate) fn parse_copy_line(line: &[u8]) -> Vec<Option<Cow<'_, [u8]>>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.split(|&b| b == b'\t')
        .map(|field| {
            if field == b"\\N" {
                return None;
            }
            if !field.contains(&b'\\') {
                return Some(Cow::Borrowed(field));
            }
            let mut out = Vec::with_capacity(field.len());
            let mut i = 0;
            while i < field.len() {
                let c = field[i];
                if c != b'\\' || i + 1 == field.len() {
                    out.push(c);
                    i += 1;
                    continue;
                }
                let e = field[i + 1];
                i += 2;
                match e {
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'v' => out.push(11),
                    b'0'..=b'7' => {
                        let mut v = (e - b'0') as u32;
                        let mut k = 0;
                        while k < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                            v = v * 8 + (field[i] - b'0') as u32;
                            i += 1;
                            k += 1;
                        }
                        out.push(v as u8);
                    }
                    b'x' => {
                        let mut v = 0u32;
                        let mut k = 0;
                        while k < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                            v = v * 16 + (field[i] as char).to_digit(16).expect("hex digit");
                            i += 1;
                            k += 1;
                        }
                        out.push(v as u8);
                    }
                    other => out.push(other),
                }
            }
            Some(Cow::Owned(out))
        })
        .collect()
}

/// A captured table's columns as the event writer needs them.
#[derive(Debug, Clone)]
pub(crate) struct TableShape {
    pub schema: String,
    pub table: String,
    pub columns: Vec<(String, TypeKind)>,
}

/// Where an event comes from, for its `source` block.
pub(crate) struct EventSource<'a> {
    pub connector_name: &'a str,
    pub database: &'a str,
    /// Commit LSN (0 for snapshot rows).
    pub lsn: u64,
    pub xid: u32,
    pub commit_ms: i64,
    pub snapshot: bool,
}

/// A row image: one datum per column of the shape.
pub(crate) type Image<'a, 'b> = &'b [Datum<'a>];

/// Writes one Debezium change event (`op` c/u/d/r/t) as a JSON line. Columns whose value cannot
/// be written faithfully (unsupported type; an unchanged TOAST value with no old row to take
/// it from) are left out of the images and listed in `source.sluice_unavailable`, so an event
/// whose policy needs one is quarantined instead of carrying a placeholder.
pub(crate) fn write_event(
    out: &mut Vec<u8>,
    op: u8,
    shape: &TableShape,
    before: Option<Image<'_, '_>>,
    after: Option<Image<'_, '_>>,
    source: &EventSource<'_>,
    now_ms: i64,
) {
    let mut unavailable: Vec<&str> = Vec::new();
    out.extend_from_slice(b"{\"op\":\"");
    out.push(op);
    out.extend_from_slice(b"\",\"before\":");
    write_image(out, shape, before, None, &mut unavailable);
    out.extend_from_slice(b",\"after\":");
    write_image(out, shape, after, before, &mut unavailable);
    out.extend_from_slice(b",\"source\":{\"connector\":\"postgresql\",\"name\":");
    write_string(source.connector_name, out);
    out.extend_from_slice(b",\"db\":");
    write_string(source.database, out);
    out.extend_from_slice(b",\"schema\":");
    write_string(&shape.schema, out);
    out.extend_from_slice(b",\"table\":");
    write_string(&shape.table, out);
    use std::io::Write;
    let _ = write!(
        out,
        ",\"lsn\":{},\"txId\":{},\"ts_ms\":{},\"snapshot\":\"{}\"",
        source.lsn, source.xid, source.commit_ms, source.snapshot
    );
    if !unavailable.is_empty() {
        unavailable.sort_unstable();
        unavailable.dedup();
        out.extend_from_slice(b",\"sluice_unavailable\":[");
        for (i, c) in unavailable.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_string(c, out);
        }
        out.push(b']');
    }
    let _ = write!(out, "}},\"ts_ms\":{now_ms}}}");
}

fn write_image<'c>(
    out: &mut Vec<u8>,
    shape: &'c TableShape,
    image: Option<Image<'_, '_>>,
    fallback: Option<Image<'_, '_>>,
    unavailable: &mut Vec<&'c str>,
) {
    let Some(image) = image else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    let mut first = true;
    for (i, (name, kind)) in shape.columns.iter().enumerate() {
        let mut datum = image.get(i).copied().unwrap_or(Datum::Null);
        if datum == Datum::UnchangedToast {
            // An unchanged TOASTed value: the old row (REPLICA IDENTITY FULL) has it.
            datum = match fallback.and_then(|f| f.get(i).copied()) {
                Some(d @ (Datum::Text(_) | Datum::Null)) => d,
                _ => {
                    unavailable.push(name);
                    continue;
                }
            };
        }
        let mark = out.len();
        if !first {
            out.push(b',');
        }
        write_string(name, out);
        out.push(b':');
        let written = match datum {
            Datum::Null => {
                out.extend_from_slice(b"null");
                Ok(())
            }
            Datum::Text(t) => write_value(kind, t, out),
            Datum::UnchangedToast => unreachable!("replaced above"),
        };
        if written.is_err() {
            out.truncate(mark);
            unavailable.push(name);
            continue;
        }
        first = false;
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: &TypeKind, text: &str) -> Option<String> {
        let mut out = Vec::new();
        write_value(kind, text.as_bytes(), &mut out).ok()?;
        Some(String::from_utf8(out).unwrap())
    }

    #[test]
    fn values_take_debezium_forms() {
        assert_eq!(json(&TypeKind::Integer, "-42").unwrap(), "-42");
        assert_eq!(json(&TypeKind::Decimal, "12.50").unwrap(), "12.50");
        assert_eq!(json(&TypeKind::Decimal, "NaN").unwrap(), "\"NaN\"");
        assert_eq!(json(&TypeKind::Decimal, "1e+20").unwrap(), "1e+20");
        assert_eq!(json(&TypeKind::Bool, "t").unwrap(), "true");
        assert_eq!(
            json(&TypeKind::TimestampTz, "2024-01-02 03:04:05.5+00").unwrap(),
            "\"2024-01-02T03:04:05.5Z\""
        );
        assert_eq!(
            json(&TypeKind::Timestamp, "2024-01-02 03:04:05").unwrap(),
            "\"2024-01-02T03:04:05\""
        );
        assert_eq!(json(&TypeKind::Bytes, "\\x0102ff").unwrap(), "\"AQL/\"");
        assert_eq!(json(&TypeKind::Json, "{\"a\": 1}").unwrap(), "\"{\\\"a\\\": 1}\"");
        let ints = TypeKind::Array(Box::new(TypeKind::Integer));
        assert_eq!(json(&ints, "{{1,2},{3,NULL}}").unwrap(), "[[1,2],[3,null]]");
        let texts = TypeKind::Array(Box::new(TypeKind::Text));
        assert_eq!(json(&texts, r#"{"a b","c\"d",e}"#).unwrap(), r#"["a b","c\"d","e"]"#);
        assert_eq!(json(&texts, "{}").unwrap(), "[]");
        assert!(json(&ints, "[0:1]={1,2}").is_none());
        assert!(json(&TypeKind::Integer, "12abc").is_none());
        assert!(json(&TypeKind::Unsupported, "(1,2)").is_none());
    }

    #[test]
    fn copy_text_lines_unescape() {
        let fields = parse_copy_line(b"1\t\\N\ta\\tb\\\\c\\n\t\\101\n");
        let fields: Vec<Option<Vec<u8>>> = fields.into_iter().map(|f| f.map(|c| c.into_owned())).collect();
        assert_eq!(
            fields,
            vec![
                Some(b"1".to_vec()),
                None,
                Some(b"a\tb\\c\n".to_vec()),
                Some(b"A".to_vec())
            ]
        );
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row_or_is_marked_unavailable() {
        let shape = TableShape {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![("id".into(), TypeKind::Integer), ("bio".into(), TypeKind::Text)],
        };
        let source = EventSource {
            connector_name: "x",
            database: "db",
            lsn: 5,
            xid: 9,
            commit_ms: 1,
            snapshot: false,
        };
        let old = [Datum::Text(b"1"), Datum::Text(b"long")];
        let new = [Datum::Text(b"1"), Datum::UnchangedToast];
        let mut out = Vec::new();
        write_event(&mut out, b'u', &shape, Some(&old), Some(&new), &source, 2);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["after"]["bio"], "long");
        assert!(v["source"].get("sluice_unavailable").is_none());

        let mut out = Vec::new();
        write_event(&mut out, b'u', &shape, None, Some(&new), &source, 2);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["after"].get("bio").is_none());
        assert_eq!(v["source"]["sluice_unavailable"][0], "bio");
    }
}
