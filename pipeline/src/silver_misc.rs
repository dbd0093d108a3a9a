//! Three small silver tables beside `silver.status_events`, built with the
//! same incremental machinery (bronze progress recorded as a Delta
//! application transaction, date partitions rewritten with replaceWhere, a
//! rerun without new bronze commits writing nothing):
//!
//! - `silver.boots`: one row per BootNotification (all versions), decoded
//!   through [`schemas::events_from_call`]; deduplicated on (date,
//!   station_id, message_id). Event time is `received_at`: the message has
//!   no timestamp.
//! - `silver.device_model`: one row per attribute of a 2.x NotifyReport;
//!   `reported_at` is the payload's `generatedAt`, else `received_at`;
//!   deduplicated on (date, station_id, message_id, attribute_index).
//! - `silver.heartbeats`: Heartbeat CALLs counted per station and UTC hour.
//!
//! # Heartbeat counts
//! A count is not a union of rows, so the deduplicating merge does not
//! apply. Instead the run collects the dates its new bronze rows touch and
//! recounts those dates from bronze itself (`COUNT(DISTINCT message_id)` per
//! station and hour). This is exact because a heartbeat's time *is* its
//! `received_at`, and bronze is partitioned by the date of `received_at`: a
//! date's count depends on that one bronze partition only. A date is
//! rewritten only when its recount differs from what the table holds, so
//! re-read copies (bronze compaction, `--from/--to`) cost no commit. Known
//! limit: a retransmitted heartbeat received in another hour counts in both.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use deltalake::arrow::array::{
    Array, ArrayRef, Date32Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::prelude::SessionContext;
use schemas::tables::{
    BRONZE_OCPP_MESSAGES, SILVER_BOOTS, SILVER_DEVICE_MODEL, SILVER_HEARTBEATS, boots_schema,
    device_model_schema, heartbeats_schema,
};
use schemas::{CoreEvent, OcppVersion, events_from_call, parse_timestamp};

use crate::incremental::{
    Dedup, MICROS_PER_DAY, bronze_source, dates, ints, merge_dedup, scan_bronze, scan_sql, strings,
    timestamps,
};
use crate::lake;
use crate::silver::{BRONZE_COLUMNS, date_in, date_in_sql};
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of `silver.boots`.
pub const BOOTS_TABLE: &str = "silver.boots";
/// Application transaction id in `silver.boots`.
pub const BOOTS_APP_ID: &str = "pipeline-silver-boots";
/// SQL name of `silver.heartbeats`.
pub const HEARTBEATS_TABLE: &str = "silver.heartbeats";
/// Application transaction id in `silver.heartbeats`.
pub const HEARTBEATS_APP_ID: &str = "pipeline-silver-heartbeats";
/// SQL name of `silver.device_model`.
pub const DEVICE_MODEL_TABLE: &str = "silver.device_model";
/// Application transaction id in `silver.device_model`.
pub const DEVICE_MODEL_APP_ID: &str = "pipeline-silver-device_model";

const MICROS_PER_HOUR: i64 = 3_600_000_000;

fn ts(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
}

fn batch(schema: &SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch, PipelineError> {
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| PipelineError::Arrow(e.to_string()))
}

/// One decoded bronze CALL: its identity columns and parsed payload.
struct Call<'a> {
    station: &'a str,
    version: OcppVersion,
    message_id: &'a str,
    action: &'a str,
    body: serde_json::Value,
    received_us: i64,
}

/// Decodes the CALL rows of a bronze batch, skipping unreadable ones (ingest
/// validated them; a row failing here has nothing to contribute).
fn for_each_call(batch: &RecordBatch, f: &mut dyn FnMut(Call<'_>)) -> Result<(), PipelineError> {
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
        f(Call {
            station: station.value(i),
            version: v,
            message_id: message_id.value(i),
            action: action.value(i),
            body,
            received_us: received.value(i),
        });
    }
    Ok(())
}

fn summary(name: &str) -> TableSummary {
    TableSummary {
        name: name.into(),
        rows_in: 0,
        rows_out: 0,
        dates_rewritten: 0,
        seconds: 0.0,
    }
}

