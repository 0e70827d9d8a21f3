//! Hourly pre-aggregations with k-anonymity (`[[aggregates]]`), computed by DataFusion (the one
//! `deltalake` embeds) over a policy's table and written beside it in the same format(s).
//!
//! - An hour is the hour of the source commit time (`_source_ts`); rows counted are those a
//!   change created (`_op` `c` inserts and `r` snapshot reads), so an update is not a second fact.
//! - A group is published only if it covers at least k distinct subjects (counted on subject
//!   tokens). Smaller groups are dropped, or merged into one group of the hour whose dimensions
//!   are all null (published if the merge covers k). Each hour's suppressions are in the
//!   sibling table `<name>_suppressions`.
//! - Each computation replaces its hours (idempotent). Which hours are due is found from the
//!   base table's `_ingested_at`: every hour holding rows ingested since the last computation
//!   (its watermark, committed with the rows like any source position) and ended at least the
//!   lateness ago. A late event thus makes its hour due again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use sluice_connectors::datafusion::common::ScalarValue;
use sluice_connectors::datafusion::functions::expr_fn::date_trunc;
use sluice_connectors::datafusion::functions_aggregate::expr_fn::{avg, count, count_distinct, sum};
use sluice_connectors::datafusion::logical_expr::{binary_expr, cast, JoinType, Operator};
use sluice_connectors::datafusion::prelude::{col, lit, DataFrame, Expr, SessionContext};
use sluice_connectors::lake::{Catalogs, TableLocation};
use sluice_connectors::SourcePosition;
use tracing::info;

use crate::config::{Aggregate, Config, MeasureFn, Suppression};
use crate::forget::HookError;

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("aggregate {aggregate}: {source}")]
    Query { aggregate: String, source: QueryError },
    #[error("aggregate {aggregate}: {source}")]
    Lake {
        aggregate: String,
        source: sluice_connectors::lake::LakeError,
    },
}

/// What failed in an aggregate's query (names and the engine's own message, never a value).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Engine(#[from] sluice_connectors::datafusion::error::DataFusionError),
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Lake(#[from] sluice_connectors::lake::LakeError),
    #[error("async runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for QueryError {
    fn from(message: String) -> Self {
        QueryError::Invalid(message)
    }
}

/// Which hours to compute.
#[derive(Debug, Clone)]
pub enum Hours {
    /// Every hour in `[from, to)` (microseconds since the epoch), closed or not: a backfill.
    Range { from_us: i64, to_us: i64 },
    /// These hours (their starts, microseconds), closed or not.
    Exact(Vec<i64>),
    /// The hours due: rows ingested since the last computation, hour ended `lateness` ago.
    Due { now_us: i64 },
}

/// What one aggregate's computation did.
#[derive(Debug, Default, serde::Serialize)]
pub struct AggregateReport {
    pub name: String,
    pub hours: Vec<HourReport>,
    /// `_ingested_at` up to which the base table is accounted for (microseconds).
    pub watermark_us: Option<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HourReport {
    pub hour: String,
    pub groups_published: u64,
    pub groups_suppressed: u64,
    /// Whether the suppressed groups were published merged into one.
    pub merged_published: bool,
}

const HOUR_US: i64 = 3_600_000_000;
/// An internal column: distinct subjects of a group (published only if asked for).
const SUBJECTS: &str = "__distinct_subjects";

fn ts(us: i64) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(Some(us), Some("UTC".into())))
}

fn hour_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The stream whose position is the aggregate's watermark.
fn watermark_stream(a: &Aggregate) -> String {
    format!("aggregate/{}", a.name)
}

/// Where an aggregate (or its suppressions table) is written, per format.
pub fn locations(config: &Config, table: &str) -> Vec<TableLocation> {
    sluice_connectors::lake::table_locations(
        config.lake_format,
        config.aggregates_root(),
        config.iceberg.as_ref(),
        table,
    )
}

pub fn suppressions_table(a: &Aggregate) -> String {
    format!("{}_suppressions", a.name)
}

/// Computes every configured aggregate for `hours`.
pub fn run(config: &Config, hours: Hours) -> Result<Vec<AggregateReport>, AggregateError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AggregateError::Query {
            aggregate: "(all)".into(),
            source: e.into(),
        })?;
    let mut reports = Vec::new();
    for a in &config.aggregates {
        reports.push(rt.block_on(compute(config, a, hours.clone()))?);
    }
    Ok(reports)
}

