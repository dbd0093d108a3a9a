//! Workflows and alerts through the `csms` binary: `csms workflows
//! list|run|history` over a simulated lake with the run in
//! `ops.workflow_runs` (queryable with SQL), and `csms serve` raising and
//! clearing a Faulted alert at a real webhook receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use tests::{TestServer, poll};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const NIGHTLY: &str = r#"
[workflow]
name = "nightly"
schedule = "15 0 * * *"

[job]
kind = "pipeline"
stage = "all"
"#;

#[tokio::test]
async fn workflow_run_by_hand_is_recorded_and_queryable() -> Result<()> {
    let defs = tempfile::tempdir()?;
    std::fs::write(defs.path().join("nightly.toml"), NIGHTLY)?;
    // Not a workflow: skipped, as the shipped tariffs.toml is.
    std::fs::write(defs.path().join("tariffs.toml"), "[[tariff]]\nid = \"x\"\n")?;
    let server = TestServer::builder()
        .env("CSMS_WORKFLOWS__DIR", defs.path().display().to_string())
        .start()
        .await;
    server.cli_ok(&["simulate", "--stations", "4", "--days", "2"]);

    let list = server.cli_ok(&["workflows", "list"]);
    ensure!(
        list.contains("nightly") && list.contains("15 0 * * *"),
        "{list}"
    );
    ensure!(!list.contains("tariffs"), "{list}");

    let out = server.cli_ok(&["workflows", "run", "nightly"]);
    ensure!(out.contains("nightly succeeded after 1 attempt"), "{out}");

    let rows = server.cli_ok(&[
        "query",
        "SELECT workflow, job_kind, trigger, status, \"final\" FROM ops.workflow_runs",
        "--format",
        "json",
    ]);
    let rows: Value = serde_json::from_str(rows.trim())?;
    ensure!(
        rows == json!([{"workflow": "nightly", "job_kind": "pipeline", "trigger": "manual",
                        "status": "succeeded", "final": true}]),
        "{rows}"
    );
    // The job really ran the pipeline.
    let gold = server.cli_ok(&[
        "query",
        "SELECT count(*) AS n FROM silver.status_events",
        "--format",
        "json",
    ]);
    ensure!(!gold.contains("\"n\":0"), "{gold}");

    let history = server.cli_ok(&["workflows", "history", "nightly"]);
    ensure!(
        history.contains("manual") && history.contains("succeeded"),
        "{history}"
    );

    let unknown = server.cli(&["workflows", "run", "nope"]);
    ensure!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    ensure!(
        err.contains("no workflow named \"nope\"") && err.contains("nightly"),
        "{err}"
    );
    Ok(())
}

/// A webhook receiver: answers 200 to every POST and keeps the JSON bodies.
async fn webhook_receiver() -> Result<(u16, Arc<Mutex<Vec<Value>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let bodies: Arc<Mutex<Vec<Value>>> = Default::default();
    let keep = bodies.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    // Request line and headers.
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if let Ok(v) = serde_json::from_slice(&body) {
                        keep.lock().unwrap().push(v);
                    }
                    let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if r.get_mut().write_all(ok.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((port, bodies))
}

#[tokio::test]
async fn faulted_station_raises_one_alert_and_recovery_clears_it() -> Result<()> {
    let (port, bodies) = webhook_receiver().await?;
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .env(
            "CSMS_ALERTS__WEBHOOKS",
            format!("[\"http://127.0.0.1:{port}/hook\"]"),
        )
        .env("CSMS_ALERTS__POLL_SECS", "1")
        .start()
        .await;
    let mut cp = server.connect("ALERT1", "ocpp1.6", None).await?;
    let status = |s: &str, t: &str| json!({"connectorId": 1, "status": s, "errorCode": if s == "Faulted" { "GroundFailure" } else { "NoError" }, "timestamp": t});
    cp.call(
        "s1",
        "StatusNotification",
        status("Faulted", "2026-11-22T10:00:00Z"),
    )
    .await?;
    let raised = poll(Duration::from_secs(20), "the raised alert", || async {
        Ok(bodies.lock().unwrap().first().cloned())
    })
    .await?;
    ensure!(raised["event"] == "raised", "{raised}");
    ensure!(
        raised["kind"] == "faulted" && raised["station_id"] == "ALERT1",
        "{raised}"
    );

    // Still Faulted a few passes later: no second notification.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        bodies.lock().unwrap().len() == 1,
        "{:?}",
        bodies.lock().unwrap()
    );

    cp.call(
        "s2",
        "StatusNotification",
        status("Available", "2026-11-22T10:05:00Z"),
    )
    .await?;
    let cleared = poll(Duration::from_secs(20), "the cleared alert", || async {
        Ok(bodies.lock().unwrap().get(1).cloned())
    })
    .await?;
    ensure!(cleared["event"] == "cleared", "{cleared}");
    ensure!(
        cleared["alert_id"] == raised["alert_id"],
        "{cleared} vs {raised}"
    );
    Ok(())
}
