//! `silver.meter_values` and `silver.transaction_events` from bronze, through
//! the [`schemas::adapter`] version adapters.
//!
//! Meter samples come from charger CALLs of MeterValues (all versions), 1.6
//! StopTransaction `transactionData` and 2.x TransactionEvent `meterValue`.
//! Transaction events come from 1.6 StartTransaction (paired with the CSMS's
//! CALLRESULT, which carries the transaction id) and StopTransaction, and 2.x
//! TransactionEvent. Both tables are incremental over bronze's commit log and
//! merged with deduplication on message identity, exactly as
//! `silver.status_events` ([`crate::incremental`]).
//!
//! # Pairing 1.6 StartTransaction with its answer
//! A CALL and its CALLRESULT usually land in the same bronze commit, but need
//! not. When the rows a run reads hold one side only, the other is looked up
//! in bronze by (station, message id) within a day either side of the rows'
//! dates. A CALL still unanswered gives no event yet; its answer, when it
//! arrives, brings the pair in. Among several answers to one message id (a
//! charger reusing ids after a reboot) the first received at or after the
//! CALL wins.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use deltalake::arrow::array::{
    Array, ArrayRef, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::datasource::MemTable;
use deltalake::datafusion::prelude::SessionContext;
use schemas::tables::{
    BRONZE_OCPP_MESSAGES, SILVER_METER_VALUES, SILVER_TRANSACTION_EVENTS, meter_values_schema,
    transaction_events_schema,
};
use schemas::{CoreEvent, OcppVersion, events_from_call};

use crate::incremental::{
    Dedup, MICROS_PER_DAY, bronze_source, merge_dedup, scan_bronze, scan_sql, strings, timestamps,
};
use crate::lake;
use crate::silver::{BRONZE_COLUMNS, date_in_sql};
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of the meter table.
pub const METER_TABLE: &str = "silver.meter_values";
/// SQL name of the transaction events table.
pub const EVENTS_TABLE: &str = "silver.transaction_events";
/// Application transaction id in meter_values: last bronze version read.
pub const METER_APP_ID: &str = "pipeline-silver-meter_values";
/// Application transaction id in transaction_events: last bronze version read.
pub const EVENTS_APP_ID: &str = "pipeline-silver-transaction_events";

const METER_FILTER: &str = "direction = 'cs_to_csms' AND message_type = 2 \
     AND action IN ('MeterValues', 'StopTransaction', 'TransactionEvent')";
const EVENTS_FILTER: &str = "((direction = 'cs_to_csms' AND message_type = 2 \
     AND action IN ('StartTransaction', 'StopTransaction', 'TransactionEvent')) \
     OR (direction = 'csms_to_cs' AND message_type = 3 AND action = 'StartTransaction'))";
const EVENTS_COLUMNS: &str =
    "station_id, ocpp_version, message_id, action, payload, received_at, direction";

fn ts_array(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
}

/// Columns of new meter rows.
#[derive(Default)]
struct MeterRows {
    date: Vec<i32>,
    station_id: Vec<String>,
    transaction_id: Vec<Option<String>>,
    evse_id: Vec<Option<i32>>,
    connector_id: Vec<Option<i32>>,
    sampled_at: Vec<i64>,
    measurand: Vec<String>,
    phase: Vec<Option<String>>,
    unit: Vec<String>,
    context: Vec<Option<String>>,
    location: Vec<Option<String>>,
    value: Vec<f64>,
    received_at: Vec<i64>,
    ocpp_version: Vec<&'static str>,
    message_id: Vec<String>,
    action: Vec<String>,
    sample_index: Vec<i32>,
}