/// What the three jobs share: bronze, the target, and where to start.
struct Job {
    bronze: deltalake::DeltaTable,
    bronze_loc: String,
    silver: deltalake::DeltaTable,
    silver_loc: String,
    source: crate::incremental::Source,
    txn: Option<(&'static str, i64)>,
}

/// Opens bronze and the target; `None` when there is nothing to do.
async fn prepare(
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
    table: &str,
    schema: &SchemaRef,
    app_id: &'static str,
    description: &str,
) -> Result<Option<Job>, PipelineError> {
    let bronze_loc = lake::table_location(lake_url, BRONZE_OCPP_MESSAGES)?;
    let Some(bronze) = lake::load_table(&bronze_loc, &config.storage_options).await? else {
        tracing::info!(table = bronze_loc, "no bronze table yet: nothing to do");
        return Ok(None);
    };
    let bronze_version = bronze.version().unwrap_or(0);
    let silver_loc = lake::table_location(lake_url, table)?;
    let silver = lake::open_or_create(
        &silver_loc,
        &config.storage_options,
        schema,
        "date",
        description,
    )
    .await?;
    let done = lake::app_version(&silver, &silver_loc, app_id).await?;
    let Some(source) = bronze_source(&bronze, &bronze_loc, bronze_version, done, opts).await?
    else {
        return Ok(None);
    };
    Ok(Some(Job {
        bronze,
        bronze_loc,
        silver,
        silver_loc,
        source,
        txn: (!opts.is_range()).then_some((app_id, bronze_version as i64)),
    }))
}

#[derive(Default)]
struct BootRows {
    date: Vec<i32>,
    station_id: Vec<String>,
    vendor: Vec<String>,
    model: Vec<String>,
    serial_number: Vec<Option<String>>,
    firmware_version: Vec<Option<String>>,
    reason: Vec<Option<String>>,
    received_at: Vec<i64>,
    ocpp_version: Vec<&'static str>,
    message_id: Vec<String>,
}

impl BootRows {
    fn push(&mut self, c: &Call<'_>) {
        for e in events_from_call(c.version, c.action, &c.body, None) {
            let CoreEvent::Boot(b) = e else { continue };
            self.date
                .push(c.received_us.div_euclid(MICROS_PER_DAY) as i32);
            self.station_id.push(c.station.to_string());
            self.vendor.push(b.vendor);
            self.model.push(b.model);
            self.serial_number.push(b.serial_number);
            self.firmware_version.push(b.firmware_version);
            self.reason.push(b.reason);
            self.received_at.push(c.received_us);
            self.ocpp_version.push(c.version.as_str());
            self.message_id.push(c.message_id.to_string());
        }
    }

    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        batch(
            schema,
            vec![
                Arc::new(Date32Array::from(self.date)),
                Arc::new(StringArray::from(self.station_id)),
                Arc::new(StringArray::from(self.vendor)),
                Arc::new(StringArray::from(self.model)),
                Arc::new(StringArray::from(self.serial_number)),
                Arc::new(StringArray::from(self.firmware_version)),
                Arc::new(StringArray::from(self.reason)),
                ts(self.received_at.clone()),
                ts(self.received_at),
                Arc::new(StringArray::from(self.ocpp_version)),
                Arc::new(StringArray::from(self.message_id)),
            ],
        )
    }
}

const BOOT_FILTER: &str =
    "direction = 'cs_to_csms' AND message_type = 2 AND action = 'BootNotification'";

