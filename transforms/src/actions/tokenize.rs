//! `tokenize`: a keyed, deterministic, fixed-length token in place of an identifier.

use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{Array, ArrayRef, StringArray};

use crate::crypto::{DomainTokenizer, TOKEN_HEX_LEN};

pub fn apply(tokenizer: &DomainTokenizer, input: &StringArray) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(input.len(), input.len() * TOKEN_HEX_LEN);
    for v in input.iter() {
        b.append_option(v.map(|s| tokenizer.token(s)));
    }
    Arc::new(b.finish())
}
