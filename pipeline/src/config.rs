//! The pipeline configuration file (`sluice.toml`). Relative paths are relative to the file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_transforms::{ConfigError, Policy};
use toml::Spanned;

/// What to do with events of a table that no policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTables {
    /// Count and drop.
    Skip,
    /// Count and write to the quarantine (encrypted).
    Quarantine,
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
    workers: WorkersConfig,
}

fn default_unknown_tables() -> UnknownTables {
    UnknownTables::Skip
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: Spanned<String>,
    path: String,
    #[serde(default = "default_max_event_bytes")]
    max_event_bytes: usize,
    #[serde(default = "default_poll_ms")]
    poll_ms: u64,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    store: String,
    master_key_file: Option<String>,
    master_key_env: Option<String>,
    #[serde(default = "default_cache")]
    cache_capacity: usize,
}

fn default_cache() -> usize {
    50_000
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
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            chunk_events: 4096,
            queue_depth: 2,
        }
    }
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
    pub unknown_tables: UnknownTables,
    pub source_path: PathBuf,
    pub max_event_bytes: usize,
    pub poll_ms: u64,
    pub tables_root: PathBuf,
    pub vault_path: PathBuf,
    pub quarantine_path: PathBuf,
    pub key_store: PathBuf,
    pub master_key: MasterKeySource,
    pub key_cache: usize,
    pub batch: BatchConfig,
    pub workers: WorkersConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Config {
    pub fn load(file: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(file).map_err(|source| LoadError::Io {
            path: file.to_path_buf(),
            source,
        })?;
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
        if raw.source.kind.get_ref() != "file" {
            return Err(invalid(
                raw.source.kind.span().start,
                "source.kind",
                format!(
                    "unknown source kind `{}`: this build reads `file`",
                    raw.source.kind.get_ref()
                ),
            ));
        }
        if raw.keys.master_key_file.is_none() && raw.keys.master_key_env.is_none() {
            return Err(invalid(
                text.find("[keys]").unwrap_or(0),
                "keys",
                "set master_key_file or master_key_env".into(),
            ));
        }
        if raw.policies.is_empty() {
            return Err(invalid(
                text.find("policies").unwrap_or(0),
                "policies",
                "name at least one policy file or directory".into(),
            ));
        }

        let mut policies = Vec::new();
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
            }
        }
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
        let root = resolve(&raw.lake.root);
        Ok(Config {
            file: file.to_path_buf(),
            name: name.clone(),
            policies,
            unknown_tables: raw.unknown_tables,
            source_path: resolve(&raw.source.path),
            max_event_bytes: raw.source.max_event_bytes.max(1024),
            poll_ms: raw.source.poll_ms,
            tables_root: root.join("tables"),
            vault_path: raw
                .lake
                .vault
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| root.join("vault")),
            quarantine_path: raw
                .lake
                .quarantine
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| root.join("quarantine")),
            key_store: resolve(&raw.keys.store),
            master_key: MasterKeySource {
                file: raw.keys.master_key_file.as_deref().map(resolve),
                env: raw.keys.master_key_env,
            },
            key_cache: raw.keys.cache_capacity,
            batch: raw.batch,
            workers: raw.workers,
        })
    }

    pub fn worker_threads(&self) -> usize {
        match self.workers.threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            n => n,
        }
    }
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
