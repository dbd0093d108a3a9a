//! `silver.meter_values` and `silver.transaction_events` from bronze, through
//! the [`schemas::adapter`] version adapters.
//!
//! Meter samples come from charger CALLs of MeterValues (all versions), 1.6
//! StopTransaction `transactionData` and 2.x TransactionEvent `meterValue`.
//! Transaction events come from 1.6 StartTransaction (paired with the CSMS's
//! CALLRESULT, which carries the transaction id) and StopTransaction, and 2.x
//! TransactionEvent. Both are fed by the silver stage's one bronze pass
//! ([`crate::silver_job`]), incremental over bronze's commit log and merged
//! with deduplication on message identity, exactly as
//! `silver.status_events` ([`crate::incremental`]).
//!
//! # Pairing 1.6 StartTransaction with its answer
//! A CALL and its CALLRESULT usually land in the same bronze commit, but need
//! not: the lake writer may commit them apart, on either side of midnight,
//! and a run may read one commit and the next run the other. When the rows a
//! run reads hold one side only, the other is looked up in bronze by
//! (station, message id) within a day either side of the rows' received
//! dates (bronze's partitions, so the look-up reads at most three). A CALL
//! still unanswered gives no event yet and is not recorded anywhere: its
//! answer, when a later run reads it, finds the CALL by the same look-up
//! and brings the pair in, dated by the CALL's event time. Among several answers to one message id (a
//! charger reusing ids after a reboot) the first received at or after the
//! CALL wins.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    StringBuilder, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::datasource::MemTable;
use futures_util::future::BoxFuture;
use schemas::tables::{
    SILVER_METER_VALUES, SILVER_TRANSACTION_EVENTS, meter_values_schema, transaction_events_schema,
};
use schemas::{CoreEvent, OcppVersion, events_from_call};

use crate::PipelineError;
use crate::bronze::{
    self, BronzeSink, CALLRESULT, FROM_CHARGER, Message, Select, TO_CHARGER, filter_sql,
    for_each_message,
};
use crate::incremental::{Dedup, MICROS_PER_DAY, Merged, merge_dedup, scan_sql};
use crate::lake;
use crate::silver::date_in_sql;
use crate::silver_job::{Finish, SilverRows, SilverSink, SilverTable, Target, row_sink};

/// SQL name of the meter table.
pub const METER_TABLE: &str = "silver.meter_values";
/// SQL name of the transaction events table.
pub const EVENTS_TABLE: &str = "silver.transaction_events";
/// Application transaction id in meter_values: last bronze version read.
pub const METER_APP_ID: &str = "pipeline-silver-meter_values";
/// Application transaction id in transaction_events: last bronze version read.
pub const EVENTS_APP_ID: &str = "pipeline-silver-transaction_events";

/// `silver.meter_values` for the silver stage.
pub(crate) const METER_VALUES: SilverTable = SilverTable {
    name: METER_TABLE,
    path: SILVER_METER_VALUES,
    app_id: METER_APP_ID,
    schema: meter_values_schema,
    comment: "silver.meter_values: sampled meter values, deduplicated",
    sink: row_sink::<MeterRows>,
};

/// `silver.transaction_events` for the silver stage.
pub(crate) const TRANSACTION_EVENTS: SilverTable = SilverTable {
    name: EVENTS_TABLE,
    path: SILVER_TRANSACTION_EVENTS,
    app_id: EVENTS_APP_ID,
    schema: transaction_events_schema,
    comment: "silver.transaction_events: transaction starts, updates and ends, deduplicated",
    sink: || Box::new(EventsSink::default()),
};

const EVENTS_SELECTS: &[Select] = &[
    Select::calls(&["StartTransaction", "StopTransaction", "TransactionEvent"]),
    Select {
        direction: TO_CHARGER,
        message_type: CALLRESULT,
        actions: &["StartTransaction"],
    },
];

fn ts_array(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
}

