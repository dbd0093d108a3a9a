//! The one driver every gold table runs through: load the source, work out
//! from the recorded progress which partitions changed (see
//! [`crate::gold::scope`]), map them to the target's partitions (dates or
//! months), compute those partitions with the table's own [`Compute`],
//! replace them (replaceWhere) and record the source version read in the
//! same commit. A table module only says where its data comes from and goes
//! to and how its rows are computed.

use std::collections::BTreeSet;
use std::time::Instant;

use chrono::{Datelike, NaiveDate};
use deltalake::arrow::array::{Date32Array, RecordBatch, StringArray};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::prelude::{Expr, SessionContext, col, lit};
use futures_util::future::BoxFuture;

use crate::gold::{Scope, date_lit, empty, first_i64, parse_days, scope};
use crate::lake;
use crate::silver::{date_in, date_in_sql, date_of_days, range_sql};
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// Name under which the source table is registered while computing.
pub(crate) const SRC: &str = "src";
/// Name under which the target table (as it was) is registered.
pub(crate) const CUR: &str = "cur";
/// Placeholder in [`Sql`] templates for the source filter.
pub(crate) const WHERE: &str = "$where";

/// How a target table is partitioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Partition {
    /// By `date` (Date32): a changed source date is recomputed as a date.
    Date,
    /// By `month` ('YYYY-MM'): a changed source date recomputes its month.
    Month,
}

/// What a table computes for the source rows matching a filter.
pub(crate) struct Computed {
    /// Source rows read.
    pub rows_in: u64,
    /// The rows of the recomputed partitions (any column types DataFusion
    /// yields: they are conformed to the table's schema).
    pub batches: Vec<RecordBatch>,
}

/// A gold table's computation (tables [`SRC`] and [`CUR`] registered).
pub(crate) trait Compute: Send + Sync {
    /// The target rows for the source rows matching `where_sql`.
    fn compute<'a>(
        &'a self,
        ctx: &'a SessionContext,
        where_sql: &'a str,
    ) -> BoxFuture<'a, Result<Computed, PipelineError>>;

    /// The target dates to recompute when the source dates `days` changed;
    /// the same dates unless the table is keyed by another date.
    fn affected<'a>(
        &'a self,
        _ctx: &'a SessionContext,
        days: BTreeSet<i32>,
    ) -> BoxFuture<'a, Result<BTreeSet<i32>, PipelineError>> {
        Box::pin(async move { Ok(days) })
    }
}

/// A computation in SQL: `count` gives the source rows read (one BIGINT),
/// `select` the target rows; both with [`WHERE`] for the source filter.
pub(crate) struct Sql {
    pub count: String,
    pub select: String,
}

impl Compute for Sql {
    fn compute<'a>(
        &'a self,
        ctx: &'a SessionContext,
        where_sql: &'a str,
    ) -> BoxFuture<'a, Result<Computed, PipelineError>> {
        Box::pin(async move {
            let counted = ctx
                .sql(&self.count.replace(WHERE, where_sql))
                .await?
                .collect()
                .await?;
            let batches = ctx
                .sql(&self.select.replace(WHERE, where_sql))
                .await?
                .collect()
                .await?;
            Ok(Computed {
                rows_in: first_i64(&counted),
                batches,
            })
        })
    }
}

