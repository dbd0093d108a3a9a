//! The monthly fault-ranking report end to end: raw OCPP 1.6 Faulted
//! StatusNotifications → bronze → `csms pipeline run` → `csms report
//! fault-ranking --send` → a real SMTP server (tests/python/smtp_sink.py,
//! aiosmtpd) → the received MIME message parsed by Python's `email` package
//! (tests/python/parse_eml.py).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::{TestServer, poll, run_python, run_python_json, workspace_root};
use tokio::io::{AsyncBufReadExt, BufReader};

const STATION: &str = "RPT1";
const MONTH: &str = "2025-03";
const DAY: &str = "2025-03-14";
const LAKE_TIMEOUT: Duration = Duration::from_secs(45);

/// A running smtp_sink.py storing messages in its own directory.
struct Sink {
    _child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Sink {
    async fn start() -> Result<Sink> {
        let dir = tempfile::tempdir()?;
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = tokio::process::Command::new(&python)
            .arg(workspace_root().join("tests/python/smtp_sink.py"))
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning smtp_sink.py (needs aiosmtpd: scripts/install-test-deps.sh)")?;
        let stdout = child.stdout.take().context("sink stdout")?;
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).lines().next_line(),
        )
        .await
        .context("smtp_sink.py did not start within 30 s")??
        .context("smtp_sink.py exited before printing its port")?;
        let port = serde_json::from_str::<Value>(&line)?["port"]
            .as_u64()
            .context("port")? as u16;
        Ok(Sink {
            _child: child,
            port,
            dir,
        })
    }

    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    fn received(&self) -> Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(self.dir.path())? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "eml") {
                v.push(p);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Waits for the `n`-th message; returns it parsed.
    async fn message(&self, n: usize) -> Result<Value> {
        let path = poll(Duration::from_secs(20), "mail at the SMTP sink", || async {
            Ok(self.received()?.get(n - 1).cloned())
        })
        .await?;
        run_python_json("parse_eml.py", &[path.to_str().context("path")?]).await
    }
}

/// The station's StatusNotification CALLs in bronze so far.
async fn status_calls_in_bronze(server: &TestServer) -> Result<Option<usize>> {
    let lake = server.lake_url();
    let out = run_python("read_bronze.py", &["--lake", &lake, "--station", STATION]).await?;
    match out.status.code() {
        Some(0) => {}
        Some(2) => return Ok(None),
        _ => bail!(
            "read_bronze.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    Ok(Some(
        doc["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| {
                m["action"] == "StatusNotification"
                    && m["message_type"] == 2
                    && m["direction"] == "cs_to_csms"
            })
            .count(),
    ))
}

fn files_in(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn monthly_fault_ranking_is_mailed() -> Result<()> {
    let sink = Sink::start().await?;
    let server = TestServer::builder()
        .station(STATION, Some("rpt-pw"))
        .env("SMTP_URL", sink.url())
        .start()
        .await;

    // Five faults on one day of a past month (payload timestamps), one
    // recovery, through a raw OCPP 1.6 connection.
    let mut cp = server
        .connect(STATION, "ocpp1.6", Some((STATION, "rpt-pw")))
        .await?;
    let boot = cp
        .call(
            "b1",
            "BootNotification",
            json!({"chargePointVendor": "Test", "chargePointModel": "Report"}),
        )
        .await?;
    ensure!(boot[0] == 3, "boot answer: {boot:?}");
    for i in 0..5 {
        let answer = cp
            .call(
                &format!("f{i}"),
                "StatusNotification",
                json!({"connectorId": 1, "errorCode": "GroundFailure", "status": "Faulted",
                       "timestamp": format!("{DAY}T0{i}:15:00Z")}),
            )
            .await?;
        ensure!(answer[0] == 3, "StatusNotification answer: {answer:?}");
    }
    let answer = cp
        .call(
            "ok",
            "StatusNotification",
            json!({"connectorId": 1, "errorCode": "NoError", "status": "Available",
                   "timestamp": format!("{DAY}T09:00:00Z")}),
        )
        .await?;
    ensure!(answer[0] == 3, "{answer:?}");
    cp.close().await?;
    poll(LAKE_TIMEOUT, "StatusNotifications in bronze", || async {
        Ok(status_calls_in_bronze(&server).await?.filter(|n| *n >= 6))
    })
    .await?;

    server.cli_ok(&["pipeline", "run"]);

    // Without --send: the files, for a person to look at.
    let out_dir = tempfile::tempdir()?;
    let out = out_dir.path().to_str().context("path")?;
    server.cli_ok(&["report", "fault-ranking", "--month", MONTH, "--out", out]);
    let names = files_in(out_dir.path())?;
    for want in [
        "report.html",
        "report.txt",
        "report.eml",
        "fault-ranking-2025-03.csv",
        "daily-faults-2025-03.png",
    ] {
        ensure!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    ensure!(
        sink.received()?.is_empty(),
        "nothing is sent without --send"
    );

    server.cli_ok(&[
        "report",
        "fault-ranking",
        "--month",
        MONTH,
        "--send",
        "--to",
        "ops@example.com",
    ]);
    let m = sink.message(1).await?;
    ensure!(m["to"] == json!(["ops@example.com"]), "{m}");
    ensure!(
        m["envelope"]["rcpt_tos"] == json!(["ops@example.com"]),
        "{m}"
    );
    let subject = m["subject"].as_str().unwrap_or_default();
    ensure!(
        subject.contains(MONTH) && subject.contains("1 station"),
        "subject: {subject}"
    );
    let rows = m["html_rows"].as_array().context("html_rows")?;
    ensure!(rows.len() == 1, "one ranked station: {m}");
    let cells: Vec<&str> = rows[0]
        .as_array()
        .context("cells")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        cells.len() == 5
            && cells[0] == "1"
            && cells[1].ends_with(STATION)
            && cells[2] == "5"
            && cells[3] == DAY
            && cells[4] == "5",
        "row: {cells:?}"
    );
    let csv = m["csv"].as_str().context("CSV attachment")?;
    let lines: Vec<&str> = csv.lines().collect();
    ensure!(
        lines.len() == 2 && lines[1] == format!("1,{STATION},5,1,{DAY},5"),
        "csv: {csv:?}"
    );
    ensure!(m["png"]["signature_ok"] == true, "png: {}", m["png"]);
    ensure!(
        m["png"]["width"].as_u64().unwrap_or(0) > 0,
        "png: {}",
        m["png"]
    );

    // A month without faults still gets a (short) mail.
    server.cli_ok(&[
        "report",
        "fault-ranking",
        "--month",
        "2025-02",
        "--send",
        "--to",
        "ops@example.com",
    ]);
    let m = sink.message(2).await?;
    let text = m["text"].as_str().unwrap_or_default();
    ensure!(
        text.contains("No station reached the threshold of 5 faults in a single day in 2025-02"),
        "{m}"
    );
    ensure!(m["png"].is_null() && m["csv"].is_null(), "{m}");
    Ok(())
}
