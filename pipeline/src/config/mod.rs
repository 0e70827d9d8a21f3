//! The pipeline configuration file (`sluice.toml`). Relative paths are relative to the file.
//!
//! This module reads the file whole (`Config::load`: variables expanded, environment
//! overrides applied, every error with its file, line and field); each section's meaning and
//! checks live in a file of its own: `source.rs`, `input.rs`, `lake.rs`, `keys.rs`,
//! `aggregates.rs`, `daemon.rs`; every default by name in `defaults.rs`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_connectors::avro::{registry_auth, RegistrySettings};
use sluice_connectors::debezium::DecodeOptions;
use sluice_connectors::file::FileSourceConfig;
use sluice_connectors::iceberg::{CatalogSettings, IcebergLocation};
use sluice_connectors::kafka::KafkaSourceConfig;
use sluice_connectors::kafka::{
    KafkaSecurity, KafkaSettings, PasswordSource, SaslMechanism, SaslSettings, StartAt, TlsSettings,
};
use sluice_connectors::keystore::{KeyStoreLocation, PgKeyStoreSettings};
use sluice_connectors::kinesis::{KinesisSettings, KinesisSourceConfig};
pub use sluice_connectors::lake::LakeFormat;
use sluice_connectors::lake::{delta_table, table_locations, CurrentSettings, TableLocation};
use sluice_connectors::postgres::PostgresSourceConfig;
use sluice_connectors::secret::Secret;
pub use sluice_connectors::source::SourceConfig;
use sluice_connectors::storage::{LakePath, StorageOptions};
use sluice_transforms::{ConfigError, Policy};
use toml::Spanned;

use crate::sinks::SinkSet;

mod aggregates;
mod daemon;
pub mod defaults;
mod governance;
mod input;
mod keys;
mod lake;
mod source;
#[cfg(test)]
mod tests;

pub use aggregates::*;
pub use daemon::*;
use governance::*;
pub use governance::{GovernanceConfig, RetentionConfig, RevealConfig};
pub use input::*;
pub use keys::*;
use lake::*;
pub use source::*;

/// `tls = { ca_file, cert_file, key_file, key_password_env }` of a Kafka section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    key_password_env: Option<String>,
}

/// `sasl = { mechanism, username, password_env | password_file }` of a Kafka section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSasl {
    mechanism: Spanned<String>,
    username: String,
    password_env: Option<String>,
    password_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    url: Spanned<String>,
    username_env: Option<String>,
    password_env: Option<String>,
    token_env: Option<String>,
    ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Spanned<String>,
    policies: Vec<Spanned<String>>,
    #[serde(default = "default_unknown_tables")]
    unknown_tables: UnknownTables,
    source: RawSource,
    lake: RawLake,
    keys: RawKeys,
    #[serde(default)]
    batch: BatchConfig,
    #[serde(default)]
    current: CurrentConfig,
    #[serde(default)]
    compaction: CompactionConfig,
    #[serde(default)]
    workers: WorkersConfig,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    shutdown: ShutdownConfig,
    publish: Option<RawPublish>,
    raw_stream: Option<RawPublish>,
    #[serde(default)]
    aggregates: Vec<RawAggregate>,
    #[serde(default)]
    governance: RawGovernance,
    #[serde(default)]
    retention: RetentionConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    name: Spanned<String>,
    from: Spanned<String>,
    dimensions: Spanned<Vec<Spanned<String>>>,
    measures: Spanned<Vec<RawMeasure>>,
    k_anonymity: Option<Spanned<u32>>,
    on_suppressed: Option<Spanned<String>>,
    #[serde(default = "default_lateness_ms")]
    lateness_ms: u64,
    retention_days: Option<Spanned<u32>>,
}