/// Recomputes the given hours (microseconds, hour starts) of every aggregate: after an erasure.
pub fn recompute_hours(config: &Config, hours: &BTreeSet<i64>) -> Result<Vec<AggregateReport>, AggregateError> {
    run(config, Hours::Exact(hours.iter().copied().collect()))
}

struct Ctx<'a> {
    a: &'a Aggregate,
}

impl Ctx<'_> {
    fn err(&self, e: impl Into<QueryError>) -> AggregateError {
        AggregateError::Query {
            aggregate: self.a.name.clone(),
            source: e.into(),
        }
    }
    fn lake(&self, source: sluice_connectors::lake::LakeError) -> AggregateError {
        AggregateError::Lake {
            aggregate: self.a.name.clone(),
            source,
        }
    }
}

/// Registers the policy table `target` as `base`; false if it does not exist yet.
async fn register_base(
    config: &Config,
    catalogs: &mut Catalogs,
    session: &SessionContext,
    target: &str,
) -> Result<bool, QueryError> {
    let policy = config
        .policies
        .iter()
        .find(|p| p.target == target)
        .ok_or_else(|| format!("no policy writes `{target}`"))?;
    // Delta where there is one; the Iceberg table holds the same rows.
    let Some(location) = config.table_locations(policy).into_iter().next() else {
        return Ok(false);
    };
    location
        .register(catalogs, session, target, "base")
        .await
        .map_err(QueryError::from)
}

async fn compute(config: &Config, a: &Aggregate, hours: Hours) -> Result<AggregateReport, AggregateError> {
    let c = Ctx { a };
    let started = std::time::Instant::now();
    let mut report = AggregateReport {
        name: a.name.clone(),
        ..Default::default()
    };
    let session = SessionContext::new();
    let mut catalogs = Catalogs::default();
    if !register_base(config, &mut catalogs, &session, &a.from)
        .await
        .map_err(|e| c.err(e))?
    {
        info!(aggregate = %a.name, table = %a.from, "base table has no rows yet: nothing to aggregate");
        return Ok(report);
    }
    let base = session.table("base").await.map_err(|e| c.err(e))?;
    let previous = read_watermark(config, &c).await?;
    let (due, watermark) = due_hours(&c, &base, hours, previous).await?;
    tracing::debug!(aggregate = %a.name, ms = started.elapsed().as_millis() as u64, hours = due.len(), "hours found");
    report.watermark_us = watermark;
    if due.is_empty() {
        return Ok(report);
    }
    let (schema, rows, per_hour) = k_anonymous_groups(&c, base, &due).await?;
    tracing::debug!(aggregate = %a.name, ms = started.elapsed().as_millis() as u64, "groups computed");
    let suppression_rows = suppression_batch(per_hour.values());
    let positions: Vec<SourcePosition> = watermark
        .map(|w| SourcePosition {
            stream: watermark_stream(a),
            offset: w,
        })
        .into_iter()
        .collect();
    for (table, schema, batches) in [
        (a.name.clone(), schema, rows),
        (suppressions_table(a), suppression_rows.schema(), vec![suppression_rows]),
    ] {
        for location in locations(config, &table) {
            location
                .replace_where_time_in(
                    &mut catalogs,
                    &table,
                    &config.name,
                    schema.clone(),
                    batches.clone(),
                    "hour",
                    &due,
                    &positions,
                )
                .await
                .map_err(|e| c.err(e))?;
            tracing::debug!(aggregate = %a.name, ms = started.elapsed().as_millis() as u64, table = %location.describe(), "replaced");
        }
    }
    report.hours = per_hour.into_values().collect();
    let suppressed: u64 = report.hours.iter().map(|h| h.groups_suppressed).sum();
    info!(aggregate = %a.name, hours = report.hours.len(), groups_suppressed = suppressed, "aggregated");
    Ok(report)
}

fn hour_of() -> Expr {
    date_trunc(lit("hour"), col("_source_ts"))
}

/// The watermark: the lowest any of the aggregate's tables committed (none if one has none).
async fn read_watermark(config: &Config, c: &Ctx<'_>) -> Result<Option<i64>, AggregateError> {
    let a = c.a;
    let stream = watermark_stream(a);
    let mut previous: Option<i64> = None;
    for table in [a.name.clone(), suppressions_table(a)] {
        for location in locations(config, &table) {
            match location
                .read_positions(&config.name, std::slice::from_ref(&stream))
                .await
                .map_err(|e| c.lake(e))?[0]
            {
                Some(w) => previous = Some(previous.map_or(w, |p: i64| p.min(w))),
                None => return Ok(None),
            }
        }
    }
    Ok(previous)
}

