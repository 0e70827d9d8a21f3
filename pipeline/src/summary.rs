//! Counters of a run. Names of tables, columns and reasons only: never a value.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    /// Non-empty lines read.
    pub events_read: u64,
    /// `null` events (Kafka compaction markers).
    pub tombstones: u64,
    /// Records that are not row changes (transaction metadata, heartbeats, schema changes,
    /// logical decoding messages), per kind: skipped or quarantined per `source.control_records`.
    pub control_records: BTreeMap<String, u64>,
    /// Analytic rows written, per target table.
    pub rows_written: BTreeMap<String, u64>,
    pub vault_rows_written: u64,
    /// Quarantined events by reason.
    pub quarantined: BTreeMap<String, u64>,
    /// Events of tables no policy names, per source table.
    pub unknown_tables: BTreeMap<String, u64>,
    /// Default deny: values of columns no policy names, per source table and column.
    pub dropped_columns: BTreeMap<String, BTreeMap<String, u64>>,
    /// Rows re-read after a restart whose table had already committed them.
    pub already_committed: u64,
    /// Rows of erased subjects (right to be forgotten) dropped: a replay never resurrects them.
    pub erased_subject_rows: u64,
    /// Delta commits made.
    pub commits: u64,
    pub elapsed_seconds: f64,
}

impl Summary {
    pub fn merge(&mut self, other: Summary) {
        self.events_read += other.events_read;
        self.tombstones += other.tombstones;
        add_all(&mut self.control_records, other.control_records);
        add_all(&mut self.rows_written, other.rows_written);
        self.vault_rows_written += other.vault_rows_written;
        add_all(&mut self.quarantined, other.quarantined);
        add_all(&mut self.unknown_tables, other.unknown_tables);
        for (table, cols) in other.dropped_columns {
            let table = if self.dropped_columns.len() >= MAX_NAMES && !self.dropped_columns.contains_key(&table) {
                OTHER.to_string()
            } else {
                table
            };
            add_all(self.dropped_columns.entry(table).or_default(), cols);
        }
        self.already_committed += other.already_committed;
        self.erased_subject_rows += other.erased_subject_rows;
        self.commits += other.commits;
    }

    pub fn quarantined_total(&self) -> u64 {
        self.quarantined.values().sum()
    }

    /// The human summary printed at the end of a run.
    pub fn render(&self, lake_root: &str) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let rate = if self.elapsed_seconds > 0.0 {
            self.events_read as f64 / self.elapsed_seconds
        } else {
            0.0
        };
        let _ = writeln!(s, "sluice run summary");
        let _ = writeln!(
            s,
            "  events read        {:>10}   ({:.1} s, {:.0} events/s)",
            self.events_read, self.elapsed_seconds, rate
        );
        let _ = writeln!(s, "  tombstones         {:>10}", self.tombstones);
        if !self.control_records.is_empty() {
            let _ = writeln!(
                s,
                "  control records    {:>10}",
                self.control_records.values().sum::<u64>()
            );
            for (kind, n) in &self.control_records {
                let _ = writeln!(s, "    {kind:<22}{n:>10}");
            }
        }
        let _ = writeln!(
            s,
            "  already committed  {:>10}   (re-read after a restart, skipped)",
            self.already_committed
        );
        if self.erased_subject_rows > 0 {
            let _ = writeln!(
                s,
                "  erased subjects    {:>10}   (rows of forgotten subjects, dropped; an id reused for someone new: sluice reuse-subject)",
                self.erased_subject_rows
            );
        }
        let _ = writeln!(s, "  rows written");
        for (t, n) in &self.rows_written {
            let _ = writeln!(s, "    {t:<22}{n:>10}");
        }
        let _ = writeln!(s, "    {:<22}{:>10}", "(vault)", self.vault_rows_written);
        let _ = writeln!(s, "  quarantined        {:>10}", self.quarantined_total());
        for (r, n) in &self.quarantined {
            let _ = writeln!(s, "    {r:<22}{n:>10}");
        }
        if !self.unknown_tables.is_empty() {
            let _ = writeln!(s, "  unknown tables (no policy)");
            for (t, n) in &self.unknown_tables {
                let _ = writeln!(s, "    {t:<30}{n:>10}");
            }
        }
        if !self.dropped_columns.is_empty() {
            let _ = writeln!(s, "  fields dropped by default deny (column not named by the policy)");
            for (t, cols) in &self.dropped_columns {
                for (c, n) in cols {
                    let _ = writeln!(s, "    {:<30}{n:>10}", format!("{t}.{c}"));
                }
            }
        }
        let _ = writeln!(s, "  commits            {:>10}", self.commits);
        // The hint names a table this run wrote (not one the pipeline may not have).
        if let Some(table) = self.rows_written.iter().find(|(_, n)| **n > 0).map(|(t, _)| t) {
            let _ = writeln!(s);
            let _ = writeln!(s, "Look at the result (Python, pip install deltalake duckdb):");
            let _ = writeln!(
                s,
                "  python3 -c \"import deltalake, duckdb; t = deltalake.DeltaTable('{lake_root}/tables/{table}').to_pyarrow_dataset(); print(duckdb.sql('select * from t limit 5'))\""
            );
        }
        s
    }
}

