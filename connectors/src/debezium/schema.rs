//! Debezium's value encodings, read from the Kafka Connect schema an event carries (JSON
//! converter with `schemas.enable`, or the Avro schema from a registry): decimals as base64
//! two's-complement bytes, dates as epoch days, times and timestamps as integers in a unit the
//! schema's semantic name gives. Each value is turned into one canonical text (`-12.30`,
//! `2024-07-01`, `2024-07-01T10:00:00.000000Z`, `10:15:30.000000`) before any policy sees it, so
//! no policy needs a `unit` for a feed that carries its schema.

use std::borrow::Cow;
use std::fmt::Write;

use base64::Engine;

use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_transforms::functions::civil_from_days;

/// The unit of an integer time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    Millis,
    Micros,
    Nanos,
}

impl TimeUnit {
    /// The policy's spelling (`unit = "ms"|"us"|"ns"`).
    pub fn name(self) -> &'static str {
        match self {
            TimeUnit::Millis => "ms",
            TimeUnit::Micros => "us",
            TimeUnit::Nanos => "ns",
        }
    }

    fn per_second(self) -> i64 {
        match self {
            TimeUnit::Millis => 1_000,
            TimeUnit::Micros => 1_000_000,
            TimeUnit::Nanos => 1_000_000_000,
        }
    }

    fn fraction_digits(self) -> usize {
        match self {
            // Milliseconds are written with six digits, like microseconds: one text shape for
            // every timestamp a reader may compare.
            TimeUnit::Millis | TimeUnit::Micros => 6,
            TimeUnit::Nanos => 9,
        }
    }
}

/// How one column's values are encoded, per its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Taken as written (strings, numbers, booleans; `ZonedTimestamp`, `Uuid`, `Json` and the
    /// like are already text).
    Plain,
    /// `org.apache.kafka.connect.data.Decimal`: base64 of a big-endian two's-complement integer
    /// (`scale`: `None` when the schema lacks it; such values cannot be read).
    Decimal { scale: Option<u32> },
    /// `io.debezium.data.VariableScaleDecimal`: `{"scale": s, "value": base64}`.
    VariableScaleDecimal,
    /// Days since the epoch (`io.debezium.time.Date`, `org.apache.kafka.connect.data.Date`).
    Date,
    /// Time since midnight (`io.debezium.time.Time`/`MicroTime`/`NanoTime`, Connect `Time`).
    Time(TimeUnit),
    /// Time since the epoch (`io.debezium.time.Timestamp`/`MicroTimestamp`/`NanoTimestamp`,
    /// Connect `Timestamp`).
    Timestamp(TimeUnit),
}

impl ValueKind {
    /// From a Connect schema's semantic name (and its parameters' `scale`).
    pub(crate) fn from_semantic_name(name: &str, scale: Option<u32>) -> Self {
        match name {
            "org.apache.kafka.connect.data.Decimal" => ValueKind::Decimal { scale },
            "io.debezium.data.VariableScaleDecimal" => ValueKind::VariableScaleDecimal,
            "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => ValueKind::Date,
            "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => ValueKind::Time(TimeUnit::Millis),
            "io.debezium.time.MicroTime" => ValueKind::Time(TimeUnit::Micros),
            "io.debezium.time.NanoTime" => ValueKind::Time(TimeUnit::Nanos),
            "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                ValueKind::Timestamp(TimeUnit::Millis)
            }
            "io.debezium.time.MicroTimestamp" => ValueKind::Timestamp(TimeUnit::Micros),
            "io.debezium.time.NanoTimestamp" => ValueKind::Timestamp(TimeUnit::Nanos),
            _ => ValueKind::Plain,
        }
    }

    /// Whether values are dates or times (a policy `unit` then has nothing to say).
    pub fn is_temporal(self) -> bool {
        matches!(self, ValueKind::Date | ValueKind::Time(_) | ValueKind::Timestamp(_))
    }

    /// The policy `unit` this encoding amounts to, if it is an integer time.
    pub fn unit_name(self) -> Option<&'static str> {
        match self {
            ValueKind::Date => Some("days"),
            ValueKind::Time(u) | ValueKind::Timestamp(u) => Some(u.name()),
            _ => None,
        }
    }
}

/// Why a value does not match its schema. Static text: never any part of the value.
pub(crate) type ValueError = &'static str;

