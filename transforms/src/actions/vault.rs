//! `vault`: the value leaves the analytic row entirely; its envelope goes to the PII vault,
//! keyed by subject token, table and column. Deletes carry no new data and write nothing.

use arrow_array::StringArray;

use crate::crypto::{field_aad_into, CryptoError};
use crate::engine::RowContext;
use crate::raw::Op;
use crate::vault::VaultRowsBuilder;

pub fn apply(
    ctx: &RowContext<'_>,
    column: &str,
    input: &StringArray,
    out: &mut VaultRowsBuilder,
) -> Result<(), CryptoError> {
    let (mut aad, mut envelope) = (Vec::new(), Vec::new());
    for (i, v) in input.iter().enumerate() {
        if ctx.ops[i] == Op::Delete {
            continue;
        }
        if let (Some(v), Some((key, subject))) = (v, ctx.key(i)) {
            field_aad_into(&mut aad, ctx.target, column, subject);
            key.seal_into(v.as_bytes(), &aad, &mut envelope)?;
            out.push(i, subject, ctx.target, column, &envelope);
        }
    }
    Ok(())
}
