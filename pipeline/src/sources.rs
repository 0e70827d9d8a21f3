//! The configured source, built for a run (daemon, `--once`, capture, replay): the run's part of what a source is built with (its
//! name, its tables, the spool key); each connector's config builds the reader itself.

use std::sync::Arc;

use sluice_connectors::lake::TableLocation;
use sluice_connectors::postgres::{PostgresSource, PostgresSourceConfig};
use sluice_connectors::source::{Replay, Replaying, Source, SourceContext};
use sluice_transforms::crypto::DataKey;

use crate::config;
use crate::runtime;

/// The daemon's (or a `--once` pass's) reader of the configured source.
pub fn build(cfg: &config::Config, once: bool) -> anyhow::Result<Box<dyn Source>> {
    let spool_key = match cfg.source.needs_spool_key() {
        true => Some(spool_key(cfg)?),
        false => None,
    };
    let run = RunTables::of(cfg);
    Ok(cfg.source.build(&run.context(cfg, once), spool_key)?)
}

/// `sluice capture`'s reader (also feeding the raw stream, which writes no lake).
pub fn postgres_source(cfg: &config::Config, p: &PostgresSourceConfig, once: bool) -> anyhow::Result<PostgresSource> {
    let run = RunTables::of(cfg);
    Ok(p.build(&run.context(cfg, once), spool_key(cfg)?)?)
}

/// A replay's reader and its progress; `None` when the source kind has no replay.
pub fn replay(cfg: &config::Config, replay: Replay) -> anyhow::Result<Option<Replaying>> {
    let run = RunTables::of(cfg);
    Ok(cfg.source.replay(&run.context(cfg, true), replay)?)
}

fn spool_key(cfg: &config::Config) -> anyhow::Result<Arc<DataKey>> {
    let keys = runtime::open_key_store(cfg, runtime::SMALL_KEY_STORE_MEMORY)?;
    Ok(keys.system_key("snapshot-spool")?)
}

/// The tables a run writes, as a source needs them.
struct RunTables {
    lake: Vec<TableLocation>,
    policy_tables: Vec<String>,
    table_sinks: Vec<Vec<TableLocation>>,
}

impl RunTables {
    fn of(cfg: &config::Config) -> Self {
        let (lake, set) = (cfg.sink_locations(), cfg.sink_set());
        // Per policy table, the tables its rows can land in: its own (one per format), its
        // current table, the vault, the quarantine. Raw mode writes no lake: its positions are its own
        // checkpoint's.
        let table_sinks = match cfg.raw_stream {
            Some(_) => Vec::new(),
            None => cfg
                .policies
                .iter()
                .map(|p| {
                    let mut l = cfg.table_locations(p);
                    l.extend(cfg.current_locations(p));
                    l.extend([lake[set.vault()].clone(), lake[set.quarantine()].clone()]);
                    l
                })
                .collect(),
        };
        Self {
            policy_tables: cfg.policies.iter().map(|p| p.table.clone()).collect(),
            lake,
            table_sinks,
        }
    }

    fn context<'a>(&'a self, cfg: &'a config::Config, once: bool) -> SourceContext<'a> {
        SourceContext {
            name: &cfg.name,
            lake: &self.lake,
            policy_tables: &self.policy_tables,
            table_sinks: &self.table_sinks,
            max_event_bytes: cfg.input.max_event_bytes,
            chunk_events: cfg.workers.chunk_events,
            once,
        }
    }
}
