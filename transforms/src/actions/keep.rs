//! `keep`: copy a non-identifying column as a typed Arrow column.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int64Builder, TimestampMicrosecondBuilder,
};
use arrow_array::{Array, ArrayRef, StringArray};
use arrow_schema::DataType;

use crate::functions::{epoch_days, parse_date, parse_timestamp_micros, IntegerTime, RowError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepType {
    String,
    Int64,
    Float64,
    Bool,
    Date,
    Timestamp,
    /// Exact decimal, Arrow `Decimal128(precision, scale)`: `type = "decimal(12,2)"`.
    Decimal {
        precision: u8,
        scale: i8,
    },
}

impl KeepType {
    pub const NAMES: &'static [&'static str] = &[
        "string",
        "int64",
        "float64",
        "bool",
        "date",
        "timestamp",
        "decimal(P,S)",
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "string" => Self::String,
            "int64" => Self::Int64,
            "float64" => Self::Float64,
            "bool" => Self::Bool,
            "date" => Self::Date,
            "timestamp" => Self::Timestamp,
            _ => {
                let args = name.strip_prefix("decimal(")?.strip_suffix(')')?;
                let (p, s) = args.split_once(',')?;
                let precision: u8 = p.trim().parse().ok()?;
                let scale: i8 = s.trim().parse().ok()?;
                // Arrow's and Delta's limits: 1 ≤ P ≤ 38, 0 ≤ S ≤ P.
                if !(1..=38).contains(&precision) || scale < 0 || scale as u8 > precision {
                    return None;
                }
                Self::Decimal { precision, scale }
            }
        })
    }

    pub fn name(self) -> String {
        match self {
            Self::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            Self::String => "string".into(),
            Self::Int64 => "int64".into(),
            Self::Float64 => "float64".into(),
            Self::Bool => "bool".into(),
            Self::Date => "date".into(),
            Self::Timestamp => "timestamp".into(),
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            Self::String => DataType::Utf8,
            Self::Int64 => DataType::Int64,
            Self::Float64 => DataType::Float64,
            Self::Bool => DataType::Boolean,
            Self::Date => DataType::Date32,
            Self::Timestamp => super::timestamp_type(),
            Self::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
        }
    }

    /// Whether values are dates or times (integers in them are epochs, digit strings are not).
    pub fn is_temporal(self) -> bool {
        matches!(self, Self::Date | Self::Timestamp)
    }
}

/// Exact decimal text (`-12.30`, `7`, `.5`) as an integer scaled by `10^scale`. More fraction
/// digits than `scale` are refused unless they are zeros (an amount is never rounded), and so
/// is a value with more than `precision` digits.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, &'static str> {
    const NOT: &str = "not a decimal number";
    let t = text.trim();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(NOT);
    }
    let scale = scale as usize;
    let (kept, rest) = frac.split_at(frac.len().min(scale));
    if rest.bytes().any(|b| b != b'0') {
        return Err("more decimal places than the column's scale");
    }
    let int = int.trim_start_matches('0');
    if int.len() + scale > precision as usize {
        return Err("more digits than the column's precision");
    }
    let mut n: i128 = 0;
    for b in int.bytes().chain(kept.bytes()) {
        n = n * 10 + i128::from(b - b'0');
    }
    for _ in kept.len()..scale {
        n *= 10;
    }
    Ok(if negative { -n } else { n })
}