impl MeterRows {
    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(self.date)),
            Arc::new(StringArray::from(self.station_id)),
            Arc::new(StringArray::from(self.transaction_id)),
            Arc::new(Int32Array::from(self.evse_id)),
            Arc::new(Int32Array::from(self.connector_id)),
            ts_array(self.sampled_at),
            Arc::new(StringArray::from(self.measurand)),
            Arc::new(StringArray::from(self.phase)),
            Arc::new(StringArray::from(self.unit)),
            Arc::new(StringArray::from(self.context)),
            Arc::new(StringArray::from(self.location)),
            Arc::new(Float64Array::from(self.value)),
            ts_array(self.received_at),
            Arc::new(StringArray::from(self.ocpp_version)),
            Arc::new(StringArray::from(self.message_id)),
            Arc::new(StringArray::from(self.action)),
            Arc::new(Int32Array::from(self.sample_index)),
        ];
        RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| PipelineError::Arrow(e.to_string()))
    }
}

fn decode_meter(batch: &RecordBatch, rows: &mut MeterRows) -> Result<(), PipelineError> {
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
        let samples = events_from_call(v, action.value(i), &body, None)
            .into_iter()
            .filter_map(|e| match e {
                CoreEvent::MeterSample(s) => Some(s),
                _ => None,
            });
        for (index, s) in samples.enumerate() {
            let at = s
                .sampled_at
                .map(|t| t.timestamp_micros())
                .unwrap_or(received_us);
            rows.date.push(at.div_euclid(MICROS_PER_DAY) as i32);
            rows.station_id.push(station.value(i).to_string());
            rows.transaction_id.push(s.transaction_id);
            rows.evse_id.push(s.evse_id);
            rows.connector_id.push(s.connector_id);
            rows.sampled_at.push(at);
            rows.measurand.push(s.measurand);
            rows.phase.push(s.phase);
            rows.unit.push(s.unit);
            rows.context.push(s.context);
            rows.location.push(s.location);
            rows.value.push(s.value);
            rows.received_at.push(received_us);
            rows.ocpp_version.push(v.as_str());
            rows.message_id.push(message_id.value(i).to_string());
            rows.action.push(action.value(i).to_string());
            rows.sample_index.push(index as i32);
        }
    }
    Ok(())
}

fn summary_of(name: &str) -> TableSummary {
    TableSummary {
        name: name.into(),
        rows_in: 0,
        rows_out: 0,
        dates_rewritten: 0,
        seconds: 0.0,
    }
}

/// Brings `silver.meter_values` up to date with bronze.
pub async fn meter_values(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = summary_of(METER_TABLE);
    let bronze_loc = lake::table_location(lake_url, BRONZE_OCPP_MESSAGES)?;
    let Some(bronze) = lake::load_table(&bronze_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let bronze_version = bronze.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, SILVER_METER_VALUES)?;
    let schema = meter_values_schema();
    let table = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "date",
        "silver.meter_values: sampled meter values, deduplicated",
    )
    .await?;
    let done = lake::app_version(&table, &loc, METER_APP_ID).await?;
    let Some(source) = bronze_source(&bronze, &bronze_loc, bronze_version, done, opts).await?
    else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((METER_APP_ID, bronze_version as i64));
    let mut rows = MeterRows::default();
    summary.rows_in = scan_bronze(
        ctx,
        &bronze,
        &bronze_loc,
        source,
        opts,
        BRONZE_COLUMNS,
        METER_FILTER,
        &mut |b| decode_meter(b, &mut rows),
    )
    .await?;
    let merged = merge_dedup(
        ctx,
        table,
        &loc,
        &schema,
        rows.into_batch(&schema)?,
        &Dedup {
            key: "date, station_id, message_id, action, sample_index",
            order: "received_at, ocpp_version, sampled_at, measurand, value",
            sort: "date, station_id, sampled_at, sample_index",
        },
        txn.as_slice(),
    )
    .await?;
    summary.rows_out = merged.rows_out;
    summary.dates_rewritten = merged.dates_rewritten;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// One bronze row of the transaction event scan, kept until pairing.
#[derive(Clone)]
struct RawMsg {
    station_id: String,
    version: OcppVersion,
    message_id: String,
    action: String,
    payload: serde_json::Value,
    received_at: i64,
}

