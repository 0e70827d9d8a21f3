//! Functions shared by `derive` and `generalize`: each turns a source column into a coarser,
//! non-identifying one.

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Int32Builder, StringBuilder};
use arrow_array::{Array, ArrayRef, Int64Array, StringArray};
use arrow_schema::DataType;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime};

/// A row the function could not handle, with a reason that never contains the value.
pub type RowError = (usize, &'static str);

#[derive(Debug, Clone, PartialEq)]
pub enum Function {
    /// `true` when the value is present and not null.
    IsPresent,
    /// Lower-cased part after the last `@`; null when the value is not an address.
    EmailDomain,
    /// Age reached in the event's calendar year, from a date of birth, as a band label
    /// ("25-34", "65+").
    AgeBand {
        bands: Vec<i64>,
    },
    Year,
    /// `"2024-Q3"`.
    Quarter,
    /// `"2024-07"`.
    Month,
    /// The first `length` characters, whitespace trimmed.
    Prefix {
        length: usize,
    },
    /// Number of characters.
    Length,
    /// Label of the half-open interval `[edge_i, edge_i+1)` a number falls in.
    Bucket {
        edges: Vec<f64>,
    },
}

impl Function {
    pub const NAMES: &'static [&'static str] = &[
        "is_present",
        "email_domain",
        "age_band",
        "year",
        "quarter",
        "month",
        "prefix",
        "length",
        "bucket",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Function::IsPresent => "is_present",
            Function::EmailDomain => "email_domain",
            Function::AgeBand { .. } => "age_band",
            Function::Year => "year",
            Function::Quarter => "quarter",
            Function::Month => "month",
            Function::Prefix { .. } => "prefix",
            Function::Length => "length",
            Function::Bucket { .. } => "bucket",
        }
    }

    /// Whether the function reads its input as a date.
    pub fn is_temporal(&self) -> bool {
        matches!(
            self,
            Function::AgeBand { .. } | Function::Year | Function::Quarter | Function::Month
        )
    }

    pub fn output_type(&self) -> DataType {
        match self {
            Function::IsPresent => DataType::Boolean,
            Function::Year | Function::Length => DataType::Int32,
            _ => DataType::Utf8,
        }
    }

    /// Applies the function to a column. `event_ms` is each row's event time (for ages).
    /// Applies the function to a column. `event_ms` is each row's event time (for ages); `unit`
    /// says how integer dates are encoded.
    pub fn apply(
        &self,
        input: &StringArray,
        event_ms: &Int64Array,
        unit: Option<IntegerTime>,
        errors: &mut Vec<RowError>,
    ) -> ArrayRef {
        match self {
            Function::IsPresent => is_present(input, |_| false),
            Function::Length => {
                let mut b = Int32Builder::with_capacity(input.len());
                for v in input.iter() {
                    b.append_option(v.map(|s| s.chars().count() as i32));
                }
                Arc::new(b.finish())
            }
            Function::Year => {
                let mut b = Int32Builder::with_capacity(input.len());
                for (i, v) in input.iter().enumerate() {
                    match v.map(|v| parse_date(v, unit)) {
                        None => b.append_null(),
                        Some(Some(d)) => b.append_value(d.year()),
                        Some(None) => {
                            errors.push((i, "not a date"));
                            b.append_null()
                        }
                    }
                }
                Arc::new(b.finish())
            }
            _ => {
                let mut b = StringBuilder::with_capacity(input.len(), input.len() * 8);
                let mut label = String::new();
                for (i, v) in input.iter().enumerate() {
                    let Some(v) = v else {
                        b.append_null();
                        continue;
                    };
                    label.clear();
                    match self.label(v, event_ms.value(i), unit, &mut label) {
                        Ok(true) => b.append_value(&label),
                        Ok(false) => b.append_null(),
                        Err(reason) => {
                            errors.push((i, reason));
                            b.append_null()
                        }
                    }
                }
                Arc::new(b.finish())
            }
        }
    }

    /// Writes the text label of one present value; `Ok(false)` means null.
    fn label(&self, v: &str, event_ms: i64, unit: Option<IntegerTime>, out: &mut String) -> Result<bool, &'static str> {
        use std::fmt::Write;
        match self {
            Function::EmailDomain => match v.rsplit_once('@') {
                Some((local, domain)) if !local.is_empty() && !domain.trim().is_empty() => {
                    out.push_str(&domain.trim().to_ascii_lowercase());
                    Ok(true)
                }
                _ => Ok(false),
            },
            Function::AgeBand { bands } => {
                let born = parse_date(v, unit).ok_or("not a date")?;
                let at = DateTime::from_timestamp_millis(event_ms)
                    .ok_or("event time out of range")?
                    .date_naive();
                let age = age_in_year(born, at);
                write_band(bands, age, out);
                Ok(true)
            }
            Function::Quarter => {
                let d = parse_date(v, unit).ok_or("not a date")?;
                let _ = write!(out, "{:04}-Q{}", d.year(), (d.month0() / 3) + 1);
                Ok(true)
            }
            Function::Month => {
                let d = parse_date(v, unit).ok_or("not a date")?;
                let _ = write!(out, "{:04}-{:02}", d.year(), d.month());
                Ok(true)
            }
            Function::Prefix { length } => {
                // A prefix as long as the value would be the value: such values give null.
                let v = v.trim();
                if v.chars().nth(*length).is_none() {
                    return Ok(false);
                }
                out.extend(v.chars().take(*length));
                Ok(true)
            }
            Function::Bucket { edges } => {
                let x: f64 = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|x: &f64| x.is_finite())
                    .ok_or("not a number")?;
                write_bucket(edges, x, out);
                Ok(true)
            }
            Function::IsPresent | Function::Length | Function::Year => unreachable!("typed outputs"),
        }
    }
}

