//! What a table's columns are, written where catalogs read it: Delta column metadata and table
//! properties, Iceberg field docs and table properties. Kept in step with the policy each time
//! the table is opened; only the keys named here are sluice's (others are left alone).

use std::collections::BTreeMap;

/// Delta column metadata keys sluice owns. `comment` is the key Spark, Databricks and Unity
/// Catalog show as a column's comment.
pub const COMMENT_KEY: &str = "comment";
pub const CLASS_KEY: &str = "sluice.class";
pub const TAGS_KEY: &str = "sluice.tags";
/// Table properties sluice owns start with this (`sluice.classes`, `sluice.classification`,
/// `sluice.source_table`).
pub const PROPERTY_PREFIX: &str = "sluice.";

/// One column's class, tags and description.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnTags {
    pub class: Option<String>,
    pub tags: Vec<String>,
    /// What the column holds and how it was made (`direct_identifier: tokenize … of email`).
    pub comment: String,
}

impl ColumnTags {
    /// The column's metadata entries as Delta keeps them (tags comma-joined: a tag has no comma).
    pub fn delta_metadata(&self) -> BTreeMap<&'static str, String> {
        let mut out = BTreeMap::new();
        if !self.comment.is_empty() {
            out.insert(COMMENT_KEY, self.comment.clone());
        }
        if let Some(class) = &self.class {
            out.insert(CLASS_KEY, class.clone());
        }
        if !self.tags.is_empty() {
            out.insert(TAGS_KEY, self.tags.join(","));
        }
        out
    }
}

/// A table's tags: per column, and table properties (every key starting with
/// [`PROPERTY_PREFIX`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableTags {
    pub columns: BTreeMap<String, ColumnTags>,
    pub properties: BTreeMap<String, String>,
}

impl TableTags {
    /// Property changes that bring `existing` to these tags: `(key, Some(value))` to set,
    /// `(key, None)` to remove (a sluice property the policy no longer gives).
    pub(crate) fn property_changes<'a>(
        &self,
        existing: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Vec<(String, Option<String>)> {
        let existing: BTreeMap<&String, &String> = existing
            .into_iter()
            .filter(|(k, _)| k.starts_with(PROPERTY_PREFIX))
            .collect();
        let mut out: Vec<(String, Option<String>)> = existing
            .keys()
            .filter(|k| !self.properties.contains_key(k.as_str()))
            .map(|k| (k.to_string(), None))
            .collect();
        for (k, v) in &self.properties {
            if existing.get(k).map(|e| e.as_str()) != Some(v.as_str()) {
                out.push((k.clone(), Some(v.clone())));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sluice_properties_that_differ_change() {
        let tags = TableTags {
            columns: BTreeMap::new(),
            properties: BTreeMap::from([
                ("sluice.classes".to_string(), "financial".to_string()),
                ("sluice.source_table".to_string(), "public.people".to_string()),
            ]),
        };
        let existing: BTreeMap<String, String> = BTreeMap::from([
            ("sluice.classes".to_string(), "direct_identifier".to_string()),
            ("sluice.source_table".to_string(), "public.people".to_string()),
            ("sluice.retired".to_string(), "x".to_string()),
            ("delta.dataSkippingStatsColumns".to_string(), "_op".to_string()),
        ]);
        assert_eq!(
            tags.property_changes(&existing),
            vec![
                ("sluice.retired".to_string(), None),
                ("sluice.classes".to_string(), Some("financial".to_string())),
            ]
        );
        assert!(tags.property_changes(&tags.properties).is_empty());
    }
}
