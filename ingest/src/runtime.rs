//! Starting a node: open the WAL and the lake writer, the registries, bind the
//! listeners, and run until asked to stop. `csms serve` and `csms ingest`
//! are thin wrappers around [`start`].

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
};

use schemas::Catalog;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    admission::Admission,
    closer::Closer,
    config::{Config, ConfigError},
    handlers::Handlers,
    http::{self, ApiState},
    lake::LakeWriter,
    limits::AddressLimiter,
    registry::{DefaultPolicy, IdTokenRegistry, StationRegistry},
    server::{self, Node},
    shared_auth::SharedAuth,
    status::StatusStore,
    txid::{FileAllocator, TxIdAllocator},
    wal::Wal,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Component(String),
}

fn component(what: &str) -> impl Fn(&dyn std::fmt::Display) -> StartError + '_ {
    move |e| StartError::Component(format!("{what}: {e}"))
}

/// A started node: its bound addresses and the tasks to wait on.
pub struct Running {
    pub node: Arc<Node>,
    pub ocpp_addr: SocketAddr,
    pub ocpp_tls_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub shutdown: CancellationToken,
    /// Sends CSMS-initiated CALLs to stations on any node (the scheduler's
    /// command jobs use it, as the HTTP API does).
    pub router: crate::router::CommandRouter,
    tasks: Vec<JoinHandle<()>>,
    /// Resolves (to an error if it panicked) when the lake writer stopped.
    lake_stopped: tokio::sync::oneshot::Receiver<()>,
    _wal: Wal,
}

impl Running {
    /// Waits until shutdown is requested and the lake writer has flushed.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        for t in self.tasks {
            t.abort();
        }
        let _ = self.lake_stopped.await;
        if !self
            .node
            .status
            .flush(std::time::Duration::from_secs(5))
            .await
        {
            warn!("status updates still queued at shutdown (Redis unreachable?)");
        }
    }
}

/// Opens everything and starts serving. Nothing is accepted until the WAL and
/// the lake position are known, so no answer can precede durability.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, |_| axum::Router::new()).await
}

