//! One task per connected station: read a frame, validate it, make it and
//! its answer durable in the WAL, then answer. The same task sends
//! CSMS-initiated CALLs (one outstanding at a time, as OCPP-J requires),
//! matches their answers by message id, and pings the socket so that dead
//! connections are noticed.
//!
//! Memory per idle station is what limits a node (100,000 chargers mostly
//! wait minutes between messages), so the task is kept small while it
//! waits: the socket holds no buffer between messages ([`crate::ws`]), the
//! work done for a message runs in a future boxed only while it runs, one
//! timer serves both the ping and the CALL deadline, and commands arrive
//! through a mailbox that allocates nothing until used.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::Utc;
use dashmap::DashMap;
use parking_lot::Mutex;
use schemas::{ErrorKind, Frame, MessageType, OcppVersion, adapter, events::CoreEvent};
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Notify, oneshot},
};
use tracing::{debug, info, warn};

use crate::{
    limits::{BadFrameCounter, TokenBucket, record_limit},
    server::{ConnGuard, Node},
    status::ConnectorStatus,
    wal::{Direction, WalRecord},
    ws::{self, Incoming, WsConn, WsError},
};

/// The live sessions of this node, by station id.
pub type Sessions = Arc<DashMap<String, SessionHandle>>;

/// How other tasks reach a session.
#[derive(Clone)]
pub struct SessionHandle {
    pub conn_id: u64,
    pub version: OcppVersion,
    mailbox: Arc<Mailbox>,
}

/// Commands waiting for a session beyond this many are refused as Busy.
const MAILBOX_CAPACITY: usize = 16;
/// How long a closing socket waits for the station's side of the close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

enum SessionCmd {
    Call {
        action: String,
        payload: Value,
        reply: oneshot::Sender<Result<CallAnswer, CallFailure>>,
    },
    /// A newer connection of the same station took over.
    Replaced,
}

/// A bounded command queue into one session: an empty `VecDeque` and a
/// `Notify` cost a few dozen bytes, where a channel preallocates a block of
/// slots per station.
#[derive(Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
    notify: Notify,
}

#[derive(Default)]
struct MailboxState {
    cmds: VecDeque<SessionCmd>,
    closed: bool,
}

enum PostError {
    Full,
    Closed,
}

impl Mailbox {
    fn post(&self, cmd: SessionCmd) -> Result<(), PostError> {
        {
            let mut st = self.state.lock();
            if st.closed {
                return Err(PostError::Closed);
            }
            if st.cmds.len() >= MAILBOX_CAPACITY {
                return Err(PostError::Full);
            }
            st.cmds.push_back(cmd);
        }
        // Stores a permit when the session is not waiting, so none is lost.
        self.notify.notify_one();
        Ok(())
    }

    /// The next command. Cancel safe.
    async fn recv(&self) -> SessionCmd {
        loop {
            let next = self.state.lock().cmds.pop_front();
            if let Some(cmd) = next {
                return cmd;
            }
            self.notify.notified().await;
        }
    }

    /// Refuses further commands; returns those still queued.
    fn close(&self) -> VecDeque<SessionCmd> {
        let mut st = self.state.lock();
        st.closed = true;
        std::mem::take(&mut st.cmds)
    }
}

