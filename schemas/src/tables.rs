//! The Arrow schemas of the lake tables (shared/DESIGN.md "Lake tables"), one
//! function per table, and each table's path under the lake root: the single
//! definition that writers (ingest, pipeline) and readers (query) share.
//!
//! Delta has no unsigned integers, so counts and sequence numbers are `Int64`;
//! timestamps are microseconds in UTC, as Delta's `timestamp` type stores them.

use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// `bronze.ocpp_messages`.
pub const BRONZE_OCPP_MESSAGES: &str = "bronze/ocpp_messages";
/// `silver.status_events`.
pub const SILVER_STATUS_EVENTS: &str = "silver/status_events";
/// `gold.daily_faults`.
pub const GOLD_DAILY_FAULTS: &str = "gold/daily_faults";
/// `gold.fault_ranking`.
pub const GOLD_FAULT_RANKING: &str = "gold/fault_ranking";

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// `bronze.ocpp_messages`, partitioned by `date` (UTC date of `received_at`).
///
/// `wal_seq` is `Int64`, not `UInt64`: Delta has no unsigned types (delta-rs
/// would store it as `long` and read it back as `Int64` anyway). WAL seqs stay
/// far below `i64::MAX`. `message_type` is `Int8` (Delta `byte`).
pub fn bronze_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("received_at", utc_micros(), false),
        Field::new("date", DataType::Date32, false),
        Field::new("node_id", DataType::Utf8, false),
        Field::new("wal_seq", DataType::Int64, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("ocpp_version", DataType::Utf8, false),
        Field::new("direction", DataType::Utf8, false),
        Field::new("message_type", DataType::Int8, false),
        Field::new("message_id", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, true),
        Field::new("payload", DataType::Utf8, true),
        Field::new("error_code", DataType::Utf8, true),
        Field::new("error_description", DataType::Utf8, true),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

/// `silver.status_events`, partitioned by `date` (UTC date of `event_time`).
///
/// Beyond the columns of the design, each row keeps its message identity
/// (`message_id`, `action`, and `event_index`, the position of this status
/// change among those the message carried: a 2.x NotifyEvent can report
/// several), which is what deduplication is keyed on.
pub fn status_events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("evse_id", DataType::Int32, true),
        Field::new("connector_id", DataType::Int32, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("is_fault", DataType::Boolean, false),
        Field::new("error_code", DataType::Utf8, true),
        Field::new("info", DataType::Utf8, true),
        Field::new("vendor_error_code", DataType::Utf8, true),
        Field::new("event_time", utc_micros(), false),
        Field::new("received_at", utc_micros(), false),
        Field::new("ocpp_version", DataType::Utf8, false),
        Field::new("message_id", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("event_index", DataType::Int32, false),
    ]))
}

/// `gold.daily_faults`, partitioned by `date`: faults per station per day.
pub fn daily_faults_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("fault_count", DataType::Int64, false),
    ]))
}

/// `gold.fault_ranking`, partitioned by `month` (`YYYY-MM`).
///
/// `days_with_5_or_more` keeps the design's name whatever threshold the
/// pipeline is configured with: it counts the days with at least the
/// configured threshold of faults.
pub fn fault_ranking_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("month", DataType::Utf8, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("total_faults", DataType::Int64, false),
        Field::new("days_with_5_or_more", DataType::Int64, false),
        Field::new("worst_day", DataType::Date32, false),
        Field::new("worst_day_faults", DataType::Int64, false),
        Field::new("rank", DataType::Int64, false),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_columns_exist_and_names_are_unique() {
        for (schema, partition) in [
            (bronze_schema(), "date"),
            (status_events_schema(), "date"),
            (daily_faults_schema(), "date"),
            (fault_ranking_schema(), "month"),
        ] {
            assert!(schema.field_with_name(partition).is_ok());
            let mut names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n);
        }
    }
}
