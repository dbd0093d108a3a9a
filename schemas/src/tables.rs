//! The Arrow schemas of the lake tables (shared/DESIGN.md "Lake tables"), one
//! function per table, and each table's path under the lake root: the single
//! definition that writers (ingest, pipeline) and readers (query) share.
//!
//! Delta has no unsigned integers, so counts and sequence numbers are `Int64`;
//! timestamps are microseconds in UTC, as Delta's `timestamp` type stores them.

use std::path::PathBuf;
use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use url::Url;

/// `bronze.ocpp_messages`.
pub const BRONZE_OCPP_MESSAGES: &str = "bronze/ocpp_messages";
/// `silver.status_events`.
pub const SILVER_STATUS_EVENTS: &str = "silver/status_events";
/// `silver.meter_values`.
pub const SILVER_METER_VALUES: &str = "silver/meter_values";
/// `silver.transaction_events`: the deduplicated start/update/end events that
/// `silver.transactions` folds (an intermediate table of the pipeline).
pub const SILVER_TRANSACTION_EVENTS: &str = "silver/transaction_events";
/// `silver.transactions`.
pub const SILVER_TRANSACTIONS: &str = "silver/transactions";
/// `silver.boots`.
pub const SILVER_BOOTS: &str = "silver/boots";
/// `silver.heartbeats` (hourly counts).
pub const SILVER_HEARTBEATS: &str = "silver/heartbeats";
/// `silver.device_model` (2.x NotifyReport attributes).
pub const SILVER_DEVICE_MODEL: &str = "silver/device_model";
/// `gold.transactions_completed` (per-transaction detail).
pub const GOLD_TRANSACTIONS_COMPLETED: &str = "gold/transactions_completed";
/// `gold.completed_transactions` (per station per day).
pub const GOLD_COMPLETED_TRANSACTIONS: &str = "gold/completed_transactions";
/// `gold.daily_faults`.
pub const GOLD_DAILY_FAULTS: &str = "gold/daily_faults";
/// `gold.fault_ranking`.
pub const GOLD_FAULT_RANKING: &str = "gold/fault_ranking";
/// `gold.billing` (one priced line per completed transaction).
pub const GOLD_BILLING: &str = "gold/billing";
/// `gold.billing_statements` (per month per id token and currency).
pub const GOLD_BILLING_STATEMENTS: &str = "gold/billing_statements";
/// `ops.workflow_runs`: one row per attempt of a workflow run.
pub const OPS_WORKFLOW_RUNS: &str = "ops/workflow_runs";
/// `ops.alert_events`: alerts raised and cleared.
pub const OPS_ALERT_EVENTS: &str = "ops/alert_events";

/// A lake URL that names no usable location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url}: {reason}")]
pub struct LocationError {
    /// The lake URL as given.
    pub url: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// A resolved lake root: local (absolute directory) or an object store URL
/// whose path ends in `/` (so joining a table keeps the last segment).
enum Root {
    Local(PathBuf),
    Remote(Url),
}

/// The one rule for reading a lake URL, shared by every writer and reader so
/// they all resolve the same tables: a string with `://` is a URL (`file://`
/// meaning a local directory), anything else a local path, relative to the
/// working directory (the only environment this reads).
fn resolve_root(lake_url: &str) -> Result<Root, LocationError> {
    let bad = |reason: String| LocationError {
        url: lake_url.to_string(),
        reason,
    };
    if lake_url.contains("://") {
        let mut url = Url::parse(lake_url).map_err(|e| bad(e.to_string()))?;
        if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|_| bad("not a local path".into()))?;
            return Ok(Root::Local(path));
        }
        if url.cannot_be_a_base() {
            return Err(bad("not a directory URL".into()));
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        return Ok(Root::Remote(url));
    }
    let path = PathBuf::from(lake_url);
    if path.is_absolute() {
        return Ok(Root::Local(path));
    }
    let cwd = std::env::current_dir().map_err(|e| bad(e.to_string()))?;
    Ok(Root::Local(cwd.join(path)))
}

/// The lake root as a directory URL ending in `/` (local paths as absolute
/// `file://` URLs), for listing the lake through an object store.
pub fn lake_root(lake_url: &str) -> Result<Url, LocationError> {
    match resolve_root(lake_url)? {
        Root::Local(path) => Url::from_directory_path(&path).map_err(|_| LocationError {
            url: lake_url.to_string(),
            reason: "not a usable path".into(),
        }),
        Root::Remote(url) => Ok(url),
    }
}

