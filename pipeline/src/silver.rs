//! `silver.status_events`: every connector/EVSE status change chargers
//! reported, typed and deduplicated, partitioned by the UTC date of its
//! event time.
//!
//! Rows come from charger CALLs (`cs_to_csms`, message type 2) of
//! StatusNotification (all versions) and NotifyEvent (2.x, whose
//! `AvailabilityState` reports the adapter turns into status changes),
//! decoded per row in Rust through [`schemas::events_from_call`], the
//! adapters ingest uses too. Event time is the payload's timestamp, else the
//! time the message was received.
//!
//! # Deduplication
//! A row's identity is (`date`, `station_id`, `message_id`, `action`,
//! `event_index`): a retransmitted message counts once; the copy received
//! first is kept. The event date is part of the key so that the result never
//! depends on how runs batched the input, and so that a charger reusing
//! message ids after a reboot (common with 1.6 counters) does not lose
//! another day's events. Known limit: a retransmit without a payload
//! timestamp received on the other side of midnight counts twice.
//!
//! A date is rewritten only when deduplication leaves it more rows than it
//! holds: re-read copies (after bronze compaction, or a `--from/--to`
//! reprocessing) then cost no commit and no gold recomputation. The one
//! consequence: a copy re-read with an *earlier* `received_at` than the kept
//! one does not replace it (only `received_at` could differ).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{Datelike, NaiveDate};
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::compute::{cast, filter_record_batch};
use deltalake::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use deltalake::datafusion::datasource::MemTable;
use deltalake::datafusion::prelude::{Expr, SessionContext, col, lit};
use deltalake::datafusion::scalar::ScalarValue;
use futures_util::StreamExt;
use schemas::tables::{BRONZE_OCPP_MESSAGES, SILVER_STATUS_EVENTS, status_events_schema};
use schemas::{CoreEvent, OcppVersion, events_from_call};

use crate::lake;
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of the table.
pub const TABLE: &str = "silver.status_events";
/// Application transaction id in silver: version = last bronze version read.
pub const APP_ID: &str = "pipeline-silver-status_events";

const MICROS_PER_DAY: i64 = 86_400_000_000;
const EPOCH_DAYS_FROM_CE: i32 = 719_163;

/// Days since 1970-01-01 (Arrow `Date32`) as a date.
pub(crate) fn date_of_days(days: i32) -> NaiveDate {
    NaiveDate::from_num_days_from_ce_opt(days + EPOCH_DAYS_FROM_CE).unwrap_or_default()
}

/// A date as Arrow `Date32` days.
pub(crate) fn days_of_date(date: NaiveDate) -> i32 {
    date.num_days_from_ce() - EPOCH_DAYS_FROM_CE
}

/// `col IN (dates)` as a DataFusion expression.
pub(crate) fn date_in(column: &str, days: &BTreeSet<i32>) -> Expr {
    col(column).in_list(
        days.iter()
            .map(|d| lit(ScalarValue::Date32(Some(*d))))
            .collect(),
        false,
    )
}

/// `col IN (DATE '...', ...)` as SQL.
pub(crate) fn date_in_sql(column: &str, days: &BTreeSet<i32>) -> String {
    let list: Vec<String> = days
        .iter()
        .map(|d| format!("DATE '{}'", date_of_days(*d)))
        .collect();
    format!("{column} IN ({})", list.join(", "))
}

/// SQL condition for a `[from, to]` range on a date column.
pub(crate) fn range_sql(column: &str, opts: &RunOptions) -> String {
    let mut parts = vec!["TRUE".to_string()];
    if let Some(from) = opts.from {
        parts.push(format!("{column} >= DATE '{from}'"));
    }
    if let Some(to) = opts.to {
        parts.push(format!("{column} <= DATE '{to}'"));
    }
    parts.join(" AND ")
}

/// Columns of new silver rows, built while decoding bronze.
#[derive(Default)]
struct Rows {
    date: Vec<i32>,
    station_id: Vec<String>,
    evse_id: Vec<Option<i32>>,
    connector_id: Vec<i32>,
    status: Vec<String>,
    is_fault: Vec<bool>,
    error_code: Vec<Option<String>>,
    info: Vec<Option<String>>,
    vendor_error_code: Vec<Option<String>>,
    event_time: Vec<i64>,
    received_at: Vec<i64>,
    ocpp_version: Vec<&'static str>,
    message_id: Vec<String>,
    action: Vec<String>,
    event_index: Vec<i32>,
}

