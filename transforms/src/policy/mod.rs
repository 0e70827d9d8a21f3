//! Policy files: one per source table, an allow-list of columns and what to do with each.
//! The format is documented in `schemas/README.md`.

use std::collections::HashSet;
use std::path::Path;

use arrow_schema::DataType;
use serde::Deserialize;
use toml::Spanned;

use crate::actions::{Action, KeepType};
use crate::config_error::ConfigError;
use crate::functions::{Function, IntegerTime};

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Source `schema.table` (or `db.table` where the source has no schemas).
    pub table: String,
    /// Name of the analytic table written.
    pub target: String,
    /// Source column identifying the data subject.
    pub subject: String,
    /// Token domain of the subject (and default domain of `tokenize`).
    pub token_domain: String,
    pub rules: Vec<ColumnRule>,
    /// What a right-to-be-forgotten job does to this table's rows of an erased subject.
    pub erasure: Erasure,
    /// The source columns that identify a row (`key = [...]`): each one the subject or a column
    /// the policy tokenizes or keeps, so equal rows give equal output values.
    pub key: Vec<String>,
    /// Whether a current-state table (`<target>_current`, one row per live key) is kept beside
    /// the change log.
    pub current: bool,
    /// Rows whose source time is older than this many days are removed by `sluice retain`.
    pub retention_days: Option<u32>,
}

