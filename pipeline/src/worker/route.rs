//! Where an event goes and what its values are: the table an event's name selects (and the
//! database it is bound to), the policy's expectations of each column, a value read as its
//! schema says, and whose key seals an event on its way to the quarantine.

use super::*;

/// What a policy expects of one source column's values.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Expected {
    /// Whether anything reads the value (a `drop` without `derive` does not): an unused value
    /// is neither decoded nor checked.
    used: bool,
    keep: Option<KeepType>,
    unit: Option<IntegerTime>,
    /// Read as a date or time by `keep`, `generalize` or `derive`.
    temporal: bool,
}

impl Expected {
    /// Per slot of the table's raw batch (the order of [`Policy::source_columns`]).
    pub(super) fn of_policy(policy: &Policy) -> Vec<Expected> {
        policy
            .source_columns()
            .iter()
            .map(|column| {
                let Some(rule) = policy.rules.iter().find(|r| &r.column == column) else {
                    // The subject column without a rule of its own: its value is the subject.
                    return Expected {
                        used: true,
                        ..Expected::default()
                    };
                };
                let keep = match rule.action {
                    Action::Keep(ty) => Some(ty),
                    _ => None,
                };
                let temporal = keep.is_some_and(KeepType::is_temporal)
                    || matches!(&rule.action, Action::Generalize(f) if f.is_temporal())
                    || rule.derive.iter().any(|d| d.function.is_temporal());
                Expected {
                    used: !matches!(rule.action, Action::Drop)
                        || !rule.derive.is_empty()
                        || rule.column == policy.subject,
                    keep,
                    unit: rule.unit,
                    temporal,
                }
            })
            .collect()
    }

    /// Why values of schema kind `kind` cannot be what the policy says, if they cannot.
    pub(super) fn conflict(self, kind: ValueKind) -> Option<&'static str> {
        if let (Some(unit), Some(schema_unit)) = (self.unit, kind.unit_name()) {
            if unit.name() != schema_unit {
                return Some("the policy's unit differs from the time unit the event's schema gives");
            }
        }
        match (kind, self.keep?) {
            (
                ValueKind::Decimal { .. } | ValueKind::VariableScaleDecimal,
                KeepType::Date | KeepType::Timestamp | KeepType::Bool,
            ) => Some("the policy's type does not fit a decimal column"),
            (ValueKind::Decimal { scale: Some(scale) }, KeepType::Int64) if scale > 0 => {
                Some("the policy keeps as int64 a decimal column with a scale")
            }
            (ValueKind::Decimal { scale: Some(scale) }, KeepType::Decimal { scale: kept, .. })
                if scale > kept as u32 =>
            {
                Some("the schema's decimal scale is larger than the policy's")
            }
            (k, KeepType::Int64 | KeepType::Float64 | KeepType::Bool | KeepType::Decimal { .. }) if k.is_temporal() => {
                Some("the policy's type does not fit a date or time column")
            }
            _ => None,
        }
    }
}

/// A quarantine code and its fixed text.
pub(super) type ValueReject = (&'static str, &'static str);

/// Where an event goes.
pub(super) enum Route {
    Table(usize),
    /// A table named without its database, whose events come from another database than the
    /// one it took first.
    Ambiguous,
}

impl Router {
    /// The table of an event: `db.schema.table` when a policy names the database, else
    /// `schema.table` (`db.table` for MySQL, which has no schemas); `name` is left holding the
    /// name looked up last (for counters and the quarantine).
    pub(super) fn route(&self, event: &Event<'_>, name: &mut String, bound: &mut [Option<Arc<str>>]) -> Option<Route> {
        let (t, named_with_database) = self.table_of(event, name)?;
        let database = event.database.as_deref().filter(|_| event.has_schema);
        if named_with_database {
            return Some(Route::Table(t));
        }
        if let Some(db) = database {
            // The shared binding is asked once per table and chunk, not once per event.
            let first = bound[t].get_or_insert_with(|| {
                let mut shared = self.databases.lock().unwrap_or_else(|p| p.into_inner());
                shared.entry(t).or_insert_with(|| Arc::from(db)).clone()
            });
            if first.as_ref() != db {
                return Some(Route::Ambiguous);
            }
        }
        Some(Route::Table(t))
    }

    /// The policy table an event's table name selects, and whether the policy names its
    /// database; no database is bound to a table here (see [`Router::route`]).
    pub(super) fn table_of(&self, event: &Event<'_>, name: &mut String) -> Option<(usize, bool)> {
        event.qualified_table(name);
        // A schema apart from the database (PostgreSQL, SQL Server): `db.schema.table` first.
        let database = event.database.as_deref().filter(|_| event.has_schema);
        if let (true, Some(db)) = (self.qualified_policies, database) {
            let short_len = name.len();
            name.insert(0, '.');
            name.insert_str(0, db);
            if let Some(&t) = self.tables.get(name.as_str()) {
                return Some((t, true));
            }
            name.drain(..name.len() - short_len);
        }
        self.tables.get(name.as_str()).map(|&t| (t, false))
    }