/// The station's answer to a CSMS-initiated CALL.
#[derive(Debug, Clone, PartialEq)]
pub enum CallAnswer {
    Result(Value),
    Error {
        code: String,
        description: String,
        details: Value,
    },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallFailure {
    #[error("station {0} is not connected to this node")]
    NotConnected(String),
    #[error("{action} is not a CSMS-initiated action of OCPP {version}")]
    UnknownAction {
        action: String,
        version: OcppVersion,
    },
    #[error("invalid {action} payload: {reason}")]
    InvalidPayload { action: String, reason: String },
    #[error("the station did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the station disconnected before answering")]
    Disconnected,
    #[error("too many commands queued for this station")]
    Busy,
    #[error("could not record the command durably: {0}")]
    Wal(String),
}

/// Sends a CSMS-initiated CALL to a station connected to this node and waits
/// for its answer (or the configured timeout).
pub async fn call(
    node: &Node,
    station: &str,
    action: &str,
    payload: Value,
) -> Result<CallAnswer, CallFailure> {
    let handle = node
        .sessions
        .get(station)
        .map(|h| h.clone())
        .ok_or_else(|| CallFailure::NotConnected(station.to_string()))?;
    let version = handle.version;
    match node.catalog.get(version, action) {
        Some(spec) if spec.csms_may_send() => {}
        _ => {
            return Err(CallFailure::UnknownAction {
                action: action.to_string(),
                version,
            });
        }
    }
    node.catalog
        .validate_request(version, action, &payload)
        .map_err(|v| CallFailure::InvalidPayload {
            action: action.to_string(),
            reason: v.description,
        })?;
    let (reply, answer) = oneshot::channel();
    handle
        .mailbox
        .post(SessionCmd::Call {
            action: action.to_string(),
            payload,
            reply,
        })
        .map_err(|e| match e {
            PostError::Full => CallFailure::Busy,
            PostError::Closed => CallFailure::Disconnected,
        })?;
    answer.await.unwrap_or(Err(CallFailure::Disconnected))
}

/// Extra delay per answer while the WAL is over its disk budget.
const OVER_BUDGET_DELAY: Duration = Duration::from_millis(500);

/// A connection reports its station's `last_seen` at most this often. With
/// Redis every report is a script call; reported per CALL they were nearly
/// all of Redis's work at 20,000 CALLs/s (bench/README.md), for a figure
/// nobody reads to the millisecond. Connects and disconnects are still
/// reported at once.
const SEEN_RESOLUTION: Duration = Duration::from_secs(1);

struct Pending {
    message_id: String,
    action: String,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<CallAnswer, CallFailure>>,
}

type Queued = (
    String,
    Value,
    oneshot::Sender<Result<CallAnswer, CallFailure>>,
);

enum Flow {
    Continue,
    Close(u16, &'static str),
}

/// What woke the session up.
enum Event {
    Frame(Result<Incoming, WsError>),
    Cmd(SessionCmd),
    Timer,
}

struct Session<S> {
    node: Arc<Node>,
    ws: WsConn<S>,
    station: String,
    version: OcppVersion,
    /// Boxed: rare, and an idle session should not carry its size.
    pending: Option<Box<Pending>>,
    queue: VecDeque<Queued>,
    bucket: TokenBucket,
    bad_frames: BadFrameCounter,
    last_rx: Instant,
    /// When `last_seen` was last reported (see [`SEEN_RESOLUTION`]).
    seen_reported: Option<Instant>,
    conn_id: u64,
    mailbox: Arc<Mailbox>,
    /// Counts the connection; holds its admission slot until the first
    /// message is answered.
    conn: ConnGuard,
}

/// Registers a station's session and returns the future that runs it until
/// the socket closes, goes silent, or a newer connection of the same
/// station replaces it. `conn` counts the connection until the session
/// ends. Not an `async fn`: its arguments would stay in the future next to
/// the [`Session`] built from them, for the whole life of the connection.
pub fn run<S>(
    node: Arc<Node>,
    ws: WsConn<S>,
    station: String,
    version: OcppVersion,
    conn: ConnGuard,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = node.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let mailbox = Arc::new(Mailbox::default());
    if let Some(old) = node.sessions.insert(
        station.clone(),
        SessionHandle {
            conn_id,
            version,
            mailbox: mailbox.clone(),
        },
    ) {
        metrics::counter!("csms_sessions_replaced_total").increment(1);
        let _ = old.mailbox.post(SessionCmd::Replaced);
    }
    node.status
        .connected(&station, &node.node_id, version.as_str(), Utc::now());
    metrics::gauge!("csms_sessions").increment(1.0);

    let limits = &node.config.limits;
    let s = Session {
        bucket: TokenBucket::new(
            limits.messages_per_station_per_sec,
            limits.message_burst_per_station,
        ),
        bad_frames: BadFrameCounter::new(limits),
        node,
        ws,
        station,
        version,
        pending: None,
        queue: VecDeque::new(),
        last_rx: Instant::now(),
        seen_reported: None,
        conn_id,
        mailbox,
        conn,
    };
    drive(s)
}

async fn drive<S>(mut s: Session<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ping_every = Duration::from_secs(s.node.config.ocpp.ping_interval_secs);
    let mut next_ping = tokio::time::Instant::now() + ping_every;

    // Everything awaited below the `select!` is boxed: an async fn is as
    // large as its largest await point, and this one waits idle for hours.
    let reason = loop {
        let deadline = s.pending.as_ref().map(|p| p.deadline);
        let wake = [deadline, s.conn.slot.deadline()]
            .into_iter()
            .flatten()
            .fold(next_ping, |a, b| a.min(b));
        let event = tokio::select! {
            r = s.ws.read() => Event::Frame(r),
            cmd = s.mailbox.recv() => Event::Cmd(cmd),
            () = tokio::time::sleep_until(wake) => Event::Timer,
        };
        let flow = match event {
            Event::Frame(Ok(m)) => {
                s.last_rx = Instant::now();
                match m {
                    Incoming::Text(t) => {
                        let flow = Box::pin(s.on_text(&t)).await;
                        // Its first message answered: the station is in.
                        s.conn.slot.release();
                        flow
                    }
                    Incoming::Binary(_) => {
                        Box::pin(s.on_unparseable("binary frames are not OCPP-J")).await
                    }
                    Incoming::Ping(p) => {
                        if Box::pin(s.ws.send_pong(&p)).await.is_err() {
                            break "socket error";
                        }
                        Flow::Continue
                    }
                    Incoming::Pong => Flow::Continue,
                    Incoming::Close(c) => {
                        Box::pin(s.ws.answer_close(c.map(|(code, _)| code), CLOSE_LINGER)).await;
                        break "closed by station";
                    }
                }
            }
            Event::Frame(Err(e)) => match e {
                WsError::TooLarge { size, max } => {
                    record_limit("frame_size");
                    warn!(station = %s.station, size, max, "frame over the size limit: closing");
                    Flow::Close(ws::CLOSE_TOO_BIG, "frame too large")
                }
                WsError::Protocol(why) => {
                    debug!(station = %s.station, why, "WebSocket protocol error: closing");
                    Flow::Close(ws::CLOSE_PROTOCOL, why)
                }
                WsError::InvalidUtf8 => {
                    debug!(station = %s.station, "text frame is not UTF-8: closing");
                    Flow::Close(ws::CLOSE_INVALID_DATA, "text frame is not valid UTF-8")
                }
                WsError::Eof => break "closed by station without a close frame",
                WsError::Io(e) => {
                    debug!(station = %s.station, error = %e, "socket error");
                    break "socket error";
                }
            },
            Event::Cmd(SessionCmd::Call {
                action,
                payload,
                reply,
            }) => {
                if s.queue.len() >= 64 {
                    let _ = reply.send(Err(CallFailure::Busy));
                } else {
                    s.queue.push_back((action, payload, reply));
                }
                Box::pin(s.start_next_call()).await;
                Flow::Continue
            }
            Event::Cmd(SessionCmd::Replaced) => {
                Flow::Close(ws::CLOSE_POLICY, "replaced by a newer connection")
            }
            Event::Timer => {
                let now = tokio::time::Instant::now();
                s.conn.slot.expire(now);
                if deadline.is_some_and(|d| d <= now) {
                    if let Some(p) = s.pending.take() {
                        let timeout = Duration::from_secs(s.node.config.ocpp.call_timeout_secs);
                        let _ = p.reply.send(Err(CallFailure::Timeout(timeout)));
                        metrics::counter!("csms_call_timeouts_total").increment(1);
                    }
                    Box::pin(s.start_next_call()).await;
                }
                if next_ping <= now {
                    if s.last_rx.elapsed() > ping_every * 2 {
                        metrics::counter!("csms_dead_connections_total").increment(1);
                        break "no pong: connection dead";
                    }
                    if Box::pin(s.ws.send_ping()).await.is_err() {
                        break "socket error";
                    }
                    next_ping = tokio::time::Instant::now() + ping_every;
                }
                Flow::Continue
            }
        };
        if let Flow::Close(code, why) = flow {
            Box::pin(s.ws.close(code, why, CLOSE_LINGER)).await;
            break why;
        }
    };

    for cmd in s.mailbox.close() {
        if let SessionCmd::Call { reply, .. } = cmd {
            let _ = reply.send(Err(CallFailure::Disconnected));
        }
    }
    if let Some(p) = s.pending.take() {
        let _ = p.reply.send(Err(CallFailure::Disconnected));
    }
    for (_, _, reply) in s.queue.drain(..) {
        let _ = reply.send(Err(CallFailure::Disconnected));
    }
    let conn_id = s.conn_id;
    let replaced = s
        .node
        .sessions
        .remove_if(&s.station, |_, h| h.conn_id == conn_id)
        .is_none();
    if !replaced {
        s.node
            .status
            .disconnected(&s.station, &s.node.node_id, Utc::now());
    }
    metrics::gauge!("csms_sessions").decrement(1.0);
    info!(station = %s.station, reason, "station disconnected");
    // The socket is closed on the closer thread: when a whole fleet drops
    // at once, closing thousands of sockets here would hold up every
    // station still connected to this node (see `crate::closer`).
    let Session { node, ws, conn, .. } = s;
    node.closer.close((ws, conn));
}

fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn record(
        &self,
        direction: Direction,
        message_type: u8,
        message_id: &str,
        action: Option<&str>,
        raw: String,
    ) -> WalRecord {
        WalRecord {
            received_at_us: now_us(),
            station_id: self.station.clone(),
            version: self.version,
            direction,
            message_type,
            message_id: message_id.to_string(),
            action: action.map(str::to_string),
            error_code: None,
            error_description: None,
            raw,
        }
    }