/// What erasure does to a subject's rows in an analytic table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Erasure {
    /// The rows are deleted (and the files that held them removed).
    #[default]
    Delete,
    /// The rows stay for statistics, unlinked: every `tokenize` and `encrypt` column, `_subject`
    /// and `_position` are blanked, and so are the listed output columns (quasi-identifiers).
    Anonymize { also_blank: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct ColumnRule {
    pub column: String,
    pub action: Action,
    /// Output column name chosen with `as`, if any.
    pub rename: Option<String>,
    pub derive: Vec<Derived>,
    /// How integer dates and times in this column are encoded (`unit = "days"|"ms"|"us"|"ns"`);
    /// `None`: told apart by magnitude.
    pub unit: Option<IntegerTime>,
    /// What the source column holds (see [`CLASSES`]), and free tags: written where catalogs
    /// read them.
    pub class: Option<String>,
    pub tags: Vec<String>,
    /// Why a `direct_identifier` or `special_category` column is kept in plain (required then).
    pub allow_plain: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Derived {
    pub name: String,
    pub function: Function,
    /// A derived column's own class and tags: it does not inherit its source's (`has_email` is
    /// not a direct identifier).
    pub class: Option<String>,
    pub tags: Vec<String>,
}

/// One column of the analytic table and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputColumn {
    pub name: String,
    pub data_type: DataType,
    pub source: String,
    /// Human description: "tokenize (domain customer)", "derive is_present", …
    pub how: String,
    /// The policy's action (`keep`, `tokenize`, …, `derive`).
    pub action: &'static str,
    pub class: Option<String>,
    pub tags: Vec<String>,
}

/// The documented classes (extensible with `[governance] classes` in the pipeline config), and
/// what each means.
pub const CLASSES: &[(&str, &str)] = &[
    (
        "direct_identifier",
        "identifies a person on its own (name, email, phone, national id, account number)",
    ),
    (
        "quasi_identifier",
        "identifies a person combined with others (birth date, postcode, gender, employer)",
    ),
    (
        "special_category",
        "GDPR Art. 9 data: health, ethnicity, religion, sexuality, biometrics, union membership",
    ),
    ("financial", "balances, amounts, income, payment behaviour"),
    (
        "operational",
        "status codes, counters, timestamps: no personal meaning on its own",
    ),
];

/// Classes a policy may not `keep` in plain without saying why (`allow_plain`).
pub const RESTRICTED_CLASSES: &[&str] = &["direct_identifier", "special_category"];

impl ColumnRule {
    pub fn output_name(&self) -> Option<String> {
        self.action.output_name(&self.column, self.rename.as_deref())
    }
}

impl Policy {
    /// Parses and validates a policy. `file` is used in error messages only.
    pub fn from_toml(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| ConfigError::from_toml(file, text, &e))?;
        let err = |span: std::ops::Range<usize>, field: &str, message: String| {
            ConfigError::new(file, text, span.start, field, message)
        };
        for (field, value) in [
            ("table", &raw.table),
            ("target", &raw.target),
            ("subject", &raw.subject),
            ("token_domain", &raw.token_domain),
        ] {
            if value.get_ref().trim().is_empty() {
                return Err(err(value.span(), field, "must not be empty".into()));
            }
        }
        if !is_identifier(raw.target.get_ref()) {
            return Err(err(
                raw.target.span(),
                "target",
                "must be letters, digits and _ (it names a table directory)".into(),
            ));
        }
        let mut rules = Vec::with_capacity(raw.columns.len());
        for (column, spec) in raw.columns {
            rules.push(column_rule(column, spec, &raw.subject, &raw.token_domain, &err)?);
        }
        let mut policy = Policy {
            table: raw.table.into_inner(),
            target: raw.target.into_inner(),
            subject: raw.subject.into_inner(),
            token_domain: raw.token_domain.into_inner(),
            rules,
            erasure: Erasure::Delete,
            key: Vec::new(),
            current: raw.current.as_ref().is_some_and(|c| *c.get_ref()),
            retention_days: match &raw.retention_days {
                None => None,
                Some(days) if (1..=MAX_RETENTION_DAYS).contains(days.get_ref()) => Some(*days.get_ref()),
                Some(days) => {
                    return Err(err(
                        days.span(),
                        "retention_days",
                        format!("must be 1 to {MAX_RETENTION_DAYS} (days a row is kept after its source time)"),
                    ))
                }
            },
        };
        let outputs = policy.checked_output_names(file, text)?;
        if let Some(erasure) = raw.erasure {
            policy.erasure = erasure_mode(erasure.into_inner(), &outputs, &err)?;
        }
        policy.key = row_key(&policy, raw.key.as_ref(), &err)?;
        if let (Some(current), None) = (raw.current.as_ref().filter(|c| *c.get_ref()), &raw.key) {
            // Guessing (the subject) would keep one row per person of a table keyed otherwise.
            return Err(err(
                current.span(),
                "current",
                "a current table needs `key`: the columns that identify a source row (e.g. key = [\"id\"]; the subject's column if it is the row's key)".into(),
            ));
        }
        Ok(policy)
    }

    /// The output column names: unique, and none taking the `_` prefix of metadata columns.
    fn checked_output_names(&self, file: &Path, text: &str) -> Result<HashSet<String>, ConfigError> {
        let policy = self;
        // Output names must be unique and must not take the `_` prefix of metadata columns.
        let mut seen = HashSet::new();
        for out in policy.output_columns() {
            if out.name.starts_with('_') {
                return Err(ConfigError::new(
                    file,
                    text,
                    find(text, &out.name),
                    &out.name,
                    "output names starting with `_` are reserved for metadata columns",
                ));
            }
            if !seen.insert(out.name.clone()) {
                return Err(ConfigError::new(
                    file,
                    text,
                    find(text, &out.name),
                    &out.name,
                    "two rules write an output column of this name",
                ));
            }
        }
        Ok(seen)
    }

    /// Output columns erasure blanks in `anonymize` mode: those that link a row to a person
    /// (tokens, ciphertexts) and the listed quasi-identifiers.
    pub fn linking_columns(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rules
            .iter()
            .filter(|r| matches!(r.action, Action::Tokenize { .. } | Action::Encrypt))
            .filter_map(|r| r.output_name())
            .collect();
        if let Erasure::Anonymize { also_blank } = &self.erasure {
            out.extend(also_blank.iter().cloned());
        }
        out
    }

    /// The current table's key as output columns: the subject is `_subject` (its token, in
    /// every table whatever its rule), any other key column its output.
    pub fn key_output_columns(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|column| {
                (column != &self.subject)
                    .then(|| self.rules.iter().find(|r| &r.column == column))
                    .flatten()
                    .and_then(ColumnRule::output_name)
                    .unwrap_or_else(|| "_subject".to_string())
            })
            .collect()
    }

    /// Columns read from events: every column a rule names, and the subject.
    pub fn source_columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = self.rules.iter().map(|r| r.column.clone()).collect();
        if !cols.contains(&self.subject) {
            cols.push(self.subject.clone());
        }
        cols
    }

    pub fn needs_keys(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.action, Action::Encrypt | Action::Vault))
    }

    /// The analytic table's data columns, in order (metadata columns follow them).
    pub fn output_columns(&self) -> Vec<OutputColumn> {
        let mut out = Vec::new();
        for rule in &self.rules {
            if let (Some(name), Some(data_type)) = (rule.output_name(), rule.action.output_type()) {
                out.push(OutputColumn {
                    name,
                    data_type,
                    source: rule.column.clone(),
                    how: rule.action.describe(),
                    action: rule.action.name(),
                    class: rule.class.clone(),
                    tags: rule.tags.clone(),
                });
            }
            for d in &rule.derive {
                out.push(OutputColumn {
                    name: d.name.clone(),
                    data_type: d.function.output_type(),
                    source: rule.column.clone(),
                    how: format!("derive {}", d.function.name()),
                    action: "derive",
                    class: d.class.clone(),
                    tags: d.tags.clone(),
                });
            }
        }
        out
    }
}

