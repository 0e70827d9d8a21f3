//! The pipeline configuration file (`sluice.toml`). Relative paths are relative to the file.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_connectors::avro::{registry_auth, RegistrySettings};
use sluice_connectors::debezium::DecodeOptions;
use sluice_connectors::iceberg::{CatalogSettings, IcebergLocation};
use sluice_connectors::kafka::{
    KafkaSecurity, KafkaSettings, PasswordSource, SaslMechanism, SaslSettings, StartAt, TlsSettings,
};
use sluice_connectors::keystore::{KeyStoreLocation, PgKeyStoreSettings};
use sluice_connectors::kinesis::KinesisSettings;
pub use sluice_connectors::lake::LakeFormat;
use sluice_connectors::lake::{delta_table, table_locations, TableLocation};
use sluice_connectors::secret::Secret;
use sluice_connectors::storage::{LakePath, StorageOptions};
use sluice_transforms::{ConfigError, Policy};
use toml::Spanned;

use crate::sinks::SinkSet;

/// What to do with events of a table that no policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTables {
    /// Count and drop.
    Skip,
    /// Count and write to the quarantine (encrypted).
    Quarantine,
}

/// What to do with records that are not row changes (transaction metadata, heartbeats,
/// schema changes, logical decoding messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlRecords {
    /// Count by kind and skip.
    Skip,
    /// Count by kind and write to the quarantine (encrypted).
    Quarantine,
}

/// How a message's bytes encode a change event.
#[derive(Debug, Clone, Default)]
pub enum InputFormat {
    /// Debezium's JSON converter, with or without the schema.
    #[default]
    Json,
    /// Confluent-framed Avro, writer schemas from a Schema Registry (Kafka sources).
    Avro(RegistryConfig),
}

/// `[source.schema_registry]`: where writer schemas are fetched and the names of the
/// environment variables holding the credentials (read when a run starts).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub url: String,
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub token_env: Option<String>,
    pub ca_file: Option<PathBuf>,
}

impl RegistryConfig {
    /// The client settings, credentials read from the environment now.
    pub fn settings(&self) -> Result<RegistrySettings, sluice_connectors::secret::SecretError> {
        Ok(RegistrySettings {
            url: self.url.clone(),
            auth: registry_auth(
                self.username_env.as_deref(),
                self.password_env.as_deref(),
                self.token_env.as_deref(),
            )?,
            ca_file: self.ca_file.clone(),
        })
    }
}

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

/// How events are read, whatever their source: the decoding keys of `[source]`.
#[derive(Debug, Clone)]
pub struct InputSettings {
    pub format: InputFormat,
    pub unknown_tables: UnknownTables,
    pub control_records: ControlRecords,
    pub max_event_bytes: usize,
    pub decode: DecodeOptions,
    /// What Debezium writes for a value it did not capture (an unchanged TOAST column):
    /// its `unavailable.value.placeholder`.
    pub unavailable_placeholder: String,
}

impl Default for InputSettings {
    fn default() -> Self {
        Self {
            format: InputFormat::Json,
            unknown_tables: UnknownTables::Skip,
            control_records: ControlRecords::Skip,
            max_event_bytes: default_max_event_bytes(),
            decode: DecodeOptions::default(),
            unavailable_placeholder: DEFAULT_UNAVAILABLE_PLACEHOLDER.into(),
        }
    }
}

/// Debezium's default `unavailable.value.placeholder`.
pub const DEFAULT_UNAVAILABLE_PLACEHOLDER: &str = "__debezium_unavailable_value";

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
}

fn default_lateness_ms() -> u64 {
    10 * 60 * 1000
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
    1 << 20
}
fn default_poll_ms() -> u64 {
    1000
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

/// Scheduled compaction of small files (`[compaction]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// A daemon compacts every table this often (milliseconds; 0: never).
    pub interval_ms: u64,
    /// Files are bin-packed to about this size.
    pub target_file_mb: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            interval_ms: 6 * 3_600_000,
            target_file_mb: 128,
        }
    }
}

/// The HTTP endpoints of a daemon (`/metrics`, `/health`, `/ready`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` to serve on (port 0: any free port, logged); no server when absent.
    pub listen: Option<String>,
    /// `/ready` fails when rows have waited this long without a commit (milliseconds; default
    /// three times `batch.max_age_ms`, at least a minute).
    pub ready_max_age_ms: Option<u64>,
}

/// How long a daemon may take to stop after SIGTERM/SIGINT (`[shutdown]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { timeout_ms: 30_000 }
    }
}

/// The smallest `[workers] memory_mb`: below it a commit would follow every chunk.
const MIN_MEMORY_MB: usize = 64;

/// Bytes of the memory budget given to each part of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Unwrapped keys and the key store's page cache.
    pub key_store: usize,
    /// Arrow rows buffered across all sinks before a commit (at most `[batch] max_bytes`).
    pub buffered: usize,
    /// Tokens each sanitizing thread remembers (see `crypto::set_token_cache_bytes`).
    pub tokens_per_thread: usize,
}

/// When buffered rows are committed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Commit when this many rows are buffered across all tables.
    pub max_rows: usize,
    /// Commit when buffered Arrow data reaches this many bytes.
    pub max_bytes: usize,
    /// Commit at least this often while events flow (milliseconds).
    pub max_age_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: 250_000,
            max_bytes: 128 << 20,
            max_age_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Sanitizing threads; 0 means one per core.
    pub threads: usize,
    /// Events per unit of work handed to a thread.
    pub chunk_events: usize,
    /// Chunks in flight per thread (bounds memory: backpressure, not buffering).
    pub queue_depth: usize,
    /// The memory budget the run's buffers are sized from (see [`Config::memory`]).
    pub memory_mb: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            chunk_events: 4096,
            queue_depth: 2,
            memory_mb: 192,
        }
    }
}

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
    pub fn password(&self) -> Result<Option<Secret>, sluice_connectors::secret::SecretError> {
        Secret::from_named_env_or(self.password_env.as_deref(), "PGPASSWORD", "source.password_env")
    }
}

#[derive(Debug, Clone)]
pub enum SourceConfig {
    File {
        path: PathBuf,
        poll_ms: u64,
        /// Whether symbolic links inside a source directory are followed.
        follow_symlinks: bool,
        /// Where each file stream's fingerprint is recorded (beside the embedded key store).
        fingerprints: PathBuf,
    },
    Kafka(KafkaSourceConfig),
    Kinesis(KinesisSourceConfig),
    Postgres(PostgresSourceConfig),
}

/// Where sanitized rows are also pushed, one JSON message per row keyed by subject token.
#[derive(Debug, Clone)]
pub enum PublishConfig {
    Kafka { settings: KafkaSettings, topic: String },
    Kinesis { settings: KinesisSettings, stream: String },
}

