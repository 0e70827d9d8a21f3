//! `[lake]`: its root, format(s), Iceberg catalog, S3 options and where vault, quarantine and
//! audit table live.

use super::*;

/// Where the lake's tables, vault, quarantine and audit table are, and in which format(s).
pub(super) struct LakeLayout {
    pub(super) root: LakePath,
    pub(super) format: LakeFormat,
    pub(super) iceberg: Option<IcebergLocation>,
    pub(super) vault: LakePath,
    pub(super) quarantine: LakePath,
    pub(super) audit: LakePath,
}

pub(super) fn lake_layout(
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
    let iceberg = match (lake_format.iceberg(), &raw.lake.iceberg) {
        (true, iceberg) => Some(iceberg_config(
            iceberg.as_ref(),
            name,
            &lake_root,
            text,
            &resolve,
            &|t: &str, field: &str| location(t, field, &s3),
            raw.lake.format.as_ref().map_or(0, |f| f.span().start),
            &invalid,
        )?),
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

/// The object-store options of a `[lake.s3]`-like section. Credentials named by `*_env` are read
/// from the environment now (their values are never shown).
pub(super) fn s3_options(
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

/// `[lake.iceberg]`: the catalog (SQL by default: a local SQLite file, the warehouse beside the
/// tables — under the lake root, local or S3) and the namespace.
#[allow(clippy::too_many_arguments)]
pub(super) fn iceberg_config(
    raw: Option<&RawIceberg>,
    pipeline: &str,
    lake_root: &LakePath,
    text: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    location: &dyn Fn(&str, &str) -> Result<LakePath, LoadError>,
    format_at: usize,
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
        .or_else(|| text.find("[lake.iceberg]"))
        .unwrap_or(format_at);
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
            let database = match (raw.uri.as_deref(), lake_root.local()) {
                (Some(uri), _) => resolve(uri),
                (None, Some(root)) => root.join("iceberg").join("catalog.db"),
                (None, None) => {
                    return Err(invalid(
                        at,
                        "lake.iceberg.uri",
                        "required with an s3:// lake root: the SQL catalog is a local SQLite file (its path), or use `catalog = \"rest\"`".into(),
                    ))
                }
            };
            CatalogSettings::Sql {
                database,
                warehouse: match raw.warehouse.as_deref() {
                    Some(w) => location(w, "lake.iceberg.warehouse")?,
                    None => lake_root.join("iceberg").join("warehouse"),
                },
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
            // An HTTP header cannot carry a control character; the client would refuse it
            // showing the value, which may be a credential: refused here, by name only.
            if let Some(key) = properties.iter().find_map(|(k, v)| {
                (k.starts_with("header.") && v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)).then_some(k)
            }) {
                return Err(invalid(
                    at,
                    &format!("lake.iceberg.properties.{key}"),
                    "the value holds a control character (a trailing newline?); it is not shown".into(),
                ));
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
        catalog_name: raw
            .catalog_name
            .clone()
            .unwrap_or_else(|| defaults::ICEBERG_CATALOG_NAME.into()),
        catalog,
        namespace: raw.namespace.clone().unwrap_or_else(|| pipeline.to_string()),
    })
}