/// A gold table: source, target, and how to compute it.
pub(crate) struct GoldJob {
    /// SQL name of the target.
    pub name: &'static str,
    /// Source table location under the lake root.
    pub source: &'static str,
    /// Target table location under the lake root.
    pub target: &'static str,
    pub schema: SchemaRef,
    pub partition: Partition,
    /// Application transaction id of the source version read.
    pub app_id: &'static str,
    /// Table comment when created.
    pub comment: &'static str,
    /// The source's date expression the filter of a range run or a set of
    /// changed dates applies to (`date`, or e.g. a stop date).
    pub source_date: &'static str,
    /// Another (app id, value) recorded with every commit; when the target
    /// holds a different value, all progress is void (e.g. the hash of the
    /// tariffs the lines were priced with).
    pub pin: Option<(&'static str, i64)>,
    pub compute: Box<dyn Compute>,
}

/// What a run recomputes in the target.
struct Affected {
    where_sql: String,
    predicate: Expr,
    /// Partitions rewritten, when known before computing.
    known: Option<u64>,
}

pub(crate) fn first_of_month(d: NaiveDate) -> NaiveDate {
    d.with_day(1).unwrap_or(d)
}

pub(crate) fn next_month(d: NaiveDate) -> NaiveDate {
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(d)
}

fn month_of(d: NaiveDate) -> String {
    d.format("%Y-%m").to_string()
}

impl GoldJob {
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    fn partition_column(&self) -> &'static str {
        match self.partition {
            Partition::Date => "date",
            Partition::Month => "month",
        }
    }

    /// The filter and predicate of a `--from/--to` run.
    fn range(&self, opts: &RunOptions) -> Affected {
        match self.partition {
            Partition::Date => {
                let mut p = col("date").is_not_null();
                if let Some(from) = opts.from {
                    p = p.and(col("date").gt_eq(date_lit(from)));
                }
                if let Some(to) = opts.to {
                    p = p.and(col("date").lt_eq(date_lit(to)));
                }
                Affected {
                    where_sql: range_sql(self.source_date, opts),
                    predicate: p,
                    known: None,
                }
            }
            Partition::Month => {
                let mut sql = vec!["TRUE".to_string()];
                let mut p = col("month").is_not_null();
                if let Some(from) = opts.from {
                    sql.push(format!(
                        "{} >= DATE '{}'",
                        self.source_date,
                        first_of_month(from)
                    ));
                    p = p.and(col("month").gt_eq(lit(month_of(from))));
                }
                if let Some(to) = opts.to {
                    sql.push(format!("{} < DATE '{}'", self.source_date, next_month(to)));
                    p = p.and(col("month").lt_eq(lit(month_of(to))));
                }
                Affected {
                    where_sql: sql.join(" AND "),
                    predicate: p,
                    known: None,
                }
            }
        }
    }

    /// The filter and predicate for changed source dates `days` (mapped by
    /// [`Compute::affected`]); `None` when nothing is affected.
    async fn changed(
        &self,
        ctx: &SessionContext,
        days: BTreeSet<i32>,
    ) -> Result<Option<Affected>, PipelineError> {
        let days = if days.is_empty() {
            days
        } else {
            self.compute.affected(ctx, days).await?
        };
        if days.is_empty() {
            return Ok(None);
        }
        Ok(Some(match self.partition {
            Partition::Date => Affected {
                where_sql: date_in_sql(self.source_date, &days),
                predicate: date_in("date", &days),
                known: Some(days.len() as u64),
            },
            Partition::Month => {
                let months: BTreeSet<NaiveDate> = days
                    .into_iter()
                    .map(|d| first_of_month(date_of_days(d)))
                    .collect();
                let sql: Vec<String> = months
                    .iter()
                    .map(|m| {
                        format!(
                            "({d} >= DATE '{m}' AND {d} < DATE '{}')",
                            next_month(*m),
                            d = self.source_date
                        )
                    })
                    .collect();
                Affected {
                    where_sql: format!("({})", sql.join(" OR ")),
                    predicate: col("month")
                        .in_list(months.iter().map(|m| lit(month_of(*m))).collect(), false),
                    known: Some(months.len() as u64),
                }
            }
        }))
    }