/// Where the master key comes from: the environment variable wins when set.
#[derive(Debug, Clone)]
pub struct MasterKeySource {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
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
    pub workers: WorkersConfig,
    pub compaction: CompactionConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
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
        if raw.workers.memory_mb < MIN_MEMORY_MB {
            return Err(invalid(
                text.find("[workers]")
                    .and_then(|at| text[at..].find("memory_mb").map(|i| at + i))
                    .unwrap_or(0),
                "workers.memory_mb",
                format!("must be at least {MIN_MEMORY_MB} (MiB): the budget the run's buffers are sized from"),
            ));
        }
        let policies = load_policies(&raw, &text, &resolve, &invalid)?;
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
            compaction: raw.compaction,
            workers: raw.workers,
            http: raw.http,
            shutdown: raw.shutdown,
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

    /// Every table a run commits to, in sink order: each policy's (one per format), the vault,
    /// the quarantine.
    pub fn sink_locations(&self) -> Vec<TableLocation> {
        self.sink_set().arrange(
            self.policies.iter().map(|p| self.table_locations(p)),
            delta_table(self.vault_path.clone()),
            delta_table(self.quarantine_path.clone()),
        )
    }

    /// How many sinks a run has of each kind (see [`SinkSet`]).
    pub fn sink_set(&self) -> SinkSet {
        SinkSet::new(self.policies.len(), self.lake_format.count())
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
                    *warehouse = root.join("iceberg").join("warehouse");
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
        let default = (3 * self.batch.max_age_ms).max(60_000);
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
    Ok(policies)
}

/// Where the lake's tables, vault, quarantine and audit table are, and in which format(s).
struct LakeLayout {
    root: LakePath,
    format: LakeFormat,
    iceberg: Option<IcebergLocation>,
    vault: LakePath,
    quarantine: LakePath,
    audit: LakePath,
}

fn lake_layout(
    raw: &RawConfig,
    name: &str,
    base: &Path,
    text: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<LakeLayout, LoadError> {
    let s3 = match &raw.lake.s3 {
        Some(s3) => s3_options(s3, "lake.s3", text, &invalid)?,
        None => StorageOptions::default(),
    };
    let vault_s3 = match &raw.lake.vault_s3 {
        Some(v) => s3_options(v, "lake.vault_s3", text, &invalid)?,
        None => s3.clone(),
    };
    let location = |text_value: &str, field: &str, options: &StorageOptions| {
        LakePath::parse(text_value, base, options.clone()).map_err(|e| {
            invalid(
                raw_text_offset(text, text_value),
                field,
                format!("{e}: expected a directory or an s3://bucket/prefix URL"),
            )
        })
    };
    let lake_root = location(&raw.lake.root, "lake.root", &s3)?;
    let root = match lake_root.local() {
        Some(path) => path.to_path_buf(),
        None => base.to_path_buf(),
    };
    let lake_format = match raw.lake.format.as_ref().map(|f| f.get_ref().as_str()) {
        None => LakeFormat::Delta,
        Some(text) => LakeFormat::parse(text).ok_or_else(|| {
            invalid(
                raw.lake.format.as_ref().map_or(0, |f| f.span().start),
                "lake.format",
                format!("`{text}`: expected `delta`, `iceberg` or `both`"),
            )
        })?,
    };
    if lake_format.iceberg() && lake_root.is_object_store() {
        return Err(invalid(
            raw.lake.format.as_ref().map_or(0, |f| f.span().start),
            "lake.format",
            "Iceberg tables on object storage are not supported yet: use `delta` with an s3:// lake root".into(),
        ));
    }
    let iceberg = match (lake_format.iceberg(), &raw.lake.iceberg) {
        (true, iceberg) => Some(iceberg_config(iceberg.as_ref(), name, &root, text, &resolve, &invalid)?),
        (false, Some(_)) => {
            return Err(invalid(
                text.find("[lake.iceberg]").unwrap_or(0),
                "lake.iceberg",
                "set, but `lake.format` does not include `iceberg`".into(),
            ))
        }
        (false, None) => None,
    };
    let vault = match raw.lake.vault.as_deref() {
        Some(v) => location(v, "lake.vault", &vault_s3)?,
        None => match raw.lake.vault_s3 {
            Some(_) => {
                return Err(invalid(
                    text.find("[lake.vault_s3]").unwrap_or(0),
                    "lake.vault_s3",
                    "set, but `lake.vault` does not name an s3:// location of its own".into(),
                ))
            }
            None => lake_root.join("vault"),
        },
    };
    Ok(LakeLayout {
        vault,
        quarantine: match raw.lake.quarantine.as_deref() {
            Some(q) => location(q, "lake.quarantine", &s3)?,
            None => lake_root.join("quarantine"),
        },
        audit: match raw.lake.audit.as_deref() {
            Some(a) => location(a, "lake.audit", &s3)?,
            None => lake_root.join("audit").join("erasures"),
        },
        root: lake_root,
        format: lake_format,
        iceberg,
    })
}

/// The `[[aggregates]]`, each named apart from every table and other aggregate.
fn aggregates_config(
    raw: &RawConfig,
    policies: &[Policy],
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<Vec<Aggregate>, LoadError> {
    let targets: HashSet<&str> = policies.iter().map(|p| p.target.as_str()).collect();
    let aggregates = raw
        .aggregates
        .iter()
        .map(|a| aggregate_config(a, policies, invalid))
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = HashSet::new();
    for (a, raw_a) in aggregates.iter().zip(&raw.aggregates) {
        if !names.insert(a.name.clone()) || targets.contains(a.name.as_str()) {
            return Err(invalid(
                raw_a.name.span().start,
                "aggregates.name",
                format!("`{}` is already the name of a table or another aggregate", a.name),
            ));
        }
    }
    Ok(aggregates)
}

/// How events are read: format, unknown tables, control records, size and time limits.
fn input_settings(
    raw: &RawConfig,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<InputSettings, LoadError> {
    Ok(InputSettings {
        format: input_format(&raw.source, &resolve, &invalid)?,
        unknown_tables: raw.unknown_tables,
        control_records: raw.source.control_records.unwrap_or(ControlRecords::Skip),
        max_event_bytes: raw.source.max_event_bytes.max(1024),
        decode: DecodeOptions {
            event_time_window_ms: match &raw.source.event_time_window {
                None => DecodeOptions::DEFAULT_EVENT_TIME_WINDOW_MS,
                Some(w) => event_time_window(w.get_ref()).ok_or_else(|| {
                    invalid(
                        w.span().start,
                        "source.event_time_window",
                        "expected [from, to]: two RFC 3339 dates or times, from before to".into(),
                    )
                })?,
            },
            time_optional: false,
        },
        unavailable_placeholder: match &raw.source.unavailable_value_placeholder {
            None => DEFAULT_UNAVAILABLE_PLACEHOLDER.into(),
            Some(p) if p.get_ref().is_empty() => {
                return Err(invalid(
                    p.span().start,
                    "source.unavailable_value_placeholder",
                    "must not be empty".into(),
                ))
            }
            Some(p) => p.get_ref().clone(),
        },
    })
}

/// Where `value` is written in the config text (for error lines), or the start.
fn raw_text_offset(text: &str, value: &str) -> usize {
    text.find(&format!("\"{value}\"")).unwrap_or(0)
}

/// The object-store options of a `[lake.s3]`-like section. Credentials named by `*_env` are read
/// from the environment now (their values are never shown).
fn s3_options(
    raw: &RawS3,
    section: &str,
    text: &str,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<StorageOptions, LoadError> {
    let mut options = raw.options.clone();
    let mut set = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            options.insert(key.to_string(), v);
        }
    };
    set("aws_endpoint", raw.endpoint.clone());
    set("aws_region", raw.region.clone());
    set("aws_allow_http", raw.allow_http.map(|b| b.to_string()));
    set(
        "aws_virtual_hosted_style_request",
        raw.virtual_hosted_style.map(|b| b.to_string()),
    );
    for (field, key, var) in [
        ("access_key_id_env", "aws_access_key_id", &raw.access_key_id_env),
        (
            "secret_access_key_env",
            "aws_secret_access_key",
            &raw.secret_access_key_env,
        ),
        ("session_token_env", "aws_session_token", &raw.session_token_env),
    ] {
        let Some(var) = var else { continue };
        let value = Secret::from_env(var.get_ref(), "lake.s3").map_err(|_| {
            invalid(
                var.span().start,
                &format!("{section}.{field}"),
                format!("environment variable `{}` is not set", var.get_ref()),
            )
        })?;
        // object_store takes its options as strings; `StorageOptions` never shows their values.
        options.insert(key.to_string(), value.expose().to_string());
    }
    if raw.access_key_id_env.is_some() != raw.secret_access_key_env.is_some() {
        return Err(invalid(
            text.find(&format!("[{section}]")).unwrap_or(0),
            section,
            "set both access_key_id_env and secret_access_key_env, or neither (the AWS chain)".into(),
        ));
    }
    Ok(StorageOptions::new(options))
}

fn input_format(
    raw: &RawSource,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<InputFormat, LoadError> {
    let format = raw.format.as_ref().map(|f| (f.get_ref().as_str(), f.span().start));
    match (format, &raw.schema_registry) {
        (None | Some(("json", _)), None) => Ok(InputFormat::Json),
        (None | Some(("json", _)), Some(r)) => Err(invalid(
            r.url.span().start,
            "source.schema_registry",
            "set, but `source.format` is not \"avro\"".into(),
        )),
        (Some(("avro", at)), registry) => {
            if raw.kind.get_ref() != "kafka" {
                return Err(invalid(
                    at,
                    "source.format",
                    "\"avro\" is read from Kafka sources only".into(),
                ));
            }
            let Some(r) = registry else {
                return Err(invalid(
                    at,
                    "source.schema_registry",
                    "\"avro\" needs [source.schema_registry] url".into(),
                ));
            };
            let at = r.url.span().start;
            let url = r.url.get_ref();
            let Some(authority) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
                return Err(invalid(
                    at,
                    "source.schema_registry.url",
                    "expected an http:// or https:// URL".into(),
                ));
            };
            // The URL is printed in errors: credentials in it would be too.
            if authority.split('/').next().is_some_and(|host| host.contains('@')) {
                return Err(invalid(
                    at,
                    "source.schema_registry.url",
                    "credentials belong in username_env/password_env or token_env, not in the URL".into(),
                ));
            }
            match (&r.username_env, &r.password_env, &r.token_env) {
                (Some(_), None, _) | (None, Some(_), _) => {
                    return Err(invalid(
                        at,
                        "source.schema_registry",
                        "basic auth needs both username_env and password_env".into(),
                    ))
                }
                (Some(_), Some(_), Some(_)) => {
                    return Err(invalid(
                        at,
                        "source.schema_registry.token_env",
                        "either basic auth (username_env, password_env) or a bearer token, not both".into(),
                    ))
                }
                _ => {}
            }
            Ok(InputFormat::Avro(RegistryConfig {
                url: r.url.get_ref().clone(),
                username_env: r.username_env.clone(),
                password_env: r.password_env.clone(),
                token_env: r.token_env.clone(),
                ca_file: r.ca_file.as_deref().map(resolve),
            }))
        }
        (Some((other, at)), _) => Err(invalid(
            at,
            "source.format",
            format!("unknown format `{other}`: \"json\" or \"avro\""),
        )),
    }
}

/// `[from, to)` in milliseconds since the epoch.
fn event_time_window(bounds: &[String]) -> Option<(i64, i64)> {
    let [from, to] = bounds else { return None };
    let ms = |t: &str| sluice_transforms::functions::parse_timestamp_micros(t, None).map(|us| us.div_euclid(1000));
    // Integers would be read as epochs: the window is written as dates or times.
    if bounds.iter().any(|b| b.trim().parse::<i64>().is_ok()) {
        return None;
    }
    let (from, to) = (ms(from)?, ms(to)?);
    (from < to).then_some((from, to))
}

fn source_config(
    raw: &RawSource,
    name: &str,
    spool_base: &Path,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<SourceConfig, LoadError> {
    let at = raw.kind.span().start;
    let required = |value: &Option<String>, field: &str| required(value, field, "source", &raw.kind, invalid);
    Ok(match raw.kind.get_ref().as_str() {
        "file" => SourceConfig::File {
            path: resolve(&required(&raw.path, "source.path")?),
            poll_ms: raw.poll_ms,
            follow_symlinks: raw.follow_symlinks,
            fingerprints: spool_base.join("file-streams").join(format!("{name}.json")),
        },
        "kinesis" => {
            let worker_count = raw.worker_count.unwrap_or(1);
            let worker_index = raw.worker_index.unwrap_or(0);
            if worker_count == 0 || worker_index >= worker_count {
                return Err(invalid(
                    at,
                    "source.worker_index",
                    format!("{worker_index} must be below source.worker_count ({worker_count})"),
                ));
            }
            SourceConfig::Kinesis(KinesisSourceConfig {
                settings: KinesisSettings {
                    region: raw.region.clone(),
                    endpoint: raw.endpoint.clone(),
                },
                stream: required(&raw.stream, "source.stream")?,
                worker_index,
                worker_count,
                start_at: start_at(raw, invalid)?,
                poll_ms: raw.poll_ms,
            })
        }
        "kafka" => {
            let topics = raw.topics.clone().unwrap_or_default();
            if topics.is_empty() {
                return Err(invalid(
                    at,
                    "source.topics",
                    "name at least one topic (or a ^regex)".into(),
                ));
            }
            let start_at = start_at(raw, invalid)?;
            reject_managed_properties(&raw.properties, at, "source.properties", invalid)?;
            SourceConfig::Kafka(KafkaSourceConfig {
                settings: KafkaSettings {
                    brokers: required(&raw.brokers, "source.brokers")?,
                    properties: raw.properties.clone(),
                    security: kafka_security("source", raw.tls.as_ref(), raw.sasl.as_ref(), resolve, invalid)?,
                },
                group_id: required(&raw.group_id, "source.group_id")?,
                topics,
                start_at,
                session_timeout_ms: raw.session_timeout_ms.unwrap_or(10_000),
            })
        }
        "postgres" => {
            // Slot and publication names: lower-case letters, digits and underscores.
            let default_name = format!("sluice_{}", name.to_ascii_lowercase().replace('-', "_"));
            let slot = raw.slot.clone().unwrap_or_else(|| default_name.clone());
            if slot.is_empty()
                || !slot
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(invalid(
                    at,
                    "source.slot",
                    format!("`{slot}`: slot names take lower-case letters, digits and underscores"),
                ));
            }
            SourceConfig::Postgres(PostgresSourceConfig {
                host: raw.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
                port: raw.port.unwrap_or(5432),
                user: required(&raw.user, "source.user")?,
                password_env: raw.password_env.clone(),
                database: required(&raw.database, "source.database")?,
                publication: raw.publication.clone().unwrap_or(default_name),
                slot,
                spool_dir: raw
                    .spool_dir
                    .as_deref()
                    .map(resolve)
                    .unwrap_or_else(|| spool_base.join("spool")),
                heartbeat_ms: raw.heartbeat_ms.unwrap_or(10_000).max(100),
            })
        }
        other => {
            return Err(invalid(
                at,
                "source.kind",
                format!("unknown source kind `{other}`: expected `file`, `kafka`, `kinesis` or `postgres`"),
            ))
        }
    })
}

/// An hourly pre-aggregation of a policy's table (`[[aggregates]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub name: String,
    /// The policy target it reads.
    pub from: String,
    pub dimensions: Vec<String>,
    pub measures: Vec<Measure>,
    /// A published group covers at least this many distinct subjects.
    pub k: u32,
    pub on_suppressed: Suppression,
    /// An hour is computed once it ended this long ago; later events recompute it.
    pub lateness: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Measure {
    pub function: MeasureFn,
    pub column: Option<String>,
    /// Output column name.
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureFn {
    Count,
    CountDistinctSubjects,
    Sum,
    Avg,
}

/// What happens to a group of fewer than k distinct subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppression {
    /// Not published (counted in the hour's suppressions).
    Drop,
    /// Merged into one group of the hour with every dimension null, published if that covers k.
    Merge,
}

fn aggregate_config(
    raw: &RawAggregate,
    policies: &[Policy],
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<Aggregate, LoadError> {
    let name = raw.name.get_ref();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            raw.name.span().start,
            "aggregates.name",
            "must be letters, digits and _".into(),
        ));
    }
    let from = raw.from.get_ref();
    let policy = policies.iter().find(|p| &p.target == from).ok_or_else(|| {
        invalid(
            raw.from.span().start,
            "aggregates.from",
            format!("`{from}` is not the target table of any policy"),
        )
    })?;
    let linking = policy.linking_columns();
    let outputs = policy.output_columns();
    // Only what a policy made safe to show: kept, generalized or derived columns.
    let safe = |column: &Spanned<String>, field: &str| -> Result<arrow_schema::DataType, LoadError> {
        let c = column.get_ref();
        let out = outputs.iter().find(|o| &o.name == c).ok_or_else(|| {
            invalid(
                column.span().start,
                field,
                format!("`{c}` is not an output column of policy `{}`", policy.table),
            )
        })?;
        if linking.contains(c) {
            return Err(invalid(
                column.span().start,
                field,
                format!("`{c}` is {}: it links rows to a person; only kept, generalized or derived columns may be grouped or measured", out.how),
            ));
        }
        Ok(out.data_type.clone())
    };
    let mut dimensions = Vec::new();
    for d in raw.dimensions.get_ref() {
        safe(d, "aggregates.dimensions")?;
        if dimensions.contains(d.get_ref()) {
            return Err(invalid(
                d.span().start,
                "aggregates.dimensions",
                format!("`{}` named twice", d.get_ref()),
            ));
        }
        dimensions.push(d.get_ref().clone());
    }
    let mut measures = Vec::new();
    for m in raw.measures.get_ref() {
        let at = m.function.span().start;
        let function = match m.function.get_ref().as_str() {
            "count" => MeasureFn::Count,
            "count_distinct_subjects" => MeasureFn::CountDistinctSubjects,
            "sum" => MeasureFn::Sum,
            "avg" => MeasureFn::Avg,
            other => {
                return Err(invalid(
                    at,
                    "aggregates.measures.fn",
                    format!("unknown measure `{other}`: expected `count`, `count_distinct_subjects`, `sum` or `avg` (min and max would publish one person's exact value)"),
                ))
            }
        };
        let column = match (function, &m.column) {
            (MeasureFn::Count | MeasureFn::CountDistinctSubjects, None) => None,
            (MeasureFn::Count | MeasureFn::CountDistinctSubjects, Some(c)) => {
                return Err(invalid(
                    c.span().start,
                    "aggregates.measures.column",
                    "this measure takes no column".into(),
                ))
            }
            (_, None) => {
                return Err(invalid(
                    at,
                    "aggregates.measures.column",
                    "required for `sum` and `avg`".into(),
                ))
            }
            (_, Some(c)) => {
                let data_type = safe(c, "aggregates.measures.column")?;
                if !data_type.is_numeric() {
                    return Err(invalid(
                        c.span().start,
                        "aggregates.measures.column",
                        format!("`{}` is {data_type}, not a number", c.get_ref()),
                    ));
                }
                Some(c.get_ref().clone())
            }
        };
        let name = m.name.clone().unwrap_or_else(|| match (function, &column) {
            (MeasureFn::Count, _) => "count".into(),
            (MeasureFn::CountDistinctSubjects, _) => "distinct_subjects".into(),
            (MeasureFn::Sum, Some(c)) => format!("sum_{c}"),
            (_, c) => format!("avg_{}", c.as_deref().unwrap_or_default()),
        });
        if dimensions.contains(&name) || measures.iter().any(|x: &Measure| x.name == name) || name == "hour" {
            return Err(invalid(
                at,
                "aggregates.measures",
                format!("output column `{name}` named twice (set `as`)"),
            ));
        }
        measures.push(Measure { function, column, name });
    }
    if measures.is_empty() {
        return Err(invalid(
            raw.measures.span().start,
            "aggregates.measures",
            "name at least one measure".into(),
        ));
    }
    let k = match &raw.k_anonymity {
        None => 11,
        Some(k) if *k.get_ref() >= 2 => *k.get_ref(),
        Some(k) => {
            return Err(invalid(
                k.span().start,
                "aggregates.k_anonymity",
                "must be at least 2 (a group of one person is that person)".into(),
            ))
        }
    };
    let on_suppressed = match raw.on_suppressed.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("drop") => Suppression::Drop,
        Some("merge") => Suppression::Merge,
        Some(other) => {
            return Err(invalid(
                raw.on_suppressed.as_ref().map_or(0, |s| s.span().start),
                "aggregates.on_suppressed",
                format!("`{other}`: expected `drop` or `merge`"),
            ))
        }
    };
    Ok(Aggregate {
        name: name.clone(),
        from: from.clone(),
        dimensions,
        measures,
        k,
        on_suppressed,
        lateness: std::time::Duration::from_millis(raw.lateness_ms),
    })
}

