//! `tokenize`: a keyed, deterministic, fixed-length token in place of an identifier.

use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{Array, ArrayRef, StringArray};

use crate::crypto::{DomainTokenizer, Token, TOKEN_HEX_LEN};

pub fn apply(tokenizer: &DomainTokenizer, input: &StringArray) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(input.len(), input.len() * TOKEN_HEX_LEN);
    for v in input.iter() {
        match v {
            Some(s) => b.append_value(tokenizer.token(s).as_str()),
            None => b.append_null(),
        }
    }
    Arc::new(b.finish())
}

/// The column of tokens already computed (the subject column in the subject's domain).
pub fn from_tokens(tokens: &[Option<Token>]) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(tokens.len(), tokens.len() * TOKEN_HEX_LEN);
    for t in tokens {
        b.append_option(t.as_ref().map(Token::as_str));
    }
    Arc::new(b.finish())
}
