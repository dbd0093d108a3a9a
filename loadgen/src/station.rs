//! One simulated charging station: connects (from its own source address),
//! boots, follows its schedule, answers the CSMS's CALLs, and reconnects with
//! the OCPP back-off when its socket is lost or the storm drops it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use rand::{SeedableRng, rngs::StdRng};
use schemas::frame::{Frame, decode};
use schemas::{Catalog, OcppVersion};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::acks::StationAcks;
use crate::backoff::Backoff;
use crate::schedule::{Schedule, ScheduleParams, Step, TxState, boot_payload, call_for};
use crate::stats::Stats;

/// How CALLs are paced once a station is Accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Follow the schedule's own timeline.
    Schedule,
    /// One CALL every `interval` (sustained mode), phase offset by station.
    Every(Duration),
    /// Next CALL as soon as the previous one is answered.
    ClosedLoop,
}

/// The fleet's phase, broadcast to every station.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connect and boot only.
    Connecting,
    Running,
    /// Drop the socket now and reconnect with the back-off.
    Storm,
    Stop,
}

/// Settings shared by every station of a process.
pub struct StationConfig {
    pub server: SocketAddr,
    /// `ws://host:port/path/` with a trailing slash; the station id is appended.
    pub url_base: String,
    pub password: Option<String>,
    /// Source addresses to spread over (empty: let the kernel pick).
    pub source_ips: Vec<IpAddr>,
    /// Source ports each station cycles through on its address (0: let
    /// the kernel pick); see [`source_port`].
    pub ports_per_station: u16,
    pub schedule: ScheduleParams,
    pub pacing: Pacing,
    pub backoff: Backoff,
    pub call_timeout: Duration,
    /// Instant the storm dropped all sockets (set by the fleet).
    pub storm_at: std::sync::OnceLock<Instant>,
}

pub fn station_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:06}")
}

/// A station's password: the `--password` template with `{id}` replaced by
/// the station's id, so that every station can have its own.
pub fn station_password(template: &str, id: &str) -> String {
    template.replace("{id}", id)
}

/// Whether station `index` speaks 2.0.1, spreading `ratio_201` evenly over
/// the indexes (exactly `floor(n * ratio)` of the first `n`).
pub fn is_v201(index: usize, ratio_201: f64) -> bool {
    let r = ratio_201.clamp(0.0, 1.0);
    ((index + 1) as f64 * r).floor() > (index as f64 * r).floor()
}

/// First source port handed out explicitly.
const FIRST_SOURCE_PORT: u16 = 1024;

/// How many source ports each station may cycle through when `per_address`
/// stations share one source address: the address's ports above 1024 split
/// evenly, at most 16; 0 when fewer than 2 each (the kernel picks then).
///
/// Why not let the kernel pick: `bind(addr, 0)` searches the address's port
/// space for a port no socket holds, and with ~10,000 sockets on an address
/// that search (inet_bind2_bucket_*, inet_bhash2_conflict in `perf`) took
/// about 30% of both cores during a 100,000-station reconnect storm, more
/// than the CSMS spent answering it. A port chosen up front is one lookup.
pub fn ports_per_station(per_address: usize) -> u16 {
    let span = (u16::MAX - FIRST_SOURCE_PORT) as usize;
    let k = span / per_address.max(1);
    if k < 2 { 0 } else { k.min(16) as u16 }
}

/// The source port of a station's `generation`-th connection: station
/// `slot` on its address owns ports `[1024 + slot*k, 1024 + (slot+1)*k)` and
/// cycles through them, so a reconnect does not reuse the port whose last
/// connection may still be in TIME_WAIT.
pub fn source_port(slot: usize, k: u16, generation: u16) -> u16 {
    FIRST_SOURCE_PORT + (slot * k as usize + (generation % k) as usize) as u16
}

/// The `i`-th source address: 127.0.0.2, 127.0.0.3, ... (continuing into
/// 127.0.1.x past 127.0.0.255).
pub fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f00_0002u32 + i as u32))
}

type Ws = WebSocketStream<TcpStream>;

enum CallOutcome {
    Result(Value),
    Error(String),
    Timeout,
    /// The socket is gone (or the fleet asked us to drop it).
    Lost,
}

pub struct Station {
    pub index: usize,
    pub id: String,
    pub version: OcppVersion,
    cfg: Arc<StationConfig>,
    stats: Arc<Stats>,
    phase: watch::Receiver<Phase>,
    rng: StdRng,
    next_msg_id: u64,
    tx: TxState,
    /// Dropped by the storm and not yet Accepted again.
    stormed: bool,
    /// Already dropped its socket for the (single) storm of the run.
    storm_dropped: bool,
    /// Message ids that got no CALLRESULT, ascending.
    unacked: Vec<u64>,
    /// Connection attempts so far, choosing the next source port.
    connection_gen: u16,
}

