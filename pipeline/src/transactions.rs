//! `silver.transactions`: one row per (station, transaction id), folded from
//! every `silver.transaction_events` row of the transaction and its
//! `Energy.Active.Import.Register` samples in `silver.meter_values`.
//!
//! # Incremental
//! The table records the versions of both sources it has read (two
//! application transactions in each commit). A run finds the source date
//! partitions changed since, takes every transaction with a row in them, and
//! recomputes those transactions *whole* from all their rows (whatever dates
//! they fall on), so a transaction spanning midnight, or a late stop, is
//! always folded from everything known. Rows are partitioned by the start
//! date; the partitions rewritten are those the recomputed transactions now
//! fall on plus those they were on before (a transaction whose start arrives
//! late moves from its first event's date to its start date).
//!
//! # Folding
//! Events are ordered by 2.x `seqNo`, then event time, then kind (start,
//! update, end). The first start and first end win (a StopTransaction sent
//! twice with different message ids counts once). A transaction is complete
//! when both its start and its end are known.
//!
//! # Energy
//! `meter_stop_wh - meter_start_wh` when both are known; otherwise from the
//! register readings (`max - min` of the samples, with a known start or stop
//! replacing the min or max). Flagged instead of trusted: a stop below the
//! start (`stop_below_start`), fewer than two readings (`missing_meter`), or
//! more energy than a 350 kW charger delivers in the transaction's duration
//! plus one minute of clock slack (`implausible_jump`). Flagged rows have a
//! null `energy_wh`, so sums leave them out.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::datasource::MemTable;
use deltalake::datafusion::prelude::SessionContext;
use schemas::tables::{
    SILVER_METER_VALUES, SILVER_TRANSACTION_EVENTS, SILVER_TRANSACTIONS, transactions_schema,
};

use crate::gold::{Scope, scope};
use crate::incremental::{
    MICROS_PER_DAY, dates, floats, ints, scan_sql, select_list, strings, timestamps,
};
use crate::lake;
use crate::meter::{EVENTS_TABLE, METER_TABLE};
use crate::silver::{date_in, date_in_sql, range_sql};
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name of the table.
pub const TABLE: &str = "silver.transactions";
/// Application transaction id: last `silver.transaction_events` version read.
pub const EVENTS_APP_ID: &str = "pipeline-silver-transactions-events";
/// Application transaction id: last `silver.meter_values` version read.
pub const METER_APP_ID: &str = "pipeline-silver-transactions-meter";

/// The most power a charger delivers (W): more energy than this over a
/// transaction's duration is a meter error, not a charge.
pub const MAX_POWER_W: f64 = 350_000.0;
const CLOCK_SLACK_S: f64 = 60.0;

/// One transaction event, as read from silver.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Event {
    pub kind: Kind,
    pub seq_no: Option<i64>,
    pub event_time: i64,
    pub received_at: i64,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub id_token: Option<String>,
    pub meter_wh: Option<f64>,
    pub stop_reason: Option<String>,
    pub ocpp_version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Started,
    Updated,
    Ended,
}

/// A folded transaction.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Folded {
    pub date: i32,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub id_token: Option<String>,
    pub started_at: Option<i64>,
    pub stopped_at: Option<i64>,
    pub meter_start_wh: Option<f64>,
    pub meter_stop_wh: Option<f64>,
    pub energy_wh: Option<f64>,
    pub stop_reason: Option<String>,
    pub is_complete: bool,
    pub ocpp_version: String,
    pub energy_flag: Option<&'static str>,
}