/// Bronze rows of a scan: charger CALLs, and the CSMS's StartTransaction
/// answers keyed by (station, message id).
#[derive(Default)]
struct RawMsgs {
    calls: Vec<RawMsg>,
    answers: HashMap<(String, String), Vec<RawMsg>>,
}

impl RawMsgs {
    fn add(&mut self, batch: &RecordBatch) -> Result<(), PipelineError> {
        let station = strings(batch, "station_id")?;
        let version = strings(batch, "ocpp_version")?;
        let message_id = strings(batch, "message_id")?;
        let action = strings(batch, "action")?;
        let payload = strings(batch, "payload")?;
        let received = timestamps(batch, "received_at")?;
        let direction = strings(batch, "direction")?;
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
            let msg = RawMsg {
                station_id: station.value(i).to_string(),
                version: v,
                message_id: message_id.value(i).to_string(),
                action: action.value(i).to_string(),
                payload: body,
                received_at: received.value(i),
            };
            if direction.value(i) == "csms_to_cs" {
                let list = self
                    .answers
                    .entry((msg.station_id.clone(), msg.message_id.clone()))
                    .or_default();
                // The same answer read twice (re-read partitions) is one answer.
                if !list.iter().any(|m| m.received_at == msg.received_at) {
                    list.push(msg);
                }
            } else {
                self.calls.push(msg);
            }
        }
        Ok(())
    }

    /// (station, message id) of 1.6 StartTransaction CALLs without an
    /// answer here, and of answers without their CALL here, with the dates
    /// (Date32) to look in.
    fn unpaired(&self) -> (Vec<(String, String)>, BTreeSet<i32>) {
        let mut keys = BTreeSet::new();
        let mut days = BTreeSet::new();
        let mut call_keys = BTreeSet::new();
        for c in self.calls.iter().filter(|c| is_start16(c)) {
            let key = (c.station_id.clone(), c.message_id.clone());
            if !self.answers.contains_key(&key) {
                push_days(&mut days, c.received_at);
                keys.insert(key.clone());
            }
            call_keys.insert(key);
        }
        for (key, answers) in &self.answers {
            if !call_keys.contains(key) {
                for a in answers {
                    push_days(&mut days, a.received_at);
                }
                keys.insert(key.clone());
            }
        }
        (keys.into_iter().collect(), days)
    }
}

fn push_days(days: &mut BTreeSet<i32>, at: i64) {
    let d = at.div_euclid(MICROS_PER_DAY) as i32;
    days.extend([d - 1, d, d + 1]);
}

fn is_start16(m: &RawMsg) -> bool {
    m.version == OcppVersion::V16 && m.action == "StartTransaction"
}

/// Columns of new transaction event rows.
#[derive(Default)]
struct EventRows {
    date: Vec<i32>,
    station_id: Vec<String>,
    transaction_id: Vec<String>,
    kind: Vec<&'static str>,
    seq_no: Vec<Option<i64>>,
    event_time: Vec<i64>,
    received_at: Vec<i64>,
    evse_id: Vec<Option<i32>>,
    connector_id: Vec<Option<i32>>,
    id_token: Vec<Option<String>>,
    meter_wh: Vec<Option<f64>>,
    stop_reason: Vec<Option<String>>,
    trigger_reason: Vec<Option<String>>,
    ocpp_version: Vec<&'static str>,
    message_id: Vec<String>,
    action: Vec<String>,
}

/// The version-neutral parts of a transaction event.
struct TxFields {
    transaction_id: String,
    kind: &'static str,
    seq_no: Option<i64>,
    event_time: Option<i64>,
    evse_id: Option<i32>,
    connector_id: Option<i32>,
    id_token: Option<String>,
    meter_wh: Option<f64>,
    stop_reason: Option<String>,
    trigger_reason: Option<String>,
}