    /// Per-station message rate: a station over its rate is slowed down, not
    /// answered with errors, so nothing it sends is lost.
    async fn throttle(&mut self) {
        let mut waited = false;
        while !self.bucket.try_take(Instant::now()) {
            if !waited {
                record_limit("message_rate");
                waited = true;
            }
            let rate = self
                .node
                .config
                .limits
                .messages_per_station_per_sec
                .max(0.001);
            tokio::time::sleep(Duration::from_secs_f64((1.0 / rate).min(1.0))).await;
        }
    }

    async fn on_text(&mut self, text: &str) -> Flow {
        self.throttle().await;
        metrics::counter!("csms_frames_received_total", "version" => self.version.as_str())
            .increment(1);
        match schemas::frame::decode(text, self.version) {
            Ok(Frame::Call {
                message_id,
                action,
                payload,
            }) => self.on_call(text, message_id, action, payload).await,
            Ok(Frame::Send {
                message_id,
                action,
                payload,
            }) => {
                let mut rec = self.record(
                    Direction::CsToCsms,
                    MessageType::Send as u8,
                    &message_id,
                    Some(&action),
                    text.to_string(),
                );
                if let Err(v) = self
                    .node
                    .catalog
                    .validate_request(self.version, &action, &payload)
                {
                    rec.error_code = Some(v.kind.code(self.version).to_string());
                    rec.error_description = Some(v.description);
                }
                self.wal_durable(vec![rec]).await;
                Flow::Continue
            }
            Ok(Frame::CallResult {
                message_id,
                payload,
            }) => {
                self.on_answer(
                    text,
                    &message_id,
                    MessageType::CallResult,
                    CallAnswer::Result(payload),
                )
                .await
            }
            Ok(Frame::CallError {
                message_id,
                error_code,
                error_description,
                error_details,
            })
            | Ok(Frame::CallResultError {
                message_id,
                error_code,
                error_description,
                error_details,
            }) => {
                let answer = CallAnswer::Error {
                    code: error_code,
                    description: error_description,
                    details: error_details,
                };
                self.on_answer(text, &message_id, MessageType::CallError, answer)
                    .await
            }
            Err(fe) => {
                let mut rec = self.record(
                    Direction::CsToCsms,
                    fe.message_type.unwrap_or(0),
                    &fe.message_id,
                    fe.action.as_deref(),
                    text.to_string(),
                );
                rec.error_code = Some(fe.kind.code(self.version).to_string());
                rec.error_description = Some(fe.description.clone());
                if fe.answerable {
                    let out = fe.to_call_error(self.version);
                    self.answer(rec, out, fe.action.as_deref()).await;
                } else {
                    self.wal_durable(vec![rec]).await;
                }
                self.bad_frame()
            }
        }
    }

