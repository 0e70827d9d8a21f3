//! The sinks of a run, in the one order every part of the runtime agrees on: each policy's
//! table once per lake format (in policy order), then the vault, then the quarantine. A sink is
//! named by its [`SinkId`]; its position in that order is computed here and nowhere else.

use arrow_schema::SchemaRef;
use sluice_connectors::lake::current::{BUCKET_COLUMN, CURRENT_STATS_COLUMNS};
use sluice_connectors::lake::{
    current_schema, delta_table, Catalogs, CurrentSettings, LakeError, SchemaChange, TableLocation, TableTags,
};
use sluice_transforms::crypto::Tokenizer;
use sluice_transforms::engine::PARTITION_COLUMN;
use sluice_transforms::vault::{vault_schema, VAULT_STATS_COLUMNS};
use sluice_transforms::TableTransform;

use crate::config::{current_table_name, Config};
use crate::quarantine::quarantine_schema;

/// One sink of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkId {
    /// Policy `policy`'s table in the run's `format`-th lake format (0 is its primary: its rows
    /// are counted and published once, whatever the number of formats).
    Table {
        policy: usize,
        format: usize,
    },
    /// The current-state table of policy `policy` (one with `current = true`), per format.
    Current {
        policy: usize,
        format: usize,
    },
    Vault,
    Quarantine,
}

/// How many sinks of each kind a run has, and so where each one is: the policies' tables,
/// their current-state tables, the vault, the quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSet {
    policies: usize,
    formats: usize,
    /// The policies that keep a current table, in policy order.
    currents: Vec<usize>,
}

impl SinkSet {
    pub fn new(policies: usize, formats: usize, currents: Vec<usize>) -> Self {
        Self {
            policies,
            formats: formats.max(1),
            currents,
        }
    }

    fn tables(&self) -> usize {
        self.policies * self.formats
    }

    fn current_tables(&self) -> usize {
        self.currents.len() * self.formats
    }

    pub fn count(&self) -> usize {
        self.tables() + self.current_tables() + 2
    }

    pub fn index(&self, id: SinkId) -> usize {
        match id {
            SinkId::Table { policy, format } => policy * self.formats + format,
            SinkId::Current { policy, format } => {
                let nth = self
                    .currents
                    .iter()
                    .position(|&p| p == policy)
                    .expect("a current sink of a policy that keeps one");
                self.tables() + nth * self.formats + format
            }
            SinkId::Vault => self.tables() + self.current_tables(),
            SinkId::Quarantine => self.tables() + self.current_tables() + 1,
        }
    }

    pub fn id(&self, index: usize) -> SinkId {
        let (tables, currents) = (self.tables(), self.current_tables());
        match index {
            i if i < tables => SinkId::Table {
                policy: i / self.formats,
                format: i % self.formats,
            },
            i if i < tables + currents => SinkId::Current {
                policy: self.currents[(i - tables) / self.formats],
                format: (i - tables) % self.formats,
            },
            i if i == tables + currents => SinkId::Vault,
            _ => SinkId::Quarantine,
        }
    }

    pub fn vault(&self) -> usize {
        self.index(SinkId::Vault)
    }

    pub fn quarantine(&self) -> usize {
        self.index(SinkId::Quarantine)
    }

    /// The sinks of policy `policy`'s rows, its primary first: its tables, then its current
    /// tables, if it keeps them.
    pub fn tables_of(&self, policy: usize) -> impl Iterator<Item = usize> {
        let first = self.index(SinkId::Table { policy, format: 0 });
        let current = match self.currents.contains(&policy) {
            true => {
                let first = self.index(SinkId::Current { policy, format: 0 });
                first..first + self.formats
            }
            false => 0..0,
        };
        (first..first + self.formats).chain(current)
    }

    /// The policy whose primary sink `index` is.
    pub fn primary_of(&self, index: usize) -> Option<usize> {
        match self.id(index) {
            SinkId::Table { policy, format: 0 } => Some(policy),
            _ => None,
        }
    }

    /// Lays per-sink items out in sink order: each policy's (one per format), each current
    /// table's (one per format), the vault's, the quarantine's.
    pub fn arrange<T>(
        &self,
        tables: impl IntoIterator<Item = Vec<T>>,
        currents: impl IntoIterator<Item = Vec<T>>,
        vault: T,
        quarantine: T,
    ) -> Vec<T> {
        let mut out: Vec<T> = Vec::with_capacity(self.count());
        for per_format in tables.into_iter().chain(currents) {
            debug_assert_eq!(per_format.len(), self.formats, "one item per lake format");
            out.extend(per_format);
        }
        out.push(vault);
        out.push(quarantine);
        debug_assert_eq!(out.len(), self.count());
        out
    }
}

/// A sink as it is opened: where, under which name, with which columns, partition and
/// statistics.
pub struct SinkSpec {
    pub location: TableLocation,
    pub name: String,
    pub schema: SchemaRef,
    pub partition: Option<&'static str>,
    /// Columns whose per-file minimum and maximum the table's log or manifests may keep.
    pub stats_columns: Vec<String>,
    /// A current-state table: how it is kept.
    pub current: Option<CurrentSettings>,
    /// A policy's table: its columns' classes and tags, written to the table's metadata.
    pub tags: Option<TableTags>,
}

