//! Golden tests: a hand-built bronze history in a temporary lake, the
//! pipeline run over it, and the gold tables compared with answers computed
//! by hand (in the comments beside each expectation).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use deltalake::arrow::array::{
    Array, ArrayRef, Date32Array, Int8Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::protocol::SaveMode;
use schemas::tables::{
    BRONZE_OCPP_MESSAGES, GOLD_DAILY_FAULTS, GOLD_FAULT_RANKING, SILVER_STATUS_EVENTS,
    bronze_schema,
};

use crate::{
    PipelineConfig, ProgressEvent, RunOptions, RunSummary, Stage, TableSummary, lake, run,
};

/// One bronze row: a charger CALL unless `direction`/`message_type` say
/// otherwise.
pub(crate) struct Msg {
    pub(crate) received_at: &'static str,
    pub(crate) station: &'static str,
    pub(crate) version: &'static str,
    pub(crate) direction: &'static str,
    pub(crate) message_type: i8,
    pub(crate) id: String,
    pub(crate) action: &'static str,
    pub(crate) payload: String,
}

pub(crate) fn call(
    received_at: &'static str,
    station: &'static str,
    version: &'static str,
    id: &str,
    action: &'static str,
    payload: String,
) -> Msg {
    Msg {
        received_at,
        station,
        version,
        direction: "cs_to_csms",
        message_type: 2,
        id: id.to_string(),
        action,
        payload,
    }
}

/// A 1.6 StatusNotification.
fn sn16(
    received_at: &'static str,
    station: &'static str,
    id: &str,
    status: &str,
    ts: Option<&str>,
) -> Msg {
    let ts = ts
        .map(|t| format!(r#","timestamp":"{t}""#))
        .unwrap_or_default();
    let error = if status == "Faulted" {
        "GroundFailure"
    } else {
        "NoError"
    };
    call(
        received_at,
        station,
        "1.6",
        id,
        "StatusNotification",
        format!(r#"{{"connectorId":1,"errorCode":"{error}","status":"{status}"{ts}}}"#),
    )
}

/// A 2.0.1 StatusNotification.
fn sn201(
    received_at: &'static str,
    station: &'static str,
    id: &str,
    status: &str,
    ts: &str,
) -> Msg {
    call(
        received_at,
        station,
        "2.0.1",
        id,
        "StatusNotification",
        format!(
            r#"{{"timestamp":"{ts}","connectorStatus":"{status}","evseId":1,"connectorId":1}}"#
        ),
    )
}

/// A 2.0.1 NotifyEvent reporting connector 2 of EVSE 1 Faulted.
fn fault_event201(received_at: &'static str, station: &'static str, id: &str, ts: &str) -> Msg {
    call(
        received_at,
        station,
        "2.0.1",
        id,
        "NotifyEvent",
        format!(
            r#"{{"generatedAt":"{ts}","seqNo":0,"eventData":[{{"eventId":1,"timestamp":"{ts}","trigger":"Delta","actualValue":"Faulted","techCode":"GF","eventNotificationType":"HardWiredNotification","component":{{"name":"Connector","evse":{{"id":1,"connectorId":2}}}},"variable":{{"name":"AvailabilityState"}}}}]}}"#
        ),
    )
}

pub(crate) fn micros(t: &str) -> i64 {
    DateTime::parse_from_rfc3339(t)
        .unwrap()
        .with_timezone(&Utc)
        .timestamp_micros()
}

pub(crate) fn bronze_batch(msgs: &[Msg]) -> RecordBatch {
    let received: Vec<i64> = msgs.iter().map(|m| micros(m.received_at)).collect();
    let date: Vec<i32> = received
        .iter()
        .map(|us| us.div_euclid(86_400_000_000) as i32)
        .collect();
    let s = |f: &dyn Fn(&Msg) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(msgs.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMicrosecondArray::from(received).with_timezone("UTC")),
        Arc::new(Date32Array::from(date)),
        s(&|_| "node-t".into()),
        Arc::new(Int64Array::from_iter_values(0..msgs.len() as i64)),
        s(&|m| m.station.into()),
        s(&|m| m.version.into()),
        s(&|m| m.direction.into()),
        Arc::new(Int8Array::from_iter_values(
            msgs.iter().map(|m| m.message_type),
        )),
        s(&|m| m.id.clone()),
        s(&|m| m.action.into()),
        s(&|m| m.payload.clone()),
        Arc::new(StringArray::from(vec![None::<String>; msgs.len()])),
        Arc::new(StringArray::from(vec![None::<String>; msgs.len()])),
        s(&|m| {
            format!(
                r#"[{},"{}","{}",{}]"#,
                m.message_type, m.id, m.action, m.payload
            )
        }),
    ];
    RecordBatch::try_new(bronze_schema(), columns).unwrap()
}

/// Appends `msgs` to bronze (creating it as ingest does) in one commit.
pub(crate) async fn append_bronze(lake_url: &str, msgs: &[Msg]) {
    let loc = lake::table_location(lake_url, BRONZE_OCPP_MESSAGES).unwrap();
    let table = lake::open_or_create(&loc, &HashMap::new(), &bronze_schema(), "date", "bronze")
        .await
        .unwrap();
    table
        .write(vec![bronze_batch(msgs)])
        .with_save_mode(SaveMode::Append)
        .with_partition_columns(["date"])
        .await
        .unwrap();
}

/// The summary of table `name` in a run.
pub(crate) fn table<'a>(s: &'a RunSummary, name: &str) -> &'a TableSummary {
    s.tables
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no {name} in {s}"))
}