impl Station {
    pub fn new(
        index: usize,
        id: String,
        version: OcppVersion,
        cfg: Arc<StationConfig>,
        stats: Arc<Stats>,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        let tx = TxState {
            id_tag: format!("TAG{index:06}"),
            ..TxState::default()
        };
        Station {
            index,
            id,
            version,
            cfg,
            stats,
            phase,
            rng: StdRng::seed_from_u64(index as u64 ^ 0x5eed),
            next_msg_id: 0,
            tx,
            stormed: false,
            storm_dropped: false,
            unacked: Vec::new(),
            connection_gen: 0,
        }
    }

    /// The current phase, marked as seen so `changed()` waits for the next one.
    fn phase(&mut self) -> Phase {
        *self.phase.borrow_and_update()
    }

    /// Waits out a boot retry interval; `Some` when the socket or phase ends it.
    async fn wait_boot(&mut self, ws: &mut Ws, deadline: Instant) -> Option<End> {
        loop {
            match self.idle_until(ws, deadline, true).await {
                None => return None,
                Some(End::PhaseChanged) => match self.phase() {
                    Phase::Stop => return Some(End::Stop),
                    Phase::Storm if !self.storm_dropped => {
                        self.storm_dropped = true;
                        self.stormed = true;
                        return Some(End::Storm);
                    }
                    _ => {}
                },
                Some(end) => return Some(end),
            }
        }
    }

    /// Runs until the fleet says Stop; returns which CALLs were acknowledged.
    pub async fn run(mut self) -> StationAcks {
        self.run_until_stop().await;
        StationAcks {
            station: self.id,
            last_id: self.next_msg_id,
            unacked: self.unacked,
        }
    }