/// `is_present`: whether each value is there, null where `unknown(row)` (the event does not say).
pub fn is_present(input: &StringArray, unknown: impl Fn(usize) -> bool) -> ArrayRef {
    let mut b = BooleanBuilder::with_capacity(input.len());
    for i in 0..input.len() {
        if unknown(i) {
            b.append_null();
        } else {
            b.append_value(input.is_valid(i));
        }
    }
    Arc::new(b.finish())
}

fn write_band(bands: &[i64], age: i64, out: &mut String) {
    use std::fmt::Write;
    let upper = bands.iter().position(|b| age < *b);
    let _ = match upper {
        Some(0) => write!(out, "<{}", bands[0]),
        Some(i) => write!(out, "{}-{}", bands[i - 1], bands[i] - 1),
        None => write!(out, "{}+", bands[bands.len() - 1]),
    };
}

fn write_bucket(edges: &[f64], x: f64, out: &mut String) {
    use std::fmt::Write;
    let upper = edges.iter().position(|e| x < *e);
    let _ = match upper {
        Some(0) => write!(out, "<{}", edges[0]),
        Some(i) => write!(out, "[{},{})", edges[i - 1], edges[i]),
        None => write!(out, ">={}", edges[edges.len() - 1]),
    };
}

/// The age a person reaches in `at`'s calendar year. Not the age on the day: bands of two events
/// that straddle a birthday would pin the birth date between them, to a day; by calendar year
/// they change on 1 January only and say no more than the birth year.
fn age_in_year(born: NaiveDate, at: NaiveDate) -> i64 {
    (at.year() - born.year()) as i64
}

/// How integer dates and times are encoded at the source (Debezium: `Date` = days,
/// `Timestamp` = ms, `MicroTimestamp` = µs, `NanoTimestamp` = ns). Set per column with `unit`;
/// without it the magnitude decides (see [`parse_date`]), which misreads microseconds from
/// 1966–1973 and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegerTime {
    Days,
    Millis,
    Micros,
    Nanos,
}

