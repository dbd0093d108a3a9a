//! Harness for the end-to-end tests: runs the real `csms` binary on free
//! ports with its own data directory, talks to it over real sockets (raw
//! OCPP-J over WebSocket, hand-written HTTP/1.1) and drives the Python
//! charge-point scripts under `tests/python/`, which use the `ocpp` package
//! and so check every answer against the OCA schemas independently of ours.
//!
//! Everything here panics or returns `anyhow` errors with enough context
//! (the server's log tail) to debug a failing test from its output alone.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

/// Bearer token every test server is started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// Node id every test server is started with (bronze rows carry it).
pub const NODE_ID: &str = "test-node";
/// How long a server may take to answer `/readyz` after spawning.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default wait for one answer frame.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root (the parent of this crate), where `tests/python` lives.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Locates the `csms` binary: `$CSMS_BIN`, else next to the test executable
/// (`target/debug/deps/e2e-*` → `target/debug/csms`), which is where
/// `cargo build --workspace` puts it.
pub fn csms_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CSMS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join("csms");
    assert!(
        bin.exists(),
        "csms binary not found at {}: run `cargo build --workspace` first or set CSMS_BIN",
        bin.display()
    );
    bin
}

/// Picks `n` distinct free TCP ports on 127.0.0.1. The listeners are held
/// until all are chosen so one server never gets the same port twice; they
/// are released before the server binds (a small race other processes could
/// win, acceptable for tests).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<StdTcpListener> = (0..n)
        .map(|_| StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// Last `lines` lines of a file, for panic messages.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("<cannot open {}: {e}>", path.display()),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Configures a [`TestServer`] before it starts.
#[derive(Default)]
pub struct TestServerBuilder {
    env: Vec<(String, String)>,
    stations: Vec<(String, Option<String>)>,
    tokens: Vec<(String, String)>,
    tls: Option<(Identity, String, bool)>,
}

impl TestServerBuilder {
    /// Serves `wss` too, with a server certificate for `localhost` and
    /// 127.0.0.1 issued by `pki`; with `client_ca`, the server also gets the
    /// CA for client certificates (mTLS, security profile 3).
    pub fn tls(mut self, pki: &TestPki, client_ca: bool) -> Self {
        let server = pki
            .issue("localhost", &["localhost", "127.0.0.1"], false)
            .expect("issue server certificate");
        self.tls = Some((server, pki.ca_pem.clone(), client_ca));
        self
    }

    /// Sets an environment variable for `csms serve` (and the CLI calls),
    /// overriding the harness defaults.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Registers a station (with `csms stations add`) before the server starts.
    pub fn station(mut self, id: &str, password: Option<&str>) -> Self {
        self.stations
            .push((id.to_string(), password.map(str::to_string)));
        self
    }

    /// Registers an id token (with `csms tokens add --status`) before start.
    pub fn token(mut self, token: &str, status: &str) -> Self {
        self.tokens.push((token.to_string(), status.to_string()));
        self
    }

    /// Creates the data directory, registers stations and tokens, spawns
    /// `csms serve` and waits until `/readyz` answers 200.
    pub async fn start(self) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("csms-e2e-")
            .tempdir()
            .expect("create tempdir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let ports = free_ports(4);
        let mut env = self.env;
        let mut tls_addr = None;
        if let Some((identity, ca_pem, client_ca)) = &self.tls {
            let write = |name: &str, text: &str| {
                let path = dir.path().join(name);
                std::fs::write(&path, text).expect("write TLS file");
                path.display().to_string()
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], ports[3]));
            tls_addr = Some(addr);
            env.insert(0, ("CSMS_OCPP_TLS_ADDR".into(), addr.to_string()));
            env.insert(
                0,
                (
                    "CSMS_TLS_CERT".into(),
                    write("server.pem", &identity.cert_pem),
                ),
            );
            env.insert(
                0,
                (
                    "CSMS_TLS_KEY".into(),
                    write("server.key", &identity.key_pem),
                ),
            );
            if *client_ca {
                env.insert(
                    0,
                    ("CSMS_TLS_CLIENT_CA".into(), write("client-ca.pem", ca_pem)),
                );
            }
        }
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut server = TestServer {
            bin: csms_bin(),
            log_path: dir.path().join("csms.log"),
            data_dir,
            ocpp_addr: addr(ports[0]),
            http_addr: addr(ports[1]),
            pg_addr: addr(ports[2]),
            tls_addr,
            extra_env: env,
            child: None,
            spawns: 0,
            _dir: dir,
        };
        for (id, password) in &self.stations {
            let mut args = vec!["stations", "add", id.as_str()];
            if let Some(pw) = password {
                args.extend(["--password", pw.as_str()]);
            }
            server.cli_ok(&args);
        }
        for (token, status) in &self.tokens {
            server.cli_ok(&["tokens", "add", token, "--status", status]);
        }
        server.spawn();
        server.wait_ready().await;
        server
    }
}