/// The location of `table` (e.g. [`BRONZE_OCPP_MESSAGES`]) under the lake
/// root, for `deltalake::ensure_table_uri`. Local lakes give an absolute
/// filesystem path, not a `file://` URL, because delta-rs creates a missing
/// local table directory only for a path; object stores give a URL.
pub fn table_location(lake_url: &str, table: &str) -> Result<String, LocationError> {
    match resolve_root(lake_url)? {
        Root::Local(path) => Ok(path.join(table).to_string_lossy().into_owned()),
        Root::Remote(url) => url
            .join(table)
            .map(String::from)
            .map_err(|e| LocationError {
                url: lake_url.to_string(),
                reason: e.to_string(),
            }),
    }
}

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

/// `silver.meter_values`, partitioned by `date` (UTC date of `sampled_at`,
/// which falls back to `received_at` when the sample has no timestamp).
///
/// `value` is in `unit` as the adapters give it (2.x multipliers applied,
/// kWh not converted). Like status events, each row keeps its message
/// identity; `sample_index` is the sample's position among those the
/// message carried, and deduplication is keyed on (date, station_id,
/// message_id, action, sample_index).
pub fn meter_values_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("transaction_id", DataType::Utf8, true),
        Field::new("evse_id", DataType::Int32, true),
        Field::new("connector_id", DataType::Int32, true),
        Field::new("sampled_at", utc_micros(), false),
        Field::new("measurand", DataType::Utf8, false),
        Field::new("phase", DataType::Utf8, true),
        Field::new("unit", DataType::Utf8, false),
        Field::new("context", DataType::Utf8, true),
        Field::new("location", DataType::Utf8, true),
        Field::new("value", DataType::Float64, false),
        Field::new("received_at", utc_micros(), false),
        Field::new("ocpp_version", DataType::Utf8, false),
        Field::new("message_id", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("sample_index", DataType::Int32, false),
    ]))
}

/// `silver.transaction_events`, partitioned by `date` (UTC date of
/// `event_time`, else `received_at`): one row per transaction start, update
/// (2.x TransactionEvent Updated) or end, deduplicated on (date, station_id,
/// message_id, action). `kind` is `Started`, `Updated` or `Ended`;
/// `transaction_id` is text in every version (1.6 integers as decimals).
pub fn transaction_events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("transaction_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("seq_no", DataType::Int64, true),
        Field::new("event_time", utc_micros(), false),
        Field::new("received_at", utc_micros(), false),
        Field::new("evse_id", DataType::Int32, true),
        Field::new("connector_id", DataType::Int32, true),
        Field::new("id_token", DataType::Utf8, true),
        Field::new("meter_wh", DataType::Float64, true),
        Field::new("stop_reason", DataType::Utf8, true),
        Field::new("trigger_reason", DataType::Utf8, true),
        Field::new("ocpp_version", DataType::Utf8, false),
        Field::new("message_id", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
    ]))
}

/// `silver.transactions`, partitioned by `date` (UTC date of `started_at`,
/// else of the transaction's first event when its start is unknown): one row
/// per (station_id, transaction_id).
///
/// `energy_wh` is null when it cannot be trusted; `energy_flag` says why:
/// `stop_below_start`, `implausible_jump` (more than a 350 kW charger could
/// deliver in the time) or `missing_meter` (fewer than two register
/// readings).
pub fn transactions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("transaction_id", DataType::Utf8, false),
        Field::new("evse_id", DataType::Int32, true),
        Field::new("connector_id", DataType::Int32, true),
        Field::new("id_token", DataType::Utf8, true),
        Field::new("started_at", utc_micros(), true),
        Field::new("stopped_at", utc_micros(), true),
        Field::new("meter_start_wh", DataType::Float64, true),
        Field::new("meter_stop_wh", DataType::Float64, true),
        Field::new("energy_wh", DataType::Float64, true),
        Field::new("stop_reason", DataType::Utf8, true),
        Field::new("is_complete", DataType::Boolean, false),
        Field::new("ocpp_version", DataType::Utf8, false),
        Field::new("energy_flag", DataType::Utf8, true),
    ]))
}

/// `silver.boots`, partitioned by `date` (UTC date of `event_time`): one row
/// per BootNotification, deduplicated on (date, station_id, message_id).
/// `event_time` is `received_at`: BootNotification carries no timestamp.
pub fn boots_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("vendor", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("serial_number", DataType::Utf8, true),
        Field::new("firmware_version", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("event_time", utc_micros(), false),
        Field::new("received_at", utc_micros(), false),
        Field::new("ocpp_version", DataType::Utf8, false),
        Field::new("message_id", DataType::Utf8, false),
    ]))
}