    async fn on_unparseable(&mut self, why: &str) -> Flow {
        let mut rec = self.record(Direction::CsToCsms, 0, "-1", None, String::new());
        let kind = ErrorKind::RpcFrameworkError;
        rec.error_code = Some(kind.code(self.version).to_string());
        rec.error_description = Some(why.to_string());
        let out = Frame::call_error(self.version, "-1", kind, why);
        self.answer(rec, out, None).await;
        self.bad_frame()
    }

    fn bad_frame(&mut self) -> Flow {
        metrics::counter!("csms_bad_frames_total").increment(1);
        if self.bad_frames.record(Instant::now()) {
            record_limit("bad_frames");
            warn!(station = %self.station, "too many malformed frames: closing");
            Flow::Close(ws::CLOSE_POLICY, "too many malformed frames")
        } else {
            Flow::Continue
        }
    }

    async fn on_call(
        &mut self,
        text: &str,
        message_id: String,
        action: String,
        payload: Value,
    ) -> Flow {
        let started = Instant::now();
        let rec = self.record(
            Direction::CsToCsms,
            MessageType::Call as u8,
            &message_id,
            Some(&action),
            text.to_string(),
        );
        let catalog: &'static schemas::Catalog = self.node.catalog;
        let spec = catalog.get(self.version, &action);
        let refusal = match spec {
            None => Some((
                ErrorKind::NotImplemented,
                format!("{action} is not an OCPP {} action", self.version),
            )),
            Some(spec) if !spec.cs_may_send() => Some((
                ErrorKind::NotSupported,
                format!("{action} is sent by the CSMS, not by a charging station"),
            )),
            Some(_) => catalog
                .validate_request(self.version, &action, &payload)
                .err()
                .map(|v| (v.kind, v.description)),
        };
        if let Some((kind, why)) = refusal {
            let mut rec = rec;
            rec.error_code = Some(kind.code(self.version).to_string());
            rec.error_description = Some(why.clone());
            self.answer(
                rec,
                Frame::call_error(self.version, message_id, kind, why),
                Some(&action),
            )
            .await;
            return self.bad_frame();
        }
        let (out, result) = match self
            .node
            .handlers
            .answer(self.version, &action, &payload)
            .await
        {
            Ok(resp) => (
                Frame::CallResult {
                    message_id,
                    payload: resp.clone(),
                },
                Some(resp),
            ),
            Err(r) => (
                Frame::call_error(self.version, message_id, r.kind, r.description),
                None,
            ),
        };
        let answered = self.answer(rec, out, Some(&action)).await;
        // Not refused, so the catalog knows the action: the label borrows
        // its name (static) instead of copying it per CALL.
        let label = spec.map_or("", |spec| spec.action.as_str());
        metrics::histogram!("csms_call_seconds", "action" => label)
            .record(started.elapsed().as_secs_f64());
        if answered && let Some(resp) = result {
            self.apply_events(&action, &payload, &resp);
        }
        Flow::Continue
    }

