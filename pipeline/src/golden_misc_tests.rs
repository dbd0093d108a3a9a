//! Golden test of `silver.boots`, `silver.heartbeats` and
//! `silver.device_model`: hand-built bronze, expected rows by hand.

use schemas::tables::{SILVER_BOOTS, SILVER_DEVICE_MODEL, SILVER_HEARTBEATS};

use crate::golden_tests::{Msg, append_bronze, call, rows, table, version_of};
use crate::silver_misc::{BOOTS_TABLE, DEVICE_MODEL_TABLE, HEARTBEATS_TABLE};
use crate::{PipelineConfig, RunOptions, Stage, run};

fn heartbeat(received_at: &'static str, id: &str) -> Msg {
    call(received_at, "H", "1.6", id, "Heartbeat", "{}".into())
}

fn history() -> Vec<Msg> {
    vec![
        call(
            "2025-04-01T08:00:00Z",
            "H",
            "1.6",
            "boot1",
            "BootNotification",
            r#"{"chargePointVendor":"Acme","chargePointModel":"AC22","chargePointSerialNumber":"SN1","firmwareVersion":"1.2"}"#.into(),
        ),
        call(
            "2025-04-01T09:00:00Z",
            "R",
            "2.0.1",
            "boot2",
            "BootNotification",
            r#"{"reason":"PowerUp","chargingStation":{"vendorName":"Volt","model":"DC50","serialNumber":"SN2"}}"#.into(),
        ),
        // Hour 10: h1, h2, h3 and a retransmitted h2 (3 distinct); hour 11: h4.
        heartbeat("2025-04-01T10:00:05Z", "h1"),
        heartbeat("2025-04-01T10:20:00Z", "h2"),
        heartbeat("2025-04-01T10:20:03Z", "h2"),
        heartbeat("2025-04-01T10:59:59Z", "h3"),
        heartbeat("2025-04-01T11:00:00Z", "h4"),
        // The CSMS's answer to a heartbeat is not a heartbeat.
        {
            let mut m = heartbeat("2025-04-01T11:00:01Z", "h4");
            m.direction = "csms_to_cs";
            m.message_type = 3;
            m.payload = r#"{"currentTime":"2025-04-01T11:00:01Z"}"#.into();
            m
        },
        call(
            "2025-04-01T12:00:00Z",
            "R",
            "2.0.1",
            "rep1",
            "NotifyReport",
            r#"{"requestId":7,"generatedAt":"2025-03-31T23:59:00Z","seqNo":0,"tbc":false,"reportData":[
              {"component":{"name":"EVSE","evse":{"id":1}},"variable":{"name":"Power"},
               "variableAttribute":[{"type":"Actual","value":"0","mutability":"ReadOnly"}]},
              {"component":{"name":"OCPPCommCtrlr"},"variable":{"name":"HeartbeatInterval"},
               "variableAttribute":[{"value":"300"}]}]}"#
                .into(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_heartbeats_and_device_model() {
    let tmp = tempfile::tempdir().unwrap();
    let lake = tmp.path().to_str().unwrap();
    append_bronze(lake, &history()).await;
    let opts = RunOptions {
        stage: Stage::Silver,
        ..RunOptions::default()
    };
    let config = PipelineConfig::default();
    let s = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(table(&s, BOOTS_TABLE).rows_out, 2);
    assert_eq!(table(&s, HEARTBEATS_TABLE).rows_out, 2);
    assert_eq!(table(&s, DEVICE_MODEL_TABLE).rows_out, 2);

    assert_eq!(
        rows(
            lake,
            SILVER_BOOTS,
            "SELECT date, station_id, vendor, model, serial_number, firmware_version, reason, \
             event_time = received_at, ocpp_version, message_id FROM t ORDER BY station_id"
        )
        .await,
        [
            "2025-04-01|H|Acme|AC22|SN1|1.2|∅|true|1.6|boot1",
            "2025-04-01|R|Volt|DC50|SN2|∅|PowerUp|true|2.0.1|boot2",
        ]
    );
    assert_eq!(
        rows(
            lake,
            SILVER_HEARTBEATS,
            "SELECT date, hour, station_id, heartbeats FROM t ORDER BY hour"
        )
        .await,
        [
            "2025-04-01|2025-04-01T10:00:00Z|H|3",
            "2025-04-01|2025-04-01T11:00:00Z|H|1",
        ]
    );
    // generatedAt (Mar 31) decides the date, not the receipt (Apr 1).
    assert_eq!(
        rows(
            lake,
            SILVER_DEVICE_MODEL,
            "SELECT date, station_id, component, evse_id, variable, attribute_type, value, \
             mutability, reported_at, request_id, seq_no, message_id \
             FROM t ORDER BY attribute_index"
        )
        .await,
        [
            "2025-03-31|R|EVSE|1|Power|Actual|0|ReadOnly|2025-03-31T23:59:00Z|7|0|rep1",
            "2025-03-31|R|OCPPCommCtrlr|∅|HeartbeatInterval|Actual|300|∅|2025-03-31T23:59:00Z|7|0|rep1",
        ]
    );

    // A rerun without new bronze writes nothing.
    let before = [
        version_of(lake, SILVER_BOOTS).await,
        version_of(lake, SILVER_HEARTBEATS).await,
        version_of(lake, SILVER_DEVICE_MODEL).await,
    ];
    let s = run(lake, &config, &opts, &|_| {}).await.unwrap();
    for name in [BOOTS_TABLE, HEARTBEATS_TABLE, DEVICE_MODEL_TABLE] {
        assert_eq!(table(&s, name).dates_rewritten, 0, "{name}");
    }
    let after = [
        version_of(lake, SILVER_BOOTS).await,
        version_of(lake, SILVER_HEARTBEATS).await,
        version_of(lake, SILVER_DEVICE_MODEL).await,
    ];
    assert_eq!(before, after);

    // A late retransmit of h4 plus a new heartbeat in hour 11: the count
    // becomes 2 (h4 once, h5), recounted from bronze.
    append_bronze(
        lake,
        &[
            heartbeat("2025-04-01T11:30:00Z", "h4"),
            heartbeat("2025-04-01T11:40:00Z", "h5"),
        ],
    )
    .await;
    let s = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(table(&s, HEARTBEATS_TABLE).dates_rewritten, 1);
    assert_eq!(
        rows(
            lake,
            SILVER_HEARTBEATS,
            "SELECT hour, heartbeats FROM t ORDER BY hour"
        )
        .await,
        ["2025-04-01T10:00:00Z|3", "2025-04-01T11:00:00Z|2"]
    );
}