impl IntegerTime {
    pub const NAMES: &'static [&'static str] = &["days", "ms", "us", "ns"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "days" => Self::Days,
            "ms" => Self::Millis,
            "us" => Self::Micros,
            "ns" => Self::Nanos,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    fn to_micros(self, n: i64) -> Option<i64> {
        match self {
            Self::Days => n.checked_mul(86_400_000_000),
            Self::Millis => n.checked_mul(1000),
            Self::Micros => Some(n),
            Self::Nanos => Some(n.div_euclid(1000)),
        }
    }

    /// The unit an unlabelled integer is taken to be, by magnitude.
    fn guess(n: i64, days_allowed: bool) -> Self {
        match n.unsigned_abs() {
            m if days_allowed && m < 1_000_000 => Self::Days,
            m if m < 100_000_000_000_000 => Self::Millis,
            _ => Self::Micros,
        }
    }
}

/// A date from ISO text (`2024-07-01`, or the date part of a timestamp) or an integer in `unit`;
/// without a unit, integers below 1,000,000 are days, below 10^14 milliseconds, else microseconds.
/// Dates outside years 1–9999 are refused.
pub fn parse_date(v: &str, unit: Option<IntegerTime>) -> Option<NaiveDate> {
    let v = v.trim();
    if let Ok(n) = v.parse::<i64>() {
        let unit = unit.unwrap_or_else(|| IntegerTime::guess(n, true));
        return unit
            .to_micros(n)
            .and_then(DateTime::from_timestamp_micros)
            .map(|t| t.date_naive())
            .filter(in_value_window);
    }
    let (y, m, d) = iso_date(v.as_bytes())?;
    NaiveDate::from_ymd_opt(i32::try_from(y).ok()?, m, d).filter(in_value_window)
}

/// Years a written date or time may have: four-digit years, what Delta's and Iceberg's file
/// statistics, Spark and the Python readers all parse back (a year +55969 in a Delta log's
/// `maxValues` makes the table unreadable to the Delta kernel).
pub fn in_value_window(d: &NaiveDate) -> bool {
    (1..=9999).contains(&d.year())
}

