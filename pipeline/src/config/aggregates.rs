//! `[[aggregates]]`: hourly pre-aggregations and their k-anonymity.

use super::*;

/// The `[[aggregates]]`, each named apart from every table and other aggregate.
pub(super) fn aggregates_config(
    raw: &RawConfig,
    policies: &[Policy],
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<Vec<Aggregate>, LoadError> {
    let targets: HashSet<&str> = policies.iter().map(|p| p.target.as_str()).collect();
    let aggregates = raw
        .aggregates
        .iter()
        .map(|a| aggregate_config(a, policies, invalid))
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = HashSet::new();
    for (a, raw_a) in aggregates.iter().zip(&raw.aggregates) {
        if !names.insert(a.name.clone()) || targets.contains(a.name.as_str()) {
            return Err(invalid(
                raw_a.name.span().start,
                "aggregates.name",
                format!("`{}` is already the name of a table or another aggregate", a.name),
            ));
        }
    }
    Ok(aggregates)
}

/// An hourly pre-aggregation of a policy's table (`[[aggregates]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub name: String,
    /// The policy target it reads.
    pub from: String,
    pub dimensions: Vec<String>,
    pub measures: Vec<Measure>,
    /// A published group covers at least this many distinct subjects.
    pub k: u32,
    pub on_suppressed: Suppression,
    /// An hour is computed once it ended this long ago; later events recompute it.
    pub lateness: std::time::Duration,
    /// Hours older than this many days are removed by `sluice retain`.
    pub retention_days: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Measure {
    pub function: MeasureFn,
    pub column: Option<String>,
    /// Output column name.
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureFn {
    Count,
    CountDistinctSubjects,
    Sum,
    Avg,
}

/// What happens to a group of fewer than k distinct subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppression {
    /// Not published (counted in the hour's suppressions).
    Drop,
    /// Merged into one group of the hour with every dimension null, published if that covers k.
    Merge,
}

/// A group is published only when it covers at least this many distinct subjects, unless
/// `k_anonymity` says otherwise.
pub const DEFAULT_K_ANONYMITY: u32 = 11;

pub(super) fn aggregate_config(
    raw: &RawAggregate,
    policies: &[Policy],
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<Aggregate, LoadError> {
    let name = raw.name.get_ref();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            raw.name.span().start,
            "aggregates.name",
            "must be letters, digits and _".into(),
        ));
    }
    let from = raw.from.get_ref();
    let policy = policies.iter().find(|p| &p.target == from).ok_or_else(|| {
        invalid(
            raw.from.span().start,
            "aggregates.from",
            format!("`{from}` is not the target table of any policy"),
        )
    })?;
    let linking = policy.linking_columns();
    let outputs = policy.output_columns();
    // Only what a policy made safe to show: kept, generalized or derived columns.
    let safe = |column: &Spanned<String>, field: &str| -> Result<arrow_schema::DataType, LoadError> {
        let c = column.get_ref();
        let out = outputs.iter().find(|o| &o.name == c).ok_or_else(|| {
            invalid(
                column.span().start,
                field,
                format!("`{c}` is not an output column of policy `{}`", policy.table),
            )
        })?;
        if linking.contains(c) {
            return Err(invalid(
                column.span().start,
                field,
                format!("`{c}` is {}: it links rows to a person; only kept, generalized or derived columns may be grouped or measured", out.how),
            ));
        }
        Ok(out.data_type.clone())
    };
    let mut dimensions = Vec::new();
    for d in raw.dimensions.get_ref() {
        safe(d, "aggregates.dimensions")?;
        if dimensions.contains(d.get_ref()) {
            return Err(invalid(
                d.span().start,
                "aggregates.dimensions",
                format!("`{}` named twice", d.get_ref()),
            ));
        }
        dimensions.push(d.get_ref().clone());
    }
    let mut measures = Vec::new();
    for m in raw.measures.get_ref() {
        let at = m.function.span().start;
        let (function, column) = measure_of(m, &safe, invalid)?;
        let name = m.name.clone().unwrap_or_else(|| match (function, &column) {
            (MeasureFn::Count, _) => "count".into(),
            (MeasureFn::CountDistinctSubjects, _) => "distinct_subjects".into(),
            (MeasureFn::Sum, Some(c)) => format!("sum_{c}"),
            (_, c) => format!("avg_{}", c.as_deref().unwrap_or_default()),
        });
        if dimensions.contains(&name) || measures.iter().any(|x: &Measure| x.name == name) || name == "hour" {
            return Err(invalid(
                at,
                "aggregates.measures",
                format!("output column `{name}` named twice (set `as`)"),
            ));
        }
        measures.push(Measure { function, column, name });
    }
    if measures.is_empty() {
        return Err(invalid(
            raw.measures.span().start,
            "aggregates.measures",
            "name at least one measure".into(),
        ));
    }
    let k = match &raw.k_anonymity {
        None => DEFAULT_K_ANONYMITY,
        Some(k) if *k.get_ref() >= 2 => *k.get_ref(),
        Some(k) => {
            return Err(invalid(
                k.span().start,
                "aggregates.k_anonymity",
                "must be at least 2 (a group of one person is that person)".into(),
            ))
        }
    };
    let on_suppressed = match raw.on_suppressed.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("drop") => Suppression::Drop,
        Some("merge") => Suppression::Merge,
        Some(other) => {
            return Err(invalid(
                raw.on_suppressed.as_ref().map_or(0, |s| s.span().start),
                "aggregates.on_suppressed",
                format!("`{other}`: expected `drop` or `merge`"),
            ))
        }
    };
    Ok(Aggregate {
        name: name.clone(),
        from: from.clone(),
        dimensions,
        measures,
        k,
        on_suppressed,
        lateness: std::time::Duration::from_millis(raw.lateness_ms),
        retention_days: match &raw.retention_days {
            None => None,
            Some(days) if (1..=sluice_transforms::policy::MAX_RETENTION_DAYS).contains(days.get_ref()) => {
                Some(*days.get_ref())
            }
            Some(days) => {
                return Err(invalid(
                    days.span().start,
                    "aggregates.retention_days",
                    format!(
                        "must be 1 to {} (days an hour is kept)",
                        sluice_transforms::policy::MAX_RETENTION_DAYS
                    ),
                ))
            }
        },
    })
}

