//! `gold.billing` (one priced line per completed transaction, by stop date)
//! and `gold.billing_statements` (per month, id token and currency), priced
//! with the versioned tariffs of [`crate::tariffs`].
//!
//! # Incremental
//! `gold.billing` follows `gold.transactions_completed`, which has the same
//! stop-date partitions: a changed detail partition is recomputed as a
//! whole, reading the transactions' meter start/stop from
//! `silver.transactions` and their register samples from
//! `silver.meter_values`. Late samples need no separate tracking: any change
//! to a transaction's samples makes `silver.transactions` rewrite it and the
//! detail rewrite its stop date. The table records two application
//! transactions in each commit: the detail version read
//! ([`BILLING_APP_ID`]) and the hash of the tariff file priced with
//! ([`TARIFFS_APP_ID`]); a different hash reprices every line. The
//! statements record the billing version read and recompute the months of
//! changed billing dates. A rerun with nothing new writes nothing.
//!
//! # Lines
//! The tariff is the one in force at the start ([`TariffBook::in_force`]).
//! Flagged energy (`energy_flag` set) is priced 0 and its energy columns are
//! null; the per-minute fee still applies. A transaction before every
//! tariff's start has null costs and is left out of the statements.
//! `is_complete_data` is true only for a priced line whose energy split is
//! metered.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{Datelike, NaiveDate};
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Float64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::datasource::MemTable;
use deltalake::datafusion::prelude::{Expr, SessionContext, col, lit};
use schemas::tables::{
    GOLD_BILLING, GOLD_BILLING_STATEMENTS, GOLD_TRANSACTIONS_COMPLETED, SILVER_METER_VALUES,
    SILVER_TRANSACTIONS, billing_schema, billing_statements_schema,
};

use crate::gold::{Scope, date_lit, distinct_dates, empty, first_i64, parse_days, scope};
use crate::incremental::{dates, floats, ints, scan_sql, strings, timestamps};
use crate::lake;
use crate::silver::{date_in, date_in_sql, date_of_days, range_sql};
use crate::tariffs::{Split, TariffBook, price};
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of the billing lines.
pub const BILLING_TABLE: &str = "gold.billing";
/// SQL name of the statements.
pub const STATEMENTS_TABLE: &str = "gold.billing_statements";
/// Application transaction id in gold.billing: detail version read.
pub const BILLING_APP_ID: &str = "pipeline-gold-billing";
/// Application transaction id in gold.billing: the tariff file's hash
/// ([`TariffBook::hash`]) the lines are priced with.
pub const TARIFFS_APP_ID: &str = "pipeline-gold-billing-tariffs";
/// Application transaction id in the statements: gold.billing version read.
pub const STATEMENTS_APP_ID: &str = "pipeline-gold-billing_statements";

/// A completed transaction to price.
struct Line {
    date: i32,
    station_id: String,
    transaction_id: String,
    id_token: Option<String>,
    started_at: i64,
    stopped_at: i64,
    duration_s: i64,
    energy_kwh: Option<f64>,
    energy_flag: Option<String>,
}

type Key = (String, String);

fn range_predicate(column: &str, opts: &RunOptions) -> Expr {
    let mut p = col(column).is_not_null();
    if let Some(from) = opts.from {
        p = p.and(col(column).gt_eq(date_lit(from)));
    }
    if let Some(to) = opts.to {
        p = p.and(col(column).lt_eq(date_lit(to)));
    }
    p
}

