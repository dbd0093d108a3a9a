//! Remote commands across nodes. A back-office command may arrive at any node,
//! but only the node holding the station's socket can send the CALL. The
//! router runs it locally when this node holds the socket (or nobody is known
//! to), and otherwise publishes a request on the holder's Redis channel
//! `csms:cmd:{node}` and waits for the answer on this node's reply channel
//! `csms:reply:{node}`.
//!
//! Each node keeps ONE subscription (both of its channels), matched to
//! waiting callers by request id, rather than one per request: subscribing
//! costs a round trip and a connection. Pub/sub has no backlog, so `PUBLISH`
//! answering 0 receivers means no node is listening for that holder: the
//! station is not reachable (`NotConnected`), not "maybe later".
//!
//! Which node holds a station is an input ([`PresenceLookup`] or the `holder`
//! argument of [`CommandRouter::call`]), so the router does not depend on the
//! status store's internals.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use dashmap::DashMap;
use futures_util::{StreamExt, future::BoxFuture};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::session::{CallAnswer, CallFailure};

/// Runs a command against a station connected to THIS node (in production a
/// closure around `session::call`): station, action, payload.
pub type Execute = Arc<
    dyn Fn(String, String, Value) -> BoxFuture<'static, Result<CallAnswer, CallFailure>>
        + Send
        + Sync,
>;

/// Wraps an async closure as an [`Execute`], e.g.
/// `execute_fn(move |s, a, p| { let n = node.clone(); async move { session::call(&n, &s, &a, p).await } })`.
pub fn execute_fn<F, Fut>(f: F) -> Execute
where
    F: Fn(String, String, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<CallAnswer, CallFailure>> + Send + 'static,
{
    Arc::new(move |station, action, payload| Box::pin(f(station, action, payload)))
}

/// "Which node holds station X's socket?" (None: not connected anywhere we
/// know of). Implemented for closures `Fn(String) -> BoxFuture<Option<String>>`
/// so the status store can be plugged in without the router knowing it.
pub trait PresenceLookup: Send + Sync {
    fn holder(&self, station: &str) -> BoxFuture<'static, Option<String>>;
}

impl<F> PresenceLookup for F
where
    F: Fn(String) -> BoxFuture<'static, Option<String>> + Send + Sync,
{
    fn holder(&self, station: &str) -> BoxFuture<'static, Option<String>> {
        self(station.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid REDIS_URL for the command router: {0}")]
    Url(#[source] redis::RedisError),
    #[error("command router cannot reach Redis: {0}")]
    Connect(#[source] redis::RedisError),
}

/// The channel on which `node` receives command requests.
pub fn command_channel(node: &str) -> String {
    format!("csms:cmd:{node}")
}

/// The channel on which `node` receives the answers to its requests.
pub fn reply_channel(node: &str) -> String {
    format!("csms:reply:{node}")
}

/// A command sent to the node holding the station.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRequest {
    /// Request id (UUID v4), echoed in the reply.
    pub id: String,
    /// The sending node (for logs).
    pub from: String,
    pub station: String,
    pub action: String,
    pub payload: Value,
    /// Where to publish the [`CommandReply`].
    pub reply_to: String,
    /// Time the caller still waits, counted from delivery: pub/sub delivers
    /// at once or never, and a relative budget is immune to clock skew
    /// between nodes. The executing node gives up after it.
    pub timeout_ms: u64,
}

/// The answer to a [`CommandRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    pub id: String,
    pub outcome: ReplyOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    Answer(WireAnswer),
    Failure(WireFailure),
}

/// Serialisable mirror of [`CallAnswer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireAnswer {
    Result {
        payload: Value,
    },
    Error {
        code: String,
        description: String,
        details: Value,
    },
}

/// Serialisable mirror of [`CallFailure`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireFailure {
    NotConnected { station: String },
    UnknownAction { action: String, version: String },
    InvalidPayload { action: String, reason: String },
    Timeout { ms: u64 },
    Disconnected,
    Busy,
    Wal { reason: String },
}

impl From<CallAnswer> for WireAnswer {
    fn from(a: CallAnswer) -> Self {
        match a {
            CallAnswer::Result(payload) => WireAnswer::Result { payload },
            CallAnswer::Error {
                code,
                description,
                details,
            } => WireAnswer::Error {
                code,
                description,
                details,
            },
        }
    }
}