/// The canonical text of a value of kind `kind`, written into `out`; `raw` is its JSON.
/// `Ok(false)`: JSON null.
pub fn canonical_text(kind: ValueKind, raw: &RawValue, out: &mut String) -> Result<bool, ValueError> {
    let json = raw.get();
    if json == "null" {
        return Ok(false);
    }
    out.clear();
    match kind {
        ValueKind::Plain => unreachable!("plain values are taken as written"),
        ValueKind::Decimal { scale } => {
            let scale = scale.ok_or("decimal schema without a scale")?;
            let b64: Cow<'_, str> = serde_json::from_str(json).map_err(|_| "decimal is not base64 text")?;
            write_decimal(&unbase64(&b64)?, scale, out)?;
        }
        ValueKind::VariableScaleDecimal => {
            #[derive(Deserialize)]
            struct Vsd<'a> {
                scale: u32,
                #[serde(borrow)]
                value: Cow<'a, str>,
            }
            let v: Vsd<'_> = serde_json::from_str(json).map_err(|_| "not a variable-scale decimal")?;
            write_decimal(&unbase64(&v.value)?, v.scale, out)?;
        }
        ValueKind::Date => {
            let days: i64 = json.parse().map_err(|_| "date is not an integer")?;
            write_date(days, out)?;
        }
        ValueKind::Time(unit) => {
            let n: i64 = json.parse().map_err(|_| "time is not an integer")?;
            // MySQL TIME is a duration (-838:59:59 to 838:59:59): hours are not capped at 24.
            let per = unit.per_second();
            let (sign, n) = if n < 0 { ("-", n.unsigned_abs()) } else { ("", n as u64) };
            let (secs, frac) = (n / per as u64, n % per as u64);
            let _ = write!(
                out,
                "{sign}{:02}:{:02}:{:02}.{:0width$}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60,
                frac * (10u64.pow(unit.fraction_digits() as u32) / per as u64),
                width = unit.fraction_digits()
            );
        }
        ValueKind::Timestamp(unit) => {
            let n: i64 = json.parse().map_err(|_| "timestamp is not an integer")?;
            let per = unit.per_second();
            let (secs, frac) = (n.div_euclid(per), n.rem_euclid(per));
            let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            write_date(days, out).map_err(|_| "timestamp out of range")?;
            let digits = unit.fraction_digits();
            let fraction = frac * (1_000_000_000 / per) / 10i64.pow(9 - digits as u32);
            let _ = write!(
                out,
                "T{:02}:{:02}:{:02}.{fraction:0digits$}Z",
                of_day / 3600,
                of_day / 60 % 60,
                of_day % 60
            );
        }
    }
    Ok(true)
}

/// `YYYY-MM-DD` of a day count since the epoch; years outside 1–9999 are refused. By hand:
/// chrono's `format` parses its pattern on every call, which a loop over every value notices.
fn write_date(days: i64, out: &mut String) -> Result<(), ValueError> {
    // Beyond ±10^9 days no year is in range, and the arithmetic stays far from overflow.
    if days.unsigned_abs() > 1_000_000_000 {
        return Err("date out of range");
    }
    let (year, month, day) = civil_from_days(days);
    if !(1..=9999).contains(&year) {
        return Err("date out of range");
    }
    let _ = write!(out, "{year:04}-{month:02}-{day:02}");
    Ok(())
}

fn unbase64(text: &str) -> Result<Vec<u8>, ValueError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| "decimal is not base64 text")
}

/// A big-endian two's-complement integer scaled by `10^-scale`, as exact decimal text.
fn write_decimal(bytes: &[u8], scale: u32, out: &mut String) -> Result<(), ValueError> {
    if bytes.is_empty() {
        return Err("decimal has no bytes");
    }
    if bytes.len() > 16 {
        return Err("decimal wider than 128 bits");
    }
    if scale > 38 {
        return Err("decimal scale above 38");
    }
    let negative = bytes[0] & 0x80 != 0;
    let mut buf = [if negative { 0xff } else { 0 }; 16];
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    let n = i128::from_be_bytes(buf);
    let digits = n.unsigned_abs().to_string();
    if negative {
        out.push('-');
    }
    let scale = scale as usize;
    if scale == 0 {
        out.push_str(&digits);
    } else if digits.len() > scale {
        let (int, frac) = digits.split_at(digits.len() - scale);
        let _ = write!(out, "{int}.{frac}");
    } else {
        let _ = write!(out, "0.{digits:0>scale$}");
    }
    Ok(())
}

/// Column encodings of one row image, from an event's schema. Columns that are not listed are
/// [`ValueKind::Plain`].
#[derive(Debug, Default, PartialEq)]
pub struct ImageSchema {
    kinds: FxHashMap<String, ValueKind>,
}

impl ImageSchema {
    pub fn kind(&self, column: &str) -> ValueKind {
        self.kinds.get(column).copied().unwrap_or(ValueKind::Plain)
    }

    pub fn insert(&mut self, column: String, kind: ValueKind) {
        if kind != ValueKind::Plain {
            self.kinds.insert(column, kind);
        }
    }

    /// The row-image schema of a Debezium envelope's Connect schema (its `after` field, else
    /// `before`). `None` when the text is not a Connect struct schema with either.
    pub fn from_connect_envelope(schema: &str) -> Option<Self> {
        let envelope: ConnectField<'_> = serde_json::from_str(schema).ok()?;
        let image = ["after", "before"]
            .iter()
            .find_map(|name| envelope.fields.iter().find(|f| f.field.as_deref() == Some(*name)))?;
        let mut out = ImageSchema::default();
        for f in &image.fields {
            if let (Some(column), Some(name)) = (&f.field, &f.name) {
                out.insert(column.to_string(), ValueKind::from_semantic_name(name, f.scale()));
            }
        }
        Some(out)
    }
}

