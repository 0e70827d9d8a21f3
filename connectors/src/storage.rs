//! Where Delta tables live: a local directory or an S3 (or S3-compatible) prefix, with the
//! object-store options that reach it. `deltalake`'s S3 support (object_store) does the I/O;
//! commits are safe between concurrent writers through conditional PUT (`If-None-Match`), so no
//! lock table is needed where the store supports it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use url::Url;

/// Object-store options (`aws_endpoint`, `aws_region`, `aws_allow_http`, credentials…), passed
/// to `deltalake` as they are. Never printed with their values: some are secrets.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct StorageOptions(BTreeMap<String, String>);

impl StorageOptions {
    pub fn new(options: BTreeMap<String, String>) -> Self {
        Self(options)
    }

    pub(crate) fn to_map(&self) -> std::collections::HashMap<String, String> {
        self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The options' names (never their values).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys only: values include credentials.
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// What `deltalake` opens a table with: its URL and storage options.
pub(crate) type TableUrl = (Url, std::collections::HashMap<String, String>);

/// A directory of the lake (a table, or a root tables go under).
#[derive(Clone, PartialEq, Eq)]
pub enum LakePath {
    Local(PathBuf),
    /// `s3://bucket/prefix` (no trailing slash) and the options to reach it.
    Object {
        url: Url,
        options: StorageOptions,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LakePathError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{0}` is not a usable table location")]
    Invalid(String),
}

impl LakePath {
    /// Parses a configured location: `s3://…` / `s3a://…` is object storage (with `options`),
    /// anything else a path relative to `base`.
    pub fn parse(text: &str, base: &Path, options: StorageOptions) -> Result<Self, LakePathError> {
        if text.starts_with("s3://") || text.starts_with("s3a://") {
            let url = Url::parse(text.trim_end_matches('/')).map_err(|_| LakePathError::Invalid(text.to_string()))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(LakePathError::Invalid(text.to_string()));
            }
            return Ok(LakePath::Object { url, options });
        }
        if text.contains("://") {
            return Err(LakePathError::Invalid(text.to_string()));
        }
        Ok(LakePath::Local(base.join(text)))
    }

    /// The location `segment` below this one.
    pub fn join(&self, segment: &str) -> LakePath {
        match self {
            LakePath::Local(path) => LakePath::Local(path.join(segment)),
            LakePath::Object { url, options } => {
                let mut url = url.clone();
                let path = format!("{}/{}", url.path().trim_end_matches('/'), segment.trim_matches('/'));
                url.set_path(&path);
                LakePath::Object {
                    url,
                    options: options.clone(),
                }
            }
        }
    }

    /// The local directory, if this is one.
    pub fn local(&self) -> Option<&Path> {
        match self {
            LakePath::Local(path) => Some(path),
            LakePath::Object { .. } => None,
        }
    }

    pub fn is_object_store(&self) -> bool {
        matches!(self, LakePath::Object { .. })
    }

    /// The table URL and storage options `deltalake` opens. A local directory is created when
    /// `create` (a table about to be written), otherwise `None` is returned if it is absent.
    pub(crate) fn table_url(&self, create: bool) -> Result<Option<TableUrl>, LakePathError> {
        match self {
            LakePath::Local(path) => {
                if create {
                    std::fs::create_dir_all(path).map_err(|source| LakePathError::Io {
                        path: path.clone(),
                        source,
                    })?;
                }
                let abs = match std::fs::canonicalize(path) {
                    Ok(abs) => abs,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => {
                        return Err(LakePathError::Io {
                            path: path.clone(),
                            source,
                        })
                    }
                };
                let url =
                    Url::from_directory_path(&abs).map_err(|_| LakePathError::Invalid(abs.display().to_string()))?;
                Ok(Some((url, Default::default())))
            }
            LakePath::Object { url, options } => {
                let mut url = url.clone();
                url.set_path(&format!("{}/", url.path().trim_end_matches('/')));
                Ok(Some((url, options.to_map())))
            }
        }
    }
}

impl fmt::Display for LakePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LakePath::Local(path) => write!(f, "{}", path.display()),
            LakePath::Object { url, .. } => write!(f, "{url}"),
        }
    }
}

impl fmt::Debug for LakePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LakePath::Local(path) => write!(f, "{path:?}"),
            LakePath::Object { url, options } => write!(f, "{url} {options:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_join_and_never_print_option_values() {
        let options = StorageOptions::new(BTreeMap::from([(
            "aws_secret_access_key".to_string(),
            "s3cr3t-value".to_string(),
        )]));
        let root = LakePath::parse("s3://bucket/lake/", Path::new("/etc"), options).unwrap();
        let table = root.join("tables").join("payments");
        assert_eq!(table.to_string(), "s3://bucket/lake/tables/payments");
        let (url, opts) = table.table_url(false).unwrap().unwrap();
        assert_eq!(url.as_str(), "s3://bucket/lake/tables/payments/");
        assert_eq!(opts["aws_secret_access_key"], "s3cr3t-value");
        let shown = format!("{table} {table:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(LakePath::parse("s3:///nobucket", Path::new("/"), Default::default()).is_err());
        assert!(LakePath::parse("gs://b/x", Path::new("/"), Default::default()).is_err());
        assert_eq!(
            LakePath::parse("lake", Path::new("/etc/sluice"), Default::default())
                .unwrap()
                .local(),
            Some(Path::new("/etc/sluice/lake"))
        );
    }
}
