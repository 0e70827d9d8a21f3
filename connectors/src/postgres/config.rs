//! `[source] kind = "postgres"`, and the logical-replication reader it builds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_transforms::crypto::DataKey;

use crate::postgres::{PgSettings, PostgresOptions, PostgresSource};
use crate::secret::{Secret, SecretError};
use crate::source::{SourceContext, SourceError};

/// A PostgreSQL database captured through logical replication.
#[derive(Debug, Clone)]
pub struct PostgresSourceConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The environment variable holding the password (never the config file), read when a run
    /// starts (so `sluice check` needs no secrets); None: `PGPASSWORD` if set, else none.
    pub password_env: Option<String>,
    pub database: String,
    pub slot: String,
    pub publication: String,
    /// Encrypted snapshot spools.
    pub spool_dir: PathBuf,
    pub heartbeat_ms: u64,
}

impl PostgresSourceConfig {
    /// The password, from the environment now: a `password_env` naming an unset variable is an
    /// error naming both.
    pub fn password(&self) -> Result<Option<Secret>, SecretError> {
        Secret::from_named_env_or(self.password_env.as_deref(), "PGPASSWORD", "source.password_env")
    }

    /// Captures the policies' tables; snapshot spools are sealed with `spool_key`.
    pub fn build(&self, ctx: &SourceContext, spool_key: Arc<DataKey>) -> Result<PostgresSource, SourceError> {
        let tables = ctx
            .policy_tables
            .iter()
            .map(|table| match table.split_once('.') {
                Some((schema, table)) => (schema.to_string(), table.to_string()),
                None => ("public".to_string(), table.clone()),
            })
            .collect();
        PostgresSource::new(PostgresOptions {
            settings: PgSettings {
                host: self.host.clone(),
                port: self.port,
                user: self.user.clone(),
                password: self.password()?,
                database: self.database.clone(),
                slot: self.slot.clone(),
                publication: self.publication.clone(),
            },
            name: ctx.name.to_string(),
            tables,
            spool_dir: self.spool_dir.clone(),
            spool_key,
            chunk_events: ctx.chunk_events,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            once: ctx.once,
            snapshot_sinks: ctx.table_sinks.to_vec(),
            app_prefix: ctx.name.to_string(),
        })
    }
}