    /// Makes the incoming frame and its answer durable, then sends the answer.
    /// Returns whether the answer went out.
    async fn answer(&mut self, incoming: WalRecord, out: Frame, action: Option<&str>) -> bool {
        if self.node.wal.over_budget() {
            // The lake is not draining the WAL: slow every station down so the
            // disk budget lasts longer, rather than refusing what they send.
            record_limit("wal_budget");
            tokio::time::sleep(OVER_BUDGET_DELAY).await;
        }
        let out_text = out.to_text();
        let mut out_rec = self.record(
            Direction::CsmsToCs,
            out.message_type() as u8,
            out.message_id(),
            action,
            out_text.clone(),
        );
        if let Frame::CallError {
            error_code,
            error_description,
            ..
        } = &out
        {
            out_rec.error_code = Some(error_code.clone());
            out_rec.error_description = Some(error_description.clone());
        }
        if let Err(e) = self.node.wal.append(vec![incoming, out_rec]).await {
            // Not durable, so not acknowledged: the station retries.
            warn!(station = %self.station, error = %e, "WAL append failed; answering InternalError");
            metrics::counter!("csms_wal_append_failures_total").increment(1);
            let err = Frame::call_error(
                self.version,
                out.message_id(),
                ErrorKind::InternalError,
                "the CSMS could not store the message; retry later",
            );
            let _ = self.ws.send_text(&err.to_text()).await;
            return false;
        }
        self.ws.send_text(&out_text).await.is_ok()
    }