/// `silver.heartbeats`, partitioned by `date`: per station and UTC hour
/// (`hour`, the received time truncated to the hour), the number of distinct
/// Heartbeat message ids received.
pub fn heartbeats_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("hour", utc_micros(), false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("heartbeats", DataType::Int64, false),
    ]))
}

/// `silver.device_model`, partitioned by `date` (UTC date of `reported_at`,
/// the payload's `generatedAt`, else `received_at`): one row per (component,
/// variable, attribute) a 2.x NotifyReport carried. `attribute_index` is the
/// attribute's position in the message; deduplication is keyed on (date,
/// station_id, message_id, attribute_index).
pub fn device_model_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("component", DataType::Utf8, false),
        Field::new("component_instance", DataType::Utf8, true),
        Field::new("evse_id", DataType::Int32, true),
        Field::new("connector_id", DataType::Int32, true),
        Field::new("variable", DataType::Utf8, false),
        Field::new("variable_instance", DataType::Utf8, true),
        Field::new("attribute_type", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, true),
        Field::new("mutability", DataType::Utf8, true),
        Field::new("reported_at", utc_micros(), false),
        Field::new("received_at", utc_micros(), false),
        Field::new("request_id", DataType::Int64, true),
        Field::new("seq_no", DataType::Int64, true),
        Field::new("ocpp_version", DataType::Utf8, false),
        Field::new("message_id", DataType::Utf8, false),
        Field::new("attribute_index", DataType::Int32, false),
    ]))
}

/// `gold.transactions_completed`, partitioned by `date` (UTC date of
/// `stopped_at`): one row per completed transaction. `energy_kwh` is null
/// where `energy_flag` is set.
pub fn transactions_completed_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("transaction_id", DataType::Utf8, false),
        Field::new("id_token", DataType::Utf8, true),
        Field::new("started_at", utc_micros(), false),
        Field::new("stopped_at", utc_micros(), false),
        Field::new("duration_s", DataType::Int64, false),
        Field::new("energy_kwh", DataType::Float64, true),
        Field::new("energy_flag", DataType::Utf8, true),
    ]))
}

/// `gold.completed_transactions`, partitioned by `date`: per station per
/// day. `energy_kwh` sums unflagged transactions only; `p95_duration_s` is
/// the exact 95th percentile with linear interpolation between ranks.
pub fn completed_transactions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("transactions", DataType::Int64, false),
        Field::new("energy_kwh", DataType::Float64, false),
        Field::new("total_duration_s", DataType::Int64, false),
        Field::new("avg_duration_s", DataType::Float64, false),
        Field::new("p95_duration_s", DataType::Float64, false),
    ]))
}

/// `gold.billing`, partitioned by `date` (UTC date of `stopped_at`): one line
/// per completed transaction, priced with the tariff in force at its start.
///
/// `energy_kwh_peak` is the energy charged at the tariff's base price,
/// `energy_kwh_offpeak` the energy inside its time-of-use windows.
/// `energy_split` says how the split was made: `metered` (interpolated
/// between register readings), `estimated` (a window boundary fell in a
/// stretch without close readings: split in proportion to time) or
/// `unavailable` (the energy is flagged: energy columns null, energy priced
/// 0). `is_complete_data` is false unless the split is `metered` and a tariff
/// applied. Costs are null when no tariff was in force (`tariff_id` null).
pub fn billing_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("transaction_id", DataType::Utf8, false),
        Field::new("id_token", DataType::Utf8, true),
        Field::new("started_at", utc_micros(), false),
        Field::new("stopped_at", utc_micros(), false),
        Field::new("duration_min", DataType::Float64, false),
        Field::new("energy_kwh", DataType::Float64, true),
        Field::new("energy_kwh_peak", DataType::Float64, true),
        Field::new("energy_kwh_offpeak", DataType::Float64, true),
        Field::new("energy_cost", DataType::Float64, true),
        Field::new("time_cost", DataType::Float64, true),
        Field::new("total_cost", DataType::Float64, true),
        Field::new("currency", DataType::Utf8, true),
        Field::new("tariff_id", DataType::Utf8, true),
        Field::new("energy_split", DataType::Utf8, false),
        Field::new("energy_flag", DataType::Utf8, true),
        Field::new("is_complete_data", DataType::Boolean, false),
    ]))
}

/// `gold.billing_statements`, partitioned by `month` (`YYYY-MM` of the
/// billing lines' stop dates): per id token and currency, the priced lines
/// (those with a tariff), their energy (unflagged only) and total cost.
pub fn billing_statements_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("month", DataType::Utf8, false),
        Field::new("id_token", DataType::Utf8, true),
        Field::new("currency", DataType::Utf8, false),
        Field::new("transactions", DataType::Int64, false),
        Field::new("energy_kwh", DataType::Float64, false),
        Field::new("total_cost", DataType::Float64, false),
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

