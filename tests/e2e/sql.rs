//! SQL over HTTP (`POST /api/sql`): an analyst counts a station's bronze
//! rows right after a real charge point's session, joins live status, and
//! cannot write.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use tests::{ADMIN_TOKEN, TestServer, http_request, poll};

use crate::python_clients::{run_session, server_for};

/// How long frames may take to reach the lake (flush interval 1 s).
const LAKE_TIMEOUT: Duration = Duration::from_secs(45);

/// `POST /api/sql` with the admin token and an `Accept` type.
async fn sql(server: &TestServer, accept: &str, query: &str) -> Result<tests::HttpResponse> {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    http_request(
        server.http_addr(),
        "POST",
        "/api/sql",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "text/plain"),
            ("Accept", accept),
        ],
        Some(query.as_bytes()),
    )
    .await
}

#[tokio::test]
async fn sql_counts_bronze_rows_joins_live_status_and_refuses_writes() -> Result<()> {
    let station = "SQL16";
    let server = server_for(station).await;
    let summary = run_session(&server, "cp_v16.py", station).await?;
    let sent = summary["sent"].as_array().map_or(0, Vec::len) as i64;

    // Every CALL and its answer: at least two rows per CALL sent, once the
    // lake writer has flushed them.
    let count =
        format!("SELECT count(*) AS n FROM bronze.ocpp_messages WHERE station_id = '{station}'");
    let rows = poll(LAKE_TIMEOUT, "bronze rows visible to SQL", || async {
        let resp = sql(&server, "application/json", &count).await?;
        if resp.status != 200 {
            // The table may not exist before the first flush.
            anyhow::bail!("HTTP {}: {}", resp.status, resp.text());
        }
        let body = resp.json()?;
        let n = body[0]["n"].as_i64().unwrap_or(0);
        Ok((n >= 2 * sent).then_some(body))
    })
    .await?;
    ensure!(
        rows.as_array().map(Vec::len) == Some(1),
        "one row expected: {rows}"
    );

    // The same count as CSV.
    let resp = sql(&server, "text/csv", &count).await?;
    ensure!(
        resp.status == 200,
        "CSV: HTTP {}: {}",
        resp.status,
        resp.text()
    );
    let text = resp.text();
    let mut lines = text.lines();
    ensure!(lines.next() == Some("n"), "CSV header: {text}");
    ensure!(
        lines.next().and_then(|l| l.parse::<i64>().ok()) == rows[0]["n"].as_i64(),
        "CSV value: {text}"
    );

    // Live status next to history: the session ended with the connector
    // Available, and bronze holds its StatusNotifications.
    let join = format!(
        "SELECT c.status, count(b.message_id) AS notifications \
         FROM live.connector_status c \
         JOIN bronze.ocpp_messages b ON b.station_id = c.station_id \
         WHERE c.station_id = '{station}' AND c.connector_id = 1 \
           AND b.action = 'StatusNotification' AND b.message_type = 2 \
         GROUP BY c.status"
    );
    let resp = sql(&server, "application/json", &join).await?;
    ensure!(
        resp.status == 200,
        "join: HTTP {}: {}",
        resp.status,
        resp.text()
    );
    let body: Value = resp.json()?;
    ensure!(
        body[0]["status"] == "Available" && body[0]["notifications"].as_i64() >= Some(3),
        "join: {body}"
    );

    // No token, no SQL.
    let resp = http_request(
        server.http_addr(),
        "POST",
        "/api/sql",
        &[],
        Some(count.as_bytes()),
    )
    .await?;
    ensure!(resp.status == 401, "without token: HTTP {}", resp.status);

    // Read-only: refused with a clear error, and the table is still there.
    let resp = sql(
        &server,
        "application/json",
        "DROP TABLE bronze.ocpp_messages",
    )
    .await?;
    ensure!(
        resp.status == 403 || resp.status == 400,
        "DROP TABLE: HTTP {}: {}",
        resp.status,
        resp.text()
    );
    let err = resp.json()?;
    ensure!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("DROP TABLE")),
        "DROP TABLE error: {err}"
    );
    let resp = sql(&server, "application/json", &count).await?;
    ensure!(
        resp.json()?[0]["n"] == rows[0]["n"],
        "after DROP: {}",
        resp.text()
    );

    // A syntax error points at its position.
    let resp = sql(&server, "application/json", "SELECT count(*)\nFROM WHERE").await?;
    ensure!(resp.status == 400, "syntax error: HTTP {}", resp.status);
    let err = resp.json()?;
    ensure!(err["position"]["line"] == 2, "syntax error position: {err}");
    Ok(())
}
