//! Erasure inside an Iceberg table: the data files holding an erased subject's rows are
//! rewritten without them (or with them unlinked) in one `overwrite` snapshot, every older
//! snapshot is expired and the files only they referenced are deleted physically — no time
//! travel brings the rows back. The row-level work is the Delta erasure's (same matcher, same
//! Parquet rewrite; field ids travel with the Parquet schema).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use iceberg::spec::{DataContentType, DataFile, DataFileBuilder, DataFileFormat, Manifest, Operation};
use iceberg::table::Table;
use iceberg::Catalog;

use super::rewrite::{delete_if_present, live_files, referenced_files, Rewriter};
use super::{IcebergLocation, IcebergSinkError};
use crate::delta::erase::{count_matches, rewrite, FileProgress, RowMatcher, TableErasure, Treatment};

/// The snapshot summary property naming the erasure job that wrote the snapshot.
const ERASURE_PROPERTY: &str = "sluice.erasure";

/// Replacement files written, their snapshot not committed yet.
pub(crate) struct PreparedIcebergErasure {
    pub outcome: TableErasure,
    removed: HashSet<String>,
    added: Vec<DataFile>,
}

/// An Iceberg table opened for erasure.
pub(crate) struct IcebergErasureTarget {
    name: String,
    app_id: String,
    rewriter: Rewriter,
    table: Table,
}

impl IcebergErasureTarget {
    /// `None` if the catalog has no such table.
    pub(crate) async fn open(
        catalog: Arc<dyn Catalog>,
        location: &IcebergLocation,
        name: &str,
        app_id: String,
    ) -> Result<Option<Self>, IcebergSinkError> {
        let ident = location.table_ident(name);
        let exists = catalog
            .table_exists(&ident)
            .await
            .map_err(|source| IcebergSinkError::Iceberg {
                table: name.to_string(),
                source: Box::new(source),
            })?;
        if !exists {
            return Ok(None);
        }
        let rewriter = Rewriter::new(catalog, location, name).await?;
        let table = rewriter.load().await?;
        Ok(Some(Self {
            name: name.to_string(),
            app_id,
            rewriter,
            table,
        }))
    }

    fn err(&self, source: iceberg::Error) -> IcebergSinkError {
        IcebergSinkError::Iceberg {
            table: self.name.clone(),
            source: Box::new(source),
        }
    }

    fn io_err(&self, path: &str, e: impl std::fmt::Display) -> IcebergSinkError {
        self.err(iceberg::Error::new(
            iceberg::ErrorKind::Unexpected,
            format!("{path}: {e}"),
        ))
    }

    /// Whether this job's erasure snapshot is in the table already.
    pub(crate) async fn committed(&self) -> Result<bool, IcebergSinkError> {
        Ok(self
            .table
            .metadata()
            .snapshots()
            .any(|s| s.summary().additional_properties.get(ERASURE_PROPERTY) == Some(&self.app_id)))
    }

    pub(crate) async fn file_count(&self) -> Result<u64, IcebergSinkError> {
        Ok(live_files(&self.table).await.map_err(|e| self.err(e))?.len() as u64)
    }

    async fn read(&self, path: &str) -> Result<bytes::Bytes, IcebergSinkError> {
        let input = self.table.file_io().new_input(path).map_err(|e| self.err(e))?;
        input.read().await.map_err(|e| self.err(e))
    }

    /// Finds the matched rows and, unless `dry_run`, writes the replacement files (not
    /// committed yet).
    pub(crate) async fn prepare(
        &mut self,
        matcher: &RowMatcher,
        treatment: &Treatment,
        dry_run: bool,
        progress: FileProgress<'_>,
    ) -> Result<PreparedIcebergErasure, IcebergSinkError> {
        self.table = self.rewriter.load().await?;
        let mut out = TableErasure::default();
        let mut removed = HashSet::new();
        let mut added = Vec::new();
        for (file, spec_id) in live_files(&self.table).await.map_err(|e| self.err(e))? {
            out.files_scanned += 1;
            let path = file.file_path().to_string();
            let bytes = self.read(&path).await?;
            let matched = count_matches(bytes.clone(), matcher).map_err(|e| self.io_err(&path, e))?;
            progress(1);
            if matched == 0 {
                continue;
            }
            out.rows_matched += matched;
            out.files_removed.push(path.clone());
            out.bytes_read += file.file_size_in_bytes();
            removed.insert(path.clone());
            if dry_run {
                continue;
            }
            let (rewritten, rows) = rewrite(bytes, matcher, treatment).map_err(|e| self.io_err(&path, e))?;
            if rows == 0 {
                continue;
            }
            let new_path = sibling_path(&path);
            let size = rewritten.len() as u64;
            self.table
                .file_io()
                .new_output(&new_path)
                .map_err(|e| self.err(e))?
                .write(rewritten.into())
                .await
                .map_err(|e| self.err(e))?;
            out.bytes_written += size;
            out.files_added += 1;
            added.push(
                DataFileBuilder::default()
                    .content(DataContentType::Data)
                    .file_path(new_path)
                    .file_format(DataFileFormat::Parquet)
                    .partition(file.partition().clone())
                    .partition_spec_id(spec_id)
                    .record_count(rows)
                    .file_size_in_bytes(size)
                    .build()
                    .map_err(|e| self.io_err(&path, e))?,
            );
        }
        Ok(PreparedIcebergErasure {
            outcome: out,
            removed,
            added,
        })
    }

