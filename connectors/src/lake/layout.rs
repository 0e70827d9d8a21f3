//! Which formats the lake is written in, and where each table of a pipeline lives in them.

use super::TableLocation;
use crate::iceberg::IcebergLocation;
use crate::storage::LakePath;

/// Which table formats the analytic tables are written in (the vault, quarantine and audit
/// tables are Delta whatever this says: erasure works on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LakeFormat {
    Delta,
    Iceberg,
    Both,
}

impl LakeFormat {
    /// The configuration's spelling (`lake.format`); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "delta" => Some(LakeFormat::Delta),
            "iceberg" => Some(LakeFormat::Iceberg),
            "both" => Some(LakeFormat::Both),
            _ => None,
        }
    }

    pub(crate) fn delta(self) -> bool {
        self != LakeFormat::Iceberg
    }

    pub fn iceberg(self) -> bool {
        self != LakeFormat::Delta
    }

    /// How many tables each policy writes.
    pub fn count(self) -> usize {
        usize::from(self.delta()) + usize::from(self.iceberg())
    }

    /// For people: "Delta", "Iceberg", "Delta and Iceberg".
    pub fn describe(self) -> &'static str {
        match self {
            LakeFormat::Delta => "Delta",
            LakeFormat::Iceberg => "Iceberg",
            LakeFormat::Both => "Delta and Iceberg",
        }
    }
}

/// Where the analytic table `name` is written: its Delta table under `delta_root` (when the
/// format has Delta) and its Iceberg table in `iceberg` (when configured).
pub fn table_locations(
    format: LakeFormat,
    delta_root: &LakePath,
    iceberg: Option<&IcebergLocation>,
    name: &str,
) -> Vec<TableLocation> {
    let mut out = Vec::with_capacity(2);
    if format.delta() {
        out.push(TableLocation::Delta(delta_root.join(name)));
    }
    if let Some(location) = iceberg {
        out.push(TableLocation::Iceberg {
            location: location.clone(),
            table: name.to_string(),
        });
    }
    out
}

/// A table that is Delta whatever the format (vault, quarantine, audit).
pub fn delta_table(path: LakePath) -> TableLocation {
    TableLocation::Delta(path)
}
