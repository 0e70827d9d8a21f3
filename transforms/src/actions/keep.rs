//! `keep`: copy a non-identifying column as a typed Arrow column.

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, TimestampMicrosecondBuilder};
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
}

impl KeepType {
    pub const NAMES: &'static [&'static str] = &["string", "int64", "float64", "bool", "date", "timestamp"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "string" => Self::String,
            "int64" => Self::Int64,
            "float64" => Self::Float64,
            "bool" => Self::Bool,
            "date" => Self::Date,
            "timestamp" => Self::Timestamp,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn data_type(self) -> DataType {
        match self {
            Self::String => DataType::Utf8,
            Self::Int64 => DataType::Int64,
            Self::Float64 => DataType::Float64,
            Self::Bool => DataType::Boolean,
            Self::Date => DataType::Date32,
            Self::Timestamp => super::timestamp_type(),
        }
    }
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
                "not a number",
                |s| s.trim().parse::<f64>().ok(),
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
}