/// The hours to compute (sorted) and the watermark to commit with them.
async fn due_hours(
    c: &Ctx<'_>,
    base: &DataFrame,
    hours: Hours,
    previous: Option<i64>,
) -> Result<(Vec<i64>, Option<i64>), AggregateError> {
    let a = c.a;
    Ok(match hours {
        Hours::Range { from_us, to_us } => {
            let first = from_us.div_euclid(HOUR_US) * HOUR_US;
            ((first..to_us).step_by(HOUR_US as usize).collect(), previous)
        }
        Hours::Exact(hours) => (hours, previous),
        Hours::Due { now_us } => {
            let mut changed = base.clone();
            if let Some(w) = previous {
                changed = changed.filter(col("_ingested_at").gt(ts(w))).map_err(|e| c.err(e))?;
            }
            let per_hour = changed
                .aggregate(
                    vec![hour_of().alias("hour")],
                    vec![
                        sluice_connectors::datafusion::functions_aggregate::expr_fn::min(col("_ingested_at"))
                            .alias("first"),
                        sluice_connectors::datafusion::functions_aggregate::expr_fn::max(col("_ingested_at"))
                            .alias("last"),
                    ],
                )
                .map_err(|e| c.err(e))?
                .collect()
                .await
                .map_err(|e| c.err(e))?;
            let lateness = a.lateness.as_micros() as i64;
            let (mut due, mut newest, mut oldest_open) = (Vec::new(), previous, None::<i64>);
            for batch in &per_hour {
                let hour = timestamps(batch, "hour").map_err(|e| c.err(e))?;
                let first = timestamps(batch, "first").map_err(|e| c.err(e))?;
                let last = timestamps(batch, "last").map_err(|e| c.err(e))?;
                for i in 0..batch.num_rows() {
                    let h = hour.value(i);
                    if h + HOUR_US + lateness <= now_us {
                        due.push(h);
                        newest = Some(newest.map_or(last.value(i), |n| n.max(last.value(i))));
                    } else {
                        oldest_open = Some(oldest_open.map_or(first.value(i), |o| o.min(first.value(i))));
                    }
                }
            }
            // Rows of hours still open stay after the watermark, so they are seen again.
            let watermark = match oldest_open {
                Some(open) => Some(open - 1).filter(|w| previous.is_none_or(|p| *w > p)).or(previous),
                None => newest,
            };
            due.sort_unstable();
            (due, watermark)
        }
    })
}

/// The groups of `due` hours that cover at least k subjects (with, per `on_suppressed`, the
/// merged rest of each hour), their schema, and per hour what was published and suppressed.
async fn k_anonymous_groups(
    c: &Ctx<'_>,
    base: DataFrame,
    due: &[i64],
) -> Result<(SchemaRef, Vec<RecordBatch>, BTreeMap<i64, HourReport>), AggregateError> {
    let a = c.a;
    let hour_list: Vec<Expr> = due.iter().map(|h| ts(*h)).collect();
    let facts = base
        .filter(col("_op").in_list(vec![lit("c"), lit("r")], false))
        .map_err(|e| c.err(e))?
        .filter(
            col("_source_ts")
                .gt_eq(ts(due[0]))
                .and(col("_source_ts").lt(ts(due[due.len() - 1] + HOUR_US))),
        )
        .map_err(|e| c.err(e))?
        .with_column("hour", hour_of())
        .map_err(|e| c.err(e))?
        .filter(col("hour").in_list(hour_list, false))
        .map_err(|e| c.err(e))?;
    let mut group: Vec<Expr> = vec![col("hour")];
    group.extend(a.dimensions.iter().map(|d| col(d.as_str())));
    let grouped = facts
        .clone()
        .aggregate(group.clone(), measures(a))
        .map_err(|e| c.err(e))?;
    let k = lit(a.k as i64);
    let published = grouped
        .clone()
        .filter(col(SUBJECTS).gt_eq(k.clone()))
        .map_err(|e| c.err(e))?;
    let suppressed = grouped.filter(col(SUBJECTS).lt(k)).map_err(|e| c.err(e))?;

    let mut per_hour: BTreeMap<i64, HourReport> = due
        .iter()
        .map(|h| {
            (
                *h,
                HourReport {
                    hour: iso_hour(*h),
                    groups_published: 0,
                    groups_suppressed: 0,
                    merged_published: false,
                },
            )
        })
        .collect();
    let output = output_columns(a);
    let selected = published.clone().select(output).map_err(|e| c.err(e))?;
    let schema = output_schema(selected.schema().as_arrow(), &output_names(a));
    let mut rows = selected.collect().await.map_err(|e| c.err(e))?;
    count_per_hour(&rows, &mut per_hour, |r, n| r.groups_published += n).map_err(|e| c.err(e))?;
    let suppressed_keys = suppressed
        .clone()
        .select(group.clone())
        .map_err(|e| c.err(e))?
        .collect()
        .await
        .map_err(|e| c.err(e))?;
    count_per_hour(&suppressed_keys, &mut per_hour, |r, n| r.groups_suppressed += n).map_err(|e| c.err(e))?;

    if a.on_suppressed == Suppression::Merge && suppressed_keys.iter().any(|b| b.num_rows() > 0) {
        let merged_rows = merge_suppressed(c, facts, suppressed, &published, &group).await?;
        count_per_hour(&merged_rows, &mut per_hour, |r, n| r.merged_published |= n > 0).map_err(|e| c.err(e))?;
        rows.extend(merged_rows);
    }
    let rows = rows
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| c.err(e))?;
    Ok((schema, rows, per_hour))
}

