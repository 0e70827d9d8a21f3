//! How the engine obtains keys without doing I/O itself.

use std::sync::Arc;

use crate::crypto::DataKey;

#[derive(Debug, thiserror::Error)]
#[error("key provider failed: {0}")]
pub struct KeyError(pub String);

/// Supplies per-subject data keys, creating them on first sight, and knows which subjects were
/// erased. Implemented by the key store.
pub trait KeyProvider {
    /// One key per subject token, in the same order; `None` for an erased subject (its key was
    /// destroyed and none is ever made again). Batched so a store can resolve a whole batch in
    /// one transaction.
    fn subject_keys(&self, subject_tokens: &[&str]) -> Result<Vec<Option<Arc<DataKey>>>, KeyError>;

    /// Whether each subject was erased (right to be forgotten): its events are dropped.
    fn erased_subjects(&self, subject_tokens: &[&str]) -> Result<Vec<bool>, KeyError>;
}
