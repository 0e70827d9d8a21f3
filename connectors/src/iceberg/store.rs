//! An object-store view of a table's files, for what Iceberg's FileIO does not offer: listing
//! a table's directories (an erasure's verification, orphan clean-up) and handing the files to
//! DataFusion (aggregates). Built from the table's own FileIO properties, so the credentials a
//! REST catalog vends with the table are the ones used.

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::logstore::object_store::aws::AmazonS3Builder;
use deltalake::logstore::object_store::local::LocalFileSystem;
use deltalake::logstore::object_store::path::Path as StorePath;
use deltalake::logstore::object_store::ObjectStore;
use futures_util::TryStreamExt;
use iceberg::table::Table;
use url::Url;

/// The store holding `location` (`s3://bucket/…` or `file:///…`) and the URL of its root
/// (`s3://bucket`, `file:///`), which DataFusion registers it under.
pub(crate) fn store_for(
    location: &str,
    properties: &HashMap<String, String>,
) -> Result<(Url, Arc<dyn ObjectStore>), String> {
    let url = Url::parse(location).map_err(|e| format!("{location}: {e}"))?;
    match url.scheme() {
        "file" => Ok((
            Url::parse("file:///").expect("a valid URL"),
            Arc::new(LocalFileSystem::new()) as Arc<dyn ObjectStore>,
        )),
        scheme @ ("s3" | "s3a") => {
            let bucket = url.host_str().ok_or_else(|| format!("{location}: no bucket"))?;
            let get = |key: &str| properties.get(key).map(String::as_str);
            let has_keys = get(iceberg::io::S3_ACCESS_KEY_ID).is_some();
            // The table's own (or vended) keys alone; else the AWS chain, as OpenDAL does.
            let mut builder = if has_keys {
                AmazonS3Builder::new()
            } else {
                AmazonS3Builder::from_env()
            }
            .with_bucket_name(bucket);
            if let Some(endpoint) = get(iceberg::io::S3_ENDPOINT) {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let Some(region) = get(iceberg::io::S3_REGION).or(get(iceberg::io::CLIENT_REGION)) {
                builder = builder.with_region(region);
            }
            if let (Some(id), Some(secret)) = (
                get(iceberg::io::S3_ACCESS_KEY_ID),
                get(iceberg::io::S3_SECRET_ACCESS_KEY),
            ) {
                builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                if let Some(token) = get(iceberg::io::S3_SESSION_TOKEN) {
                    builder = builder.with_token(token);
                }
            }
            let path_style = get(iceberg::io::S3_PATH_STYLE_ACCESS).is_some_and(|v| v.eq_ignore_ascii_case("true"));
            builder = builder.with_virtual_hosted_style_request(!path_style);
            let store = builder.build().map_err(|e| format!("s3://{bucket}: {e}"))?;
            // Under the table's own scheme (`s3a://` stays `s3a://`): listed paths must read
            // as the manifests write them.
            let root = Url::parse(&format!("{scheme}://{bucket}")).map_err(|e| e.to_string())?;
            Ok((root, Arc::new(store)))
        }
        other => Err(format!("{location}: storage scheme `{other}` is not supported")),
    }
}

/// A table's store (see [`store_for`]).
pub(crate) fn table_store(table: &Table) -> Result<(Url, Arc<dyn ObjectStore>), String> {
    store_for(table.metadata().location(), table.file_io().config().props())
}

/// Every file under `dir` (a URL of the table's store), with when it was last modified (ms),
/// as URLs in the form the manifests use; sorted. A missing directory holds none.
pub(crate) async fn list_files(table: &Table, dir: &str) -> Result<Vec<(String, i64)>, String> {
    let (root, store) = table_store(table)?;
    let url = Url::parse(dir).map_err(|e| format!("{dir}: {e}"))?;
    let prefix = StorePath::from_url_path(url.path()).map_err(|e| format!("{dir}: {e}"))?;
    let objects: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| format!("listing {dir}: {e}"))?;
    let mut out: Vec<(String, i64)> = objects
        .into_iter()
        .map(|o| {
            let path = match root.scheme() {
                "file" => format!("file:///{}", o.location),
                _ => format!("{}/{}", root.as_str().trim_end_matches('/'), o.location),
            };
            (path, o.last_modified.timestamp_millis())
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tables_store_is_its_bucket_or_the_local_disk_and_only_those() {
        let props = HashMap::from([
            (
                iceberg::io::S3_ENDPOINT.to_string(),
                "http://127.0.0.1:9000".to_string(),
            ),
            (iceberg::io::S3_ACCESS_KEY_ID.to_string(), "AKID".to_string()),
            (iceberg::io::S3_SECRET_ACCESS_KEY.to_string(), "s3cr3t".to_string()),
            (iceberg::io::S3_PATH_STYLE_ACCESS.to_string(), "true".to_string()),
        ]);
        let (root, store) = store_for("s3://bucket/ns/table", &props).unwrap();
        assert_eq!(root.as_str(), "s3://bucket");
        assert!(!format!("{store:?}").contains("s3cr3t"));
        let (root, _) = store_for("file:///tmp/wh/ns/table", &HashMap::new()).unwrap();
        assert_eq!(root.as_str(), "file:///");
        let (root, _) = store_for("s3a://bucket/ns/table", &props).unwrap();
        assert_eq!(root.as_str(), "s3a://bucket");
        let err = store_for("gs://bucket/t", &HashMap::new()).unwrap_err();
        assert!(err.contains("`gs` is not supported"), "{err}");
    }
}
