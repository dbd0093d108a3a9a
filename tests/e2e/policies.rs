//! Boot and token policies set by configuration.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::json;
use tests::{OcppClient, TestServer};

/// The answer to a BootNotification of station POL1 (2.0.1) on a server
/// started with `env`.
async fn boot_answer(env: &[(&str, &str)]) -> Result<Vec<serde_json::Value>> {
    let mut builder = TestServer::builder().station("POL1", Some("pw"));
    for (k, v) in env {
        builder = builder.env(k, *v);
    }
    let server = builder.start().await;
    let mut client = server
        .connect("POL1", "ocpp2.0.1", Some(("POL1", "pw")))
        .await?;
    let answer = client
        .call(
            "boot-1",
            "BootNotification",
            json!({"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}}),
        )
        .await?;
    ensure!(
        answer[0] == 3 && answer[1] == "boot-1",
        "boot answered {answer:?}"
    );
    Ok(answer)
}

async fn boot_status(policy: &str) -> Result<String> {
    let answer = boot_answer(&[
        ("CSMS_OCPP__BOOT_POLICY", policy),
        ("CSMS_OCPP__HEARTBEAT_INTERVAL_SECS", "123"),
    ])
    .await?;
    let interval = answer[2]["interval"].as_i64().unwrap_or(0);
    ensure!(interval > 0, "interval must be positive: {answer:?}");
    if policy == "accept" {
        ensure!(
            interval == 123,
            "heartbeat interval setting not applied: {answer:?}"
        );
    }
    Ok(answer[2]["status"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn boot_policy_accept() -> Result<()> {
    assert_eq!(boot_status("accept").await?, "Accepted");
    Ok(())
}

#[tokio::test]
async fn boot_policy_pending() -> Result<()> {
    assert_eq!(boot_status("pending").await?, "Pending");
    Ok(())
}

#[tokio::test]
async fn boot_policy_reject() -> Result<()> {
    assert_eq!(boot_status("reject").await?, "Rejected");
    Ok(())
}

/// Registered tokens get their status; unknown ones follow the default policy.
async fn authorize_statuses(default_policy: &str) -> Result<Vec<(String, String)>> {
    let server = TestServer::builder()
        .station("TOK1", Some("pw"))
        .token("TAG-OK", "Accepted")
        .token("TAG-BLOCKED", "Blocked")
        .env("CSMS_OCPP__DEFAULT_TOKEN_POLICY", default_policy)
        .start()
        .await;
    let mut client = server
        .connect("TOK1", "ocpp1.6", Some(("TOK1", "pw")))
        .await?;
    let mut out = Vec::new();
    for (i, tag) in ["TAG-OK", "TAG-BLOCKED", "TAG-UNKNOWN"].iter().enumerate() {
        let id = format!("auth-{i}");
        let answer = client.call(&id, "Authorize", json!({"idTag": tag})).await?;
        ensure!(
            answer[0] == 3 && answer[1] == id.as_str(),
            "Authorize {tag}: {answer:?}"
        );
        let status = answer[2]["idTagInfo"]["status"]
            .as_str()
            .unwrap_or_default();
        out.push((tag.to_string(), status.to_string()));
    }
    Ok(out)
}

#[tokio::test]
async fn token_policy_accept_unknown() -> Result<()> {
    let statuses = authorize_statuses("accept").await?;
    assert_eq!(statuses[0].1, "Accepted", "{statuses:?}");
    assert_eq!(statuses[1].1, "Blocked", "{statuses:?}");
    assert_eq!(statuses[2].1, "Accepted", "{statuses:?}");
    Ok(())
}

#[tokio::test]
async fn token_policy_reject_unknown() -> Result<()> {
    let statuses = authorize_statuses("reject").await?;
    assert_eq!(statuses[0].1, "Accepted", "{statuses:?}");
    assert_eq!(statuses[1].1, "Blocked", "{statuses:?}");
    assert!(
        statuses[2].1 == "Invalid" || statuses[2].1 == "Blocked",
        "unknown token with reject policy: {statuses:?}"
    );
    Ok(())
}

/// A saturated node answers boots Pending with its admission interval
/// (`pending_lag_ms = 0`: any lag counts as saturated).
#[tokio::test]
async fn saturated_node_defers_boots_with_its_own_interval() -> Result<()> {
    let answer = boot_answer(&[
        ("CSMS_ADMISSION__PENDING_LAG_MS", "0"),
        ("CSMS_ADMISSION__PENDING_MIN_SECS", "3"),
        ("CSMS_ADMISSION__PENDING_MAX_SECS", "3"),
    ])
    .await?;
    ensure!(
        answer[2]["status"] == "Pending" && answer[2]["interval"] == 3,
        "expected Pending with the admission interval: {answer:?}"
    );
    Ok(())
}

/// With one admission slot a second station is not upgraded while the first
/// has not had its first message answered, and is right after it has.
#[tokio::test]
async fn one_admission_slot_admits_one_station_at_a_time() -> Result<()> {
    let server = TestServer::builder()
        .station("ADM1", Some("pw"))
        .station("ADM2", Some("pw"))
        .env("CSMS_ADMISSION__MAX_ADMITTING", "1")
        .env("CSMS_ADMISSION__SLOT_HOLD_MS", "60000")
        .start()
        .await;
    let boot = json!({"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}});
    let mut first = server
        .connect("ADM1", "ocpp2.0.1", Some(("ADM1", "pw")))
        .await?;
    let url = server.ocpp_url("ADM2");
    let second = tokio::spawn(async move {
        OcppClient::connect(&url, &["ocpp2.0.1"], Some(("ADM2", "pw"))).await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    ensure!(
        !second.is_finished(),
        "the second station was upgraded while the only slot was held"
    );
    let answer = first.call("b1", "BootNotification", boot.clone()).await?;
    ensure!(answer[2]["status"] == "Accepted", "{answer:?}");
    let mut second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .map_err(|_| anyhow::anyhow!("the second station was not admitted after the first"))??
        .map_err(|e| anyhow::anyhow!("second upgrade: {e}"))?;
    let answer = second.call("b2", "BootNotification", boot).await?;
    ensure!(answer[2]["status"] == "Accepted", "{answer:?}");
    Ok(())
}
