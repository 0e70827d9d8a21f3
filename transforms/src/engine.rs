//! Applies a policy to a table's raw batch, column by column.

use rustc_hash::FxHashMap;
use std::sync::Arc;

use arrow_array::builder::{Date32Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use arrow_select::filter::filter_record_batch;

use crate::actions::{self, timestamp_type, Action};
use crate::crypto::{canonical_identifier, CryptoError, DataKey, DomainTokenizer, Token, Tokenizer};
use crate::functions::{is_present, Function, RowError};
use crate::keys::{dropped_by_erasure, KeyError, KeyProvider, ERASED_FOR_GOOD};
use crate::policy::{ColumnRule, Policy};
use crate::raw::{Op, RawBatch};
use crate::vault::VaultRowsBuilder;

/// Metadata columns every analytic table carries after its data columns.
pub const META_COLUMNS: &[&str] = &[
    "_op",
    "_subject",
    "_source_ts",
    "_position",
    "_ingested_at",
    "_date",
    "_source_db",
];
/// Metadata columns that link a row to a person (blanked by an anonymizing erasure).
pub const LINKING_META_COLUMNS: &[&str] = &["_subject", "_position"];
/// The only columns of an analytic table that get per-file statistics (minimum, maximum) in
/// the Delta log or Iceberg manifests. The rule (schemas/README.md): statistics only where a
/// value cannot single a person out. A file may hold one row (a quiet table, a commit per
/// transaction), and then its minimum and maximum *are* the row: so no data column (tokens,
/// ciphertexts, kept or generalized values, derived flags are all a person's profile), no
/// subject in any form, no exact source time. What is left says what sluice did, not who:
/// the operation, when sluice wrote the batch (the commit's own time) and the source database.
pub const STATS_COLUMNS: &[&str] = &["_op", "_ingested_at", "_source_db"];
/// The date partition column.
pub const PARTITION_COLUMN: &str = "_date";

#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("encryption failed: {0}")]
    Crypto(#[from] CryptoError),
    #[error("building the output batch failed: {0}")]
    Arrow(#[from] ArrowError),
}

/// A row that could not be sanitized. The reason never contains the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowReject {
    pub row: usize,
    pub column: String,
    /// Stable code: `type_mismatch` (a value does not fit) or `missing_subject`.
    pub code: &'static str,
    /// Fixed human text, e.g. "not a date".
    pub reason: &'static str,
    /// The row's subject token, when it has one: the quarantine seals the event under the
    /// subject's key, so an erasure shreds it too.
    pub subject: Option<Token>,
}

pub struct Transformed {
    /// The analytic rows (rejected rows removed).
    pub table: RecordBatch,
    /// Vault rows of the kept rows, if any.
    pub vault: Option<RecordBatch>,
    /// One entry per rejected row, in row order.
    pub rejects: Vec<RowReject>,
    /// Rows of erased subjects: dropped, neither written nor quarantined.
    pub erased_rows: usize,
}

/// What actions see of each row besides the column itself.
pub struct RowContext<'a> {
    pub target: &'a str,
    pub ops: &'a [crate::raw::Op],
    subjects: &'a [Option<Token>],
    keys: &'a [Option<Arc<DataKey>>],
}

impl RowContext<'_> {
    /// The row's data key and subject token, when the row has a subject.
    pub fn key(&self, row: usize) -> Option<(&DataKey, &str)> {
        match (&self.keys[row], &self.subjects[row]) {
            (Some(k), Some(s)) => Some((k.as_ref(), s.as_str())),
            _ => None,
        }
    }
}

struct CompiledRule {
    rule: ColumnRule,
    /// Index of the rule's column in the raw batch.
    input: usize,
    tokenizer: Option<DomainTokenizer>,
    /// The subject column tokenized in the subject's domain: the subject tokens already are it.
    is_subject_token: bool,
}

/// A policy compiled for one table: output schema fixed, tokenizers keyed.
pub struct TableTransform {
    policy: Policy,
    schema: SchemaRef,
    subject_input: usize,
    subject_tokenizer: DomainTokenizer,
    rules: Vec<CompiledRule>,
}

