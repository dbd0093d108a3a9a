//! Full sessions by real `ocpp`-package charge points, one per version.

use anyhow::{Result, ensure};
use serde_json::Value;
use tests::{TestServer, run_python_json};

/// Starts a server with the station and tokens the scripts expect and runs
/// `script` against it; returns the script's JSON summary.
pub async fn run_session(server: &TestServer, script: &str, station: &str) -> Result<Value> {
    let url = server.ocpp_url(station);
    let summary = run_python_json(
        script,
        &[
            "--url",
            &url,
            "--station",
            station,
            "--password",
            "py-pw",
            "--id-tag",
            "TAG-OK",
            "--blocked-tag",
            "TAG-BLOCKED",
        ],
    )
    .await?;
    let sent = summary["sent"].as_array().map_or(0, Vec::len);
    ensure!(sent >= 20, "{script} sent only {sent} CALLs: {summary}");
    Ok(summary)
}

pub async fn server_for(station: &str) -> TestServer {
    TestServer::builder()
        .station(station, Some("py-pw"))
        .token("TAG-OK", "Accepted")
        .token("TAG-BLOCKED", "Blocked")
        .start()
        .await
}

#[tokio::test]
async fn python_charge_point_v16() -> Result<()> {
    let server = server_for("PY16").await;
    let summary = run_session(&server, "cp_v16.py", "PY16").await?;
    ensure!(
        summary["transaction_id"].as_i64().unwrap_or(0) > 0,
        "{summary}"
    );
    Ok(())
}

#[tokio::test]
async fn python_charge_point_v201() -> Result<()> {
    let server = server_for("PY201").await;
    run_session(&server, "cp_v201.py", "PY201").await?;
    Ok(())
}

#[tokio::test]
async fn python_charge_point_v21() -> Result<()> {
    let server = server_for("PY21").await;
    run_session(&server, "cp_v21.py", "PY21").await?;
    Ok(())
}
