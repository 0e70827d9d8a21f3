//! Rewriting an Iceberg table: one snapshot that removes some data files and adds others
//! (an erasure's `overwrite`, a compaction's `replace`), then expiring the older snapshots and
//! deleting what only they referenced — physically, so no time travel brings removed rows back.
//!
//! `iceberg` 0.10 offers only appends as transactions (its snapshot producer and `TableCommit`
//! builder are crate-private), so the snapshot is built here from the crate's public manifest
//! writers and committed by the catalog's own protocol: for the SQL catalog as the JDBC catalog
//! commits (the new metadata file is written, then the catalog row is swapped only if it still
//! points at the metadata we read); for a REST catalog as a commit request whose requirements
//! assert the `main` branch still is the snapshot we read (see `rest.rs`). Either way a writer
//! that committed in between fails the commit, which is then prepared again on top of it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use iceberg::spec::{
    DataFile, FormatVersion, ManifestFile, ManifestListWriter, ManifestWriterBuilder, NestedFieldRef, Operation,
    Schema, Snapshot, SnapshotReference, SnapshotRetention, Summary, MAIN_BRANCH,
};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, ErrorKind, MetadataLocation, TableRequirement, TableUpdate};

use super::rest::{Posted, RestCommits};
use super::{committed_positions, position_properties, CatalogSettings, IcebergLocation, IcebergSinkError};

const MAX_ATTEMPTS: usize = 5;

fn unexpected(message: impl Into<String>) -> iceberg::Error {
    iceberg::Error::new(ErrorKind::Unexpected, message.into())
}

/// Checked on the table as each attempt reads it: a writer's fences (see
/// `IcebergSink::check_fences`); nothing for jobs that commit no stream's position.
pub(crate) type Fence<'a> = dyn Fn(&Table) -> Result<(), IcebergSinkError> + Sync + 'a;

/// For rewrites that carry no stream of their own.
pub(crate) const UNFENCED: &Fence<'static> = &|_| Ok(());

/// What a rewrite did.
pub(crate) struct Rewritten {
    /// The table as the rewrite left it.
    pub table: Table,
}

/// How a rewrite snapshot reaches the catalog.
enum Committer {
    /// The SQL catalog's database: a compare-and-swap of the table's metadata location.
    Sql(sqlx::SqlitePool),
    Rest(Box<RestCommits>),
}

/// A table opened for rewrites.
pub(crate) struct Rewriter {
    catalog: Arc<dyn Catalog>,
    location: IcebergLocation,
    name: String,
    committer: Committer,
}

/// A rewrite snapshot staged on a table as read: its manifests are written, the catalog not
/// told yet.
struct Staged {
    snapshot_id: i64,
    /// The manifests and manifest list written for it (garbage if the commit fails).
    written: Vec<String>,
    /// What must still hold of the table for the updates to apply (a REST catalog checks
    /// them; the SQL catalog's compare-and-swap of the metadata location implies them).
    requirements: Vec<TableRequirement>,
    updates: Vec<TableUpdate>,
}

