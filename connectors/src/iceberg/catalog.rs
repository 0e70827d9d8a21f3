//! Where Iceberg tables are: the catalog settings (SQL or REST) and a table's location.

use super::*;

/// Which catalog holds the tables.
#[derive(Clone, PartialEq)]
pub enum CatalogSettings {
    /// The embedded SQL catalog: one SQLite file, data and metadata files under a warehouse
    /// directory or S3 prefix (the JDBC catalog's tables: `pyiceberg`'s `SqlCatalog` reads
    /// the same).
    Sql { database: PathBuf, warehouse: LakePath },
    /// A REST catalog (Polaris, Nessie, Lakekeeper, SeaweedFS, …; not those needing SigV4).
    /// `properties` are passed to the client as they are (`token`, `credential`,
    /// `oauth2-server-uri`, `prefix`, `header.*`, and `s3.*` for the storage the catalog's
    /// tables are on — not the lake's `[lake.s3]`, which may be another store — unless the
    /// catalog vends credentials with each table).
    Rest {
        uri: String,
        warehouse: Option<String>,
        properties: HashMap<String, String>,
    },
}

/// Asks a REST catalog to vend short-lived storage credentials with each table it loads (as
/// the Java and Python clients do by default); a catalog that vends none ignores it.
const ACCESS_DELEGATION_HEADER: &str = "header.X-Iceberg-Access-Delegation";

/// The lake's S3 settings (object_store's option names, shared with Delta) as Iceberg FileIO
/// properties, so that one `[lake.s3]` means the same to both formats: path-style addressing
/// unless virtual-hosted style is asked for (object_store's default; Iceberg's is the opposite,
/// which S3-compatible servers such as MinIO or moto do not all serve), server-side encryption
/// (SSE-S3, SSE-KMS with its key). Without credentials the AWS chain (environment, profile,
/// instance role) supplies them. An encryption OpenDAL cannot apply is an error (files must not
/// land unencrypted); other options with no Iceberg equivalent are named in a warning.
pub(crate) fn s3_file_io_properties(options: &StorageOptions) -> Result<HashMap<String, String>, String> {
    let get = |key: &str| options.get(key).or_else(|| options.get(&key[4..]));
    let mut out = HashMap::new();
    let mut used = vec!["aws_allow_http", "aws_virtual_hosted_style_request"];
    for (ours, theirs) in [
        ("aws_endpoint", iceberg::io::S3_ENDPOINT),
        ("aws_region", iceberg::io::S3_REGION),
        ("aws_access_key_id", iceberg::io::S3_ACCESS_KEY_ID),
        ("aws_secret_access_key", iceberg::io::S3_SECRET_ACCESS_KEY),
        ("aws_session_token", iceberg::io::S3_SESSION_TOKEN),
    ] {
        used.push(ours);
        if let Some(value) = get(ours) {
            out.insert(theirs.to_string(), value.to_string());
        }
    }
    let virtual_hosted = get("aws_virtual_hosted_style_request").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    out.insert(
        iceberg::io::S3_PATH_STYLE_ACCESS.to_string(),
        (!virtual_hosted).to_string(),
    );
    used.extend(["aws_server_side_encryption", "aws_sse_kms_key_id"]);
    match get("aws_server_side_encryption") {
        None => {}
        Some("AES256") => {
            out.insert(iceberg::io::S3_SSE_TYPE.to_string(), "s3".to_string());
        }
        Some("aws:kms") => {
            out.insert(iceberg::io::S3_SSE_TYPE.to_string(), "kms".to_string());
            if let Some(key) = get("aws_sse_kms_key_id") {
                out.insert(iceberg::io::S3_SSE_KEY.to_string(), key.to_string());
            }
        }
        Some(other) => {
            return Err(format!(
                "[lake.s3] aws_server_side_encryption = {other:?} cannot be applied to Iceberg tables (AES256 and aws:kms can)"
            ))
        }
    }
    let ignored: Vec<&str> = options
        .keys()
        .filter(|k| !used.iter().any(|u| *k == *u || *k == &u[4..]))
        .collect();
    if !ignored.is_empty() {
        tracing::warn!(options = ?ignored, "these [lake.s3] options apply to Delta only: Iceberg's S3 client has no equivalent");
    }
    Ok(out)
}