/// Converts text values to the declared type; a value that does not fit is a row error.
pub fn apply(ty: KeepType, input: &StringArray, unit: Option<IntegerTime>, errors: &mut Vec<RowError>) -> ArrayRef {
    fn typed<B, T>(
        input: &StringArray,
        errors: &mut Vec<RowError>,
        mut builder: B,
        reason: &'static str,
        parse: impl Fn(&str) -> Option<T>,
        mut append: impl FnMut(&mut B, Option<T>),
    ) -> B {
        for (i, v) in input.iter().enumerate() {
            match v.map(&parse) {
                None => append(&mut builder, None),
                Some(Some(x)) => append(&mut builder, Some(x)),
                Some(None) => {
                    errors.push((i, reason));
                    append(&mut builder, None)
                }
            }
        }
        builder
    }
    let n = input.len();
    match ty {
        KeepType::String => Arc::new(input.clone()),
        KeepType::Int64 => Arc::new(
            typed(
                input,
                errors,
                Int64Builder::with_capacity(n),
                "not a 64-bit integer",
                |s| s.trim().parse::<i64>().ok(),
                |b, v| b.append_option(v),
            )
            .finish(),
        ),
        KeepType::Float64 => Arc::new(
            typed(
                input,
                errors,
                Float64Builder::with_capacity(n),
                "not a finite number",
                // One NaN or infinity would turn every sum or average over it into one.
                |s| s.trim().parse::<f64>().ok().filter(|x| x.is_finite()),
                |b, v| b.append_option(v),
            )
            .finish(),
        ),
        KeepType::Bool => Arc::new(
            typed(
                input,
                errors,
                BooleanBuilder::with_capacity(n),
                "not a boolean",
                parse_bool,
                |b, v| b.append_option(v),
            )
            .finish(),
        ),
        KeepType::Date => Arc::new(
            typed(
                input,
                errors,
                Date32Builder::with_capacity(n),
                "not a date",
                |s| parse_date(s, unit).map(epoch_days),
                |b, v| b.append_option(v),
            )
            .finish(),
        ),
        KeepType::Timestamp => Arc::new(
            typed(
                input,
                errors,
                TimestampMicrosecondBuilder::with_capacity(n),
                "not a timestamp",
                |s| parse_timestamp_micros(s, unit),
                |b, v| b.append_option(v),
            )
            .finish()
            .with_timezone("UTC"),
        ),
        KeepType::Decimal { precision, scale } => {
            let mut b = Decimal128Builder::with_capacity(n);
            for (i, v) in input.iter().enumerate() {
                match v.map(|s| parse_decimal(s, precision, scale)) {
                    None => b.append_null(),
                    Some(Ok(x)) => b.append_value(x),
                    Some(Err(reason)) => {
                        errors.push((i, reason));
                        b.append_null()
                    }
                }
            }
            Arc::new(
                b.finish()
                    .with_precision_and_scale(precision, scale)
                    .expect("precision and scale checked by KeepType::parse"),
            )
        }
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "true" | "t" | "1" => Some(true),
        "false" | "f" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, Int64Array};

    #[test]
    fn values_that_do_not_fit_are_row_errors() {
        let input = StringArray::from(vec![Some("12"), Some("twelve"), None, Some("9223372036854775808")]);
        let mut errors = Vec::new();
        let out = apply(KeepType::Int64, &input, None, &mut errors);
        let out = out.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(out.value(0), 12);
        assert!(out.is_null(2));
        assert_eq!(errors, vec![(1, "not a 64-bit integer"), (3, "not a 64-bit integer")]);
    }

    #[test]
    fn floats_are_finite_or_refused() {
        let input = StringArray::from(vec![
            Some("1.5"),
            Some("NaN"),
            Some("inf"),
            Some("-infinity"),
            Some("1e400"),
        ]);
        let mut errors = Vec::new();
        let out = apply(KeepType::Float64, &input, None, &mut errors);
        let out = out.as_any().downcast_ref::<arrow_array::Float64Array>().unwrap();
        assert_eq!(out.value(0), 1.5);
        assert_eq!(out.null_count(), 4);
        assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn decimals_are_exact_or_refused() {
        let ty = KeepType::parse("decimal(6, 2)").unwrap();
        assert_eq!(ty.data_type(), DataType::Decimal128(6, 2));
        assert_eq!(ty.name(), "decimal(6,2)");
        for bad in [
            "decimal(0,0)",
            "decimal(39,2)",
            "decimal(4,5)",
            "decimal(4,-1)",
            "decimal(4)",
        ] {
            assert_eq!(KeepType::parse(bad), None, "{bad}");
        }
        let input = StringArray::from(vec![
            Some("1234.5"),
            Some("-0.01"),
            Some("12.300"),
            Some(".5"),
            Some("1.005"),
            Some("12345"),
            Some("1e3"),
            Some("."),
            None,
        ]);
        let mut errors = Vec::new();
        let out = apply(ty, &input, None, &mut errors);
        let out = out.as_any().downcast_ref::<arrow_array::Decimal128Array>().unwrap();
        assert_eq!(
            (0..4).map(|i| out.value_as_string(i)).collect::<Vec<_>>(),
            vec!["1234.50", "-0.01", "12.30", "0.50"]
        );
        assert_eq!(
            errors,
            vec![
                (4, "more decimal places than the column's scale"),
                (5, "more digits than the column's precision"),
                (6, "not a decimal number"),
                (7, "not a decimal number")
            ]
        );
        assert!(out.is_null(8));
    }
}