async fn versions(lake_url: &str) -> (Option<u64>, Option<u64>, Option<u64>) {
    (
        version_of(lake_url, SILVER_STATUS_EVENTS).await,
        version_of(lake_url, GOLD_DAILY_FAULTS).await,
        version_of(lake_url, GOLD_FAULT_RANKING).await,
    )
}

pub(crate) async fn version_of(lake_url: &str, table: &str) -> Option<u64> {
    let loc = lake::table_location(lake_url, table).unwrap();
    lake::load_table(&loc, &HashMap::new())
        .await
        .unwrap()
        .and_then(|t| t.version())
}

/// Rows of `sql` over `table` (registered as `t`), every column rendered as
/// text and joined with `|`.
pub(crate) async fn rows(lake_url: &str, table: &str, sql: &str) -> Vec<String> {
    let loc = lake::table_location(lake_url, table).unwrap();
    let t = lake::load_table(&loc, &HashMap::new())
        .await
        .unwrap()
        .unwrap();
    let ctx = SessionContext::new();
    ctx.register_table("t", lake::provider(&ctx, &t, &loc).await.unwrap())
        .unwrap();
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        let cols: Vec<StringArray> = b
            .columns()
            .iter()
            .map(|c| {
                cast(c, &DataType::Utf8)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            })
            .collect();
        for i in 0..b.num_rows() {
            let fields: Vec<&str> = cols
                .iter()
                .map(|c| if c.is_valid(i) { c.value(i) } else { "∅" })
                .collect();
            out.push(fields.join("|"));
        }
    }
    out
}

async fn daily(lake_url: &str) -> Vec<String> {
    rows(
        lake_url,
        GOLD_DAILY_FAULTS,
        "SELECT date, station_id, fault_count FROM t ORDER BY date, station_id",
    )
    .await
}

async fn ranking(lake_url: &str) -> Vec<String> {
    rows(
        lake_url,
        GOLD_FAULT_RANKING,
        "SELECT month, \"rank\", station_id, total_faults, days_with_5_or_more, worst_day, worst_day_faults \
         FROM t ORDER BY month, \"rank\"",
    )
    .await
}