/// A REST catalog's properties are shown by name only: `token`, `credential` and the like are
/// secrets (read from the environment through `properties_env`).
impl std::fmt::Debug for CatalogSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CatalogSettings::Sql { database, warehouse } => f
                .debug_struct("Sql")
                .field("database", database)
                .field("warehouse", warehouse)
                .finish(),
            CatalogSettings::Rest {
                uri,
                warehouse,
                properties,
            } => {
                let mut names: Vec<&String> = properties.keys().collect();
                names.sort();
                f.debug_struct("Rest")
                    .field("uri", uri)
                    .field("warehouse", warehouse)
                    .field("properties", &names)
                    .finish()
            }
        }
    }
}

/// A catalog and the namespace the pipeline's tables live in.
#[derive(Debug, Clone, PartialEq)]
pub struct IcebergLocation {
    /// The catalog's name (for the SQL catalog, the `catalog_name` column readers filter on).
    pub catalog_name: String,
    pub catalog: CatalogSettings,
    pub namespace: String,
}

impl IcebergLocation {
    /// Whether the catalog may hold tables: an embedded SQL catalog whose database file does not
    /// exist holds none (and is not created by asking).
    pub(crate) fn may_exist(&self) -> bool {
        match &self.catalog {
            CatalogSettings::Sql { database, .. } => database.exists(),
            _ => true,
        }
    }