/// Columns of new meter rows.
#[derive(Default)]
pub(crate) struct MeterRows {
    date: Vec<i32>,
    station_id: StringBuilder,
    transaction_id: StringBuilder,
    evse_id: Vec<Option<i32>>,
    connector_id: Vec<Option<i32>>,
    sampled_at: Vec<i64>,
    measurand: StringBuilder,
    phase: StringBuilder,
    unit: StringBuilder,
    context: StringBuilder,
    location: StringBuilder,
    value: Vec<f64>,
    received_at: Vec<i64>,
    ocpp_version: StringBuilder,
    message_id: StringBuilder,
    action: StringBuilder,
    sample_index: Vec<i32>,
}

impl SilverRows for MeterRows {
    const SELECTS: &'static [Select] = &[Select::calls(&[
        "MeterValues",
        "StopTransaction",
        "TransactionEvent",
    ])];
    const DEDUP: Dedup<'static> = Dedup {
        key: "date, station_id, message_id, action, sample_index",
        order: "received_at, ocpp_version, sampled_at, measurand, value",
        sort: "date, station_id, sampled_at, sample_index",
    };

    /// The samples of a MeterValues, StopTransaction or TransactionEvent CALL.
    fn push(&mut self, m: &Message<'_>) {
        let samples = m.events().iter().filter_map(|e| match e {
            CoreEvent::MeterSample(s) => Some(s),
            _ => None,
        });
        for (index, s) in samples.enumerate() {
            let at = s
                .sampled_at
                .map(|t| t.timestamp_micros())
                .unwrap_or(m.received_us);
            self.date.push(at.div_euclid(MICROS_PER_DAY) as i32);
            self.station_id.append_value(m.station);
            self.transaction_id
                .append_option(s.transaction_id.as_deref());
            self.evse_id.push(s.evse_id);
            self.connector_id.push(s.connector_id);
            self.sampled_at.push(at);
            self.measurand.append_value(&s.measurand);
            self.phase.append_option(s.phase.as_deref());
            self.unit.append_value(&s.unit);
            self.context.append_option(s.context.as_deref());
            self.location.append_option(s.location.as_deref());
            self.value.push(s.value);
            self.received_at.push(m.received_us);
            self.ocpp_version.append_value(m.version.as_str());
            self.message_id.append_value(m.message_id);
            self.action.append_value(m.action);
            self.sample_index.push(index as i32);
        }
    }

    fn into_batch(mut self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(self.date)),
            Arc::new(self.station_id.finish()),
            Arc::new(self.transaction_id.finish()),
            Arc::new(Int32Array::from(self.evse_id)),
            Arc::new(Int32Array::from(self.connector_id)),
            ts_array(self.sampled_at),
            Arc::new(self.measurand.finish()),
            Arc::new(self.phase.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.context.finish()),
            Arc::new(self.location.finish()),
            Arc::new(Float64Array::from(self.value)),
            ts_array(self.received_at),
            Arc::new(self.ocpp_version.finish()),
            Arc::new(self.message_id.finish()),
            Arc::new(self.action.finish()),
            Arc::new(Int32Array::from(self.sample_index)),
        ];
        RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| PipelineError::Arrow(e.to_string()))
    }
}

#[derive(Default)]
struct EventRows {
    date: Vec<i32>,
    station_id: StringBuilder,
    transaction_id: StringBuilder,
    kind: StringBuilder,
    seq_no: Vec<Option<i64>>,
    event_time: Vec<i64>,
    received_at: Vec<i64>,
    evse_id: Vec<Option<i32>>,
    connector_id: Vec<Option<i32>>,
    id_token: StringBuilder,
    meter_wh: Vec<Option<f64>>,
    stop_reason: StringBuilder,
    trigger_reason: StringBuilder,
    ocpp_version: StringBuilder,
    message_id: StringBuilder,
    action: StringBuilder,
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
    /// The transaction event of a message (one at most: the main event).
    fn push(&mut self, msg: Head<'_>, events: impl IntoIterator<Item = CoreEvent>) {
        let Some(f) = events.into_iter().find_map(tx_fields) else {
            return;
        };
        let at = f.event_time.unwrap_or(msg.received_at);
        self.date.push(at.div_euclid(MICROS_PER_DAY) as i32);
        self.station_id.append_value(msg.station_id);
        self.transaction_id.append_value(&f.transaction_id);
        self.kind.append_value(f.kind);
        self.seq_no.push(f.seq_no);
        self.event_time.push(at);
        self.received_at.push(msg.received_at);
        self.evse_id.push(f.evse_id);
        self.connector_id.push(f.connector_id);
        self.id_token.append_option(f.id_token.as_deref());
        self.meter_wh.push(f.meter_wh);
        self.stop_reason.append_option(f.stop_reason.as_deref());
        self.trigger_reason
            .append_option(f.trigger_reason.as_deref());
        self.ocpp_version.append_value(msg.version.as_str());
        self.message_id.append_value(msg.message_id);
        self.action.append_value(msg.action);
    }