/// A running `csms serve` with its own ports and data directory; killed on drop.
pub struct TestServer {
    bin: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    ocpp_addr: SocketAddr,
    http_addr: SocketAddr,
    pg_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    extra_env: Vec<(String, String)>,
    child: Option<Child>,
    spawns: u32,
    // Last field: removed after the child is killed in Drop.
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A builder; `TestServer::builder().start().await` is a server with defaults.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder::default()
    }

    /// Starts a server with the harness defaults and nothing registered.
    pub async fn start() -> TestServer {
        Self::builder().start().await
    }

    /// The environment given to every `csms` invocation: the harness
    /// defaults, then the test's overrides. Inherited `CSMS_*`, `REDIS_URL`
    /// and `SMTP_URL` variables are removed in [`Self::command`] so a
    /// developer's shell cannot change what a test sees.
    fn env_vars(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("CSMS_OCPP_ADDR".into(), self.ocpp_addr.to_string()),
            ("CSMS_HTTP_ADDR".into(), self.http_addr.to_string()),
            ("CSMS_PG_ADDR".into(), self.pg_addr.to_string()),
            ("CSMS_DATA_DIR".into(), self.data_dir.display().to_string()),
            ("CSMS_NODE_ID".into(), NODE_ID.into()),
            ("CSMS_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("CSMS_LAKE__FLUSH_INTERVAL_SECS".into(), "1".into()),
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// A `csms` command with this server's environment.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
            .filter(|(k, _)| k.starts_with("CSMS_") || k == "REDIS_URL" || k == "SMTP_URL")
        {
            cmd.env_remove(k);
        }
        cmd.envs(self.env_vars());
        cmd.current_dir(self._dir.path());
        cmd
    }

    /// Runs a `csms` CLI subcommand (e.g. `["stations", "list"]`) against
    /// this server's data directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running csms {args:?}: {e}"))
    }

    /// Like [`Self::cli`] but panics unless the command succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "csms {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open server log");
        self.spawns += 1;
        let mut banner = log.try_clone().expect("clone log handle");
        let _ = std::io::Write::write_all(
            &mut banner,
            format!("==== csms serve (start #{}) ====\n", self.spawns).as_bytes(),
        );
        let child = self
            .command()
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} serve: {e}", self.bin.display()));
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "csms serve exited before ready ({status}); log tail:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(resp) = http_request(self.http_addr, "GET", "/readyz", &[], None).await
                && resp.status == 200
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "csms serve not ready after {READY_TIMEOUT:?}; log tail:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the server's combined stdout/stderr.
    pub fn log_tail(&self) -> String {
        tail_file(&self.log_path, 80)
    }

    /// Path of the server log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `ws://127.0.0.1:PORT/ocpp/{station}` (the station id used verbatim,
    /// so tests can pass percent-encoded or invalid ids).
    pub fn ocpp_url(&self, station: &str) -> String {
        format!("ws://{}/ocpp/{station}", self.ocpp_addr)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    /// `wss://localhost:PORT/ocpp/{station}` (servers built with `tls`).
    pub fn ocpp_tls_url(&self, station: &str) -> String {
        let addr = self.tls_addr.expect("server started without .tls(..)");
        format!("wss://localhost:{}/ocpp/{station}", addr.port())
    }

    pub fn ocpp_tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn ocpp_addr(&self) -> SocketAddr {
        self.ocpp_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn pg_addr(&self) -> SocketAddr {
        self.pg_addr
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The lake location: `CSMS_LAKE_URL` if the test set it, else the
    /// documented default `$CSMS_DATA_DIR/lake`.
    pub fn lake_url(&self) -> String {
        self.extra_env
            .iter()
            .rev()
            .find(|(k, _)| k == "CSMS_LAKE_URL")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| self.data_dir.join("lake").display().to_string())
    }

    /// Sets (or overrides) an environment variable for later `csms`
    /// invocations, e.g. before [`Self::restart`].
    pub fn set_env(&mut self, key: &str, value: impl Into<String>) {
        self.extra_env.push((key.to_string(), value.into()));
    }

    /// Kills the server with SIGKILL (`Child::kill` on Unix) and reaps it:
    /// a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if running and starts it again on the same ports
    /// and data directory, waiting until ready.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    /// Whether the child process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `GET path` on the HTTP port.
    pub async fn http_get(&self, path: &str) -> Result<HttpResponse> {
        http_request(self.http_addr, "GET", path, &[], None).await
    }

    /// A request on the HTTP port with the admin bearer token.
    pub async fn admin_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<HttpResponse> {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        http_request(
            self.http_addr,
            method,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .await
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let resp = self.http_get("/metrics").await?;
        if resp.status != 200 {
            bail!("GET /metrics answered {}: {}", resp.status, resp.text());
        }
        Ok(resp.text())
    }

    /// Sum of the samples of `name` whose labels include all of `labels`
    /// (0 when there are none, as for a counter never incremented).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_sum(&self.metrics().await?, name, labels))
    }

    /// Connects an OCPP client to `station` offering `subprotocol`.
    pub async fn connect(
        &self,
        station: &str,
        subprotocol: &str,
        basic: Option<(&str, &str)>,
    ) -> Result<OcppClient> {
        OcppClient::connect(&self.ocpp_url(station), &[subprotocol], basic)
            .await
            .map_err(|e| anyhow!("connect {station} ({subprotocol}): {e}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- csms log tail ({}) ----\n{}\n----",
                self.log_path.display(),
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// Sums the samples of metric `name` in Prometheus text whose label set
/// contains every `(key, value)` of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(brace) if line[..brace].trim() == name => {
                let Some(close) = line.rfind('}') else {
                    continue;
                };
                (&line[brace + 1..close], &line[close + 1..])
            }
            _ => match line.split_once(' ') {
                Some((n, rest)) if n == name => ("", rest),
                _ => continue,
            },
        };
        let matches = labels.iter().all(|(k, v)| {
            parse_labels(series)
                .iter()
                .any(|(lk, lv)| lk == k && lv == v)
        });
        if !matches {
            continue;
        }
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            sum += v;
        }
    }
    sum
}