    /// How an event of table `t` about to be quarantined is sealed: its subject read as ingest
    /// reads it, then dropped if erased or sealed under the subject's key.
    pub(super) fn sealing(&self, t: usize, event: &Event<'_>, position: &str) -> Result<Sealing, WorkError> {
        let transform = &self.transforms[t];
        match event
            .subject_text(&transform.policy().subject)
            .and_then(|id| transform.subject_token(&id))
        {
            Some(token) => self.sealing_of(token, event.event_ms, t, position),
            None => Ok(Sealing::Unknown),
        }
    }

    /// `event_ms`: the event's source time (0 when it has none: as old as can be).
    pub(super) fn sealing_of(
        &self,
        token: Token,
        event_ms: i64,
        t: usize,
        position: &str,
    ) -> Result<Sealing, WorkError> {
        let failed = |source: KeyError| WorkError::Transform {
            table: self.transforms[t].policy().table.clone(),
            position: position.to_string(),
            source: TransformError::Keys(source),
        };
        let cutoff = self.keys.erased_subjects(&[token.as_str()]).map_err(failed)?[0];
        if dropped_by_erasure(cutoff, event_ms) {
            return Ok(Sealing::Erased);
        }
        // No key: erased since the last tombstone refresh.
        Ok(
            match self
                .keys
                .subject_keys(&[token.as_str()])
                .map_err(failed)?
                .pop()
                .flatten()
            {
                Some(key) => Sealing::Subject(token, key),
                None => Sealing::Erased,
            },
        )
    }

    /// Binds tables named without a database to the one their lake table already holds rows of.
    pub fn bind_databases(&self, known: impl IntoIterator<Item = (usize, String)>) {
        let mut bound = self.databases.lock().unwrap_or_else(|p| p.into_inner());
        for (t, db) in known {
            bound.insert(t, Arc::from(db.as_str()));
        }
    }

    /// Whether a value is Debezium's unavailable-value placeholder: the text itself, its
    /// base64 (binary columns), or an array or map holding it (PostgreSQL arrays, hstore).
    pub(super) fn is_placeholder(&self, raw: &serde_json::value::RawValue) -> bool {
        let json = raw.get();
        match json.as_bytes().first() {
            Some(b'[' | b'{') => self.placeholders.iter().any(|p| json.contains(p.as_str())),
            _ => self.placeholders.iter().any(|p| p == json),
        }
    }

    /// The text of one value the policy names, read as its schema says (`kind`), or why the
    /// event cannot be taken.
    pub(super) fn column_value<'a>(
        &self,
        event: &Event<'a>,
        column: &str,
        raw: &'a serde_json::value::RawValue,
        kind: ValueKind,
        expected: &Expected,
    ) -> Result<Option<Cow<'a, str>>, ValueReject> {
        if !expected.used {
            return Ok(None);
        }
        let mut raw = raw;
        if self.is_placeholder(raw) {
            // Debezium left an unchanged value out (a TOAST column): the before image may hold it.
            raw = event
                .previous
                .as_ref()
                .and_then(|before| before.get(column))
                .filter(|old| !self.is_placeholder(old))
                .ok_or((
                    "unavailable_value",
                    "Debezium sent its unavailable-value placeholder (an unchanged TOAST value) and no before image holds the value",
                ))?;
        }
        if kind != ValueKind::Plain {
            if let Some(reason) = expected.conflict(kind) {
                return Err(("schema_mismatch", reason));
            }
            let mut text = String::new();
            return match canonical_text(kind, raw, &mut text) {
                Ok(true) => Ok(Some(Cow::Owned(text))),
                Ok(false) => Ok(None),
                Err(reason) => Err(("type_mismatch", reason)),
            };
        }
        let text = value_text(raw)
            .map_err(|_| ("malformed_json", "a column value is not valid JSON"))?
            .map(Sensitive::into_inner);
        // An integer date is an epoch only when it is a JSON number: a digit string (a card
        // number in a date column, `20240701`) is not a date.
        if expected.temporal && raw.get().starts_with('"') {
            if let Some(t) = &text {
                let digits = t.trim().strip_prefix('-').unwrap_or(t.trim());
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(("type_mismatch", "a digit string is not a date or time"));
                }
            }
        }
        Ok(text)
    }
}

/// Whose key seals a quarantined event.
pub(super) enum Sealing {
    /// An erased subject's: the event is dropped, not quarantined.
    Erased,
    Subject(Token, Arc<DataKey>),
    /// No readable subject: the quarantine's system key.
    Unknown,
}

impl Sealing {
    pub(super) fn seal(&self) -> Seal<'_> {
        match self {
            Sealing::Subject(token, key) => Some((token.as_str(), key)),
            _ => None,
        }
    }
}