/// Reprices `gold.billing` for the stop dates whose detail partitions
/// changed (everything when the tariff file changed).
pub async fn billing(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
    tariffs: &TariffBook,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = empty(BILLING_TABLE);
    let src_loc = lake::table_location(lake_url, GOLD_TRANSACTIONS_COMPLETED)?;
    let Some(src) = lake::load_table(&src_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let src_version = src.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, GOLD_BILLING)?;
    let schema = billing_schema();
    let gold = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "date",
        "gold.billing: completed transactions priced with the tariff in force, by UTC stop date",
    )
    .await?;
    let priced_with = lake::app_version(&gold, &loc, TARIFFS_APP_ID).await?;
    let done = match priced_with {
        Some(h) if h == tariffs.hash => lake::app_version(&gold, &loc, BILLING_APP_ID).await?,
        _ => {
            if priced_with.is_some() {
                tracing::info!("tariff file changed: repricing all of {BILLING_TABLE}");
            }
            None
        }
    };
    let Some(scope) = scope(&src, &src_loc, src_version, done, opts).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txns: Vec<(&str, i64)> = if opts.is_range() {
        Vec::new()
    } else {
        vec![
            (BILLING_APP_ID, src_version as i64),
            (TARIFFS_APP_ID, tariffs.hash),
        ]
    };
    let (where_sql, predicate, known) = match &scope {
        Scope::All => ("TRUE".to_string(), col("date").is_not_null(), None),
        Scope::Range => (range_sql("date", opts), range_predicate("date", opts), None),
        Scope::Partitions(parts) => {
            let days = parse_days(parts);
            if days.is_empty() {
                lake::record_progress(gold, &loc, &schema, "date", &txns).await?;
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
    ctx.register_table("bl_src", lake::provider(ctx, &src, &src_loc).await?)?;
    let lines = read_lines(ctx, &where_sql).await;
    ctx.deregister_table("bl_src")?;
    let lines = lines?;
    let readings = read_readings(ctx, lake_url, config, &lines).await?;
    let batch = price_lines(&schema, &lines, &readings, tariffs)?;
    summary.rows_in = lines.len() as u64;
    summary.rows_out = batch.num_rows() as u64;
    let batches = vec![batch];
    summary.dates_rewritten = known.unwrap_or_else(|| distinct_dates(&batches));
    lake::replace_where(ctx, gold, &loc, &schema, "date", batches, predicate, &txns).await?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The detail rows matching `where_sql` (table `bl_src` registered).
async fn read_lines(ctx: &SessionContext, where_sql: &str) -> Result<Vec<Line>, PipelineError> {
    let mut lines = Vec::new();
    scan_sql(
        ctx,
        &format!(
            "SELECT CAST(date AS DATE) AS date, station_id, transaction_id, id_token, started_at,
                    stopped_at, duration_s, energy_kwh, energy_flag
             FROM bl_src WHERE {where_sql}"
        ),
        &mut |b| {
            let d = dates(b, "date")?;
            let s = strings(b, "station_id")?;
            let t = strings(b, "transaction_id")?;
            let tok = strings(b, "id_token")?;
            let a = timestamps(b, "started_at")?;
            let z = timestamps(b, "stopped_at")?;
            let dur = ints(b, "duration_s")?;
            let kwh = floats(b, "energy_kwh")?;
            let flag = strings(b, "energy_flag")?;
            let opt = |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
            for i in 0..b.num_rows() {
                lines.push(Line {
                    date: d.value(i),
                    station_id: s.value(i).to_string(),
                    transaction_id: t.value(i).to_string(),
                    id_token: opt(&tok, i),
                    started_at: a.value(i),
                    stopped_at: z.value(i),
                    duration_s: dur.value(i),
                    energy_kwh: kwh.is_valid(i).then(|| kwh.value(i)),
                    energy_flag: opt(&flag, i),
                });
            }
            Ok(())
        },
    )
    .await?;
    lines.sort_by(|x, y| {
        (x.date, &x.station_id, x.stopped_at, &x.transaction_id).cmp(&(
            y.date,
            &y.station_id,
            y.stopped_at,
            &y.transaction_id,
        ))
    });
    Ok(lines)
}

/// The energy register readings `(µs, Wh)` of `lines`' transactions: meter
/// start/stop from `silver.transactions` and the samples of
/// `silver.meter_values` (the same selection `silver.transactions` folds).
async fn read_readings(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    lines: &[Line],
) -> Result<HashMap<Key, Vec<(i64, f64)>>, PipelineError> {
    let mut readings: HashMap<Key, Vec<(i64, f64)>> = HashMap::new();
    if lines.is_empty() {
        return Ok(readings);
    }
    let day = |us: i64| date_of_days(us.div_euclid(86_400_000_000) as i32);
    let first_start = day(lines.iter().map(|l| l.started_at).min().unwrap_or(0));
    let last_start = day(lines.iter().map(|l| l.started_at).max().unwrap_or(0));
    let last_stop = day(lines.iter().map(|l| l.stopped_at).max().unwrap_or(0));
    let keys: BTreeSet<(&str, &str)> = lines
        .iter()
        .map(|l| (l.station_id.as_str(), l.transaction_id.as_str()))
        .collect();
    let key_schema = Arc::new(Schema::new(vec![
        Field::new("k_station", DataType::Utf8, false),
        Field::new("k_tx", DataType::Utf8, false),
    ]));
    let key_batch = RecordBatch::try_new(
        key_schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.0))),
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.1))),
        ],
    )
    .map_err(|e| PipelineError::Arrow(e.to_string()))?;
    ctx.register_table(
        "bl_keys",
        Arc::new(MemTable::try_new(key_schema, vec![vec![key_batch]])?),
    )?;
    let stx_loc = lake::table_location(lake_url, SILVER_TRANSACTIONS)?;
    let mv_loc = lake::table_location(lake_url, SILVER_METER_VALUES)?;
    let result = async {
        let mut push = |b: &RecordBatch, t_col: &str, v_col: &str| -> Result<(), PipelineError> {
            let s = strings(b, "station_id")?;
            let t = strings(b, "transaction_id")?;
            let at = timestamps(b, t_col)?;
            let wh = floats(b, v_col)?;
            for i in 0..b.num_rows() {
                if at.is_valid(i) && wh.is_valid(i) {
                    readings
                        .entry((s.value(i).to_string(), t.value(i).to_string()))
                        .or_default()
                        .push((at.value(i), wh.value(i)));
                }
            }
            Ok(())
        };
        if let Some(stx) = lake::load_table(&stx_loc, &config.storage_options).await? {
            ctx.register_table("bl_stx", lake::provider(ctx, &stx, &stx_loc).await?)?;
            let r = scan_sql(
                ctx,
                &format!(
                    "SELECT station_id, transaction_id, started_at, stopped_at, meter_start_wh,
                            meter_stop_wh
                     FROM bl_stx JOIN bl_keys ON station_id = k_station AND transaction_id = k_tx
                     WHERE date >= DATE '{first_start}' AND date <= DATE '{last_start}'"
                ),
                &mut |b| {
                    push(b, "started_at", "meter_start_wh")?;
                    push(b, "stopped_at", "meter_stop_wh")
                },
            )
            .await;
            ctx.deregister_table("bl_stx")?;
            r?;
        }
        if let Some(mv) = lake::load_table(&mv_loc, &config.storage_options).await? {
            ctx.register_table("bl_mv", lake::provider(ctx, &mv, &mv_loc).await?)?;
            let r = scan_sql(
                ctx,
                &format!(
                    "SELECT station_id, transaction_id, sampled_at,
                            CASE unit WHEN 'kWh' THEN value * 1000.0 ELSE value END AS wh
                     FROM bl_mv JOIN bl_keys ON station_id = k_station AND transaction_id = k_tx
                     WHERE measurand = 'Energy.Active.Import.Register' AND phase IS NULL
                       AND unit IN ('Wh', 'kWh')
                       AND date >= DATE '{first_start}' AND date <= DATE '{last_stop}'"
                ),
                &mut |b| push(b, "sampled_at", "wh"),
            )
            .await;
            ctx.deregister_table("bl_mv")?;
            r?;
        }
        Ok::<_, PipelineError>(())
    }
    .await;
    ctx.deregister_table("bl_keys")?;
    result?;
    Ok(readings)
}