/// Folds a transaction's events (any order; at least one) and its energy
/// register readings `(sampled_at µs, Wh)`.
pub(crate) fn fold(mut events: Vec<Event>, registers: &[(i64, f64)]) -> Option<Folded> {
    events.sort_by(|a, b| {
        (
            a.seq_no.is_none(),
            a.seq_no,
            a.event_time,
            a.kind,
            a.received_at,
        )
            .cmp(&(
                b.seq_no.is_none(),
                b.seq_no,
                b.event_time,
                b.kind,
                b.received_at,
            ))
    });
    let first = events.first()?;
    let start = events.iter().find(|e| e.kind == Kind::Started);
    let end = events.iter().find(|e| e.kind == Kind::Ended);
    let started_at = start.map(|e| e.event_time);
    let stopped_at = end.map(|e| e.event_time);
    let first_time = events.iter().map(|e| e.event_time).min()?;
    let meter_start_wh = start.and_then(|e| e.meter_wh);
    let meter_stop_wh = end.and_then(|e| e.meter_wh);

    let readings = registers.len()
        + usize::from(meter_start_wh.is_some())
        + usize::from(meter_stop_wh.is_some());
    let reg_min = registers.iter().map(|r| r.1).reduce(f64::min);
    let reg_max = registers.iter().map(|r| r.1).reduce(f64::max);
    let (mut energy_wh, mut energy_flag) = match (meter_start_wh, meter_stop_wh) {
        (Some(a), Some(b)) if b < a => (None, Some("stop_below_start")),
        (Some(a), Some(b)) => (Some(b - a), None),
        _ if readings < 2 => (None, Some("missing_meter")),
        (a, b) => match (a.or(reg_min), b.or(reg_max)) {
            (Some(a), Some(b)) if b < a => (None, Some("stop_below_start")),
            (Some(a), Some(b)) => (Some(b - a), None),
            _ => (None, Some("missing_meter")),
        },
    };
    if let Some(wh) = energy_wh {
        let times = events
            .iter()
            .map(|e| e.event_time)
            .chain(registers.iter().map(|r| r.0));
        let span_us = match (started_at, stopped_at) {
            (Some(a), Some(b)) => b - a,
            _ => {
                let (lo, hi) =
                    times.fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
                hi - lo
            }
        };
        let hours = (span_us.max(0) as f64 / 1e6 + CLOCK_SLACK_S) / 3600.0;
        if wh > MAX_POWER_W * hours {
            energy_wh = None;
            energy_flag = Some("implausible_jump");
        }
    }
    let first_some = |f: &dyn Fn(&Event) -> Option<i32>| events.iter().find_map(f);
    Some(Folded {
        date: started_at.unwrap_or(first_time).div_euclid(MICROS_PER_DAY) as i32,
        evse_id: first_some(&|e| e.evse_id),
        connector_id: first_some(&|e| e.connector_id),
        id_token: start
            .and_then(|e| e.id_token.clone())
            .or_else(|| events.iter().find_map(|e| e.id_token.clone())),
        started_at,
        stopped_at,
        meter_start_wh,
        meter_stop_wh,
        energy_wh,
        stop_reason: end.and_then(|e| e.stop_reason.clone()),
        is_complete: started_at.is_some() && stopped_at.is_some(),
        ocpp_version: first.ocpp_version.clone(),
        energy_flag,
    })
}

type Key = (String, String);

fn keys_of(batches: &[RecordBatch], into: &mut BTreeSet<Key>) -> Result<(), PipelineError> {
    for b in batches {
        let s = strings(b, "station_id")?;
        let t = strings(b, "transaction_id")?;
        for i in 0..b.num_rows() {
            if s.is_valid(i) && t.is_valid(i) {
                into.insert((s.value(i).to_string(), t.value(i).to_string()));
            }
        }
    }
    Ok(())
}

fn where_of(scope: &Scope, opts: &RunOptions) -> Option<String> {
    match scope {
        Scope::All => Some("TRUE".into()),
        Scope::Range => Some(range_sql("date", opts)),
        Scope::Partitions(parts) => {
            let days: BTreeSet<i32> = crate::gold::parse_days(parts);
            (!days.is_empty()).then(|| date_in_sql("date", &days))
        }
    }
}

fn rows_batch(
    schema: &SchemaRef,
    folded: Vec<(Key, Folded)>,
) -> Result<RecordBatch, PipelineError> {
    let ts = |v: Vec<Option<i64>>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
    };
    let f = &folded;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from_iter_values(f.iter().map(|r| r.1.date))),
        Arc::new(StringArray::from_iter_values(f.iter().map(|r| &r.0.0))),
        Arc::new(StringArray::from_iter_values(f.iter().map(|r| &r.0.1))),
        Arc::new(Int32Array::from_iter(f.iter().map(|r| r.1.evse_id))),
        Arc::new(Int32Array::from_iter(f.iter().map(|r| r.1.connector_id))),
        Arc::new(StringArray::from_iter(
            f.iter().map(|r| r.1.id_token.as_deref()),
        )),
        ts(f.iter().map(|r| r.1.started_at).collect()),
        ts(f.iter().map(|r| r.1.stopped_at).collect()),
        Arc::new(Float64Array::from_iter(
            f.iter().map(|r| r.1.meter_start_wh),
        )),
        Arc::new(Float64Array::from_iter(f.iter().map(|r| r.1.meter_stop_wh))),
        Arc::new(Float64Array::from_iter(f.iter().map(|r| r.1.energy_wh))),
        Arc::new(StringArray::from_iter(
            f.iter().map(|r| r.1.stop_reason.as_deref()),
        )),
        Arc::new(BooleanArray::from_iter(
            f.iter().map(|r| Some(r.1.is_complete)),
        )),
        Arc::new(StringArray::from_iter_values(
            f.iter().map(|r| r.1.ocpp_version.as_str()),
        )),
        Arc::new(StringArray::from_iter(f.iter().map(|r| r.1.energy_flag))),
    ];
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| PipelineError::Arrow(e.to_string()))
}

