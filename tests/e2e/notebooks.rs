//! The analyst notebooks under `notebooks/` run headless against a real
//! `csms serve` over a lake made by `csms simulate` and `csms pipeline run`
//! (with tariffs, so billing exists), so a schema or SQL change that breaks
//! them fails here instead of in an analyst's hands.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tests::{ADMIN_TOKEN, TestServer, workspace_root};

/// Per-cell limit inside a notebook (nbclient's timeout).
const CELL_TIMEOUT_SECS: u32 = 120;
/// Whole-notebook limit, kernel start-up included, on a busy machine.
const NOTEBOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// Each notebook and the least number of plots it must render.
const NOTEBOOKS: &[(&str, u64)] = &[
    ("fault_trends.ipynb", 2),
    ("transactions_energy.ipynb", 1),
    ("billing_overview.ipynb", 1),
];

/// Executes one notebook with `tests/python/run_notebook.py` (nbclient)
/// against `server`, returning the runner's JSON summary, or an error with
/// the failing cell's source and traceback.
async fn execute(server: &TestServer, notebook: &str, out_dir: &std::path::Path) -> Result<Value> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let root = workspace_root();
    let runner = root.join("tests/python/run_notebook.py");
    let path = root.join("notebooks").join(notebook);
    let mut cmd = tokio::process::Command::new(&python);
    // A developer's shell must not point the notebooks elsewhere.
    for (k, _) in std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .filter(|(k, _)| k.starts_with("CSMS_"))
    {
        cmd.env_remove(k);
    }
    let child = cmd
        .arg(&runner)
        .arg(&path)
        .arg(out_dir)
        .arg(CELL_TIMEOUT_SECS.to_string())
        .current_dir(root.join("notebooks"))
        .env("CSMS_SQL_URL", server.http_url("/api/sql"))
        .env("CSMS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MPLBACKEND", "Agg")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {python} {}", runner.display()))?;
    let out = tokio::time::timeout(NOTEBOOK_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("{notebook} did not finish within {NOTEBOOK_TIMEOUT:?}"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{notebook} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log\n{}",
            out.status,
            server.log_tail()
        );
    }
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str(last)
        .with_context(|| format!("{notebook}: no JSON summary:\n{stdout}\n--- stderr\n{stderr}"))
}

#[tokio::test]
async fn analyst_notebooks_execute_against_a_simulated_lake() -> Result<()> {
    let tariffs = workspace_root().join("workflows/tariffs.toml");
    ensure!(tariffs.exists(), "{} missing", tariffs.display());
    let server = TestServer::builder()
        .env("CSMS_PIPELINE__TARIFFS_PATH", tariffs.display().to_string())
        .start()
        .await;
    server.cli_ok(&[
        "simulate",
        "--stations",
        "30",
        "--days",
        "10",
        "--start",
        "2026-01-01",
    ]);
    server.cli_ok(&["pipeline", "run"]);

    let out_dir = tempfile::Builder::new()
        .prefix("csms-notebooks-")
        .tempdir()?;
    for (notebook, min_images) in NOTEBOOKS {
        let summary = execute(&server, notebook, out_dir.path()).await?;
        let code_cells = summary["code_cells"].as_u64().unwrap_or(0);
        ensure!(code_cells > 0, "{notebook}: no code cells: {summary}");
        ensure!(
            summary["executed"].as_u64() == Some(code_cells),
            "{notebook}: not every cell ran: {summary}"
        );
        ensure!(
            summary["errors"].as_u64() == Some(0),
            "{notebook}: error outputs: {summary}"
        );
        ensure!(
            summary["images"].as_u64().unwrap_or(0) >= *min_images,
            "{notebook}: expected at least {min_images} plots: {summary}"
        );
    }
    Ok(())
}
