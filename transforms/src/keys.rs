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

    /// Per subject, the source time (ms) before which its events are dropped: `None` if it
    /// was never erased, [`ERASED_FOR_GOOD`] once erased (right to be forgotten), or the time
    /// its id was released for reuse by someone else (the erased person's events, replayed,
    /// stay dropped; the new owner's are kept).
    fn erased_subjects(&self, subject_tokens: &[&str]) -> Result<Vec<Option<i64>>, KeyError>;
}

/// An erased subject none of whose events are kept, whatever their time.
pub const ERASED_FOR_GOOD: i64 = i64::MAX;

/// Whether an event of `event_ms` is dropped under a subject's erasure `cutoff`.
pub fn dropped_by_erasure(cutoff: Option<i64>, event_ms: i64) -> bool {
    cutoff.is_some_and(|c| event_ms < c)
}
