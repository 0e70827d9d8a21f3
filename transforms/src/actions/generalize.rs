//! `generalize`: the column is replaced by a coarser value (age band, prefix, bucket, …). The
//! functions themselves are shared with `derive` and live in [`crate::functions`].

use arrow_array::{ArrayRef, Int64Array, StringArray};

use crate::functions::{Function, IntegerTime, RowError};

pub fn apply(
    function: &Function,
    input: &StringArray,
    event_ms: &Int64Array,
    unit: Option<IntegerTime>,
    errors: &mut Vec<RowError>,
) -> ArrayRef {
    function.apply(input, event_ms, unit, errors)
}
