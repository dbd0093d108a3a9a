//! Delivery through a real SMTP server: `tests/python/smtp_sink.py`
//! (aiosmtpd) stores what it receives; `tests/python/parse_eml.py` parses
//! it with Python's `email` package, independently of lettre.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::report::render_fault_ranking;
use crate::report::tests::{empty, sample};
use crate::{SmtpConfig, send};

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("python")
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A running sink; killed on drop (stdin closes too).
pub(crate) struct Sink {
    _child: Child,
    pub(crate) port: u16,
    dir: tempfile::TempDir,
}

impl Sink {
    pub(crate) async fn start(extra: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(python())
            .arg(python_dir().join("smtp_sink.py"))
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn smtp_sink.py (python3 with aiosmtpd: scripts/install-test-deps.sh)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("smtp_sink.py did not start within 30 s")
            .unwrap()
            .expect("smtp_sink.py exited before printing its port");
        let port = serde_json::from_str::<Value>(&line).unwrap()["port"]
            .as_u64()
            .unwrap() as u16;
        Sink {
            _child: child,
            port,
            dir,
        }
    }

    pub(crate) fn config(&self) -> SmtpConfig {
        SmtpConfig {
            url: Some(format!("smtp://127.0.0.1:{}", self.port)),
            from: "reports@csms.test".into(),
            timeout_secs: 10,
            attempts: 3,
            retry_backoff_ms: 50,
        }
    }

    /// Messages received so far (file paths, in order).
    pub(crate) fn received(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        v.sort();
        v
    }

    /// Waits for the `n`-th message and returns it parsed.
    pub(crate) async fn message(&self, n: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.received();
            if got.len() >= n {
                return parse(&got[n - 1]).await;
            }
            assert!(Instant::now() < deadline, "message {n} never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn parse(eml: &Path) -> Value {
    let out = Command::new(python())
        .arg(python_dir().join("parse_eml.py"))
        .arg(eml)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "parse_eml.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn content_types(m: &Value) -> Vec<String> {
    m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["content_type"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn report_arrives_with_table_csv_and_png() {
    let sink = Sink::start(&[]).await;
    let report = sample();
    let rendered = render_fault_ranking(&report).unwrap();
    let to = vec![
        "ops@example.com".to_string(),
        "crew@example.com".to_string(),
    ];
    send(&rendered, &sink.config(), &to).await.unwrap();
    let m = sink.message(1).await;

    assert_eq!(m["from"], "reports@csms.test");
    assert_eq!(m["to"], serde_json::json!(to));
    assert_eq!(m["envelope"]["rcpt_tos"], serde_json::json!(to));
    assert_eq!(m["subject"], rendered.subject.as_str());
    assert_eq!(
        content_types(&m),
        [
            "multipart/mixed",
            "multipart/alternative",
            "text/plain",
            "text/html",
            "text/csv",
            "image/png"
        ]
    );

    let rows = m["html_rows"].as_array().unwrap();
    assert_eq!(rows.len(), report.rows.len(), "{m}");
    for (got, want) in rows.iter().zip(&report.rows) {
        let cells: Vec<&str> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cells[0], want.rank.to_string());
        // The swatch (■) precedes the id in charted rows.
        assert!(cells[1].ends_with(&want.station_id), "{cells:?}");
        assert_eq!(cells[2], want.total_faults.to_string());
        assert_eq!(cells[3], want.worst_day.to_string());
        assert_eq!(cells[4], want.worst_day_faults.to_string());
    }

    // Mail text parts travel with CRLF line ends; the parser gives LF.
    let csv = m["csv"].as_str().unwrap();
    let sent = String::from_utf8(rendered.csv.clone()).unwrap();
    assert_eq!(csv.replace("\r\n", "\n"), sent.replace("\r\n", "\n"));
    assert!(csv.contains("\"CP,2\""));

    let parts = m["parts"].as_array().unwrap();
    let names: Vec<&str> = parts
        .iter()
        .filter_map(|p| p["filename"].as_str())
        .collect();
    assert_eq!(
        names,
        ["fault-ranking-2025-03.csv", "daily-faults-2025-03.png"]
    );
    assert_eq!(m["png"]["signature_ok"], true);
    assert_eq!(m["png"]["width"], crate::chart::WIDTH);
    assert_eq!(m["png"]["height"], crate::chart::HEIGHT);
    assert!(m["text"].as_str().unwrap().contains("CP-<&>\"x\""));
}

#[tokio::test]
async fn empty_month_sends_a_short_note() {
    let sink = Sink::start(&[]).await;
    let rendered = render_fault_ranking(&empty()).unwrap();
    send(&rendered, &sink.config(), &["ops@example.com".into()])
        .await
        .unwrap();
    let m = sink.message(1).await;
    assert_eq!(
        content_types(&m),
        [
            "multipart/mixed",
            "multipart/alternative",
            "text/plain",
            "text/html"
        ]
    );
    assert!(m["subject"].as_str().unwrap().contains("no station"));
    assert!(
        m["text"]
            .as_str()
            .unwrap()
            .contains("No station reached the threshold of 5 faults in a single day in 2025-02.")
    );
    assert_eq!(m["html_rows"], serde_json::json!([]));
    assert!(m["png"].is_null() && m["csv"].is_null());
}

#[tokio::test]
async fn transient_rejections_are_retried() {
    // The sink answers 451 twice, then accepts: the third attempt delivers.
    let sink = Sink::start(&["--fail-first", "2"]).await;
    let rendered = render_fault_ranking(&sample()).unwrap();
    send(&rendered, &sink.config(), &["ops@example.com".into()])
        .await
        .unwrap();
    assert_eq!(sink.message(1).await["subject"], rendered.subject.as_str());
    assert_eq!(sink.received().len(), 1);

    // Three 451s exhaust three attempts: a clear error, nothing delivered.
    let sink = Sink::start(&["--fail-first", "3"]).await;
    let err = send(&rendered, &sink.config(), &["ops@example.com".into()])
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("smtp://127.0.0.1:{}", sink.port)) && text.contains("3 attempt"),
        "{text}"
    );
    assert!(text.contains("451") || text.contains("transient"), "{text}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn authentication_from_the_url() {
    let sink = Sink::start(&["--auth", "reporter:s3cr%t"]).await;
    let rendered = render_fault_ranking(&empty()).unwrap();
    let mut config = sink.config();
    // Wrong password: a permanent 535, not retried.
    config.url = Some(format!("smtp://reporter:wrong@127.0.0.1:{}", sink.port));
    let err = send(&rendered, &config, &["ops@example.com".into()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1 attempt"), "{err}");
    // The password percent-encoded in the URL.
    config.url = Some(format!("smtp://reporter:s3cr%25t@127.0.0.1:{}", sink.port));
    send(&rendered, &config, &["ops@example.com".into()])
        .await
        .unwrap();
    assert_eq!(
        sink.message(1).await["to"],
        serde_json::json!(["ops@example.com"])
    );
}
