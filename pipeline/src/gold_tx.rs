//! `gold.transactions_completed` (one row per completed transaction, by stop
//! date) and `gold.completed_transactions` (per station per stop date).
//!
//! Incremental like the fault tables ([`crate::gold`]): each records the
//! version of its source it has read. `silver.transactions` is partitioned by
//! start date but the detail by stop date, so a changed silver partition
//! maps to the stop dates of its transactions plus the detail dates those
//! transactions were on before; those dates are recomputed from all of
//! silver (a filter on `stopped_at`). The daily table recomputes the dates
//! whose detail partitions changed.

use std::collections::BTreeSet;
use std::time::Instant;

use deltalake::datafusion::prelude::{SessionContext, col};
use schemas::tables::{
    GOLD_COMPLETED_TRANSACTIONS, GOLD_TRANSACTIONS_COMPLETED, SILVER_TRANSACTIONS,
    completed_transactions_schema, transactions_completed_schema,
};

use crate::gold::{Scope, date_lit, distinct_dates, empty, first_i64, parse_days, scope};
use crate::incremental::dates;
use crate::lake;
use crate::silver::{date_in, date_in_sql, range_sql};
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of the detail table.
pub const DETAIL_TABLE: &str = "gold.transactions_completed";
/// SQL name of the daily table.
pub const DAILY_TABLE: &str = "gold.completed_transactions";
/// Application transaction id in the detail: silver.transactions version read.
pub const DETAIL_APP_ID: &str = "pipeline-gold-transactions_completed";
/// Application transaction id in the daily table: detail version read.
pub const DAILY_APP_ID: &str = "pipeline-gold-completed_transactions";

fn range_predicate(opts: &RunOptions) -> deltalake::datafusion::prelude::Expr {
    let mut p = col("date").is_not_null();
    if let Some(from) = opts.from {
        p = p.and(col("date").gt_eq(date_lit(from)));
    }
    if let Some(to) = opts.to {
        p = p.and(col("date").lt_eq(date_lit(to)));
    }
    p
}