    fn into_batch(mut self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(self.date)),
            Arc::new(self.station_id.finish()),
            Arc::new(self.transaction_id.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(Int64Array::from(self.seq_no)),
            ts_array(self.event_time),
            ts_array(self.received_at),
            Arc::new(Int32Array::from(self.evse_id)),
            Arc::new(Int32Array::from(self.connector_id)),
            Arc::new(self.id_token.finish()),
            Arc::new(Float64Array::from(self.meter_wh)),
            Arc::new(self.stop_reason.finish()),
            Arc::new(self.trigger_reason.finish()),
            Arc::new(self.ocpp_version.finish()),
            Arc::new(self.message_id.finish()),
            Arc::new(self.action.finish()),
        ];
        RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| PipelineError::Arrow(e.to_string()))
    }
}

/// Looks up in bronze the other side of unpaired 1.6 StartTransaction
/// messages (see the module docs).
/// A 1.6 StartTransaction CALL or answer, kept until pairing.
#[derive(Clone)]
struct RawMsg {
    station_id: String,
    version: OcppVersion,
    message_id: String,
    action: String,
    payload: serde_json::Value,
    received_at: i64,
}

/// The identity columns of a message an event row is made from.
struct Head<'a> {
    station_id: &'a str,
    version: OcppVersion,
    message_id: &'a str,
    action: &'a str,
    received_at: i64,
}

impl RawMsg {
    fn head(&self) -> Head<'_> {
        Head {
            station_id: &self.station_id,
            version: self.version,
            message_id: &self.message_id,
            action: &self.action,
            received_at: self.received_at,
        }
    }
}

fn is_start16(m: &Message<'_>) -> bool {
    m.version == OcppVersion::V16 && m.action == "StartTransaction"
}

/// 1.6 StartTransaction CALLs, and the CSMS's answers keyed by (station,
/// message id), awaiting pairing.
#[derive(Default)]
struct RawMsgs {
    calls: Vec<RawMsg>,
    /// (station, message id, received_at) of `calls`.
    call_ids: HashSet<(String, String, i64)>,
    answers: HashMap<(String, String), Vec<RawMsg>>,
}

impl RawMsgs {
    /// Keeps a 1.6 StartTransaction CALL or answer (once: the same message
    /// read twice, from re-read partitions or a look-up, is one message).
    fn add(&mut self, m: &Message<'_>) {
        let Some(body) = m.body() else { return };
        let msg = RawMsg {
            station_id: m.station.to_string(),
            version: m.version,
            message_id: m.message_id.to_string(),
            action: m.action.to_string(),
            payload: body.clone(),
            received_at: m.received_us,
        };
        if m.direction == TO_CHARGER {
            let list = self
                .answers
                .entry((msg.station_id.clone(), msg.message_id.clone()))
                .or_default();
            if !list.iter().any(|a| a.received_at == msg.received_at) {
                list.push(msg);
            }
        } else if self.call_ids.insert((
            msg.station_id.clone(),
            msg.message_id.clone(),
            msg.received_at,
        )) {
            self.calls.push(msg);
        }
    }