impl From<WireAnswer> for CallAnswer {
    fn from(a: WireAnswer) -> Self {
        match a {
            WireAnswer::Result { payload } => CallAnswer::Result(payload),
            WireAnswer::Error {
                code,
                description,
                details,
            } => CallAnswer::Error {
                code,
                description,
                details,
            },
        }
    }
}

impl From<CallFailure> for WireFailure {
    fn from(f: CallFailure) -> Self {
        match f {
            CallFailure::NotConnected(station) => WireFailure::NotConnected { station },
            CallFailure::UnknownAction { action, version } => WireFailure::UnknownAction {
                action,
                version: version.as_str().to_string(),
            },
            CallFailure::InvalidPayload { action, reason } => {
                WireFailure::InvalidPayload { action, reason }
            }
            CallFailure::Timeout(d) => WireFailure::Timeout {
                ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            },
            CallFailure::Disconnected => WireFailure::Disconnected,
            CallFailure::Busy => WireFailure::Busy,
            CallFailure::Wal(reason) => WireFailure::Wal { reason },
        }
    }
}

impl From<WireFailure> for CallFailure {
    fn from(f: WireFailure) -> Self {
        match f {
            WireFailure::NotConnected { station } => CallFailure::NotConnected(station),
            WireFailure::UnknownAction { action, version } => {
                match schemas::OcppVersion::parse(&version) {
                    Some(version) => CallFailure::UnknownAction { action, version },
                    // A newer node speaking a version this one does not know:
                    // still a refusal of the action, so still a client error.
                    None => CallFailure::InvalidPayload {
                        reason: format!(
                            "{action} is not a CSMS-initiated action of OCPP {version}"
                        ),
                        action,
                    },
                }
            }
            WireFailure::InvalidPayload { action, reason } => {
                CallFailure::InvalidPayload { action, reason }
            }
            WireFailure::Timeout { ms } => CallFailure::Timeout(Duration::from_millis(ms)),
            WireFailure::Disconnected => CallFailure::Disconnected,
            WireFailure::Busy => CallFailure::Busy,
            WireFailure::Wal { reason } => CallFailure::Wal(reason),
        }
    }
}

impl From<Result<CallAnswer, CallFailure>> for ReplyOutcome {
    fn from(r: Result<CallAnswer, CallFailure>) -> Self {
        match r {
            Ok(a) => ReplyOutcome::Answer(a.into()),
            Err(f) => ReplyOutcome::Failure(f.into()),
        }
    }
}

impl From<ReplyOutcome> for Result<CallAnswer, CallFailure> {
    fn from(o: ReplyOutcome) -> Self {
        match o {
            ReplyOutcome::Answer(a) => Ok(a.into()),
            ReplyOutcome::Failure(f) => Err(f.into()),
        }
    }
}

type Waiters = DashMap<String, oneshot::Sender<Result<CallAnswer, CallFailure>>>;

/// What the subscription task shares with the callers.
struct Shared {
    node_id: String,
    execute: Execute,
    publisher: ConnectionManager,
    cmd_channel: String,
    reply_channel: String,
    waiters: Waiters,
}

struct Inner {
    node_id: String,
    execute: Execute,
    remote: Option<Arc<Shared>>,
    listener: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = &self.listener {
            t.abort();
        }
    }
}

/// Routes back-office commands to the node holding the station. Cheap to
/// clone; the subscription task stops when the last clone is dropped.
#[derive(Clone)]
pub struct CommandRouter {
    inner: Arc<Inner>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the subscription is pinged, so that a silently dead connection
/// (no RST, e.g. a failover behind a proxy) is noticed and replaced.
const PING_EVERY: Duration = Duration::from_secs(10);

impl CommandRouter {
    /// Local-only router (no Redis): every command runs on this node.
    pub fn local(node_id: String, execute: Execute) -> Self {
        CommandRouter {
            inner: Arc::new(Inner {
                node_id,
                execute,
                remote: None,
                listener: None,
            }),
        }
    }