fn first_history() -> Vec<Msg> {
    let mut m = Vec::new();
    // Station A (1.6): exactly 5 faults on Feb 10 (one of them retransmitted:
    // a5 arrives twice and counts once), then back Available (no fault).
    for i in 1..=5 {
        let ts = format!("2025-02-10T0{i}:00:00Z");
        m.push(sn16(
            "2025-02-10T12:00:00Z",
            "A",
            &format!("a{i}"),
            "Faulted",
            Some(&ts),
        ));
    }
    m.push(sn16(
        "2025-02-10T12:00:05Z",
        "A",
        "a5",
        "Faulted",
        Some("2025-02-10T05:00:00Z"),
    ));
    m.push(sn16(
        "2025-02-10T13:00:00Z",
        "A",
        "a6",
        "Available",
        Some("2025-02-10T13:00:00Z"),
    ));
    // A: 3 faults on Mar 1, the last without a payload timestamp (event
    // time = received_at).
    m.push(sn16(
        "2025-03-01T10:00:00Z",
        "A",
        "a7",
        "Faulted",
        Some("2025-03-01T09:00:00Z"),
    ));
    m.push(sn16(
        "2025-03-01T10:00:00Z",
        "A",
        "a8",
        "Faulted",
        Some("2025-03-01T09:30:00Z"),
    ));
    m.push(sn16("2025-03-01T10:00:00Z", "A", "a9", "Faulted", None));
    // Station B (2.0.1): exactly 4 faults on Feb 28 (not ranked), two by
    // StatusNotification and two by NotifyEvent AvailabilityState.
    m.push(sn201(
        "2025-02-28T10:00:00Z",
        "B",
        "b1",
        "Faulted",
        "2025-02-28T10:00:00Z",
    ));
    m.push(sn201(
        "2025-02-28T11:00:00Z",
        "B",
        "b2",
        "Faulted",
        "2025-02-28T11:00:00Z",
    ));
    m.push(fault_event201(
        "2025-02-28T12:00:00Z",
        "B",
        "b3",
        "2025-02-28T12:00:00Z",
    ));
    m.push(fault_event201(
        "2025-02-28T13:00:00Z",
        "B",
        "b4",
        "2025-02-28T13:00:00Z",
    ));
    m.push(sn201(
        "2025-02-28T14:00:00Z",
        "B",
        "b4x",
        "Available",
        "2025-02-28T14:00:00Z",
    ));
    // Station C (1.6): 6 faults on Feb 27, 2 on Mar 1, 5 on Mar 2.
    for i in 0..6 {
        m.push(sn16(
            "2025-02-27T20:00:00Z",
            "C",
            &format!("c{i}"),
            "Faulted",
            Some("2025-02-27T19:00:00Z"),
        ));
    }
    for i in 6..8 {
        m.push(sn16(
            "2025-03-01T20:00:00Z",
            "C",
            &format!("c{i}"),
            "Faulted",
            Some("2025-03-01T19:00:00Z"),
        ));
    }
    for i in 8..13 {
        m.push(sn16(
            "2025-03-02T20:00:00Z",
            "C",
            &format!("c{i}"),
            "Faulted",
            Some("2025-03-02T19:00:00Z"),
        ));
    }
    // Noise the pipeline must ignore: heartbeats, the CSMS's answers, a
    // CALLRESULT carrying a status-looking payload, and a CSMS-initiated CALL.
    m.push(call(
        "2025-02-10T12:00:00Z",
        "A",
        "1.6",
        "h1",
        "Heartbeat",
        "{}".into(),
    ));
    let mut answer = sn16(
        "2025-02-10T12:00:00Z",
        "A",
        "a1",
        "Faulted",
        Some("2025-02-10T01:00:00Z"),
    );
    answer.direction = "csms_to_cs";
    answer.message_type = 3;
    m.push(answer);
    let mut sent = sn201(
        "2025-02-28T10:00:00Z",
        "B",
        "x1",
        "Faulted",
        "2025-02-28T10:00:00Z",
    );
    sent.direction = "csms_to_cs";
    m.push(sent);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_ranking_golden_incremental_and_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let lake = tmp.path().join("lake");
    let lake = lake.to_str().unwrap();
    let config = PipelineConfig {
        memory_limit_bytes: 64 << 20,
        ..PipelineConfig::default()
    };
    let opts = RunOptions::default();
    // Bronze in two commits, so the first run also reads several files.
    let history = first_history();
    let (early, late) = history.split_at(10);
    append_bronze(lake, early).await;
    append_bronze(lake, late).await;

    let events = std::sync::Mutex::new(Vec::new());
    let progress = |e: ProgressEvent| events.lock().unwrap().push(e);
    let summary = run(lake, &config, &opts, &progress).await.unwrap();
    assert_eq!(summary.tables.len(), 11, "{summary}");
    let silver = &summary.tables[0];
    // 28 status CALLs from chargers in bronze: A 10 (a5 twice), B 5, C 13;
    // 27 distinct.
    assert_eq!(silver.rows_in, 28, "{summary}");
    assert_eq!(silver.rows_out, 27, "{summary}");
    // Feb 10, Feb 27, Feb 28, Mar 1, Mar 2.
    assert_eq!(silver.dates_rewritten, 5, "{summary}");
    {
        let events = events.lock().unwrap();
        assert_eq!(events[0], ProgressEvent::StageStarted(Stage::Silver));
        assert!(
            matches!(&events[2], ProgressEvent::TableDone(t) if t.name == "silver.status_events")
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, ProgressEvent::TableDone(_)))
                .count(),
            11
        );
    }

    assert_eq!(
        daily(lake).await,
        vec![
            "2025-02-10|A|5", // a1..a5, the retransmitted a5 once
            "2025-02-27|C|6",
            "2025-02-28|B|4", // 2 StatusNotification + 2 NotifyEvent
            "2025-03-01|A|3", // a9 dated by received_at
            "2025-03-01|C|2",
            "2025-03-02|C|5",
        ]
    );
    assert_eq!(
        ranking(lake).await,
        vec![
            // February: C 6 faults (one day >= 5), A 5 (exactly 5: ranked);
            // B with 4 in a day is not listed.
            "2025-02|1|C|6|1|2025-02-27|6",
            "2025-02|2|A|5|1|2025-02-10|5",
            // March: C has 2 + 5; A's 3 faults stay below the threshold.
            "2025-03|1|C|7|1|2025-03-02|5",
        ]
    );
    // Silver keeps both versions' shapes: 2.0.1 rows carry the EVSE, the
    // NotifyEvent ones connector 2 and the tech code.
    assert_eq!(
        rows(
            lake,
            SILVER_STATUS_EVENTS,
            "SELECT ocpp_version, action, evse_id, connector_id, status, error_code, event_time \
             FROM t WHERE station_id = 'B' AND is_fault ORDER BY event_time"
        )
        .await,
        vec![
            "2.0.1|StatusNotification|1|1|Faulted|∅|2025-02-28T10:00:00Z",
            "2.0.1|StatusNotification|1|1|Faulted|∅|2025-02-28T11:00:00Z",
            "2.0.1|NotifyEvent|1|2|Faulted|GF|2025-02-28T12:00:00Z",
            "2.0.1|NotifyEvent|1|2|Faulted|GF|2025-02-28T13:00:00Z",
        ]
    );
    assert_eq!(
        rows(
            lake,
            SILVER_STATUS_EVENTS,
            "SELECT error_code, event_time FROM t WHERE message_id = 'a9'"
        )
        .await,
        vec!["GroundFailure|2025-03-01T10:00:00Z"]
    );

    // A rerun without new bronze writes nothing: no new table versions.
    let before = versions(lake).await;
    let again = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(versions(lake).await, before);
    assert!(
        again
            .tables
            .iter()
            .all(|t| t.dates_rewritten == 0 && t.rows_out == 0),
        "{again}"
    );

    // Second batch: B's charger was offline; on March 2 it delivers a fault
    // of Feb 28 (and retransmits b1, already counted). Bronze is compacted
    // before the run, so the new file is only readable through its partition.
    append_bronze(
        lake,
        &[
            sn201(
                "2025-03-02T08:00:00Z",
                "B",
                "b5",
                "Faulted",
                "2025-02-28T23:00:00Z",
            ),
            sn201(
                "2025-03-02T08:00:01Z",
                "B",
                "b1",
                "Faulted",
                "2025-02-28T10:00:00Z",
            ),
        ],
    )
    .await;
    let bronze_loc = lake::table_location(lake, BRONZE_OCPP_MESSAGES).unwrap();
    let bronze = lake::load_table(&bronze_loc, &HashMap::new())
        .await
        .unwrap()
        .unwrap();
    bronze.optimize().await.unwrap();

    let second = run(lake, &config, &opts, &|_| {}).await.unwrap();
    // Only Feb 28 changes in silver and gold; only February in the ranking.
    assert_eq!(
        table(&second, "silver.status_events").dates_rewritten,
        1,
        "{second}"
    );
    assert_eq!(
        table(&second, "gold.daily_faults").dates_rewritten,
        1,
        "{second}"
    );
    assert_eq!(
        table(&second, "gold.fault_ranking").dates_rewritten,
        1,
        "{second}"
    );
    assert_eq!(
        daily(lake).await,
        vec![
            "2025-02-10|A|5",
            "2025-02-27|C|6",
            "2025-02-28|B|5", // b5 is late but belongs here; b1 again counts once
            "2025-03-01|A|3",
            "2025-03-01|C|2",
            "2025-03-02|C|5",
        ]
    );
    assert_eq!(
        ranking(lake).await,
        vec![
            "2025-02|1|C|6|1|2025-02-27|6",
            // A and B tie at 5: station_id ascending decides.
            "2025-02|2|A|5|1|2025-02-10|5",
            "2025-02|3|B|5|1|2025-02-28|5",
            "2025-03|1|C|7|1|2025-03-02|5",
        ]
    );

    // Reprocessing a range recomputes the same answers (no double counting)
    // and a threshold of 6 keeps only C in February.
    let before = versions(lake).await;
    let range = RunOptions {
        stage: Stage::All,
        from: NaiveDate::from_ymd_opt(2025, 2, 1),
        to: NaiveDate::from_ymd_opt(2025, 2, 28),
    };
    let strict = PipelineConfig {
        fault_threshold: 6,
        ..config.clone()
    };
    run(lake, &strict, &range, &|_| {}).await.unwrap();
    assert_ne!(versions(lake).await, before);
    assert_eq!(daily(lake).await[2], "2025-02-28|B|5");
    assert_eq!(
        ranking(lake).await,
        vec![
            "2025-02|1|C|6|1|2025-02-27|6",
            "2025-03|1|C|7|1|2025-03-02|5"
        ]
    );
    // The range run rewrote February of daily_faults, a change the ranking
    // follows through daily_faults' log: the next incremental run re-ranks
    // February with the configured threshold (5) again; one more is a no-op.
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(ranking(lake).await.len(), 4);
    assert_eq!(ranking(lake).await[2], "2025-02|3|B|5|1|2025-02-28|5");
    let before = versions(lake).await;
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(versions(lake).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lake_and_bronze_without_status_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let lake = tmp.path().join("lake");
    let lake = lake.to_str().unwrap();
    let config = PipelineConfig::default();
    let opts = RunOptions::default();
    // No bronze at all: nothing to do, nothing created.
    let s = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert!(s.tables.iter().all(|t| t.rows_in == 0 && t.rows_out == 0));
    assert_eq!(version_of(lake, SILVER_STATUS_EVENTS).await, None);

    // Only heartbeats: progress is recorded so they are not read again.
    append_bronze(
        lake,
        &[call(
            "2025-01-01T00:00:00Z",
            "A",
            "1.6",
            "h",
            "Heartbeat",
            "{}".into(),
        )],
    )
    .await;
    let s = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(s.tables[0].rows_in, 0, "{s}");
    let v = version_of(lake, SILVER_STATUS_EVENTS).await;
    assert!(v.is_some());
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(version_of(lake, SILVER_STATUS_EVENTS).await, v);
    assert!(daily(lake).await.is_empty());
    assert!(ranking(lake).await.is_empty());
}
