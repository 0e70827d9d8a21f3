//! What an erasure goes through: every analytic table and current-state table (per its
//! policy's erasure mode), the vault and the quarantine, each with how it recognizes the subjects' rows.

use super::*;

/// One table the job goes through.
pub(super) struct Target {
    pub(super) name: String,
    pub(super) location: TableLocation,
    pub(super) matcher: RowMatcher,
    pub(super) treatment: Treatment,
    pub(super) mode: &'static str,
}

/// What the matchers met while the job ran: subjects with rows, and quarantined events that
/// may be the subjects' but cannot be attributed (kept, listed for review).
#[derive(Default, Clone)]
pub(super) struct Sightings {
    pub(super) tokens: Arc<Mutex<BTreeSet<String>>>,
    pub(super) review: Arc<Mutex<BTreeSet<String>>>,
}

/// The analytic tables of the domain's policies, the vault and the quarantine.
pub(super) fn targets(
    config: &Config,
    keys: &KeyStore,
    domain: &str,
    id_tokens: &HashMap<String, String>,
    unattributed: Unattributed,
    sightings: &Sightings,
) -> Result<Vec<Target>, ForgetError> {
    let set: HashSet<String> = id_tokens.values().cloned().collect();
    let in_domain: Vec<&Policy> = config.policies.iter().filter(|p| p.token_domain == domain).collect();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for policy in &in_domain {
        if !seen.insert(policy.target.clone()) {
            continue;
        }
        let (treatment, mode) = match &policy.erasure {
            Erasure::Delete => (Treatment::Delete, "delete"),
            Erasure::Anonymize { .. } => {
                let mut blank = policy.linking_columns();
                blank.extend(LINKING_META_COLUMNS.iter().map(|c| c.to_string()));
                (Treatment::Blank(blank), "anonymize")
            }
        };
        // The change log, then the current table (same rows, same treatment).
        let current = crate::config::current_table_name(policy);
        let tables = config
            .table_locations(policy)
            .into_iter()
            .map(|l| (l, policy.target.as_str()))
            .chain(
                config
                    .current_locations(policy)
                    .into_iter()
                    .map(|l| (l, current.as_str())),
            );
        for (location, table) in tables {
            out.push(Target {
                name: location.label(table),
                location,
                matcher: token_matcher("_subject", set.clone(), sightings.tokens.clone()),
                treatment: treatment.clone(),
                mode,
            });
        }
    }
    out.push(Target {
        name: "vault".into(),
        location: delta_table(config.vault_path.clone()),
        matcher: token_matcher("subject_token", set, sightings.tokens.clone()),
        treatment: Treatment::Delete,
        mode: "vault",
    });
    out.push(Target {
        name: "quarantine".into(),
        location: delta_table(config.quarantine_path.clone()),
        matcher: quarantine_matcher(
            keys.system_key("quarantine")?,
            &config.policies,
            domain,
            id_tokens.clone(),
            sightings,
            unattributed == Unattributed::Delete,
        ),
        treatment: Treatment::Delete,
        mode: "quarantine",
    });
    Ok(out)
}

