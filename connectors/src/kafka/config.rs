//! `[source] kind = "kafka"`, and the group consumer (or replay) it builds.

use crate::kafka::source::{group_source, replay_source, KafkaSource, LakePositions, ReplayRange};
use crate::kafka::{GroupContext, GroupSettings, KafkaSettings, StandaloneContext, StartAt};
use crate::source::{SourceContext, SourceError};

/// A Kafka consumer group.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    pub settings: KafkaSettings,
    pub group_id: String,
    /// Topic names, or regular expressions starting with `^`.
    pub topics: Vec<String>,
    pub start_at: StartAt,
    pub session_timeout_ms: u32,
}

impl KafkaSourceConfig {
    /// The daemon's member of the group, starting each assigned partition where the lake
    /// stands.
    pub(crate) fn build(&self, ctx: &SourceContext) -> Result<KafkaSource<GroupContext>, SourceError> {
        let positions = LakePositions {
            tables: ctx.lake.to_vec(),
            app_prefix: ctx.name.to_string(),
            start_at: self.start_at,
        };
        let group = GroupSettings {
            group_id: self.group_id.clone(),
            topics: self.topics.clone(),
            start_at: self.start_at,
            session_timeout_ms: self.session_timeout_ms,
        };
        group_source(
            &self.settings,
            &group,
            positions,
            ctx.max_event_bytes,
            ctx.chunk_events,
            ctx.once,
        )
    }

    /// A replay of named topics, outside the group.
    pub(crate) fn replay(
        &self,
        ctx: &SourceContext,
        range: ReplayRange,
    ) -> Result<KafkaSource<StandaloneContext>, SourceError> {
        replay_source(&self.settings, range, ctx.max_event_bytes, ctx.chunk_events)
    }
}