/// Metadata columns an anonymizing erasure may also blank: exact times can re-link a kept row
/// to its person through other records (a visit's minute). They cannot be null: they keep
/// their day.
pub const BLANKABLE_META_COLUMNS: &[&str] = &["_source_ts", "_ingested_at"];

/// The longest `prefix` a policy may keep: enough for a postcode's outward code, a phone's area
/// code or an IBAN's country and bank; longer ones keep most of an identifier.
pub const MAX_PREFIX: usize = 8;

fn find(text: &str, needle: &str) -> usize {
    text.find(needle).unwrap_or(0)
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

type FieldError = (Option<std::ops::Range<usize>>, (&'static str, String));

fn parse_action(spec: &RawColumn, default_domain: &str) -> Result<Action, FieldError> {
    let at = Some(spec.action.span());
    let action = match spec.action.get_ref().as_str() {
        "keep" => {
            let ty = spec.ty.as_ref().ok_or((
                at.clone(),
                (
                    "type",
                    format!("`keep` needs a type: one of {}", KeepType::NAMES.join(", ")),
                ),
            ))?;
            let kt = KeepType::parse(ty.get_ref()).ok_or((
                Some(ty.span()),
                (
                    "type",
                    format!("unknown type `{}`: one of {}", ty.get_ref(), KeepType::NAMES.join(", ")),
                ),
            ))?;
            Action::Keep(kt)
        }
        "drop" => Action::Drop,
        "tokenize" => Action::Tokenize {
            domain: spec
                .domain
                .as_ref()
                .map(|d| d.get_ref().clone())
                .unwrap_or_else(|| default_domain.to_string()),
        },
        "encrypt" => Action::Encrypt,
        "vault" => Action::Vault,
        "generalize" => {
            let params = spec.params();
            let f = params.func.ok_or((
                at.clone(),
                (
                    "fn",
                    format!("`generalize` needs fn: one of {}", Function::NAMES.join(", ")),
                ),
            ))?;
            let function = parse_function(f, &params).map_err(|m| (Some(f.span()), ("fn", m)))?;
            if function == Function::IsPresent {
                return Err((
                    Some(f.span()),
                    (
                        "fn",
                        "`is_present` is for derive; generalize would lose the column".into(),
                    ),
                ));
            }
            Action::Generalize(function)
        }
        other => {
            return Err((
                at,
                (
                    "action",
                    format!("unknown action `{other}`: one of {}", Action::NAMES.join(", ")),
                ),
            ));
        }
    };
    if spec.domain.is_some() && !matches!(action, Action::Tokenize { .. }) {
        return Err((
            spec.domain.as_ref().map(|d| d.span()),
            ("domain", "only `tokenize` takes a domain".into()),
        ));
    }
    Ok(action)
}

fn parse_function(name: &Spanned<String>, p: &RawParams) -> Result<Function, String> {
    let need = |what: &str| format!("`{}` needs `{what}`", name.get_ref());
    Ok(match name.get_ref().as_str() {
        "is_present" => Function::IsPresent,
        "email_domain" => Function::EmailDomain,
        "age_band" => {
            let bands = p.bands.clone().ok_or_else(|| need("bands"))?;
            if bands.is_empty() || bands.windows(2).any(|w| w[0] >= w[1]) {
                return Err("`bands` must be a non-empty, strictly increasing list of ages".into());
            }
            Function::AgeBand { bands }
        }
        "year" => Function::Year,
        "quarter" => Function::Quarter,
        "month" => Function::Month,
        "prefix" => {
            let length = p.length.ok_or_else(|| need("length"))?;
            if !(1..=MAX_PREFIX).contains(&length) {
                return Err(format!(
                    "`length` must be 1 to {MAX_PREFIX}: a longer prefix keeps most of an identifier"
                ));
            }
            Function::Prefix { length }
        }
        "length" => Function::Length,
        "bucket" => {
            let edges = p.edges.clone().ok_or_else(|| need("edges"))?;
            if edges.is_empty() || edges.windows(2).any(|w| w[0] >= w[1]) || edges.iter().any(|e| !e.is_finite()) {
                return Err("`edges` must be a non-empty, strictly increasing list of numbers".into());
            }
            Function::Bucket { edges }
        }
        other => {
            return Err(format!(
                "unknown function `{other}`: one of {}",
                Function::NAMES.join(", ")
            ))
        }
    })
}

/// One `[columns.<name>]` rule, checked: its action, derives, rename and unit.
fn column_rule(
    column: String,
    spec: Spanned<RawColumn>,
    subject: &Spanned<String>,
    token_domain: &Spanned<String>,
    err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<ColumnRule, ConfigError> {
    let field = format!("columns.{column}");
    let span = spec.span();
    let spec = spec.into_inner();
    let action = parse_action(&spec, token_domain.get_ref()).map_err(|(at, message)| {
        err(
            at.unwrap_or_else(|| span.clone()),
            &format!("{field}.{}", message.0),
            message.1,
        )
    })?;
    let mut derive = Vec::with_capacity(spec.derive.len());
    for d in spec.derive {
        let dspan = d.span();
        let d = d.into_inner();
        let function =
            parse_function(&d.func, &d.params()).map_err(|m| err(d.func.span(), &format!("{field}.derive.fn"), m))?;
        if !is_identifier(&d.name) {
            return Err(err(
                dspan,
                &format!("{field}.derive.name"),
                "must be letters, digits and _".into(),
            ));
        }
        let (class, tags) = classification(d.class.as_ref(), &d.tags, &format!("{field}.derive"), err)?;
        derive.push(Derived {
            name: d.name,
            function,
            class,
            tags,
        });
    }
    let (class, tags) = classification(spec.class.as_ref(), &spec.tags, &field, err)?;
    let allow_plain = plain_allowed(
        spec.allow_plain.as_ref(),
        &action,
        class.as_deref(),
        &field,
        span.clone(),
        err,
    )?;
    let rename = spec.rename.map(|r| {
        let name = r.get_ref().clone();
        (name, r.span())
    });
    if let Some((name, at)) = &rename {
        if !is_identifier(name) {
            return Err(err(
                at.clone(),
                &format!("{field}.as"),
                "must be letters, digits and _".into(),
            ));
        }
        if matches!(action, Action::Drop | Action::Vault) {
            return Err(err(
                at.clone(),
                &format!("{field}.as"),
                format!("`{}` writes no column to rename", action.name()),
            ));
        }
    }
    let unit = match &spec.unit {
        None => None,
        Some(u) => Some(IntegerTime::parse(u.get_ref()).ok_or_else(|| {
            err(
                u.span(),
                &format!("{field}.unit"),
                format!(
                    "unknown unit `{}`: one of {}",
                    u.get_ref(),
                    IntegerTime::NAMES.join(", ")
                ),
            )
        })?),
    };
    if column == *subject.get_ref() && action.shows_value() {
        return Err(err(
            span,
            &format!("{field}.action"),
            format!(
                "`{}` would write the subject id (or a part of it) in plain: tokenize, encrypt, vault or drop the subject column",
                action.name()
            ),
        ));
    }
    Ok(ColumnRule {
        column,
        action,
        rename: rename.map(|r| r.0),
        derive,
        unit,
        class,
        tags,
        allow_plain,
    })
}

/// A rule's (or derive's) `class` and `tags`, checked: a class is a lower-case name (the
/// pipeline config checks it is a known one), a tag short printable text.
fn classification(
    class: Option<&Spanned<String>>,
    tags: &[Spanned<String>],
    field: &str,
    err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<(Option<String>, Vec<String>), ConfigError> {
    if let Some(c) = class {
        if !is_class_name(c.get_ref()) {
            return Err(err(
                c.span(),
                &format!("{field}.class"),
                "must be a lower-case name (letters, digits and _): one of the documented classes or one the pipeline config adds".into(),
            ));
        }
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        let tag = t.get_ref();
        if tag.trim().is_empty() || tag.len() > MAX_TAG_LEN || tag.chars().any(|ch| ch.is_control() || ch == ',') {
            return Err(err(
                t.span(),
                &format!("{field}.tags"),
                format!("a tag is 1 to {MAX_TAG_LEN} printable characters, without commas"),
            ));
        }
        if !out.contains(tag) {
            out.push(tag.clone());
        }
    }
    Ok((class.map(|c| c.get_ref().clone()), out))
}

/// The reason a restricted class is kept in plain: required for `keep` of a
/// `direct_identifier` or `special_category` column, refused anywhere else (a stale excuse
/// would hide the next change).
fn plain_allowed(
    allow_plain: Option<&Spanned<String>>,
    action: &Action,
    class: Option<&str>,
    field: &str,
    span: std::ops::Range<usize>,
    err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<Option<String>, ConfigError> {
    let restricted = class.filter(|c| RESTRICTED_CLASSES.contains(c));
    let kept = matches!(action, Action::Keep(_));
    match (allow_plain, restricted) {
        (None, Some(class)) if kept => Err(err(
            span,
            &format!("{field}.action"),
            format!(
                "`keep` writes a {class} column in plain: tokenize, encrypt, vault, generalize or derive from it instead, or say why it must be plain with allow_plain = \"<reason>\""
            ),
        )),
        (None, _) => Ok(None),
        (Some(reason), Some(_)) if kept => {
            if reason.get_ref().trim().is_empty() {
                return Err(err(
                    reason.span(),
                    &format!("{field}.allow_plain"),
                    "must say why the column is kept in plain".into(),
                ));
            }
            Ok(Some(reason.get_ref().clone()))
        }
        (Some(reason), _) => Err(err(
            reason.span(),
            &format!("{field}.allow_plain"),
            format!(
                "only excuses `keep` of a {} column; this rule {} a {} column",
                RESTRICTED_CLASSES.join(" or "),
                if kept { "keeps" } else { "does not keep" },
                class.unwrap_or("unclassified")
            ),
        )),
    }
}

/// A class is a lower-case name: letters, digits and `_`, starting with a letter.
pub fn is_class_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The longest retention a policy may set: a century.
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// The longest tag: catalogs limit tag values (Lake Formation: 256; Unity Catalog: 256).
pub const MAX_TAG_LEN: usize = 128;

/// `[erasure]`: delete the subject's rows, or blank the linking columns (and `blank`).
/// The row key: the listed columns, each the subject or a column the policy tokenizes or keeps
/// (a keyed token or the value itself: equal rows, equal keys; a ciphertext or a generalized
/// value would not identify the row); without `key`, the subject (a current table must name it).
fn row_key(
    policy: &Policy,
    key: Option<&Spanned<Vec<Spanned<String>>>>,
    err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<Vec<String>, ConfigError> {
    let Some(key) = key else {
        return Ok(vec![policy.subject.clone()]);
    };
    if key.get_ref().is_empty() {
        return Err(err(key.span(), "key", "must name at least one column".into()));
    }
    let mut out: Vec<String> = Vec::new();
    for column in key.get_ref() {
        let name = column.get_ref();
        let rule = policy.rules.iter().find(|r| &r.column == name);
        let fits = *name == policy.subject
            || rule.is_some_and(|r| matches!(r.action, Action::Keep(_) | Action::Tokenize { .. }));
        if !fits {
            let why = match rule {
                None => "is neither the subject nor a column the policy names".to_string(),
                Some(r) => format!(
                    "is `{}`: a key column must be the subject or a column the policy tokenizes or keeps (equal rows must give equal values)",
                    r.action.describe()
                ),
            };
            return Err(err(column.span(), "key", format!("`{name}` {why}")));
        }
        if out.contains(name) {
            return Err(err(column.span(), "key", format!("`{name}` is listed twice")));
        }
        out.push(name.clone());
    }
    Ok(out)
}

fn erasure_mode(
    erasure: RawErasure,
    outputs: &HashSet<String>,
    err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<Erasure, ConfigError> {
    Ok(match erasure.mode.get_ref().as_str() {
        "delete" if erasure.blank.is_empty() => Erasure::Delete,
        "delete" => {
            return Err(err(
                erasure.blank[0].span(),
                "erasure.blank",
                "only `mode = \"anonymize\"` blanks columns".into(),
            ))
        }
        "anonymize" => {
            for b in &erasure.blank {
                if !outputs.contains(b.get_ref()) && !BLANKABLE_META_COLUMNS.contains(&b.get_ref().as_str()) {
                    return Err(err(
                        b.span(),
                        "erasure.blank",
                        format!(
                            "`{}` is not an output column of this policy (nor one of {})",
                            b.get_ref(),
                            BLANKABLE_META_COLUMNS.join(", ")
                        ),
                    ));
                }
            }
            Erasure::Anonymize {
                also_blank: erasure.blank.into_iter().map(Spanned::into_inner).collect(),
            }
        }
        other => {
            return Err(err(
                erasure.mode.span(),
                "erasure.mode",
                format!("unknown mode `{other}`: `delete` or `anonymize`"),
            ))
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    table: Spanned<String>,
    target: Spanned<String>,
    subject: Spanned<String>,
    token_domain: Spanned<String>,
    #[serde(default)]
    columns: ordered::Columns,
    erasure: Option<Spanned<RawErasure>>,
    key: Option<Spanned<Vec<Spanned<String>>>>,
    current: Option<Spanned<bool>>,
    retention_days: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawErasure {
    mode: Spanned<String>,
    #[serde(default)]
    blank: Vec<Spanned<String>>,
}

/// Parameters of a function, borrowed from a column rule or a derive entry.
struct RawParams<'a> {
    func: Option<&'a Spanned<String>>,
    bands: &'a Option<Vec<i64>>,
    length: Option<usize>,
    edges: &'a Option<Vec<f64>>,
}

// `deny_unknown_fields` does not combine with `flatten`, so the parameters are spelled out twice.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawColumn {
    action: Spanned<String>,
    #[serde(rename = "type")]
    ty: Option<Spanned<String>>,
    domain: Option<Spanned<String>>,
    #[serde(rename = "as")]
    rename: Option<Spanned<String>>,
    #[serde(default)]
    derive: Vec<Spanned<RawDerive>>,
    #[serde(rename = "fn")]
    func: Option<Spanned<String>>,
    bands: Option<Vec<i64>>,
    length: Option<usize>,
    edges: Option<Vec<f64>>,
    /// How integer dates/times of this column are encoded: days, ms, us, ns.
    unit: Option<Spanned<String>>,
    class: Option<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    allow_plain: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDerive {
    name: String,
    #[serde(rename = "fn")]
    func: Spanned<String>,
    bands: Option<Vec<i64>>,
    length: Option<usize>,
    edges: Option<Vec<f64>>,
    class: Option<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
}

impl RawColumn {
    fn params(&self) -> RawParams<'_> {
        RawParams {
            func: self.func.as_ref(),
            bands: &self.bands,
            length: self.length,
            edges: &self.edges,
        }
    }
}

impl RawDerive {
    fn params(&self) -> RawParams<'_> {
        RawParams {
            func: Some(&self.func),
            bands: &self.bands,
            length: self.length,
            edges: &self.edges,
        }
    }
}

/// Columns in file order (the manifest and output schema follow the file).
mod ordered {
    use super::*;

    #[derive(Default)]
    pub(super) struct Columns(pub(super) Vec<(String, Spanned<RawColumn>)>);

    impl IntoIterator for Columns {
        type Item = (String, Spanned<RawColumn>);
        type IntoIter = std::vec::IntoIter<Self::Item>;
        fn into_iter(self) -> Self::IntoIter {
            self.0.into_iter()
        }
    }

    impl Columns {
        pub fn len(&self) -> usize {
            self.0.len()
        }
    }

    impl<'de> Deserialize<'de> for Columns {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Columns;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a table of column rules")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Columns, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, Spanned<RawColumn>>()? {
                        out.push((k, v));
                    }
                    Ok(Columns(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}

#[cfg(test)]
mod tests;