/// Prices every line (see the module docs) into one batch of `schema`.
fn price_lines(
    schema: &SchemaRef,
    lines: &[Line],
    readings: &HashMap<Key, Vec<(i64, f64)>>,
    tariffs: &TariffBook,
) -> Result<RecordBatch, PipelineError> {
    let mut unpriced = 0u64;
    let priced: Vec<_> = lines
        .iter()
        .map(|l| {
            let tariff = tariffs.in_force(&l.station_id, l.id_token.as_deref(), l.started_at);
            if tariff.is_none() {
                unpriced += 1;
            }
            let key = (l.station_id.clone(), l.transaction_id.clone());
            let r = readings.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            let energy = l.energy_kwh.filter(|_| l.energy_flag.is_none());
            (
                tariff,
                tariff.map(|t| price(t, l.started_at, l.stopped_at, energy, r)),
            )
        })
        .collect();
    if unpriced > 0 {
        tracing::warn!(
            transactions = unpriced,
            "transactions started before any tariff applies: left unpriced"
        );
        metrics::counter!("csms_pipeline_unpriced_transactions_total").increment(unpriced);
    }
    let ts = |v: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
    };
    let f64s = |f: &dyn Fn(usize) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter((0..lines.len()).map(f)))
    };
    let p = |i: usize| priced[i].1.as_ref();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from_iter_values(lines.iter().map(|l| l.date))),
        Arc::new(StringArray::from_iter_values(
            lines.iter().map(|l| &l.station_id),
        )),
        Arc::new(StringArray::from_iter_values(
            lines.iter().map(|l| &l.transaction_id),
        )),
        Arc::new(StringArray::from_iter(
            lines.iter().map(|l| l.id_token.as_deref()),
        )),
        ts(lines.iter().map(|l| l.started_at).collect()),
        ts(lines.iter().map(|l| l.stopped_at).collect()),
        f64s(&|i| Some(lines[i].duration_s as f64 / 60.0)),
        f64s(&|i| {
            lines[i]
                .energy_kwh
                .filter(|_| lines[i].energy_flag.is_none())
        }),
        f64s(&|i| p(i).and_then(|p| p.energy_kwh_peak)),
        f64s(&|i| p(i).and_then(|p| p.energy_kwh_offpeak)),
        f64s(&|i| p(i).map(|p| p.energy_cost)),
        f64s(&|i| p(i).map(|p| p.time_cost)),
        f64s(&|i| p(i).map(|p| p.total_cost)),
        Arc::new(StringArray::from_iter(
            priced.iter().map(|x| x.0.map(|t| t.currency.as_str())),
        )),
        Arc::new(StringArray::from_iter(
            priced.iter().map(|x| x.0.map(|t| t.id.as_str())),
        )),
        Arc::new(StringArray::from_iter_values((0..lines.len()).map(
            |i| match p(i) {
                Some(p) => p.split.as_str(),
                None if lines[i].energy_flag.is_some() => Split::Unavailable.as_str(),
                None => "unpriced",
            },
        ))),
        Arc::new(StringArray::from_iter(
            lines.iter().map(|l| l.energy_flag.as_deref()),
        )),
        Arc::new(BooleanArray::from_iter(
            (0..lines.len()).map(|i| Some(p(i).is_some_and(|p| p.split == Split::Metered))),
        )),
    ];
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| PipelineError::Arrow(e.to_string()))
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