/// Parses `a="x",b="y\"z"` into pairs (unescaping `\"`, `\\`, `\n`).
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
    out
}

/// An HTTP/1.1 response read to the end of the connection.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("HTTP {} body is not JSON: {}", self.status, self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client (`Connection: close`, read to EOF, chunked
/// bodies decoded): enough for health, metrics and JSON APIs without an
/// HTTP client dependency.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResponse> {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE") {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_http_response(&raw)
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .map_err(|_| anyhow!("{method} {path} on {addr}: timed out"))?
        .with_context(|| format!("{method} {path} on {addr}"))
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of HTTP headers in {} bytes", raw.len()))?;
    let head = std::str::from_utf8(&raw[..head_end])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        body = decode_chunked(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size line"))?;
        let size_str = std::str::from_utf8(&data[..line_end])?;
        let size_str = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_str, 16)
            .with_context(|| format!("bad chunk size {size_str:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// Any byte stream a WebSocket can run over (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a WebSocket upgrade did not succeed.
#[derive(Debug)]
pub enum UpgradeError {
    /// The server answered with this HTTP status instead of 101.
    Refused { status: u16, body: String },
    /// Anything else (connect, TLS, protocol).
    Other(anyhow::Error),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::Refused { status, body } => {
                write!(f, "upgrade refused with HTTP {status}: {body}")
            }
            UpgradeError::Other(e) => write!(f, "upgrade failed: {e:#}"),
        }
    }
}