fn kind_of(s: &str) -> Option<Kind> {
    match s {
        "Started" => Some(Kind::Started),
        "Updated" => Some(Kind::Updated),
        "Ended" => Some(Kind::Ended),
        _ => None,
    }
}

/// Brings `silver.transactions` up to date with `silver.transaction_events`
/// and `silver.meter_values` (see the module docs).
pub async fn transactions(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
) -> Result<TableSummary, PipelineError> {
    let started = Instant::now();
    let mut summary = crate::gold::empty(TABLE);
    let ev_loc = lake::table_location(lake_url, SILVER_TRANSACTION_EVENTS)?;
    let Some(events) = lake::load_table(&ev_loc, &config.storage_options).await? else {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    };
    let mv_loc = lake::table_location(lake_url, SILVER_METER_VALUES)?;
    let meter = lake::load_table(&mv_loc, &config.storage_options).await?;
    let loc = lake::table_location(lake_url, SILVER_TRANSACTIONS)?;
    let schema = transactions_schema();
    let table = lake::open_or_create(
        &loc,
        &config.storage_options,
        &schema,
        "date",
        "silver.transactions: one row per transaction, folded from its events and samples",
    )
    .await?;
    let ev_version = events.version().unwrap_or(0);
    let ev_done = lake::app_version(&table, &loc, EVENTS_APP_ID).await?;
    let ev_scope = scope(&events, &ev_loc, ev_version, ev_done, opts).await?;
    let mut mv_scope = None;
    let mut txns: Vec<(&str, i64)> = Vec::new();
    if !opts.is_range() {
        txns.push((EVENTS_APP_ID, ev_version as i64));
    }
    if let Some(meter) = &meter {
        let mv_version = meter.version().unwrap_or(0);
        let mv_done = lake::app_version(&table, &loc, METER_APP_ID).await?;
        mv_scope = scope(meter, &mv_loc, mv_version, mv_done, opts).await?;
        if !opts.is_range() {
            txns.push((METER_APP_ID, mv_version as i64));
        }
    }
    if ev_scope.is_none() && mv_scope.is_none() {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }

    // The transactions touched by the changed source partitions.
    let mut keys: BTreeSet<Key> = BTreeSet::new();
    ctx.register_table("tx_events", lake::provider(ctx, &events, &ev_loc).await?)?;
    if let Some(meter) = &meter {
        ctx.register_table("tx_meter", lake::provider(ctx, meter, &mv_loc).await?)?;
    }
    let result = async {
        if let Some(w) = ev_scope.as_ref().and_then(|s| where_of(s, opts)) {
            let b = ctx
                .sql(&format!(
                    "SELECT DISTINCT station_id, transaction_id FROM tx_events WHERE {w}"
                ))
                .await?
                .collect()
                .await?;
            keys_of(&b, &mut keys)?;
        }
        if let Some(w) = mv_scope.as_ref().and_then(|s| where_of(s, opts)) {
            let b = ctx
                .sql(&format!(
                    "SELECT DISTINCT station_id, transaction_id FROM tx_meter
                     WHERE transaction_id IS NOT NULL AND {w}"
                ))
                .await?
                .collect()
                .await?;
            keys_of(&b, &mut keys)?;
        }
        recompute(ctx, table, &loc, &schema, &keys, meter.is_some(), &txns).await
    }
    .await;
    ctx.deregister_table("tx_events")?;
    if meter.is_some() {
        ctx.deregister_table("tx_meter")?;
    }
    let (rows_in, rows_out, dates) = result?;
    summary.rows_in = rows_in;
    summary.rows_out = rows_out;
    summary.dates_rewritten = dates;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Folds the transactions `keys` (tables `tx_events` and, if `has_meter`,
/// `tx_meter` registered) and rewrites the partitions they are and were on.
/// Returns (source rows read, rows written, dates rewritten).
async fn recompute(
    ctx: &SessionContext,
    table: deltalake::DeltaTable,
    loc: &str,
    schema: &SchemaRef,
    keys: &BTreeSet<Key>,
    has_meter: bool,
    txns: &[(&str, i64)],
) -> Result<(u64, u64, u64), PipelineError> {
    if keys.is_empty() {
        lake::record_progress(table, loc, schema, "date", txns).await?;
        return Ok((0, 0, 0));
    }
    let key_schema = Arc::new(Schema::new(vec![
        Field::new("k_station", DataType::Utf8, false),
        Field::new("k_tx", DataType::Utf8, false),
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
        "tx_keys",
        Arc::new(MemTable::try_new(key_schema, vec![vec![key_batch]])?),
    )?;
    ctx.register_table("tx_cur", lake::provider(ctx, &table, loc).await?)?;
    let result = async {
        let mut events: HashMap<Key, Vec<Event>> = HashMap::new();
        let mut read = scan_sql(
            ctx,
            "SELECT station_id, transaction_id, kind, seq_no, event_time, received_at, evse_id,
                    connector_id, id_token, meter_wh, stop_reason, ocpp_version
             FROM tx_events JOIN tx_keys ON station_id = k_station AND transaction_id = k_tx",
            &mut |b| {
                let s = strings(b, "station_id")?;
                let t = strings(b, "transaction_id")?;
                let kind = strings(b, "kind")?;
                let seq = ints(b, "seq_no")?;
                let et = timestamps(b, "event_time")?;
                let rt = timestamps(b, "received_at")?;
                let evse = ints(b, "evse_id")?;
                let conn = ints(b, "connector_id")?;
                let tok = strings(b, "id_token")?;
                let wh = floats(b, "meter_wh")?;
                let reason = strings(b, "stop_reason")?;
                let ver = strings(b, "ocpp_version")?;
                let opt_s =
                    |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
                for i in 0..b.num_rows() {
                    let Some(k) = kind_of(kind.value(i)) else {
                        continue;
                    };
                    events
                        .entry((s.value(i).to_string(), t.value(i).to_string()))
                        .or_default()
                        .push(Event {
                            kind: k,
                            seq_no: seq.is_valid(i).then(|| seq.value(i)),
                            event_time: et.value(i),
                            received_at: rt.value(i),
                            evse_id: evse.is_valid(i).then(|| evse.value(i) as i32),
                            connector_id: conn.is_valid(i).then(|| conn.value(i) as i32),
                            id_token: opt_s(&tok, i),
                            meter_wh: wh.is_valid(i).then(|| wh.value(i)),
                            stop_reason: opt_s(&reason, i),
                            ocpp_version: ver.value(i).to_string(),
                        });
                }
                Ok(())
            },
        )
        .await?;
        let mut registers: HashMap<Key, Vec<(i64, f64)>> = HashMap::new();
        if has_meter {
            read += scan_sql(
                ctx,
                "SELECT station_id, transaction_id, sampled_at,
                        CASE unit WHEN 'kWh' THEN value * 1000.0 ELSE value END AS wh
                 FROM tx_meter JOIN tx_keys ON station_id = k_station AND transaction_id = k_tx
                 WHERE measurand = 'Energy.Active.Import.Register' AND phase IS NULL
                   AND unit IN ('Wh', 'kWh')",
                &mut |b| {
                    let s = strings(b, "station_id")?;
                    let t = strings(b, "transaction_id")?;
                    let at = timestamps(b, "sampled_at")?;
                    let wh = floats(b, "wh")?;
                    for i in 0..b.num_rows() {
                        registers
                            .entry((s.value(i).to_string(), t.value(i).to_string()))
                            .or_default()
                            .push((at.value(i), wh.value(i)));
                    }
                    Ok(())
                },
            )
            .await?;
        }
        let mut folded: Vec<(Key, Folded)> = events
            .into_iter()
            .filter_map(|(k, ev)| {
                let regs = registers.get(&k).map(Vec::as_slice).unwrap_or(&[]);
                fold(ev, regs).map(|f| (k, f))
            })
            .collect();
        folded.sort_by(|a, b| (a.1.date, &a.0).cmp(&(b.1.date, &b.0)));
        let mut days: BTreeSet<i32> = folded.iter().map(|f| f.1.date).collect();
        let old = ctx
            .sql(
                "SELECT DISTINCT CAST(date AS DATE) AS date FROM tx_cur
                 JOIN tx_keys ON station_id = k_station AND transaction_id = k_tx",
            )
            .await?
            .collect()
            .await?;
        for b in &old {
            days.extend(dates(b, "date")?.iter().flatten());
        }
        if days.is_empty() {
            return Ok::<_, PipelineError>((read, Vec::new(), days));
        }
        let mut batches = ctx
            .sql(&format!(
                "SELECT {} FROM tx_cur LEFT ANTI JOIN tx_keys
                   ON station_id = k_station AND transaction_id = k_tx
                 WHERE {}",
                select_list(schema),
                date_in_sql("date", &days)
            ))
            .await?
            .collect()
            .await?
            .iter()
            .map(|b| lake::conform(b, schema))
            .collect::<Result<Vec<_>, _>>()?;
        batches.push(rows_batch(schema, folded)?);
        Ok((read, batches, days))
    }
    .await;
    ctx.deregister_table("tx_keys")?;
    ctx.deregister_table("tx_cur")?;
    let (read, batches, days) = result?;
    if days.is_empty() {
        lake::record_progress(table, loc, schema, "date", txns).await?;
        return Ok((read, 0, 0));
    }
    let rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    lake::replace_where(
        ctx,
        table,
        loc,
        schema,
        "date",
        batches,
        date_in("date", &days),
        txns,
    )
    .await?;
    tracing::debug!(
        transactions = keys.len(),
        dates = days.len(),
        "rewrote {TABLE} ({EVENTS_TABLE}, {METER_TABLE})"
    );
    Ok((read, rows_out, days.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000_000;

    fn ev(kind: Kind, seq: Option<i64>, t: i64, wh: Option<f64>) -> Event {
        Event {
            kind,
            seq_no: seq,
            event_time: t,
            received_at: t,
            evse_id: None,
            connector_id: Some(1),
            id_token: None,
            meter_wh: wh,
            stop_reason: None,
            ocpp_version: "1.6".into(),
        }
    }

    #[test]
    fn energy_from_start_and_stop() {
        let f = fold(
            vec![
                ev(Kind::Ended, None, 2 * H, Some(13_500.0)),
                ev(Kind::Started, None, 0, Some(1000.0)),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(f.energy_wh, Some(12_500.0));
        assert_eq!(f.energy_flag, None);
        assert!(f.is_complete);
        assert_eq!((f.started_at, f.stopped_at), (Some(0), Some(2 * H)));
    }

    #[test]
    fn flags() {
        let below = fold(
            vec![
                ev(Kind::Started, None, 0, Some(5000.0)),
                ev(Kind::Ended, None, H, Some(4000.0)),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(below.energy_flag, Some("stop_below_start"));
        assert_eq!(below.energy_wh, None);
        // 1 h + 1 min slack at 350 kW is 355.83 kWh; 400 kWh is too much.
        let jump = fold(
            vec![
                ev(Kind::Started, None, 0, Some(0.0)),
                ev(Kind::Ended, None, H, Some(400_000.0)),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(jump.energy_flag, Some("implausible_jump"));
        let ok = fold(
            vec![
                ev(Kind::Started, None, 0, Some(0.0)),
                ev(Kind::Ended, None, H, Some(350_000.0)),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(ok.energy_flag, None);
        let missing = fold(vec![ev(Kind::Started, None, 0, Some(10.0))], &[]).unwrap();
        assert_eq!(missing.energy_flag, Some("missing_meter"));
        assert!(!missing.is_complete);
    }

    #[test]
    fn samples_fill_a_missing_stop_and_seq_no_orders() {
        // A repeated start (seqNo 2) with an earlier clock: seqNo, not the
        // clock, decides which start is first.
        let f = fold(
            vec![
                ev(Kind::Ended, Some(3), 4 * H, None),
                ev(Kind::Started, Some(2), 0, Some(1.0)),
                ev(Kind::Started, Some(0), H, Some(2000.0)),
                ev(Kind::Updated, Some(1), 2 * H, None),
            ],
            &[(H, 2000.0), (2 * H, 5000.0), (3 * H, 9500.0)],
        )
        .unwrap();
        assert_eq!(f.started_at, Some(H));
        assert_eq!(f.stopped_at, Some(4 * H));
        assert_eq!(f.meter_start_wh, Some(2000.0));
        assert_eq!(f.energy_wh, Some(7500.0));
        assert!(f.is_complete);
    }
}
