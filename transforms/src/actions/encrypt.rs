//! `encrypt`: the value stays in the analytic row, as an envelope under the subject's key,
//! bound by its AAD to table, column and subject.

use std::sync::Arc;

use arrow_array::builder::BinaryBuilder;
use arrow_array::{Array, ArrayRef, StringArray};

use crate::crypto::{field_aad_into, CryptoError, ENVELOPE_OVERHEAD};
use crate::engine::RowContext;

pub fn apply(ctx: &RowContext<'_>, column: &str, input: &StringArray) -> Result<ArrayRef, CryptoError> {
    let mut b = BinaryBuilder::with_capacity(input.len(), input.value_data().len() + input.len() * ENVELOPE_OVERHEAD);
    let (mut aad, mut envelope) = (Vec::new(), Vec::new());
    for (i, v) in input.iter().enumerate() {
        match (v, ctx.key(i)) {
            (Some(v), Some((key, subject))) => {
                field_aad_into(&mut aad, ctx.target, column, subject);
                key.seal_into(v.as_bytes(), &aad, &mut envelope)?;
                b.append_value(&envelope);
            }
            _ => b.append_null(),
        }
    }
    Ok(Arc::new(b.finish()))
}
