//! `encrypt`: the value stays in the analytic row, as an envelope under the subject's key,
//! bound by its AAD to table, column and subject.

use std::sync::Arc;

use arrow_array::builder::BinaryBuilder;
use arrow_array::{Array, ArrayRef, StringArray};

use crate::crypto::{field_aad, CryptoError, ENVELOPE_OVERHEAD};
use crate::engine::RowContext;

pub fn apply(ctx: &RowContext<'_>, column: &str, input: &StringArray) -> Result<ArrayRef, CryptoError> {
    let mut b = BinaryBuilder::with_capacity(input.len(), input.value_data().len() + input.len() * ENVELOPE_OVERHEAD);
    for (i, v) in input.iter().enumerate() {
        match (v, ctx.key(i)) {
            (Some(v), Some((key, subject))) => {
                b.append_value(key.seal(v.as_bytes(), &field_aad(ctx.target, column, subject))?)
            }
            _ => b.append_null(),
        }
    }
    Ok(Arc::new(b.finish()))
}
