//! Bad frames get the right CALLERROR, echo the CALL's message id, and leave
//! the connection open.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tests::{OcppClient, TestServer};

/// A frame to send and the CALLERROR expected back (`None` id: any string).
struct Case {
    what: &'static str,
    frame: String,
    id: Option<&'static str>,
    code: &'static str,
}

fn case(
    what: &'static str,
    frame: impl Into<String>,
    id: Option<&'static str>,
    code: &'static str,
) -> Case {
    Case {
        what,
        frame: frame.into(),
        id,
        code,
    }
}

fn call(id: &str, action: &str, payload: Value) -> String {
    json!([2, id, action, payload]).to_string()
}

fn cases_v16() -> Vec<Case> {
    vec![
        case("not JSON", "this is not json", None, "FormationViolation"),
        case(
            "truncated JSON",
            r#"[2,"t1","Heartbeat""#,
            None,
            "FormationViolation",
        ),
        case(
            "unknown action",
            call("u1", "FooBar", json!({})),
            Some("u1"),
            "NotImplemented",
        ),
        case(
            "CSMS-only action",
            call("r1", "Reset", json!({"type": "Soft"})),
            Some("r1"),
            "NotSupported",
        ),
        case(
            "missing required property",
            call("m1", "BootNotification", json!({"chargePointVendor": "V"})),
            Some("m1"),
            "OccurenceConstraintViolation",
        ),
        case(
            "wrong type",
            call(
                "w1",
                "StatusNotification",
                json!({"connectorId": "one", "errorCode": "NoError", "status": "Available"}),
            ),
            Some("w1"),
            "TypeConstraintViolation",
        ),
        case(
            "bad enum value",
            call(
                "e1",
                "StatusNotification",
                json!({"connectorId": 1, "errorCode": "NoError", "status": "Exploded"}),
            ),
            Some("e1"),
            "PropertyConstraintViolation",
        ),
        case(
            "string too long",
            call(
                "l1",
                "BootNotification",
                json!({"chargePointVendor": "V".repeat(21), "chargePointModel": "M"}),
            ),
            Some("l1"),
            "PropertyConstraintViolation",
        ),
        case(
            "extra property",
            call("x1", "Heartbeat", json!({"bogus": 1})),
            Some("x1"),
            "FormationViolation",
        ),
    ]
}

fn cases_v2() -> Vec<Case> {
    vec![
        case(
            "not JSON",
            "this is not json",
            Some("-1"),
            "RpcFrameworkError",
        ),
        case(
            "truncated JSON",
            r#"[2,"t1","Heartbeat""#,
            Some("-1"),
            "RpcFrameworkError",
        ),
        case(
            "unknown action",
            call("u1", "FooBar", json!({})),
            Some("u1"),
            "NotImplemented",
        ),
        case(
            "CSMS-only action",
            call("r1", "Reset", json!({"type": "Immediate"})),
            Some("r1"),
            "NotSupported",
        ),
        case(
            "missing required property",
            call("m1", "BootNotification", json!({"reason": "PowerUp"})),
            Some("m1"),
            "OccurrenceConstraintViolation",
        ),
        case(
            "wrong type",
            call(
                "w1",
                "StatusNotification",
                json!({"timestamp": "2026-01-01T00:00:00Z", "connectorStatus": "Available",
                       "evseId": "one", "connectorId": 1}),
            ),
            Some("w1"),
            "TypeConstraintViolation",
        ),
        case(
            "bad enum value",
            call(
                "e1",
                "StatusNotification",
                json!({"timestamp": "2026-01-01T00:00:00Z", "connectorStatus": "Exploded",
                       "evseId": 1, "connectorId": 1}),
            ),
            Some("e1"),
            "PropertyConstraintViolation",
        ),
        case(
            "string too long",
            call(
                "l1",
                "BootNotification",
                json!({"reason": "PowerUp",
                       "chargingStation": {"model": "M", "vendorName": "V".repeat(51)}}),
            ),
            Some("l1"),
            "PropertyConstraintViolation",
        ),
        case(
            "extra property",
            call("x1", "Heartbeat", json!({"bogus": 1})),
            Some("x1"),
            "FormatViolation",
        ),
    ]
}

fn boot_frame(version: &str) -> String {
    if version == "ocpp1.6" {
        call(
            "boot-1",
            "BootNotification",
            json!({"chargePointVendor": "E2E", "chargePointModel": "Raw"}),
        )
    } else {
        call(
            "boot-1",
            "BootNotification",
            json!({"reason": "PowerUp", "chargingStation": {"model": "Raw", "vendorName": "E2E"}}),
        )
    }
}

/// Boots, then sends every case on one connection, checking each answer,
/// then checks the connection still answers a Heartbeat.
async fn check_cases(version: &str, cases: Vec<Case>) -> Result<()> {
    let server = TestServer::builder()
        .station("RAW1", Some("raw-pw"))
        .env("CSMS_LIMITS__BAD_FRAMES_BEFORE_CLOSE", "1000")
        .start()
        .await;
    let mut client = server
        .connect("RAW1", version, Some(("RAW1", "raw-pw")))
        .await?;
    let boot = client.roundtrip(&boot_frame(version)).await?;
    ensure!(
        boot.first() == Some(&json!(3)) && boot[2]["status"] == "Accepted",
        "boot answered {boot:?}"
    );
    let mut failures = Vec::new();
    for c in &cases {
        let answer = client
            .roundtrip(&c.frame)
            .await
            .with_context(|| format!("{version} {}: sent {}", c.what, c.frame))?;
        let ok = answer.len() == 5
            && answer[0] == 4
            && answer[1].is_string()
            && c.id.is_none_or(|id| answer[1] == id)
            && answer[2] == c.code
            && answer[3].is_string()
            && answer[4].is_object();
        if !ok {
            failures.push(format!(
                "{version} {}: sent {} → got {} (expected [4,{},\"{}\",\"...\",{{...}}])",
                c.what,
                c.frame,
                Value::Array(answer),
                c.id.map_or("<any id>".to_string(), |id| format!("\"{id}\"")),
                c.code
            ));
        }
    }
    client
        .heartbeat_ok("hb-after")
        .await
        .context("connection still usable after the bad frames")?;
    ensure!(
        failures.is_empty(),
        "wrong CALLERRORs:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn callerrors_v16() -> Result<()> {
    check_cases("ocpp1.6", cases_v16()).await
}

#[tokio::test]
async fn callerrors_v201() -> Result<()> {
    check_cases("ocpp2.0.1", cases_v2()).await
}

#[tokio::test]
async fn callerrors_v21() -> Result<()> {
    check_cases("ocpp2.1", cases_v2()).await
}

/// A CALLRESULT or CALLERROR for a CALL the CSMS never sent gets no answer
/// and does not break the session.
#[tokio::test]
async fn unsolicited_results_are_ignored() -> Result<()> {
    let server = TestServer::builder()
        .station("RAW2", Some("raw-pw"))
        .start()
        .await;
    let mut client: OcppClient = server
        .connect("RAW2", "ocpp2.0.1", Some(("RAW2", "raw-pw")))
        .await?;
    client.send_text(r#"[3,"never-sent",{}]"#).await?;
    client
        .send_text(r#"[4,"never-sent-2","InternalError","x",{}]"#)
        .await?;
    // The next frame must be the Heartbeat's answer, not a reply to the above.
    client.heartbeat_ok("hb-1").await?;
    Ok(())
}