/// Checks that a column may be grouped or measured, and gives its type.
type SafeColumn<'a> = dyn Fn(&Spanned<String>, &str) -> Result<arrow_schema::DataType, LoadError> + 'a;

/// A measure's function and column: counts take none; sums and averages take a number the
/// policy made safe to show (`safe` checks it and gives its type).
fn measure_of(
    m: &RawMeasure,
    safe: &SafeColumn<'_>,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<(MeasureFn, Option<String>), LoadError> {
    let at = m.function.span().start;
    let function = match m.function.get_ref().as_str() {
        "count" => MeasureFn::Count,
        "count_distinct_subjects" => MeasureFn::CountDistinctSubjects,
        "sum" => MeasureFn::Sum,
        "avg" => MeasureFn::Avg,
        other => {
            return Err(invalid(
                at,
                "aggregates.measures.fn",
                format!("unknown measure `{other}`: expected `count`, `count_distinct_subjects`, `sum` or `avg` (min and max would publish one person's exact value)"),
            ))
        }
    };
    let column = match (function, &m.column) {
        (MeasureFn::Count | MeasureFn::CountDistinctSubjects, None) => None,
        (MeasureFn::Count | MeasureFn::CountDistinctSubjects, Some(c)) => {
            return Err(invalid(
                c.span().start,
                "aggregates.measures.column",
                "this measure takes no column".into(),
            ))
        }
        (_, None) => {
            return Err(invalid(
                at,
                "aggregates.measures.column",
                "required for `sum` and `avg`".into(),
            ))
        }
        (_, Some(c)) => {
            let data_type = safe(c, "aggregates.measures.column")?;
            if !data_type.is_numeric() {
                return Err(invalid(
                    c.span().start,
                    "aggregates.measures.column",
                    format!("`{}` is {data_type}, not a number", c.get_ref()),
                ));
            }
            Some(c.get_ref().clone())
        }
    };
    Ok((function, column))
}
