//! SQL over the PostgreSQL wire protocol (`CSMS_PG_ADDR`) with real clients:
//! psql and psycopg count a station's bronze rows after a real charge
//! point's session, join live status, list the tables (`\dt`), and cannot
//! write; a runaway query is canceled; a wrong password is refused.

use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tests::{ADMIN_TOKEN, TestServer, poll, run_python_json};

use crate::python_clients::{run_session, server_for};

/// How long frames may take to reach the lake (flush interval 1 s).
const LAKE_TIMEOUT: Duration = Duration::from_secs(45);

fn url(server: &TestServer, user: &str) -> String {
    let addr = server.pg_addr();
    format!(
        "postgresql://{user}@127.0.0.1:{}/csms?sslmode=disable&connect_timeout=10",
        addr.port()
    )
}

/// Runs psql with `script` on stdin (so `\set` and several statements work).
async fn psql(server: &TestServer, password: &str, script: &str) -> Result<Output> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("psql")
        .args([
            url(server, "analyst").as_str(),
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
            "-f",
            "-",
        ])
        .env("PGPASSWORD", password)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("psql not found: run scripts/install-test-deps.sh")?;
    let mut stdin = child.stdin.take().context("psql stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    Ok(
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .context("psql did not finish within 60 s")??,
    )
}

/// psql's output of a script that must succeed.
async fn psql_ok(server: &TestServer, script: &str) -> Result<String> {
    let out = psql(server, ADMIN_TOKEN, script).await?;
    if !out.status.success() {
        bail!(
            "psql failed on {script:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// psql's stderr for a script that must fail.
async fn psql_err(server: &TestServer, password: &str, script: &str) -> Result<String> {
    let out = psql(server, password, script).await?;
    ensure!(
        !out.status.success(),
        "psql succeeded on {script:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

#[tokio::test]
async fn psql_and_psycopg_query_the_lake_and_live_status_read_only() -> Result<()> {
    let station = "PG16";
    let server = server_for(station).await;
    let summary = run_session(&server, "cp_v16.py", station).await?;
    let sent = summary["sent"].as_array().map_or(0, Vec::len) as i64;

    // Every CALL and its answer, once the lake writer has flushed them.
    let count =
        format!("SELECT count(*) FROM bronze.ocpp_messages WHERE station_id = '{station}';");
    let n: i64 = poll(LAKE_TIMEOUT, "bronze rows over psql", || async {
        // The table may not exist before the first flush.
        let out = psql(&server, ADMIN_TOKEN, &count).await?;
        let n = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .unwrap_or(0);
        Ok((out.status.success() && n >= 2 * sent).then_some(n))
    })
    .await?;

    // `\dt` lists every schema's tables.
    let tables = psql_ok(&server, "\\dt\n").await?;
    for t in [
        "bronze|ocpp_messages|table",
        "live|connector_status|table",
        "live|stations|table",
    ] {
        ensure!(tables.contains(t), "{t} missing from \\dt:\n{tables}");
    }

    // Live status joined with history.
    let join = psql_ok(
        &server,
        &format!(
            "SELECT c.status, count(b.message_id) FROM live.connector_status c \
             JOIN bronze.ocpp_messages b ON b.station_id = c.station_id \
             WHERE c.station_id = '{station}' AND c.connector_id = 1 \
               AND b.action = 'StatusNotification' AND b.message_type = 2 \
             GROUP BY c.status;"
        ),
    )
    .await?;
    let (status, notifications) = join.split_once('|').context(join.clone())?;
    ensure!(
        status == "Available" && notifications.parse::<i64>().unwrap_or(0) >= 3,
        "join: {join}"
    );

    // Read-only, with PostgreSQL's SQLSTATE for it.
    let err = psql_err(&server, ADMIN_TOKEN, "DROP TABLE bronze.ocpp_messages;\n").await?;
    ensure!(
        err.contains("25006") && err.contains("DROP TABLE"),
        "DROP TABLE: {err}"
    );
    ensure!(
        psql_ok(&server, &count).await? == n.to_string(),
        "rows changed after DROP"
    );

    // A wrong password is refused.
    let err = psql_err(&server, "not-the-token", "SELECT 1;\n").await?;
    ensure!(
        err.to_lowercase()
            .contains("password authentication failed"),
        "wrong password: {err}"
    );

    // psycopg: extended protocol with bound parameters.
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=csms user=analyst password={ADMIN_TOKEN} sslmode=disable",
        server.pg_addr().port()
    );
    let out = run_python_json("pg_client.py", &["--dsn", &dsn, "--station", station]).await?;
    ensure!(out["count"].as_i64() == Some(n), "psycopg count: {out}");
    ensure!(out["columns"][0] == "n", "psycopg columns: {out}");
    ensure!(
        out["actions"]["BootNotification"].as_i64() >= Some(1)
            && out["actions"]["StatusNotification"].as_i64() >= Some(3),
        "psycopg actions: {out}"
    );
    ensure!(
        out["live_tables"] == serde_json::json!(["connector_status", "stations"]),
        "psycopg catalog: {out}"
    );
    ensure!(out["drop"]["sqlstate"] == "25006", "psycopg DROP: {out}");
    Ok(())
}

#[tokio::test]
async fn runaway_query_is_canceled_with_57014() -> Result<()> {
    let server = TestServer::builder()
        .env("CSMS_QUERY__TIMEOUT_SECS", "1")
        .start()
        .await;
    let err = psql_err(
        &server,
        ADMIN_TOKEN,
        "SELECT count(DISTINCT value % 1000003) FROM generate_series(1, 100000000000);\n",
    )
    .await?;
    ensure!(err.contains("57014"), "timeout: {err}");
    // The server goes on answering.
    ensure!(psql_ok(&server, "SELECT 40 + 2;\n").await? == "42");
    Ok(())
}
