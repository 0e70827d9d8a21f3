//! The release manifest printed by `sluice check`: what leaves the trusted zone, column by column.

use std::fmt::Write;

use sluice_transforms::actions::Action;
use sluice_transforms::engine::META_COLUMNS;

use crate::config::{Config, Suppression};

pub fn render(config: &Config) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: OK — pipeline `{}`, {} table policies",
        config.file.display(),
        config.name,
        config.policies.len()
    );
    for p in &config.policies {
        let _ = writeln!(
            s,
            "\n{} → {} (subject `{}`, token domain `{}`)",
            p.table, p.target, p.subject, p.token_domain
        );
        let _ = writeln!(s, "  {:<28} {:<26} {:<18} how", "output column", "type", "from");
        for c in p.output_columns() {
            let _ = writeln!(
                s,
                "  {:<28} {:<26} {:<18} {}",
                c.name,
                c.data_type.to_string(),
                c.source,
                c.how
            );
        }
        let _ = writeln!(
            s,
            "  {:<28} metadata: op, subject token, source time, position, ingest time, date partition",
            META_COLUMNS.join(",")
        );
        let columns_with = |action: Action| -> Vec<&str> {
            p.rules
                .iter()
                .filter(|r| r.action == action)
                .map(|r| r.column.as_str())
                .collect()
        };
        let (vaulted, dropped) = (columns_with(Action::Vault), columns_with(Action::Drop));
        if !vaulted.is_empty() {
            let _ = writeln!(s, "  to the PII vault only (ciphertext): {}", vaulted.join(", "));
        }
        if !dropped.is_empty() {
            let _ = writeln!(s, "  dropped: {}", dropped.join(", "));
        }
        let _ = writeln!(
            s,
            "  any other column: dropped (default deny), counted and reported by name"
        );
        if p.current {
            let _ = writeln!(
                s,
                "  current table {}: the same data columns, one row per key [{}] (its latest event; deletes removed)",
                crate::config::current_table_name(p),
                p.key.join(", ")
            );
        }
    }
    let format = config.lake_format.describe();
    let _ = writeln!(s, "\ntables written as {format} (vault, quarantine and audit: Delta)");
    for a in &config.aggregates {
        let measures: Vec<&str> = a.measures.iter().map(|m| m.name.as_str()).collect();
        let _ = writeln!(
            s,
            "\naggregate {} ← {} per hour by [{}]: {}; groups under {} distinct subjects {}",
            a.name,
            a.from,
            a.dimensions.join(", "),
            measures.join(", "),
            a.k,
            match a.on_suppressed {
                Suppression::Drop => "dropped",
                Suppression::Merge => "merged per hour (dimensions null) when that reaches k, else dropped",
            }
        );
    }
    s
}