impl std::error::Error for UpgradeError {}

impl UpgradeError {
    /// The HTTP status of a refused upgrade.
    pub fn status(&self) -> Option<u16> {
        match self {
            UpgradeError::Refused { status, .. } => Some(*status),
            UpgradeError::Other(_) => None,
        }
    }
}

/// How a connection ended, as seen by [`OcppClient::wait_closed`].
#[derive(Debug)]
pub struct Closed {
    /// The close code if the server sent a Close frame.
    pub code: Option<u16>,
    pub reason: String,
    /// Text frames received before the close.
    pub texts: Vec<String>,
}

/// A raw OCPP-J client: sends text frames verbatim and reads answers, so
/// tests can send anything, including malformed frames.
pub struct OcppClient {
    ws: WebSocketStream<Box<dyn Io>>,
    /// The subprotocol the server chose.
    pub subprotocol: Option<String>,
}

impl OcppClient {
    /// Connects over plain TCP to a `ws://` URL offering `subprotocols`
    /// (none → no `Sec-WebSocket-Protocol` header) and optional Basic auth.
    pub async fn connect(
        url: &str,
        subprotocols: &[&str],
        basic: Option<(&str, &str)>,
    ) -> Result<Self, UpgradeError> {
        let request = url
            .into_client_request()
            .map_err(|e| UpgradeError::Other(anyhow!("bad url {url}: {e}")))?;
        let host = request.uri().host().unwrap_or("127.0.0.1").to_string();
        let port = request.uri().port_u16().unwrap_or(80);
        let stream =
            tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| {
                    UpgradeError::Other(anyhow!("TCP connect to {host}:{port} timed out"))
                })?
                .map_err(|e| UpgradeError::Other(anyhow!("TCP connect to {host}:{port}: {e}")))?;
        Self::connect_stream(Box::new(stream), url, subprotocols, basic).await
    }

    /// Connects over TLS to a `wss://` URL (host `localhost` or an IP,
    /// resolved to 127.0.0.1), trusting `ca`, presenting `client` if given.
    pub async fn connect_tls(
        url: &str,
        ca: &TestPki,
        client: Option<&Identity>,
        subprotocols: &[&str],
        basic: Option<(&str, &str)>,
    ) -> Result<Self, UpgradeError> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        let other = |e: &dyn std::fmt::Display| UpgradeError::Other(anyhow!("{e}"));
        let request = url.into_client_request().map_err(|e| other(&e))?;
        let host = request.uri().host().unwrap_or("localhost").to_string();
        let port = request.uri().port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.ca_der.clone()))
            .map_err(|e| other(&e))?;
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| other(&e))?
        .with_root_certificates(roots);
        let config = match client {
            Some(id) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(id.cert_der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der.clone())),
                )
                .map_err(|e| other(&e))?,
            None => builder.with_no_client_auth(),
        };
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let name = ServerName::try_from(host.clone()).map_err(|e| other(&e))?;
        let tcp = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|_| other(&"TCP connect timed out"))?
            .map_err(|e| other(&e))?;
        let tls = tokio::time::timeout(ANSWER_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| other(&"TLS handshake timed out"))?
            .map_err(|e| UpgradeError::Other(anyhow!("TLS handshake: {e}")))?;
        Self::connect_stream(Box::new(tls), url, subprotocols, basic).await
    }

    /// Runs the WebSocket handshake over an already connected stream
    /// (e.g. a TLS stream with a client certificate).
    pub async fn connect_stream(
        stream: Box<dyn Io>,
        url: &str,
        subprotocols: &[&str],
        basic: Option<(&str, &str)>,
    ) -> Result<Self, UpgradeError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| UpgradeError::Other(anyhow!("bad url {url}: {e}")))?;
        let headers = request.headers_mut();
        if !subprotocols.is_empty() {
            let value = HeaderValue::from_str(&subprotocols.join(", "))
                .map_err(|e| UpgradeError::Other(anyhow!("bad subprotocol: {e}")))?;
            headers.insert("Sec-WebSocket-Protocol", value);
        }
        if let Some((user, password)) = basic {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            let value = HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|e| UpgradeError::Other(anyhow!("bad auth header: {e}")))?;
            headers.insert("Authorization", value);
        }
        let handshake = tokio_tungstenite::client_async(request, stream);
        let (ws, response) = match tokio::time::timeout(ANSWER_TIMEOUT, handshake).await {
            Err(_) => return Err(UpgradeError::Other(anyhow!("handshake timed out"))),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(UpgradeError::Refused {
                    status: resp.status().as_u16(),
                    body,
                });
            }
            Ok(Err(e)) => return Err(UpgradeError::Other(anyhow!(e))),
            Ok(Ok(pair)) => pair,
        };
        let subprotocol = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(OcppClient { ws, subprotocol })
    }

    /// Sends one text frame verbatim.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        let text: String = text.into();
        tokio::time::timeout(ANSWER_TIMEOUT, self.ws.send(Message::text(text)))
            .await
            .map_err(|_| anyhow!("send timed out"))?
            .context("send text frame")
    }

    /// Reads the next text frame within `timeout`, skipping pings/pongs.
    /// A close, EOF or binary frame is an error.
    pub async fn recv_text_timeout(&mut self, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no text frame within {timeout:?}"))?;
            match next {
                None => bail!("connection ended (EOF) while waiting for a text frame"),
                Some(Err(e)) => bail!("connection error while waiting for a text frame: {e}"),
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(b))) => {
                    bail!("unexpected binary frame ({} bytes)", b.len())
                }
                Some(Ok(Message::Close(frame))) => bail!("connection closed by server: {frame:?}"),
            }
        }
    }

    /// Reads the next text frame within [`ANSWER_TIMEOUT`].
    pub async fn recv_text(&mut self) -> Result<String> {
        self.recv_text_timeout(ANSWER_TIMEOUT).await
    }

    /// Reads the next text frame and parses it as a JSON array.
    pub async fn recv_frame(&mut self) -> Result<Vec<Value>> {
        let text = self.recv_text().await?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(items)) => Ok(items),
            _ => bail!("server sent a frame that is not a JSON array: {text}"),
        }
    }

    /// Sends a raw text frame and returns the next frame as a JSON array.
    pub async fn roundtrip(&mut self, text: &str) -> Result<Vec<Value>> {
        self.send_text(text).await?;
        self.recv_frame()
            .await
            .with_context(|| format!("waiting for the answer to {text}"))
    }

    /// Sends `[2, id, action, payload]` and returns the answer frame.
    pub async fn call(&mut self, id: &str, action: &str, payload: Value) -> Result<Vec<Value>> {
        let text = serde_json::to_string(&Value::Array(vec![
            2.into(),
            id.into(),
            action.into(),
            payload,
        ]))?;
        self.roundtrip(&text).await
    }

    /// Sends a Heartbeat and checks it gets a CALLRESULT with `currentTime`:
    /// proof the connection is still usable.
    pub async fn heartbeat_ok(&mut self, id: &str) -> Result<()> {
        let answer = self.call(id, "Heartbeat", serde_json::json!({})).await?;
        let ok = answer.len() == 3
            && answer[0] == 3
            && answer[1] == id
            && answer[2].get("currentTime").is_some_and(Value::is_string);
        if !ok {
            bail!("Heartbeat {id} answered with {answer:?}");
        }
        Ok(())
    }

    /// Sends a WebSocket close.
    pub async fn close(mut self) -> Result<()> {
        self.ws.close(None).await.context("close")
    }

    /// Waits until the server closes the connection, collecting text
    /// frames received meanwhile. Errors if still open after `timeout`.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Result<Closed> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut texts = Vec::new();
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(n) => n,
                Err(_) => bail!(
                    "connection still open after {timeout:?} ({} text frames received)",
                    texts.len()
                ),
            };
            match next {
                None | Some(Err(_)) => {
                    return Ok(Closed {
                        code: None,
                        reason: String::new(),
                        texts,
                    });
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame
                            .map(|f| f.reason.as_str().to_string())
                            .unwrap_or_default(),
                        texts,
                    });
                }
                Some(Ok(Message::Text(t))) => texts.push(t.as_str().to_string()),
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// A certificate and its private key (PKCS#8), as PEM and DER.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

