//! Golden tests of the transaction slice: a hand-built bronze history of 1.6
//! and 2.0.1 sessions, the pipeline run over it, and silver/gold compared
//! with answers computed by hand (in the comments).

use schemas::tables::{
    GOLD_COMPLETED_TRANSACTIONS, GOLD_TRANSACTIONS_COMPLETED, SILVER_METER_VALUES,
    SILVER_TRANSACTION_EVENTS, SILVER_TRANSACTIONS,
};

use crate::golden_tests::{Msg, append_bronze, call, rows, table, version_of};
use crate::{PipelineConfig, RunOptions, run};

/// The CSMS's CALLRESULT to a 1.6 StartTransaction.
fn start_answer(received_at: &'static str, station: &'static str, id: &str, tx: i64) -> Msg {
    let mut m = call(
        received_at,
        station,
        "1.6",
        id,
        "StartTransaction",
        format!(r#"{{"idTagInfo":{{"status":"Accepted"}},"transactionId":{tx}}}"#),
    );
    m.direction = "csms_to_cs";
    m.message_type = 3;
    m
}

fn start16(received_at: &'static str, id: &str, meter: i64, ts: &str) -> Msg {
    call(
        received_at,
        "P",
        "1.6",
        id,
        "StartTransaction",
        format!(r#"{{"connectorId":1,"idTag":"TAG1","meterStart":{meter},"timestamp":"{ts}"}}"#),
    )
}

fn stop16(received_at: &'static str, id: &str, tx: i64, meter: i64, ts: &str) -> Msg {
    call(
        received_at,
        "P",
        "1.6",
        id,
        "StopTransaction",
        format!(
            r#"{{"transactionId":{tx},"idTag":"TAG1","meterStop":{meter},"timestamp":"{ts}","reason":"Local"}}"#
        ),
    )
}

/// A 2.0.1 TransactionEvent of transaction `q-1` on station Q.
fn tx201(received_at: &'static str, id: &str, kind: &str, seq: i64, ts: &str, extra: &str) -> Msg {
    call(
        received_at,
        "Q",
        "2.0.1",
        id,
        "TransactionEvent",
        format!(
            r#"{{"eventType":"{kind}","timestamp":"{ts}","triggerReason":"MeterValuePeriodic","seqNo":{seq},"transactionInfo":{{"transactionId":"q-1"{info}}},"evse":{{"id":1,"connectorId":1}}{extra}}}"#,
            info = if kind == "Ended" {
                r#","stoppedReason":"EVDisconnected""#
            } else {
                ""
            }
        ),
    )
}

fn first_commit() -> Vec<Msg> {
    vec![
        // P, 1.6 transaction 42: 1000 → 13500 Wh over 2 h = 12.5 kWh, 7200 s.
        start16("2025-03-10T08:00:01Z", "s42", 1000, "2025-03-10T08:00:00Z"),
        start_answer("2025-03-10T08:00:01Z", "P", "s42", 42),
        call(
            "2025-03-10T09:00:00Z",
            "P",
            "1.6",
            "m42",
            "MeterValues",
            r#"{"connectorId":1,"transactionId":42,"meterValue":[{"timestamp":"2025-03-10T09:00:00Z","sampledValue":[{"value":"7000"}]}]}"#.into(),
        ),
        stop16("2025-03-10T10:00:01Z", "p42", 42, 13500, "2025-03-10T10:00:00Z"),
        // The same StopTransaction retransmitted (same message id), and sent
        // again under a new message id: the transaction still counts once.
        stop16("2025-03-10T10:00:05Z", "p42", 42, 13500, "2025-03-10T10:00:00Z"),
        stop16("2025-03-10T10:00:30Z", "p42b", 42, 13500, "2025-03-10T10:00:00Z"),
        // P, transaction 43: stop below start (5000 → 4000), 1800 s.
        start16("2025-03-10T11:00:01Z", "s43", 5000, "2025-03-10T11:00:00Z"),
        start_answer("2025-03-10T11:00:01Z", "P", "s43", 43),
        stop16("2025-03-10T11:30:01Z", "p43", 43, 4000, "2025-03-10T11:30:00Z"),
        // P, transaction 44: started, never stopped.
        start16("2025-03-10T12:00:01Z", "s44", 100, "2025-03-10T12:00:00Z"),
        start_answer("2025-03-10T12:00:01Z", "P", "s44", 44),
        // P, transaction 45: the CALL is here, its answer only in the next
        // commit (pairing must look it up).
        start16("2025-03-10T13:00:01Z", "s45", 0, "2025-03-10T13:00:00Z"),
        // Q, 2.0.1 transaction q-1 (begins 2.0 kWh, samples 5000 and 9500 Wh).
        tx201(
            "2025-03-10T20:00:01Z",
            "q0",
            "Started",
            0,
            "2025-03-10T20:00:00Z",
            r#","idToken":{"idToken":"TAGQ","type":"ISO14443"},"meterValue":[{"timestamp":"2025-03-10T20:00:00Z","sampledValue":[{"value":2.0,"context":"Transaction.Begin","unitOfMeasure":{"unit":"kWh"}}]}]"#,
        ),
        tx201(
            "2025-03-10T21:00:01Z",
            "q1",
            "Updated",
            1,
            "2025-03-10T21:00:00Z",
            r#","meterValue":[{"timestamp":"2025-03-10T21:00:00Z","sampledValue":[{"value":5000,"context":"Sample.Periodic"}]}]"#,
        ),
        tx201(
            "2025-03-11T00:30:01Z",
            "q2",
            "Updated",
            2,
            "2025-03-11T00:30:00Z",
            r#","meterValue":[{"timestamp":"2025-03-11T00:30:00Z","sampledValue":[{"value":9500,"context":"Sample.Periodic"},{"value":230.1,"measurand":"Voltage","unitOfMeasure":{"unit":"V"}}]}]"#,
        ),
    ]
}

fn second_commit() -> Vec<Msg> {
    vec![
        // Transaction 45's answer, and its stop: 0 → 3000 Wh, 3600 s.
        start_answer("2025-03-10T13:00:02Z", "P", "s45", 45),
        stop16(
            "2025-03-10T14:00:01Z",
            "p45",
            45,
            3000,
            "2025-03-10T14:00:00Z",
        ),
        // q-1 ends without a meter value: energy from the samples,
        // 9500 - 2000 = 7500 Wh; 20:00 → 01:00 = 18000 s; stop date Mar 11.
        tx201(
            "2025-03-11T01:00:01Z",
            "q3",
            "Ended",
            3,
            "2025-03-11T01:00:00Z",
            "",
        ),
    ]
}

async fn silver_tx(lake: &str) -> Vec<String> {
    rows(
        lake,
        SILVER_TRANSACTIONS,
        "SELECT date, station_id, transaction_id, evse_id, connector_id, id_token, started_at,
                stopped_at, meter_start_wh, meter_stop_wh, energy_wh, stop_reason, is_complete,
                ocpp_version, energy_flag
         FROM t ORDER BY station_id, transaction_id",
    )
    .await
}

async fn detail(lake: &str) -> Vec<String> {
    rows(
        lake,
        GOLD_TRANSACTIONS_COMPLETED,
        "SELECT date, station_id, transaction_id, id_token, started_at, stopped_at, duration_s,
                energy_kwh, energy_flag
         FROM t ORDER BY date, station_id, transaction_id",
    )
    .await
}

async fn daily(lake: &str) -> Vec<String> {
    rows(
        lake,
        GOLD_COMPLETED_TRANSACTIONS,
        "SELECT date, station_id, transactions, energy_kwh, total_duration_s, avg_duration_s,
                p95_duration_s
         FROM t ORDER BY date, station_id",
    )
    .await
}

const TABLES: [&str; 5] = [
    SILVER_METER_VALUES,
    SILVER_TRANSACTION_EVENTS,
    SILVER_TRANSACTIONS,
    GOLD_TRANSACTIONS_COMPLETED,
    GOLD_COMPLETED_TRANSACTIONS,
];

async fn versions(lake: &str) -> Vec<Option<u64>> {
    let mut out = Vec::new();
    for t in TABLES {
        out.push(version_of(lake, t).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_golden_incremental_and_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let lake = tmp.path().join("lake");
    let lake = lake.to_str().unwrap();
    let config = PipelineConfig {
        memory_limit_bytes: 64 << 20,
        ..PipelineConfig::default()
    };
    let opts = RunOptions::default();
    append_bronze(lake, &first_commit()).await;
    let first = run(lake, &config, &opts, &|_| {}).await.unwrap();
    // Samples: m42 (1), q0 (1), q1 (1), q2 (2, one of them a voltage).
    assert_eq!(table(&first, "silver.meter_values").rows_out, 5, "{first}");
    // Events: starts 42, 43, 44 (45 unanswered gives none), stops p42 (its
    // retransmit deduplicated), p42b, p43, and q0..q2.
    assert_eq!(
        table(&first, "silver.transaction_events").rows_out,
        9,
        "{first}"
    );
    assert_eq!(
        silver_tx(lake).await,
        vec![
            "2025-03-10|P|42|∅|1|TAG1|2025-03-10T08:00:00Z|2025-03-10T10:00:00Z|1000.0|13500.0|12500.0|Local|true|1.6|∅",
            "2025-03-10|P|43|∅|1|TAG1|2025-03-10T11:00:00Z|2025-03-10T11:30:00Z|5000.0|4000.0|∅|Local|true|1.6|stop_below_start",
            "2025-03-10|P|44|∅|1|TAG1|2025-03-10T12:00:00Z|∅|100.0|∅|∅|∅|false|1.6|missing_meter",
            // Running: energy so far from the samples, 9500 - 2000.
            "2025-03-10|Q|q-1|1|1|TAGQ|2025-03-10T20:00:00Z|∅|2000.0|∅|7500.0|∅|false|2.0.1|∅",
        ]
    );
    assert_eq!(
        detail(lake).await,
        vec![
            "2025-03-10|P|42|TAG1|2025-03-10T08:00:00Z|2025-03-10T10:00:00Z|7200|12.5|∅",
            "2025-03-10|P|43|TAG1|2025-03-10T11:00:00Z|2025-03-10T11:30:00Z|1800|∅|stop_below_start",
        ]
    );
    // 2 transactions; energy only from 42; durations 7200 + 1800 = 9000,
    // avg 4500; p95 = 1800 + 0.95 × (7200 - 1800) = 6930.
    assert_eq!(
        daily(lake).await,
        vec!["2025-03-10|P|2|12.5|9000|4500.0|6930.0"]
    );

    // A rerun without new bronze writes nothing.
    let before = versions(lake).await;
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(versions(lake).await, before);

    append_bronze(lake, &second_commit()).await;
    let second = run(lake, &config, &opts, &|_| {}).await.unwrap();
    // New: 45's start (paired with the CALL from the first commit), its
    // stop, and q3; Mar 10 (10 rows now) and Mar 11 (q2, q3) are rewritten.
    let events = table(&second, "silver.transaction_events");
    assert_eq!(
        (events.dates_rewritten, events.rows_out),
        (2, 12),
        "{second}"
    );
    assert_eq!(
        silver_tx(lake).await[3..],
        [
            "2025-03-10|P|45|∅|1|TAG1|2025-03-10T13:00:00Z|2025-03-10T14:00:00Z|0.0|3000.0|3000.0|Local|true|1.6|∅",
            "2025-03-10|Q|q-1|1|1|TAGQ|2025-03-10T20:00:00Z|2025-03-11T01:00:00Z|2000.0|∅|7500.0|EVDisconnected|true|2.0.1|∅",
        ]
    );
    assert_eq!(
        detail(lake).await,
        vec![
            "2025-03-10|P|42|TAG1|2025-03-10T08:00:00Z|2025-03-10T10:00:00Z|7200|12.5|∅",
            "2025-03-10|P|43|TAG1|2025-03-10T11:00:00Z|2025-03-10T11:30:00Z|1800|∅|stop_below_start",
            "2025-03-10|P|45|TAG1|2025-03-10T13:00:00Z|2025-03-10T14:00:00Z|3600|3.0|∅",
            "2025-03-11|Q|q-1|TAGQ|2025-03-10T20:00:00Z|2025-03-11T01:00:00Z|18000|7.5|∅",
        ]
    );
    // Mar 10, P: 3 transactions, 12.5 + 3.0 = 15.5 kWh (43 excluded),
    // 7200 + 1800 + 3600 = 12600 s, avg 4200; sorted 1800, 3600, 7200:
    // p95 at rank 0.95 × 2 = 1.9 → 3600 + 0.9 × 3600 = 6840.
    // Mar 11, Q: one 18000 s transaction of 7.5 kWh.
    assert_eq!(
        daily(lake).await,
        vec![
            "2025-03-10|P|3|15.5|12600|4200.0|6840.0",
            "2025-03-11|Q|1|7.5|18000|18000.0|18000.0",
        ]
    );
    let before = versions(lake).await;
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(versions(lake).await, before);
}

/// A 1.6 StartTransaction answered across midnight, the CALL and its
/// CALLRESULT in different bronze commits read by different runs: the run
/// that reads the answer finds the CALL of the day before in bronze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_answered_after_midnight_in_a_later_run() {
    let tmp = tempfile::tempdir().unwrap();
    let lake = tmp.path().join("lake");
    let lake = lake.to_str().unwrap();
    let config = PipelineConfig::default();
    let opts = RunOptions::default();
    // Run 1 (Mar 12): the CALL only. No answer yet, so no event.
    append_bronze(
        lake,
        &[start16(
            "2025-03-12T23:59:59Z",
            "s50",
            500,
            "2025-03-12T23:59:58Z",
        )],
    )
    .await;
    let first = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(
        table(&first, "silver.transaction_events").rows_out,
        0,
        "{first}"
    );
    assert!(silver_tx(lake).await.is_empty());

    // Run 2 (Mar 13): the answer (transaction 50), then the stop.
    append_bronze(
        lake,
        &[
            start_answer("2025-03-13T00:00:01Z", "P", "s50", 50),
            stop16(
                "2025-03-13T01:00:01Z",
                "p50",
                50,
                4500,
                "2025-03-13T01:00:00Z",
            ),
        ],
    )
    .await;
    let second = run(lake, &config, &opts, &|_| {}).await.unwrap();
    // The start (dated Mar 12 by its timestamp) and the stop (Mar 13).
    let events = table(&second, "silver.transaction_events");
    assert_eq!(
        (events.rows_out, events.dates_rewritten),
        (2, 2),
        "{second}"
    );
    // 500 → 4500 Wh = 4000 Wh; 23:59:58 → 01:00:00 = 3602 s; partitioned
    // by the start date, completed on the stop date.
    assert_eq!(
        silver_tx(lake).await,
        vec![
            "2025-03-12|P|50|∅|1|TAG1|2025-03-12T23:59:58Z|2025-03-13T01:00:00Z|500.0|4500.0|4000.0|Local|true|1.6|∅"
        ]
    );
    assert_eq!(
        detail(lake).await,
        vec!["2025-03-13|P|50|TAG1|2025-03-12T23:59:58Z|2025-03-13T01:00:00Z|3602|4.0|∅"]
    );
    // Nothing new: nothing written.
    let before = versions(lake).await;
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(versions(lake).await, before);
}