/// Microseconds since the epoch from RFC 3339 text, `YYYY-MM-DD HH:MM:SS[.f]` (taken as UTC),
/// a bare date, or an integer in `unit` (without one: milliseconds below 10^14, else
/// microseconds). Times outside years 1–9999 are refused.
pub fn parse_timestamp_micros(v: &str, unit: Option<IntegerTime>) -> Option<i64> {
    if let Some((year, us)) = canonical_timestamp_micros(v.trim().as_bytes()) {
        return (1..=9999).contains(&year).then_some(us);
    }
    parse_any_timestamp_micros(v, unit)
        .filter(|us| DateTime::from_timestamp_micros(*us).is_some_and(|t| in_value_window(&t.date_naive())))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// (year, month, day) of a day count since 1970-01-01 (`civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `YYYY-MM-DD` at the start of `v`, as (year, month, day), if it is a real date.
fn iso_date(v: &[u8]) -> Option<(i64, u32, u32)> {
    let digits = |r: std::ops::Range<usize>| {
        v.get(r)?
            .iter()
            .try_fold(0u32, |n, b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
    };
    if v.get(4) != Some(&b'-') || v.get(7) != Some(&b'-') {
        return None;
    }
    let (y, m, d) = (i64::from(digits(0..4)?), digits(5..7)?, digits(8..10)?);
    // A real calendar date: it survives the round trip through the day count.
    ((1..=12).contains(&m) && (1..=31).contains(&d) && civil_from_days(days_from_civil(y, m, d)) == (y, m, d))
        .then_some((y, m, d))
}

/// The timestamps schema-aware decoding writes, `YYYY-MM-DDTHH:MM:SS[.f…]Z`, read without
/// chrono's general parser: (year, microseconds since the epoch). `None`: another shape.
fn canonical_timestamp_micros(v: &[u8]) -> Option<(i64, i64)> {
    let (y, m, d) = iso_date(v)?;
    if v.len() < 20 || v[10] != b'T' || v[13] != b':' || v[16] != b':' || v.last() != Some(&b'Z') {
        return None;
    }
    let two = |i: usize| {
        let (a, b) = (v[i], v[i + 1]);
        (a.is_ascii_digit() && b.is_ascii_digit()).then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
    };
    let (h, mi, s) = (two(11)?, two(14)?, two(17)?);
    if h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let fraction = &v[19..v.len() - 1];
    let micros = match fraction {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) => digits
            .iter()
            .chain(std::iter::repeat(&b'0'))
            .take(6)
            .fold(0i64, |n, b| n * 10 + i64::from(b - b'0')),
        _ => return None,
    };
    let seconds = ((days_from_civil(y, m, d) * 24 + h) * 60 + mi) * 60 + s;
    Some((y, seconds * 1_000_000 + micros))
}

fn parse_any_timestamp_micros(v: &str, unit: Option<IntegerTime>) -> Option<i64> {
    let v = v.trim();
    if let Ok(n) = v.parse::<i64>() {
        return unit.unwrap_or_else(|| IntegerTime::guess(n, false)).to_micros(n);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Some(t.timestamp_micros());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(v, format) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_micros())
}

/// Days since the epoch, as Arrow `Date32` stores them.
pub fn epoch_days(d: NaiveDate) -> i32 {
    d.num_days_from_ce() - 719_163
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{BooleanArray, Int32Array};

    fn run(f: Function, values: &[Option<&str>]) -> (ArrayRef, Vec<RowError>) {
        let input = StringArray::from(values.to_vec());
        // 2024-06-15T00:00:00Z
        let at = Int64Array::from(vec![1_718_409_600_000; values.len()]);
        let mut errors = Vec::new();
        let out = f.apply(&input, &at, None, &mut errors);
        (out, errors)
    }

    fn strings(a: &ArrayRef) -> Vec<Option<String>> {
        let s = a.as_any().downcast_ref::<StringArray>().unwrap();
        s.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn age_band_is_the_age_reached_in_the_events_year() {
        let bands = vec![18, 25, 35, 45, 55, 65];
        let (out, errors) = run(
            Function::AgeBand { bands },
            &[
                Some("2006-06-16"),
                Some("2006-06-15"),
                Some("1990-01-01"),
                Some("1940-01-01"),
                Some("12345"),
                None,
                Some("soon"),
            ],
        );
        assert_eq!(errors, vec![(6, "not a date")]);
        // Day 12345 since the epoch is 2003-10-20: 20 years old in the event's year. Born the
        // day after the event or on its day: the same band (a band change between two events
        // would otherwise date the birthday).
        assert_eq!(
            strings(&out),
            vec![
                Some("18-24".into()),
                Some("18-24".into()),
                Some("25-34".into()),
                Some("65+".into()),
                Some("18-24".into()),
                None,
                None
            ]
        );
    }

    #[test]
    fn email_domain_prefix_bucket_and_dates() {
        let (out, _) = run(Function::EmailDomain, &[Some("A.B@Example.COM"), Some("nope"), None]);
        assert_eq!(strings(&out), vec![Some("example.com".into()), None, None]);
        let (out, _) = run(
            Function::Prefix { length: 3 },
            &[Some(" Q47 6GG"), Some("Q47 "), Some("Q4")],
        );
        assert_eq!(
            strings(&out),
            vec![Some("Q47".into()), None, None],
            "a prefix as long as the value is not given"
        );
        let (out, errors) = run(
            Function::Bucket {
                edges: vec![0.0, 1000.0, 5000.0],
            },
            &[
                Some("-1"),
                Some("999.5"),
                Some("5000"),
                Some("x"),
                Some("NaN"),
                Some("inf"),
            ],
        );
        assert_eq!(
            strings(&out),
            vec![
                Some("<0".into()),
                Some("[0,1000)".into()),
                Some(">=5000".into()),
                None,
                None,
                None
            ]
        );
        assert_eq!(
            errors,
            vec![(3, "not a number"), (4, "not a number"), (5, "not a number")]
        );
        let (out, _) = run(Function::Quarter, &[Some("2024-08-01"), Some("2024-02-01T10:00:00Z")]);
        assert_eq!(strings(&out), vec![Some("2024-Q3".into()), Some("2024-Q1".into())]);
        let (out, _) = run(Function::Month, &[Some("19905")]);
        assert_eq!(strings(&out), vec![Some("2024-07".into())]);
        let (out, _) = run(Function::Year, &[Some("1983-02-01"), None]);
        let years = out.as_any().downcast_ref::<Int32Array>().unwrap();
        assert_eq!(years.value(0), 1983);
        assert!(years.is_null(1));
        let (out, _) = run(Function::IsPresent, &[Some(""), None]);
        let present = out.as_any().downcast_ref::<BooleanArray>().unwrap();
        assert!(present.value(0) && !present.value(1));
    }

    #[test]
    fn timestamps_from_text_and_integers() {
        assert_eq!(parse_timestamp_micros("1970-01-01T00:00:01Z", None), Some(1_000_000));
        assert_eq!(parse_timestamp_micros("1000", None), Some(1_000_000));
        assert_eq!(
            parse_timestamp_micros("1718409600000000", None),
            Some(1_718_409_600_000_000)
        );
        assert_eq!(parse_timestamp_micros("1970-01-02", None), Some(86_400_000_000));
        assert_eq!(parse_timestamp_micros("yesterday", None), None);
        // 1970-03-01 in microseconds is small enough to pass for milliseconds: `unit` settles it.
        assert_eq!(
            parse_timestamp_micros("5097600000000", Some(IntegerTime::Micros)),
            Some(5_097_600_000_000)
        );
        assert_eq!(
            parse_timestamp_micros("5097600000000000", Some(IntegerTime::Nanos)),
            Some(5_097_600_000_000)
        );
        assert_eq!(
            parse_date("5097600000000", Some(IntegerTime::Micros)),
            NaiveDate::from_ymd_opt(1970, 3, 1)
        );
        assert_eq!(
            parse_date("59", Some(IntegerTime::Days)),
            NaiveDate::from_ymd_opt(1970, 3, 1)
        );
    }

    #[test]
    fn the_calendar_arithmetic_agrees_with_chrono() {
        for days in (-1_000_000..3_000_000)
            .step_by(997)
            .chain([-719_162, 0, 59, 60, 2_932_896])
        {
            let (y, m, d) = civil_from_days(days);
            let chrono = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Duration::days(days);
            assert_eq!((y as i32, m, d), (chrono.year(), chrono.month(), chrono.day()));
            assert_eq!(days_from_civil(y, m, d), days);
        }
        for text in [
            "2024-02-29T23:59:59.999999Z",
            "1969-12-31T23:59:59.5Z",
            "0001-01-01T00:00:00Z",
            "2024-07-01T12:00:00.123456789Z",
        ] {
            let chrono = DateTime::parse_from_rfc3339(text).unwrap().timestamp_micros();
            assert_eq!(parse_timestamp_micros(text, None), Some(chrono), "{text}");
        }
        // Not real dates or times: refused by both readers.
        for text in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00.Z",
        ] {
            assert_eq!(parse_timestamp_micros(text, None), None, "{text}");
        }
        assert_eq!(parse_date("2023-02-29", None), None);
        assert_eq!(
            parse_date("2024-02-29T10:00:00Z", None),
            NaiveDate::from_ymd_opt(2024, 2, 29)
        );
    }

    #[test]
    fn times_outside_four_digit_years_are_refused() {
        // Nanoseconds read as microseconds: year 55,969.
        assert_eq!(
            parse_timestamp_micros("1704067200000000000", Some(IntegerTime::Micros)),
            None
        );
        assert_eq!(parse_timestamp_micros("+55969-09-28T00:00:00Z", None), None);
        assert_eq!(
            parse_timestamp_micros("9999-12-31T23:59:59.999999Z", None),
            Some(253_402_300_799_999_999)
        );
        assert_eq!(parse_date("1704067200000000000", Some(IntegerTime::Millis)), None);
        assert_eq!(parse_date("-999999999", Some(IntegerTime::Days)), None);
        assert_eq!(parse_date("9999-12-31", None), NaiveDate::from_ymd_opt(9999, 12, 31));
    }
}