/// Recomputes `gold.transactions_completed` for the stop dates touched by
/// changed `silver.transactions` partitions.
pub async fn transactions_completed(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = empty(DETAIL_TABLE);
    let src_loc = lake::table_location(lake_url, SILVER_TRANSACTIONS)?;
    let Some(src) = lake::load_table(&src_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let src_version = src.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, GOLD_TRANSACTIONS_COMPLETED)?;
    let schema = transactions_completed_schema();
    let gold = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "date",
        "gold.transactions_completed: completed transactions by UTC stop date",
    )
    .await?;
    let done = lake::app_version(&gold, &loc, DETAIL_APP_ID).await?;
    let Some(scope) = scope(&src, &src_loc, src_version, done, opts).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((DETAIL_APP_ID, src_version as i64));
    ctx.register_table("tx_src", lake::provider(ctx, &src, &src_loc).await?)?;
    ctx.register_table("tx_gold", lake::provider(ctx, &gold, &loc).await?)?;
    let stop_date = "CAST(stopped_at AS DATE)";
    let result = async {
        let (where_sql, predicate, known) = match &scope {
            Scope::All => ("TRUE".to_string(), col("date").is_not_null(), None),
            Scope::Range => (range_sql(stop_date, opts), range_predicate(opts), None),
            Scope::Partitions(parts) => {
                let changed = parse_days(parts);
                let mut days = BTreeSet::new();
                if !changed.is_empty() {
                    let cond = date_in_sql("date", &changed);
                    let found = ctx
                        .sql(&format!(
                            "SELECT DISTINCT {stop_date} AS date FROM tx_src
                               WHERE is_complete AND {cond}
                             UNION
                             SELECT DISTINCT CAST(g.date AS DATE) AS date FROM tx_gold g
                               JOIN (SELECT station_id AS s, transaction_id AS t
                                     FROM tx_src WHERE {cond}) k
                               ON g.station_id = k.s AND g.transaction_id = k.t"
                        ))
                        .await?
                        .collect()
                        .await?;
                    for b in &found {
                        days.extend(dates(b, "date")?.iter().flatten());
                    }
                }
                if days.is_empty() {
                    return Ok::<_, PipelineError>(None);
                }
                (
                    date_in_sql(stop_date, &days),
                    date_in("date", &days),
                    Some(days.len() as u64),
                )
            }
        };
        let counted = ctx
            .sql(&format!(
                "SELECT COUNT(*) FROM tx_src WHERE is_complete AND {where_sql}"
            ))
            .await?
            .collect()
            .await?;
        let batches = ctx
            .sql(&format!(
                "SELECT {stop_date} AS date, CAST(station_id AS VARCHAR) AS station_id,
                        CAST(transaction_id AS VARCHAR) AS transaction_id,
                        CAST(id_token AS VARCHAR) AS id_token, started_at, stopped_at,
                        (CAST(stopped_at AS BIGINT) - CAST(started_at AS BIGINT)) / 1000000
                            AS duration_s,
                        energy_wh / 1000.0 AS energy_kwh,
                        CAST(energy_flag AS VARCHAR) AS energy_flag
                 FROM tx_src WHERE is_complete AND {where_sql}"
            ))
            .await?
            .collect()
            .await?;
        Ok(Some((first_i64(&counted), batches, predicate, known)))
    }
    .await;
    ctx.deregister_table("tx_src")?;
    ctx.deregister_table("tx_gold")?;
    let Some((rows_in, batches, predicate, known)) = result? else {
        lake::record_progress(gold, &loc, &schema, "date", txn.as_slice()).await?;
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let batches = batches
        .iter()
        .map(|b| lake::conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    summary.rows_in = rows_in;
    summary.rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    summary.dates_rewritten = known.unwrap_or_else(|| distinct_dates(&batches));
    lake::replace_where(
        ctx,
        gold,
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

/// Recomputes `gold.completed_transactions` for the dates whose detail rows
/// changed. `energy_kwh` sums unflagged transactions (flagged ones have no
/// energy); `p95_duration_s` is the exact 95th percentile, linearly
/// interpolated between the two nearest ranks (as `percentile_cont`, whose
/// floating-point result is off in the sixth digit), in integer arithmetic
/// until the final division.
pub async fn completed_transactions(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = empty(DAILY_TABLE);
    let src_loc = lake::table_location(lake_url, GOLD_TRANSACTIONS_COMPLETED)?;
    let Some(src) = lake::load_table(&src_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let src_version = src.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, GOLD_COMPLETED_TRANSACTIONS)?;
    let schema = completed_transactions_schema();
    let gold = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "date",
        "gold.completed_transactions: completed transactions per station per UTC stop date",
    )
    .await?;
    let done = lake::app_version(&gold, &loc, DAILY_APP_ID).await?;
    let Some(scope) = scope(&src, &src_loc, src_version, done, opts).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((DAILY_APP_ID, src_version as i64));
    let (where_sql, predicate, known) = match &scope {
        Scope::All => ("TRUE".to_string(), col("date").is_not_null(), None),
        Scope::Range => (range_sql("date", opts), range_predicate(opts), None),
        Scope::Partitions(parts) => {
            let days = parse_days(parts);
            if days.is_empty() {
                lake::record_progress(gold, &loc, &schema, "date", txn.as_slice()).await?;
                summary.seconds = started.elapsed().as_secs_f64();
                return Ok(summary);
            }
            (
                date_in_sql("date", &days),
                date_in("date", &days),
                Some(days.len() as u64),
            )
        }
    };
    ctx.register_table("ct_src", lake::provider(ctx, &src, &src_loc).await?)?;
    let counted = ctx
        .sql(&format!("SELECT COUNT(*) FROM ct_src WHERE {where_sql}"))
        .await?
        .collect()
        .await;
    let result = ctx
        .sql(&format!(
            "WITH b AS (
                 SELECT CAST(date AS DATE) AS date, CAST(station_id AS VARCHAR) AS station_id,
                        energy_kwh, duration_s
                 FROM ct_src WHERE {where_sql}),
             r AS (
                 SELECT *, CAST(row_number() OVER (PARTITION BY date, station_id
                                                   ORDER BY duration_s) AS BIGINT) - 1 AS i,
                        CAST(COUNT(*) OVER (PARTITION BY date, station_id) AS BIGINT) AS n
                 FROM b),
             p AS (SELECT *, (95 * (n - 1)) / 100 AS lo, (95 * (n - 1)) % 100 AS frac FROM r)
             SELECT date, station_id, COUNT(*) AS transactions,
                    COALESCE(SUM(energy_kwh), 0.0) AS energy_kwh,
                    SUM(duration_s) AS total_duration_s,
                    AVG(CAST(duration_s AS DOUBLE)) AS avg_duration_s,
                    CAST(MAX(CASE WHEN i = lo THEN duration_s END) AS DOUBLE)
                      + CAST(COALESCE(MAX(CASE WHEN i = lo + 1 THEN duration_s END)
                                      - MAX(CASE WHEN i = lo THEN duration_s END), 0)
                             * MAX(frac) AS DOUBLE) / 100.0 AS p95_duration_s
             FROM p
             GROUP BY date, station_id ORDER BY date, station_id"
        ))
        .await?
        .collect()
        .await;
    ctx.deregister_table("ct_src")?;
    summary.rows_in = first_i64(&counted?);
    let batches = result?
        .iter()
        .map(|b| lake::conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    summary.rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    summary.dates_rewritten = known.unwrap_or_else(|| distinct_dates(&batches));
    lake::replace_where(
        ctx,
        gold,
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