impl Rows {
    fn len(&self) -> usize {
        self.date.len()
    }

    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        let ts = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(self.date)),
            Arc::new(StringArray::from(self.station_id)),
            Arc::new(Int32Array::from(self.evse_id)),
            Arc::new(Int32Array::from(self.connector_id)),
            Arc::new(StringArray::from(self.status)),
            Arc::new(BooleanArray::from(self.is_fault)),
            Arc::new(StringArray::from(self.error_code)),
            Arc::new(StringArray::from(self.info)),
            Arc::new(StringArray::from(self.vendor_error_code)),
            ts(self.event_time),
            ts(self.received_at),
            Arc::new(StringArray::from(self.ocpp_version)),
            Arc::new(StringArray::from(self.message_id)),
            Arc::new(StringArray::from(self.action)),
            Arc::new(Int32Array::from(self.event_index)),
        ];
        RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| PipelineError::Arrow(e.to_string()))
    }
}

fn strings(batch: &RecordBatch, name: &str) -> Result<StringArray, PipelineError> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| PipelineError::Arrow(format!("bronze scan lacks {name}")))?;
    let column = cast(column, &DataType::Utf8).map_err(|e| PipelineError::Arrow(e.to_string()))?;
    column
        .as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or_else(|| PipelineError::Arrow(format!("{name} is not text")))
}

/// Decodes bronze CALL rows (station_id, ocpp_version, message_id, action,
/// payload, received_at) into status change rows.
fn decode(batch: &RecordBatch, rows: &mut Rows) -> Result<(), PipelineError> {
    let station = strings(batch, "station_id")?;
    let version = strings(batch, "ocpp_version")?;
    let message_id = strings(batch, "message_id")?;
    let action = strings(batch, "action")?;
    let payload = strings(batch, "payload")?;
    let received = batch
        .column_by_name("received_at")
        .ok_or_else(|| PipelineError::Arrow("bronze scan lacks received_at".into()))?;
    let received = cast(
        received,
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    )
    .map_err(|e| PipelineError::Arrow(e.to_string()))?;
    let received = received
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| PipelineError::Arrow("received_at is not a timestamp".into()))?;
    for i in 0..batch.num_rows() {
        if payload.is_null(i) || action.is_null(i) || received.is_null(i) {
            continue;
        }
        let Some(v) = OcppVersion::parse(version.value(i)) else {
            continue;
        };
        let Ok(body) = serde_json::from_str::<serde_json::Value>(payload.value(i)) else {
            continue;
        };
        let received_us = received.value(i);
        let changes = events_from_call(v, action.value(i), &body, None)
            .into_iter()
            .filter_map(|e| match e {
                CoreEvent::StatusChanged(s) => Some(s),
                _ => None,
            });
        for (index, s) in changes.enumerate() {
            let event_us = s
                .event_time
                .map(|t| t.timestamp_micros())
                .unwrap_or(received_us);
            rows.date.push(event_us.div_euclid(MICROS_PER_DAY) as i32);
            rows.station_id.push(station.value(i).to_string());
            rows.evse_id.push(s.evse_id);
            rows.connector_id.push(s.connector_id);
            rows.status.push(s.status);
            rows.is_fault.push(s.is_fault);
            rows.error_code.push(s.error_code);
            rows.info.push(s.info);
            rows.vendor_error_code.push(s.vendor_error_code);
            rows.event_time.push(event_us);
            rows.received_at.push(received_us);
            rows.ocpp_version.push(v.as_str());
            rows.message_id.push(message_id.value(i).to_string());
            rows.action.push(action.value(i).to_string());
            rows.event_index.push(index as i32);
        }
    }
    Ok(())
}

fn date_column(batch: &RecordBatch) -> Result<&Date32Array, PipelineError> {
    batch
        .column(0)
        .as_any()
        .downcast_ref::<Date32Array>()
        .ok_or_else(|| PipelineError::Arrow("first column is not a date".into()))
}

/// (date, count) rows as a map; `count_column` is the count's index.
fn per_date_counts(
    batches: &[RecordBatch],
    count_column: usize,
) -> Result<HashMap<i32, u64>, PipelineError> {
    let mut out = HashMap::new();
    for b in batches {
        let counts = cast(b.column(count_column), &DataType::Int64)
            .map_err(|e| PipelineError::Arrow(e.to_string()))?;
        let counts = counts
            .as_any()
            .downcast_ref::<deltalake::arrow::array::Int64Array>()
            .ok_or_else(|| PipelineError::Arrow("count is not an integer".into()))?;
        for (d, n) in date_column(b)?.iter().zip(counts.iter()) {
            if let (Some(d), Some(n)) = (d, n) {
                out.insert(d, n.max(0) as u64);
            }
        }
    }
    Ok(out)
}