impl Rewriter {
    pub(crate) async fn new(
        catalog: Arc<dyn Catalog>,
        location: &IcebergLocation,
        name: &str,
    ) -> Result<Self, IcebergSinkError> {
        let err = |source| IcebergSinkError::Iceberg {
            table: name.to_string(),
            source: Box::new(source),
        };
        let committer = match &location.catalog {
            CatalogSettings::Sql { database, .. } => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(database)
                    .busy_timeout(std::time::Duration::from_secs(30));
                let pool = sqlx::SqlitePool::connect_with(options)
                    .await
                    .map_err(|e| err(unexpected(format!("catalog database: {e}"))))?;
                Committer::Sql(pool)
            }
            CatalogSettings::Rest { uri, warehouse, .. } => Committer::Rest(Box::new(
                RestCommits::connect(uri, warehouse.as_deref(), &location.rest_properties())
                    .await
                    .map_err(err)?,
            )),
        };
        Ok(Self {
            catalog,
            location: location.clone(),
            name: name.to_string(),
            committer,
        })
    }

    fn err(&self, source: iceberg::Error) -> IcebergSinkError {
        IcebergSinkError::Iceberg {
            table: self.name.clone(),
            source: Box::new(source),
        }
    }

    pub(crate) async fn load(&self) -> Result<Table, IcebergSinkError> {
        self.catalog
            .load_table(&self.location.table_ident(&self.name))
            .await
            .map_err(|e| self.err(e))
    }

    /// Replaces the data files at `removed` (paths as the manifests name them) with `added` in
    /// one snapshot whose summary carries every stream's position and `properties`; retried
    /// over concurrent appends (whose files are kept). With `expire`, then expires every older
    /// snapshot and deletes the files only they referenced (an erasure: no history left).
    pub(crate) async fn replace(
        &self,
        removed: &HashSet<String>,
        added: Vec<DataFile>,
        operation: Operation,
        properties: HashMap<String, String>,
        expire: bool,
        fence: &Fence<'_>,
    ) -> Result<Rewritten, IcebergSinkError> {
        let mut attempt = 0;
        let (table, snapshot_id) = loop {
            attempt += 1;
            let table = self.load().await?;
            fence(&table)?;
            let staged = self
                .stage(&table, removed, &added, operation.clone(), &properties)
                .await
                .map_err(|e| self.err(e))?;
            let snapshot_id = staged.snapshot_id;
            let written = staged.written.clone();
            if self.commit_staged(&table, staged).await? {
                break (self.load().await?, snapshot_id);
            }
            // A writer committed in between: our staged snapshot is garbage (removed, best
            // effort: nothing references it), try again on top.
            for path in written {
                let _ = table.file_io().delete(&path).await;
            }
            if attempt >= MAX_ATTEMPTS {
                return Err(self.err(iceberg::Error::new(
                    ErrorKind::CatalogCommitConflicts,
                    "other writers kept committing; try again",
                )));
            }
        };
        let files_deleted = if expire {
            // An erasure killed here (committed, history not yet expired) finishes on its rerun.
            crate::failpoint(&format!("iceberg-before-expire:{}", self.name));
            self.expire_older_than(&table, snapshot_id).await?
        } else {
            0
        };
        tracing::debug!(table = %self.name, snapshot_id, files_deleted, "rewrite committed");
        Ok(Rewritten {
            table: self.load().await?,
        })
    }

    /// Commits a staged snapshot onto `table` (as read when staging) unless another writer
    /// moved the table since: false then.
    async fn commit_staged(&self, table: &Table, staged: Staged) -> Result<bool, IcebergSinkError> {
        let ident = self.location.table_ident(&self.name);
        match &self.committer {
            Committer::Rest(rest) => {
                match rest
                    .commit(&ident, staged.requirements, staged.updates)
                    .await
                    .map_err(|e| self.err(e))?
                {
                    Posted::Committed => Ok(true),
                    Posted::Conflict => Ok(false),
                }
            }
            Committer::Sql(pool) => {
                let current = table
                    .metadata_location()
                    .ok_or_else(|| self.err(unexpected("table without a metadata location")))?
                    .to_string();
                let mut builder = table.metadata().clone().into_builder(Some(current.clone()));
                for update in staged.updates {
                    builder = update.apply(builder).map_err(|e| self.err(e))?;
                }
                let metadata = builder.build().map_err(|e| self.err(e))?.metadata;
                let next = MetadataLocation::from_str(&current)
                    .map_err(|e| self.err(e))?
                    .with_next_version()
                    .with_new_metadata(&metadata);
                metadata
                    .write_to(table.file_io(), &next)
                    .await
                    .map_err(|e| self.err(e))?;
                let result = sqlx::query(
                    "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
                     WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? AND metadata_location = ?",
                )
                .bind(next.to_string())
                .bind(&current)
                .bind(&self.location.catalog_name)
                .bind(ident.namespace().join("."))
                .bind(ident.name())
                .bind(&current)
                .execute(pool)
                .await
                .map_err(|e| self.err(unexpected(format!("catalog commit: {e}"))))?;
                if result.rows_affected() == 1 {
                    return Ok(true);
                }
                let _ = table.file_io().delete(next.to_string()).await;
                Ok(false)
            }
        }
    }

    /// Writes the manifests of a snapshot that replaces `removed` with `added` on `table`; the
    /// updates that make it the head of `main` are returned, not committed.
    async fn stage(
        &self,
        table: &Table,
        removed: &HashSet<String>,
        added: &[DataFile],
        operation: Operation,
        properties: &HashMap<String, String>,
    ) -> iceberg::Result<Staged> {
        let metadata = table.metadata();
        if metadata.format_version() != FormatVersion::V2 {
            return Err(unexpected("only format version 2 tables can be rewritten"));
        }
        let current = metadata
            .current_snapshot()
            .ok_or_else(|| unexpected("table has no snapshot to rewrite"))?;
        let snapshot_id = new_snapshot_id(table);
        let sequence_number = metadata.next_sequence_number();
        let commit_id = hex::encode(snapshot_id.to_be_bytes());
        let file_io = table.file_io();
        let manifest_path = |n: usize| format!("{}/metadata/sluice-{commit_id}-m{n}.avro", metadata.location());

        let mut manifests: Vec<ManifestFile> = Vec::new();
        let mut written = Vec::new();
        let mut found = 0usize;
        let list = table.manifest_list_reader(current).load().await?;
        for (n, file) in list.entries().iter().enumerate() {
            match without_removed(table, file, snapshot_id, manifest_path(n), removed).await? {
                Some((manifest, removed_here)) => {
                    found += removed_here;
                    written.push(manifest.manifest_path.clone());
                    manifests.push(manifest);
                }
                None => manifests.push(file.clone()),
            }
        }
        if found != removed.len() {
            // Another rewrite (a compaction, an erasure) replaced them first: prepare again.
            return Err(iceberg::Error::new(
                ErrorKind::CatalogCommitConflicts,
                format!(
                    "{} of the files to remove are not in the current snapshot",
                    removed.len() - found
                ),
            ));
        }
        if !added.is_empty() {
            let mut writer = ManifestWriterBuilder::new(
                file_io.new_output(manifest_path(usize::MAX))?,
                Some(snapshot_id),
                metadata.current_schema().clone(),
                metadata.default_partition_spec().as_ref().clone(),
            )
            .build_v2_data();
            for file in added {
                writer.add_file(file.clone(), sequence_number)?;
            }
            let manifest = writer.write_manifest_file().await?;
            written.push(manifest.manifest_path.clone());
            manifests.push(manifest);
        }
        let list_path = format!(
            "{}/metadata/snap-{snapshot_id}-1-sluice-{commit_id}.avro",
            metadata.location()
        );
        let mut list_writer = ManifestListWriter::v2(
            file_io.new_output(&list_path)?.writer().await?,
            snapshot_id,
            Some(current.snapshot_id()),
            sequence_number,
        );
        list_writer.add_manifests(manifests.into_iter())?;
        list_writer.close().await?;
        written.push(list_path.clone());

        // Positions are looked up through the snapshot ancestry: carried here, since the older
        // snapshots are about to be expired.
        let mut summary = position_properties(&committed_positions(table));
        summary.extend(properties.clone());
        summary.insert("deleted-data-files".into(), removed.len().to_string());
        summary.insert("added-data-files".into(), added.len().to_string());
        let snapshot = Snapshot::builder()
            .with_snapshot_id(snapshot_id)
            .with_parent_snapshot_id(Some(current.snapshot_id()))
            .with_sequence_number(sequence_number)
            .with_timestamp_ms(chrono::Utc::now().timestamp_millis())
            .with_manifest_list(list_path)
            .with_schema_id(metadata.current_schema_id())
            .with_summary(Summary {
                operation,
                additional_properties: summary,
            })
            .build();
        Ok(Staged {
            snapshot_id,
            written,
            requirements: vec![
                TableRequirement::UuidMatch { uuid: metadata.uuid() },
                TableRequirement::RefSnapshotIdMatch {
                    r#ref: MAIN_BRANCH.to_string(),
                    snapshot_id: Some(current.snapshot_id()),
                },
            ],
            updates: vec![
                TableUpdate::AddSnapshot { snapshot },
                TableUpdate::SetSnapshotRef {
                    ref_name: MAIN_BRANCH.to_string(),
                    reference: SnapshotReference::new(snapshot_id, SnapshotRetention::branch(None, None, None)),
                },
            ],
        })
    }

    /// Gives the table's columns the docs in `docs` (`None`: no doc), as a new current schema
    /// (same columns and ids); retried over concurrent commits. Columns not named keep theirs.
    /// `iceberg` 0.10's schema updates only add or delete columns, hence a commit of our own.
    pub(crate) async fn set_docs(&self, docs: &BTreeMap<String, Option<String>>) -> Result<Table, IcebergSinkError> {
        for _ in 0..MAX_ATTEMPTS {
            let table = self.load().await?;
            let current = table.metadata().current_schema();
            let mut changed = false;
            let fields: Vec<NestedFieldRef> = current
                .as_struct()
                .fields()
                .iter()
                .map(|f| match docs.get(&f.name) {
                    Some(doc) if f.doc != *doc => {
                        changed = true;
                        let mut field = f.as_ref().clone();
                        field.doc = doc.clone();
                        Arc::new(field)
                    }
                    _ => f.clone(),
                })
                .collect();
            if !changed {
                return Ok(table);
            }
            let schema = Schema::builder()
                .with_fields(fields)
                .with_identifier_field_ids(current.identifier_field_ids())
                .build()
                .map_err(|e| self.err(e))?;
            let staged = Staged {
                snapshot_id: 0,
                written: Vec::new(),
                requirements: vec![
                    TableRequirement::UuidMatch {
                        uuid: table.metadata().uuid(),
                    },
                    TableRequirement::CurrentSchemaIdMatch {
                        current_schema_id: current.schema_id(),
                    },
                ],
                updates: vec![
                    TableUpdate::AddSchema { schema },
                    // -1: the schema just added.
                    TableUpdate::SetCurrentSchema { schema_id: -1 },
                ],
            };
            if self.commit_staged(&table, staged).await? {
                return self.load().await;
            }
        }
        Err(self.err(iceberg::Error::new(
            ErrorKind::CatalogCommitConflicts,
            "other writers kept committing; try again",
        )))
    }

    /// Expires every snapshot before `snapshot_id` and deletes the data files, manifests and
    /// manifest lists no remaining snapshot references. Returns how many files were deleted;
    /// an error if other writers kept it from committing (history would be left behind).
    pub(crate) async fn expire_older_than(&self, table: &Table, snapshot_id: i64) -> Result<u64, IcebergSinkError> {
        let mut table = table.clone();
        for _ in 0..MAX_ATTEMPTS {
            let Some(keep) = table.metadata().snapshot_by_id(snapshot_id) else {
                break;
            };
            let older: Vec<i64> = table
                .metadata()
                .snapshots()
                .filter(|s| s.sequence_number() < keep.sequence_number())
                .map(|s| s.snapshot_id())
                .collect();
            if older.is_empty() {
                break;
            }
            let before = referenced_files(&table).await.map_err(|e| self.err(e))?;
            let tx = Transaction::new(&table);
            let tx = tx
                .expire_snapshots()
                .expire_snapshot_ids(older)
                .apply(tx)
                .map_err(|e| self.err(e))?;
            match tx.commit(self.catalog.as_ref()).await {
                Ok(_) => {
                    // Read back through the catalog: a REST catalog's commit answer carries no
                    // storage credentials, the loaded table does.
                    let t = self.load().await?;
                    let after = referenced_files(&t).await.map_err(|e| self.err(e))?;
                    let mut deleted = 0;
                    for path in before.difference(&after) {
                        deleted += delete_if_present(&t, path).await.map_err(|e| self.err(e))?;
                    }
                    return Ok(deleted);
                }
                Err(e) if e.kind() == ErrorKind::CatalogCommitConflicts => table = self.load().await?,
                Err(e) => return Err(self.err(e)),
            }
        }
        if table.metadata().snapshot_by_id(snapshot_id).is_some_and(|keep| {
            table
                .metadata()
                .snapshots()
                .any(|s| s.sequence_number() < keep.sequence_number())
        }) {
            return Err(self.err(iceberg::Error::new(
                ErrorKind::CatalogCommitConflicts,
                "older snapshots could not be expired: other writers kept committing; run the job again",
            )));
        }
        Ok(0)
    }
}