/// Longest table or column name from the input shown as it is (in the summary, logs and
/// `/metrics` labels); longer ones are shown by their hash.
pub const MAX_SHOWN_NAME: usize = 128;

/// A table or column name read from the input, as sluice shows it everywhere (run summary,
/// logs, `/metrics` labels, the quarantine's `table`/`column`): itself when it is a plain name
/// — letters, digits, `_ . $ -`, at most [`MAX_SHOWN_NAME`] bytes — else `~` and a hash of it.
/// A name is the source's, not sluice's: one holding a quote and a newline would forge a
/// metrics sample or a log line, and a megabyte-long one would be kept in several places. The
/// first few such names are logged once each, escaped and cut short, to say which is which.
pub fn shown_name(name: &str) -> Cow<'_, str> {
    let plain = !name.is_empty()
        && name.len() <= MAX_SHOWN_NAME
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '$' | '-'));
    if plain {
        return Cow::Borrowed(name);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let shown = format!("~{}", hex::encode(&digest.as_ref()[..8]));
    static LOGGED: std::sync::Mutex<Option<std::collections::HashSet<String>>> = std::sync::Mutex::new(None);
    let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
    let logged = logged.get_or_insert_with(Default::default);
    if logged.len() < MAX_NAMES && logged.insert(shown.clone()) {
        let excerpt: String = name.chars().take(64).collect();
        tracing::warn!(
            shown = %shown,
            name = ?excerpt,
            bytes = name.len(),
            "a table or column name of the input is not a plain name: shown by its hash"
        );
    }
    Cow::Owned(shown)
}

/// Distinct names kept per counter map; past it, counts go to `(other)`. Table and column
/// names come from the source, so a drifting schema must not grow memory without bound.
const MAX_NAMES: usize = 1000;
const OTHER: &str = "(other)";

fn add_all(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        let key = if into.len() >= MAX_NAMES && !into.contains_key(&k) {
            OTHER.to_string()
        } else {
            k
        };
        *into.entry(key).or_default() += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_input_are_shown_plain_or_by_their_hash() {
        for plain in ["public.customers", "ssn", "col$1", "naïve_name", "a-b"] {
            assert_eq!(shown_name(plain), plain);
        }
        let forged = "x\"} 1\nsluice_erased_subjects 424242\n# ";
        let long = "a".repeat(1 << 20);
        for odd in [forged, long.as_str(), "", "with space", "tab\tname"] {
            let shown = shown_name(odd);
            assert!(shown.starts_with('~') && shown.len() == 17, "{shown}");
            assert_eq!(shown, shown_name(odd), "stable");
        }
        assert_ne!(shown_name(forged), shown_name("with space"));
    }

    #[test]
    fn counters_of_source_names_stay_bounded() {
        let mut total = Summary::default();
        for i in 0..(MAX_NAMES + 50) {
            let mut one = Summary::default();
            one.unknown_tables.insert(format!("t{i}"), 2);
            total.merge(one);
        }
        assert_eq!(total.unknown_tables.len(), MAX_NAMES + 1);
        assert_eq!(total.unknown_tables[OTHER], 100);
        assert_eq!(total.unknown_tables.values().sum::<u64>(), 2 * (MAX_NAMES as u64 + 50));
    }
}