/// [`start`], with extra routes under `/api` built from the started node
/// (the root CLI adds SQL this way, so ingest never depends on query).
pub async fn start_with(
    config: Config,
    extra_api: impl FnOnce(&Arc<Node>) -> axum::Router,
) -> Result<Running, StartError> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ConfigError::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    let node_id = config.node_id()?;
    let lake_url = config.lake_url()?;
    let metrics = crate::metrics::install();
    let catalog = Catalog::global();

    let (wal, wal_handle) = Wal::open(&config.wal_dir(), config.wal.clone())
        .map_err(|e| component("write-ahead log")(&e))?;
    let (lake_writer, committed) = LakeWriter::open(
        &lake_url,
        &node_id,
        &config.wal_dir(),
        wal_handle.clone(),
        config.lake.clone(),
    )
    .await
    .map_err(|e| component("lake")(&e))?;
    info!(node = %node_id, lake = %lake_url, committed_seq = committed, "lake writer ready");

    let stations =
        StationRegistry::open(&config.data_dir).map_err(|e| component("station registry")(&e))?;
    let policy = if config.ocpp.default_token_policy == "reject" {
        DefaultPolicy::RejectUnknown
    } else {
        DefaultPolicy::AcceptAll
    };
    let tokens = IdTokenRegistry::open(&config.data_dir, policy)
        .map_err(|e| component("id token registry")(&e))?;
    let txids = match &config.redis_url {
        Some(url) => {
            let client =
                redis::Client::open(url.as_str()).map_err(|e| component("REDIS_URL")(&e))?;
            let conn = redis::aio::ConnectionManager::new(client)
                .await
                .map_err(|e| component("redis")(&e))?;
            TxIdAllocator::Redis(Arc::new(crate::txid::RedisAllocator::new(conn)))
        }
        None => TxIdAllocator::File(Arc::new(
            FileAllocator::open(&config.data_dir).map_err(|e| component("transaction ids")(&e))?,
        )),
    };
    let status = match &config.redis_url {
        Some(url) => StatusStore::redis(url, config.status.clone())
            .await
            .map_err(|e| component("status store")(&e))?,
        None => StatusStore::embedded(),
    };
    let shared_auth = SharedAuth::new(
        config.verification_secret.as_deref(),
        &status,
        std::time::Duration::from_secs(config.status.verification_ttl_secs),
    )
    .map(Arc::new);
    let admission = Admission::new(config.admission.clone());
    let (overload_wal, overload_admission) = (wal_handle.clone(), admission.clone());
    let pending_interval = config.ocpp.pending_interval_secs;
    let handlers = Handlers {
        ocpp: Arc::new(config.ocpp.clone()),
        tokens,
        txids,
        defer_boot: Arc::new(move || {
            if overload_wal.over_budget() {
                Some(pending_interval)
            } else {
                overload_admission.defer_boot()
            }
        }),
    };
    let node = Arc::new(Node {
        versions: config.versions(),
        limiter: AddressLimiter::new(&config.limits),
        admission: admission.clone(),
        config: config.clone(),
        node_id: node_id.clone(),
        catalog,
        stations,
        shared_auth,
        handlers,
        wal: wal_handle,
        status,
        sessions: Default::default(),
        connections: Default::default(),
        next_conn_id: AtomicU64::new(1),
        closer: Closer::spawn().map_err(|e| component("closer thread")(&e))?,
    });

    let shutdown = CancellationToken::new();
    let mut tasks = vec![tokio::spawn(admission.run_probe(shutdown.clone()))];
    let reuse_port = config.worker_index.is_some();
    let bind = |what: &'static str, addr: SocketAddr| async move {
        bind_listener(addr, reuse_port).map_err(|source| StartError::Bind { what, addr, source })
    };

    let ocpp = bind("OCPP", config.ocpp_addr).await?;
    if let Some(note) = somaxconn_note() {
        info!("{note}");
    }
    let ocpp_addr = ocpp.local_addr().map_err(|source| StartError::Bind {
        what: "OCPP",
        addr: config.ocpp_addr,
        source,
    })?;
    tasks.push(tokio::spawn(server::serve(
        node.clone(),
        ocpp,
        None,
        shutdown.clone(),
    )));

    let tls = crate::tls::server_config(&config.tls).map_err(|e| component("TLS")(&e))?;
    let ocpp_tls_addr = match tls {
        Some(tls) => {
            let l = bind("OCPP TLS", config.ocpp_tls_addr).await?;
            let addr = l.local_addr().map_err(|source| StartError::Bind {
                what: "OCPP TLS",
                addr: config.ocpp_tls_addr,
                source,
            })?;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            tasks.push(tokio::spawn(server::serve(
                node.clone(),
                l,
                Some(acceptor),
                shutdown.clone(),
            )));
            Some(addr)
        }
        None => None,
    };

    let admin_token = admin_token(&config)?;
    let http_listener = bind("HTTP", config.http_addr).await?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "HTTP",
            addr: config.http_addr,
            source,
        })?;
    let exec_node = node.clone();
    let execute = crate::router::execute_fn(move |station, action, payload| {
        let node = exec_node.clone();
        async move { crate::session::call(&node, &station, &action, payload).await }
    });
    let router = match &config.redis_url {
        Some(url) => crate::router::CommandRouter::redis(url, node_id.clone(), execute)
            .await
            .map_err(|e| component("command router")(&e))?,
        None => crate::router::CommandRouter::local(node_id.clone(), execute),
    };
    let extra = extra_api(&node);
    let app = http::router_with(
        ApiState {
            router: router.clone(),
            node: node.clone(),
            admin_token: admin_token.into(),
            metrics,
        },
        extra,
    );
    let http_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, app)
            .with_graceful_shutdown(http_shutdown.cancelled_owned())
            .await
        {
            warn!(error = %e, "HTTP server stopped");
        }
    }));

    // Now and then: forget idle per-address limiter entries, keep the
    // password verifications of connected stations fresh (see
    // `StationRegistry::refresh_verified`) and drop expired ones, and keep
    // their verifications shared with other nodes alive.
    let prune_node = node.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            prune_node.limiter.prune(std::time::Instant::now());
            for session in prune_node.sessions.iter() {
                prune_node.stations.refresh_verified(session.key());
            }
            prune_node.stations.prune_cache();
            if let Some(shared) = &prune_node.shared_auth
                && shared.refresh_due(std::time::Instant::now())
            {
                let held: Vec<String> = prune_node
                    .sessions
                    .iter()
                    .map(|s| s.key().clone())
                    .collect();
                shared.refresh(&held).await;
            }
        }
    }));

    let lake_stopped = spawn_lake_writer(lake_writer, shutdown.clone())
        .map_err(|e| StartError::Component(format!("starting the lake writer thread: {e}")))?;
    info!(%ocpp_addr, ?ocpp_tls_addr, %http_addr, node = %node_id, "csms node listening");
    Ok(Running {
        node,
        ocpp_addr,
        ocpp_tls_addr,
        http_addr,
        shutdown,
        router,
        tasks,
        lake_stopped,
        _wal: wal,
    })
}