    /// Records frames that get no answer (SEND, stray results). Awaited like
    /// the others so that a full queue slows the station instead of dropping
    /// the frame.
    async fn wal_durable(&mut self, records: Vec<WalRecord>) {
        if let Err(e) = self.node.wal.append(records).await {
            warn!(station = %self.station, error = %e, "WAL append failed");
            metrics::counter!("csms_wal_append_failures_total").increment(1);
        }
    }

    /// The station's answer to our CALL.
    async fn on_answer(
        &mut self,
        text: &str,
        message_id: &str,
        mtype: MessageType,
        answer: CallAnswer,
    ) -> Flow {
        let matches = self
            .pending
            .as_ref()
            .is_some_and(|p| p.message_id == message_id);
        let action = if matches {
            self.pending.as_ref().map(|p| p.action.clone())
        } else {
            None
        };
        let mut rec = self.record(
            Direction::CsToCsms,
            mtype as u8,
            message_id,
            action.as_deref(),
            text.to_string(),
        );
        if let CallAnswer::Error {
            code, description, ..
        } = &answer
        {
            rec.error_code = Some(code.clone());
            rec.error_description = Some(description.clone());
        }
        if !matches {
            debug!(station = %self.station, message_id, "answer to no outstanding call");
            self.wal_durable(vec![rec]).await;
            return Flow::Continue;
        }
        let pending = self.pending.take().expect("matched above");
        if let CallAnswer::Result(payload) = &answer
            && let Err(v) =
                self.node
                    .catalog
                    .validate_response(self.version, &pending.action, payload)
        {
            warn!(station = %self.station, action = %pending.action, error = %v, "station answered with an invalid payload");
            rec.error_code = Some(v.kind.code(self.version).to_string());
            rec.error_description = Some(v.description);
        }
        let result = match self.node.wal.append(vec![rec]).await {
            Ok(_) => Ok(answer),
            Err(e) => Err(CallFailure::Wal(e.to_string())),
        };
        let _ = pending.reply.send(result);
        self.start_next_call().await;
        Flow::Continue
    }