    /// Subscribes to this node's command and reply channels and starts the
    /// task that runs incoming requests with `execute` and publishes their
    /// answers. Fails if Redis cannot be reached now; later outages are
    /// survived by resubscribing with backoff.
    ///
    /// A Redis Cluster URL (as the status store accepts) is served through
    /// its first node: every router subscribes and publishes there, so
    /// PUBLISH's receiver count (how "not connected" is told) stays exact,
    /// which it is not across cluster nodes.
    pub async fn redis(url: &str, node_id: String, execute: Execute) -> Result<Self, RouterError> {
        let single = match crate::status::cluster_nodes(url) {
            Ok(Some(nodes)) => nodes.into_iter().next().unwrap_or_default(),
            _ => url.to_string(),
        };
        let client = redis::Client::open(single.as_str()).map_err(RouterError::Url)?;
        let publisher = ConnectionManager::new(client.clone())
            .await
            .map_err(RouterError::Connect)?;
        let shared = Arc::new(Shared {
            node_id: node_id.clone(),
            execute: execute.clone(),
            publisher,
            cmd_channel: command_channel(&node_id),
            reply_channel: reply_channel(&node_id),
            waiters: DashMap::new(),
        });
        let first = subscribe(&client, &shared)
            .await
            .map_err(RouterError::Connect)?;
        info!(node = %node_id, channel = %shared.cmd_channel, "command router subscribed");
        let listener = tokio::spawn(listen(client, shared.clone(), first));
        Ok(CommandRouter {
            inner: Arc::new(Inner {
                node_id,
                execute,
                remote: Some(shared),
                listener: Some(listener),
            }),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Looks the holder up with `presence`, then [`Self::call`]s.
    pub async fn route(
        &self,
        presence: &dyn PresenceLookup,
        station: &str,
        action: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<CallAnswer, CallFailure> {
        let holder = presence.holder(station).await;
        self.call(holder, station, action, payload, timeout).await
    }

    /// Sends a command for `station`. `holder` is the node holding its socket
    /// (from the presence lookup): this node or `None` runs it here via
    /// `execute` (which answers `NotConnected` if the station is not here
    /// either); another node gets it over Redis. Waiting is bounded by
    /// `timeout` (→ `Timeout`); a holder nobody listens for → `NotConnected`;
    /// Redis unreachable → `Disconnected` (logged), since no variant of
    /// [`CallFailure`] says "the other node could not be reached".
    pub async fn call(
        &self,
        holder: Option<String>,
        station: &str,
        action: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<CallAnswer, CallFailure> {
        let started = Instant::now();
        let (route, result) = match (&self.inner.remote, holder) {
            (Some(shared), Some(holder)) if holder != self.inner.node_id => (
                "remote",
                call_remote(shared, &holder, station, action, payload, timeout).await,
            ),
            _ => {
                let fut = (self.inner.execute)(station.to_string(), action.to_string(), payload);
                (
                    "local",
                    tokio::time::timeout(timeout, fut)
                        .await
                        .unwrap_or(Err(CallFailure::Timeout(timeout))),
                )
            }
        };
        metrics::counter!("csms_commands_routed_total", "route" => route, "outcome" => outcome_label(&result))
            .increment(1);
        metrics::histogram!("csms_command_route_seconds", "route" => route)
            .record(started.elapsed().as_secs_f64());
        result
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.inner.remote.as_ref().map_or(0, |s| s.waiters.len())
    }
}

fn outcome_label(r: &Result<CallAnswer, CallFailure>) -> &'static str {
    match r {
        Ok(CallAnswer::Result(_)) => "result",
        Ok(CallAnswer::Error { .. }) => "call_error",
        Err(CallFailure::NotConnected(_)) => "not_connected",
        Err(CallFailure::Timeout(_)) => "timeout",
        Err(CallFailure::UnknownAction { .. } | CallFailure::InvalidPayload { .. }) => "invalid",
        Err(CallFailure::Busy) => "busy",
        Err(CallFailure::Disconnected) => "disconnected",
        Err(CallFailure::Wal(_)) => "wal",
    }
}

/// Removes a caller's waiter however the call ends (answer, timeout, or the
/// HTTP request being dropped), so the map cannot grow.
struct WaiterGuard<'a> {
    waiters: &'a Waiters,
    id: &'a str,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.waiters.remove(self.id);
    }
}

async fn call_remote(
    shared: &Shared,
    holder: &str,
    station: &str,
    action: &str,
    payload: Value,
    timeout: Duration,
) -> Result<CallAnswer, CallFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let id = uuid::Uuid::new_v4().to_string();
    let request = CommandRequest {
        id: id.clone(),
        from: shared.node_id.clone(),
        station: station.to_string(),
        action: action.to_string(),
        payload,
        reply_to: shared.reply_channel.clone(),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    let text = serde_json::to_string(&request).expect("a JSON value always serialises");
    // Registered before publishing: the reply may beat PUBLISH's own answer.
    let (tx, rx) = oneshot::channel();
    shared.waiters.insert(id.clone(), tx);
    let _guard = WaiterGuard {
        waiters: &shared.waiters,
        id: &id,
    };
    let channel = command_channel(holder);
    let mut conn = shared.publisher.clone();
    let published = tokio::time::timeout_at(
        deadline,
        redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(&text)
            .query_async::<i64>(&mut conn),
    )
    .await;
    match published {
        Err(_) => return Err(CallFailure::Timeout(timeout)),
        Ok(Err(e)) => {
            warn!(station, holder, error = %e, "cannot publish a command to Redis");
            return Err(CallFailure::Disconnected);
        }
        Ok(Ok(0)) => {
            debug!(
                station,
                holder, "no node listens for the holder: not connected"
            );
            return Err(CallFailure::NotConnected(station.to_string()));
        }
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(result)) => result,
        // The sender is dropped only if the router shuts down meanwhile.
        Ok(Err(_)) => Err(CallFailure::Disconnected),
        Err(_) => Err(CallFailure::Timeout(timeout)),
    }
}

async fn subscribe(
    client: &redis::Client,
    shared: &Shared,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&shared.cmd_channel).await?;
    pubsub.subscribe(&shared.reply_channel).await?;
    Ok(pubsub)
}

/// Reads the subscription until it breaks, then resubscribes with backoff,
/// forever (the task is aborted when the router is dropped). Requests sent
/// to this node while it is unsubscribed see 0 receivers: `NotConnected`.
async fn listen(client: redis::Client, shared: Arc<Shared>, first: redis::aio::PubSub) {
    let mut next = Some(first);
    let mut backoff = BACKOFF_MIN;
    loop {
        let pubsub = match next.take() {
            Some(p) => p,
            None => match subscribe(&client, &shared).await {
                Ok(p) => {
                    info!(node = %shared.node_id, "command router resubscribed");
                    backoff = BACKOFF_MIN;
                    p
                }
                Err(e) => {
                    warn!(node = %shared.node_id, error = %e, retry_in = ?backoff, "command router cannot resubscribe");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => dispatch(&shared, &msg),
                    None => break,
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(PING_EVERY, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            debug!(error = %e, "command router ping failed");
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        warn!(node = %shared.node_id, "command router lost its Redis subscription; resubscribing");
        metrics::counter!("csms_router_resubscribes_total").increment(1);
        tokio::time::sleep(backoff).await;
    }
}

fn dispatch(shared: &Arc<Shared>, msg: &redis::Msg) {
    let channel = msg.get_channel_name();
    let body = msg.get_payload_bytes();
    if channel == shared.reply_channel {
        match serde_json::from_slice::<CommandReply>(body) {
            Ok(reply) => match shared.waiters.remove(&reply.id) {
                Some((_, tx)) => {
                    let _ = tx.send(reply.outcome.into());
                }
                None => debug!(id = %reply.id, "reply for a request no longer waited for"),
            },
            Err(e) => warn!(error = %e, "malformed command reply on {channel}"),
        }
    } else if channel == shared.cmd_channel {
        match serde_json::from_slice::<CommandRequest>(body) {
            Ok(request) => {
                tokio::spawn(serve_request(shared.clone(), request));
            }
            Err(e) => warn!(error = %e, "malformed command request on {channel}"),
        }
    }
}

/// Runs a request from another node and publishes the answer, within the
/// caller's time budget (no point answering someone who stopped waiting).
async fn serve_request(shared: Arc<Shared>, req: CommandRequest) {
    metrics::counter!("csms_commands_served_total").increment(1);
    debug!(id = %req.id, from = %req.from, station = %req.station, action = %req.action, "command from another node");
    let budget = Duration::from_millis(req.timeout_ms);
    let fut = (shared.execute)(req.station.clone(), req.action.clone(), req.payload);
    let result = tokio::time::timeout(budget, fut)
        .await
        .unwrap_or(Err(CallFailure::Timeout(budget)));
    let reply = CommandReply {
        id: req.id,
        outcome: result.into(),
    };
    let text = serde_json::to_string(&reply).expect("a JSON value always serialises");
    let mut conn = shared.publisher.clone();
    let sent = tokio::time::timeout(
        BACKOFF_MAX,
        redis::cmd("PUBLISH")
            .arg(&req.reply_to)
            .arg(text)
            .query_async::<i64>(&mut conn),
    )
    .await;
    match sent {
        Ok(Ok(0)) => debug!(reply_to = %req.reply_to, "nobody waits for this reply any more"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, reply_to = %req.reply_to, "cannot publish a command reply"),
        Err(_) => warn!(reply_to = %req.reply_to, "publishing a command reply timed out"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::FutureExt;
    use serde_json::json;

    use super::*;
    use crate::test_redis::RedisServer;

    /// An execute closure that answers with the node's name and what it got,
    /// counting its runs; special actions sleep or fail.
    fn executor(node: &'static str, runs: Arc<AtomicUsize>) -> Execute {
        execute_fn(move |station: String, action: String, payload: Value| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                match action.as_str() {
                    "Slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        Ok(CallAnswer::Result(json!({})))
                    }
                    "Busy" => Err(CallFailure::Busy),
                    "Unknown" => Err(CallFailure::UnknownAction {
                        action,
                        version: schemas::OcppVersion::V201,
                    }),
                    "Refuse" => Ok(CallAnswer::Error {
                        code: "NotSupported".into(),
                        description: "no".into(),
                        details: json!({"why": station}),
                    }),
                    _ => Ok(CallAnswer::Result(json!({
                        "node": node, "station": station, "action": action, "payload": payload,
                    }))),
                }
            }
        })
    }

    struct Pair {
        a: CommandRouter,
        b: CommandRouter,
        a_runs: Arc<AtomicUsize>,
        b_runs: Arc<AtomicUsize>,
    }

    async fn pair(redis: &RedisServer) -> Pair {
        let (a_runs, b_runs) = (Arc::default(), Arc::default());
        let a = CommandRouter::redis(&redis.url(), "A".into(), executor("A", Arc::clone(&a_runs)))
            .await
            .unwrap();
        let b = CommandRouter::redis(&redis.url(), "B".into(), executor("B", Arc::clone(&b_runs)))
            .await
            .unwrap();
        Pair {
            a,
            b,
            a_runs,
            b_runs,
        }
    }

    const T: Duration = Duration::from_secs(5);

    /// A cluster URL (the status store's forms) routes through its first node.
    #[tokio::test]
    async fn cluster_urls_route_through_the_first_node() {
        let redis = RedisServer::start_cluster();
        let url = format!("redis+cluster://127.0.0.1:{}", redis.port);
        let list = format!("{},{}", redis.url(), redis.url());
        let b_runs = Arc::default();
        let a = CommandRouter::redis(&url, "A".into(), executor("A", Arc::default()))
            .await
            .unwrap();
        let _b = CommandRouter::redis(&list, "B".into(), executor("B", Arc::clone(&b_runs)))
            .await
            .unwrap();
        let got = a.call(Some("B".into()), "CP1", "Reset", json!({}), T).await;
        assert!(matches!(got, Ok(CallAnswer::Result(_))), "{got:?}");
        assert_eq!(b_runs.load(Ordering::SeqCst), 1);
        let none = a.call(Some("C".into()), "CP1", "Reset", json!({}), T).await;
        assert!(
            matches!(none, Err(CallFailure::NotConnected(_))),
            "{none:?}"
        );
    }

    #[tokio::test]
    async fn command_reaches_the_holding_node_and_its_answer_comes_back() {
        let redis = RedisServer::start();
        let p = pair(&redis).await;
        let payload = json!({"connectorId": 1, "idTag": "TAG1"});
        let got =
            p.a.call(
                Some("B".into()),
                "CP1",
                "RemoteStartTransaction",
                payload.clone(),
                T,
            )
            .await;
        assert_eq!(
            got,
            Ok(CallAnswer::Result(json!({
                "node": "B", "station": "CP1", "action": "RemoteStartTransaction", "payload": payload,
            })))
        );
        assert_eq!(p.b_runs.load(Ordering::SeqCst), 1);
        assert_eq!(p.a_runs.load(Ordering::SeqCst), 0);
        // And the other way round, concurrently, many at once.
        let calls = (0..20).map(|i| {
            let b = p.b.clone();
            async move {
                b.call(
                    Some("A".into()),
                    &format!("CP{i}"),
                    "Reset",
                    json!({"i": i}),
                    T,
                )
                .await
            }
        });
        for (i, r) in futures_util::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            let Ok(CallAnswer::Result(v)) = r else {
                panic!("call {i}: {r:?}")
            };
            assert_eq!(
                (v["node"].as_str(), v["payload"]["i"].as_u64()),
                (Some("A"), Some(i as u64))
            );
        }
        assert_eq!(p.a_runs.load(Ordering::SeqCst), 20);
        assert_eq!((p.a.waiting(), p.b.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn remote_errors_and_failures_come_back_intact() {
        let redis = RedisServer::start();
        let p = pair(&redis).await;
        let b = Some("B".to_string());
        assert_eq!(
            p.a.call(b.clone(), "CP1", "Busy", json!({}), T).await,
            Err(CallFailure::Busy)
        );
        assert_eq!(
            p.a.call(b.clone(), "CP1", "Unknown", json!({}), T).await,
            Err(CallFailure::UnknownAction {
                action: "Unknown".into(),
                version: schemas::OcppVersion::V201
            })
        );
        assert_eq!(
            p.a.call(b, "CP9", "Refuse", json!({}), T).await,
            Ok(CallAnswer::Error {
                code: "NotSupported".into(),
                description: "no".into(),
                details: json!({"why": "CP9"}),
            })
        );
    }

    #[tokio::test]
    async fn slow_holder_times_out_and_forgets_the_waiter() {
        let redis = RedisServer::start();
        let p = pair(&redis).await;
        let started = Instant::now();
        let timeout = Duration::from_millis(300);
        let got =
            p.a.call(Some("B".into()), "CP1", "Slow", json!({}), timeout)
                .await;
        assert_eq!(got, Err(CallFailure::Timeout(timeout)));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(p.b_runs.load(Ordering::SeqCst), 1);
        assert_eq!(p.a.waiting(), 0);
    }

    #[tokio::test]
    async fn holder_without_a_subscriber_is_not_connected() {
        let redis = RedisServer::start();
        let p = pair(&redis).await;
        let got =
            p.a.call(Some("C".into()), "CP1", "Reset", json!({}), T)
                .await;
        assert_eq!(got, Err(CallFailure::NotConnected("CP1".into())));
        assert_eq!(
            p.a_runs.load(Ordering::SeqCst) + p.b_runs.load(Ordering::SeqCst),
            0
        );
        // A node that has gone away stops receiving too.
        drop(p.b);
        let mut last = Ok(CallAnswer::Result(Value::Null));
        for _ in 0..50 {
            last =
                p.a.call(Some("B".into()), "CP1", "Reset", json!({}), T)
                    .await;
            if last == Err(CallFailure::NotConnected("CP1".into())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(last, Err(CallFailure::NotConnected("CP1".into())));
    }

    #[tokio::test]
    async fn own_or_unknown_holder_runs_locally() {
        let redis = RedisServer::start();
        let p = pair(&redis).await;
        for holder in [Some("A".to_string()), None] {
            let got = p.a.call(holder, "CP1", "Reset", json!({}), T).await;
            let Ok(CallAnswer::Result(v)) = got else {
                panic!("{got:?}")
            };
            assert_eq!(v["node"], "A");
        }
        assert_eq!(
            (
                p.a_runs.load(Ordering::SeqCst),
                p.b_runs.load(Ordering::SeqCst)
            ),
            (2, 0)
        );
        // A local call is bounded by the timeout as well.
        assert_eq!(
            p.a.call(None, "CP1", "Slow", json!({}), Duration::from_millis(100))
                .await,
            Err(CallFailure::Timeout(Duration::from_millis(100)))
        );
    }

    #[tokio::test]
    async fn local_router_never_needs_redis() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = CommandRouter::local("solo".into(), executor("solo", runs.clone()));
        assert_eq!(r.node_id(), "solo");
        for holder in [Some("other".to_string()), Some("solo".into()), None] {
            let got = r.call(holder, "CP1", "Reset", json!({}), T).await;
            let Ok(CallAnswer::Result(v)) = got else {
                panic!("{got:?}")
            };
            assert_eq!(v["node"], "solo");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn route_uses_the_presence_lookup() {
        let redis = RedisServer::start();
        let p = pair(&redis).await;
        let lookup = |station: String| -> BoxFuture<'static, Option<String>> {
            async move { (station == "on-b").then(|| "B".to_string()) }.boxed()
        };
        let got = p.a.route(&lookup, "on-b", "Reset", json!({}), T).await;
        assert!(
            matches!(got, Ok(CallAnswer::Result(ref v)) if v["node"] == "B"),
            "{got:?}"
        );
        let got = p.a.route(&lookup, "elsewhere", "Reset", json!({}), T).await;
        assert!(
            matches!(got, Ok(CallAnswer::Result(ref v)) if v["node"] == "A"),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn survives_a_redis_restart() {
        let mut redis = RedisServer::start();
        let p = pair(&redis).await;
        let b = Some("B".to_string());
        assert!(
            p.a.call(b.clone(), "CP1", "Reset", json!({}), T)
                .await
                .is_ok()
        );
        redis.restart();
        // Both nodes resubscribe (backoff starts at 100 ms); until then the
        // calls fail cleanly instead of hanging.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got =
                p.a.call(b.clone(), "CP1", "Reset", json!({}), Duration::from_secs(1))
                    .await;
            if matches!(got, Ok(CallAnswer::Result(ref v)) if v["node"] == "B") {
                break;
            }
            assert!(
                matches!(
                    got,
                    Err(CallFailure::NotConnected(_)
                        | CallFailure::Disconnected
                        | CallFailure::Timeout(_))
                ),
                "{got:?}"
            );
            assert!(
                Instant::now() < deadline,
                "no recovery after the restart: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(p.a.waiting(), 0);
    }

    #[test]
    fn wire_types_round_trip_every_variant() {
        let cases: Vec<Result<CallAnswer, CallFailure>> = vec![
            Ok(CallAnswer::Result(json!({"status": "Accepted"}))),
            Ok(CallAnswer::Error {
                code: "InternalError".into(),
                description: "d".into(),
                details: json!({}),
            }),
            Err(CallFailure::NotConnected("CP1".into())),
            Err(CallFailure::UnknownAction {
                action: "X".into(),
                version: schemas::OcppVersion::V16,
            }),
            Err(CallFailure::InvalidPayload {
                action: "Reset".into(),
                reason: "r".into(),
            }),
            Err(CallFailure::Timeout(Duration::from_millis(1500))),
            Err(CallFailure::Disconnected),
            Err(CallFailure::Busy),
            Err(CallFailure::Wal("disk".into())),
        ];
        for case in cases {
            let reply = CommandReply {
                id: "1".into(),
                outcome: case.clone().into(),
            };
            let text = serde_json::to_string(&reply).unwrap();
            let back: CommandReply = serde_json::from_str(&text).unwrap();
            assert_eq!(
                Result::<CallAnswer, CallFailure>::from(back.outcome),
                case,
                "{text}"
            );
        }
        let v = serde_json::to_value(CommandReply {
            id: "x".into(),
            outcome: Ok(CallAnswer::Result(json!({"status": "Accepted"}))).into(),
        })
        .unwrap();
        assert_eq!(
            v,
            json!({"id": "x", "outcome": {"answer": {"kind": "result", "payload": {"status": "Accepted"}}}})
        );
        // A version this node does not know still reads as a refusal.
        let f: CallFailure = WireFailure::UnknownAction {
            action: "Y".into(),
            version: "9.9".into(),
        }
        .into();
        assert!(matches!(f, CallFailure::InvalidPayload { .. }), "{f:?}");
    }
}
