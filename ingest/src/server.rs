//! Accepting chargers: TCP (or TLS) accept, then the WebSocket upgrade done by
//! hand so that every refusal (bad path, no subprotocol, bad credentials,
//! limits) is an HTTP answer at the upgrade, never a close after it, and so
//! that password checks and failed-attempt delays run asynchronously.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::Engine;
use percent_encoding::percent_decode_str;
use schemas::{Catalog, OcppVersion};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    admission::{Admission, AdmissionSlot},
    closer::Closer,
    config::Config,
    handlers::Handlers,
    limits::{AddressLimiter, record_limit},
    registry::{AuthDecision, Lookup, StationRegistry, validate_station_id},
    session::{self, Sessions},
    shared_auth::SharedAuth,
    status::StatusStore,
    wal::WalHandle,
    ws::WsConn,
};

/// Everything one ingest node shares between its connections.
pub struct Node {
    pub config: Arc<Config>,
    pub node_id: String,
    pub catalog: &'static Catalog,
    pub versions: Vec<OcppVersion>,
    pub stations: StationRegistry,
    /// Verifications shared with the other nodes (Redis and a secret set).
    pub shared_auth: Option<Arc<SharedAuth>>,
    pub handlers: Handlers,
    pub wal: WalHandle,
    pub status: StatusStore,
    pub sessions: Sessions,
    pub limiter: AddressLimiter,
    pub admission: Admission,
    /// Open connections, counted by their [`ConnGuard`]s.
    pub connections: Arc<AtomicUsize>,
    pub next_conn_id: AtomicU64,
    /// Closes the sockets of ended sessions (see [`crate::closer`]).
    pub closer: Closer,
}