    async fn run_until_stop(&mut self) {
        let mut attempt: u32 = 0;
        let mut wait = None;
        loop {
            if let Some(w) = wait.take() {
                tokio::select! {
                    _ = tokio::time::sleep(w) => {}
                    _ = self.phase.wait_for(|p| *p == Phase::Stop) => return,
                }
            }
            if self.phase() == Phase::Stop {
                return;
            }
            let started = Instant::now();
            let mut ws = match self.connect().await {
                Ok(ws) => {
                    self.stats.record_connect(started.elapsed());
                    ws
                }
                Err(reason) => {
                    self.stats.record_connect_failure(&reason);
                    wait = Some(self.cfg.backoff.delay(attempt, &mut self.rng));
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            };
            self.stats.connected.fetch_add(1, Relaxed);
            let end = self.connected(&mut ws).await;
            self.stats.connected.fetch_sub(1, Relaxed);
            match end {
                End::Stop => {
                    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
                    return;
                }
                End::Storm => {
                    // Power cut: the socket vanishes without a close handshake.
                    drop(ws);
                    attempt = 0;
                    wait = Some(self.cfg.backoff.delay(0, &mut self.rng));
                }
                End::Lost | End::Rejected | End::PhaseChanged => {
                    wait = Some(self.cfg.backoff.delay(attempt, &mut self.rng));
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<Ws, String> {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {}", e.kind()))?;
        if !self.cfg.source_ips.is_empty() {
            let n = self.cfg.source_ips.len();
            let ip = self.cfg.source_ips[self.index % n];
            let mut bound = false;
            if self.cfg.ports_per_station > 0 {
                // The previous connections' ports may still be in TIME_WAIT.
                let _ = socket.set_reuseaddr(true);
                for _ in 0..self.cfg.ports_per_station {
                    self.connection_gen = self.connection_gen.wrapping_add(1);
                    let port = source_port(
                        self.index / n,
                        self.cfg.ports_per_station,
                        self.connection_gen,
                    );
                    if socket.bind(SocketAddr::new(ip, port)).is_ok() {
                        bound = true;
                        break;
                    }
                }
            }
            if !bound {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(|e| format!("bind {ip}: {}", e.kind()))?;
            }
        }
        let limit = self.cfg.call_timeout;
        let stream = timeout(limit, socket.connect(self.cfg.server))
            .await
            .map_err(|_| "TCP connect timed out".to_string())?
            .map_err(|e| format!("TCP connect: {}", e.kind()))?;
        let _ = stream.set_nodelay(true);
        let mut request = format!("{}{}", self.cfg.url_base, self.id)
            .into_client_request()
            .map_err(|e| format!("bad URL: {e}"))?;
        let headers = request.headers_mut();
        headers.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(self.version.subprotocol()),
        );
        if let Some(pw) = &self.cfg.password {
            let pw = station_password(pw, &self.id);
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{}:{pw}", self.id));
            let value = HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|e| format!("bad password: {e}"))?;
            headers.insert("Authorization", value);
        }
        // Small buffers: 100,000 stations must fit in a few processes.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
        match timeout(limit, handshake).await {
            Err(_) => Err("WebSocket handshake timed out".into()),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                Err(format!("HTTP {}", resp.status().as_u16()))
            }
            Ok(Err(e)) => Err(format!("handshake: {}", short_error(&e))),
            Ok(Ok((ws, _))) => Ok(ws),
        }
    }

    /// Boots, then follows the schedule until the socket ends one way or another.
    async fn connected(&mut self, ws: &mut Ws) -> End {
        // Boot until Accepted; Pending/Rejected wait the interval they were given.
        loop {
            let sent_at = Instant::now();
            match self
                .call(ws, "BootNotification", boot_payload(self.version))
                .await
            {
                CallOutcome::Result(v) => {
                    let status = v.get("status").and_then(Value::as_str).unwrap_or("");
                    let interval = v.get("interval").and_then(Value::as_u64).unwrap_or(10);
                    match status {
                        "Accepted" => {
                            self.stats.boot_accepted.fetch_add(1, Relaxed);
                            break;
                        }
                        "Pending" => self.stats.boot_pending.fetch_add(1, Relaxed),
                        _ => {
                            self.stats.boot_rejected.fetch_add(1, Relaxed);
                            return End::Rejected;
                        }
                    };
                    let wait = Duration::from_secs(interval.clamp(1, 60));
                    if let Some(end) = self.wait_boot(ws, sent_at + wait).await {
                        return end;
                    }
                }
                CallOutcome::Error(_) | CallOutcome::Timeout => {
                    if let Some(end) = self.wait_boot(ws, sent_at + Duration::from_secs(5)).await {
                        return end;
                    }
                }
                CallOutcome::Lost => return self.lost_or_phase(),
            }
        }
        self.stats.accepted.fetch_add(1, Relaxed);
        let rebooted = self.stormed;
        if self.stormed
            && let Some(at) = self.cfg.storm_at.get()
        {
            self.stats.storm_reaccepted.fetch_add(1, Relaxed);
            let us = at.elapsed().as_micros() as u64;
            self.stats.storm_last_accept_us.fetch_max(us, Relaxed);
            self.stormed = false;
        }
        let end = self.follow_schedule(ws, rebooted).await;
        self.stats.accepted.fetch_sub(1, Relaxed);
        end
    }

    /// `rebooted`: the station is back from a storm, so it reports its
    /// connector at once, as a charger that lost power does; otherwise it
    /// joins the fleet's steady state at a random phase.
    async fn follow_schedule(&mut self, ws: &mut Ws, rebooted: bool) -> End {
        // Wait for the whole fleet to be connected before loading the server.
        // (`idle_until` returns at each phase change; the loop re-checks.)
        while self.phase() == Phase::Connecting {
            if let Some(end) = self
                .idle_until(ws, Instant::now() + Duration::from_secs(3600), true)
                .await
            {
                if end == End::PhaseChanged {
                    continue;
                }
                return end;
            }
        }
        let start = Instant::now();
        let mut schedule = Schedule::new(self.cfg.schedule, self.version, self.index as u64);
        if !rebooted {
            schedule = schedule.in_steady_state();
        }
        let mut next_at = match self.cfg.pacing {
            Pacing::Every(iv) => {
                // Stations of a sustained run are spread evenly over one interval.
                start + iv.mul_f64((self.index as f64 * 0.618_033_988_7).fract())
            }
            _ => start,
        };
        loop {
            match self.phase() {
                Phase::Running => {}
                Phase::Storm if self.storm_dropped => {}
                Phase::Storm => {
                    self.storm_dropped = true;
                    self.stormed = true;
                    return End::Storm;
                }
                Phase::Stop | Phase::Connecting => return End::Stop,
            }
            let (offset, step) = schedule.next_step();
            if self.cfg.pacing == Pacing::Schedule {
                next_at = start + offset;
            }
            if next_at > Instant::now() {
                match self.idle_until(ws, next_at, true).await {
                    None => {}
                    Some(End::PhaseChanged) => {
                        // Re-check the phase; this step is skipped, as a
                        // charger that lost power would not send it either.
                        continue;
                    }
                    Some(end) => return end,
                }
            }
            // The wait may have ended on its timer in the same instant the
            // fleet said Stop: a CALL sent now would be measured against the
            // teardown of every socket of the run, not the run.
            if self.phase() == Phase::Stop {
                return End::Stop;
            }
            if let Pacing::Every(iv) = self.cfg.pacing {
                next_at += iv;
            }
            let Some((action, payload)) =
                call_for(step, self.version, &mut self.tx, self.cfg.schedule.meter)
            else {
                continue;
            };
            match self.call(ws, action, payload).await {
                CallOutcome::Result(v) => {
                    if step == Step::Start && !self.version.is_2x() {
                        self.tx.tx_id_16 = v.get("transactionId").and_then(Value::as_i64);
                    }
                }
                CallOutcome::Error(_) | CallOutcome::Timeout => {}
                CallOutcome::Lost => return self.lost_or_phase(),
            }
        }
    }

    fn lost_or_phase(&mut self) -> End {
        match self.phase() {
            Phase::Stop => End::Stop,
            Phase::Storm if !self.storm_dropped => {
                self.storm_dropped = true;
                self.stormed = true;
                End::Storm
            }
            _ => {
                self.stats.disconnects.fetch_add(1, Relaxed);
                End::Lost
            }
        }
    }

    /// Reads (and answers) frames until `deadline`. Returns `Some` when the
    /// socket ended, or when the phase changed and `watch_phase` is set.
    async fn idle_until(
        &mut self,
        ws: &mut Ws,
        deadline: Instant,
        watch_phase: bool,
    ) -> Option<End> {
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return None,
                changed = self.phase.changed(), if watch_phase => {
                    if changed.is_err() {
                        return Some(End::Stop);
                    }
                    return Some(End::PhaseChanged);
                }
                msg = ws.next() => {
                    if !self.on_message(ws, msg, None).await.is_continue() {
                        return Some(self.lost_or_phase());
                    }
                }
            }
        }
    }

