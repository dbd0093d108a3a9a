//! Every frame in and out lands in `bronze.ocpp_messages` exactly once,
//! read back with the Python `deltalake` package as an analyst would.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};
use tests::{NODE_ID, TestServer, poll, run_python};

use crate::python_clients::{run_session, server_for};

/// How long frames may take to reach the lake (flush interval 1 s).
const LAKE_TIMEOUT: Duration = Duration::from_secs(45);

/// The station's bronze rows, or `None` while the table does not exist.
async fn read_bronze(server: &TestServer, station: &str) -> Result<Option<Vec<Value>>> {
    let lake = server.lake_url();
    let out = run_python("read_bronze.py", &["--lake", &lake, "--station", station]).await?;
    match out.status.code() {
        Some(0) => {}
        Some(2) => return Ok(None),
        _ => bail!(
            "read_bronze.py failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    Ok(Some(
        doc["messages"].as_array().cloned().unwrap_or_default(),
    ))
}

/// Waits until every id in `ids` has at least `per_id` rows; returns all rows.
async fn wait_for_rows(
    server: &TestServer,
    station: &str,
    ids: &[String],
    per_id: usize,
) -> Result<Vec<Value>> {
    poll(LAKE_TIMEOUT, "bronze rows for every message id", || async {
        let Some(rows) = read_bronze(server, station).await? else {
            return Ok(None);
        };
        let counts = count_by_id(&rows);
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| counts.get(id.as_str()).copied().unwrap_or(0) < per_id)
            .collect();
        if missing.is_empty() {
            Ok(Some(rows))
        } else {
            bail!(
                "{} rows so far; ids still missing rows: {missing:?}",
                rows.len()
            )
        }
    })
    .await
}

fn count_by_id(rows: &[Value]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for row in rows {
        if let Some(id) = row["message_id"].as_str() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

/// Checks that the CALL `id`/`action` and its answer are each there exactly once.
fn check_pair(rows: &[Value], id: &str, action: &str, answer_type: i64) -> Result<()> {
    let mine: Vec<&Value> = rows.iter().filter(|r| r["message_id"] == id).collect();
    let calls: Vec<&&Value> = mine
        .iter()
        .filter(|r| r["direction"] == "cs_to_csms" && r["message_type"] == 2)
        .collect();
    let answers: Vec<&&Value> = mine
        .iter()
        .filter(|r| r["direction"] == "csms_to_cs" && r["message_type"] == answer_type)
        .collect();
    ensure!(
        calls.len() == 1 && answers.len() == 1 && mine.len() == 2,
        "message {id} ({action}): expected one CALL and one answer of type {answer_type}, got {mine:?}"
    );
    ensure!(
        calls[0]["action"] == action && answers[0]["action"] == action,
        "message {id}: action should be {action} on both rows: {mine:?}"
    );
    Ok(())
}

/// Rows carry our node id and a unique `(node_id, wal_seq)`.
fn check_identity(rows: &[Value], version: &str) -> Result<()> {
    let mut seen = HashSet::new();
    for row in rows {
        ensure!(row["node_id"] == NODE_ID, "node_id: {row}");
        ensure!(
            row["ocpp_version"] == version,
            "ocpp_version should be {version}: {row}"
        );
        let seq = row["wal_seq"].as_u64();
        ensure!(seq.is_some(), "wal_seq missing: {row}");
        ensure!(seen.insert(seq), "duplicate (node_id, wal_seq): {row}");
    }
    Ok(())
}

#[tokio::test]
async fn bronze_holds_every_frame_of_a_v16_session_once() -> Result<()> {
    let station = "BR16";
    let server = server_for(station).await;
    let summary = run_session(&server, "cp_v16.py", station).await?;
    let sent: Vec<(String, String)> = summary["sent"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_string(),
                m["action"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();

    // A CALLERROR lands too, with the action of the CALL it answers.
    let mut client = server
        .connect(station, "ocpp1.6", Some((station, "py-pw")))
        .await?;
    let answer = client.call("bad-1", "FooBar", json!({})).await?;
    ensure!(
        answer[0] == 4 && answer[2] == "NotImplemented",
        "FooBar answered {answer:?}"
    );
    client.close().await?;

    let mut ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    ids.push("bad-1".into());
    let rows = wait_for_rows(&server, station, &ids, 2).await?;

    for (id, action) in &sent {
        check_pair(&rows, id, action, 3)?;
    }
    check_pair(&rows, "bad-1", "FooBar", 4)?;
    let error_row = rows
        .iter()
        .find(|r| r["message_id"] == "bad-1" && r["message_type"] == 4)
        .expect("checked above");
    ensure!(error_row["error_code"] == "NotImplemented", "{error_row}");
    check_identity(&rows, "1.6")?;
    Ok(())
}

#[tokio::test]
async fn acknowledged_frames_survive_sigkill() -> Result<()> {
    let station = "KILL1";
    let mut server = TestServer::builder()
        .station(station, Some("pw"))
        // Long flush interval: the frames are surely only in the WAL at the kill.
        .env("CSMS_LAKE__FLUSH_INTERVAL_SECS", "3600")
        .start()
        .await;
    let mut client = server
        .connect(station, "ocpp2.0.1", Some((station, "pw")))
        .await?;
    let ids: Vec<String> = (0..10).map(|i| format!("k-{i}")).collect();
    for id in &ids {
        client.heartbeat_ok(id).await?;
    }
    server.kill();
    drop(client);
    let early = read_bronze(&server, station).await?.unwrap_or_default();
    if !early.is_empty() {
        // Still a valid test of exactly-once, but not of the WAL replay.
        eprintln!(
            "note: {} rows reached the lake before the kill",
            early.len()
        );
    }

    // After a restart (with a fast flush), the WAL is replayed into the lake.
    server.set_env("CSMS_LAKE__FLUSH_INTERVAL_SECS", "1");
    server.restart().await;
    let rows = wait_for_rows(&server, station, &ids, 2).await?;
    for id in &ids {
        check_pair(&rows, id, "Heartbeat", 3)?;
    }
    check_identity(&rows, "2.0.1")?;

    // A second restart must not replay the same segments again.
    server.restart().await;
    let mut client = server
        .connect(station, "ocpp2.0.1", Some((station, "pw")))
        .await?;
    client.heartbeat_ok("after-2nd-restart").await?;
    let rows = wait_for_rows(&server, station, &["after-2nd-restart".to_string()], 2).await?;
    for id in &ids {
        check_pair(&rows, id, "Heartbeat", 3)?;
    }
    check_identity(&rows, "2.0.1")?;
    Ok(())
}
