//! `gold.daily_faults` and `gold.fault_ranking`.
//!
//! Both follow their source incrementally through its Delta log (see
//! [`crate::lake`]): `gold.daily_faults` records the silver version it has
//! processed and recomputes the event dates whose silver partitions changed;
//! `gold.fault_ranking` records the daily_faults version and recomputes the
//! months containing changed dates. Tracking the source log, rather than
//! being told by the silver job what it rewrote, keeps gold correct when a run
//! stops between stages or when `--stage gold` runs alone.

use std::collections::BTreeSet;
use std::time::Instant;

use chrono::{Datelike, NaiveDate};
use deltalake::arrow::array::{Array, Int64Array, RecordBatch};
use deltalake::datafusion::prelude::{Expr, SessionContext, col, lit};
use deltalake::datafusion::scalar::ScalarValue;
use schemas::tables::{
    GOLD_DAILY_FAULTS, GOLD_FAULT_RANKING, SILVER_STATUS_EVENTS, daily_faults_schema,
    fault_ranking_schema,
};

use crate::lake;
use crate::silver::{date_in, date_in_sql, days_of_date, range_sql};
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of the daily table.
pub const DAILY_TABLE: &str = "gold.daily_faults";
/// SQL name of the ranking table.
pub const RANKING_TABLE: &str = "gold.fault_ranking";
/// Application transaction id in daily_faults: version = silver version read.
pub const DAILY_APP_ID: &str = "pipeline-gold-daily_faults";
/// Application transaction id in fault_ranking: version = daily_faults
/// version read.
pub const RANKING_APP_ID: &str = "pipeline-gold-fault_ranking";

/// What part of a table a run recomputes.
pub(crate) enum Scope {
    /// Everything (first run, or the source log is gone).
    All,
    /// These source partitions (values of the source's partition column).
    Partitions(BTreeSet<String>),
    /// The `--from/--to` range.
    Range,
}

/// Decides the scope from the recorded progress; `None` = up to date.
pub(crate) async fn scope(
    source: &deltalake::DeltaTable,
    source_loc: &str,
    source_version: u64,
    done: Option<i64>,
    opts: &RunOptions,
) -> Result<Option<Scope>, PipelineError> {
    if opts.is_range() {
        return Ok(Some(Scope::Range));
    }
    match done {
        None => Ok(Some(Scope::All)),
        Some(v) if v >= source_version as i64 => Ok(None),
        Some(v) => {
            let changes =
                lake::changes_between(source, source_loc, v.max(0) as u64, source_version, "date")
                    .await?;
            if changes.complete {
                let mut parts = changes.partitions;
                parts.extend(changes.reread_partitions);
                Ok(Some(Scope::Partitions(parts)))
            } else {
                tracing::warn!(
                    table = source_loc,
                    since = v,
                    "log entries are gone: recomputing everything"
                );
                Ok(Some(Scope::All))
            }
        }
    }
}

pub(crate) fn parse_days(parts: &BTreeSet<String>) -> BTreeSet<i32> {
    parts
        .iter()
        .filter_map(|p| NaiveDate::parse_from_str(p, "%Y-%m-%d").ok())
        .map(days_of_date)
        .collect()
}

pub(crate) fn date_lit(d: NaiveDate) -> Expr {
    lit(ScalarValue::Date32(Some(days_of_date(d))))
}

fn first_of_month(d: NaiveDate) -> NaiveDate {
    d.with_day(1).unwrap_or(d)
}

fn next_month(d: NaiveDate) -> NaiveDate {
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(d)
}

pub(crate) fn first_i64(batches: &[RecordBatch]) -> u64 {
    batches
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Int64Array>().cloned())
        .filter(|a| !a.is_empty() && !a.is_null(0))
        .map(|a| a.value(0).max(0) as u64)
        .unwrap_or(0)
}

pub(crate) fn empty(name: &str) -> TableSummary {
    TableSummary {
        name: name.into(),
        rows_in: 0,
        rows_out: 0,
        dates_rewritten: 0,
        seconds: 0.0,
    }
}