    /// Commits a prepared erasure (nothing to do when nothing matched): one `overwrite`
    /// snapshot, then every older snapshot expired and the files only they held deleted.
    pub(crate) async fn commit(&mut self, prepared: &mut PreparedIcebergErasure) -> Result<(), IcebergSinkError> {
        if prepared.removed.is_empty() {
            return Ok(());
        }
        let done = self
            .rewriter
            .replace(
                &prepared.removed,
                std::mem::take(&mut prepared.added),
                Operation::Overwrite,
                HashMap::from([(ERASURE_PROPERTY.to_string(), self.app_id.clone())]),
                true,
                super::rewrite::UNFENCED,
            )
            .await?;
        prepared.outcome.version = Some(done.table.metadata().last_sequence_number() as u64);
        self.table = done.table;
        Ok(())
    }

    /// Expires the snapshots older than this job's erasure snapshot and deletes what only they
    /// referenced (done by the commit itself; again on the rerun of a job killed between the
    /// two). Returns how many files were deleted and the erasure snapshot's sequence number;
    /// `None` if the erasure is not in the table.
    pub(crate) async fn expire_history(&mut self) -> Result<Option<(u64, u64)>, IcebergSinkError> {
        self.table = self.rewriter.load().await?;
        let Some(erasure) = self
            .table
            .metadata()
            .snapshots()
            .find(|s| s.summary().additional_properties.get(ERASURE_PROPERTY) == Some(&self.app_id))
            .map(|s| (s.snapshot_id(), s.sequence_number()))
        else {
            return Ok(None);
        };
        let deleted = self.rewriter.expire_older_than(&self.table, erasure.0).await?;
        self.table = self.rewriter.load().await?;
        Ok(Some((deleted, erasure.1.max(0) as u64)))
    }

    /// Deletes those of `paths` no snapshot references (files of a rewrite killed before its
    /// clean-up, orphans). Returns how many were deleted.
    pub(crate) async fn delete_files(&self, paths: &[String]) -> Result<u64, IcebergSinkError> {
        let referenced = referenced_files(&self.table).await.map_err(|e| self.err(e))?;
        let mut deleted = 0;
        for p in paths.iter().filter(|p| !referenced.contains(*p)) {
            deleted += delete_if_present(&self.table, p).await.map_err(|e| self.err(e))?;
        }
        Ok(deleted)
    }

    /// Every Parquet file under the table's data directory, referenced or not: rows the
    /// matcher finds in each, and when it was last modified.
    pub(crate) async fn scan_all_files(
        &self,
        matcher: &RowMatcher,
    ) -> Result<Vec<(String, u64, i64)>, IcebergSinkError> {
        let mut out = Vec::new();
        for (path, modified_ms) in self.table_files().await? {
            if !path.ends_with(".parquet") {
                continue;
            }
            let bytes = self.read(&path).await?;
            let matched = count_matches(bytes, matcher).map_err(|e| self.io_err(&path, e))?;
            out.push((path, matched, modified_ms));
        }
        Ok(out)
    }

    /// Metadata files (table metadata, manifest lists, manifests with their column bounds
    /// decoded) in which `found` finds something.
    pub(crate) async fn log_files_where(
        &self,
        found: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<Vec<String>, IcebergSinkError> {
        let mut out = Vec::new();
        for (path, _) in self.table_files().await? {
            if path.ends_with(".parquet") {
                continue;
            }
            let bytes = self.read(&path).await?;
            let hit = found(&bytes)
                || (path.ends_with(".avro")
                    && Manifest::parse_avro(&bytes).is_ok_and(|m| found(manifest_as_text(&m).as_bytes())));
            if hit {
                out.push(path);
            }
        }
        Ok(out)
    }

    /// Data files older snapshots still reference (none once the erasure has expired them).
    pub(crate) async fn history_files(&self) -> Result<HashSet<String>, IcebergSinkError> {
        let live: HashSet<String> = self.active_files().await?.into_iter().collect();
        Ok(referenced_files(&self.table)
            .await
            .map_err(|e| self.err(e))?
            .into_iter()
            .filter(|p| p.ends_with(".parquet") && !live.contains(p))
            .collect())
    }

    pub(crate) async fn active_files(&self) -> Result<Vec<String>, IcebergSinkError> {
        Ok(live_files(&self.table)
            .await
            .map_err(|e| self.err(e))?
            .into_iter()
            .map(|(f, _)| f.file_path().to_string())
            .collect())
    }

    /// Every file under the table's location (data, metadata, and anything a writer left
    /// there), in whichever store holds it, as URLs in the manifests' form. The table's own
    /// metadata file must be among them: otherwise the listing and the manifests spell paths
    /// differently, and a verification would compare nothing.
    async fn table_files(&self) -> Result<Vec<(String, i64)>, IcebergSinkError> {
        let location = self.table.metadata().location().trim_end_matches('/');
        let files = super::store::list_files(&self.table, &format!("{location}/"))
            .await
            .map_err(|e| self.io_err(location, e))?;
        if let Some(own) = self.table.metadata_location() {
            if own.starts_with(location) && !files.iter().any(|(f, _)| f == own) {
                return Err(self.io_err(
                    own,
                    "not found by listing the table's location: the store's paths and the table's differ",
                ));
            }
        }
        Ok(files)
    }
}

/// A manifest's file paths and column bounds as text (the Avro encoding hides strings).
fn manifest_as_text(manifest: &Manifest) -> String {
    let mut text = String::new();
    for entry in manifest.entries() {
        let file = entry.data_file();
        text.push_str(file.file_path());
        text.push('\n');
        for datum in file.lower_bounds().values().chain(file.upper_bounds().values()) {
            text.push_str(&datum.to_string());
            text.push('\n');
        }
    }
    text
}

/// A new file beside the old one, under a fresh random name.
fn sibling_path(old: &str) -> String {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).expect("system randomness");
    let name = format!("sluice-erased-{}.parquet", hex::encode(id));
    match old.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name,
    }
}
