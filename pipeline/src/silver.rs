//! `silver.status_events`: every connector/EVSE status change chargers
//! reported, typed and deduplicated, partitioned by the UTC date of its
//! event time.
//!
//! Rows come from charger CALLs (`cs_to_csms`, message type 2) of
//! StatusNotification (all versions) and NotifyEvent (2.x, whose
//! `AvailabilityState` reports the adapter turns into status changes),
//! decoded in the silver stage's one bronze pass ([`crate::silver_job`])
//! through [`schemas::events_from_call`], the adapters ingest uses too.
//! Event time is the payload's timestamp, else the time the message was
//! received.
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

use chrono::{Datelike, NaiveDate};
use deltalake::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Int32Array, RecordBatch, StringBuilder,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::prelude::{Expr, col, lit};
use deltalake::datafusion::scalar::ScalarValue;
use schemas::CoreEvent;
use schemas::tables::{SILVER_STATUS_EVENTS, status_events_schema};

use crate::bronze::{Message, Select};
use crate::incremental::{Dedup, MICROS_PER_DAY};
use crate::silver_job::{SilverRows, SilverTable, row_sink};
use crate::{PipelineError, RunOptions};

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
pub(crate) struct Rows {
    date: Vec<i32>,
    station_id: StringBuilder,
    evse_id: Vec<Option<i32>>,
    connector_id: Vec<i32>,
    status: StringBuilder,
    is_fault: Vec<bool>,
    error_code: StringBuilder,
    info: StringBuilder,
    vendor_error_code: StringBuilder,
    event_time: Vec<i64>,
    received_at: Vec<i64>,
    ocpp_version: StringBuilder,
    message_id: StringBuilder,
    action: StringBuilder,
    event_index: Vec<i32>,
}

impl SilverRows for Rows {
    const SELECTS: &'static [Select] = &[Select::calls(&["StatusNotification", "NotifyEvent"])];
    const DEDUP: Dedup<'static> = Dedup {
        key: "date, station_id, message_id, action, event_index",
        order: "received_at, ocpp_version, event_time, connector_id, evse_id, \
                status, error_code, info, vendor_error_code",
        sort: "date, station_id, event_time, connector_id",
    };

    /// Status change rows of a StatusNotification or NotifyEvent CALL.
    fn push(&mut self, m: &Message<'_>) {
        let changes = m.events().iter().filter_map(|e| match e {
            CoreEvent::StatusChanged(s) => Some(s),
            _ => None,
        });
        for (index, s) in changes.enumerate() {
            let event_us = s
                .event_time
                .map(|t| t.timestamp_micros())
                .unwrap_or(m.received_us);
            self.date.push(event_us.div_euclid(MICROS_PER_DAY) as i32);
            self.station_id.append_value(m.station);
            self.evse_id.push(s.evse_id);
            self.connector_id.push(s.connector_id);
            self.status.append_value(&s.status);
            self.is_fault.push(s.is_fault);
            self.error_code.append_option(s.error_code.as_deref());
            self.info.append_option(s.info.as_deref());
            self.vendor_error_code
                .append_option(s.vendor_error_code.as_deref());
            self.event_time.push(event_us);
            self.received_at.push(m.received_us);
            self.ocpp_version.append_value(m.version.as_str());
            self.message_id.append_value(m.message_id);
            self.action.append_value(m.action);
            self.event_index.push(index as i32);
        }
    }

    fn into_batch(mut self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        let ts = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(self.date)),
            Arc::new(self.station_id.finish()),
            Arc::new(Int32Array::from(self.evse_id)),
            Arc::new(Int32Array::from(self.connector_id)),
            Arc::new(self.status.finish()),
            Arc::new(BooleanArray::from(self.is_fault)),
            Arc::new(self.error_code.finish()),
            Arc::new(self.info.finish()),
            Arc::new(self.vendor_error_code.finish()),
            ts(self.event_time),
            ts(self.received_at),
            Arc::new(self.ocpp_version.finish()),
            Arc::new(self.message_id.finish()),
            Arc::new(self.action.finish()),
            Arc::new(Int32Array::from(self.event_index)),
        ];
        RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| PipelineError::Arrow(e.to_string()))
    }
}

/// `silver.status_events` for the silver stage.
pub(crate) const STATUS_EVENTS: SilverTable = SilverTable {
    name: TABLE,
    path: SILVER_STATUS_EVENTS,
    app_id: APP_ID,
    schema: status_events_schema,
    comment: "silver.status_events: status changes from StatusNotification and NotifyEvent, \
              deduplicated",
    sink: row_sink::<Rows>,
};

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
