//! Runs the load generator against a real `csms serve` (the debug binary,
//! or `$CSMS_BIN`) and checks the figures it reports.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Kills the server and removes its data directory however the test ends.
struct Server {
    child: Child,
    dir: PathBuf,
    ocpp: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `$CSMS_BIN`, else the `csms` built next to this test (`target/<profile>/`,
/// wherever `CARGO_TARGET_DIR` put it).
fn csms_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CSMS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .join("csms");
    assert!(
        bin.exists(),
        "no csms binary at {}: run `cargo build --workspace` first or set CSMS_BIN",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `authenticate`: stations must be registered (no `CSMS_ALLOW_UNKNOWN`).
async fn start_server(authenticate: bool) -> Server {
    let bin = csms_bin();
    let dir = std::env::temp_dir().join(format!("loadgen-it-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let (ocpp, http, pg) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let log = std::fs::File::create(dir.join("csms.log")).unwrap();
    let mut cmd = Command::new(&bin);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CSMS_") || k == "REDIS_URL") {
        cmd.env_remove(k);
    }
    let child = cmd
        .arg("serve")
        .env("CSMS_OCPP_ADDR", ocpp.to_string())
        .env("CSMS_HTTP_ADDR", http.to_string())
        .env("CSMS_PG_ADDR", pg.to_string())
        .env("CSMS_DATA_DIR", dir.join("data"))
        .env("CSMS_ALLOW_UNKNOWN", (!authenticate).to_string())
        // Saturation sends far more than a real charger; lift the per-station limit.
        .env("CSMS_LIMITS__MESSAGES_PER_STATION_PER_SEC", "0")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut server = Server { child, dir, ocpp };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            let log = std::fs::read_to_string(server.dir.join("csms.log")).unwrap_or_default();
            panic!("csms serve exited ({status}):\n{log}");
        }
        if let Ok(mut s) = tokio::net::TcpStream::connect(http).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200") {
                return server;
            }
        }
        assert!(
            Instant::now() < deadline,
            "csms serve not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: loadgen::LoadgenArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_against_csms_serve() {
    let server = start_server(false).await;
    let url = format!("ws://{}/ocpp", server.ocpp);
    let pid = server.child.id().to_string();
    let cli = Cli::parse_from([
        "loadgen",
        "--url",
        &url,
        "--stations",
        "20",
        "--mode",
        "saturation",
        "--duration-secs",
        "3",
        "--source-ips",
        "2",
        "--server-pid",
        &pid,
        "--id-prefix",
        "IT",
    ]);
    let report = loadgen::run(cli.args).await.expect("loadgen run");
    let s = &report.summary;
    let table = report.to_string();
    println!("{table}");
    assert_eq!(s.boot_accepted, 20, "{table}");
    assert_eq!(report.stations_201, 10);
    assert_eq!(
        s.progress.connected, 20,
        "all connected at the end\n{table}"
    );
    assert!(s.run_answered > 0, "{table}");
    assert_eq!(s.call_errors, 0, "{table}");
    assert_eq!(s.timeouts, 0, "{table}");
    assert_eq!(s.connect_failures, 0, "{table}");
    assert_eq!(s.disconnects, 0, "{table}");
    assert_eq!(s.latency.len(), s.progress.answered);
    assert!(report.rss_connected_kib.is_some(), "{table}");
    assert!(table.contains("p99.999"), "{table}");
}

/// Every station with its own password: the fleet's credentials are written
/// by the load generator, registered with `csms stations import`, and only
/// the right template gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stations_with_their_own_passwords() {
    let server = start_server(true).await;
    let url = format!("ws://{}/ocpp", server.ocpp);
    let args = |password: &str| {
        Cli::parse_from([
            "loadgen",
            "--url",
            &url,
            "--stations",
            "6",
            "--mode",
            "sustained",
            "--rate",
            "20",
            "--duration-secs",
            "2",
            "--source-ips",
            "0",
            "--id-prefix",
            "AUTH",
            "--password",
            password,
            "--connect-timeout-secs",
            "20",
        ])
        .args
    };
    let csv = server.dir.join("fleet.csv");
    assert_eq!(
        loadgen::write_credentials(&args("s3cret-{id}-pw"), &csv).unwrap(),
        6
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.contains("AUTH000003,s3cret-AUTH000003-pw\n"), "{text}");
    let out = Command::new(csms_bin())
        .args(["stations", "import"])
        .arg(&csv)
        .env("CSMS_DATA_DIR", server.dir.join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let report = loadgen::run(args("s3cret-{id}-pw"))
        .await
        .expect("loadgen run");
    let table = report.to_string();
    assert_eq!(report.summary.boot_accepted, 6, "{table}");
    assert_eq!(report.summary.connect_failures, 0, "{table}");

    // The same password for all (the template without `{id}`) is refused.
    let mut wrong = args("s3cret-AUTH000000-pw");
    wrong.stations = 2;
    wrong.duration_secs = 1;
    wrong.connect_timeout_secs = 2;
    let report = loadgen::run(wrong).await;
    let (failures, shown) = match &report {
        Ok(r) => (
            r.summary
                .connect_errors
                .get("HTTP 401")
                .copied()
                .unwrap_or(0),
            r.to_string(),
        ),
        Err(e) => (1, format!("{e:#}")),
    };
    assert!(failures > 0, "station 1 must be refused: {shown}");
}