    /// Brings the table up to date with its source (see the module docs).
    pub(crate) async fn run(
        &self,
        ctx: &SessionContext,
        lake_url: &str,
        config: &PipelineConfig,
        opts: &RunOptions,
    ) -> Result<TableSummary, PipelineError> {
        let started = Instant::now();
        let mut summary = empty(self.name);
        let src_loc = lake::table_location(lake_url, self.source)?;
        let Some(src) = lake::load_table(&src_loc, &config.storage_options).await? else {
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(summary);
        };
        let src_version = src.version().unwrap_or(0);
        let loc = lake::table_location(lake_url, self.target)?;
        let partition = self.partition_column();
        let gold = lake::open_or_create(
            &loc,
            &config.storage_options,
            &self.schema,
            partition,
            self.comment,
        )
        .await?;
        let mut done = lake::app_version(&gold, &loc, self.app_id).await?;
        if let Some((pin_id, value)) = self.pin {
            let held = lake::app_version(&gold, &loc, pin_id).await?;
            if held != Some(value) {
                if held.is_some() {
                    tracing::info!(
                        table = self.name,
                        "{pin_id} changed: recomputing the whole table"
                    );
                }
                done = None;
            }
        }
        let Some(scope) = scope(&src, &src_loc, src_version, done, opts).await? else {
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(summary);
        };
        let mut txns: Vec<(&str, i64)> = Vec::new();
        if !opts.is_range() {
            txns.push((self.app_id, src_version as i64));
            txns.extend(self.pin);
        }
        ctx.register_table(SRC, lake::provider(ctx, &src, &src_loc).await?)?;
        ctx.register_table(CUR, lake::provider(ctx, &gold, &loc).await?)?;
        let result = async {
            let affected = match &scope {
                Scope::All => Affected {
                    where_sql: "TRUE".into(),
                    predicate: col(partition).is_not_null(),
                    known: None,
                },
                Scope::Range => self.range(opts),
                Scope::Partitions(parts) => match self.changed(ctx, parse_days(parts)).await? {
                    Some(a) => a,
                    None => return Ok(None),
                },
            };
            let computed = self.compute.compute(ctx, &affected.where_sql).await?;
            Ok::<_, PipelineError>(Some((affected, computed)))
        }
        .await;
        ctx.deregister_table(SRC)?;
        ctx.deregister_table(CUR)?;
        let Some((affected, computed)) = result? else {
            lake::record_progress(gold, &loc, &self.schema, partition, &txns).await?;
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(summary);
        };
        let batches = computed
            .batches
            .iter()
            .map(|b| lake::conform(b, &self.schema))
            .collect::<Result<Vec<_>, _>>()?;
        summary.rows_in = computed.rows_in;
        summary.rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
        summary.dates_rewritten = affected
            .known
            .unwrap_or_else(|| distinct_partitions(&batches));
        lake::replace_where(
            ctx,
            gold,
            &loc,
            &self.schema,
            partition,
            batches,
            affected.predicate,
            &txns,
        )
        .await?;
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// Distinct values of the first column (the partition: a date or a month).
fn distinct_partitions(batches: &[RecordBatch]) -> u64 {
    let mut days = BTreeSet::new();
    let mut months = BTreeSet::new();
    for b in batches {
        let c = b.column(0).as_any();
        if let Some(d) = c.downcast_ref::<Date32Array>() {
            days.extend(d.iter().flatten());
        } else if let Some(m) = c.downcast_ref::<StringArray>() {
            months.extend(m.iter().flatten().map(str::to_owned));
        }
    }
    (days.len() + months.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_arithmetic() {
        let d = NaiveDate::from_ymd_opt(2025, 12, 17).unwrap();
        assert_eq!(
            first_of_month(d),
            NaiveDate::from_ymd_opt(2025, 12, 1).unwrap()
        );
        assert_eq!(next_month(d), NaiveDate::from_ymd_opt(2026, 1, 1).unwrap());
        let f = NaiveDate::from_ymd_opt(2025, 2, 28).unwrap();
        assert_eq!(next_month(f), NaiveDate::from_ymd_opt(2025, 3, 1).unwrap());
        assert_eq!(month_of(f), "2025-02");
    }
}
