//! What a policy's output schema does to a table that exists, in either format — one rule:
//! columns may be added (nullable: older rows read null), never removed or retyped (rows would
//! be lost or misread). Columns are matched by name; their order does not matter.

/// What opening a table with a policy's schema will do to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaChange {
    /// No table yet: it is created with the policy's columns.
    Create,
    /// The table has the policy's columns (perhaps in another order).
    Same,
    /// These columns are added to the table.
    Add(Vec<String>),
    /// The policy removed or retyped columns the table has: the run stops.
    Refused {
        removed: Vec<String>,
        /// `name: table's type → policy's type`.
        retyped: Vec<String>,
    },
}

impl SchemaChange {
    /// Why the change is refused (`the policy removes balance`), empty if it is not.
    pub(crate) fn refusal(&self) -> String {
        let SchemaChange::Refused { removed, retyped } = self else {
            return String::new();
        };
        let mut parts = Vec::new();
        if !removed.is_empty() {
            parts.push(format!("removes {}", removed.join(", ")));
        }
        if !retyped.is_empty() {
            parts.push(format!("retypes {}", retyped.join(", ")));
        }
        format!("the policy {}", parts.join(" and "))
    }
}

/// A refused change, for an error naming the table, both column lists and why.
#[derive(Debug)]
pub struct Mismatch {
    pub table: String,
    pub existing: String,
    pub wanted: String,
    pub change: String,
}

impl Mismatch {
    pub(crate) fn new(table: &str, existing: &Columns, wanted: &Columns, refused: &SchemaChange) -> Box<Self> {
        Box::new(Mismatch {
            table: table.to_string(),
            existing: describe(existing),
            wanted: describe(wanted),
            change: refused.refusal(),
        })
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exists with columns [{}] but the policy now writes [{}]: {}, and only added columns evolve a table (removed or retyped ones would lose or misread rows): write to a new lake root or namespace, or restore the policy",
            self.table, self.existing, self.wanted, self.change
        )
    }
}

/// A table's or a policy's columns, `(name, type)`, the type as the table's format spells it.
pub(crate) type Columns = [(String, String)];

/// The change from `existing` (the table's columns) to `wanted` (the policy's).
pub(crate) fn plan(existing: &Columns, wanted: &Columns) -> SchemaChange {
    let type_of = |columns: &Columns, name: &str| columns.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
    let removed: Vec<String> = existing
        .iter()
        .filter(|(name, _)| type_of(wanted, name).is_none())
        .map(|(name, _)| name.clone())
        .collect();
    let mut retyped = Vec::new();
    let mut added = Vec::new();
    for (name, ty) in wanted {
        match type_of(existing, name) {
            Some(old) if old == *ty => {}
            Some(old) => retyped.push(format!("{name}: {old} → {ty}")),
            None => added.push(name.clone()),
        }
    }
    if !removed.is_empty() || !retyped.is_empty() {
        SchemaChange::Refused { removed, retyped }
    } else if added.is_empty() {
        SchemaChange::Same
    } else {
        SchemaChange::Add(added)
    }
}

/// `name:type, …`, for an error naming both schemas.
pub(crate) fn describe(columns: &Columns) -> String {
    columns
        .iter()
        .map(|(n, t)| format!("{n}:{t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::fmt::Display for SchemaChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaChange::Create => write!(f, "created"),
            SchemaChange::Same => write!(f, "unchanged"),
            SchemaChange::Add(columns) => write!(f, "adds {}", columns.join(", ")),
            SchemaChange::Refused { .. } => write!(f, "REFUSED: {}", self.refusal()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect()
    }

    #[test]
    fn columns_may_be_added_anywhere_but_never_removed_or_retyped() {
        let table = cols(&[("id", "long"), ("balance", "long"), ("_op", "string")]);
        assert_eq!(plan(&table, &table), SchemaChange::Same);
        let reordered = cols(&[("balance", "long"), ("id", "long"), ("_op", "string")]);
        assert_eq!(plan(&table, &reordered), SchemaChange::Same);
        let added = cols(&[
            ("id", "long"),
            ("balance", "long"),
            ("region", "string"),
            ("_op", "string"),
        ]);
        assert_eq!(plan(&table, &added), SchemaChange::Add(vec!["region".into()]));
        let removed = cols(&[("id", "long"), ("_op", "string")]);
        assert_eq!(
            plan(&table, &removed),
            SchemaChange::Refused {
                removed: vec!["balance".into()],
                retyped: vec![]
            }
        );
        let retyped = cols(&[
            ("id", "long"),
            ("balance", "string"),
            ("region", "string"),
            ("_op", "string"),
        ]);
        assert_eq!(
            plan(&table, &retyped),
            SchemaChange::Refused {
                removed: vec![],
                retyped: vec!["balance: long → string".into()]
            }
        );
        assert_eq!(
            plan(&table, &retyped).to_string(),
            "REFUSED: the policy retypes balance: long → string"
        );
    }
}