/// Every sink of a run, in [`SinkSet`] order.
pub fn sink_specs(config: &Config, transforms: &[TableTransform]) -> Vec<SinkSpec> {
    let mut specs = Vec::new();
    for t in transforms {
        for location in config.table_locations(t.policy()) {
            specs.push(SinkSpec {
                location,
                name: t.policy().target.clone(),
                schema: t.schema(),
                partition: Some(PARTITION_COLUMN),
                stats_columns: t.stats_columns(),
                current: None,
                tags: Some(crate::manifest::table_tags(t.policy())),
            });
        }
    }
    for t in transforms.iter().filter(|t| t.policy().current) {
        let schema = current_schema(&t.schema());
        for location in config.current_locations(t.policy()) {
            specs.push(SinkSpec {
                location,
                name: current_table_name(t.policy()),
                schema: schema.clone(),
                partition: Some(BUCKET_COLUMN),
                stats_columns: CURRENT_STATS_COLUMNS.iter().map(|c| c.to_string()).collect(),
                current: Some(config.current_settings(t.policy())),
                tags: Some(crate::manifest::table_tags(t.policy())),
            });
        }
    }
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // No statistics on subject tokens, ciphertexts or positions (see the Delta sink's
    // `open_or_create`).
    specs.push(SinkSpec {
        location: delta_table(config.vault_path.clone()),
        name: "vault".into(),
        schema: vault_schema(),
        partition: None,
        stats_columns: names(VAULT_STATS_COLUMNS),
        current: None,
        tags: None,
    });
    specs.push(SinkSpec {
        location: delta_table(config.quarantine_path.clone()),
        name: "quarantine".into(),
        schema: quarantine_schema(),
        partition: Some(crate::quarantine::PARTITION_COLUMN),
        stats_columns: names(crate::quarantine::STATS_COLUMNS),
        current: None,
        tags: None,
    });
    specs
}

/// What the next run will do to each of its tables' columns, by the table's label: create it,
/// leave it, add columns, or refuse (`sluice check --tables`). Reads the lake; changes nothing.
#[allow(clippy::type_complexity)]
pub fn schema_changes(config: &Config) -> std::io::Result<Vec<(String, Result<SchemaChange, LakeError>)>> {
    // The token key is not needed to know the columns: any tokenizer gives the same schema.
    let tokenizer = Tokenizer::new(&[0; 32]);
    let transforms: Vec<TableTransform> = config
        .policies
        .iter()
        .map(|p| TableTransform::new(p.clone(), &tokenizer))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut catalogs = Catalogs::default();
    Ok(sink_specs(config, &transforms)
        .into_iter()
        .map(|spec| {
            let change = rt.block_on(spec.location.schema_change(&mut catalogs, &spec.name, &spec.schema));
            (spec.location.label(&spec.name), change)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sink_has_one_index_and_back() {
        for (policies, formats, currents) in [(0, 1, vec![]), (1, 1, vec![0]), (3, 1, vec![]), (3, 2, vec![0, 2])] {
            let set = SinkSet::new(policies, formats, currents.clone());
            let ids: Vec<SinkId> = (0..set.count()).map(|i| set.id(i)).collect();
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(set.index(*id), i, "{policies} policies, {formats} formats");
            }
            assert_eq!(ids.len(), (policies + currents.len()) * formats + 2);
            assert_eq!(ids[ids.len() - 2], SinkId::Vault);
            assert_eq!(ids[ids.len() - 1], SinkId::Quarantine);
            let primaries: Vec<usize> = (0..set.count()).filter_map(|i| set.primary_of(i)).collect();
            assert_eq!(primaries, (0..policies).collect::<Vec<_>>());
        }
    }

    #[test]
    fn arrange_puts_each_policy_per_format_then_current_tables_vault_and_quarantine() {
        let set = SinkSet::new(2, 2, vec![1]);
        let laid = set.arrange(
            vec![vec!["a.delta", "a.iceberg"], vec!["b.delta", "b.iceberg"]],
            vec![vec!["b_current.delta", "b_current.iceberg"]],
            "vault",
            "quarantine",
        );
        assert_eq!(
            laid,
            [
                "a.delta",
                "a.iceberg",
                "b.delta",
                "b.iceberg",
                "b_current.delta",
                "b_current.iceberg",
                "vault",
                "quarantine"
            ]
        );
        assert_eq!(laid[set.index(SinkId::Table { policy: 1, format: 1 })], "b.iceberg");
        assert_eq!(
            set.tables_of(1).map(|i| laid[i]).collect::<Vec<_>>(),
            ["b.delta", "b.iceberg", "b_current.delta", "b_current.iceberg"]
        );
        assert_eq!(
            set.tables_of(0).map(|i| laid[i]).collect::<Vec<_>>(),
            ["a.delta", "a.iceberg"]
        );
    }
}