const MAX_REQUEST_HEAD: usize = 8192;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` until `shutdown`, each on its own task.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    loop {
        // Bounded and paced while the node is saturated: a connection not
        // yet accepted waits in the kernel's queue, where it costs the node
        // nothing.
        let mut slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = node.admission.slot() => slot,
        };
        let wait = node.admission.admit_delay();
        if !wait.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        node.admission.hold_from_now(&mut slot);
        let node = node.clone();
        let tls = tls.clone();
        tokio::spawn(async move { accept_one(node, tcp, peer, tls, slot).await });
    }
}

/// Counts a connection from accept until its socket is closed, however its
/// session ends, and holds its admission slot until the session gives it
/// back. Holds the count, not the node: it is dropped with the socket on
/// the closer thread, where the node's last reference must not end up.
pub struct ConnGuard {
    connections: Arc<AtomicUsize>,
    pub(crate) slot: AdmissionSlot,
}

impl ConnGuard {
    /// Counts a new connection; returns the guard and the count with it.
    pub(crate) fn new(node: &Node, slot: AdmissionSlot) -> (Self, usize) {
        let count = node.connections.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("csms_connections").increment(1.0);
        let guard = ConnGuard {
            connections: node.connections.clone(),
            slot,
        };
        (guard, count)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("csms_connections").decrement(1.0);
    }
}

/// Upgrades one connection, then hands it to a session task of its own: the
/// session task is then sized for the session alone, not for the handshake
/// (nor, on plain TCP, for the TLS variant of this function).
async fn accept_one(
    node: Arc<Node>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    slot: AdmissionSlot,
) {
    let _ = tcp.set_nodelay(true);
    let (mut guard, count) = ConnGuard::new(&node, slot);
    if count > node.config.limits.max_connections {
        record_limit("connections");
        let mut tcp = tcp;
        let _ = write_refusal(&mut tcp, 503, "too many connections on this node").await;
        return;
    }
    match tls {
        None => {
            let upgraded = guard.slot.during(handshake(&node, tcp, peer, None)).await;
            if let Some((ws, up)) = upgraded {
                start_session(node, ws, up, guard);
            }
        }
        Some(acceptor) => {
            let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let stream = match guard.slot.during(accepted).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    metrics::counter!("csms_tls_handshake_failures_total").increment(1);
                    return;
                }
                Err(_) => return,
            };
            let cert_station = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::tls::station_from_client_cert(c.as_ref()));
            let upgraded = guard
                .slot
                .during(handshake(&node, stream, peer, cert_station))
                .await;
            if let Some((ws, up)) = upgraded {
                start_session(node, ws, up, guard);
            }
        }
    }
}

fn start_session<S>(node: Arc<Node>, ws: WsConn<S>, up: Upgrade, guard: ConnGuard)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(session::run(node, ws, up.station_id, up.version, guard));
}

/// An HTTP refusal at the upgrade.
#[derive(Debug)]
struct Refusal {
    status: u16,
    reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// What a valid upgrade request asked for.
struct Upgrade {
    station_id: String,
    version: OcppVersion,
    ws_key: String,
}

/// The HTTP upgrade: answers 101 and returns the WebSocket, or answers
/// the refusal and returns `None`.
async fn handshake<S>(
    node: &Arc<Node>,
    mut stream: S,
    peer: SocketAddr,
    cert_station: Option<String>,
) -> Option<(WsConn<S>, Upgrade)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (head_len, mut received) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut stream)).await {
            Ok(Ok(h)) => h,
            Ok(Err(r)) => {
                let _ = write_refusal(&mut stream, r.status, &r.reason).await;
                return None;
            }
            Err(_) => return None,
        };
    let upgrade = match check_upgrade(
        node,
        &received[..head_len],
        peer.ip(),
        cert_station.as_deref(),
    )
    .await
    {
        Ok(u) => u,
        Err(r) => {
            debug!(%peer, status = r.status, reason = %r.reason, "upgrade refused");
            metrics::counter!("csms_upgrades_refused_total", "status" => r.status.to_string())
                .increment(1);
            let _ = write_refusal(&mut stream, r.status, &r.reason).await;
            return None;
        }
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        derive_accept_key(upgrade.ws_key.as_bytes()),
        upgrade.version.subprotocol()
    );
    if stream.write_all(response.as_bytes()).await.is_err() || stream.flush().await.is_err() {
        return None;
    }
    // Frames the station sent right behind its request; usually none, and
    // then nothing stays allocated.
    let rest = if received.len() > head_len {
        received.drain(..head_len);
        received.shrink_to_fit();
        received
    } else {
        Vec::new()
    };
    let ws = WsConn::new(stream, rest, node.config.limits.max_frame_bytes);
    metrics::counter!("csms_upgrades_total", "version" => upgrade.version.as_str()).increment(1);
    info!(station = %upgrade.station_id, version = %upgrade.version, %peer, "station connected");
    Some((ws, upgrade))
}

/// Reads the HTTP request head; returns its length and every byte read so far.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(usize, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| refuse(400, "connection error"))?;
        if n == 0 {
            return Err(refuse(400, "connection closed during the request"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((pos + 4, buf));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Err(refuse(431, "request header too large"));
        }
    }
}

async fn check_upgrade(
    node: &Node,
    head: &[u8],
    ip: IpAddr,
    cert_station: Option<&str>,
) -> Result<Upgrade, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(refuse(400, "malformed HTTP request")),
    }
    if req.method != Some("GET") {
        return Err(refuse(405, "only GET upgrades are served here"));
    }
    if !node.limiter.allow_upgrade(ip) {
        record_limit("upgrade_rate");
        return Err(refuse(
            429,
            "too many connection attempts from this address",
        ));
    }
    if node.wal.over_budget() {
        record_limit("wal_budget");
        warn!(
            "refusing a new connection: the WAL is over its disk budget (the lake is not keeping up or unreachable)"
        );
        return Err(refuse(
            503,
            "node is catching up with its backlog, retry later",
        ));
    }
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let Some(rest) = path.strip_prefix("/ocpp/") else {
        return Err(refuse(404, "chargers connect to /ocpp/{stationId}"));
    };
    let raw_id = rest
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let station_id = percent_decode_str(raw_id)
        .decode_utf8()
        .map_err(|_| refuse(400, "station id is not valid UTF-8"))?
        .into_owned();
    validate_station_id(&station_id).map_err(|e| refuse(400, e.to_string()))?;

    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let is_upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
    let ws_key = header("sec-websocket-key")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string);
    let (true, Some(ws_key)) = (is_upgrade, ws_key) else {
        return Err(refuse(400, "expected a WebSocket upgrade request"));
    };
    let offered = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok());
    let allowed = station_versions(node, &station_id);
    let Some(version) = OcppVersion::negotiate(offered, &allowed) else {
        let names: Vec<&str> = allowed.iter().map(|v| v.subprotocol()).collect();
        return Err(refuse(
            400,
            format!(
                "no supported OCPP subprotocol offered (supported: {})",
                names.join(", ")
            ),
        ));
    };

    let authorization = header("authorization").map(|v| v.to_vec());
    authenticate(
        node,
        &station_id,
        authorization.as_deref(),
        ip,
        cert_station,
    )
    .await?;
    Ok(Upgrade {
        station_id,
        version,
        ws_key,
    })
}

fn station_versions(node: &Node, station: &str) -> Vec<OcppVersion> {
    let per_station = node.stations.get(station).and_then(|s| s.allowed_versions);
    match per_station {
        Some(list) => node
            .versions
            .iter()
            .copied()
            .filter(|v| list.iter().any(|s| s == v.as_str()))
            .collect(),
        None => node.versions.clone(),
    }
}

/// Security profiles: 3 (client certificate naming the station), 1/2 (Basic
/// auth, over ws or wss), or an unregistered station where that is allowed.
async fn authenticate(
    node: &Node,
    station: &str,
    authorization: Option<&[u8]>,
    ip: IpAddr,
    cert_station: Option<&str>,
) -> Result<(), Refusal> {
    let registered = node.stations.get(station).is_some();
    if let Some(cn) = cert_station {
        if cn != station {
            return Err(fail(node, ip, "client certificate names another station").await);
        }
        if registered || node.config.allow_unknown {
            node.limiter.record_auth_success(ip);
            return Ok(());
        }
        return Err(fail(node, ip, "unknown station").await);
    }
    if !registered {
        if node.config.allow_unknown {
            return Ok(());
        }
        return Err(fail(node, ip, "unknown station").await);
    }
    let Some((user, password)) = authorization.and_then(parse_basic) else {
        return Err(fail(node, ip, "HTTP Basic authentication required").await);
    };
    if user != station {
        return Err(fail(node, ip, "the Basic auth user must be the station id").await);
    }
    // Earlier failures from this address slow every further attempt.
    let delay = node.limiter.auth_delay(ip);
    if !delay.is_zero() {
        record_limit("auth_delay");
        tokio::time::sleep(delay).await;
    }
    let decision = check_password(node, station, password, VERIFY_QUEUE_TIMEOUT).await?;
    match decision {
        AuthDecision::Accepted => {
            node.limiter.record_auth_success(ip);
            Ok(())
        }
        AuthDecision::NoPasswordSet => Err(fail(
            node,
            ip,
            "this station authenticates with a client certificate",
        )
        .await),
        AuthDecision::UnknownStation => Err(fail(node, ip, "unknown station").await),
        AuthDecision::BadPassword => Err(fail(node, ip, "wrong password").await),
    }
}

/// How long a connection may wait for its password check (argon2) to start.
/// Past it the station is told to come back later (503): its own handshake
/// timeout is near, and a check nobody waits for any more is ~16 ms of a
/// core spent for nothing, which in a storm of first connections (a node
/// with a cold cache) lengthens the queue for everyone behind it.
const VERIFY_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Slots for argon2 runs, one per core, taken before a blocking thread is:
/// a connection that waits here can still be given up without hashing.
fn verify_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(crate::registry::hash_parallelism()))
}

/// The registry and this process's cache first, then the verifications
/// the other nodes shared, and argon2 only when neither knows the password
/// and a slot for it frees up within `queue_timeout`.
async fn check_password(
    node: &Node,
    station: &str,
    password: String,
    queue_timeout: Duration,
) -> Result<AuthDecision, Refusal> {
    let count = |via: &'static str| {
        metrics::counter!("csms_auth_verifications_total", "via" => via).increment(1);
    };
    let phc = match node.stations.lookup(station, &password) {
        Lookup::Decided(decision) => {
            if decision == AuthDecision::Accepted {
                count("cache");
            }
            return Ok(decision);
        }
        Lookup::Uncached { phc } => phc,
    };
    // With sharing on: the tag this password would have, if verified.
    let shared = node
        .shared_auth
        .as_deref()
        .map(|s| (s, s.tag(station, &phc, &password)));
    if let Some((s, tag)) = &shared
        && s.verified_elsewhere(station, tag).await
    {
        node.stations.remember_verified(station, &password, phc);
        count("shared");
        return Ok(AuthDecision::Accepted);
    }
    let Ok(Ok(slot)) = tokio::time::timeout(queue_timeout, verify_slots().acquire()).await else {
        record_limit("verify_queue");
        return Err(refuse(
            503,
            "too many password checks queued on this node; retry later",
        ));
    };
    let registry = node.stations.clone();
    let id = station.to_string();
    let decision = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        registry.verify_hash(&id, &password, phc)
    })
    .await
    .map_err(|_| refuse(500, "authentication failed internally"))?;
    if decision == AuthDecision::Accepted {
        count("argon2");
        if let Some((s, tag)) = shared {
            s.share(station, tag);
        }
    }
    Ok(decision)
}

async fn fail(node: &Node, ip: IpAddr, why: &str) -> Refusal {
    node.limiter.record_auth_failure(ip);
    metrics::counter!("csms_auth_failures_total").increment(1);
    let delay = node.limiter.auth_delay(ip);
    if !delay.is_zero() {
        record_limit("auth_delay");
        tokio::time::sleep(delay).await;
    }
    refuse(401, why)
}

fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, b64) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    // OCPP 1.6 security profile passwords may be raw bytes: accept UTF-8 only,
    // which covers the 2.x "passwordString" charset.
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

async fn write_refusal<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
) -> std::io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!("{reason}\n");
    let extra = if status == 401 {
        "WWW-Authenticate: Basic realm=\"csms\"\r\n"
    } else {
        ""
    };
    let resp = format!(
        "HTTP/1.1 {status} {text}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

/// A node on a temporary directory with default settings and the embedded
/// status store, for unit tests of the session and the HTTP API.
#[cfg(test)]
pub(crate) fn test_node(dir: &std::path::Path) -> (Arc<Node>, crate::wal::Wal) {
    use crate::{
        limits::AddressLimiter,
        registry::{DefaultPolicy, IdTokenRegistry, StationRegistry},
        txid::{FileAllocator, TxIdAllocator},
        wal::Wal,
    };
    let config = Arc::new(Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    });
    let (wal, wal_handle) = Wal::open(&dir.join("wal"), config.wal.clone()).unwrap();
    let node = Arc::new(Node {
        versions: config.versions(),
        limiter: AddressLimiter::new(&config.limits),
        node_id: "n1".into(),
        catalog: schemas::Catalog::global(),
        stations: StationRegistry::open(dir).unwrap(),
        shared_auth: None,
        handlers: crate::handlers::Handlers {
            ocpp: Arc::new(config.ocpp.clone()),
            tokens: IdTokenRegistry::open(dir, DefaultPolicy::AcceptAll).unwrap(),
            txids: TxIdAllocator::File(Arc::new(FileAllocator::open(dir).unwrap())),
            defer_boot: Arc::new(|| None),
        },
        admission: Admission::disabled(),
        wal: wal_handle,
        status: crate::status::StatusStore::embedded(),
        sessions: Default::default(),
        connections: Default::default(),
        next_conn_id: AtomicU64::new(1),
        closer: Closer::spawn().unwrap(),
        config,
    });
    (node, wal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that waits too long for an argon2 slot is refused
    /// (503) without hashing; with a slot free the same check succeeds.
    #[tokio::test]
    async fn password_checks_queued_too_long_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _wal) = test_node(dir.path());
        node.stations.add("CP-Q", Some("queued-password")).unwrap();
        let n = u32::try_from(crate::registry::hash_parallelism()).unwrap();
        let held = verify_slots().acquire_many(n).await.unwrap();
        let wait = Duration::from_millis(50);
        let refused = check_password(&node, "CP-Q", "queued-password".into(), wait)
            .await
            .unwrap_err();
        assert_eq!(refused.status, 503, "{}", refused.reason);
        drop(held);
        let ok = check_password(&node, "CP-Q", "queued-password".into(), wait).await;
        assert_eq!(ok.unwrap(), AuthDecision::Accepted);
    }

    #[test]
    fn basic_auth_parsing() {
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("CP1:s3cret:x")
        );
        assert_eq!(
            parse_basic(v.as_bytes()),
            Some(("CP1".into(), "s3cret:x".into()))
        );
        assert_eq!(parse_basic(b"Bearer abc"), None);
        assert_eq!(parse_basic(b"Basic !!!"), None);
    }
}
