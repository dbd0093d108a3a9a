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
//! changed billing dates. A rerun with nothing new writes nothing. Both run
//! through the shared gold driver ([`crate::gold_job`]; the tariff hash is
//! its `pin`).
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

use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Float64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::datasource::MemTable;
use deltalake::datafusion::prelude::SessionContext;
use futures_util::future::BoxFuture;
use schemas::tables::{
    GOLD_BILLING, GOLD_BILLING_STATEMENTS, GOLD_TRANSACTIONS_COMPLETED, SILVER_METER_VALUES,
    SILVER_TRANSACTIONS, billing_schema, billing_statements_schema,
};

use crate::gold_job::{Compute, Computed, GoldJob, Partition, SRC, Sql, WHERE};
use crate::incremental::{dates, floats, ints, scan_sql, strings, timestamps};
use crate::lake;
use crate::silver::date_of_days;
use crate::tariffs::{Split, TariffBook, price};
use crate::{PipelineConfig, PipelineError};

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

/// `gold.billing`: reprices the stop dates whose detail partitions changed
/// (everything when the tariff file changed).
pub(crate) fn billing(
    tariffs: Arc<TariffBook>,
    lake_url: &str,
    config: &PipelineConfig,
) -> GoldJob {
    GoldJob {
        name: BILLING_TABLE,
        source: GOLD_TRANSACTIONS_COMPLETED,
        target: GOLD_BILLING,
        schema: billing_schema(),
        partition: Partition::Date,
        app_id: BILLING_APP_ID,
        comment: "gold.billing: completed transactions priced with the tariff in force, by UTC stop date",
        source_date: "date",
        pin: Some((TARIFFS_APP_ID, tariffs.hash)),
        compute: Box::new(Pricing {
            tariffs,
            lake_url: lake_url.to_string(),
            storage_options: config.storage_options.clone(),
        }),
    }
}

/// Prices detail rows with the tariffs, reading their meter readings.
struct Pricing {
    tariffs: Arc<TariffBook>,
    lake_url: String,
    storage_options: HashMap<String, String>,
}

impl Compute for Pricing {
    fn compute<'a>(
        &'a self,
        ctx: &'a SessionContext,
        where_sql: &'a str,
    ) -> BoxFuture<'a, Result<Computed, PipelineError>> {
        Box::pin(async move {
            let lines = read_lines(ctx, where_sql).await?;
            let readings =
                read_readings(ctx, &self.lake_url, &self.storage_options, &lines).await?;
            let batch = price_lines(&billing_schema(), &lines, &readings, &self.tariffs)?;
            Ok(Computed {
                rows_in: lines.len() as u64,
                batches: vec![batch],
            })
        })
    }
}

/// The detail rows matching `where_sql` (the source registered as [`SRC`]).
async fn read_lines(ctx: &SessionContext, where_sql: &str) -> Result<Vec<Line>, PipelineError> {
    let mut lines = Vec::new();
    scan_sql(
        ctx,
        &format!(
            "SELECT CAST(date AS DATE) AS date, station_id, transaction_id, id_token, started_at,
                    stopped_at, duration_s, energy_kwh, energy_flag
             FROM {SRC} WHERE {where_sql}"
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
    storage_options: &HashMap<String, String>,
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
        if let Some(stx) = lake::load_table(&stx_loc, storage_options).await? {
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
        if let Some(mv) = lake::load_table(&mv_loc, storage_options).await? {
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

/// `gold.billing_statements`, recomputed for the months of changed billing
/// dates: per month (of the stop date), id token and currency, the priced
/// lines, their unflagged energy and their total cost (the sum of the
/// rounded line totals).
pub(crate) fn billing_statements() -> GoldJob {
    GoldJob {
        name: STATEMENTS_TABLE,
        source: GOLD_BILLING,
        target: GOLD_BILLING_STATEMENTS,
        schema: billing_statements_schema(),
        partition: Partition::Month,
        app_id: STATEMENTS_APP_ID,
        comment: "gold.billing_statements: per month, id token and currency, priced transactions",
        source_date: "date",
        pin: None,
        // Line costs have at most 6 decimals, so rounding the sum to 6
        // removes only floating-point noise.
        compute: Box::new(Sql {
            count: format!("SELECT COUNT(*) FROM {SRC} WHERE {WHERE}"),
            select: format!(
                "SELECT to_char(CAST(date AS DATE), '%Y-%m') AS month,
                        CAST(id_token AS VARCHAR) AS id_token,
                        CAST(currency AS VARCHAR) AS currency,
                        COUNT(*) AS transactions,
                        ROUND(COALESCE(SUM(energy_kwh), 0.0), 6) AS energy_kwh,
                        ROUND(SUM(total_cost), 6) AS total_cost
                 FROM {SRC}
                 WHERE {WHERE} AND tariff_id IS NOT NULL
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
            ),
        }),
    }
}
