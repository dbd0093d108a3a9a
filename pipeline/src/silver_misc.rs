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
//! All three are fed by the silver stage's one bronze pass
//! ([`crate::silver_job`]).
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, Date32Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::SchemaRef;
use futures_util::future::BoxFuture;
use schemas::tables::{
    SILVER_BOOTS, SILVER_DEVICE_MODEL, SILVER_HEARTBEATS, boots_schema, device_model_schema,
    heartbeats_schema,
};
use schemas::{CoreEvent, parse_timestamp};

use crate::PipelineError;
use crate::bronze::{BronzeSink, Message, Select, filter_sql};
use crate::incremental::{
    Dedup, MICROS_PER_DAY, Merged, dates, ints, scan_sql, strings, timestamps,
};
use crate::lake;
use crate::silver::{date_in, date_in_sql};
use crate::silver_job::{Finish, SilverRows, SilverSink, SilverTable, Target, row_sink};

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

/// `silver.boots` for the silver stage.
pub(crate) const BOOTS: SilverTable = SilverTable {
    name: BOOTS_TABLE,
    path: SILVER_BOOTS,
    app_id: BOOTS_APP_ID,
    schema: boots_schema,
    comment: "silver.boots: BootNotifications, deduplicated",
    sink: row_sink::<BootRows>,
};

/// `silver.device_model` for the silver stage.
pub(crate) const DEVICE_MODEL: SilverTable = SilverTable {
    name: DEVICE_MODEL_TABLE,
    path: SILVER_DEVICE_MODEL,
    app_id: DEVICE_MODEL_APP_ID,
    schema: device_model_schema,
    comment: "silver.device_model: NotifyReport attributes, deduplicated",
    sink: row_sink::<DeviceRows>,
};

/// `silver.heartbeats` for the silver stage.
pub(crate) const HEARTBEATS: SilverTable = SilverTable {
    name: HEARTBEATS_TABLE,
    path: SILVER_HEARTBEATS,
    app_id: HEARTBEATS_APP_ID,
    schema: heartbeats_schema,
    comment: "silver.heartbeats: Heartbeat CALLs per station per UTC hour",
    sink: || Box::new(HeartbeatSink::default()),
};

#[derive(Default)]
pub(crate) struct BootRows {
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

impl SilverRows for BootRows {
    const SELECTS: &'static [Select] = &[Select::calls(&["BootNotification"])];
    const DEDUP: Dedup<'static> = Dedup {
        key: "date, station_id, message_id",
        order: "received_at, ocpp_version, vendor, model, serial_number, \
                firmware_version, reason",
        sort: "date, station_id, event_time",
    };