fn tx_fields(e: CoreEvent) -> Option<TxFields> {
    let micros = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp_micros());
    Some(match e {
        CoreEvent::TransactionStarted(s) => TxFields {
            transaction_id: s.transaction_id,
            kind: "Started",
            seq_no: s.seq_no,
            event_time: micros(s.event_time),
            evse_id: s.evse_id,
            connector_id: s.connector_id,
            id_token: s.id_token,
            meter_wh: s.meter_wh,
            stop_reason: None,
            trigger_reason: s.trigger_reason,
        },
        CoreEvent::TransactionUpdated(u) => TxFields {
            transaction_id: u.transaction_id,
            kind: "Updated",
            seq_no: u.seq_no,
            event_time: micros(u.event_time),
            evse_id: u.evse_id,
            connector_id: u.connector_id,
            id_token: u.id_token,
            meter_wh: u.meter_wh,
            stop_reason: None,
            trigger_reason: u.trigger_reason,
        },
        CoreEvent::TransactionEnded(x) => TxFields {
            transaction_id: x.transaction_id,
            kind: "Ended",
            seq_no: x.seq_no,
            event_time: micros(x.event_time),
            evse_id: x.evse_id,
            connector_id: x.connector_id,
            id_token: x.id_token,
            meter_wh: x.meter_wh,
            stop_reason: x.stop_reason,
            trigger_reason: x.trigger_reason,
        },
        _ => return None,
    })
}

impl EventRows {
    fn push(&mut self, msg: &RawMsg, response: Option<&serde_json::Value>) {
        let events = events_from_call(msg.version, &msg.action, &msg.payload, response);
        // One transaction event per message at most (the main event).
        let Some(f) = events.into_iter().find_map(tx_fields) else {
            return;
        };
        let at = f.event_time.unwrap_or(msg.received_at);
        self.date.push(at.div_euclid(MICROS_PER_DAY) as i32);
        self.station_id.push(msg.station_id.clone());
        self.transaction_id.push(f.transaction_id);
        self.kind.push(f.kind);
        self.seq_no.push(f.seq_no);
        self.event_time.push(at);
        self.received_at.push(msg.received_at);
        self.evse_id.push(f.evse_id);
        self.connector_id.push(f.connector_id);
        self.id_token.push(f.id_token);
        self.meter_wh.push(f.meter_wh);
        self.stop_reason.push(f.stop_reason);
        self.trigger_reason.push(f.trigger_reason);
        self.ocpp_version.push(msg.version.as_str());
        self.message_id.push(msg.message_id.clone());
        self.action.push(msg.action.clone());
    }

    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(self.date)),
            Arc::new(StringArray::from(self.station_id)),
            Arc::new(StringArray::from(self.transaction_id)),
            Arc::new(StringArray::from(self.kind)),
            Arc::new(Int64Array::from(self.seq_no)),
            ts_array(self.event_time),
            ts_array(self.received_at),
            Arc::new(Int32Array::from(self.evse_id)),
            Arc::new(Int32Array::from(self.connector_id)),
            Arc::new(StringArray::from(self.id_token)),
            Arc::new(Float64Array::from(self.meter_wh)),
            Arc::new(StringArray::from(self.stop_reason)),
            Arc::new(StringArray::from(self.trigger_reason)),
            Arc::new(StringArray::from(self.ocpp_version)),
            Arc::new(StringArray::from(self.message_id)),
            Arc::new(StringArray::from(self.action)),
        ];
        RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| PipelineError::Arrow(e.to_string()))
    }
}