/// The facts of the suppressed groups, grouped by hour alone (dimensions null): published
/// where they cover k subjects together.
async fn merge_suppressed(
    c: &Ctx<'_>,
    facts: DataFrame,
    suppressed: DataFrame,
    published: &DataFrame,
    group: &[Expr],
) -> Result<Vec<RecordBatch>, AggregateError> {
    let a = c.a;
    let output = output_columns(a);
    let k = lit(a.k as i64);
    let measures = measures(a);
    let keys = suppressed
        .select(
            group
                .iter()
                .zip(std::iter::once("hour".to_string()).chain(a.dimensions.iter().cloned()))
                .map(|(e, name)| e.clone().alias(format!("__key_{name}")))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| c.err(e))?;
    let on: Vec<Expr> = std::iter::once("hour".to_string())
        .chain(a.dimensions.iter().cloned())
        .map(|name| {
            binary_expr(
                col(name.as_str()),
                Operator::IsNotDistinctFrom,
                col(format!("__key_{name}")),
            )
        })
        .collect();
    let merged = facts
        .join_on(keys, JoinType::LeftSemi, on)
        .map_err(|e| c.err(e))?
        .aggregate(vec![col("hour")], measures)
        .map_err(|e| c.err(e))?
        .filter(col(SUBJECTS).gt_eq(k))
        .map_err(|e| c.err(e))?;
    let mut select = vec![col("hour")];
    for d in &a.dimensions {
        let data_type = published
            .schema()
            .field_with_unqualified_name(d)
            .map_err(|e| c.err(e))?
            .data_type()
            .clone();
        select.push(cast(lit(ScalarValue::Null), data_type).alias(d.as_str()));
    }
    select.extend(output.iter().skip(1 + a.dimensions.len()).cloned());
    let merged_rows = merged
        .select(select)
        .map_err(|e| c.err(e))?
        .collect()
        .await
        .map_err(|e| c.err(e))?;
    Ok(merged_rows)
}

/// The aggregate expressions: every measure, and the distinct subjects k is checked on.
fn measures(a: &Aggregate) -> Vec<Expr> {
    let mut out = vec![count_distinct(col("_subject")).alias(SUBJECTS)];
    for m in &a.measures {
        let column = || col(m.column.as_deref().unwrap_or_default());
        out.push(
            match m.function {
                MeasureFn::Count => count(lit(1)),
                MeasureFn::CountDistinctSubjects => count_distinct(col("_subject")),
                MeasureFn::Sum => sum(column()),
                MeasureFn::Avg => avg(column()),
            }
            .alias(m.name.as_str()),
        );
    }
    out
}

fn output_names(a: &Aggregate) -> Vec<String> {
    std::iter::once("hour".to_string())
        .chain(a.dimensions.iter().cloned())
        .chain(a.measures.iter().map(|m| m.name.clone()))
        .collect()
}

fn output_columns(a: &Aggregate) -> Vec<Expr> {
    output_names(a).iter().map(|n| col(n.as_str())).collect()
}