    fn push(&mut self, c: &Message<'_>) {
        for e in c.events() {
            let CoreEvent::Boot(b) = e else { continue };
            self.date
                .push(c.received_us.div_euclid(MICROS_PER_DAY) as i32);
            self.station_id.push(c.station.to_string());
            self.vendor.push(b.vendor.clone());
            self.model.push(b.model.clone());
            self.serial_number.push(b.serial_number.clone());
            self.firmware_version.push(b.firmware_version.clone());
            self.reason.push(b.reason.clone());
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

#[derive(Default)]
pub(crate) struct DeviceRows {
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

impl SilverRows for DeviceRows {
    const SELECTS: &'static [Select] = &[Select::calls(&["NotifyReport"])];
    const DEDUP: Dedup<'static> = Dedup {
        key: "date, station_id, message_id, attribute_index",
        order: "received_at, ocpp_version, reported_at, component, \
                component_instance, evse_id, connector_id, variable, \
                variable_instance, attribute_type, value, mutability, \
                request_id, seq_no",
        sort: "date, station_id, reported_at, message_id, attribute_index",
    };

    fn push(&mut self, c: &Message<'_>) {
        // The adapter's DeviceVariable carries the report's entries only; the
        // report header (generatedAt, requestId, seqNo) is read here.
        let Some(body) = c.body() else { return };
        let reported_us = body
            .get("generatedAt")
            .and_then(|v| v.as_str())
            .and_then(parse_timestamp)
            .map(|t| t.timestamp_micros())
            .unwrap_or(c.received_us);
        let request_id = body.get("requestId").and_then(|v| v.as_i64());
        let seq_no = body.get("seqNo").and_then(|v| v.as_i64());
        let vars = c
            .events()
            .iter()
            .filter_map(|e| match e {
                CoreEvent::DeviceModelReport(vars) => Some(vars),
                _ => None,
            })
            .flatten();
        for (index, v) in vars.enumerate() {
            self.date
                .push(reported_us.div_euclid(MICROS_PER_DAY) as i32);
            self.station_id.push(c.station.to_string());
            self.component.push(v.component.clone());
            self.component_instance.push(v.component_instance.clone());
            self.evse_id.push(v.evse_id);
            self.connector_id.push(v.connector_id);
            self.variable.push(v.variable.clone());
            self.variable_instance.push(v.variable_instance.clone());
            self.attribute_type.push(v.attribute_type.clone());
            self.value.push(v.value.clone());
            self.mutability.push(v.mutability.clone());
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

const HEARTBEATS_SELECT: &[Select] = &[Select::calls(&["Heartbeat"])];

/// Collects the heartbeat ids seen per (date, hour, station).
#[derive(Default)]
struct HeartbeatSink {
    seen: HashMap<(i32, i64, String), HashSet<String>>,
}

impl BronzeSink for HeartbeatSink {
    fn selects(&self) -> &'static [Select] {
        HEARTBEATS_SELECT
    }

    fn accept(&mut self, m: &Message<'_>) {
        let us = m.received_us;
        let hour = us - us.rem_euclid(MICROS_PER_HOUR);
        self.seen
            .entry((
                us.div_euclid(MICROS_PER_DAY) as i32,
                hour,
                m.station.to_string(),
            ))
            .or_default()
            .insert(m.message_id.to_string());
    }
}

impl SilverSink for HeartbeatSink {
    fn finish<'a>(
        self: Box<Self>,
        cx: &'a Finish<'a>,
        target: Target,
    ) -> BoxFuture<'a, Result<Merged, PipelineError>> {
        Box::pin(recount(*self, cx, target))
    }
}

/// Rewrites the dates the new heartbeats touch whose counts changed (see
/// the module docs).
async fn recount(
    sink: HeartbeatSink,
    cx: &Finish<'_>,
    target: Target,
) -> Result<Merged, PipelineError> {
    let ctx = cx.ctx;
    let nothing = Merged {
        rows_out: 0,
        dates_rewritten: 0,
    };
    let txns = target.txn.as_slice();
    let days: BTreeSet<i32> = sink.seen.keys().map(|k| k.0).collect();
    if days.is_empty() {
        lake::record_progress(target.table, &target.loc, &target.schema, "date", txns).await?;
        return Ok(nothing);
    }
    let mut fresh = Counts::new();
    if cx.whole_partitions {
        // The scan read every bronze row of these dates.
        for (k, ids) in sink.seen {
            fresh.insert(k, ids.len() as i64);
        }
    } else {
        ctx.register_table(
            "hb_bronze",
            lake::provider(ctx, cx.bronze, cx.bronze_loc).await?,
        )?;
        let recount = format!(
            "SELECT CAST(date AS DATE) AS date, \
                    date_bin(INTERVAL '1 hour', received_at, TIMESTAMP '1970-01-01T00:00:00Z') AS hour, \
                    CAST(station_id AS VARCHAR) AS station_id, \
                    COUNT(DISTINCT message_id) AS heartbeats \
             FROM hb_bronze WHERE {} AND {} GROUP BY 1, 2, 3",
            filter_sql(HEARTBEATS_SELECT),
            date_in_sql("date", &days)
        );
        let r = scan_sql(ctx, &recount, &mut |b| read_counts(b, &mut fresh)).await;
        ctx.deregister_table("hb_bronze")?;
        r?;
    }
    ctx.register_table(
        "hb_cur",
        lake::provider(ctx, &target.table, &target.loc).await?,
    )?;
    let mut current = Counts::new();
    let held = format!(
        "SELECT date, hour, station_id, heartbeats FROM hb_cur WHERE {}",
        date_in_sql("date", &days)
    );
    let r = scan_sql(ctx, &held, &mut |b| read_counts(b, &mut current)).await;
    ctx.deregister_table("hb_cur")?;
    r?;
    // Only dates whose counts changed are rewritten.
    let of_day = |c: &Counts, d: i32| -> Vec<(i64, String, i64)> {
        c.range((d, i64::MIN, String::new())..(d + 1, i64::MIN, String::new()))
            .map(|((_, h, s), n)| (*h, s.clone(), *n))
            .collect()
    };
    let changed: BTreeSet<i32> = days
        .into_iter()
        .filter(|d| of_day(&fresh, *d) != of_day(&current, *d))
        .collect();
    if changed.is_empty() {
        lake::record_progress(target.table, &target.loc, &target.schema, "date", txns).await?;
        return Ok(nothing);
    }
    let rows: Vec<_> = fresh
        .into_iter()
        .filter(|((d, _, _), _)| changed.contains(d))
        .collect();
    debug_assert!(rows.iter().all(|((_, h, _), _)| h % MICROS_PER_HOUR == 0));
    let out = batch(
        &target.schema,
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
        target.table,
        &target.loc,
        &target.schema,
        "date",
        vec![out],
        date_in("date", &changed),
        txns,
    )
    .await?;
    Ok(Merged {
        rows_out: rows.len() as u64,
        dates_rewritten: changed.len() as u64,
    })
}
