//! Durability end to end: "nothing acknowledged is lost" (DESIGN.md,
//! principle 1) under a crash, an object-store outage and two nodes writing
//! one table, plus the shape of bronze as a plain Delta reader sees it.
//!
//! Stations stream CALLs as fast as answers come back; every CALL that got
//! its CALLRESULT must then be in `bronze.ocpp_messages` exactly once, with
//! its CALLRESULT exactly once, and `(node_id, wal_seq)` unique. Bronze is
//! read with the Python `deltalake` package (`tests/python/bronze_ids.py`),
//! not with our own code, so a table only our writer understands fails.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use tests::{
    NODE_ID, OcppClient, TestServer, TestServerBuilder, free_ports, http_request, run_python,
    tail_file,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long answered frames may take to reach bronze (flush interval 1 s;
/// after an outage the object store client backs off for a few seconds).
const LAKE_TIMEOUT: Duration = Duration::from_secs(40);
/// The longest a CALL may wait for its answer while the lake is unreachable:
/// answers wait only for the WAL fsync, never for the object store.
const MAX_ANSWER_LATENCY: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// Streaming stations

/// One CALL that got its CALLRESULT.
#[derive(Debug, Clone)]
struct Answered {
    message_id: String,
    action: &'static str,
    /// When the answer arrived.
    at: Instant,
    latency: Duration,
}

/// What one streaming station saw.
#[derive(Debug)]
struct StreamLog {
    station: String,
    answered: Vec<Answered>,
    /// Why the stream ended early (connection lost, wrong answer), if it did.
    ended_by: Option<String>,
}

/// The `n`th CALL of a station speaking `subprotocol`: a BootNotification
/// first, then Heartbeat / StatusNotification / MeterValues in turn, each
/// valid for its version.
fn nth_call(subprotocol: &str, n: u64) -> (&'static str, Value) {
    let now = utc_now_rfc3339();
    let v16 = subprotocol == "ocpp1.6";
    if n == 0 {
        return if v16 {
            (
                "BootNotification",
                json!({"chargePointVendor": "e2e", "chargePointModel": "durability"}),
            )
        } else {
            (
                "BootNotification",
                json!({"reason": "PowerUp", "chargingStation": {"model": "durability", "vendorName": "e2e"}}),
            )
        };
    }
    match (n % 3, v16) {
        (0, _) => ("Heartbeat", json!({})),
        (1, true) => (
            "StatusNotification",
            json!({"connectorId": 1, "errorCode": "NoError", "status": if n.is_multiple_of(2) { "Available" } else { "Charging" }}),
        ),
        (1, false) => (
            "StatusNotification",
            json!({"timestamp": now, "connectorStatus": if n.is_multiple_of(2) { "Available" } else { "Occupied" }, "evseId": 1, "connectorId": 1}),
        ),
        (_, true) => (
            "MeterValues",
            json!({"connectorId": 1, "meterValue": [{"timestamp": now, "sampledValue": [{"value": n.to_string()}]}]}),
        ),
        (_, false) => (
            "MeterValues",
            json!({"evseId": 1, "meterValue": [{"timestamp": now, "sampledValue": [{"value": n as f64}]}]}),
        ),
    }
}

/// The current UTC time as RFC 3339 with milliseconds.
fn utc_now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// `since` the Unix epoch as RFC 3339 UTC with milliseconds (the tests
/// crate has no date library).
fn rfc3339(since: Duration) -> String {
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Spawns a station that connects to `url` and sends CALLs back to back
/// (each as soon as the previous one is answered) until `stop` is set, the
/// connection fails, or `max_run` passes. Message ids are
/// `{station}-{n}`, unique across the test.
fn spawn_station(
    url: String,
    station: String,
    subprotocol: &'static str,
    stop: Arc<AtomicBool>,
    max_run: Duration,
) -> JoinHandle<StreamLog> {
    tokio::spawn(async move {
        let mut log = StreamLog {
            station: station.clone(),
            answered: Vec::new(),
            ended_by: None,
        };
        let mut client = match connect_nodelay(&url, subprotocol).await {
            Ok(c) => c,
            Err(e) => {
                log.ended_by = Some(format!("connect: {e:#}"));
                return log;
            }
        };
        let deadline = Instant::now() + max_run;
        for n in 0u64.. {
            if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                break;
            }
            let id = format!("{station}-{n}");
            let (action, payload) = nth_call(subprotocol, n);
            let text = json!([2, id, action, payload]).to_string();
            let sent = Instant::now();
            if let Err(e) = client.send_text(text).await {
                log.ended_by = Some(format!("send {id}: {e:#}"));
                break;
            }
            match await_answer(&mut client, &id).await {
                Ok(()) => log.answered.push(Answered {
                    message_id: id,
                    action,
                    at: Instant::now(),
                    latency: sent.elapsed(),
                }),
                Err(e) => {
                    log.ended_by = Some(format!("{id} ({action}): {e:#}"));
                    break;
                }
            }
        }
        log
    })
}

/// Connects like a charger would, but with `TCP_NODELAY`: without it Nagle's
/// algorithm and delayed ACKs hold each small frame back ~20 ms, and the
/// stream would be far thinner than the server can take.
async fn connect_nodelay(url: &str, subprotocol: &str) -> Result<OcppClient> {
    let addr = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| anyhow!("not a ws:// URL: {url}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("TCP connect to {addr} timed out"))??;
    stream.set_nodelay(true)?;
    OcppClient::connect_stream(Box::new(stream), url, &[subprotocol], None)
        .await
        .map_err(|e| anyhow!("{e}"))
}

/// Reads frames until the CALLRESULT for `id`; skips CALLs the server may
/// send meanwhile. A CALLERROR or a foreign answer is an error.
async fn await_answer(client: &mut OcppClient, id: &str) -> Result<()> {
    loop {
        let frame = client.recv_frame().await?;
        match frame.first().and_then(Value::as_i64) {
            Some(2) => continue,
            Some(3) if frame.get(1).and_then(Value::as_str) == Some(id) => return Ok(()),
            _ => bail!("expected CALLRESULT for {id}, got {frame:?}"),
        }
    }
}

async fn join_all(handles: Vec<JoinHandle<StreamLog>>) -> Result<Vec<StreamLog>> {
    let mut logs = Vec::new();
    for h in handles {
        logs.push(h.await.context("station task panicked")?);
    }
    Ok(logs)
}

fn summary(logs: &[StreamLog]) -> String {
    logs.iter()
        .map(|l| {
            format!(
                "{}: {} answered{}",
                l.station,
                l.answered.len(),
                l.ended_by
                    .as_ref()
                    .map(|e| format!(", ended by {e}"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every (station, message id) that was answered.
fn answered_ids(logs: &[StreamLog]) -> Vec<(String, String)> {
    logs.iter()
        .flat_map(|l| {
            l.answered
                .iter()
                .map(|a| (l.station.clone(), a.message_id.clone()))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Reading bronze (Python deltalake)

/// Where bronze lives and how to reach it.
#[derive(Clone)]
struct Lake {
    url: String,
    storage_options: Vec<(String, String)>,
}

impl Lake {
    fn local(path: &Path) -> Lake {
        Lake {
            url: path.display().to_string(),
            storage_options: Vec::new(),
        }
    }
}

/// One bronze row's identity columns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Row {
    station_id: String,
    direction: String,
    message_type: i64,
    message_id: String,
    node_id: String,
    wal_seq: i64,
}

struct Bronze {
    version: i64,
    rows: Vec<Row>,
    /// App transaction version per app id asked for.
    txn: HashMap<String, Option<i64>>,
}

/// All of bronze's rows, or `None` while the table does not exist.
async fn read_bronze(lake: &Lake, app_ids: &[String]) -> Result<Option<Bronze>> {
    let mut args: Vec<String> = vec!["--lake".into(), lake.url.clone()];
    for (k, v) in &lake.storage_options {
        args.push("--storage-option".into());
        args.push(format!("{k}={v}"));
    }
    for app in app_ids {
        args.push("--app-id".into());
        args.push(app.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_python("bronze_ids.py", &args).await?;
    match out.status.code() {
        Some(0) => {}
        Some(2) => return Ok(None),
        _ => bail!(
            "bronze_ids.py failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    let doc: Value = serde_json::from_slice(&out.stdout).context("bronze_ids.py output")?;
    let rows = doc["rows"]
        .as_array()
        .ok_or_else(|| anyhow!("no rows in {doc}"))?
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().map(str::to_string);
            let n = |i: usize| r[i].as_i64();
            Some(Row {
                station_id: s(0)?,
                direction: s(1)?,
                message_type: n(2)?,
                message_id: s(3)?,
                node_id: s(4)?,
                wal_seq: n(5)?,
            })
        })
        .collect::<Option<Vec<Row>>>()
        .ok_or_else(|| anyhow!("malformed row in bronze_ids.py output"))?;
    let txn = doc["txn"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_i64())).collect())
        .unwrap_or_default();
    Ok(Some(Bronze {
        version: doc["version"].as_i64().unwrap_or(-1),
        rows,
        txn,
    }))
}

/// What is wrong with bronze relative to the answered CALLs.
#[derive(Default)]
struct Findings {
    /// Answered CALLs with no CALL row / no CALLRESULT row.
    missing_call: Vec<(String, String)>,
    missing_result: Vec<(String, String)>,
    /// Rows present more than once (by station, direction, type, message id).
    duplicated: Vec<(Row, usize)>,
    /// `(node_id, wal_seq)` pairs held by more than one row.
    duplicate_seq: Vec<(String, i64)>,
    /// Nodes whose app transaction version is below their highest wal_seq.
    txn_behind: Vec<String>,
}

impl Findings {
    fn corrupt(&self) -> bool {
        !self.duplicated.is_empty() || !self.duplicate_seq.is_empty() || !self.txn_behind.is_empty()
    }

    fn complete(&self) -> bool {
        self.missing_call.is_empty() && self.missing_result.is_empty()
    }

    fn describe(&self, bronze: &Bronze) -> String {
        fn sample<T: std::fmt::Debug>(v: &[T]) -> String {
            format!("{} {:?}", v.len(), &v[..v.len().min(8)])
        }
        format!(
            "bronze version {} with {} rows; missing CALL rows: {}; missing CALLRESULT rows: {}; \
             duplicated rows: {}; duplicate (node_id, wal_seq): {}; app txn behind wal_seq: {:?} (txn {:?})",
            bronze.version,
            bronze.rows.len(),
            sample(&self.missing_call),
            sample(&self.missing_result),
            sample(&self.duplicated),
            sample(&self.duplicate_seq),
            self.txn_behind,
            bronze.txn,
        )
    }
}

fn check_bronze(bronze: &Bronze, answered: &[(String, String)]) -> Findings {
    let mut f = Findings::default();
    let mut by_key: HashMap<(&str, &str, i64, &str), (usize, &Row)> = HashMap::new();
    let mut seqs: HashMap<(&str, i64), usize> = HashMap::new();
    let mut max_seq: HashMap<&str, i64> = HashMap::new();
    for r in &bronze.rows {
        let key = (
            r.station_id.as_str(),
            r.direction.as_str(),
            r.message_type,
            r.message_id.as_str(),
        );
        by_key.entry(key).or_insert((0, r)).0 += 1;
        *seqs.entry((r.node_id.as_str(), r.wal_seq)).or_insert(0) += 1;
        let m = max_seq.entry(r.node_id.as_str()).or_insert(r.wal_seq);
        *m = (*m).max(r.wal_seq);
    }
    for (station, id) in answered {
        if !by_key.contains_key(&(station.as_str(), "cs_to_csms", 2, id.as_str())) {
            f.missing_call.push((station.clone(), id.clone()));
        }
        if !by_key.contains_key(&(station.as_str(), "csms_to_cs", 3, id.as_str())) {
            f.missing_result.push((station.clone(), id.clone()));
        }
    }
    f.duplicated = by_key
        .values()
        .filter(|(n, _)| *n > 1)
        .map(|(n, r)| ((*r).clone(), *n))
        .collect();
    f.duplicate_seq = seqs
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|((node, seq), _)| (node.to_string(), *seq))
        .collect();
    for (node, max) in max_seq {
        if let Some(Some(v)) = bronze.txn.get(&format!("csms-bronze-{node}"))
            && *v < max
        {
            f.txn_behind
                .push(format!("{node}: txn {v} < max wal_seq {max}"));
        }
    }
    f
}

/// Polls bronze until every answered CALL and its CALLRESULT are there;
/// fails at once on a duplicate. Then reads once more after two further
/// flush intervals, so a late replay of the same WAL records would show up
/// as a duplicate. `context` is printed on failure (server log tails).
async fn wait_exactly_once(
    lake: &Lake,
    nodes: &[&str],
    answered: &[(String, String)],
    context: &dyn Fn() -> String,
) -> Result<Bronze> {
    let app_ids: Vec<String> = nodes.iter().map(|n| format!("csms-bronze-{n}")).collect();
    let deadline = Instant::now() + LAKE_TIMEOUT;
    loop {
        let last = match read_bronze(lake, &app_ids).await? {
            None => "bronze does not exist yet".to_string(),
            Some(bronze) => {
                let f = check_bronze(&bronze, answered);
                if f.corrupt() {
                    bail!(
                        "bronze is not exactly-once: {}\n{}",
                        f.describe(&bronze),
                        context()
                    );
                }
                if f.complete() {
                    break;
                }
                f.describe(&bronze)
            }
        };
        if Instant::now() > deadline {
            bail!(
                "answered messages missing from bronze after {LAKE_TIMEOUT:?}: {last}\n{}",
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let bronze = read_bronze(lake, &app_ids)
        .await?
        .ok_or_else(|| anyhow!("bronze vanished"))?;
    let f = check_bronze(&bronze, answered);
    ensure!(
        f.complete() && !f.corrupt(),
        "bronze changed for the worse on a later flush: {}\n{}",
        f.describe(&bronze),
        context()
    );
    Ok(bronze)
}

fn server_context(servers: &[&TestServer]) -> String {
    servers
        .iter()
        .map(|s| {
            format!(
                "---- csms log ({}) ----\n{}",
                s.log_path().display(),
                grep_log(s.log_path())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The warnings and errors of a server log (delta-rs logs a lot at info),
/// or its tail when there are none.
fn grep_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("===="))
        .collect();
    if lines.is_empty() {
        return tail_file(path, 30);
    }
    lines[lines.len().saturating_sub(40)..]
        .iter()
        .map(|l| l.chars().take(600).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A server for streaming tests: unknown stations allowed, and the
/// per-station message rate limit (20/s by default, which would pace the
/// stations instead of the WAL) lifted.
fn stream_server() -> TestServerBuilder {
    TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .env("CSMS_LIMITS__MESSAGES_PER_STATION_PER_SEC", "1000000")
        .env("CSMS_LIMITS__MESSAGE_BURST_PER_STATION", "1000000")
}

// ---------------------------------------------------------------------------
// 1. crash mid-stream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_loses_nothing() -> Result<()> {
    let mut server = stream_server().start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let stations = [
        ("CRASH-A", "ocpp1.6"),
        ("CRASH-B", "ocpp1.6"),
        ("CRASH-C", "ocpp2.0.1"),
        ("CRASH-D", "ocpp2.0.1"),
    ];
    let handles: Vec<_> = stations
        .iter()
        .map(|(id, proto)| {
            spawn_station(
                server.ocpp_url(id),
                id.to_string(),
                proto,
                stop.clone(),
                Duration::from_secs(20),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGKILL while every station has a CALL in flight or about to be sent.
    server.kill();
    stop.store(true, Ordering::SeqCst);
    let logs = join_all(handles).await?;
    eprintln!("crash test: killed; {}", summary(&logs));
    for log in &logs {
        ensure!(
            log.answered.len() >= 5,
            "station {} got only {} answers before the kill: {}",
            log.station,
            log.answered.len(),
            summary(&logs)
        );
    }
    let answered = answered_ids(&logs);

    server.restart().await;
    let lake = Lake::local(Path::new(&server.lake_url()));
    let bronze =
        wait_exactly_once(&lake, &[NODE_ID], &answered, &|| server_context(&[&server])).await?;
    eprintln!(
        "crash test: {} answered CALLs, bronze has {} rows (version {})",
        answered.len(),
        bronze.rows.len(),
        bronze.version
    );
    ensure!(
        bronze.rows.iter().all(|r| r.node_id == NODE_ID),
        "foreign node ids in bronze"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. object store outage

/// A `python3 -m moto.server` on a free port: a real S3-compatible server
/// (with conditional put), killed on drop. It keeps its state in memory, so
/// outages are simulated with [`TcpProxy`] in front of it, not by killing it.
struct Moto {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Moto {
    async fn start(dir: &Path) -> Result<Moto> {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let probe = Command::new(&python)
            .args(["-c", "import moto.server, boto3"])
            .output()
            .with_context(|| format!("running {python}"))?;
        ensure!(
            probe.status.success(),
            "the moto S3 server is not installed for {python} ({}): run scripts/install-test-deps.sh",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
        let log = dir.join("moto.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(addr.port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("spawning moto.server")?;
        let mut moto = Moto { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                bail!(
                    "moto.server exited ({status}): {}",
                    tail_file(&moto.log, 20)
                );
            }
            if http_request(moto.addr, "GET", "/", &[], None).await.is_ok() {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                bail!(
                    "moto.server not answering on {}: {}",
                    moto.addr,
                    tail_file(&moto.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let resp = http_request(self.addr, "PUT", &format!("/{bucket}"), &[], Some(b"")).await?;
        ensure!(
            resp.status == 200,
            "creating bucket {bucket}: HTTP {} {}",
            resp.status,
            resp.text()
        );
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How [`TcpProxy`] treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyMode {
    /// Forwards both ways.
    Up,
    /// Closes new connections at once and cuts open ones: an unreachable
    /// store as its client sees it when connections fail fast.
    Refuse,
    /// Accepts connections but forwards nothing until the mode changes:
    /// a network partition, where requests hang until the client times out.
    Hang,
}

/// A TCP forwarder in front of the object store that the test can take
/// down (refusing or hanging), then bring back with the store's state intact.
struct TcpProxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<ProxyMode>>,
    /// Connections refused, cut or held because of the mode: proof that the
    /// client tried to reach the store during an outage.
    disrupted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    async fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(watch::Sender::new(ProxyMode::Up));
        let disrupted = Arc::new(AtomicU64::new(0));
        let task = {
            let mode = mode.clone();
            let disrupted = disrupted.clone();
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    tokio::spawn(Self::serve(
                        inbound,
                        upstream,
                        mode.subscribe(),
                        disrupted.clone(),
                    ));
                }
            })
        };
        Ok(TcpProxy {
            addr,
            mode,
            disrupted,
            task,
        })
    }

    /// One client connection: held while hanging, dropped while refusing,
    /// else forwarded until either side closes or the mode turns `Refuse`.
    async fn serve(
        inbound: TcpStream,
        upstream: SocketAddr,
        mut mode: watch::Receiver<ProxyMode>,
        disrupted: Arc<AtomicU64>,
    ) {
        let now = *mode.borrow_and_update();
        if now != ProxyMode::Up {
            disrupted.fetch_add(1, Ordering::SeqCst);
        }
        match mode.wait_for(|m| *m != ProxyMode::Hang).await.map(|m| *m) {
            Ok(ProxyMode::Up) => {}
            _ => return,
        }
        let Ok(outbound) = TcpStream::connect(upstream).await else {
            return;
        };
        let (in_read, in_write) = inbound.into_split();
        let (out_read, out_write) = outbound.into_split();
        let flag = Arc::new(AtomicBool::new(false));
        let mut cut = mode.clone();
        tokio::select! {
            _ = Self::pump(in_read, out_write, mode.clone(), flag.clone(), disrupted.clone()) => {}
            _ = Self::pump(out_read, in_write, mode.clone(), flag.clone(), disrupted.clone()) => {}
            _ = cut.wait_for(|m| *m == ProxyMode::Refuse) => {
                disrupted.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Copies one direction, holding each chunk while the mode is `Hang`
    /// (counted once per connection through `held`).
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut mode: watch::Receiver<ProxyMode>,
        held: Arc<AtomicBool>,
        disrupted: Arc<AtomicU64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if *mode.borrow_and_update() == ProxyMode::Hang && !held.swap(true, Ordering::SeqCst) {
                disrupted.fetch_add(1, Ordering::SeqCst);
            }
            match mode.wait_for(|m| *m != ProxyMode::Hang).await.map(|m| *m) {
                Ok(ProxyMode::Up) => {}
                _ => return,
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.set_mode(ProxyMode::Refuse);
        self.task.abort();
    }
}

/// Streams CALLs from two stations through an object-store outage of
/// `outage` kind: answers must keep coming (the WAL absorbs the outage),
/// and once the store is back everything answered drains into bronze once.
async fn outage_then_drain(outage: ProxyMode) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let moto = Moto::start(dir.path()).await?;
    let bucket = "csms-durability";
    moto.create_bucket(bucket).await?;
    let proxy = TcpProxy::start(moto.addr).await?;
    let creds = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let lake_url = format!("s3://{bucket}/lake");
    let mut builder = stream_server()
        .env("CSMS_LAKE_URL", lake_url.clone())
        .env("AWS_ENDPOINT_URL", format!("http://{}", proxy.addr));
    for (k, v) in creds {
        builder = builder.env(k, v);
    }
    let server = builder.start().await;
    // The test reads bronze straight from moto, bypassing the proxy.
    let mut storage_options: Vec<(String, String)> = creds
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    storage_options.push(("AWS_ENDPOINT_URL".into(), format!("http://{}", moto.addr)));
    let lake = Lake {
        url: lake_url,
        storage_options,
    };
    let context = || {
        format!(
            "{}\n---- moto log tail ----\n{}",
            server_context(&[&server]),
            tail_file(&moto.log, 20)
        )
    };

    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = [("S3-A", "ocpp1.6"), ("S3-B", "ocpp2.0.1")]
        .iter()
        .map(|(id, proto)| {
            spawn_station(
                server.ocpp_url(id),
                id.to_string(),
                proto,
                stop.clone(),
                Duration::from_secs(30),
            )
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let down_at = Instant::now();
    let disrupted_before = proxy.disrupted.load(Ordering::SeqCst);
    proxy.set_mode(outage);
    // While the store is down, nothing answered in the outage can be in
    // bronze (a commit started just before the cut carries only records
    // sealed before it, hence the margin).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let during = read_bronze(&lake, &[]).await?;
    let during_outage_ids: HashSet<String> = during
        .as_ref()
        .map(|b| b.rows.iter().map(|r| r.message_id.clone()).collect())
        .unwrap_or_default();
    let remaining = Duration::from_secs(5).saturating_sub(down_at.elapsed());
    tokio::time::sleep(remaining).await;
    let disrupted_during = proxy.disrupted.load(Ordering::SeqCst) - disrupted_before;
    proxy.set_mode(ProxyMode::Up);
    let up_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let logs = join_all(handles).await?;
    eprintln!(
        "s3 outage ({outage:?}): {} (outage {:?}, {} S3 connections refused, cut or held meanwhile)",
        summary(&logs),
        up_at - down_at,
        disrupted_during
    );

    ensure!(
        disrupted_during > 0,
        "csms made no object store request during the {:?} outage, so the test exercised nothing",
        up_at - down_at
    );
    for log in &logs {
        ensure!(
            log.ended_by.is_none(),
            "station {} stopped early: {}\n{}",
            log.station,
            summary(&logs),
            context()
        );
        let in_outage: Vec<&Answered> = log
            .answered
            .iter()
            .filter(|a| a.at > down_at && a.at < up_at)
            .collect();
        ensure!(
            in_outage.len() >= 10,
            "station {} got only {} answers during the object store outage (the WAL should absorb it): {}",
            log.station,
            in_outage.len(),
            summary(&logs)
        );
        let slowest = log.answered.iter().max_by_key(|a| a.latency);
        if let Some(a) = slowest {
            ensure!(
                a.latency <= MAX_ANSWER_LATENCY,
                "station {}: {} ({}) took {:?} to be answered, {:?} after the outage began",
                log.station,
                a.message_id,
                a.action,
                a.latency,
                a.at.saturating_duration_since(down_at)
            );
        }
        let leaked: Vec<&str> = log
            .answered
            .iter()
            .filter(|a| {
                a.at > down_at + Duration::from_millis(500)
                    && during_outage_ids.contains(&a.message_id)
            })
            .map(|a| a.message_id.as_str())
            .collect();
        ensure!(
            leaked.is_empty(),
            "messages answered during the outage were already in bronze before the store came back \
             (is the proxy bypassed?): {leaked:?}"
        );
    }

    let answered = answered_ids(&logs);
    let drain_start = Instant::now();
    let bronze = wait_exactly_once(&lake, &[NODE_ID], &answered, &context).await?;
    eprintln!(
        "s3 outage ({outage:?}): {} answered CALLs in bronze exactly once ({} rows, version {}), drained {:?} after the store came back",
        answered.len(),
        bronze.rows.len(),
        bronze.version,
        drain_start.elapsed() + Duration::from_secs(2)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_then_drain() -> Result<()> {
    outage_then_drain(ProxyMode::Refuse).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_partition_then_drain() -> Result<()> {
    outage_then_drain(ProxyMode::Hang).await
}

// ---------------------------------------------------------------------------
// 3. two nodes, one table

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_table() -> Result<()> {
    let lake_dir = tempfile::tempdir()?;
    let lake_url = lake_dir.path().join("lake").display().to_string();
    let node = |id: &str| {
        stream_server()
            .env("CSMS_NODE_ID", id)
            .env("CSMS_LAKE_URL", lake_url.clone())
            .start()
    };
    // Started together: both may try to create the table at once.
    let (a, b) = tokio::join!(node("node-a"), node("node-b"));
    ensure!(a.lake_url() == b.lake_url(), "nodes must share the lake");

    let stop = Arc::new(AtomicBool::new(false));
    let plan = [
        (&a, "TWO-A1", "ocpp1.6"),
        (&a, "TWO-A2", "ocpp2.0.1"),
        (&b, "TWO-B1", "ocpp1.6"),
        (&b, "TWO-B2", "ocpp2.0.1"),
    ];
    let handles: Vec<_> = plan
        .iter()
        .map(|(server, id, proto)| {
            spawn_station(
                server.ocpp_url(id),
                id.to_string(),
                proto,
                stop.clone(),
                Duration::from_secs(20),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let logs = join_all(handles).await?;
    eprintln!("two nodes: {}", summary(&logs));
    for log in &logs {
        ensure!(
            log.ended_by.is_none() && log.answered.len() >= 5,
            "station {} did not stream: {}",
            log.station,
            summary(&logs)
        );
    }
    let answered = answered_ids(&logs);
    let lake = Lake::local(Path::new(&lake_url));
    let bronze = wait_exactly_once(&lake, &["node-a", "node-b"], &answered, &|| {
        server_context(&[&a, &b])
    })
    .await?;

    // Each station's rows carry the node that held its socket.
    for r in &bronze.rows {
        let expected = if r.station_id.starts_with("TWO-A") {
            "node-a"
        } else {
            "node-b"
        };
        ensure!(
            r.node_id == expected,
            "row of {} carries node {}: {r:?}",
            r.station_id,
            r.node_id
        );
    }
    for node in ["node-a", "node-b"] {
        let app = format!("csms-bronze-{node}");
        ensure!(
            matches!(bronze.txn.get(&app), Some(Some(v)) if *v > 0),
            "no app transaction {app} in bronze: {:?}",
            bronze.txn
        );
    }
    eprintln!(
        "two nodes: {} answered CALLs in bronze exactly once ({} rows, version {}, txn {:?})",
        answered.len(),
        bronze.rows.len(),
        bronze.version,
        bronze.txn
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. bronze is a plain Delta table

#[tokio::test]
async fn bronze_is_plain_delta() -> Result<()> {
    let server = stream_server().start().await;
    let station = "PLAIN-1";
    let mut client = server.connect(station, "ocpp1.6", None).await?;
    let mut answered = Vec::new();
    for n in 0..6u64 {
        let id = format!("{station}-{n}");
        let (action, payload) = nth_call("ocpp1.6", n);
        let answer = client.call(&id, action, payload).await?;
        ensure!(answer[0] == 3, "{action} answered {answer:?}");
        answered.push((station.to_string(), id));
    }
    client.close().await?;
    let lake_url = server.lake_url();
    let lake = Lake::local(Path::new(&lake_url));
    let bronze =
        wait_exactly_once(&lake, &[NODE_ID], &answered, &|| server_context(&[&server])).await?;
    let max_seq = bronze.rows.iter().map(|r| r.wal_seq).max().unwrap_or(0);

    let app = format!("csms-bronze-{NODE_ID}");
    let out = run_python("bronze_schema.py", &["--lake", &lake_url, "--app-id", &app]).await?;
    ensure!(
        out.status.success(),
        "bronze_schema.py failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).context("bronze_schema.py output")?;
    eprintln!("bronze as deltalake sees it: {doc}");

    // Columns of DESIGN.md, in order, with their Arrow and Delta types.
    // `wal_seq` is a signed 64-bit integer: Delta has no unsigned types.
    const STR: &[&str] = &["Utf8", "LargeUtf8", "Utf8View"];
    let expected: [(&str, &[&str], &[&str]); 14] = [
        ("received_at", &["Timestamp(µs, \"UTC\")"], &["timestamp"]),
        ("date", &["Date32"], &["date"]),
        ("node_id", STR, &["string"]),
        ("wal_seq", &["Int64"], &["long"]),
        ("station_id", STR, &["string"]),
        ("ocpp_version", STR, &["string"]),
        ("direction", STR, &["string"]),
        (
            "message_type",
            &["Int8", "Int16", "Int32"],
            &["byte", "short", "integer"],
        ),
        ("message_id", STR, &["string"]),
        ("action", STR, &["string"]),
        ("payload", STR, &["string"]),
        ("error_code", STR, &["string"]),
        ("error_description", STR, &["string"]),
        ("raw", STR, &["string"]),
    ];
    for key in ["table_fields", "scan_fields", "delta_fields"] {
        let fields = doc[key]
            .as_array()
            .ok_or_else(|| anyhow!("no {key} in {doc}"))?;
        let names: Vec<&str> = fields.iter().filter_map(|f| f[0].as_str()).collect();
        let want: Vec<&str> = expected.iter().map(|(n, _, _)| *n).collect();
        ensure!(names == want, "{key}: columns {names:?}, expected {want:?}");
        for (field, (name, arrow, delta)) in fields.iter().zip(expected.iter()) {
            let ty = field[1].as_str().unwrap_or_default();
            let allowed = if key == "delta_fields" { delta } else { arrow };
            ensure!(
                allowed.contains(&ty),
                "{key}: column {name} has type {ty}, expected one of {allowed:?}"
            );
        }
    }
    let table_fields = doc["table_fields"].as_array().expect("checked above");
    for required in [
        "received_at",
        "date",
        "node_id",
        "wal_seq",
        "station_id",
        "direction",
        "message_type",
        "message_id",
        "raw",
    ] {
        let f = table_fields
            .iter()
            .find(|f| f[0] == required)
            .expect("checked above");
        ensure!(
            f[2] == false,
            "{required} is nullable in the table schema: {f}"
        );
    }

    ensure!(
        doc["partition_columns"] == json!(["date"]),
        "partition columns: {}",
        doc["partition_columns"]
    );
    let files = doc["files"].as_array().cloned().unwrap_or_default();
    ensure!(!files.is_empty(), "no data files: {doc}");
    for f in &files {
        let f = f.as_str().unwrap_or_default();
        let partitioned = f.split('/').any(|part| {
            part.strip_prefix("date=")
                .is_some_and(|d| d.len() == 10 && d.as_bytes()[4] == b'-')
        });
        ensure!(
            partitioned && f.ends_with(".parquet"),
            "data file not in a date=YYYY-MM-DD partition: {f}"
        );
    }
    ensure!(
        doc["date_mismatches"] == 0,
        "rows whose date is not the UTC date of received_at: {}",
        doc["date_mismatches"]
    );
    let received = doc["received_at_utc"].as_str().unwrap_or_default();
    ensure!(
        received.ends_with("+00:00"),
        "received_at should read back as a UTC instant: {received}"
    );
    ensure!(
        doc["num_rows"] == json!(answered.len() * 2),
        "expected {} rows (CALL + CALLRESULT each), got {}",
        answered.len() * 2,
        doc["num_rows"]
    );
    let reader = doc["protocol"]["min_reader_version"].as_i64().unwrap_or(99);
    ensure!(
        reader <= 2,
        "minReaderVersion {reader}: bronze needs reader table features that common engines lack"
    );
    ensure!(
        doc["txn"][&app] == json!(max_seq),
        "app transaction {app} should be the highest WAL seq in bronze ({max_seq}): {}",
        doc["txn"]
    );
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn rfc3339_civil_dates() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(951_827_696_789)),
            "2000-02-29T12:34:56.789Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59.000Z"
        );
    }

    fn row(station: &str, dir: &str, t: i64, id: &str, seq: i64) -> Row {
        Row {
            station_id: station.into(),
            direction: dir.into(),
            message_type: t,
            message_id: id.into(),
            node_id: "n".into(),
            wal_seq: seq,
        }
    }

    #[test]
    fn check_bronze_flags_loss_and_duplicates() {
        let answered = vec![("S".to_string(), "1".to_string()), ("S".into(), "2".into())];
        let mut bronze = Bronze {
            version: 1,
            rows: vec![
                row("S", "cs_to_csms", 2, "1", 1),
                row("S", "csms_to_cs", 3, "1", 2),
                row("S", "cs_to_csms", 2, "2", 3),
            ],
            txn: HashMap::from([("csms-bronze-n".to_string(), Some(3))]),
        };
        let f = check_bronze(&bronze, &answered);
        assert!(!f.corrupt());
        assert_eq!(f.missing_result, vec![("S".to_string(), "2".to_string())]);
        assert!(f.missing_call.is_empty());

        bronze.rows.push(row("S", "csms_to_cs", 3, "2", 4));
        bronze.txn.insert("csms-bronze-n".into(), Some(4));
        let f = check_bronze(&bronze, &answered);
        assert!(f.complete() && !f.corrupt());

        // The same frame committed twice (a replay) under a new seq.
        bronze.rows.push(row("S", "cs_to_csms", 2, "2", 5));
        assert_eq!(check_bronze(&bronze, &answered).duplicated.len(), 1);
        assert_eq!(check_bronze(&bronze, &answered).txn_behind.len(), 1);
        bronze.rows.pop();
        // Two frames under one (node_id, wal_seq).
        bronze.rows.push(row("S", "cs_to_csms", 2, "3", 4));
        assert_eq!(
            check_bronze(&bronze, &answered).duplicate_seq,
            vec![("n".to_string(), 4)]
        );
    }
}
