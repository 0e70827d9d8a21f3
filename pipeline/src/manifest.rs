//! The release manifest printed by `sluice check`: what leaves the trusted zone, column by column.

use std::fmt::Write;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sluice_connectors::lake::{ColumnTags, TableTags};
use sluice_transforms::actions::Action;
use sluice_transforms::engine::META_COLUMNS;
use sluice_transforms::Policy;

use crate::config::{current_table_name, Config, Suppression};

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
        let _ = writeln!(
            s,
            "  {:<28} {:<26} {:<18} {:<18} how",
            "output column", "type", "from", "class"
        );
        for c in p.output_columns() {
            let tags = if c.tags.is_empty() {
                String::new()
            } else {
                format!(" [tags: {}]", c.tags.join(", "))
            };
            let _ = writeln!(
                s,
                "  {:<28} {:<26} {:<18} {:<18} {}{tags}",
                c.name,
                c.data_type.to_string(),
                c.source,
                c.class.as_deref().unwrap_or("-"),
                c.how
            );
        }
        for r in &p.rules {
            if let Some(reason) = &r.allow_plain {
                let _ = writeln!(
                    s,
                    "  {} ({}) kept in plain: {reason}",
                    r.column,
                    r.class.as_deref().unwrap_or_default()
                );
            }
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
                current_table_name(p),
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

/// The metadata column holding the subject token: classed as the subject column is.
const SUBJECT_COLUMN: &str = "_subject";

/// The column classes and tags of a policy's tables (its log and its current table), as
/// written to the tables' metadata: every data column is described, classed ones carry their
/// class and tags; `_subject` is classed as the subject column.
pub fn table_tags(policy: &Policy) -> TableTags {
    let mut columns = BTreeMap::new();
    for c in policy.output_columns() {
        let mut comment = match &c.class {
            Some(class) => format!("{class}: {} of {}", c.how, c.source),
            None => format!("{} of {}", c.how, c.source),
        };
        if !c.tags.is_empty() {
            comment.push_str(&format!("; tags: {}", c.tags.join(", ")));
        }
        columns.insert(
            c.name,
            ColumnTags {
                class: c.class,
                tags: c.tags,
                comment,
            },
        );
    }
    if let Some(subject) = policy.rules.iter().find(|r| r.column == policy.subject) {
        let how = format!(
            "subject token (HMAC-SHA256, domain {}) of {}",
            policy.token_domain, policy.subject
        );
        columns.insert(
            SUBJECT_COLUMN.to_string(),
            ColumnTags {
                comment: match &subject.class {
                    Some(class) => format!("{class}: {how}"),
                    None => how,
                },
                class: subject.class.clone(),
                tags: subject.tags.clone(),
            },
        );
    }
    let classified: BTreeMap<&String, &String> = columns
        .iter()
        .filter_map(|(name, c)| c.class.as_ref().map(|class| (name, class)))
        .collect();
    let mut properties = BTreeMap::from([("sluice.source_table".to_string(), policy.table.clone())]);
    if !classified.is_empty() {
        let mut classes: Vec<&str> = classified.values().map(|c| c.as_str()).collect();
        classes.sort();
        classes.dedup();
        properties.insert("sluice.classes".to_string(), classes.join(","));
        properties.insert(
            "sluice.classification".to_string(),
            serde_json::to_string(&classified).expect("strings serialize"),
        );
    }
    TableTags { columns, properties }
}

/// `sluice check --tags-json`: per table (logs and current tables), per column: class, tags,
/// action, source column and type — what a catalog sync job applies as governed tags.
pub fn tags_json(config: &Config) -> Value {
    let mut tables = serde_json::Map::new();
    for p in &config.policies {
        let outputs = p.output_columns();
        let types: BTreeMap<&str, String> = outputs
            .iter()
            .map(|c| (c.name.as_str(), c.data_type.to_string()))
            .collect();
        let tags = table_tags(p);
        let mut columns = serde_json::Map::new();
        for (name, t) in &tags.columns {
            let (action, source) = match outputs.iter().find(|c| &c.name == name) {
                Some(c) => (c.action.to_string(), c.source.clone()),
                None => ("subject_token".to_string(), p.subject.clone()),
            };
            columns.insert(
                name.clone(),
                json!({
                    "class": t.class,
                    "tags": t.tags,
                    "action": action,
                    "source_column": source,
                    "type": types.get(name.as_str()).cloned().unwrap_or_else(|| "Utf8".to_string()),
                    "comment": t.comment,
                }),
            );
        }
        let formats: Vec<&str> = config.table_locations(p).iter().map(|l| l.format()).collect();
        let mut names = vec![p.target.clone()];
        if p.current {
            names.push(current_table_name(p));
        }
        for name in names {
            tables.insert(
                name,
                json!({
                    "source_table": p.table,
                    "formats": formats,
                    "properties": tags.properties,
                    "columns": columns,
                }),
            );
        }
    }
    let classes: serde_json::Map<String, Value> = config
        .governance
        .classes
        .iter()
        .map(|c| {
            let meaning = sluice_transforms::policy::CLASSES
                .iter()
                .find(|(name, _)| name == c)
                .map(|(_, m)| *m)
                .unwrap_or("defined by this pipeline ([governance] classes)");
            (c.clone(), Value::from(meaning))
        })
        .collect();
    json!({ "pipeline": config.name, "classes": classes, "tables": tables })
}