/// Looks up in bronze the other side of unpaired 1.6 StartTransaction
/// messages (see the module docs).
async fn complete_pairs(
    ctx: &SessionContext,
    bronze: &deltalake::DeltaTable,
    bronze_loc: &str,
    raw: &mut RawMsgs,
) -> Result<u64, PipelineError> {
    let (keys, days) = raw.unpaired();
    if keys.is_empty() {
        return Ok(0);
    }
    let key_schema = Arc::new(Schema::new(vec![
        Field::new("k_station", DataType::Utf8, false),
        Field::new("k_message", DataType::Utf8, false),
    ]));
    let key_batch = RecordBatch::try_new(
        key_schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| &k.0))),
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| &k.1))),
        ],
    )
    .map_err(|e| PipelineError::Arrow(e.to_string()))?;
    ctx.register_table(
        "pair_keys",
        Arc::new(MemTable::try_new(key_schema, vec![vec![key_batch]])?),
    )?;
    ctx.register_table(
        "bronze_pair",
        lake::provider(ctx, bronze, bronze_loc).await?,
    )?;
    let sql = format!(
        "SELECT {EVENTS_COLUMNS} FROM bronze_pair JOIN pair_keys
           ON station_id = k_station AND message_id = k_message
         WHERE action = 'StartTransaction' AND {EVENTS_FILTER} AND {}",
        date_in_sql("date", &days)
    );
    let mut found = RawMsgs::default();
    let read = scan_sql(ctx, &sql, &mut |b| found.add(b)).await;
    ctx.deregister_table("bronze_pair")?;
    ctx.deregister_table("pair_keys")?;
    let read = read?;
    let known: BTreeSet<(String, String, i64)> = raw
        .calls
        .iter()
        .filter(|c| is_start16(c))
        .map(|c| (c.station_id.clone(), c.message_id.clone(), c.received_at))
        .collect();
    for c in found.calls {
        if !known.contains(&(c.station_id.clone(), c.message_id.clone(), c.received_at)) {
            raw.calls.push(c);
        }
    }
    for (key, answers) in found.answers {
        let list = raw.answers.entry(key).or_default();
        for a in answers {
            if !list.iter().any(|m| m.received_at == a.received_at) {
                list.push(a);
            }
        }
    }
    Ok(read)
}

fn decode_events(raw: &RawMsgs) -> EventRows {
    let mut rows = EventRows::default();
    for c in &raw.calls {
        if is_start16(c) {
            let answers = raw
                .answers
                .get(&(c.station_id.clone(), c.message_id.clone()));
            let answer = answers.and_then(|list| {
                list.iter()
                    .filter(|a| a.received_at >= c.received_at)
                    .min_by_key(|a| a.received_at)
                    .or_else(|| list.iter().max_by_key(|a| a.received_at))
            });
            if let Some(a) = answer {
                rows.push(c, Some(&a.payload));
            }
        } else {
            rows.push(c, None);
        }
    }
    rows
}

/// Brings `silver.transaction_events` up to date with bronze.
pub async fn transaction_events(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = summary_of(EVENTS_TABLE);
    let bronze_loc = lake::table_location(lake_url, BRONZE_OCPP_MESSAGES)?;
    let Some(bronze) = lake::load_table(&bronze_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let bronze_version = bronze.version().unwrap_or(0);
    let loc = lake::table_location(lake_url, SILVER_TRANSACTION_EVENTS)?;
    let schema = transaction_events_schema();
    let table = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "date",
        "silver.transaction_events: transaction starts, updates and ends, deduplicated",
    )
    .await?;
    let done = lake::app_version(&table, &loc, EVENTS_APP_ID).await?;
    let Some(source) = bronze_source(&bronze, &bronze_loc, bronze_version, done, opts).await?
    else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let txn = (!opts.is_range()).then_some((EVENTS_APP_ID, bronze_version as i64));
    let mut raw = RawMsgs::default();
    summary.rows_in = scan_bronze(
        ctx,
        &bronze,
        &bronze_loc,
        source,
        opts,
        EVENTS_COLUMNS,
        EVENTS_FILTER,
        &mut |b| raw.add(b),
    )
    .await?;
    complete_pairs(ctx, &bronze, &bronze_loc, &mut raw).await?;
    let rows = decode_events(&raw);
    let merged = merge_dedup(
        ctx,
        table,
        &loc,
        &schema,
        rows.into_batch(&schema)?,
        &Dedup {
            key: "date, station_id, message_id, action",
            order: "received_at, ocpp_version, transaction_id, kind, event_time",
            sort: "date, station_id, transaction_id, event_time",
        },
        txn.as_slice(),
    )
    .await?;
    summary.rows_out = merged.rows_out;
    summary.dates_rewritten = merged.dates_rewritten;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