    /// (station, message id) of CALLs without an answer here, and of answers
    /// without their CALL here, with the bronze dates (Date32) to look in.
    fn unpaired(&self) -> (Vec<(String, String)>, BTreeSet<i32>) {
        let mut keys = BTreeSet::new();
        let mut days = BTreeSet::new();
        let mut call_keys = BTreeSet::new();
        for c in &self.calls {
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

    /// The answer to `c`: the first received at or after it, else the last.
    fn answer_to(&self, c: &RawMsg) -> Option<&RawMsg> {
        let list = self
            .answers
            .get(&(c.station_id.clone(), c.message_id.clone()))?;
        list.iter()
            .filter(|a| a.received_at >= c.received_at)
            .min_by_key(|a| a.received_at)
            .or_else(|| list.iter().max_by_key(|a| a.received_at))
    }
}

fn push_days(days: &mut BTreeSet<i32>, at: i64) {
    let d = at.div_euclid(MICROS_PER_DAY) as i32;
    days.extend([d - 1, d, d + 1]);
}

/// The `silver.transaction_events` decoder: events of every message but
/// 1.6 StartTransaction at once; those when paired with their answer.
#[derive(Default)]
struct EventsSink {
    rows: EventRows,
    pending: RawMsgs,
}

impl BronzeSink for EventsSink {
    fn selects(&self) -> &'static [Select] {
        EVENTS_SELECTS
    }

    fn accept(&mut self, m: &Message<'_>) {
        if m.direction == TO_CHARGER || is_start16(m) {
            self.pending.add(m);
            return;
        }
        let main = m.events().iter().find(|e| {
            matches!(
                e,
                CoreEvent::TransactionStarted(_)
                    | CoreEvent::TransactionUpdated(_)
                    | CoreEvent::TransactionEnded(_)
            )
        });
        self.rows.push(
            Head {
                station_id: m.station,
                version: m.version,
                message_id: m.message_id,
                action: m.action,
                received_at: m.received_us,
            },
            main.cloned(),
        );
    }
}

impl SilverSink for EventsSink {
    fn finish<'a>(
        self: Box<Self>,
        cx: &'a Finish<'a>,
        target: Target,
    ) -> BoxFuture<'a, Result<Merged, PipelineError>> {
        Box::pin(async move {
            let EventsSink {
                mut rows,
                mut pending,
            } = *self;
            complete_pairs(cx, &mut pending).await?;
            for c in &pending.calls {
                if let Some(a) = pending.answer_to(c) {
                    rows.push(
                        c.head(),
                        events_from_call(c.version, &c.action, &c.payload, Some(&a.payload)),
                    );
                }
            }
            merge_dedup(
                cx.ctx,
                target.table,
                &target.loc,
                &target.schema,
                rows.into_batch(&target.schema)?,
                &Dedup {
                    key: "date, station_id, message_id, action",
                    order: "received_at, ocpp_version, transaction_id, kind, event_time",
                    sort: "date, station_id, transaction_id, event_time",
                },
                target.txn.as_slice(),
            )
            .await
        })
    }
}

/// Looks up in bronze the other side of unpaired 1.6 StartTransaction
/// messages (see the module docs); returns the rows read.
async fn complete_pairs(cx: &Finish<'_>, raw: &mut RawMsgs) -> Result<u64, PipelineError> {
    let ctx = cx.ctx;
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
        lake::provider(ctx, cx.bronze, cx.bronze_loc).await?,
    )?;
    let sql = format!(
        "SELECT {} FROM bronze_pair JOIN pair_keys
           ON station_id = k_station AND message_id = k_message
         WHERE action = 'StartTransaction' AND {} AND {}",
        bronze::COLUMNS,
        filter_sql(EVENTS_SELECTS),
        date_in_sql("date", &days)
    );
    let read = scan_sql(ctx, &sql, &mut |b| {
        for_each_message(b, &mut |m| {
            if m.direction == TO_CHARGER || (m.direction == FROM_CHARGER && is_start16(m)) {
                raw.add(m);
            }
        })
    })
    .await;
    ctx.deregister_table("bronze_pair")?;
    ctx.deregister_table("pair_keys")?;
    read
}