    /// Sends one CALL and waits for its answer, answering the CSMS's own
    /// CALLs meanwhile. Records the latency of every answer.
    async fn call(&mut self, ws: &mut Ws, action: &str, payload: Value) -> CallOutcome {
        let outcome = self.call_once(ws, action, payload).await;
        if !matches!(outcome, CallOutcome::Result(_)) {
            self.unacked.push(self.next_msg_id);
        }
        outcome
    }

    async fn call_once(&mut self, ws: &mut Ws, action: &str, payload: Value) -> CallOutcome {
        self.next_msg_id += 1;
        let id = self.next_msg_id.to_string();
        let text = json!([2, id, action, payload]).to_string();
        let sent_at = Instant::now();
        self.stats.sent.fetch_add(1, Relaxed);
        if ws.send(Message::text(text)).await.is_err() {
            return CallOutcome::Lost;
        }
        let deadline = sent_at + self.cfg.call_timeout;
        loop {
            let msg = tokio::select! {
                _ = sleep_until(deadline) => {
                    self.stats.timeouts.fetch_add(1, Relaxed);
                    return CallOutcome::Timeout;
                }
                msg = ws.next() => msg,
            };
            match self.on_message(ws, msg, Some(&id)).await {
                Flow::Continue => {}
                Flow::Closed => return CallOutcome::Lost,
                Flow::Answer(outcome) => {
                    self.stats
                        .record_latency(sent_at.elapsed(), action == "BootNotification");
                    self.stats.answered.fetch_add(1, Relaxed);
                    if let CallOutcome::Error(code) = &outcome {
                        self.stats.record_call_error(code);
                    }
                    return outcome;
                }
            }
        }
    }

    /// Handles one incoming WebSocket message: answers CSMS CALLs, returns
    /// the answer to `waiting_for` when it is this one.
    async fn on_message(
        &mut self,
        ws: &mut Ws,
        msg: Option<Result<Message, tungstenite::Error>>,
        waiting_for: Option<&str>,
    ) -> Flow {
        let text = match msg {
            None | Some(Err(_)) => return Flow::Closed,
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) => return Flow::Closed,
            // Pings are answered by tungstenite on the next read or write.
            Some(Ok(_)) => return Flow::Continue,
        };
        match decode(text.as_str(), self.version) {
            Ok(Frame::Call {
                message_id,
                action,
                payload: _,
            }) => {
                let reply = answer_csms_call(self.version, &message_id, &action);
                self.stats.csms_calls_answered.fetch_add(1, Relaxed);
                if ws.send(Message::text(reply)).await.is_err() {
                    return Flow::Closed;
                }
                Flow::Continue
            }
            Ok(Frame::CallResult {
                message_id,
                payload,
            }) if Some(message_id.as_str()) == waiting_for => {
                Flow::Answer(CallOutcome::Result(payload))
            }
            Ok(Frame::CallError {
                message_id,
                error_code,
                ..
            }) if Some(message_id.as_str()) == waiting_for => {
                Flow::Answer(CallOutcome::Error(error_code))
            }
            // Late answers to timed-out CALLs, and anything unreadable.
            _ => Flow::Continue,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Stop,
    Storm,
    Lost,
    Rejected,
    PhaseChanged,
}

enum Flow {
    Continue,
    Closed,
    Answer(CallOutcome),
}

impl Flow {
    fn is_continue(&self) -> bool {
        !matches!(self, Flow::Closed)
    }
}

fn short_error(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Io(io) => format!("{:?}", io.kind()),
        other => {
            let s = other.to_string();
            s.chars().take(60).collect()
        }
    }
}