/// A throwaway certificate authority for TLS tests.
pub struct TestPki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
}

impl TestPki {
    pub fn new() -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "csms e2e test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(TestPki {
            ca_pem: cert.pem(),
            ca_der: cert.der().to_vec(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// Issues a certificate with subject CN `cn` and the given SANs, for a
    /// server (`client == false`) or a client.
    pub fn issue(&self, cn: &str, sans: &[&str], client: bool) -> Result<Identity> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

/// Runs `python3 tests/python/<script> args...` from the workspace root
/// (`$PYTHON` overrides the interpreter), killing it after 180 s.
pub async fn run_python(script: &str, args: &[&str]) -> Result<Output> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let root = workspace_root();
    let path = root.join("tests").join("python").join(script);
    let child = tokio::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .current_dir(&root)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {python} {}", path.display()))?;
    tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{script} {args:?} did not finish within 180 s"))?
        .with_context(|| format!("waiting for {script}"))
}

/// Runs a Python script that must exit 0 and print one JSON document on
/// stdout; returns that document, or an error with the script's output.
pub async fn run_python_json(script: &str, args: &[&str]) -> Result<Value> {
    let out = run_python(script, args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{script} {args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
    }
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str(last).with_context(|| {
        format!("{script}: last stdout line is not JSON:\n{stdout}\n--- stderr\n{stderr}")
    })
}

/// Polls `check` every 200 ms until it returns `Ok(Some(v))` or `timeout`
/// passes; the last error or `None` is reported on timeout.
pub async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A throwaway redis-server on a free port, without persistence; killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> Result<Self> {
        let port = free_ports(1)[0];
        let dir = tempfile::tempdir()?;
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning /usr/bin/redis-server")?;
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        poll(
            Duration::from_secs(10),
            "redis-server accepting",
            || async {
                Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ()))
            },
        )
        .await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_matches_labels() {
        let text = "# HELP x y\n# TYPE csms_limit_triggered_total counter\n\
            csms_limit_triggered_total{limit=\"message_rate\",node=\"a\"} 3\n\
            csms_limit_triggered_total{limit=\"frame_size\"} 1\n\
            csms_limit_triggered_total{limit=\"message_rate\",node=\"b\"} 2.5\n\
            csms_other 7\n";
        assert_eq!(
            metric_sum(
                text,
                "csms_limit_triggered_total",
                &[("limit", "message_rate")]
            ),
            5.5
        );
        assert_eq!(metric_sum(text, "csms_limit_triggered_total", &[]), 6.5);
        assert_eq!(metric_sum(text, "csms_other", &[]), 7.0);
        assert_eq!(metric_sum(text, "csms_missing", &[]), 0.0);
    }

    #[test]
    fn labels_unescape() {
        assert_eq!(
            parse_labels(r#"a="x\"y",b="z""#),
            vec![("a".into(), "x\"y".into()), ("b".into(), "z".into())]
        );
    }

    #[test]
    fn http_parsing_handles_chunked() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let resp = parse_http_response(raw).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "hello world");
        assert_eq!(resp.header("content-type"), Some("text/plain"));
        let raw = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno";
        let resp = parse_http_response(raw).unwrap();
        assert_eq!((resp.status, resp.text().as_str()), (401, "no"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(4);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4);
    }
}