impl TableTransform {
    pub fn new(policy: Policy, tokenizer: &Tokenizer) -> Self {
        let sources = policy.source_columns();
        let input_of = |c: &str| {
            sources
                .iter()
                .position(|s| s == c)
                .expect("source columns cover every rule")
        };
        let rules = policy
            .rules
            .iter()
            .map(|r| CompiledRule {
                rule: r.clone(),
                input: input_of(&r.column),
                tokenizer: match &r.action {
                    Action::Tokenize { domain } => Some(tokenizer.domain(domain)),
                    _ => None,
                },
                is_subject_token: r.column == policy.subject
                    && matches!(&r.action, Action::Tokenize { domain } if *domain == policy.token_domain),
            })
            .collect();
        let mut fields: Vec<Field> = policy
            .output_columns()
            .into_iter()
            .map(|c| Field::new(c.name, c.data_type, true))
            .collect();
        fields.extend([
            Field::new("_op", DataType::Utf8, false),
            Field::new("_subject", DataType::Utf8, false),
            Field::new("_source_ts", timestamp_type(), false),
            Field::new("_position", DataType::Utf8, false),
            Field::new("_ingested_at", timestamp_type(), false),
            Field::new(PARTITION_COLUMN, DataType::Date32, false),
            // Last and nullable: tables written before it gain it as a new column.
            Field::new("_source_db", DataType::Utf8, true),
        ]);
        Self {
            subject_input: input_of(&policy.subject),
            subject_tokenizer: tokenizer.domain(&policy.token_domain),
            schema: Arc::new(Schema::new(fields)),
            rules,
            policy,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The subject token of a subject id as ingest reads it; `None` for a blank one.
    pub fn subject_token(&self, id: &str) -> Option<Token> {
        (!canonical_identifier(id).is_empty()).then(|| self.subject_tokenizer.token(id))
    }

    /// Schema of the analytic table: data columns, then [`META_COLUMNS`].
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Columns whose per-file minimum and maximum may be kept in the table's log (Delta) or
    /// manifests (Iceberg): [`STATS_COLUMNS`] only. See there for the rule.
    pub fn stats_columns(&self) -> Vec<String> {
        STATS_COLUMNS
            .iter()
            .filter(|c| self.schema.field_with_name(c).is_ok())
            .map(|c| c.to_string())
            .collect()
    }

    pub fn apply(
        &self,
        raw: &RawBatch,
        keys: &dyn KeyProvider,
        ingested_at_us: i64,
    ) -> Result<Transformed, TransformError> {
        let mut rejects = Vec::new();
        let subjects: Vec<Option<Token>> = raw.columns[self.subject_input]
            .iter()
            .map(|v| v.and_then(|s| self.subject_token(s)))
            .collect();
        for (row, s) in subjects.iter().enumerate() {
            if s.is_none() && raw.ops[row] != Op::Truncate {
                rejects.push(RowReject {
                    row,
                    column: self.policy.subject.clone(),
                    code: "missing_subject",
                    reason: "subject column is null, blank or missing",
                    subject: None,
                });
            }
        }
        let (row_keys, erased) = self.row_keys(raw, keys, &subjects)?;
        let ctx = RowContext {
            target: &self.policy.target,
            ops: &raw.ops,
            subjects: &subjects,
            keys: &row_keys,
        };
        let (mut columns, vault) = self.apply_rules(raw, &ctx, &mut rejects)?;
        columns.extend(meta_columns(raw, &subjects, ingested_at_us));
        let table = RecordBatch::try_new(self.schema.clone(), columns)?;

        // An erased subject's rows go nowhere (not even the quarantine); a value error in one
        // of them is not reported either.
        rejects.retain(|r| !erased[r.row]);
        rejects.sort_by_key(|r| r.row);
        rejects.dedup_by_key(|r| r.row);
        let mut dropped = erased;
        for r in &rejects {
            dropped[r.row] = true;
        }
        let erased_rows = dropped.iter().filter(|d| **d).count() - rejects.len();
        let vault = vault.finish(raw, &dropped, ingested_at_us)?;
        let table = if dropped.iter().any(|d| *d) {
            let keep: BooleanArray = dropped.iter().map(|d| Some(!d)).collect();
            filter_record_batch(&table, &keep)?
        } else {
            table
        };
        Ok(Transformed {
            table,
            vault,
            rejects,
            erased_rows,
        })
    }

    /// Each row's data key (when the policy needs keys) and whether its subject is erased for
    /// the row's event time; one key-store look-up per distinct subject.
    #[allow(clippy::type_complexity)]
    fn row_keys(
        &self,
        raw: &RawBatch,
        keys: &dyn KeyProvider,
        subjects: &[Option<Token>],
    ) -> Result<(Vec<Option<Arc<DataKey>>>, Vec<bool>), TransformError> {
        let n = raw.len();
        let (distinct, slot_of) = distinct_subjects(subjects);
        let erased_subject = keys.erased_subjects(&distinct)?;
        let mut row_keys = vec![None; n];
        if self.policy.needs_keys() {
            // Erased subjects are not looked up: a miss would cost a key-store transaction.
            let for_good = |cutoff: &Option<i64>| *cutoff == Some(ERASED_FOR_GOOD);
            let live: Vec<&str> = distinct
                .iter()
                .zip(&erased_subject)
                .filter(|(_, cutoff)| !for_good(cutoff))
                .map(|(t, _)| *t)
                .collect();
            let mut resolved = keys.subject_keys(&live)?.into_iter();
            let key_of: Vec<Option<Arc<DataKey>>> = erased_subject
                .iter()
                .map(|cutoff| {
                    if for_good(cutoff) {
                        None
                    } else {
                        resolved.next().flatten()
                    }
                })
                .collect();
            for (row, slot) in slot_of.iter().enumerate() {
                if let Some(slot) = slot {
                    row_keys[row] = key_of[*slot].clone();
                }
            }
        }
        // A subject erased since the last tombstone refresh has no key any more: as erased.
        let erased: Vec<bool> = slot_of
            .iter()
            .zip(&row_keys)
            .enumerate()
            .map(|(row, (slot, key))| match slot {
                Some(slot) => {
                    dropped_by_erasure(erased_subject[*slot], raw.event_ms.value(row))
                        || (self.policy.needs_keys() && key.is_none())
                }
                None => false,
            })
            .collect();
        Ok((row_keys, erased))
    }

    /// Every rule's output columns (in schema order, before the metadata columns) and the
    /// vault's rows; values that do not fit become rejects.
    fn apply_rules(
        &self,
        raw: &RawBatch,
        ctx: &RowContext<'_>,
        rejects: &mut Vec<RowReject>,
    ) -> Result<(Vec<ArrayRef>, VaultRowsBuilder), TransformError> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        let mut vault = VaultRowsBuilder::default();
        let mut errors: Vec<RowError> = Vec::new();
        for compiled in &self.rules {
            let input = &raw.columns[compiled.input];
            let column = compiled.rule.column.as_str();
            match &compiled.rule.action {
                Action::Keep(ty) => columns.push(actions::keep::apply(*ty, input, compiled.rule.unit, &mut errors)),
                Action::Drop => {}
                Action::Tokenize { .. } if compiled.is_subject_token => {
                    columns.push(actions::tokenize::from_tokens(ctx.subjects))
                }
                Action::Tokenize { .. } => columns.push(actions::tokenize::apply(
                    compiled.tokenizer.as_ref().expect("compiled"),
                    input,
                )),
                Action::Encrypt => columns.push(actions::encrypt::apply(ctx, column, input)?),
                Action::Vault => actions::vault::apply(ctx, column, input, &mut vault)?,
                Action::Generalize(f) => columns.push(actions::generalize::apply(
                    f,
                    input,
                    &raw.event_ms,
                    compiled.rule.unit,
                    &mut errors,
                )),
            }
            for d in &compiled.rule.derive {
                columns.push(match d.function {
                    // Presence the event does not tell (a key-only delete image) is unknown.
                    Function::IsPresent => is_present(input, |row| raw.unknown(compiled.input, row)),
                    _ => d.function.apply(input, &raw.event_ms, compiled.rule.unit, &mut errors),
                });
            }
            rejects.extend(errors.drain(..).map(|(row, reason)| RowReject {
                row,
                column: column.to_string(),
                code: "type_mismatch",
                reason,
                subject: ctx.subjects[row],
            }));
        }
        Ok((columns, vault))
    }
}

/// The distinct subject tokens of a batch (one key lookup each), and each row's index into them.
fn distinct_subjects(subjects: &[Option<Token>]) -> (Vec<&str>, Vec<Option<usize>>) {
    let mut slot: FxHashMap<&str, usize> = FxHashMap::default();
    let mut distinct: Vec<&str> = Vec::new();
    let slots = subjects
        .iter()
        .map(|s| {
            s.as_ref().map(|t| {
                *slot.entry(t.as_str()).or_insert_with(|| {
                    distinct.push(t.as_str());
                    distinct.len() - 1
                })
            })
        })
        .collect();
    (distinct, slots)
}

fn meta_columns(raw: &RawBatch, subjects: &[Option<Token>], ingested_at_us: i64) -> Vec<ArrayRef> {
    let n = raw.len();
    let mut op = StringBuilder::with_capacity(n, n);
    let mut subject = StringBuilder::with_capacity(n, n * 32);
    let mut source_ts = TimestampMicrosecondBuilder::with_capacity(n);
    let mut ingested = TimestampMicrosecondBuilder::with_capacity(n);
    let mut date = Date32Builder::with_capacity(n);
    for (i, (row_op, row_subject)) in raw.ops.iter().zip(subjects).enumerate() {
        op.append_value(row_op.code());
        // Rows without a subject are rejected and filtered out, except truncates, which have none.
        subject.append_value(row_subject.as_ref().map(Token::as_str).unwrap_or(""));
        let ms = raw.event_ms.value(i);
        source_ts.append_value(ms.saturating_mul(1000));
        ingested.append_value(ingested_at_us);
        date.append_value(ms.div_euclid(86_400_000) as i32);
    }
    let positions: StringArray = raw.positions.clone();
    vec![
        Arc::new(op.finish()),
        Arc::new(subject.finish()),
        Arc::new(source_ts.finish().with_timezone("UTC")),
        Arc::new(positions),
        Arc::new(ingested.finish().with_timezone("UTC")),
        Arc::new(date.finish()),
        Arc::new(raw.databases.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{field_aad, KEY_ID_LEN};
    use crate::raw::{Op, RawBatchBuilder};
    use arrow_array::{Array, BinaryArray};
    use std::borrow::Cow;
    use std::path::Path;
    use std::sync::Mutex;

    /// Keys derived from the subject token, for tests only.
    /// `tombstoned`: erased per the tombstones; `keyless`: erased after the last tombstone
    /// refresh (the store has no key any more).
    #[derive(Default)]
    struct TestKeys(Mutex<usize>, Vec<String>, Vec<String>);
    impl KeyProvider for TestKeys {
        fn subject_keys(&self, tokens: &[&str]) -> Result<Vec<Option<Arc<DataKey>>>, KeyError> {
            *self.0.lock().unwrap() += 1;
            Ok(tokens
                .iter()
                .map(|t| (!self.2.iter().any(|k| k == t)).then(|| Arc::new(test_key(t))))
                .collect())
        }
        fn erased_subjects(&self, tokens: &[&str]) -> Result<Vec<Option<i64>>, KeyError> {
            Ok(tokens
                .iter()
                .map(|t| self.1.iter().any(|e| e == t).then_some(ERASED_FOR_GOOD))
                .collect())
        }
    }
    fn test_key(token: &str) -> DataKey {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&token.as_bytes()[..KEY_ID_LEN]);
        DataKey::new(id, &token.as_bytes()[..32]).unwrap()
    }

    const POLICY: &str = include_str!("../../fixtures/test-policies/customers-engine.toml");

    fn transform() -> TableTransform {
        TableTransform::new(
            Policy::from_toml(Path::new("t.toml"), POLICY).unwrap(),
            &Tokenizer::new(&[5; 32]),
        )
    }

    fn raw(rows: &[[Option<&str>; 5]]) -> RawBatch {
        let mut b = RawBatchBuilder::new(5);
        for (i, r) in rows.iter().enumerate() {
            let mut values: Vec<Option<Cow<str>>> = r.iter().map(|v| v.map(Cow::Borrowed)).collect();
            let present: Vec<bool> = r.iter().map(Option::is_some).collect();
            b.push(
                if i == 2 { Op::Delete } else { Op::Create },
                1_700_000_000_000,
                &format!("f:{i}"),
                Some("crm"),
                &mut values,
                &present,
            );
        }
        b.finish()
    }

    #[test]
    fn sanitizes_rejects_and_vaults() {
        let t = transform();
        // columns in source order: id, email, national_id, balance, notes
        let raw = raw(&[
            [
                Some("1"),
                Some("a@x.test"),
                Some("111-22-3333"),
                Some("10"),
                Some("secret note"),
            ],
            [Some("2"), None, Some("222-33-4444"), Some("ten"), None],
            [Some("3"), Some("c@x.test"), None, Some("30"), None],
            [None, Some("d@x.test"), None, Some("40"), None],
        ]);
        let keys = TestKeys::default();
        let out = t.apply(&raw, &keys, 0).unwrap();
        assert_eq!(*keys.0.lock().unwrap(), 1, "one key lookup per batch");
        assert_eq!(
            out.rejects
                .iter()
                .map(|r| (r.row, r.column.as_str(), r.code))
                .collect::<Vec<_>>(),
            vec![(1, "balance", "type_mismatch"), (3, "id", "missing_subject")]
        );
        assert_eq!(out.table.num_rows(), 2);
        let schema = out.table.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            &names[..5],
            &["id_token", "has_email", "national_id_enc", "balance", "_op"]
        );
        // vault: row 0 only (row 1 rejected, row 2 is a delete, row 3 rejected)
        let vault = out.vault.unwrap();
        assert_eq!(vault.num_rows(), 1);
        let subject = t.subject_tokenizer.token("1");
        let subject = subject.as_str();
        let ct = vault.column(3).as_any().downcast_ref::<BinaryArray>().unwrap().value(0);
        assert_eq!(
            test_key(subject)
                .open(ct, &field_aad("customers", "email", subject))
                .unwrap(),
            b"a@x.test"
        );
        // the encrypted column opens only in its own place
        let enc = out.table.column(2).as_any().downcast_ref::<BinaryArray>().unwrap();
        let k = test_key(subject);
        assert_eq!(
            k.open(enc.value(0), &field_aad("customers", "national_id", subject))
                .unwrap(),
            b"111-22-3333"
        );
        assert!(k.open(enc.value(0), &field_aad("customers", "email", subject)).is_err());
        assert!(enc.is_null(1), "row 2 had no national id");
    }

    #[test]
    fn rows_of_erased_subjects_go_nowhere() {
        let t = transform();
        let token = |id: &str| t.subject_tokenizer.token(id).as_str().to_string();
        let raw = raw(&[
            [Some("1"), Some("a@x.test"), Some("111"), Some("bad"), None],
            [Some("2"), Some("b@x.test"), Some("222"), Some("20"), None],
            [Some("3"), Some("c@x.test"), None, Some("30"), None],
            [Some("4"), Some("d@x.test"), Some("444"), Some("40"), None],
        ]);
        let keys = TestKeys(Mutex::new(0), vec![token("1")], vec![token("4")]);
        let out = t.apply(&raw, &keys, 0).unwrap();
        assert_eq!(out.erased_rows, 2, "tombstoned and keyless subjects");
        assert!(out.rejects.is_empty(), "an erased row's bad value is not quarantined");
        let subjects = out.table.column_by_name("_subject").unwrap();
        let subjects = subjects.as_any().downcast_ref::<StringArray>().unwrap();
        let kept: Vec<&str> = subjects.iter().flatten().collect();
        assert_eq!(kept, vec![token("2"), token("3")]);
        let vault = out.vault.unwrap();
        let vault_subjects = vault.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(vault_subjects.iter().flatten().collect::<Vec<_>>(), vec![token("2")]);
    }
}