/// Deletes a file; one already gone (a rerun) is fine. Returns 1 if it was there.
pub(crate) async fn delete_if_present(table: &Table, path: &str) -> iceberg::Result<u64> {
    if !table.file_io().exists(path).await? {
        return Ok(0);
    }
    table.file_io().delete(path).await?;
    Ok(1)
}

/// Every live data file, manifest and manifest list the table's snapshots reference.
pub(crate) async fn referenced_files(table: &Table) -> iceberg::Result<HashSet<String>> {
    let mut out = HashSet::new();
    let mut seen_manifests = HashSet::new();
    for snapshot in table.metadata().snapshots() {
        out.insert(snapshot.manifest_list().to_string());
        let list = table.manifest_list_reader(snapshot).load().await?;
        for file in list.entries() {
            if !seen_manifests.insert(file.manifest_path.clone()) {
                continue;
            }
            out.insert(file.manifest_path.clone());
            let manifest = file.load_manifest(table.file_io()).await?;
            // A `deleted` entry is a tombstone: the file is needed by older snapshots only.
            for entry in manifest.entries().iter().filter(|e| e.is_alive()) {
                out.insert(entry.file_path().to_string());
            }
        }
    }
    Ok(out)
}

/// The data files of the current snapshot, each with its partition spec's id.
pub(crate) async fn live_files(table: &Table) -> iceberg::Result<Vec<(DataFile, i32)>> {
    let Some(current) = table.metadata().current_snapshot() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let list = table.manifest_list_reader(current).load().await?;
    for file in list.entries() {
        let manifest = file.load_manifest(table.file_io()).await?;
        out.extend(
            manifest
                .entries()
                .iter()
                .filter(|e| e.is_alive())
                .map(|e| (e.data_file().clone(), file.partition_spec_id)),
        );
    }
    Ok(out)
}