/// The answer a real charger gives to a CSMS-initiated CALL: a CALLRESULT
/// with a schema-valid payload, Accepted where the response has a status
/// that allows it; NotImplemented for actions the version does not have.
pub fn answer_csms_call(version: OcppVersion, message_id: &str, action: &str) -> String {
    let catalog = Catalog::global();
    let Some(schema) = catalog
        .get(version, action)
        .and_then(|s| s.response_schema())
    else {
        let code = schemas::ErrorKind::NotImplemented.code(version);
        return json!(
            [4, message_id, code, format!("{action} is not supported"), {
            }]
        )
        .to_string();
    };
    let mut payload = schemas::sample::minimal_instance(schema);
    if let Some(obj) = payload.as_object_mut()
        && obj.contains_key("status")
    {
        let mut accepted = Value::Object(obj.clone());
        accepted["status"] = json!("Accepted");
        if catalog
            .validate_response(version, action, &accepted)
            .is_ok()
        {
            payload = accepted;
        }
    }
    json!([3, message_id, payload]).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ratio_is_spread_exactly() {
        let n201 = (0..1000).filter(|&i| is_v201(i, 0.3)).count();
        assert_eq!(n201, 300);
        assert!((0..10).all(|i| !is_v201(i, 0.0)));
        assert!((0..10).all(|i| is_v201(i, 1.0)));
        // Evenly: every window of 10 holds 3.
        assert_eq!((500..510).filter(|&i| is_v201(i, 0.3)).count(), 3);
    }

    #[test]
    fn source_ports_are_disjoint_per_station_and_in_range() {
        assert_eq!(ports_per_station(9_091), 7);
        assert_eq!(ports_per_station(10), 16, "capped");
        assert_eq!(ports_per_station(40_000), 0, "too many: the kernel picks");
        for per_address in [1, 9_091, 32_000] {
            let k = ports_per_station(per_address);
            let mut seen = std::collections::HashSet::new();
            let slots: std::collections::BTreeSet<usize> =
                [0, per_address / 2, per_address - 1].into();
            for slot in slots {
                let ports: Vec<u16> = (0..k * 2).map(|g| source_port(slot, k, g)).collect();
                assert!(ports.iter().all(|&p| p >= 1024));
                // Consecutive connections never share a port; the cycle repeats.
                assert!(ports.windows(2).all(|w| w[0] != w[1]));
                assert_eq!(ports[0], ports[k as usize]);
                for p in &ports[..k as usize] {
                    assert!(seen.insert(*p), "port {p} given to two stations");
                }
            }
        }
    }

    #[test]
    fn source_addresses_start_at_127_0_0_2() {
        assert_eq!(source_ip(0).to_string(), "127.0.0.2");
        assert_eq!(source_ip(3).to_string(), "127.0.0.5");
        assert_eq!(source_ip(254).to_string(), "127.0.1.0");
    }

    #[test]
    fn csms_calls_get_valid_answers() {
        let c = Catalog::global();
        for version in [OcppVersion::V16, OcppVersion::V201] {
            for spec in c.actions(version).into_iter().filter(|s| s.csms_may_send()) {
                let text = answer_csms_call(version, "m1", &spec.action);
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame[0], 3, "{version} {}: {text}", spec.action);
                c.validate_response(version, &spec.action, &frame[2])
                    .unwrap_or_else(|e| panic!("{version} {}: {e}", spec.action));
            }
            let reset = answer_csms_call(version, "m2", "Reset");
            assert!(reset.contains("Accepted"), "{reset}");
            let bogus: Value =
                serde_json::from_str(&answer_csms_call(version, "m3", "Bogus")).unwrap();
            assert_eq!(bogus[0], 4);
            assert_eq!(bogus[2], "NotImplemented");
        }
    }
}