fn iceberg_config(
    raw: Option<&RawIceberg>,
    pipeline: &str,
    root: &Path,
    text: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<IcebergLocation, LoadError> {
    let empty = RawIceberg {
        catalog: None,
        catalog_name: None,
        namespace: None,
        uri: None,
        warehouse: None,
        properties_env: BTreeMap::new(),
        properties: BTreeMap::new(),
    };
    let raw = raw.unwrap_or(&empty);
    let at = raw
        .catalog
        .as_ref()
        .map(|k| k.span().start)
        .unwrap_or_else(|| text.find("[lake.iceberg]").unwrap_or(0));
    let kind = raw.catalog.as_ref().map(|k| k.get_ref().as_str()).unwrap_or("sql");
    let catalog = match kind {
        "sql" => {
            if !raw.properties.is_empty() || !raw.properties_env.is_empty() {
                return Err(invalid(
                    at,
                    "lake.iceberg.properties",
                    "only for `catalog = \"rest\"`".into(),
                ));
            }
            CatalogSettings::Sql {
                database: raw
                    .uri
                    .as_deref()
                    .map(resolve)
                    .unwrap_or_else(|| root.join("iceberg").join("catalog.db")),
                warehouse: raw
                    .warehouse
                    .as_deref()
                    .map(resolve)
                    .unwrap_or_else(|| root.join("iceberg").join("warehouse")),
            }
        }
        "rest" => {
            let uri = raw
                .uri
                .clone()
                .ok_or_else(|| invalid(at, "lake.iceberg.uri", "required for `catalog = \"rest\"`".into()))?;
            let mut properties: std::collections::HashMap<String, String> =
                raw.properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            for (key, var) in &raw.properties_env {
                let value = Secret::from_env(var, "lake.iceberg.properties_env").map_err(|_| {
                    invalid(
                        at,
                        &format!("lake.iceberg.properties_env.{key}"),
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
                // The client takes its properties as one map of strings.
                properties.insert(key.clone(), value.expose().to_string());
            }
            CatalogSettings::Rest {
                uri,
                warehouse: raw.warehouse.clone(),
                properties,
            }
        }
        other => {
            return Err(invalid(
                at,
                "lake.iceberg.catalog",
                format!("unknown catalog `{other}`: expected `sql` or `rest`"),
            ))
        }
    };
    Ok(IcebergLocation {
        catalog_name: raw.catalog_name.clone().unwrap_or_else(|| "sluice".into()),
        catalog,
        namespace: raw.namespace.clone().unwrap_or_else(|| pipeline.to_string()),
    })
}

fn key_store_config(
    raw: &RawKeys,
    text: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<KeyStoreLocation, LoadError> {
    let at = raw
        .kind
        .as_ref()
        .map(|k| k.span().start)
        .unwrap_or_else(|| text.find("[keys]").unwrap_or(0));
    let kind = raw.kind.as_ref().map(|k| k.get_ref().as_str()).unwrap_or("sqlite");
    let required = |v: &Option<String>, field: &str| {
        v.clone()
            .ok_or_else(|| invalid(at, field, format!("required for `kind = \"{kind}\"`")))
    };
    match kind {
        "sqlite" => Ok(KeyStoreLocation::Sqlite(resolve(&required(&raw.store, "keys.store")?))),
        "postgres" => Ok(KeyStoreLocation::Postgres(PgKeyStoreSettings {
            host: raw.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: raw.port.unwrap_or(5432),
            user: required(&raw.user, "keys.user")?,
            password_env: raw.password_env.clone(),
            database: required(&raw.database, "keys.database")?,
            schema: raw.schema.clone().unwrap_or_else(|| "sluice_keys".into()),
        })),
        other => Err(invalid(
            at,
            "keys.kind",
            format!("unknown key store kind `{other}`: expected `sqlite` or `postgres`"),
        )),
    }
}

/// librdkafka settings sluice sets itself: overriding them would break exactly-once (offsets
/// from Kafka instead of the lake, cooperative rebalancing under an eager handler).
const MANAGED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "partition.assignment.strategy",
    "group.protocol",
    "transactional.id",
    // Security has settings of its own (`tls`, `sasl`), with credentials never in this file.
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "ssl.keystore.location",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
];

/// TLS and SASL of a Kafka section; file paths relative to the config, credentials named only.
fn kafka_security(
    section: &str,
    tls: Option<&RawTls>,
    sasl: Option<&RawSasl>,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<KafkaSecurity, LoadError> {
    let tls = tls.map(|t| TlsSettings {
        ca_file: t.ca_file.as_deref().map(resolve),
        cert_file: t.cert_file.as_deref().map(resolve),
        key_file: t.key_file.as_deref().map(resolve),
        key_password_env: t.key_password_env.clone(),
    });
    if let Some(t) = &tls {
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err(invalid(
                0,
                &format!("{section}.tls"),
                "mutual TLS needs both cert_file and key_file".into(),
            ));
        }
    }
    let sasl = match sasl {
        None => None,
        Some(s) => {
            let at = s.mechanism.span().start;
            let mechanism = SaslMechanism::parse(s.mechanism.get_ref()).ok_or_else(|| {
                invalid(
                    at,
                    &format!("{section}.sasl.mechanism"),
                    format!(
                        "unknown mechanism `{}`: one of {}",
                        s.mechanism.get_ref(),
                        SaslMechanism::NAMES.join(", ")
                    ),
                )
            })?;
            let password =
                match (&s.password_env, &s.password_file) {
                    (Some(var), None) => PasswordSource::Env(var.clone()),
                    (None, Some(file)) => PasswordSource::File(resolve(file)),
                    _ => return Err(invalid(
                        at,
                        &format!("{section}.sasl"),
                        "name the password with password_env or password_file (one of them; never the password itself)"
                            .into(),
                    )),
                };
            Some(SaslSettings {
                mechanism,
                username: s.username.clone(),
                password,
            })
        }
    };
    Ok(KafkaSecurity {
        section: section.to_string(),
        tls,
        sasl,
    })
}

fn reject_managed_properties(
    properties: &BTreeMap<String, String>,
    at: usize,
    field: &str,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<(), LoadError> {
    match properties
        .keys()
        .find(|k| MANAGED_KAFKA_PROPERTIES.contains(&k.as_str()))
    {
        Some(k) => Err(invalid(
            at,
            field,
            format!("`{k}` is set by sluice and cannot be overridden"),
        )),
        None => Ok(()),
    }
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

fn start_at(raw: &RawSource, invalid: &dyn Fn(usize, &str, String) -> LoadError) -> Result<StartAt, LoadError> {
    match raw.start.as_ref().map(|s| (s.get_ref().as_str(), s.span().start)) {
        None | Some(("earliest", _)) => Ok(StartAt::Earliest),
        Some(("latest", _)) => Ok(StartAt::Latest),
        Some((other, offset)) => Err(invalid(
            offset,
            "source.start",
            format!("`{other}`: expected `earliest` or `latest`"),
        )),
    }
}

/// A `[publish]` or `[raw_stream]` section: a Kafka topic or a Kinesis stream.
fn publish_config(
    raw: &RawPublish,
    section: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<PublishConfig, LoadError> {
    if raw.kind.get_ref() == "kafka" {
        reject_managed_properties(
            &raw.properties,
            raw.kind.span().start,
            &format!("{section}.properties"),
            invalid,
        )?;
    }
    let at = raw.kind.span().start;
    let required = |value: &Option<String>, field: &str| {
        required(value, &format!("{section}.{field}"), section, &raw.kind, invalid)
    };
    Ok(match raw.kind.get_ref().as_str() {
        "kafka" => PublishConfig::Kafka {
            settings: KafkaSettings {
                brokers: required(&raw.brokers, "brokers")?,
                properties: raw.properties.clone(),
                security: kafka_security(section, raw.tls.as_ref(), raw.sasl.as_ref(), resolve, invalid)?,
            },
            topic: required(&raw.topic, "topic")?,
        },
        "kinesis" => PublishConfig::Kinesis {
            settings: KinesisSettings {
                region: raw.region.clone(),
                endpoint: raw.endpoint.clone(),
            },
            stream: required(&raw.stream, "stream")?,
        },
        other => {
            return Err(invalid(
                at,
                &format!("{section}.kind"),
                format!("unknown {section} kind `{other}`: expected `kafka` or `kinesis`"),
            ))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(dir: &Path, text: &str) -> Result<Config, LoadError> {
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(
            dir.join("policies/p.toml"),
            "table = \"public.t\"\ntarget = \"t\"\nsubject = \"id\"\ntoken_domain = \"d\"\n[columns.id]\naction = \"tokenize\"\n",
        )
        .unwrap();
        let file = dir.join("sluice.toml");
        std::fs::write(&file, text).unwrap();
        Config::load(&file)
    }

    const HEAD: &str = "name = \"p\"\npolicies = [\"policies\"]\n[lake]\nroot = \"lake\"\n[keys]\nstore = \"k.db\"\nmaster_key_env = \"K\"\n";

    #[test]
    fn a_column_another_policy_names_as_its_subject_is_never_kept() {
        let dir = tempfile::tempdir().unwrap();
        let orders = "table = \"public.orders\"\ntarget = \"orders\"\nsubject = \"customer\"\ntoken_domain = \"d\"\n[columns.customer]\naction = \"tokenize\"\n[columns.id]\naction = \"keep\"\ntype = \"int64\"\n";
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/q.toml"), orders).unwrap();
        let e = load(dir.path(), &format!("{HEAD}[source]\nkind = \"file\"\npath = \"e\"\n")).unwrap_err();
        let LoadError::Invalid(e) = e else { panic!("{e}") };
        assert!(
            e.file.ends_with("q.toml") && e.line == 7 && e.field == "columns.id.action",
            "{e}"
        );
        assert!(e.message.contains("subject column of `public.t`"), "{e}");
        // In another token domain the same name is another kind of id.
        std::fs::write(
            dir.path().join("policies/q.toml"),
            orders.replace("\"d\"", "\"orders\""),
        )
        .unwrap();
        load(dir.path(), &format!("{HEAD}[source]\nkind = \"file\"\npath = \"e\"\n")).unwrap();
    }

    #[test]
    fn the_memory_budget_is_shared_out_and_a_tiny_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
        let config = load(
            dir.path(),
            &format!("{HEAD}{source}[workers]\nthreads = 2\nmemory_mb = 256\n"),
        )
        .unwrap();
        let plan = config.memory();
        assert_eq!(plan.key_store, 64 << 20);
        assert_eq!(plan.buffered, 64 << 20, "a quarter, under [batch] max_bytes");
        assert_eq!(plan.tokens_per_thread, 8 << 20);
        let e = load(dir.path(), &format!("{HEAD}{source}[workers]\nmemory_mb = 8\n")).unwrap_err();
        let LoadError::Invalid(e) = e else { panic!("{e}") };
        assert_eq!((e.line, e.field.as_str()), (12, "workers.memory_mb"), "{e}");
        assert!(e.message.contains("at least 64"), "{e}");
        // The line is the key's in `[workers]`, not a comment that mentions it earlier.
        let commented = format!("# memory_mb: see [workers]\n{HEAD}{source}[workers]\nmemory_mb = 8\n");
        let LoadError::Invalid(e) = load(dir.path(), &commented).unwrap_err() else {
            panic!("a config error")
        };
        assert_eq!(e.line, 13, "{e}");
    }

    #[test]
    fn kafka_source_and_publish_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{HEAD}[source]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\", \"^x.*\"]\nstart = \"latest\"\ntls = {{ ca_file = \"ca.pem\" }}\nsasl = {{ mechanism = \"SCRAM-SHA-512\", username = \"sluice\", password_env = \"KAFKA_PASSWORD\" }}\n[source.properties]\n\"fetch.max.bytes\" = \"1048576\"\n[publish]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"out\"\ntls = {{ cert_file = \"c.pem\", key_file = \"c.key\" }}\n"
        );
        let config = load(dir.path(), &text).unwrap();
        let SourceConfig::Kafka(k) = &config.source else {
            panic!("not a kafka source")
        };
        assert_eq!(k.topics, ["t", "^x.*"]);
        assert_eq!(k.start_at, StartAt::Latest);
        assert_eq!(k.settings.properties["fetch.max.bytes"], "1048576");
        let tls = k.settings.security.tls.as_ref().unwrap();
        assert_eq!(tls.ca_file.as_deref(), Some(dir.path().join("ca.pem").as_path()));
        let sasl = k.settings.security.sasl.as_ref().unwrap();
        assert_eq!(
            (sasl.mechanism, sasl.username.as_str()),
            (SaslMechanism::ScramSha512, "sluice")
        );
        assert!(matches!(&sasl.password, PasswordSource::Env(v) if v == "KAFKA_PASSWORD"));
        let Some(PublishConfig::Kafka { topic, settings }) = &config.publish else {
            panic!("not a kafka publisher")
        };
        assert_eq!(topic, "out");
        assert_eq!(settings.security.section, "publish");
        assert!(settings.security.tls.as_ref().unwrap().key_file.is_some());
        assert_eq!(config.sink_locations().len(), 3);
    }

    #[test]
    fn security_is_set_by_its_own_keys_and_never_holds_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let source = "[source]\nkind = \"kafka\"\nbrokers = \"b\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n";
        for (extra, expected) in [
            (
                "[source.properties]\n\"sasl.password\" = \"hunter2-secret\"\n",
                "source.properties: `sasl.password` is set by sluice and cannot be overridden",
            ),
            (
                "sasl = { mechanism = \"GSSAPI\", username = \"u\", password_env = \"P\" }\n",
                "source.sasl.mechanism: unknown mechanism `GSSAPI`: one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
            ),
            (
                "sasl = { mechanism = \"PLAIN\", username = \"u\" }\n",
                "source.sasl: name the password with password_env or password_file (one of them; never the password itself)",
            ),
            (
                "sasl = { mechanism = \"PLAIN\", username = \"u\", password = \"hunter2-secret\" }\n",
                "unknown field `password`",
            ),
            ("tls = { cert_file = \"c.pem\" }\n", "source.tls: mutual TLS needs both cert_file and key_file"),
            ("format = \"avro\"\n", "source.schema_registry: \"avro\" needs [source.schema_registry] url"),
            (
                "format = \"avro\"\nschema_registry = { url = \"http://r\", username_env = \"U\" }\n",
                "source.schema_registry: basic auth needs both username_env and password_env",
            ),
            (
                "format = \"avro\"\nschema_registry = { url = \"https://u:hunter2-secret@r/\" }\n",
                "source.schema_registry.url: credentials belong in username_env/password_env or token_env, not in the URL",
            ),
        ] {
            let err = load(dir.path(), &format!("{HEAD}{source}{extra}")).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = load(
            dir.path(),
            &format!("{HEAD}[source]\nkind = \"file\"\npath = \"e\"\nformat = \"avro\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("source.format: \"avro\" is read from Kafka sources only"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_wrong_kafka_setting_names_its_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{HEAD}[source]\nkind = \"kafka\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n");
        let err = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            err.ends_with("sluice.toml:9: source.brokers: required for source kind `kafka`"),
            "{err}"
        );
        let text = format!("{HEAD}[source]\nkind = \"kafka\"\nbrokers = \"b\"\ngroup_id = \"g\"\ntopics = [\"t\"]\nstart = \"oldest\"\n");
        let err = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            err.ends_with("sluice.toml:13: source.start: `oldest`: expected `earliest` or `latest`"),
            "{err}"
        );
    }

    #[test]
    fn the_lake_format_and_iceberg_catalog_are_checked_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let with_lake =
            |lake: &str| HEAD.replace("[lake]\nroot = \"lake\"\n", &format!("[lake]\nroot = \"lake\"\n{lake}"));
        let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
        let err = load(dir.path(), &format!("{}{source}", with_lake("format = \"parquet\"\n")))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("sluice.toml:5: lake.format: `parquet`: expected `delta`, `iceberg` or `both`"),
            "{err}"
        );
        let text = format!(
            "{}{source}",
            with_lake("format = \"both\"\n[lake.iceberg]\ncatalog = \"hive\"\n")
        );
        let err = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            err.ends_with("sluice.toml:7: lake.iceberg.catalog: unknown catalog `hive`: expected `sql` or `rest`"),
            "{err}"
        );
        let text = format!(
            "{}{source}",
            with_lake("format = \"iceberg\"\n[lake.iceberg]\ncatalog = \"rest\"\n")
        );
        let err = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            err.ends_with("lake.iceberg.uri: required for `catalog = \"rest\"`"),
            "{err}"
        );
        // A REST catalog's credentials, read from the environment, are used and never shown.
        std::env::set_var("SLUICE_TEST_ICEBERG_TOKEN", "iceberg-t0ken");
        let text = format!(
            "{}{source}",
            with_lake("format = \"iceberg\"\n[lake.iceberg]\ncatalog = \"rest\"\nuri = \"http://c\"\nproperties = { prefix = \"p1\" }\nproperties_env = { token = \"SLUICE_TEST_ICEBERG_TOKEN\" }\n")
        );
        let config = load(dir.path(), &text).unwrap();
        let Some(IcebergLocation {
            catalog: CatalogSettings::Rest { properties, .. },
            ..
        }) = &config.iceberg
        else {
            panic!("a REST catalog")
        };
        assert_eq!(properties.get("token").map(String::as_str), Some("iceberg-t0ken"));
        assert!(
            !format!("{config:?}").contains("iceberg-t0ken"),
            "no credential in Debug output"
        );
        let text = format!("{}{source}", with_lake("[lake.iceberg]\nnamespace = \"x\"\n"));
        let err = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            err.ends_with("lake.iceberg: set, but `lake.format` does not include `iceberg`"),
            "{err}"
        );

        let config = load(dir.path(), &format!("{}{source}", with_lake("format = \"both\"\n"))).unwrap();
        // Per policy one table per format, then the vault and the quarantine (always Delta).
        let locations = config.sink_locations();
        assert_eq!(locations.len(), 4);
        assert!(
            matches!(&locations[0], TableLocation::Delta(p) if p.local().is_some_and(|p| p.ends_with("lake/tables/t")))
        );
        assert!(
            matches!(&locations[1], TableLocation::Iceberg { location, table } if table == "t" && location.namespace == "p"
                && location.catalog == CatalogSettings::Sql { database: dir.path().join("lake/iceberg/catalog.db"), warehouse: dir.path().join("lake/iceberg/warehouse") })
        );
    }

    #[test]
    fn s3_locations_take_their_own_options_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
        let with_lake = |lake: &str| {
            format!(
                "{}{source}",
                HEAD.replace(
                    "[lake]\nroot = \"lake\"\n",
                    &format!("[lake]\nroot = \"s3://b/lake\"\n{lake}")
                )
            )
        };
        std::env::set_var("SLUICE_TEST_VAULT_ID", "vault-id");
        std::env::set_var("SLUICE_TEST_VAULT_SECRET", "vault-secret");
        let config = load(
            dir.path(),
            &with_lake(
                "vault = \"s3://pii/v\"\n[lake.s3]\nendpoint = \"http://h:9000\"\nallow_http = true\n[lake.vault_s3]\nregion = \"eu-west-1\"\naccess_key_id_env = \"SLUICE_TEST_VAULT_ID\"\nsecret_access_key_env = \"SLUICE_TEST_VAULT_SECRET\"\n",
            ),
        )
        .unwrap();
        let LakePath::Object { url, options } = &config.vault_path else {
            panic!("the vault is on S3")
        };
        assert_eq!(url.as_str(), "s3://pii/v");
        assert_eq!(options.get("aws_access_key_id"), Some("vault-id"));
        assert_eq!(options.get("aws_endpoint"), None, "the vault's own options only");
        let LakePath::Object { url, options } = &config.tables_root else {
            panic!("the tables are on S3")
        };
        assert_eq!(url.as_str(), "s3://b/lake/tables");
        assert_eq!(options.get("aws_endpoint"), Some("http://h:9000"));
        assert_eq!(options.get("aws_access_key_id"), None, "the standard AWS chain");
        assert!(
            !format!("{config:?}").contains("vault-secret"),
            "no secret in Debug output"
        );

        let cases = [
            (
                "[lake.s3]\nendpont = \"x\"\n",
                "sluice.toml:6: endpont: unknown field `endpont`",
            ),
            (
                "[lake.s3]\naccess_key_id_env = \"SLUICE_TEST_UNSET_VARIABLE\"\nsecret_access_key_env = \"SLUICE_TEST_VAULT_SECRET\"\n",
                "sluice.toml:6: lake.s3.access_key_id_env: environment variable `SLUICE_TEST_UNSET_VARIABLE` is not set",
            ),
            (
                "format = \"iceberg\"\n",
                "sluice.toml:5: lake.format: Iceberg tables on object storage are not supported yet",
            ),
        ];
        for (lake, expected) in cases {
            let err = load(dir.path(), &with_lake(lake)).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}\nexpected: {expected}");
        }
    }

    #[test]
    fn a_postgres_password_is_read_when_a_run_starts_and_an_unset_named_variable_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let head = "name = \"p\"\npolicies = [\"policies\"]\n[lake]\nroot = \"lake\"\n";
        let pg_source = |var: &str| {
            format!("[source]\nkind = \"postgres\"\nuser = \"u\"\ndatabase = \"d\"\npassword_env = \"{var}\"\n")
        };
        let pg_keys = |var: &str| {
            format!("[keys]\nkind = \"postgres\"\nuser = \"u\"\ndatabase = \"d\"\nmaster_key_env = \"K\"\npassword_env = \"{var}\"\n")
        };
        // `sluice check` reads no secret: an unset variable is found when a run starts.
        let unset = "SLUICE_TEST_UNSET_PG_PASSWORD";
        let config = load(dir.path(), &format!("{head}{}{}", pg_keys(unset), pg_source(unset))).unwrap();
        let SourceConfig::Postgres(source) = &config.source else {
            panic!("a PostgreSQL source")
        };
        assert_eq!(
            source.password().unwrap_err().to_string(),
            "environment variable SLUICE_TEST_UNSET_PG_PASSWORD (named by source.password_env) is not set"
        );
        let KeyStoreLocation::Postgres(keys) = &config.key_store else {
            panic!("a PostgreSQL key store")
        };
        assert_eq!(keys.password_env.as_deref(), Some(unset));

        std::env::set_var("SLUICE_TEST_PG_PASSWORD", "pg-s3cret");
        let config = load(
            dir.path(),
            &format!(
                "{head}{}{}",
                pg_keys("SLUICE_TEST_PG_PASSWORD"),
                pg_source("SLUICE_TEST_PG_PASSWORD")
            ),
        )
        .unwrap();
        let SourceConfig::Postgres(source) = &config.source else {
            panic!("a PostgreSQL source")
        };
        let password = source.password().unwrap().unwrap();
        assert_eq!(password.expose(), "pg-s3cret");
        assert!(
            !format!("{password:?} {config:?}").contains("pg-s3cret"),
            "no password in Debug output"
        );
    }

    #[test]
    fn an_aggregate_names_its_errors_with_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
        let agg = |body: &str| format!("{HEAD}{source}[[aggregates]]\nname = \"a\"\nfrom = \"t\"\n{body}");
        let cases = [
            (
                "dimensions = [\"id_token\"]\nmeasures = [{fn=\"count\"}]\n",
                "sluice.toml:14: aggregates.dimensions: `id_token` is tokenize",
            ),
            (
                "dimensions = [\"nope\"]\nmeasures = [{fn=\"count\"}]\n",
                "sluice.toml:14: aggregates.dimensions: `nope` is not an output column of policy `public.t`",
            ),
            (
                "dimensions = []\nmeasures = [{fn=\"max\", column=\"x\"}]\n",
                "sluice.toml:15: aggregates.measures.fn: unknown measure `max`",
            ),
            (
                "dimensions = []\nmeasures = [{fn=\"sum\"}]\n",
                "sluice.toml:15: aggregates.measures.column: required for `sum` and `avg`",
            ),
            (
                "dimensions = []\nmeasures = [{fn=\"count\"}]\nk_anonymity = 1\n",
                "sluice.toml:16: aggregates.k_anonymity: must be at least 2",
            ),
            (
                "dimensions = []\nmeasures = []\n",
                "sluice.toml:15: aggregates.measures: name at least one measure",
            ),
        ];
        for (body, want) in cases {
            let err = load(dir.path(), &agg(body)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}\nwanted: {want}");
        }
        let config = load(
            dir.path(),
            &agg("dimensions = []\nmeasures = [{fn=\"count\"}, {fn=\"count_distinct_subjects\"}]\n"),
        )
        .unwrap();
        let a = &config.aggregates[0];
        assert_eq!((a.k, a.on_suppressed), (11, Suppression::Drop));
        assert_eq!(
            a.measures.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["count", "distinct_subjects"]
        );
    }
}