/// Plain field names, `hour` as a UTC timestamp, every column nullable (a merged group's
/// dimensions are null).
fn output_schema(schema: &Schema, names: &[String]) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .zip(names)
            .map(|(f, n)| {
                let data_type = if n == "hour" {
                    hour_type()
                } else {
                    f.data_type().clone()
                };
                Field::new(n, data_type, true)
            })
            .collect::<Vec<_>>(),
    ))
}

fn timestamps<'b>(batch: &'b RecordBatch, name: &str) -> Result<&'b TimestampMicrosecondArray, QueryError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| QueryError::Invalid(format!("column {name} is not a microsecond timestamp")))
}

fn count_per_hour(
    batches: &[RecordBatch],
    per_hour: &mut BTreeMap<i64, HourReport>,
    add: impl Fn(&mut HourReport, u64),
) -> Result<(), QueryError> {
    for batch in batches {
        let hour = timestamps(batch, "hour")?;
        for i in 0..batch.num_rows() {
            if let Some(r) = per_hour.get_mut(&hour.value(i)) {
                add(r, 1);
            }
        }
    }
    Ok(())
}

fn suppression_batch<'a>(hours: impl Iterator<Item = &'a HourReport>) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("hour", hour_type(), false),
        Field::new("groups_published", DataType::Int64, false),
        Field::new("groups_suppressed", DataType::Int64, false),
        Field::new("merged_published", DataType::Boolean, false),
    ]));
    let hours: Vec<&HourReport> = hours.collect();
    let parse = |h: &str| {
        chrono::DateTime::parse_from_rfc3339(h)
            .map(|t| t.timestamp_micros())
            .unwrap_or(0)
    };
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from(hours.iter().map(|h| parse(&h.hour)).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from(
                hours.iter().map(|h| h.groups_published as i64).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                hours.iter().map(|h| h.groups_suppressed as i64).collect::<Vec<_>>(),
            )),
            Arc::new(BooleanArray::from(
                hours.iter().map(|h| h.merged_published).collect::<Vec<_>>(),
            )),
        ],
    )
    .expect("columns match the schema")
}

fn iso_hour(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.format("%Y-%m-%dT%H:00:00Z").to_string())
        .unwrap_or_default()
}

/// Hour starts (microseconds) in which `subject_tokens` have rows in `target`: what an erasure
/// of them changes, found before their rows are removed.
pub fn hours_of_subjects(
    config: &Config,
    target: &str,
    subject_tokens: &[String],
) -> Result<BTreeSet<i64>, QueryError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let session = SessionContext::new();
        let mut catalogs = Catalogs::default();
        if !register_base(config, &mut catalogs, &session, target).await? {
            return Ok(BTreeSet::new());
        }
        let tokens: Vec<Expr> = subject_tokens.iter().map(|t| lit(t.as_str())).collect();
        let df: DataFrame = session
            .table("base")
            .await?
            .filter(col("_subject").in_list(tokens, false))?
            .aggregate(vec![date_trunc(lit("hour"), col("_source_ts")).alias("hour")], vec![])?;
        let mut out = BTreeSet::new();
        for batch in df.collect().await? {
            let hour = timestamps(&batch, "hour")?;
            out.extend((0..batch.num_rows()).map(|i| hour.value(i)));
        }
        Ok(out)
    })
}

/// Recomputes the aggregates an erasure changed (see `forget::ErasureHook`).
pub struct AggregatesAfterErasure<'a> {
    pub config: &'a Config,
}

impl crate::forget::ErasureHook for AggregatesAfterErasure<'_> {
    fn name(&self) -> &str {
        "aggregates"
    }

    fn before_erasure(&self, subject_tokens: &[String]) -> Result<Vec<String>, HookError> {
        let mut hours = BTreeSet::new();
        let sources: BTreeSet<&str> = self.config.aggregates.iter().map(|a| a.from.as_str()).collect();
        for target in sources {
            hours.extend(hours_of_subjects(self.config, target, subject_tokens)?);
        }
        Ok(hours.into_iter().map(|h| h.to_string()).collect())
    }

    fn after_erasure(&self, _subject_tokens: &[String], before: &[String]) -> Result<String, HookError> {
        let hours: BTreeSet<i64> = before.iter().filter_map(|h| h.parse().ok()).collect();
        if hours.is_empty() || self.config.aggregates.is_empty() {
            return Ok("no aggregated hour held the subjects".into());
        }
        recompute_hours(self.config, &hours)?;
        Ok(format!(
            "{} hours recomputed; no older version of the aggregate tables is kept (Delta history removed, Iceberg snapshots expired)",
            hours.len()
        ))
    }
}
