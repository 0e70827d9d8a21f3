//! The configured source, built for a run: the one place a `[source]` kind becomes a reader.

use std::time::Duration;

use sluice_connectors::lake::TableLocation;
use sluice_connectors::source::{self, Source};

use crate::config::{self, SourceConfig};
use crate::runtime;

/// The daemon's (or a `--once` pass's) reader of the configured source.
pub fn build(cfg: &config::Config, once: bool) -> anyhow::Result<Box<dyn Source>> {
    Ok(match &cfg.source {
        SourceConfig::File {
            path,
            poll_ms,
            follow_symlinks,
            fingerprints,
        } => Box::new(
            sluice_connectors::file::FileSource::new(
                path.clone(),
                cfg.input.max_event_bytes,
                cfg.workers.chunk_events,
                once,
                Duration::from_millis(*poll_ms),
            )
            .with_files(*follow_symlinks, fingerprints.clone()),
        ),
        SourceConfig::Kafka(k) => {
            let positions = sluice_connectors::kafka::LakePositions {
                tables: cfg.sink_locations(),
                app_prefix: cfg.name.clone(),
                start_at: k.start_at,
            };
            let group = sluice_connectors::kafka::GroupSettings {
                group_id: k.group_id.clone(),
                topics: k.topics.clone(),
                start_at: k.start_at,
                session_timeout_ms: k.session_timeout_ms,
            };
            Box::new(sluice_connectors::kafka::group_source(
                &k.settings,
                &group,
                positions,
                cfg.input.max_event_bytes,
                cfg.workers.chunk_events,
                once,
            )?)
        }
        SourceConfig::Kinesis(k) => Box::new(kinesis_source(cfg, k, k.stream.clone(), None, once)?),
        SourceConfig::Postgres(p) => Box::new(postgres_source(cfg, p, once)?),
    })
}

pub fn postgres_source(
    cfg: &config::Config,
    p: &config::PostgresSourceConfig,
    once: bool,
) -> anyhow::Result<sluice_connectors::postgres::PostgresSource> {
    // Raw mode writes no lake: its positions are its own checkpoint's.
    let snapshot_sinks = match cfg.raw_stream {
        Some(_) => Vec::new(),
        None => snapshot_sinks(cfg),
    };
    let keys = runtime::open_key_store(cfg, runtime::SMALL_KEY_STORE_MEMORY)?;
    let tables = cfg
        .policies
        .iter()
        .map(|policy| match policy.table.split_once('.') {
            Some((schema, table)) => (schema.to_string(), table.to_string()),
            None => ("public".to_string(), policy.table.clone()),
        })
        .collect();
    Ok(sluice_connectors::postgres::PostgresSource::new(
        sluice_connectors::postgres::PostgresOptions {
            settings: sluice_connectors::postgres::PgSettings {
                host: p.host.clone(),
                port: p.port,
                user: p.user.clone(),
                password: p.password()?,
                database: p.database.clone(),
                slot: p.slot.clone(),
                publication: p.publication.clone(),
            },
            name: cfg.name.clone(),
            tables,
            spool_dir: p.spool_dir.clone(),
            spool_key: keys.system_key("snapshot-spool")?,
            chunk_events: cfg.workers.chunk_events,
            heartbeat: Duration::from_millis(p.heartbeat_ms),
            once,
            snapshot_sinks,
            app_prefix: cfg.name.clone(),
        },
    )?)
}

/// Per policy table, the tables its rows can land in: its own (one per format), the vault, the
/// quarantine.
fn snapshot_sinks(cfg: &config::Config) -> Vec<Vec<TableLocation>> {
    let (locations, set) = (cfg.sink_locations(), cfg.sink_set());
    let (vault, quarantine) = (&locations[set.vault()], &locations[set.quarantine()]);
    cfg.policies
        .iter()
        .map(|p| {
            let mut l = cfg.table_locations(p);
            l.extend([vault.clone(), quarantine.clone()]);
            l
        })
        .collect()
}

pub fn kinesis_source(
    cfg: &config::Config,
    k: &config::KinesisSourceConfig,
    stream: String,
    replay: Option<(source::ReplayFrom, source::ReplayTo)>,
    once: bool,
) -> anyhow::Result<sluice_connectors::kinesis::KinesisSource> {
    Ok(sluice_connectors::kinesis::KinesisSource::new(
        sluice_connectors::kinesis::KinesisOptions {
            settings: k.settings.clone(),
            stream,
            worker_index: k.worker_index,
            worker_count: k.worker_count,
            start_at: k.start_at,
            replay,
            once,
            poll: Duration::from_millis(k.poll_ms),
            max_event_bytes: cfg.input.max_event_bytes,
            lake: cfg.sink_locations(),
            app_prefix: cfg.name.clone(),
        },
    )?)
}
