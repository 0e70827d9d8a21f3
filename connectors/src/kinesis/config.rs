//! `[source] kind = "kinesis"`, and the shard reader it builds.

use std::time::Duration;

use crate::kafka::StartAt;
use crate::kinesis::source::{KinesisOptions, KinesisSource};
use crate::kinesis::KinesisSettings;
use crate::source::{ReplayFrom, ReplayTo, SourceContext, SourceError};

/// A Kinesis data stream: all its shards, or this worker's share of them.
#[derive(Debug, Clone)]
pub struct KinesisSourceConfig {
    pub settings: KinesisSettings,
    pub stream: String,
    pub worker_index: u32,
    pub worker_count: u32,
    pub start_at: StartAt,
    pub poll_ms: u64,
}

impl KinesisSourceConfig {
    /// Reads `stream` (the configured one, or another for a replay), from where the lake
    /// stands or over a replay's range.
    pub(crate) fn build(
        &self,
        ctx: &SourceContext,
        stream: String,
        replay: Option<(ReplayFrom, ReplayTo)>,
    ) -> Result<KinesisSource, SourceError> {
        KinesisSource::new(KinesisOptions {
            settings: self.settings.clone(),
            stream,
            worker_index: self.worker_index,
            worker_count: self.worker_count,
            start_at: self.start_at,
            replay,
            once: ctx.once,
            poll: Duration::from_millis(self.poll_ms),
            max_event_bytes: ctx.max_event_bytes,
            lake: ctx.lake.to_vec(),
            app_prefix: ctx.name.to_string(),
        })
    }
}