/// `ops.workflow_runs` (not partitioned: a few rows a day). One row per
/// attempt; `status` is `succeeded` or `failed`, `final` says whether the
/// scheduler gave up or succeeded with this attempt (no retry follows).
pub fn workflow_runs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("workflow", DataType::Utf8, false),
        Field::new("job_kind", DataType::Utf8, false),
        Field::new("scheduled_for", utc_micros(), false),
        // schedule | catch-up | manual
        Field::new("trigger", DataType::Utf8, false),
        Field::new("attempt", DataType::Int32, false),
        Field::new("node_id", DataType::Utf8, false),
        Field::new("started_at", utc_micros(), false),
        Field::new("finished_at", utc_micros(), false),
        Field::new("status", DataType::Utf8, false),
        Field::new("final", DataType::Boolean, false),
        // The job's summary, or the error.
        Field::new("message", DataType::Utf8, true),
    ]))
}

/// `ops.alert_events` (not partitioned): each alert raised and cleared.
pub fn alert_events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        // e.g. `faulted:CP1:1:1`, `offline:CP1`: the deduplication key.
        Field::new("alert_id", DataType::Utf8, false),
        // faulted | offline
        Field::new("kind", DataType::Utf8, false),
        // raised | cleared
        Field::new("event", DataType::Utf8, false),
        Field::new("station_id", DataType::Utf8, false),
        Field::new("evse_id", DataType::Int32, true),
        Field::new("connector_id", DataType::Int32, true),
        // Error code / info for faults, last seen for offline.
        Field::new("detail", DataType::Utf8, true),
        // When the condition began.
        Field::new("since", utc_micros(), false),
        // When this event was decided.
        Field::new("at", utc_micros(), false),
        Field::new("node_id", DataType::Utf8, false),
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
            (meter_values_schema(), "date"),
            (transaction_events_schema(), "date"),
            (transactions_schema(), "date"),
            (transactions_completed_schema(), "date"),
            (completed_transactions_schema(), "date"),
            (billing_schema(), "date"),
            (billing_statements_schema(), "month"),
            (boots_schema(), "date"),
            (heartbeats_schema(), "date"),
            (device_model_schema(), "date"),
        ] {
            assert!(schema.field_with_name(partition).is_ok());
            let mut names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n);
        }
    }

    #[test]
    fn local_lakes_resolve_to_absolute_paths() {
        assert_eq!(
            table_location("/data/lake", BRONZE_OCPP_MESSAGES).unwrap(),
            "/data/lake/bronze/ocpp_messages"
        );
        assert_eq!(
            table_location("file:///data/lake/", GOLD_BILLING).unwrap(),
            "/data/lake/gold/billing"
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            table_location("rel/lake", SILVER_TRANSACTIONS).unwrap(),
            cwd.join("rel/lake/silver/transactions")
                .to_string_lossy()
                .into_owned()
        );
        assert_eq!(
            lake_root("/data/lake").unwrap().as_str(),
            "file:///data/lake/"
        );
        assert_eq!(
            lake_root("file:///data/lake").unwrap().as_str(),
            "file:///data/lake/"
        );
        assert!(
            lake_root("rel/lake")
                .unwrap()
                .path()
                .ends_with("/rel/lake/")
        );
    }

    #[test]
    fn object_store_lakes_keep_their_prefix() {
        for lake in ["s3://bucket/prefix", "s3://bucket/prefix/"] {
            assert_eq!(
                table_location(lake, GOLD_FAULT_RANKING).unwrap(),
                "s3://bucket/prefix/gold/fault_ranking"
            );
            assert_eq!(lake_root(lake).unwrap().as_str(), "s3://bucket/prefix/");
        }
        assert_eq!(
            table_location("s3://bucket", BRONZE_OCPP_MESSAGES).unwrap(),
            "s3://bucket/bronze/ocpp_messages"
        );
        // A query string stays a query string, not part of the table path.
        assert_eq!(
            lake_root("s3://bucket/p?region=x").unwrap().as_str(),
            "s3://bucket/p/?region=x"
        );
    }

    #[test]
    fn unusable_lake_urls_are_errors() {
        let e = table_location("s3://[bucket/lake", GOLD_BILLING).unwrap_err();
        assert_eq!(e.url, "s3://[bucket/lake");
        assert!(table_location("file://remote-host/lake", GOLD_BILLING).is_err());
        assert!(table_location("a:b://c", GOLD_BILLING).is_err());
        assert!(lake_root("not a url://x").is_err());
    }
}