/// Recomputes `gold.billing_statements` for the months of changed billing
/// dates: per month (of the stop date), id token and currency, the priced
/// lines, their unflagged energy and their total cost (the sum of the
/// rounded line totals).
pub async fn billing_statements(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = empty(STATEMENTS_TABLE);
    let src_loc = lake::table_location(lake_url, GOLD_BILLING)?;
    let Some(src) = lake::load_table(&src_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let src_version = src.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, GOLD_BILLING_STATEMENTS)?;
    let schema = billing_statements_schema();
    let gold = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "month",
        "gold.billing_statements: per month, id token and currency, priced transactions",
    )
    .await?;
    let done = lake::app_version(&gold, &loc, STATEMENTS_APP_ID).await?;
    let Some(scope) = scope(&src, &src_loc, src_version, done, opts).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((STATEMENTS_APP_ID, src_version as i64));
    let month_of = |d: NaiveDate| d.format("%Y-%m").to_string();
    let (where_sql, predicate) = match &scope {
        Scope::All => ("TRUE".to_string(), col("month").is_not_null()),
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
            (sql.join(" AND "), p)
        }
        Scope::Partitions(parts) => {
            let months: BTreeSet<NaiveDate> = parse_days(parts)
                .into_iter()
                .map(|d| first_of_month(date_of_days(d)))
                .collect();
            if months.is_empty() {
                lake::record_progress(gold, &loc, &schema, "month", txn.as_slice()).await?;
                summary.seconds = started.elapsed().as_secs_f64();
                return Ok(summary);
            }
            let sql: Vec<String> = months
                .iter()
                .map(|m| format!("(date >= DATE '{m}' AND date < DATE '{}')", next_month(*m)))
                .collect();
            let p = col("month").in_list(months.iter().map(|m| lit(month_of(*m))).collect(), false);
            (format!("({})", sql.join(" OR ")), p)
        }
    };
    ctx.register_table("bs_src", lake::provider(ctx, &src, &src_loc).await?)?;
    let counted = ctx
        .sql(&format!("SELECT COUNT(*) FROM bs_src WHERE {where_sql}"))
        .await?
        .collect()
        .await;
    // Line costs have at most 6 decimals, so rounding the sum to 6 removes
    // only floating-point noise.
    let result = ctx
        .sql(&format!(
            "SELECT to_char(CAST(date AS DATE), '%Y-%m') AS month,
                    CAST(id_token AS VARCHAR) AS id_token, CAST(currency AS VARCHAR) AS currency,
                    COUNT(*) AS transactions,
                    ROUND(COALESCE(SUM(energy_kwh), 0.0), 6) AS energy_kwh,
                    ROUND(SUM(total_cost), 6) AS total_cost
             FROM bs_src
             WHERE {where_sql} AND tariff_id IS NOT NULL
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ))
        .await?
        .collect()
        .await;
    ctx.deregister_table("bs_src")?;
    summary.rows_in = first_i64(&counted?);
    let batches = result?
        .iter()
        .map(|b| lake::conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    summary.rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    let mut months = BTreeSet::new();
    for b in &batches {
        if let Some(m) = b.column(0).as_any().downcast_ref::<StringArray>() {
            months.extend(m.iter().flatten().map(str::to_owned));
        }
    }
    summary.dates_rewritten = match &scope {
        Scope::Partitions(parts) => parse_days(parts)
            .into_iter()
            .map(|d| first_of_month(date_of_days(d)))
            .collect::<BTreeSet<_>>()
            .len() as u64,
        _ => months.len() as u64,
    };
    lake::replace_where(
        ctx,
        gold,
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
    }
}