fn default_lateness_ms() -> u64 {
    defaults::AGGREGATE_LATENESS_MS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeasure {
    #[serde(rename = "fn")]
    function: Spanned<String>,
    column: Option<Spanned<String>>,
    #[serde(rename = "as")]
    name: Option<String>,
}

/// A column another policy of the same token domain names as its subject holds the same ids:
/// like a policy's own subject column, it is never kept or generalized (its raw ids would be in
/// the lake, outside every erasure's reach).
fn subjects_never_shown(policies: &[Policy], texts: &[(PathBuf, String)]) -> Result<(), LoadError> {
    for (policy, (file, text)) in policies.iter().zip(texts) {
        for rule in policy.rules.iter().filter(|r| r.action.shows_value()) {
            let Some(other) = policies
                .iter()
                .find(|o| o.subject == rule.column && o.token_domain == policy.token_domain)
            else {
                continue;
            };
            let header = format!("[columns.{}]", rule.column);
            return Err(ConfigError::new(
                file,
                text,
                text.find(&header).unwrap_or(0),
                format!("columns.{}.action", rule.column),
                format!(
                    "`{}` would write ids of the `{}` domain in plain: `{}` is the subject column of `{}`; tokenize it (domain {}) instead",
                    rule.action.name(),
                    policy.token_domain,
                    rule.column,
                    other.table,
                    policy.token_domain
                ),
            )
            .into());
        }
    }
    Ok(())
}

fn default_unknown_tables() -> UnknownTables {
    UnknownTables::Skip
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: Spanned<String>,
    #[serde(default = "default_max_event_bytes")]
    max_event_bytes: usize,
    control_records: Option<ControlRecords>,
    /// `[from, to)` as RFC 3339 dates or times: event times outside are `bad_timestamp`.
    event_time_window: Option<Spanned<Vec<String>>>,
    unavailable_value_placeholder: Option<Spanned<String>>,
    /// `json` (default) or `avro` (Kafka; needs `[source.schema_registry]`).
    format: Option<Spanned<String>>,
    schema_registry: Option<RawRegistry>,
    // file
    path: Option<String>,
    #[serde(default = "default_poll_ms")]
    poll_ms: u64,
    #[serde(default)]
    follow_symlinks: bool,
    // kafka
    brokers: Option<String>,
    group_id: Option<String>,
    topics: Option<Vec<String>>,
    start: Option<Spanned<String>>,
    session_timeout_ms: Option<u32>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    tls: Option<RawTls>,
    sasl: Option<RawSasl>,
    // kinesis
    stream: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    worker_index: Option<u32>,
    worker_count: Option<u32>,
    // postgres
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password_env: Option<String>,
    database: Option<String>,
    slot: Option<String>,
    publication: Option<String>,
    spool_dir: Option<String>,
    heartbeat_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublish {
    kind: Spanned<String>,
    brokers: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    tls: Option<RawTls>,
    sasl: Option<RawSasl>,
    stream: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
}

fn default_max_event_bytes() -> usize {
    defaults::MAX_EVENT_BYTES
}

fn default_poll_ms() -> u64 {
    defaults::POLL_MS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLake {
    root: String,
    vault: Option<String>,
    quarantine: Option<String>,
    audit: Option<String>,
    format: Option<Spanned<String>>,
    iceberg: Option<RawIceberg>,
    /// Object-store options of every `s3://` location of the lake.
    s3: Option<RawS3>,
    /// The vault's own (another bucket, other credentials); defaults to `s3`.
    vault_s3: Option<RawS3>,
}

/// How to reach an S3 (or S3-compatible) store. Credentials come from the standard AWS chain
/// (environment, profile, instance/pod role) unless the `*_env` fields name variables holding
/// this location's own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    endpoint: Option<String>,
    region: Option<String>,
    allow_http: Option<bool>,
    /// Path-style requests (`endpoint/bucket/key`) unless true.
    virtual_hosted_style: Option<bool>,
    access_key_id_env: Option<Spanned<String>>,
    secret_access_key_env: Option<Spanned<String>>,
    session_token_env: Option<Spanned<String>>,
    /// Further `object_store` / `deltalake` S3 options, passed as they are.
    #[serde(default)]
    options: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIceberg {
    catalog: Option<Spanned<String>>,
    catalog_name: Option<String>,
    namespace: Option<String>,
    // sql: a SQLite file and a warehouse directory; rest: a URL and a warehouse name
    uri: Option<String>,
    warehouse: Option<String>,
    /// rest: client properties taken from environment variables (`token = "ICEBERG_TOKEN"`).
    #[serde(default)]
    properties_env: BTreeMap<String, String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    kind: Option<Spanned<String>>,
    // sqlite
    store: Option<String>,
    // postgres
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password_env: Option<String>,
    database: Option<String>,
    schema: Option<String>,
    master_key_file: Option<String>,
    master_key_env: Option<String>,
    #[serde(default = "default_erasure_refresh_ms")]
    erasure_refresh_ms: u64,
}

fn default_erasure_refresh_ms() -> u64 {
    sluice_connectors::keystore::DEFAULT_ERASURE_REFRESH.as_millis() as u64
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub name: String,
    pub policies: Vec<Policy>,
    pub input: InputSettings,
    pub source: SourceConfig,
    pub publish: Option<PublishConfig>,
    /// Where `sluice capture` pushes raw (unsanitized) change events instead of writing the
    /// lake: a topic or stream inside the trusted zone, for a separate worker pool.
    pub raw_stream: Option<PublishConfig>,
    /// The lake root (a directory or an `s3://` prefix).
    pub lake_root: LakePath,
    pub tables_root: LakePath,
    /// Where the Delta tables of aggregates go (`<lake root>/aggregates`).
    pub aggregates_root: LakePath,
    pub vault_path: LakePath,
    pub quarantine_path: LakePath,
    pub key_store: KeyStoreLocation,
    pub master_key: MasterKeySource,
    /// How often running daemons re-read the tombstones of erased subjects.
    pub erasure_refresh: std::time::Duration,
    /// The append-only Delta table of erasure receipts.
    pub audit_path: LakePath,
    pub lake_format: LakeFormat,
    /// The catalog and namespace of the Iceberg tables (the format includes Iceberg).
    pub iceberg: Option<IcebergLocation>,
    /// Hourly pre-aggregations, written beside the tables in the same format(s).
    pub aggregates: Vec<Aggregate>,
    pub batch: BatchConfig,
    pub current: CurrentConfig,
    pub workers: WorkersConfig,
    pub compaction: CompactionConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub governance: GovernanceConfig,
    pub retention: RetentionConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Config {
    /// Reads the file, with `${VAR}` expanded and `SLUICE_<SECTION>__<KEY>` overrides applied
    /// (see `config_env`).
    pub fn load(file: &Path) -> Result<Self, LoadError> {
        let original = std::fs::read_to_string(file).map_err(|source| LoadError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        let prepared = crate::config_env::prepare(
            file,
            &original,
            &|var| std::env::var(var).ok(),
            &crate::config_env::process_overrides(),
        )?;
        if !prepared.overridden.is_empty() {
            tracing::info!(variables = ?prepared.overridden, "configuration values set from the environment");
        }
        Self::parse(file, &prepared.text).map_err(|e| match e {
            LoadError::Invalid(e) => LoadError::Invalid(prepared.locate(e, file)),
            other => other,
        })
    }

    fn parse(file: &Path, text: &str) -> Result<Self, LoadError> {
        let text = text.to_string();
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::from_toml(file, &text, &e))?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| base.join(p);
        let invalid = |offset: usize, field: &str, message: String| {
            LoadError::Invalid(ConfigError::new(file, &text, offset, field, message))
        };

        let name = raw.name.get_ref();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(invalid(
                raw.name.span().start,
                "name",
                "must be letters, digits, - and _".into(),
            ));
        }
        let key_store = key_store_config(&raw.keys, &text, &resolve, &invalid)?;
        // Spools default to a directory beside the embedded key store (or the config file).
        let spool_base = match &key_store {
            KeyStoreLocation::Sqlite(path) => path.parent().map(Path::to_path_buf).unwrap_or_default(),
            KeyStoreLocation::Postgres(_) => base.clone(),
        };
        let source = source_config(&raw.source, name, &spool_base, &resolve, &invalid)?;
        let publish = match &raw.publish {
            Some(p) => Some(publish_config(p, "publish", &resolve, &invalid)?),
            None => None,
        };
        let raw_stream = match &raw.raw_stream {
            Some(p) => Some(publish_config(p, "raw_stream", &resolve, &invalid)?),
            None => None,
        };
        if raw.keys.master_key_file.is_none() && raw.keys.master_key_env.is_none() {
            return Err(invalid(
                text.find("[keys]").unwrap_or(0),
                "keys",
                "set master_key_file or master_key_env".into(),
            ));
        }
        if raw.workers.memory_mb < defaults::MIN_MEMORY_MB {
            return Err(invalid(
                text.find("[workers]")
                    .and_then(|at| text[at..].find("memory_mb").map(|i| at + i))
                    .unwrap_or(0),
                "workers.memory_mb",
                format!(
                    "must be at least {} (MiB): the budget the run's buffers are sized from",
                    defaults::MIN_MEMORY_MB
                ),
            ));
        }
        let governance = governance_config(&raw.governance, &text, &invalid)?;
        let retention = retention_config(raw.retention.clone(), &text, &invalid)?;
        let policies = load_policies(&raw, &text, &resolve, &invalid, &governance.classes)?;
        let lake = lake_layout(&raw, name, &base, &text, &resolve, &invalid)?;
        let aggregates = aggregates_config(&raw, &policies, &invalid)?;
        let input = input_settings(&raw, &resolve, &invalid)?;
        Ok(Config {
            input,
            lake_format: lake.format,
            iceberg: lake.iceberg,
            aggregates,
            file: file.to_path_buf(),
            name: name.clone(),
            policies,
            source,
            publish,
            raw_stream,
            tables_root: lake.root.join("tables"),
            aggregates_root: lake.root.join("aggregates"),
            vault_path: lake.vault,
            quarantine_path: lake.quarantine,
            key_store,
            erasure_refresh: std::time::Duration::from_millis(raw.keys.erasure_refresh_ms),
            audit_path: lake.audit,
            lake_root: lake.root,
            master_key: MasterKeySource {
                file: raw.keys.master_key_file.as_deref().map(resolve),
                env: raw.keys.master_key_env,
            },
            batch: raw.batch,
            current: raw.current,
            compaction: raw.compaction,
            workers: raw.workers,
            http: raw.http,
            shutdown: raw.shutdown,
            governance,
            retention,
        })
    }

    pub fn aggregates_root(&self) -> &LakePath {
        &self.aggregates_root
    }

    /// Where a policy's table is written: its Delta table and/or its Iceberg table.
    pub fn table_locations(&self, policy: &Policy) -> Vec<TableLocation> {
        table_locations(
            self.lake_format,
            &self.tables_root,
            self.iceberg.as_ref(),
            &policy.target,
        )
    }

    /// Where a policy's current-state table is (`<target>_current`), when it keeps one.
    pub fn current_locations(&self, policy: &Policy) -> Vec<TableLocation> {
        if !policy.current {
            return Vec::new();
        }
        table_locations(
            self.lake_format,
            &self.tables_root,
            self.iceberg.as_ref(),
            &current_table_name(policy),
        )
    }

    /// How a policy's current table is kept.
    pub fn current_settings(&self, policy: &Policy) -> CurrentSettings {
        CurrentSettings {
            key: policy.key_output_columns(),
            max_lag: std::time::Duration::from_millis(self.current.max_lag_ms),
            max_rows: self.batch.max_rows,
            // What waits is held beside the buffers of the logs: a share of the same budget.
            max_bytes: self.memory().buffered / 2,
        }
    }

    /// Every table a run commits to, in sink order: each policy's (one per format), each
    /// current table (one per format), the vault, the quarantine.
    pub fn sink_locations(&self) -> Vec<TableLocation> {
        self.sink_set().arrange(
            self.policies.iter().map(|p| self.table_locations(p)),
            self.policies
                .iter()
                .filter(|p| p.current)
                .map(|p| self.current_locations(p)),
            delta_table(self.vault_path.clone()),
            delta_table(self.quarantine_path.clone()),
        )
    }

    /// How many sinks a run has of each kind (see [`SinkSet`]).
    pub fn sink_set(&self) -> SinkSet {
        SinkSet::new(
            self.policies.len(),
            self.lake_format.count(),
            self.policies
                .iter()
                .enumerate()
                .filter(|(_, p)| p.current)
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// Writes tables, vault and quarantine under another lake root (a replay `--into`).
    pub fn redirect_lake(&mut self, root: &Path) {
        self.lake_root = LakePath::Local(root.to_path_buf());
        self.tables_root = self.lake_root.join("tables");
        self.aggregates_root = self.lake_root.join("aggregates");
        self.vault_path = self.lake_root.join("vault");
        self.quarantine_path = self.lake_root.join("quarantine");
        if let Some(iceberg) = &mut self.iceberg {
            match &mut iceberg.catalog {
                CatalogSettings::Sql { database, warehouse } => {
                    *database = root.join("iceberg").join("catalog.db");
                    *warehouse = LakePath::Local(root.join("iceberg").join("warehouse"));
                }
                // A REST catalog is shared: the rebuilt tables go to a namespace of their own.
                CatalogSettings::Rest { .. } => {
                    let dir = root
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    iceberg.namespace = format!(
                        "{}_{}",
                        iceberg.namespace,
                        dir.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                    );
                }
            }
        }
    }

    /// How long `/ready` tolerates rows waiting without a commit.
    pub fn ready_max_age(&self) -> std::time::Duration {
        let default = (3 * self.batch.max_age_ms).max(defaults::MIN_READY_MAX_AGE_MS);
        std::time::Duration::from_millis(self.http.ready_max_age_ms.unwrap_or(default))
    }

    /// How `[workers] memory_mb` is shared out. The rest of the budget is the chunks in flight
    /// (each at most `source::file::CHUNK_BYTES` of events, decoded once) and the program.
    pub fn memory(&self) -> MemoryPlan {
        let total = self.workers.memory_mb << 20;
        MemoryPlan {
            key_store: total / 4,
            // Parquet encoding at the commit holds about as much again.
            buffered: (total / 4).min(self.batch.max_bytes),
            tokens_per_thread: total / 16 / self.worker_threads(),
        }
    }

    pub fn worker_threads(&self) -> usize {
        match self.workers.threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            n => n,
        }
    }
}

/// The policy files `policies` names, parsed; no two name one source table or one target.
fn load_policies(
    raw: &RawConfig,
    text: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
    known_classes: &[String],
) -> Result<Vec<Policy>, LoadError> {
    if raw.policies.is_empty() {
        return Err(invalid(
            text.find("policies").unwrap_or(0),
            "policies",
            "name at least one policy file or directory".into(),
        ));
    }
    let mut policies = Vec::new();
    let mut policy_texts = Vec::new();
    for entry in &raw.policies {
        let path = resolve(entry.get_ref());
        let files = policy_files(&path)
            .map_err(|e| invalid(entry.span().start, "policies", format!("{}: {e}", path.display())))?;
        if files.is_empty() {
            return Err(invalid(
                entry.span().start,
                "policies",
                format!("{}: no .toml policy files", path.display()),
            ));
        }
        for f in files {
            let ptext = std::fs::read_to_string(&f).map_err(|source| LoadError::Io {
                path: f.clone(),
                source,
            })?;
            policies.push(Policy::from_toml(&f, &ptext)?);
            policy_texts.push((f, ptext));
        }
    }
    subjects_never_shown(&policies, &policy_texts)?;
    classes_known(&policies, &policy_texts, known_classes)?;
    let mut tables = HashSet::new();
    let mut targets = HashSet::new();
    for p in &policies {
        if !tables.insert(p.table.clone()) {
            return Err(invalid(
                0,
                "policies",
                format!("two policies name source table `{}`", p.table),
            ));
        }
        if !targets.insert(p.target.clone()) {
            return Err(invalid(
                0,
                "policies",
                format!("two policies write target table `{}`", p.target),
            ));
        }
    }
    for p in policies.iter().filter(|p| p.current) {
        let name = current_table_name(p);
        if targets.contains(&name) {
            return Err(invalid(
                0,
                "policies",
                format!(
                    "policy of `{}` keeps a current table `{name}`, and another policy writes a table of that name",
                    p.table
                ),
            ));
        }
    }
    Ok(policies)
}

/// The current-state table of a policy: `<target>_current`.
pub fn current_table_name(policy: &Policy) -> String {
    format!("{}_current", policy.target)
}

/// Where `value` is written in the config text (for error lines), or the start.
fn raw_text_offset(text: &str, value: &str) -> usize {
    text.find(&format!("\"{value}\"")).unwrap_or(0)
}

/// A setting the section's `kind` needs; the error points at the `kind` line.
fn required(
    value: &Option<String>,
    field: &str,
    section: &str,
    kind: &Spanned<String>,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<String, LoadError> {
    value.clone().ok_or_else(|| {
        invalid(
            kind.span().start,
            field,
            format!("required for {section} kind `{}`", kind.get_ref()),
        )
    })
}

fn policy_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    Ok(files)
}