/// Quarantined events hold the raw event, encrypted: one whose subject ingest could read has
/// that subject's token in `_subject` (and is sealed under its key), and is deleted when the
/// token is one of the job's. The others (system key: unreadable, of a table no policy names,
/// without a subject value, or written before `_subject` existed) are decrypted and read with
/// ingest's own decoder: deleted when their table's subject column (a policy of the job's
/// domain) holds one of the ids. One that cannot be attributed — not readable, or of a table no
/// policy names — but mentions an id (as a subject column value, or as a whole word) is kept
/// and its position listed for review: deleting on a guess would lose others' events.
pub(super) fn quarantine_matcher(
    key: Arc<DataKey>,
    policies: &[Policy],
    domain: &str,
    id_tokens: HashMap<String, String>,
    sightings: &Sightings,
    delete_unattributed: bool,
) -> RowMatcher {
    let subject_of: HashMap<String, Option<String>> = policies
        .iter()
        .map(|p| (p.table.clone(), (p.token_domain == domain).then(|| p.subject.clone())))
        .collect();
    let any_subject: HashSet<String> = policies
        .iter()
        .filter(|p| p.token_domain == domain)
        .map(|p| p.subject.clone())
        .collect();
    let tokens: HashSet<String> = id_tokens.values().cloned().collect();
    let (review, found) = (sightings.review.clone(), sightings.tokens.clone());
    RowMatcher {
        columns: vec!["_subject".into(), "_position".into(), "event_enc".into()],
        matches: Box::new(move |batch: &RecordBatch| {
            let text = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or(format!("quarantine: {name} is not text"))
            };
            let (subjects, positions) = (text("_subject")?, text("_position")?);
            let events = batch
                .column_by_name("event_enc")
                .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
                .ok_or("quarantine: event_enc is not binary")?;
            let mut out = Vec::with_capacity(batch.num_rows());
            for i in 0..batch.num_rows() {
                if subjects.is_valid(i) {
                    let token = subjects.value(i);
                    let hit = tokens.contains(token);
                    if hit {
                        lock(&found).insert(token.to_string());
                    }
                    out.push(Some(hit));
                    continue;
                }
                let Ok(event) = key.open(events.value(i), &event_aad(positions.value(i))) else {
                    return Err(format!(
                        "quarantine: the event at {} does not decrypt",
                        positions.value(i)
                    ));
                };
                let hit = match event_names_subject(&event, &subject_of, &any_subject, &id_tokens) {
                    Sighting::Subject(token) => {
                        lock(&found).insert(token);
                        true
                    }
                    Sighting::Unattributed => {
                        lock(&review).insert(positions.value(i).to_string());
                        delete_unattributed
                    }
                    Sighting::None => false,
                };
                out.push(Some(hit));
            }
            Ok(BooleanArray::from(out))
        }),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sighting {
    /// The subject column of the event's table holds this subject (its token).
    Subject(String),
    /// Mentions an id, but sluice cannot tell whose event it is.
    Unattributed,
    None,
}

/// Whose a quarantined event is, read as ingest reads events (`debezium::decode`, the subject
/// column by [`debezium::Event::subject_text`], ids in [`canonical_identifier`] form).
/// `id_tokens`: canonical id → token.
pub(super) fn event_names_subject(
    event: &[u8],
    subject_of: &HashMap<String, Option<String>>,
    any_subject: &HashSet<String>,
    id_tokens: &HashMap<String, String>,
) -> Sighting {
    use sluice_connectors::debezium::{self, DecodeOptions, Decoded};
    let whose = |e: &debezium::Event<'_>, column: &str| {
        e.subject_text(column)
            .and_then(|id| id_tokens.get(canonical_identifier(&id).as_ref()).cloned())
    };
    // The decoder is ingest's: a defect that made ingest panic on this event may do so here.
    let decoded = std::panic::catch_unwind(|| match debezium::decode(event, &DecodeOptions::any_time(), &[]) {
        Ok(Decoded::Change(e)) => {
            let mut name = String::new();
            e.qualified_table(&mut name);
            let qualified = e.database.as_deref().map(|db| format!("{db}.{name}"));
            let policy = qualified
                .as_ref()
                .and_then(|q| subject_of.get(q))
                .or_else(|| subject_of.get(&name));
            Some(match policy {
                // A table of this domain: its own subject column decides.
                Some(Some(column)) => whose(&e, column).map_or(Sighting::None, Sighting::Subject),
                // Another domain's table.
                Some(None) => Sighting::None,
                // A table no policy names.
                None if any_subject.iter().any(|c| whose(&e, c).is_some()) => Sighting::Unattributed,
                None => Sighting::None,
            })
        }
        _ => None,
    });
    if let Ok(Some(sighting)) = decoded {
        return sighting;
    }
    let text = String::from_utf8_lossy(event).to_lowercase();
    if id_tokens.keys().any(|id| contains_word(&text, &id.to_lowercase())) {
        Sighting::Unattributed
    } else {
        Sighting::None
    }
}

/// `id` in `text` not touching other letters or digits.
pub(super) fn contains_word(text: &str, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    text.match_indices(id).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + id.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric()) && !after.is_some_and(|c| c.is_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantined_events_are_deleted_only_when_their_tables_subject_column_names_the_subject() {
        let subject_of: HashMap<String, Option<String>> = [
            ("public.payments".to_string(), Some("customer_id".to_string())),
            ("public.orders".to_string(), None),
        ]
        .into();
        let any: HashSet<String> = ["customer_id".to_string()].into();
        let ids: HashMap<String, String> = [
            ("900001".to_string(), "t1".to_string()),
            ("Ab-9".to_string(), "t2".to_string()),
        ]
        .into();
        let sees = |event: &[u8]| event_names_subject(event, &subject_of, &any, &ids);
        let event = |table: &str, row: &str| {
            format!(r#"{{"source":{{"schema":"public","table":"{table}"}},"op":"c","after":{row}}}"#).into_bytes()
        };
        assert_eq!(
            sees(&event("payments", r#"{"customer_id":900001,"amount":5}"#)),
            Sighting::Subject("t1".into())
        );
        assert_eq!(
            sees(&event("payments", r#"{"customer_id":900003,"id":900001}"#)),
            Sighting::None
        );
        assert_eq!(
            sees(&event("orders", r#"{"customer_id":900001}"#)),
            Sighting::None,
            "another domain's table"
        );
        assert_eq!(
            sees(&event("secrets", r#"{"customer_id":"900001"}"#)),
            Sighting::Unattributed
        );
        let wrapped = br#"{"payload":{"source":{"schema":"public","table":"payments"},"op":"d","before":{"customer_id":900001}}}"#;
        assert_eq!(sees(wrapped), Sighting::Subject("t1".into()));
        // Read as ingest reads it: a lone surrogate in another value, padding in the id, a
        // time no window accepts.
        assert_eq!(
            sees(&event("payments", r#"{"customer_id":"900001  ","note":"\ud800"}"#)),
            Sighting::Subject("t1".into())
        );
        assert_eq!(sees(b"{not json customer 900001,"), Sighting::Unattributed);
        assert_eq!(
            sees(b"{not json AB-9}"),
            Sighting::Unattributed,
            "ids match in any letter case"
        );
        assert_eq!(sees(b"{not json 19000012"), Sighting::None);
    }
}