/// Recomputes `gold.daily_faults` (faulted status events per station per
/// event date) for the dates whose silver rows changed.
pub async fn daily_faults(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = empty(DAILY_TABLE);
    let silver_loc = lake::table_location(lake_url, SILVER_STATUS_EVENTS)?;
    let Some(silver) = lake::load_table(&silver_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let silver_version = silver.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, GOLD_DAILY_FAULTS)?;
    let schema = daily_faults_schema();
    let daily = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "date",
        "gold.daily_faults: faulted status events per station per UTC event date",
    )
    .await?;
    let done = lake::app_version(&daily, &loc, DAILY_APP_ID).await?;
    let Some(scope) = scope(&silver, &silver_loc, silver_version, done, opts).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((DAILY_APP_ID, silver_version as i64));
    let (where_sql, predicate, known_dates) = match &scope {
        Scope::All => ("TRUE".to_string(), col("date").is_not_null(), None),
        Scope::Range => {
            let mut p = col("date").is_not_null();
            if let Some(from) = opts.from {
                p = p.and(col("date").gt_eq(date_lit(from)));
            }
            if let Some(to) = opts.to {
                p = p.and(col("date").lt_eq(date_lit(to)));
            }
            (range_sql("date", opts), p, None)
        }
        Scope::Partitions(parts) => {
            let days = parse_days(parts);
            if days.is_empty() {
                lake::record_progress(daily, &loc, &schema, "date", txn.as_slice()).await?;
                summary.seconds = started.elapsed().as_secs_f64();
                return Ok(summary);
            }
            (
                date_in_sql("date", &days),
                date_in("date", &days),
                Some(days.len()),
            )
        }
    };
    ctx.register_table(
        "silver_src",
        lake::provider(ctx, &silver, &silver_loc).await?,
    )?;
    let counted = ctx
        .sql(&format!(
            "SELECT COUNT(*) FROM silver_src WHERE is_fault AND {where_sql}"
        ))
        .await?
        .collect()
        .await;
    let result = ctx
        .sql(&format!(
            "SELECT date, station_id, COUNT(*) AS fault_count FROM (
                 SELECT CAST(date AS DATE) AS date, CAST(station_id AS VARCHAR) AS station_id
                 FROM silver_src WHERE is_fault AND {where_sql})
             GROUP BY date, station_id ORDER BY date, station_id"
        ))
        .await?
        .collect()
        .await;
    ctx.deregister_table("silver_src")?;
    summary.rows_in = first_i64(&counted?);
    let batches = result?
        .iter()
        .map(|b| lake::conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    summary.rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    summary.dates_rewritten = match known_dates {
        Some(n) => n as u64,
        None => distinct_dates(&batches),
    };
    lake::replace_where(
        ctx,
        daily,
        &loc,
        &schema,
        "date",
        batches,
        predicate,
        txn.as_slice(),
    )
    .await?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

pub(crate) fn distinct_dates(batches: &[RecordBatch]) -> u64 {
    let mut days = BTreeSet::new();
    for b in batches {
        if let Some(d) = b
            .column(0)
            .as_any()
            .downcast_ref::<deltalake::arrow::array::Date32Array>()
        {
            days.extend(d.iter().flatten());
        }
    }
    days.len() as u64
}

/// Recomputes `gold.fault_ranking` for the months whose daily faults changed.
///
/// Per month, a station is listed if on at least one day it had at least
/// `fault_threshold` faults. `total_faults` counts all its faults that month
/// (also on days below the threshold); `days_with_5_or_more` counts the days
/// at or above the configured threshold (the column keeps the design's name
/// whatever the threshold); `worst_day` is its day with the most faults (the
/// earliest such day on a tie). `rank` is a row number: 1, 2, 3, ... by
/// `total_faults` descending, ties broken by `station_id` ascending, so every
/// station has a distinct, stable rank and a report can sort by it.
pub async fn fault_ranking(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = empty(RANKING_TABLE);
    let daily_loc = lake::table_location(lake_url, GOLD_DAILY_FAULTS)?;
    let Some(daily) = lake::load_table(&daily_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let daily_version = daily.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, GOLD_FAULT_RANKING)?;
    let schema = fault_ranking_schema();
    let ranking = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "month",
        "gold.fault_ranking: per month, stations with a day at or above the fault threshold",
    )
    .await?;
    let done = lake::app_version(&ranking, &loc, RANKING_APP_ID).await?;
    let Some(scope) = scope(&daily, &daily_loc, daily_version, done, opts).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((RANKING_APP_ID, daily_version as i64));
    let month_of = |d: NaiveDate| d.format("%Y-%m").to_string();
    let (where_sql, predicate, known_months) = match &scope {
        Scope::All => ("TRUE".to_string(), col("month").is_not_null(), None),
        Scope::Range => {
            let mut sql = vec!["TRUE".to_string()];
            let mut p = col("month").is_not_null();
            if let Some(from) = opts.from {
                sql.push(format!("date >= DATE '{}'", first_of_month(from)));
                p = p.and(col("month").gt_eq(lit(month_of(from))));
            }
            if let Some(to) = opts.to {
                sql.push(format!("date < DATE '{}'", next_month(to)));
                p = p.and(col("month").lt_eq(lit(month_of(to))));
            }
            (sql.join(" AND "), p, None)
        }
        Scope::Partitions(parts) => {
            let months: BTreeSet<NaiveDate> = parse_days(parts)
                .into_iter()
                .map(|d| first_of_month(crate::silver::date_of_days(d)))
                .collect();
            if months.is_empty() {
                lake::record_progress(ranking, &loc, &schema, "month", txn.as_slice()).await?;
                summary.seconds = started.elapsed().as_secs_f64();
                return Ok(summary);
            }
            let sql: Vec<String> = months
                .iter()
                .map(|m| format!("(date >= DATE '{m}' AND date < DATE '{}')", next_month(*m)))
                .collect();
            let p = col("month").in_list(months.iter().map(|m| lit(month_of(*m))).collect(), false);
            (format!("({})", sql.join(" OR ")), p, Some(months.len()))
        }
    };
    let threshold = config.fault_threshold.max(1);
    ctx.register_table("daily_src", lake::provider(ctx, &daily, &daily_loc).await?)?;
    let counted = ctx
        .sql(&format!("SELECT COUNT(*) FROM daily_src WHERE {where_sql}"))
        .await?
        .collect()
        .await;
    let result = ctx
        .sql(&format!(
            "WITH d AS (
                 SELECT to_char(date, '%Y-%m') AS month, date, station_id, fault_count
                 FROM (SELECT CAST(date AS DATE) AS date,
                              CAST(station_id AS VARCHAR) AS station_id,
                              CAST(fault_count AS BIGINT) AS fault_count
                       FROM daily_src WHERE {where_sql})),
             s AS (
                 SELECT month, station_id,
                        SUM(fault_count) AS total_faults,
                        SUM(CASE WHEN fault_count >= {threshold} THEN 1 ELSE 0 END) AS days_at_threshold
                 FROM d GROUP BY month, station_id),
             w AS (
                 SELECT month, station_id, date AS worst_day, fault_count AS worst_day_faults,
                        row_number() OVER (PARTITION BY month, station_id
                                           ORDER BY fault_count DESC, date ASC) AS rn
                 FROM d)
             SELECT s.month AS month, s.station_id AS station_id, s.total_faults AS total_faults,
                    s.days_at_threshold AS days_with_5_or_more,
                    w.worst_day AS worst_day, w.worst_day_faults AS worst_day_faults,
                    CAST(row_number() OVER (PARTITION BY s.month
                                            ORDER BY s.total_faults DESC, s.station_id ASC)
                         AS BIGINT) AS \"rank\"
             FROM s JOIN w ON s.month = w.month AND s.station_id = w.station_id AND w.rn = 1
             WHERE s.days_at_threshold > 0
             ORDER BY month, \"rank\""
        ))
        .await?
        .collect()
        .await;
    ctx.deregister_table("daily_src")?;
    summary.rows_in = first_i64(&counted?);
    let batches = result?
        .iter()
        .map(|b| lake::conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    summary.rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    summary.dates_rewritten = match known_months {
        Some(n) => n as u64,
        None => {
            let mut months = BTreeSet::new();
            for b in &batches {
                if let Some(m) = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<deltalake::arrow::array::StringArray>()
                {
                    months.extend(m.iter().flatten().map(str::to_owned));
                }
            }
            months.len() as u64
        }
    };
    lake::replace_where(
        ctx,
        ranking,
        &loc,
        &schema,
        "month",
        batches,
        predicate,
        txn.as_slice(),
    )
    .await?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
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
    }
}
