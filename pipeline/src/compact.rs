//! Compaction: small files bin-packed into files of `[compaction] target_file_mb`, in every
//! table the pipeline writes — Delta OPTIMIZE (deltalake's), an Iceberg `replace` snapshot
//! (ours: `iceberg` 0.10 has no rewrite action). Data and committed positions are unchanged.
//!
//! Against an erasure rewriting the same table: whichever commits second conflicts (Delta's
//! conflict checker; the Iceberg rewrite's compare-and-swap finds the files it replaces gone).
//! A compaction that loses is skipped until the next one; an erasure prepares again. The files a
//! compaction replaced stay for time travel; an erasure deletes those holding its subjects.

use sluice_connectors::delta::Compaction;
use sluice_connectors::error::{ErrorKind, Kind};
use sluice_connectors::lake::{delta_table, Catalogs, LakeError, TableLocation};
use sluice_transforms::crypto::Tokenizer;
use sluice_transforms::engine::TableTransform;
use tracing::{info, warn};

use crate::config::Config;

#[derive(Debug, serde::Serialize)]
pub struct TableCompaction {
    pub table: String,
    pub format: &'static str,
    /// `None`: skipped (no table yet, or another writer's rewrite got there first).
    pub result: Option<Compaction>,
}

/// Compacts every table of the pipeline: policy tables (each format), aggregates, the vault and
/// the quarantine.
pub fn compact_all(config: &Config) -> Result<Vec<TableCompaction>, LakeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime for the compaction");
    let target = config.compaction.target_file_mb.max(1) << 20;
    // Statistics stay restricted to the columns that link no row to a person. (The token key
    // is not needed to know the columns: any tokenizer gives the same schema.)
    let tokenizer = Tokenizer::new(&[0; 32]);
    let mut tables: Vec<(TableLocation, String, Option<Vec<String>>)> = Vec::new();
    for policy in &config.policies {
        let stats = TableTransform::new(policy.clone(), &tokenizer).stats_columns();
        for location in config.table_locations(policy) {
            tables.push((location, policy.target.clone(), Some(stats.clone())));
        }
    }
    for a in &config.aggregates {
        for name in [a.name.clone(), crate::aggregate::suppressions_table(a)] {
            for location in crate::aggregate::locations(config, &name) {
                tables.push((location, name.clone(), None));
            }
        }
    }
    tables.push((delta_table(config.vault_path.clone()), "vault".into(), None));
    tables.push((delta_table(config.quarantine_path.clone()), "quarantine".into(), None));

    let mut catalogs = Catalogs::default();
    let mut out = Vec::new();
    for (location, name, stats) in tables {
        let result: Result<Option<Compaction>, LakeError> =
            rt.block_on(location.compact(&mut catalogs, &name, &config.name, stats.as_deref(), target));
        let format = location.format();
        let result = match result {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::Conflict => {
                warn!(table = %name, format, "another writer rewrote the table meanwhile: compaction skipped until next time");
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(r) = &result {
            if r.files_removed > 0 {
                info!(table = %name, format, removed = r.files_removed, added = r.files_added, "compacted");
            }
        }
        out.push(TableCompaction {
            table: name,
            format,
            result,
        });
    }
    Ok(out)
}