/// Brings `silver.boots` up to date with bronze.
pub async fn boots(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = summary(BOOTS_TABLE);
    let schema = boots_schema();
    if let Some(job) = prepare(
        lake_url,
        config,
        opts,
        SILVER_BOOTS,
        &schema,
        BOOTS_APP_ID,
        "silver.boots: BootNotifications, deduplicated",
    )
    .await?
    {
        let mut rows = BootRows::default();
        summary.rows_in = scan_bronze(
            ctx,
            &job.bronze,
            &job.bronze_loc,
            job.source,
            opts,
            BRONZE_COLUMNS,
            BOOT_FILTER,
            &mut |b| for_each_call(b, &mut |c| rows.push(&c)),
        )
        .await?;
        let merged = merge_dedup(
            ctx,
            job.silver,
            &job.silver_loc,
            &schema,
            rows.into_batch(&schema)?,
            &Dedup {
                key: "date, station_id, message_id",
                order: "received_at, ocpp_version, vendor, model, serial_number, \
                        firmware_version, reason",
                sort: "date, station_id, event_time",
            },
            job.txn.as_slice(),
        )
        .await?;
        summary.rows_out = merged.rows_out;
        summary.dates_rewritten = merged.dates_rewritten;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[derive(Default)]
struct DeviceRows {
    date: Vec<i32>,
    station_id: Vec<String>,
    component: Vec<String>,
    component_instance: Vec<Option<String>>,
    evse_id: Vec<Option<i32>>,
    connector_id: Vec<Option<i32>>,
    variable: Vec<String>,
    variable_instance: Vec<Option<String>>,
    attribute_type: Vec<String>,
    value: Vec<Option<String>>,
    mutability: Vec<Option<String>>,
    reported_at: Vec<i64>,
    received_at: Vec<i64>,
    request_id: Vec<Option<i64>>,
    seq_no: Vec<Option<i64>>,
    ocpp_version: Vec<&'static str>,
    message_id: Vec<String>,
    attribute_index: Vec<i32>,
}

impl DeviceRows {
    fn push(&mut self, c: &Call<'_>) {
        // The adapter's DeviceVariable carries the report's entries only; the
        // report header (generatedAt, requestId, seqNo) is read here.
        let reported_us = c
            .body
            .get("generatedAt")
            .and_then(|v| v.as_str())
            .and_then(parse_timestamp)
            .map(|t| t.timestamp_micros())
            .unwrap_or(c.received_us);
        let request_id = c.body.get("requestId").and_then(|v| v.as_i64());
        let seq_no = c.body.get("seqNo").and_then(|v| v.as_i64());
        let vars = events_from_call(c.version, c.action, &c.body, None)
            .into_iter()
            .filter_map(|e| match e {
                CoreEvent::DeviceModelReport(vars) => Some(vars),
                _ => None,
            })
            .flatten();
        for (index, v) in vars.enumerate() {
            self.date
                .push(reported_us.div_euclid(MICROS_PER_DAY) as i32);
            self.station_id.push(c.station.to_string());
            self.component.push(v.component);
            self.component_instance.push(v.component_instance);
            self.evse_id.push(v.evse_id);
            self.connector_id.push(v.connector_id);
            self.variable.push(v.variable);
            self.variable_instance.push(v.variable_instance);
            self.attribute_type.push(v.attribute_type);
            self.value.push(v.value);
            self.mutability.push(v.mutability);
            self.reported_at.push(reported_us);
            self.received_at.push(c.received_us);
            self.request_id.push(request_id);
            self.seq_no.push(seq_no);
            self.ocpp_version.push(c.version.as_str());
            self.message_id.push(c.message_id.to_string());
            self.attribute_index.push(index as i32);
        }
    }

    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        batch(
            schema,
            vec![
                Arc::new(Date32Array::from(self.date)),
                Arc::new(StringArray::from(self.station_id)),
                Arc::new(StringArray::from(self.component)),
                Arc::new(StringArray::from(self.component_instance)),
                Arc::new(Int32Array::from(self.evse_id)),
                Arc::new(Int32Array::from(self.connector_id)),
                Arc::new(StringArray::from(self.variable)),
                Arc::new(StringArray::from(self.variable_instance)),
                Arc::new(StringArray::from(self.attribute_type)),
                Arc::new(StringArray::from(self.value)),
                Arc::new(StringArray::from(self.mutability)),
                ts(self.reported_at),
                ts(self.received_at),
                Arc::new(Int64Array::from(self.request_id)),
                Arc::new(Int64Array::from(self.seq_no)),
                Arc::new(StringArray::from(self.ocpp_version)),
                Arc::new(StringArray::from(self.message_id)),
                Arc::new(Int32Array::from(self.attribute_index)),
            ],
        )
    }
}

const REPORT_FILTER: &str =
    "direction = 'cs_to_csms' AND message_type = 2 AND action = 'NotifyReport'";

/// Brings `silver.device_model` up to date with bronze.
pub async fn device_model(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = summary(DEVICE_MODEL_TABLE);
    let schema = device_model_schema();
    if let Some(job) = prepare(
        lake_url,
        config,
        opts,
        SILVER_DEVICE_MODEL,
        &schema,
        DEVICE_MODEL_APP_ID,
        "silver.device_model: NotifyReport attributes, deduplicated",
    )
    .await?
    {
        let mut rows = DeviceRows::default();
        summary.rows_in = scan_bronze(
            ctx,
            &job.bronze,
            &job.bronze_loc,
            job.source,
            opts,
            BRONZE_COLUMNS,
            REPORT_FILTER,
            &mut |b| for_each_call(b, &mut |c| rows.push(&c)),
        )
        .await?;
        let merged = merge_dedup(
            ctx,
            job.silver,
            &job.silver_loc,
            &schema,
            rows.into_batch(&schema)?,
            &Dedup {
                key: "date, station_id, message_id, attribute_index",
                order: "received_at, ocpp_version, reported_at, component, \
                        component_instance, evse_id, connector_id, variable, \
                        variable_instance, attribute_type, value, mutability, \
                        request_id, seq_no",
                sort: "date, station_id, reported_at, message_id, attribute_index",
            },
            job.txn.as_slice(),
        )
        .await?;
        summary.rows_out = merged.rows_out;
        summary.dates_rewritten = merged.dates_rewritten;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// (date, hour µs, station) → heartbeats.
type Counts = BTreeMap<(i32, i64, String), i64>;

fn read_counts(b: &RecordBatch, out: &mut Counts) -> Result<(), PipelineError> {
    let date = dates(b, "date")?;
    let hour = timestamps(b, "hour")?;
    let station = strings(b, "station_id")?;
    let n = ints(b, "heartbeats")?;
    for i in 0..b.num_rows() {
        out.insert(
            (date.value(i), hour.value(i), station.value(i).to_string()),
            n.value(i),
        );
    }
    Ok(())
}

const HEARTBEAT_FILTER: &str =
    "direction = 'cs_to_csms' AND message_type = 2 AND action = 'Heartbeat'";

/// Brings `silver.heartbeats` up to date with bronze (see the module docs).
pub async fn heartbeats(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = summary(HEARTBEATS_TABLE);
    let schema = heartbeats_schema();
    let Some(job) = prepare(
        lake_url,
        config,
        opts,
        SILVER_HEARTBEATS,
        &schema,
        HEARTBEATS_APP_ID,
        "silver.heartbeats: Heartbeat CALLs per station per UTC hour",
    )
    .await?
    else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    // Which dates the new bronze rows touch.
    let mut days = BTreeSet::new();
    summary.rows_in = scan_bronze(
        ctx,
        &job.bronze,
        &job.bronze_loc,
        job.source,
        opts,
        "received_at",
        HEARTBEAT_FILTER,
        &mut |b| {
            let received = timestamps(b, "received_at")?;
            days.extend(
                received
                    .iter()
                    .flatten()
                    .map(|us| us.div_euclid(MICROS_PER_DAY) as i32),
            );
            Ok(())
        },
    )
    .await?;
    if days.is_empty() {
        lake::record_progress(
            job.silver,
            &job.silver_loc,
            &schema,
            "date",
            job.txn.as_slice(),
        )
        .await?;
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    // Recount those dates from all of bronze, and read what the table holds.
    ctx.register_table(
        "hb_bronze",
        lake::provider(ctx, &job.bronze, &job.bronze_loc).await?,
    )?;
    ctx.register_table(
        "hb_cur",
        lake::provider(ctx, &job.silver, &job.silver_loc).await?,
    )?;
    let mut fresh = Counts::new();
    let mut current = Counts::new();
    let recount = format!(
        "SELECT CAST(date AS DATE) AS date, \
                date_bin(INTERVAL '1 hour', received_at, TIMESTAMP '1970-01-01T00:00:00Z') AS hour, \
                CAST(station_id AS VARCHAR) AS station_id, \
                COUNT(DISTINCT message_id) AS heartbeats \
         FROM hb_bronze WHERE {HEARTBEAT_FILTER} AND {} GROUP BY 1, 2, 3",
        date_in_sql("date", &days)
    );
    let r1 = scan_sql(ctx, &recount, &mut |b| read_counts(b, &mut fresh)).await;
    let held = format!(
        "SELECT date, hour, station_id, heartbeats FROM hb_cur WHERE {}",
        date_in_sql("date", &days)
    );
    let r2 = scan_sql(ctx, &held, &mut |b| read_counts(b, &mut current)).await;
    ctx.deregister_table("hb_bronze")?;
    ctx.deregister_table("hb_cur")?;
    r1?;
    r2?;
    // Only dates whose counts changed are rewritten.
    let of_day = |c: &Counts, d: i32| -> Vec<(i64, String, i64)> {
        c.iter()
            .filter(|((day, _, _), _)| *day == d)
            .map(|((_, h, s), n)| (*h, s.clone(), *n))
            .collect()
    };
    let changed: BTreeSet<i32> = days
        .into_iter()
        .filter(|d| of_day(&fresh, *d) != of_day(&current, *d))
        .collect();
    if changed.is_empty() {
        lake::record_progress(
            job.silver,
            &job.silver_loc,
            &schema,
            "date",
            job.txn.as_slice(),
        )
        .await?;
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let rows: Vec<_> = fresh
        .into_iter()
        .filter(|((d, _, _), _)| changed.contains(d))
        .collect();
    debug_assert!(rows.iter().all(|((_, h, _), _)| h % MICROS_PER_HOUR == 0));
    summary.rows_out = rows.len() as u64;
    let out = batch(
        &schema,
        vec![
            Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| r.0.0))),
            ts(rows.iter().map(|r| r.0.1).collect()),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.2.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
        ],
    )?;
    lake::replace_where(
        ctx,
        job.silver,
        &job.silver_loc,
        &schema,
        "date",
        vec![out],
        date_in("date", &changed),
        job.txn.as_slice(),
    )
    .await?;
    summary.dates_rewritten = changed.len() as u64;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
