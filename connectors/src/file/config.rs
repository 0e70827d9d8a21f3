//! `[source] kind = "file"`, and the file source it builds.

use std::path::PathBuf;
use std::time::Duration;

use crate::file::FileSource;
use crate::source::SourceContext;

/// Debezium events in `.jsonl` / `.jsonl.gz` files: one file, or a directory of them.
#[derive(Debug, Clone)]
pub struct FileSourceConfig {
    pub path: PathBuf,
    pub poll_ms: u64,
    /// Whether symbolic links inside a source directory are followed.
    pub follow_symlinks: bool,
    /// Where each file stream's fingerprint is recorded (beside the embedded key store).
    pub fingerprints: PathBuf,
}

impl FileSourceConfig {
    pub(crate) fn build(&self, ctx: &SourceContext) -> FileSource {
        FileSource::new(
            self.path.clone(),
            ctx.max_event_bytes,
            ctx.chunk_events,
            ctx.once,
            Duration::from_millis(self.poll_ms),
        )
        .with_files(self.follow_symlinks, self.fingerprints.clone())
    }
}
