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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::{Datelike, NaiveDate};
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::prelude::{Expr, SessionContext, col, lit};
use deltalake::datafusion::scalar::ScalarValue;
use schemas::tables::{BRONZE_OCPP_MESSAGES, SILVER_STATUS_EVENTS, status_events_schema};
use schemas::{CoreEvent, OcppVersion, events_from_call};

use crate::incremental::{
    Dedup, MICROS_PER_DAY, bronze_source, merge_dedup, scan_bronze, strings, timestamps,
};
use crate::lake;
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of the table.
pub const TABLE: &str = "silver.status_events";
/// Application transaction id in silver: version = last bronze version read.
pub const APP_ID: &str = "pipeline-silver-status_events";

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

/// Decodes bronze CALL rows (station_id, ocpp_version, message_id, action,
/// payload, received_at) into status change rows.
fn decode(batch: &RecordBatch, rows: &mut Rows) -> Result<(), PipelineError> {
    let station = strings(batch, "station_id")?;
    let version = strings(batch, "ocpp_version")?;
    let message_id = strings(batch, "message_id")?;
    let action = strings(batch, "action")?;
    let payload = strings(batch, "payload")?;
    let received = timestamps(batch, "received_at")?;
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

const STATUS_FILTER: &str = "direction = 'cs_to_csms' AND message_type = 2 \
     AND action IN ('StatusNotification', 'NotifyEvent')";
/// The bronze columns the silver decoders read.
pub(crate) const BRONZE_COLUMNS: &str =
    "station_id, ocpp_version, message_id, action, payload, received_at";

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
    let Some(source) = bronze_source(&bronze, &bronze_loc, bronze_version, done, opts).await?
    else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((APP_ID, bronze_version as i64));

    let mut rows = Rows::default();
    summary.rows_in = scan_bronze(
        ctx,
        &bronze,
        &bronze_loc,
        source,
        opts,
        BRONZE_COLUMNS,
        STATUS_FILTER,
        &mut |b| decode(b, &mut rows),
    )
    .await?;
    let merged = merge_dedup(
        ctx,
        silver,
        &silver_loc,
        &schema,
        rows.into_batch(&schema)?,
        &Dedup {
            key: "date, station_id, message_id, action, event_index",
            order: "received_at, ocpp_version, event_time, connector_id, evse_id, \
                    status, error_code, info, vendor_error_code",
            sort: "date, station_id, event_time, connector_id",
        },
        txn.as_slice(),
    )
    .await?;
    summary.rows_out = merged.rows_out;
    summary.dates_rewritten = merged.dates_rewritten;
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
