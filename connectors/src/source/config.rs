//! `[source]` as configured, and the one place a kind becomes a reader: each connector's config
//! builds its own source (`file/config.rs`, `kafka/config.rs`, …).

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use sluice_transforms::crypto::DataKey;

use crate::file::FileSourceConfig;
use crate::kafka::{KafkaSourceConfig, Lag, ReplayRange};
use crate::kinesis::KinesisSourceConfig;
use crate::lake::TableLocation;
use crate::postgres::PostgresSourceConfig;
use crate::source::{ReplayFrom, ReplayTo, Source, SourceError};

#[derive(Debug, Clone)]
pub enum SourceConfig {
    File(FileSourceConfig),
    Kafka(KafkaSourceConfig),
    Kinesis(KinesisSourceConfig),
    Postgres(PostgresSourceConfig),
}

/// What a source is built with besides its own section: the run it serves.
pub struct SourceContext<'a> {
    /// The pipeline's name: its positions' prefix in the lake, the events' `source.name`.
    pub name: &'a str,
    /// Every table the run writes: a stream continues from the lowest position over them.
    pub lake: &'a [TableLocation],
    /// The policies' tables (`schema.table`, or a bare name in `public`).
    pub policy_tables: &'a [String],
    /// Per policy table, the tables its rows land in (its own, the vault, the quarantine): a
    /// PostgreSQL table's snapshot is done when these hold it. Empty when nothing is written
    /// to the lake (raw capture).
    pub table_sinks: &'a [Vec<TableLocation>],
    pub max_event_bytes: usize,
    pub chunk_events: usize,
    /// Stop once caught up (`--once`).
    pub once: bool,
}

/// A range of a stream to read again (`sluice replay`).
pub struct Replay {
    pub from: ReplayFrom,
    pub to: ReplayTo,
    /// Kafka: the topics (named, no patterns).
    pub topics: Vec<String>,
    /// Kinesis: the stream.
    pub stream: String,
}

/// A replay's reader, and how far it has come.
pub struct Replaying {
    pub source: Box<dyn Source>,
    pub progress: ReadProgress,
}

/// How far a replay has come: events read, and how far behind the source's end it is.
pub struct ReadProgress {
    pub events: Arc<AtomicU64>,
    pub behind: Behind,
}

/// How far behind the source's end a reader is.
pub enum Behind {
    /// Kafka: messages behind the high watermarks.
    Messages(Lag),
    /// Kinesis: `MillisBehindLatest` (the largest over the shards), -1 before the first read.
    Millis(Arc<AtomicI64>),
}

impl SourceConfig {
    /// Whether the source keeps snapshot spools, sealed with a key from the key store.
    pub fn needs_spool_key(&self) -> bool {
        matches!(self, SourceConfig::Postgres(_))
    }

    /// The daemon's (or a `--once` pass's) reader. `spool_key`: see
    /// [`SourceConfig::needs_spool_key`].
    pub fn build(&self, ctx: &SourceContext, spool_key: Option<Arc<DataKey>>) -> Result<Box<dyn Source>, SourceError> {
        Ok(match self {
            SourceConfig::File(f) => Box::new(f.build(ctx)),
            SourceConfig::Kafka(k) => Box::new(k.build(ctx)?),
            SourceConfig::Kinesis(k) => Box::new(k.build(ctx, k.stream.clone(), None)?),
            SourceConfig::Postgres(p) => {
                let key = spool_key.ok_or(SourceError::Internal(
                    "a postgres source was built without its spool key",
                ))?;
                Box::new(p.build(ctx, key)?)
            }
        })
    }

    /// A replay's reader and its progress; `None` for a source that cannot be replayed (files,
    /// PostgreSQL).
    pub fn replay(&self, ctx: &SourceContext, replay: Replay) -> Result<Option<Replaying>, SourceError> {
        Ok(match self {
            SourceConfig::Kafka(k) => {
                let range = ReplayRange {
                    topics: replay.topics,
                    from: replay.from,
                    to: replay.to,
                };
                let source = k.replay(ctx, range)?;
                let progress = ReadProgress {
                    events: source.events.clone(),
                    behind: Behind::Messages(source.lag()),
                };
                Some(Replaying {
                    source: Box::new(source),
                    progress,
                })
            }
            SourceConfig::Kinesis(k) => {
                let source = k.build(ctx, replay.stream, Some((replay.from, replay.to)))?;
                let progress = ReadProgress {
                    events: source.events.clone(),
                    behind: Behind::Millis(source.behind_ms.clone()),
                };
                Some(Replaying {
                    source: Box::new(source),
                    progress,
                })
            }
            SourceConfig::File(_) | SourceConfig::Postgres(_) => None,
        })
    }
}