/// One field of a Kafka Connect JSON schema.
#[derive(Deserialize)]
struct ConnectField<'a> {
    #[serde(borrow, default)]
    field: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(borrow, default)]
    fields: Vec<ConnectField<'a>>,
}

impl ConnectField<'_> {
    fn scale(&self) -> Option<u32> {
        // Connect writes parameters as strings; accept numbers too.
        match self.parameters.as_ref()?.get("scale")? {
            serde_json::Value::String(s) => s.trim().parse().ok(),
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(kind: ValueKind, json: &str) -> Result<String, ValueError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        let mut out = String::new();
        canonical_text(kind, &raw, &mut out).map(|_| out)
    }

    #[test]
    fn decimals_are_exact() {
        // 0x3039 = 12345; scale 2 → 123.45 (Debezium's documented `"MDk="`-style bytes).
        assert_eq!(
            text(ValueKind::Decimal { scale: Some(2) }, r#""MDk=""#).unwrap(),
            "123.45"
        );
        // -1 in one byte, scale 3.
        assert_eq!(
            text(ValueKind::Decimal { scale: Some(3) }, r#""/w==""#).unwrap(),
            "-0.001"
        );
        assert_eq!(text(ValueKind::Decimal { scale: Some(0) }, r#""AA==""#).unwrap(), "0");
        assert_eq!(
            text(ValueKind::VariableScaleDecimal, r#"{"scale":1,"value":"AQ=="}"#).unwrap(),
            "0.1"
        );
        // 17 bytes do not fit Arrow's 128-bit decimals.
        assert_eq!(
            text(ValueKind::Decimal { scale: Some(0) }, r#""AQEBAQEBAQEBAQEBAQEBAQE=""#),
            Err("decimal wider than 128 bits")
        );
        assert_eq!(
            text(ValueKind::Decimal { scale: Some(2) }, "12.5"),
            Err("decimal is not base64 text")
        );
        assert_eq!(
            text(ValueKind::Decimal { scale: Some(2) }, r#""12.5""#),
            Err("decimal is not base64 text")
        );
    }

    #[test]
    fn times_take_their_unit_from_the_schema() {
        assert_eq!(text(ValueKind::Date, "19905").unwrap(), "2024-07-01");
        assert_eq!(text(ValueKind::Date, "-1").unwrap(), "1969-12-31");
        assert_eq!(
            text(ValueKind::Timestamp(TimeUnit::Millis), "1719835200123").unwrap(),
            "2024-07-01T12:00:00.123000Z"
        );
        assert_eq!(
            text(ValueKind::Timestamp(TimeUnit::Micros), "1719835200123456").unwrap(),
            "2024-07-01T12:00:00.123456Z"
        );
        assert_eq!(
            text(ValueKind::Timestamp(TimeUnit::Nanos), "-1").unwrap(),
            "1969-12-31T23:59:59.999999999Z"
        );
        assert_eq!(
            text(ValueKind::Time(TimeUnit::Micros), "37230500000").unwrap(),
            "10:20:30.500000"
        );
        assert_eq!(
            text(ValueKind::Time(TimeUnit::Micros), "-3020399000000").unwrap(),
            "-838:59:59.000000"
        );
        // Nanoseconds read as milliseconds land in year 54,000-odd: refused, not written.
        assert_eq!(
            text(ValueKind::Timestamp(TimeUnit::Millis), "1704067200000000000"),
            Err("timestamp out of range")
        );
        assert_eq!(text(ValueKind::Date, "99999999"), Err("date out of range"));
        assert_eq!(text(ValueKind::Date, r#""2024-07-01""#), Err("date is not an integer"));
        assert!(!canonical_text(
            ValueKind::Date,
            &serde_json::from_str::<Box<RawValue>>("null").unwrap(),
            &mut String::new()
        )
        .unwrap());
    }

    #[test]
    fn image_schema_from_a_connect_envelope() {
        let schema = r#"{"type":"struct","fields":[
            {"type":"struct","optional":true,"field":"before","fields":[]},
            {"type":"struct","optional":true,"name":"s.inventory.orders.Value","field":"after","fields":[
                {"type":"int32","optional":false,"field":"id"},
                {"type":"bytes","optional":false,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2","connect.decimal.precision":"10"},"field":"price"},
                {"type":"int32","optional":true,"name":"io.debezium.time.Date","version":1,"field":"order_date"},
                {"type":"string","optional":true,"name":"io.debezium.time.ZonedTimestamp","version":1,"field":"at"}]},
            {"type":"string","optional":false,"field":"op"}],"name":"s.inventory.orders.Envelope"}"#;
        let image = ImageSchema::from_connect_envelope(schema).unwrap();
        assert_eq!(image.kind("price"), ValueKind::Decimal { scale: Some(2) });
        assert_eq!(image.kind("order_date"), ValueKind::Date);
        assert_eq!(image.kind("at"), ValueKind::Plain);
        assert_eq!(image.kind("id"), ValueKind::Plain);
        assert!(ImageSchema::from_connect_envelope(r#"{"type":"struct","fields":[]}"#).is_none());
        assert!(ImageSchema::from_connect_envelope("[1,2").is_none());
    }
}