/// Runs the lake writer on a runtime of its own, in a thread of its own.
/// Its work is CPU work (Parquet encoding, Delta commits, and with several
/// workers appending to bronze, conflict retries and log replays); on the
/// session runtime it would hold one of its few worker threads for the
/// length of a flush, and every station whose task sits behind it would
/// wait. Apart, the OS shares the cores and no session task is stuck behind
/// a flush; at a lower priority ([`LAKE_NICE`]) it also leaves them the
/// cores while they need them. A thread of its own rather than one of the
/// blocking pool, which would keep that priority for whatever it ran next.
/// The returned receiver resolves when the writer has stopped.
fn spawn_lake_writer(
    writer: LakeWriter,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("csms-lake")
        .build()?;
    let (stopped, lake_stopped) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("csms-lake".into())
        .spawn(move || {
            lower_thread_priority(LAKE_NICE);
            runtime.block_on(writer.run(shutdown));
            let _ = stopped.send(());
        })?;
    Ok(lake_stopped)
}

/// How much nicer than the node the lake writer's thread runs. A flush is a
/// burst of CPU (Parquet encoding: about half a second per 200,000-row
/// flush here); at the node's priority it took one of two cores from the
/// sessions, and at 20,000 CALLs/s every runtime queue over 1,000 tasks
/// deep fell in the half second before a commit (bench/README.md). Nice 10
/// gets about a tenth of a session thread's share while the cores are
/// contended and all idle CPU otherwise; the WAL holds what waits.
const LAKE_NICE: i32 = 10;

/// Raises the calling thread's nice value by `by` (Linux: priorities are
/// per thread, and threads it spawns inherit them). Returns the new value,
/// or `None` (logged) if the OS refused.
fn lower_thread_priority(by: i32) -> Option<i32> {
    let tid = Some(rustix::thread::gettid());
    let result = rustix::process::getpriority_process(tid).and_then(|nice| {
        let lower = (nice + by).min(19);
        rustix::process::setpriority_process(tid, lower).map(|()| lower)
    });
    match result {
        Ok(nice) => Some(nice),
        Err(e) => {
            warn!(error = %e, "could not lower the lake writer's priority; it competes with sessions for CPU");
            None
        }
    }
}

/// The accept queue asked for; Linux's maximum.
const LISTEN_BACKLOG: i32 = 65_535;

/// A line for the log when the kernel caps the accept queue below
/// [`LISTEN_BACKLOG`] (Linux's default `somaxconn` is 4096): a fleet that
/// reconnects at once then loses SYNs past that many waiting connections.
fn somaxconn_note() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok()?;
    let cap: i32 = text.trim().parse().ok()?;
    (cap < LISTEN_BACKLOG).then(|| {
        format!(
            "net.core.somaxconn = {cap} caps the OCPP accept queue at {cap} connections; \
             raise it (sysctl -w net.core.somaxconn={LISTEN_BACKLOG}) to absorb reconnect storms"
        )
    })
}

/// A listening socket; workers of one `csms serve --workers N` share their
/// ports through SO_REUSEPORT, so the kernel spreads connections over them.
pub fn bind_listener(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // A deep backlog absorbs the reconnect storm after an outage: while
    // admission control paces accepts, connections wait in it instead of
    // having their SYNs dropped (retried by TCP only after 1, 3, 7, 15 s).
    // The kernel caps it at net.core.somaxconn (see `somaxconn_note`).
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The admin token: configured, or generated once into `$data_dir/admin_token`
/// (readable by the owner only) so the API works out of the box.
pub fn admin_token(config: &Config) -> Result<String, StartError> {
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    let path = config.data_dir.join("admin_token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_string());
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    write_private(&path, &token).map_err(|source| ConfigError::Io {
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "generated an admin token (set CSMS_ADMIN_TOKEN to choose one)");
    Ok(token)
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lake_thread_priority_is_lowered() {
        // A thread of its own: lowering nice again would need privilege.
        std::thread::spawn(|| {
            let tid = Some(rustix::thread::gettid());
            let before = rustix::process::getpriority_process(tid).unwrap();
            let reported = lower_thread_priority(3).expect("raising nice needs no privilege");
            assert_eq!(reported, (before + 3).min(19));
            let now = rustix::process::getpriority_process(tid).unwrap();
            assert_eq!(now, (before + 3).min(19));
        })
        .join()
        .unwrap();
    }
}
