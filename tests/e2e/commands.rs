//! CSMS-initiated CALLs through the back-office API: the command reaches the
//! station, its answer comes back to the HTTP caller; bad payloads, unknown
//! actions, stations that are not connected and stations that never answer
//! each get their own status.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{OcppClient, TestServer};

/// Answers the next CALL the station receives with `answer`, returning the CALL.
async fn answer_next(client: &mut OcppClient, answer: Value) -> Vec<Value> {
    let call = client.recv_frame().await.expect("a CALL from the CSMS");
    assert_eq!(call[0], 2, "{call:?}");
    let reply = json!([3, call[1], answer]).to_string();
    client.send_text(reply).await.unwrap();
    call
}

#[tokio::test]
async fn command_reaches_station_and_answer_returns() {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .start()
        .await;
    let mut cp = server.connect("CMD16", "ocpp1.6", None).await.unwrap();
    cp.heartbeat_ok("h1").await.unwrap();

    let body = json!({ "type": "Hard" }).to_string();
    let (resp, call) = tokio::join!(
        server.admin_request(
            "POST",
            "/api/stations/CMD16/commands/Reset",
            Some(body.as_bytes())
        ),
        answer_next(&mut cp, json!({ "status": "Accepted" })),
    );
    let resp = resp.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json().unwrap();
    assert_eq!(v["status"], "result");
    assert_eq!(v["payload"]["status"], "Accepted");
    assert_eq!(call[2], "Reset");
    assert_eq!(call[3], json!({ "type": "Hard" }));
    assert_eq!(call[1].as_str().unwrap().len(), 36, "uuid message id");

    // A CALLERROR from the station is handed back as such.
    let body = json!({ "connectorId": 1 }).to_string();
    let (resp, _) = tokio::join!(
        server.admin_request(
            "POST",
            "/api/stations/CMD16/commands/UnlockConnector",
            Some(body.as_bytes())
        ),
        async {
            let call = cp.recv_frame().await.unwrap();
            let err = json!([4, call[1], "NotSupported", "no lock here", {}]).to_string();
            cp.send_text(err).await.unwrap();
        },
    );
    let v = resp.unwrap().json().unwrap();
    assert_eq!(v["status"], "error");
    assert_eq!(v["error_code"], "NotSupported");

    // The station still answers its own CALLs afterwards.
    cp.heartbeat_ok("h2").await.unwrap();
}

#[tokio::test]
async fn command_refusals() {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .env("CSMS_OCPP__CALL_TIMEOUT_SECS", "2")
        .start()
        .await;
    let mut cp = server.connect("CMD201", "ocpp2.0.1", None).await.unwrap();
    cp.heartbeat_ok("h1").await.unwrap();

    // Schema violation: 400 with the reason, nothing sent.
    let r = server
        .admin_request(
            "POST",
            "/api/stations/CMD201/commands/Reset",
            Some(br#"{"type":"Sideways"}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("type"), "{}", r.text());
    // A 1.6 action on a 2.0.1 station.
    let r = server
        .admin_request(
            "POST",
            "/api/stations/CMD201/commands/RemoteStartTransaction",
            Some(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // A charger-initiated action is not a command.
    let r = server
        .admin_request(
            "POST",
            "/api/stations/CMD201/commands/Heartbeat",
            Some(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // Not connected anywhere.
    let r = server
        .admin_request(
            "POST",
            "/api/stations/NOBODY/commands/Reset",
            Some(br#"{"type":"Immediate"}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.text());

    // The station receives the CALL but never answers: 504 after the timeout.
    let started = std::time::Instant::now();
    let (r, call) = tokio::join!(
        server.admin_request(
            "POST",
            "/api/stations/CMD201/commands/Reset",
            Some(br#"{"type":"Immediate"}"#)
        ),
        cp.recv_frame(),
    );
    let r = r.unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(call.unwrap()[2], "Reset");
    // A late answer to the timed-out CALL is not mistaken for the next one.
    cp.heartbeat_ok("h2").await.unwrap();
}

/// The Python `ocpp` charge point validates the CALLs we send against the
/// OCA schemas before answering them.
#[tokio::test]
async fn real_client_answers_commands() {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .start()
        .await;
    let url = server.ocpp_url("PYCMD");
    let mut child = tokio::process::Command::new("python3")
        .arg(tests::workspace_root().join("tests/python/cp_responder.py"))
        .args([
            "--url",
            &url,
            "--station",
            "PYCMD",
            "--subprotocol",
            "ocpp2.0.1",
            "--duration",
            "60",
            "--max-calls",
            "5",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.contains("ready"), "{first}");

    let body = json!({ "getVariableData": [{ "component": { "name": "OCPPCommCtrlr" }, "variable": { "name": "HeartbeatInterval" } }] });
    let r = server
        .admin_request(
            "POST",
            "/api/stations/PYCMD/commands/GetVariables",
            Some(body.to_string().as_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["status"], "result", "{v}");
    assert!(v["payload"]["getVariableResult"].is_array(), "{v}");

    let r = server
        .admin_request(
            "POST",
            "/api/stations/PYCMD/commands/Reset",
            Some(br#"{"type":"OnIdle"}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["payload"]["status"], "Accepted");
}
