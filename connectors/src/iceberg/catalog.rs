//! Where Iceberg tables are: the catalog settings (SQL or REST) and a table's location.

use super::*;

/// Which catalog holds the tables.
#[derive(Clone, PartialEq)]
pub enum CatalogSettings {
    /// The embedded SQL catalog: one SQLite file, files under a local warehouse directory
    /// (the JDBC catalog's tables: `pyiceberg`'s `SqlCatalog` reads the same).
    Sql { database: PathBuf, warehouse: PathBuf },
    /// A REST catalog (Polaris, Nessie, Glue's REST endpoint, …). `properties` are passed to
    /// the client as they are (`token`, `credential`, `oauth2-server-uri`, `prefix`, …).
    Rest {
        uri: String,
        warehouse: Option<String>,
        properties: HashMap<String, String>,
    },
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
        let storage = Arc::new(iceberg::io::LocalFsStorageFactory);
        match &self.catalog {
            CatalogSettings::Sql { database, warehouse } => {
                for dir in [
                    database.parent().unwrap_or(std::path::Path::new(".")),
                    warehouse.as_path(),
                ] {
                    std::fs::create_dir_all(dir).map_err(|source| IcebergSinkError::Io {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                }
                let abs = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                let database = abs(&database.parent().map(Path::to_path_buf).unwrap_or_default())
                    .join(database.file_name().unwrap_or_default());
                let props = HashMap::from([
                    ("uri".to_string(), format!("sqlite:{}?mode=rwc", database.display())),
                    ("warehouse".to_string(), format!("file://{}", abs(warehouse).display())),
                    (
                        "sql_bind_style".to_string(),
                        iceberg_catalog_sql::SqlBindStyle::QMark.to_string(),
                    ),
                ]);
                let catalog = iceberg_catalog_sql::SqlCatalogBuilder::default()
                    .with_storage_factory(storage)
                    .load(&self.catalog_name, props)
                    .await
                    .map_err(err)?;
                Ok(Arc::new(catalog))
            }
            CatalogSettings::Rest {
                uri,
                warehouse,
                properties,
            } => {
                let mut props = properties.clone();
                props.insert("uri".into(), uri.clone());
                if let Some(w) = warehouse {
                    props.insert("warehouse".into(), w.clone());
                }
                let catalog = iceberg_catalog_rest::RestCatalogBuilder::default()
                    .with_storage_factory(storage)
                    .load(&self.catalog_name, props)
                    .await
                    .map_err(err)?;
                Ok(Arc::new(catalog))
            }
        }
    }

    pub(crate) fn table_ident(&self, table: &str) -> TableIdent {
        TableIdent::new(self.namespace_ident(), table.to_string())
    }

    pub(super) fn namespace_ident(&self) -> NamespaceIdent {
        NamespaceIdent::from_strs(self.namespace.split('.'))
            .unwrap_or_else(|_| NamespaceIdent::new(self.namespace.clone()))
    }
}