fn new_snapshot_id(table: &Table) -> i64 {
    loop {
        let mut bytes = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("system randomness");
        let id = i64::from_be_bytes(bytes) & i64::MAX;
        if id != 0 && table.metadata().snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

/// A manifest holding files to remove, written again (at `path`) with them as deleted and the
/// rest as existing: the new manifest and how many it removed. `None`: it holds none of them.
async fn without_removed(
    table: &Table,
    file: &ManifestFile,
    snapshot_id: i64,
    path: String,
    removed: &HashSet<String>,
) -> iceberg::Result<Option<(ManifestFile, usize)>> {
    let metadata = table.metadata();
    let manifest = file.load_manifest(table.file_io()).await?;
    let touched = manifest
        .entries()
        .iter()
        .any(|e| e.is_alive() && removed.contains(e.file_path()));
    if !touched {
        return Ok(None);
    }
    let spec = metadata
        .partition_spec_by_id(file.partition_spec_id)
        .ok_or_else(|| unexpected("manifest of an unknown partition spec"))?;
    let mut writer = ManifestWriterBuilder::new(
        table.file_io().new_output(path)?,
        Some(snapshot_id),
        metadata.current_schema().clone(),
        spec.as_ref().clone(),
    )
    .build_v2_data();
    let mut found = 0;
    for entry in manifest.entries() {
        if !entry.is_alive() {
            continue;
        }
        let seq = entry.sequence_number().unwrap_or(file.sequence_number);
        let file_seq = entry.file_sequence_number.or(Some(seq));
        if removed.contains(entry.file_path()) {
            found += 1;
            writer.add_delete_file(entry.data_file().clone(), seq, file_seq)?;
        } else {
            let added_by = entry.snapshot_id().unwrap_or(file.added_snapshot_id);
            writer.add_existing_file(entry.data_file().clone(), added_by, seq, file_seq)?;
        }
    }
    Ok(Some((writer.write_manifest_file().await?, found)))
}