/// Which bronze rows a run reads.
enum Source {
    /// Everything in the current snapshot (first run, or log entries gone).
    All,
    /// Files added since the last run, and whole bronze date partitions whose
    /// added files were compacted away meanwhile.
    Since {
        adds: Vec<deltalake::kernel::Add>,
        partitions: BTreeSet<String>,
    },
    /// Bronze received in the `--from/--to` range.
    Range,
}

const STATUS_FILTER: &str = "direction = 'cs_to_csms' AND message_type = 2 \
     AND action IN ('StatusNotification', 'NotifyEvent')";
const BRONZE_COLUMNS: &str = "station_id, ocpp_version, message_id, action, payload, received_at";

/// Runs `sql` and decodes every batch it yields; returns the rows read.
async fn scan_into(ctx: &SessionContext, sql: &str, rows: &mut Rows) -> Result<u64, PipelineError> {
    let mut stream = ctx.sql(sql).await?.execute_stream().await?;
    let mut read = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        read += batch.num_rows() as u64;
        decode(&batch, rows)?;
    }
    Ok(read)
}

/// Brings `silver.status_events` up to date with bronze (see the module docs
/// and [`RunOptions`] for the range mode).
pub async fn status_events(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = TableSummary {
        name: TABLE.into(),
        rows_in: 0,
        rows_out: 0,
        dates_rewritten: 0,
        seconds: 0.0,
    };
    let bronze_loc = lake::table_location(lake_url, BRONZE_OCPP_MESSAGES)?;
    let Some(bronze) = lake::load_table(&bronze_loc, &config.storage_options).await? else {
        tracing::info!(table = bronze_loc, "no bronze table yet: nothing to do");
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let bronze_version = bronze.version().unwrap_or(0);
    let silver_loc = lake::table_location(lake_url, SILVER_STATUS_EVENTS)?;
    let schema = status_events_schema();
    let silver = lake::open_or_create(
        &silver_loc,
        &config.storage_options,
        &schema,
        "date",
        "silver.status_events: status changes from StatusNotification and NotifyEvent, deduplicated",
    )
    .await?;
    let done = lake::app_version(&silver, &silver_loc, APP_ID).await?;

    let source = if opts.is_range() {
        Source::Range
    } else {
        match done {
            Some(v) if v >= bronze_version as i64 => {
                summary.seconds = started.elapsed().as_secs_f64();
                return Ok(summary);
            }
            None => Source::All,
            Some(v) => {
                let changes = lake::changes_between(
                    &bronze,
                    &bronze_loc,
                    v.max(0) as u64,
                    bronze_version,
                    "date",
                )
                .await?;
                if changes.complete {
                    Source::Since {
                        adds: changes.adds,
                        partitions: changes.reread_partitions,
                    }
                } else {
                    tracing::warn!(
                        table = bronze_loc,
                        since = v,
                        "bronze log entries are gone: reprocessing all of bronze"
                    );
                    Source::All
                }
            }
        }
    };
    let txn = (!opts.is_range()).then_some((APP_ID, bronze_version as i64));

    let mut rows = Rows::default();
    match source {
        Source::All => {
            ctx.register_table(
                "bronze_all",
                lake::provider(ctx, &bronze, &bronze_loc).await?,
            )?;
            let sql = format!("SELECT {BRONZE_COLUMNS} FROM bronze_all WHERE {STATUS_FILTER}");
            summary.rows_in += scan_into(ctx, &sql, &mut rows).await?;
            ctx.deregister_table("bronze_all")?;
        }
        Source::Range => {
            ctx.register_table(
                "bronze_all",
                lake::provider(ctx, &bronze, &bronze_loc).await?,
            )?;
            let sql = format!(
                "SELECT {BRONZE_COLUMNS} FROM bronze_all WHERE {STATUS_FILTER} AND {}",
                range_sql("date", opts)
            );
            summary.rows_in += scan_into(ctx, &sql, &mut rows).await?;
            ctx.deregister_table("bronze_all")?;
        }
        Source::Since { adds, partitions } => {
            if !adds.is_empty() {
                let provider = lake::provider_for_adds(ctx, &bronze, &bronze_loc, adds).await?;
                ctx.register_table("bronze_new", provider)?;
                let sql = format!("SELECT {BRONZE_COLUMNS} FROM bronze_new WHERE {STATUS_FILTER}");
                summary.rows_in += scan_into(ctx, &sql, &mut rows).await?;
                ctx.deregister_table("bronze_new")?;
            }
            let days: BTreeSet<i32> = partitions
                .iter()
                .filter_map(|p| NaiveDate::parse_from_str(p, "%Y-%m-%d").ok())
                .map(days_of_date)
                .collect();
            if !days.is_empty() {
                ctx.register_table(
                    "bronze_all",
                    lake::provider(ctx, &bronze, &bronze_loc).await?,
                )?;
                let sql = format!(
                    "SELECT {BRONZE_COLUMNS} FROM bronze_all WHERE {STATUS_FILTER} AND {}",
                    date_in_sql("date", &days)
                );
                summary.rows_in += scan_into(ctx, &sql, &mut rows).await?;
                ctx.deregister_table("bronze_all")?;
            }
        }
    }

    if rows.len() == 0 {
        if let Some((app, version)) = txn {
            lake::record_progress(silver, &silver_loc, &schema, "date", app, version).await?;
        }
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let days: BTreeSet<i32> = rows.date.iter().copied().collect();
    let new_rows = rows.into_batch(&schema)?;
    ctx.register_table(
        "silver_new",
        Arc::new(MemTable::try_new(schema.clone(), vec![vec![new_rows]])?),
    )?;
    ctx.register_table(
        "silver_cur",
        lake::provider(ctx, &silver, &silver_loc).await?,
    )?;
    let names: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 => format!("CAST({0} AS VARCHAR) AS {0}", f.name()),
            DataType::Date32 => format!("CAST({0} AS DATE) AS {0}", f.name()),
            _ => f.name().clone(),
        })
        .collect();
    let select = names.join(", ");
    let plain: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let plain = plain.join(", ");
    let sql = format!(
        "SELECT {plain} FROM (
            SELECT *, row_number() OVER (
                PARTITION BY date, station_id, message_id, action, event_index
                ORDER BY received_at, ocpp_version, event_time, connector_id, evse_id,
                         status, error_code, info, vendor_error_code) AS rn
            FROM (SELECT {select} FROM silver_cur WHERE {cur}
                  UNION ALL SELECT {select} FROM silver_new))
         WHERE rn = 1
         ORDER BY date, station_id, event_time, connector_id",
        cur = date_in_sql("date", &days),
    );
    let batches = ctx.sql(&sql).await?.collect().await;
    let existing = ctx
        .sql(&format!(
            "SELECT CAST(date AS DATE) AS date, COUNT(*) AS n FROM silver_cur WHERE {} GROUP BY 1",
            date_in_sql("date", &days)
        ))
        .await?
        .collect()
        .await;
    ctx.deregister_table("silver_new")?;
    ctx.deregister_table("silver_cur")?;
    let batches = batches?
        .iter()
        .map(|b| lake::conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    // Silver only grows by union, so a date whose deduplicated row count
    // equals what it holds already gained nothing (every new row was a copy,
    // e.g. re-read after bronze compaction): leave it, and its gold, alone.
    let before = per_date_counts(&existing?, 1)?;
    let mut after: HashMap<i32, u64> = HashMap::new();
    for b in &batches {
        for d in date_column(b)?.iter().flatten() {
            *after.entry(d).or_default() += 1;
        }
    }
    let days: BTreeSet<i32> = days
        .into_iter()
        .filter(|d| after.get(d).copied().unwrap_or(0) != before.get(d).copied().unwrap_or(0))
        .collect();
    if days.is_empty() {
        if let Some((app, version)) = txn {
            lake::record_progress(silver, &silver_loc, &schema, "date", app, version).await?;
        }
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let batches = batches
        .iter()
        .map(|b| {
            let mask: BooleanArray = date_column(b)?
                .iter()
                .map(|d| Some(d.is_some_and(|d| days.contains(&d))))
                .collect();
            filter_record_batch(b, &mask).map_err(|e| PipelineError::Arrow(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    summary.rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    summary.dates_rewritten = days.len() as u64;
    lake::replace_where(
        ctx,
        silver,
        &silver_loc,
        &schema,
        "date",
        batches,
        date_in("date", &days),
        txn,
    )
    .await?;
    tracing::debug!(
        first = %date_of_days(*days.first().unwrap_or(&0)),
        last = %date_of_days(*days.last().unwrap_or(&0)),
        "rewrote silver.status_events dates"
    );
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_conversions_round_trip() {
        let d = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        assert_eq!(days_of_date(d), 20454);
        assert_eq!(date_of_days(20454), d);
        assert_eq!(
            date_in_sql("date", &[20454, 20455].into_iter().collect()),
            "date IN (DATE '2026-01-01', DATE '2026-01-02')"
        );
    }
}