    pub(crate) async fn connect(&self) -> Result<Arc<dyn Catalog>, IcebergSinkError> {
        let err = |source| IcebergSinkError::Iceberg {
            table: format!("(catalog {})", self.catalog_name),
            source: Box::new(source),
        };
        match &self.catalog {
            CatalogSettings::Sql { database, warehouse } => {
                let dirs = [
                    database.parent().unwrap_or(std::path::Path::new(".")),
                    warehouse.local().unwrap_or(Path::new(".")),
                ];
                for dir in dirs {
                    std::fs::create_dir_all(dir).map_err(|source| IcebergSinkError::Io {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                }
                let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
                let database =
                    abs(database.parent().unwrap_or(Path::new("."))).join(database.file_name().unwrap_or_default());
                let mut props = HashMap::from([
                    ("uri".to_string(), format!("sqlite:{}?mode=rwc", database.display())),
                    (
                        "sql_bind_style".to_string(),
                        iceberg_catalog_sql::SqlBindStyle::QMark.to_string(),
                    ),
                ]);
                let storage: Arc<dyn iceberg::io::StorageFactory> = match warehouse {
                    LakePath::Local(dir) => {
                        props.insert("warehouse".into(), format!("file://{}", abs(dir).display()));
                        Arc::new(iceberg::io::LocalFsStorageFactory)
                    }
                    LakePath::Object { url, options } => {
                        props.insert("warehouse".into(), url.to_string());
                        props.extend(
                            s3_file_io_properties(options)
                                .map_err(|e| err(iceberg::Error::new(ErrorKind::DataInvalid, e)))?,
                        );
                        Arc::new(iceberg_storage_opendal::OpenDalResolvingStorageFactory::new())
                    }
                };
                let catalog = iceberg_catalog_sql::SqlCatalogBuilder::default()
                    .with_storage_factory(storage)
                    .load(&self.catalog_name, props)
                    .await
                    .map_err(err)?;
                Ok(Arc::new(catalog))
            }
            CatalogSettings::Rest { uri, warehouse, .. } => {
                let mut props = self.rest_properties();
                props.insert("uri".into(), uri.clone());
                if let Some(w) = warehouse {
                    props.insert("warehouse".into(), w.clone());
                }
                let catalog = iceberg_catalog_rest::RestCatalogBuilder::default()
                    .with_storage_factory(Arc::new(iceberg_storage_opendal::OpenDalResolvingStorageFactory::new()))
                    .load(&self.catalog_name, props)
                    .await
                    .map_err(err)?;
                Ok(Arc::new(catalog))
            }
        }
    }

    /// A REST catalog client's properties: the configured ones and, unless they say otherwise,
    /// the request for vended credentials.
    pub(crate) fn rest_properties(&self) -> HashMap<String, String> {
        let CatalogSettings::Rest { properties, .. } = &self.catalog else {
            return HashMap::new();
        };
        let mut props = properties.clone();
        props
            .entry(ACCESS_DELEGATION_HEADER.to_string())
            .or_insert_with(|| "vended-credentials".to_string());
        props
    }

    pub(crate) fn table_ident(&self, table: &str) -> TableIdent {
        TableIdent::new(self.namespace_ident(), table.to_string())
    }

    pub(super) fn namespace_ident(&self) -> NamespaceIdent {
        NamespaceIdent::from_strs(self.namespace.split('.'))
            .unwrap_or_else(|_| NamespaceIdent::new(self.namespace.clone()))
    }
}

/// A table as a commit returned it, read through `before`'s FileIO: a REST catalog answers a
/// commit without the storage credentials it vends with a loaded table.
pub(crate) fn with_file_io_of(committed: Table, before: &Table) -> iceberg::Result<Table> {
    Table::builder()
        .identifier(committed.identifier().clone())
        .metadata(committed.metadata_ref())
        .metadata_location(committed.metadata_location_result()?.to_string())
        .file_io(before.file_io().clone())
        .runtime(iceberg::Runtime::try_current()?)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_lakes_s3_settings_mean_the_same_to_iceberg_and_the_catalog_asks_for_vended_credentials() {
        let options = StorageOptions::new(BTreeMap::from([
            ("aws_endpoint".to_string(), "http://127.0.0.1:9000".to_string()),
            ("aws_region".to_string(), "eu-west-1".to_string()),
            ("aws_access_key_id".to_string(), "AKID".to_string()),
            ("aws_secret_access_key".to_string(), "s3cr3t".to_string()),
        ]));
        let props = s3_file_io_properties(&options).unwrap();
        assert_eq!(props[iceberg::io::S3_ENDPOINT], "http://127.0.0.1:9000");
        assert_eq!(props[iceberg::io::S3_REGION], "eu-west-1");
        assert_eq!(props[iceberg::io::S3_ACCESS_KEY_ID], "AKID");
        assert_eq!(props[iceberg::io::S3_SECRET_ACCESS_KEY], "s3cr3t");
        // object_store's default addressing (path style), not Iceberg's (virtual-hosted).
        assert_eq!(props[iceberg::io::S3_PATH_STYLE_ACCESS], "true");
        let virtual_hosted = StorageOptions::new(BTreeMap::from([(
            "aws_virtual_hosted_style_request".to_string(),
            "true".to_string(),
        )]));
        let props = s3_file_io_properties(&virtual_hosted).unwrap();
        assert_eq!(props[iceberg::io::S3_PATH_STYLE_ACCESS], "false");
        assert!(!props.contains_key(iceberg::io::S3_ACCESS_KEY_ID));
        // Server-side encryption follows; one Iceberg's client cannot apply stops the run.
        let kms = StorageOptions::new(BTreeMap::from([
            ("aws_server_side_encryption".to_string(), "aws:kms".to_string()),
            (
                "aws_sse_kms_key_id".to_string(),
                "arn:aws:kms:eu-west-1:1:key/k".to_string(),
            ),
        ]));
        let props = s3_file_io_properties(&kms).unwrap();
        assert_eq!(props[iceberg::io::S3_SSE_TYPE], "kms");
        assert_eq!(props[iceberg::io::S3_SSE_KEY], "arn:aws:kms:eu-west-1:1:key/k");
        let dsse = StorageOptions::new(BTreeMap::from([(
            "aws_server_side_encryption".to_string(),
            "aws:kms:dsse".to_string(),
        )]));
        assert!(s3_file_io_properties(&dsse)
            .unwrap_err()
            .contains("cannot be applied to Iceberg"));

        let rest = |properties: HashMap<String, String>| IcebergLocation {
            catalog_name: "sluice".into(),
            catalog: CatalogSettings::Rest {
                uri: "http://c".into(),
                warehouse: None,
                properties,
            },
            namespace: "n".into(),
        };
        let props = rest(HashMap::from([("token".to_string(), "t0k3n".to_string())])).rest_properties();
        assert_eq!(props[ACCESS_DELEGATION_HEADER], "vended-credentials");
        assert_eq!(props["token"], "t0k3n");
        // A catalog that must not vend (or another delegation mode) is left as configured.
        let own = rest(HashMap::from([(
            ACCESS_DELEGATION_HEADER.to_string(),
            "remote-signing".to_string(),
        )]));
        assert_eq!(own.rest_properties()[ACCESS_DELEGATION_HEADER], "remote-signing");
        // Shown by property name only.
        let shown = format!(
            "{:?}",
            rest(HashMap::from([("credential".to_string(), "id:s3cr3t".to_string())]))
        );
        assert!(shown.contains("credential") && !shown.contains("s3cr3t"), "{shown}");
    }
}