    /// Sends the next queued CSMS-initiated CALL if none is outstanding.
    async fn start_next_call(&mut self) {
        while self.pending.is_none() {
            let Some((action, payload, reply)) = self.queue.pop_front() else {
                return;
            };
            if reply.is_closed() {
                continue;
            }
            let message_id = uuid::Uuid::new_v4().to_string();
            let frame = Frame::Call {
                message_id: message_id.clone(),
                action: action.clone(),
                payload,
            };
            let text = frame.to_text();
            let rec = self.record(
                Direction::CsmsToCs,
                MessageType::Call as u8,
                &message_id,
                Some(&action),
                text.clone(),
            );
            if let Err(e) = self.node.wal.append(vec![rec]).await {
                let _ = reply.send(Err(CallFailure::Wal(e.to_string())));
                continue;
            }
            if self.ws.send_text(&text).await.is_err() {
                let _ = reply.send(Err(CallFailure::Disconnected));
                return;
            }
            let timeout = Duration::from_secs(self.node.config.ocpp.call_timeout_secs);
            self.pending = Some(Box::new(Pending {
                message_id,
                action,
                deadline: tokio::time::Instant::now() + timeout,
                reply,
            }));
        }
    }

    /// Live status from the version-neutral events of an answered CALL.
    fn apply_events(&mut self, action: &str, request: &Value, response: &Value) {
        let status = &self.node.status;
        let now = Utc::now();
        if self
            .seen_reported
            .is_none_or(|at| self.last_rx.duration_since(at) >= SEEN_RESOLUTION)
        {
            self.seen_reported = Some(self.last_rx);
            status.seen(&self.station, now);
        }
        for event in adapter::events_from_call(self.version, action, request, Some(response)) {
            match event {
                CoreEvent::StatusChanged(c) => {
                    status.put_connector(ConnectorStatus {
                        station_id: self.station.clone(),
                        evse_id: c.evse_id.unwrap_or(0),
                        connector_id: c.connector_id,
                        status: c.status,
                        error_code: c.error_code,
                        info: c.info,
                        event_time: c.event_time.unwrap_or(now),
                        updated_at: now,
                    });
                }
                CoreEvent::Boot(b) => status.boot(
                    &self.station,
                    serde_json::to_value(b).unwrap_or(Value::Null),
                ),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::Wal;

    fn node(dir: &std::path::Path) -> (Arc<Node>, Wal) {
        crate::server::test_node(dir)
    }

    /// An accepted loopback connection, counted by `node`: the client's
    /// end, the server's end as a WebSocket, and its guard.
    async fn connection(
        node: &Node,
    ) -> (
        tokio::net::TcpStream,
        WsConn<tokio::net::TcpStream>,
        ConnGuard,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let (guard, _) = ConnGuard::new(node, crate::admission::AdmissionSlot::none());
        (client, WsConn::new(tcp, Vec::new(), 65_536), guard)
    }

    /// The idle session is the per-station cost of a node: keep its task
    /// small (the work per message is boxed, see `run`).
    #[tokio::test]
    async fn idle_session_future_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _wal) = node(dir.path());
        let (client, ws, guard) = connection(&node).await;
        let fut = run(node.clone(), ws, "CP1".into(), OcppVersion::V16, guard);
        let size = std::mem::size_of_val(&fut);
        println!("idle session future: {size} bytes");
        assert!(size <= 1536, "session future grew to {size} bytes");
        drop(fut);
        drop(client);
    }

    /// An ended session's socket is closed by the closer thread, and stays
    /// counted against `max_connections` until it has been.
    #[tokio::test]
    async fn an_ended_session_leaves_its_socket_to_the_closer() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _wal) = node(dir.path());
        let (client, ws, guard) = connection(&node).await;
        let session = tokio::spawn(run(node.clone(), ws, "CP1".into(), OcppVersion::V16, guard));
        assert_eq!(node.connections.load(Ordering::Relaxed), 1);
        assert!(node.sessions.contains_key("CP1"));
        // The station loses power: no close frame, just the end of its socket.
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("the session ends at end-of-file")
            .unwrap();
        assert!(!node.sessions.contains_key("CP1"));
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while (node.connections.load(Ordering::Relaxed) > 0 || node.closer.pending() > 0)
            && std::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(node.connections.load(Ordering::Relaxed), 0);
        assert_eq!(node.closer.pending(), 0);
    }
}
