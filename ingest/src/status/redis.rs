//! Redis status store, shared by every ingest node.
//!
//! # Keys
//!
//! With the default prefix `csms:`, per station `S`:
//! - `csms:{S}:conn`: hash, field `{evse}:{connector}` → `"<event µs> <ConnectorStatus JSON>"`
//!   (the leading number is what the newer-wins script compares);
//! - `csms:{S}:station`: hash with `node` (last holder), `ocpp_version`,
//!   `last_seen` (µs since 1970), `boot` (JSON);
//! - `csms:{S}:presence`: hash `node`, `since` (µs), present while a node holds
//!   the socket; it expires after `presence_ttl_secs` unless refreshed, so a
//!   crashed node's stations turn disconnected by themselves;
//! - `csms:stations`: set of station ids, for listing.
//!
//! The `{S}` hash tag puts a station's three keys in one Redis Cluster slot, so
//! one Lua script call may touch all of them; the index set lives in its own
//! slot and is written by separate commands (SADD is idempotent, so it needs
//! no atomicity with the script).
//!
//! # Writes
//!
//! Writes go to a bounded coalescing queue (one pending entry per connector and
//! per station field) and a background task applies them in pipelines of
//! `EVALSHA` calls of one script: connector statuses are replaced only by a
//! newer `event_time`, presence changes are compare-and-set on the holding
//! node. Because every operation is idempotent and ordered by its own
//! timestamps, a batch that failed (Redis down) is put back into the queue and
//! replayed when Redis returns.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use dashmap::DashMap;
use metrics::{counter, gauge};
use parking_lot::Mutex;
use redis::{
    Cmd, Pipeline, RedisResult, ServerErrorKind, Value as RValue,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::{ConnectorStatus, RedisStatusConfig, StationPresence, StatusError};

/// Most operations sent in one pipeline.
const BATCH: usize = 512;
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One script for every write, so a server restart (empty script cache) is a
/// single `NOSCRIPT` case. KEYS: conn hash, station hash, presence hash.
const SCRIPT: &str = r#"
local function bump(at)
  local cur = tonumber(redis.call('HGET', KEYS[2], 'last_seen'))
  if not cur or at > cur then redis.call('HSET', KEYS[2], 'last_seen', string.format('%.0f', at)) end
end
local op = ARGV[1]
if op == 'conn' then
  local cur = redis.call('HGET', KEYS[1], ARGV[2])
  if cur then
    local t = tonumber(string.match(cur, '^(%-?%d+) '))
    if t and t >= tonumber(ARGV[3]) then return 0 end
  end
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. ' ' .. ARGV[4])
  return 1
elseif op == 'presence' then
  local ttl = ARGV[2]
  local applied = 0
  for i = 3, #ARGV, 4 do
    local kind, node, version, at = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    local holder = redis.call('HMGET', KEYS[3], 'node', 'since')
    local hnode, hsince = holder[1], tonumber(holder[2]) or 0
    if kind == 'c' then
      if not (hnode and hnode ~= node and hsince > at) then
        redis.call('HSET', KEYS[3], 'node', node, 'since', ARGV[i + 3])
        redis.call('PEXPIRE', KEYS[3], ttl)
        redis.call('HSET', KEYS[2], 'node', node, 'ocpp_version', version)
        bump(at)
        applied = 1
      end
    elseif kind == 'd' then
      if hnode == node and hsince <= at then
        redis.call('DEL', KEYS[3])
        bump(at)
        applied = 1
      end
    elseif kind == 'r' then
      if not hnode then
        redis.call('HSET', KEYS[3], 'node', node, 'since', '0')
        redis.call('PEXPIRE', KEYS[3], ttl)
        redis.call('HSET', KEYS[2], 'node', node, 'ocpp_version', version)
        applied = 1
      elseif hnode == node then
        redis.call('PEXPIRE', KEYS[3], ttl)
        applied = 1
      end
    end
  end
  return applied
elseif op == 'seen' then
  bump(tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  return 1
elseif op == 'boot' then
  redis.call('HSET', KEYS[2], 'boot', ARGV[2])
  return 1
end
return redis.error_reply('unknown status op ' .. tostring(op))
"#;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum OpKey {
    Connector(String, i32, i32),
    Presence(String),
    Seen(String),
    Boot(String),
}

impl OpKey {
    fn station(&self) -> &str {
        match self {
            OpKey::Connector(s, ..) | OpKey::Presence(s) | OpKey::Seen(s) | OpKey::Boot(s) => s,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Connected {
        node: String,
        version: String,
        at: DateTime<Utc>,
    },
    Disconnected {
        node: String,
        at: DateTime<Utc>,
    },
    Reassert {
        node: String,
        version: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Connector(ConnectorStatus),
    /// Presence changes of one station in call order, compacted to at most
    /// [connect or reassert, disconnect]; the script applies them in order,
    /// so the result equals applying every original call.
    Presence(Vec<Step>),
    Seen(DateTime<Utc>),
    Boot(Value),
}

impl Op {
    /// Folds `newer` (a later call for the same key) into `self`.
    fn absorb(&mut self, newer: Op) {
        match (self, newer) {
            (Op::Connector(cur), Op::Connector(new)) => {
                if new.event_time.timestamp_micros() > cur.event_time.timestamp_micros() {
                    *cur = new;
                }
            }
            (Op::Presence(steps), Op::Presence(new)) => {
                for step in new {
                    push_step(steps, step);
                }
            }
            (Op::Seen(cur), Op::Seen(new)) => *cur = (*cur).max(new),
            (cur @ Op::Boot(_), new @ Op::Boot(_)) => *cur = new,
            (cur, new) => *cur = new,
        }
    }
}

fn push_step(steps: &mut Vec<Step>, step: Step) {
    match step {
        // A connection supersedes what came before on this node.
        Step::Connected { .. } => *steps = vec![step],
        // A pending explicit change is more precise than a re-assertion.
        Step::Reassert { .. } if !steps.is_empty() => {}
        Step::Reassert { .. } => steps.push(step),
        Step::Disconnected { .. } => {
            if matches!(steps.last(), Some(Step::Disconnected { .. })) {
                steps.pop();
            }
            steps.push(step);
        }
    }
}

struct Pending {
    op: Op,
    /// Sequence number of the oldest call this entry covers (for `flush`).
    first_seq: u64,
}

#[derive(Default)]
struct Queue {
    map: HashMap<OpKey, Pending>,
    order: VecDeque<OpKey>,
    next_seq: u64,
    /// Oldest sequence number in the batch being applied.
    in_flight_min: Option<u64>,
}

type Batch = Vec<(OpKey, Pending)>;

impl Queue {
    /// Returns false when the update was dropped (queue full).
    fn push(&mut self, key: OpKey, op: Op, capacity: usize) -> bool {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(p) = self.map.get_mut(&key) {
            p.op.absorb(op);
            counter!("csms_status_updates_coalesced_total").increment(1);
            return true;
        }
        if self.map.len() >= capacity {
            counter!("csms_status_updates_dropped_total").increment(1);
            return false;
        }
        self.map.insert(key.clone(), Pending { op, first_seq: seq });
        self.order.push_back(key);
        gauge!("csms_status_queue_depth").set(self.map.len() as f64);
        true
    }

    fn take(&mut self, max: usize) -> Batch {
        let mut batch = Vec::new();
        while batch.len() < max
            && let Some(key) = self.order.pop_front()
        {
            if let Some(p) = self.map.remove(&key) {
                batch.push((key, p));
            }
        }
        self.in_flight_min = batch.iter().map(|(_, p)| p.first_seq).min();
        gauge!("csms_status_queue_depth").set(self.map.len() as f64);
        batch
    }

    /// Puts a failed batch back in front, under newer pending calls.
    fn requeue(&mut self, batch: Batch) {
        for (key, mut older) in batch.into_iter().rev() {
            match self.map.remove(&key) {
                Some(newer) => {
                    older.op.absorb(newer.op);
                    older.first_seq = older.first_seq.min(newer.first_seq);
                    self.map.insert(key, older);
                }
                None => {
                    self.map.insert(key.clone(), older);
                    self.order.push_front(key);
                }
            }
        }
        self.in_flight_min = None;
        gauge!("csms_status_queue_depth").set(self.map.len() as f64);
    }

    /// Whether every call numbered below `seq` has been applied.
    fn applied_before(&self, seq: u64) -> bool {
        self.in_flight_min.is_none_or(|m| m >= seq) && self.map.values().all(|p| p.first_seq >= seq)
    }

    fn purge_station(&mut self, station: &str) {
        self.map.retain(|k, _| k.station() != station);
        self.order.retain(|k| k.station() != station);
        gauge!("csms_status_queue_depth").set(self.map.len() as f64);
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Runs groups of commands; each group touches one cluster slot. On one
    /// server all groups share one pipeline; on a cluster each group is its
    /// own pipeline (redis-rs refuses cross-slot pipelines). Server errors
    /// come back per command; connection errors fail the whole call.
    async fn run(&self, groups: Vec<Vec<Cmd>>) -> RedisResult<Vec<Vec<RValue>>> {
        match self {
            Conn::Single(_) if groups.iter().all(Vec::is_empty) => {
                Ok(groups.iter().map(|_| Vec::new()).collect())
            }
            Conn::Single(c) => {
                let mut pipe = Pipeline::with_capacity(groups.iter().map(Vec::len).sum());
                pipe.ignore_errors();
                for cmd in groups.iter().flatten() {
                    pipe.add_command(cmd.clone());
                }
                let mut all: Vec<RValue> = pipe.query_async(&mut c.clone()).await?;
                let mut out = Vec::with_capacity(groups.len());
                for g in groups.iter().rev() {
                    out.push(all.split_off(all.len() - g.len()));
                }
                out.reverse();
                Ok(out)
            }
            Conn::Cluster(c) => {
                let futures = groups.into_iter().map(|g| {
                    let mut c = c.clone();
                    async move {
                        let mut pipe = Pipeline::with_capacity(g.len());
                        pipe.ignore_errors();
                        for cmd in g {
                            pipe.add_command(cmd);
                        }
                        pipe.query_async::<Vec<RValue>>(&mut c).await
                    }
                });
                futures_util::future::join_all(futures)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }

    async fn one(&self, cmd: Cmd) -> RedisResult<RValue> {
        let mut out = self.run(vec![vec![cmd]]).await?;
        match out.pop().and_then(|mut g| g.pop()) {
            Some(RValue::ServerError(e)) => Err(e.into()),
            Some(v) => Ok(v),
            None => Ok(RValue::Nil),
        }
    }
}

struct Keys {
    conn: String,
    station: String,
    presence: String,
    /// A password verification shared by the nodes (`crate::shared_auth`).
    auth: String,
}

struct Inner {
    conn: Conn,
    config: RedisStatusConfig,
    script: redis::Script,
    queue: Mutex<Queue>,
    /// Wakes the writer when something is queued.
    work: Notify,
    /// Bumped whenever a batch completes or is put back, for `flush`.
    progress: watch::Sender<u64>,
    up: AtomicBool,
    recoveries: watch::Sender<u64>,
    /// Stations connected through this store (station → (node, version)),
    /// whose presence the writer refreshes and repairs.
    held: DashMap<String, (String, String)>,
}

/// Redis-backed status store. Cheap to clone. The writer task stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

fn bad_url(url: &str, reason: impl Into<String>) -> StatusError {
    StatusError::BadUrl {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// Node URLs when `url` names a cluster, else None.
pub fn cluster_nodes(url: &str) -> Result<Option<Vec<String>>, StatusError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        bad_url(
            url,
            "expected redis://, rediss://, redis+cluster:// or rediss+cluster://",
        )
    })?;
    let node_scheme = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        "redis" | "rediss" if url.contains(',') => {
            let nodes: Vec<String> = url.split(',').map(|s| s.trim().to_string()).collect();
            if nodes.iter().any(|n| !n.contains("://")) {
                return Err(bad_url(
                    url,
                    "each node of a cluster list needs its scheme, e.g. redis://h1:7000,redis://h2:7000",
                ));
            }
            return Ok(Some(nodes));
        }
        "redis" | "rediss" => return Ok(None),
        other => return Err(bad_url(url, format!("unsupported scheme {other:?}"))),
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{node_scheme}://{userinfo}{h}{tail}"))
        .collect();
    if nodes.is_empty() {
        return Err(bad_url(url, "no cluster node"));
    }
    Ok(Some(nodes))
}

/// A TTL as Redis `PX` / `PEXPIRE` milliseconds (at least 1: 0 is an error).
fn expiry_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(key: &str, s: &str) -> Result<DateTime<Utc>, StatusError> {
    s.parse::<i64>()
        .ok()
        .and_then(|m| Utc.timestamp_micros(m).single())
        .ok_or_else(|| StatusError::Decode {
            key: key.to_string(),
            reason: format!("bad timestamp {s:?}"),
        })
}

fn decode_hash(key: &str, v: RValue) -> Result<HashMap<String, String>, StatusError> {
    match v {
        RValue::ServerError(e) => Err(StatusError::Redis(e.into())),
        v => redis::from_redis_value(v).map_err(|e| StatusError::Decode {
            key: key.to_string(),
            reason: e.to_string(),
        }),
    }
}

impl RedisStore {
    pub(super) async fn connect(url: &str, config: RedisStatusConfig) -> Result<Self, StatusError> {
        if config.key_prefix.contains(['{', '}']) {
            return Err(StatusError::BadConfig(format!(
                "key_prefix {:?} must not contain braces (they are Redis Cluster hash tags)",
                config.key_prefix
            )));
        }
        if config.queue_capacity == 0 || config.presence_ttl_secs == 0 {
            return Err(StatusError::BadConfig(
                "queue_capacity and presence_ttl_secs must be positive".into(),
            ));
        }
        let conn = match cluster_nodes(url)? {
            None => {
                let client = redis::Client::open(url).map_err(|e| bad_url(url, e.to_string()))?;
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_max_delay(Duration::from_secs(2));
                Conn::Single(ConnectionManager::new_with_config(client, cfg).await?)
            }
            Some(nodes) => {
                let client = ClusterClient::builder(nodes)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| bad_url(url, e.to_string()))?;
                Conn::Cluster(client.get_async_connection().await?)
            }
        };
        let inner = Arc::new(Inner {
            conn,
            config,
            script: redis::Script::new(SCRIPT),
            queue: Mutex::new(Queue::default()),
            work: Notify::new(),
            progress: watch::Sender::new(0),
            up: AtomicBool::new(true),
            recoveries: watch::Sender::new(0),
            held: DashMap::new(),
        });
        gauge!("csms_status_redis_up").set(1.0);
        tokio::spawn(writer(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    fn enqueue(&self, key: OpKey, op: Op) {
        self.inner.enqueue(key, op);
    }

    pub fn put_connector(&self, s: ConnectorStatus) {
        let key = OpKey::Connector(s.station_id.clone(), s.evse_id, s.connector_id);
        self.enqueue(key, Op::Connector(s));
    }

    pub fn connected(&self, station: &str, node: &str, version: &str, at: DateTime<Utc>) {
        self.inner
            .held
            .insert(station.to_string(), (node.to_string(), version.to_string()));
        self.enqueue(
            OpKey::Presence(station.to_string()),
            Op::Presence(vec![Step::Connected {
                node: node.to_string(),
                version: version.to_string(),
                at,
            }]),
        );
    }

    pub fn disconnected(&self, station: &str, node: &str, at: DateTime<Utc>) {
        self.inner.held.remove_if(station, |_, (n, _)| n == node);
        self.enqueue(
            OpKey::Presence(station.to_string()),
            Op::Presence(vec![Step::Disconnected {
                node: node.to_string(),
                at,
            }]),
        );
    }

    pub fn seen(&self, station: &str, at: DateTime<Utc>) {
        self.enqueue(OpKey::Seen(station.to_string()), Op::Seen(at));
    }

    pub fn boot(&self, station: &str, info: Value) {
        self.enqueue(OpKey::Boot(station.to_string()), Op::Boot(info));
    }

    pub fn reassert_presence(&self, node: &str, stations: Vec<(String, String)>) {
        for (station, version) in stations {
            self.enqueue(
                OpKey::Presence(station),
                Op::Presence(vec![Step::Reassert {
                    node: node.to_string(),
                    version,
                }]),
            );
        }
    }

    pub fn recoveries(&self) -> watch::Receiver<u64> {
        self.inner.recoveries.subscribe()
    }

    pub async fn station(&self, station: &str) -> Result<Option<StationPresence>, StatusError> {
        let mut all = self.read_stations(&[station.to_string()]).await?;
        Ok(all.pop().flatten())
    }

    pub async fn stations(&self) -> Result<Vec<StationPresence>, StatusError> {
        let ids = self.index().await?;
        let mut v: Vec<_> = self
            .read_stations(&ids)
            .await?
            .into_iter()
            .flatten()
            .collect();
        v.sort_by(|a, b| a.station_id.cmp(&b.station_id));
        Ok(v)
    }

    pub async fn connectors(
        &self,
        station: Option<&str>,
    ) -> Result<Vec<ConnectorStatus>, StatusError> {
        let ids = match station {
            Some(s) => vec![s.to_string()],
            None => self.index().await?,
        };
        let keys: Vec<String> = ids.iter().map(|s| self.inner.keys(s).conn).collect();
        let groups = keys
            .iter()
            .map(|k| vec![redis::cmd("HGETALL").arg(k).clone()])
            .collect();
        let results = self.inner.conn.run(groups).await?;
        let mut out = Vec::new();
        for (key, mut g) in keys.iter().zip(results) {
            let hash = decode_hash(key, g.pop().unwrap_or(RValue::Nil))?;
            for (field, value) in hash {
                let json =
                    value
                        .split_once(' ')
                        .map(|(_, j)| j)
                        .ok_or_else(|| StatusError::Decode {
                            key: format!("{key} {field}"),
                            reason: "expected \"<µs> <json>\"".into(),
                        })?;
                out.push(serde_json::from_str::<ConnectorStatus>(json).map_err(|e| {
                    StatusError::Decode {
                        key: format!("{key} {field}"),
                        reason: e.to_string(),
                    }
                })?);
            }
        }
        out.sort_by(|a, b| {
            (&a.station_id, a.evse_id, a.connector_id).cmp(&(
                &b.station_id,
                b.evse_id,
                b.connector_id,
            ))
        });
        Ok(out)
    }

    /// Deletes the station's keys and its pending updates. An update already
    /// in flight when this runs may re-create some of them.
    pub async fn remove_station(&self, station: &str) -> Result<(), StatusError> {
        self.inner.queue.lock().purge_station(station);
        self.inner.held.remove(station);
        let k = self.inner.keys(station);
        let groups = vec![
            vec![
                redis::cmd("DEL")
                    .arg(&k.conn)
                    .arg(&k.station)
                    .arg(&k.presence)
                    .arg(&k.auth)
                    .clone(),
            ],
            vec![
                redis::cmd("SREM")
                    .arg(self.inner.index_key())
                    .arg(station)
                    .clone(),
            ],
        ];
        for g in self.inner.conn.run(groups).await? {
            for v in g {
                if let RValue::ServerError(e) = v {
                    return Err(StatusError::Redis(e.into()));
                }
            }
        }
        Ok(())
    }

    /// The verification tag stored for `station`, if any.
    pub async fn verification(&self, station: &str) -> Result<Option<String>, StatusError> {
        let key = self.inner.keys(station).auth;
        match self
            .inner
            .conn
            .one(redis::cmd("GET").arg(key).clone())
            .await?
        {
            RValue::BulkString(b) => Ok(String::from_utf8(b).ok()),
            RValue::SimpleString(s) => Ok(Some(s)),
            _ => Ok(None),
        }
    }

    /// Stores `tag` as `station`'s verification for `ttl`.
    pub async fn put_verification(
        &self,
        station: &str,
        tag: &str,
        ttl: Duration,
    ) -> Result<(), StatusError> {
        let key = self.inner.keys(station).auth;
        let ms = expiry_ms(ttl);
        let cmd = redis::cmd("SET")
            .arg(key)
            .arg(tag)
            .arg("PX")
            .arg(ms)
            .clone();
        self.inner.conn.one(cmd).await?;
        Ok(())
    }

    /// Extends the stored verifications of `stations` (those that have one)
    /// to `ttl` from now, in pipelines of a thousand.
    pub async fn touch_verifications(
        &self,
        stations: &[String],
        ttl: Duration,
    ) -> Result<(), StatusError> {
        let ms = expiry_ms(ttl);
        for chunk in stations.chunks(1000) {
            let groups = chunk
                .iter()
                .map(|s| {
                    vec![
                        redis::cmd("PEXPIRE")
                            .arg(self.inner.keys(s).auth)
                            .arg(ms)
                            .clone(),
                    ]
                })
                .collect();
            self.inner.conn.run(groups).await?;
        }
        Ok(())
    }

    pub async fn flush(&self, timeout: Duration) -> bool {
        let inner = &self.inner;
        let target = inner.queue.lock().next_seq;
        let mut rx = inner.progress.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if inner.queue.lock().applied_before(target) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return inner.queue.lock().applied_before(target);
            }
        }
    }

    async fn index(&self) -> Result<Vec<String>, StatusError> {
        let v = self
            .inner
            .conn
            .one(redis::cmd("SMEMBERS").arg(self.inner.index_key()).clone())
            .await?;
        redis::from_redis_value(v).map_err(|e| StatusError::Decode {
            key: self.inner.index_key(),
            reason: e.to_string(),
        })
    }

    async fn read_stations(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<StationPresence>>, StatusError> {
        let keys: Vec<Keys> = ids.iter().map(|s| self.inner.keys(s)).collect();
        let groups = keys
            .iter()
            .map(|k| {
                vec![
                    redis::cmd("HGETALL").arg(&k.station).clone(),
                    redis::cmd("HGETALL").arg(&k.presence).clone(),
                ]
            })
            .collect();
        let results = self.inner.conn.run(groups).await?;
        let mut out = Vec::with_capacity(ids.len());
        for ((id, k), g) in ids.iter().zip(&keys).zip(results) {
            let mut g = g.into_iter();
            let station = decode_hash(&k.station, g.next().unwrap_or(RValue::Nil))?;
            let presence = decode_hash(&k.presence, g.next().unwrap_or(RValue::Nil))?;
            if station.is_empty() && presence.is_empty() {
                out.push(None);
                continue;
            }
            let last_seen = station
                .get("last_seen")
                .map(|s| from_micros(&k.station, s))
                .transpose()?;
            let boot = station
                .get("boot")
                .map(|b| serde_json::from_str(b))
                .transpose()
                .map_err(|e| StatusError::Decode {
                    key: k.station.clone(),
                    reason: e.to_string(),
                })?;
            out.push(Some(StationPresence {
                station_id: id.clone(),
                connected: presence.contains_key("node"),
                node: presence.get("node").or(station.get("node")).cloned(),
                last_seen,
                ocpp_version: station.get("ocpp_version").cloned(),
                boot,
            }));
        }
        Ok(out)
    }
}

impl Inner {
    fn keys(&self, station: &str) -> Keys {
        let p = &self.config.key_prefix;
        Keys {
            conn: format!("{p}{{{station}}}:conn"),
            station: format!("{p}{{{station}}}:station"),
            presence: format!("{p}{{{station}}}:presence"),
            auth: format!("{p}{{{station}}}:auth"),
        }
    }

    fn index_key(&self) -> String {
        format!("{}stations", self.config.key_prefix)
    }

    fn ttl_ms(&self) -> u64 {
        self.config.presence_ttl_secs.saturating_mul(1000)
    }

    fn enqueue(&self, key: OpKey, op: Op) {
        if self.queue.lock().push(key, op, self.config.queue_capacity) {
            self.work.notify_one();
        }
    }

    /// Refreshes (or repairs) the presence of the stations this store holds.
    fn reassert_held(&self) {
        let held: Vec<(String, String, String)> = self
            .held
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone(), e.value().1.clone()))
            .collect();
        tracing::debug!(stations = held.len(), "re-asserting presence");
        for (station, node, version) in held {
            self.enqueue(
                OpKey::Presence(station),
                Op::Presence(vec![Step::Reassert { node, version }]),
            );
        }
    }

    /// The script call for one operation; `eval` sends the script text
    /// instead of its hash (after `NOSCRIPT`).
    fn command(&self, key: &OpKey, op: &Op, eval: bool) -> Cmd {
        let k = self.keys(key.station());
        let mut cmd = if eval {
            redis::cmd("EVAL").arg(SCRIPT).clone()
        } else {
            redis::cmd("EVALSHA").arg(self.script.get_hash()).clone()
        };
        cmd.arg(3).arg(&k.conn).arg(&k.station).arg(&k.presence);
        match op {
            Op::Connector(s) => {
                let json = serde_json::to_string(s).unwrap_or_default();
                cmd.arg("conn")
                    .arg(format!("{}:{}", s.evse_id, s.connector_id))
                    .arg(micros(s.event_time))
                    .arg(json);
            }
            Op::Presence(steps) => {
                cmd.arg("presence").arg(self.ttl_ms());
                for step in steps {
                    match step {
                        Step::Connected { node, version, at } => {
                            cmd.arg("c").arg(node).arg(version).arg(micros(*at));
                        }
                        Step::Disconnected { node, at } => {
                            cmd.arg("d").arg(node).arg("").arg(micros(*at));
                        }
                        Step::Reassert { node, version } => {
                            cmd.arg("r").arg(node).arg(version).arg(0);
                        }
                    }
                }
            }
            Op::Seen(at) => {
                cmd.arg("seen").arg(micros(*at)).arg(self.ttl_ms());
            }
            Op::Boot(info) => {
                cmd.arg("boot").arg(info.to_string());
            }
        }
        cmd
    }

    /// Applies a batch. Err means a connection failure or a transient server
    /// state: nothing can be assumed applied and the batch must be retried
    /// (every operation is idempotent).
    async fn apply(&self, batch: &Batch) -> RedisResult<()> {
        let mut todo: Vec<usize> = (0..batch.len()).collect();
        let mut eval = false;
        loop {
            // Group by station (one slot each), index updates in their own group.
            let mut by_station: HashMap<&str, Vec<usize>> = HashMap::new();
            for &i in &todo {
                by_station.entry(batch[i].0.station()).or_default().push(i);
            }
            let mut order: Vec<Vec<usize>> = Vec::new();
            let mut groups = Vec::new();
            for idx in by_station.values() {
                groups.push(
                    idx.iter()
                        .map(|&i| self.command(&batch[i].0, &batch[i].1.op, eval))
                        .collect(),
                );
                order.push(idx.clone());
            }
            let mut sadd = redis::cmd("SADD");
            sadd.arg(self.index_key());
            for s in by_station.keys() {
                sadd.arg(*s);
            }
            groups.push(vec![sadd]);
            order.push(Vec::new());
            let results = self.conn.run(groups).await?;
            let mut noscript = Vec::new();
            let mut transient = None;
            for (idx, values) in order.iter().zip(results) {
                for (n, v) in values.into_iter().enumerate() {
                    let RValue::ServerError(e) = v else {
                        continue;
                    };
                    match (idx.get(n), e.kind()) {
                        (Some(&i), Some(ServerErrorKind::NoScript)) if !eval => noscript.push(i),
                        // Loading, failover, busy script: retry the batch later.
                        (
                            _,
                            Some(
                                ServerErrorKind::BusyLoading
                                | ServerErrorKind::TryAgain
                                | ServerErrorKind::ClusterDown
                                | ServerErrorKind::MasterDown
                                | ServerErrorKind::ReadOnly,
                            ),
                        ) => transient = Some(e),
                        _ if e.code() == "BUSY" => transient = Some(e),
                        (which, _) => {
                            // A server-side refusal (OOM, wrong type...):
                            // retrying would not help; report and drop.
                            counter!("csms_status_redis_write_errors_total").increment(1);
                            tracing::error!(
                                key = ?which.map(|&i| &batch[i].0),
                                error = %e,
                                "status store: Redis refused an update"
                            );
                        }
                    }
                }
            }
            if let Some(e) = transient {
                return Err(e.into());
            }
            counter!("csms_status_redis_writes_total")
                .increment((todo.len() - noscript.len()) as u64);
            if noscript.is_empty() {
                return Ok(());
            }
            // Script cache empty (server restarted): EVAL loads it.
            todo = noscript;
            eval = true;
        }
    }

    fn set_up(&self, up: bool, error: Option<&redis::RedisError>) {
        let was = self.up.swap(up, Ordering::SeqCst);
        if was == up {
            return;
        }
        gauge!("csms_status_redis_up").set(if up { 1.0 } else { 0.0 });
        if up {
            tracing::info!(
                "status store: Redis is reachable again; replaying queued updates and repairing presence"
            );
            self.recoveries.send_modify(|n| *n += 1);
            self.reassert_held();
        } else {
            counter!("csms_status_redis_outages_total").increment(1);
            tracing::warn!(
                error = error.map(|e| e.to_string()).unwrap_or_default(),
                "status store: Redis is unavailable; queueing updates (latest per key)"
            );
        }
    }
}

/// The background writer. Holds only a weak reference between iterations so
/// that dropping every handle stops it.
async fn writer(weak: Weak<Inner>) {
    let mut backoff = Duration::from_millis(50);
    let mut last_refresh = tokio::time::Instant::now();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let refresh_every = Duration::from_millis((inner.ttl_ms() / 3).max(100));
        let tick = refresh_every.min(Duration::from_secs(1));
        if last_refresh.elapsed() >= refresh_every {
            last_refresh = tokio::time::Instant::now();
            inner.reassert_held();
        }
        let batch = inner.queue.lock().take(BATCH);
        if batch.is_empty() {
            let notified = inner.work.notified();
            if tokio::time::timeout(tick, notified).await.is_err() {
                // Idle: a ping notices outages and recoveries without traffic.
                match inner.conn.one(redis::cmd("PING")).await {
                    Ok(_) => inner.set_up(true, None),
                    Err(e) => inner.set_up(false, Some(&e)),
                }
            }
            continue;
        }
        match inner.apply(&batch).await {
            Ok(()) => {
                inner.queue.lock().in_flight_min = None;
                inner.progress.send_modify(|n| *n += 1);
                inner.set_up(true, None);
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                inner.queue.lock().requeue(batch);
                inner.progress.send_modify(|n| *n += 1);
                inner.set_up(false, Some(&e));
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    fn cs(secs: i64, status: &str) -> Op {
        Op::Connector(ConnectorStatus {
            station_id: "S".into(),
            evse_id: 1,
            connector_id: 1,
            status: status.into(),
            error_code: None,
            info: None,
            event_time: at(secs),
            updated_at: at(secs),
        })
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(cluster_nodes("redis://h:6379/0").unwrap(), None);
        assert_eq!(
            cluster_nodes("rediss+cluster://u:p@a:1,b:2/?x=1")
                .unwrap()
                .unwrap(),
            vec!["rediss://u:p@a:1/?x=1", "rediss://u:p@b:2/?x=1"]
        );
        assert_eq!(
            cluster_nodes("redis://a:1, redis://b:2").unwrap().unwrap(),
            vec!["redis://a:1", "redis://b:2"]
        );
        assert!(cluster_nodes("redis://a:1,b:2").is_err());
        assert!(cluster_nodes("http://a").is_err());
    }

    #[test]
    fn queue_coalesces_keeps_newest_and_bounds() {
        let mut q = Queue::default();
        let k = OpKey::Connector("S".into(), 1, 1);
        assert!(q.push(k.clone(), cs(20, "B"), 2));
        assert!(q.push(k.clone(), cs(10, "A"), 2));
        assert!(q.push(k.clone(), cs(20, "C"), 2));
        assert_eq!(q.map.len(), 1);
        assert_eq!(q.map[&k].op, cs(20, "B"));
        assert!(q.push(OpKey::Seen("S".into()), Op::Seen(at(5)), 2));
        assert!(!q.push(OpKey::Boot("S".into()), Op::Boot(Value::Null), 2));
        assert!(!q.applied_before(1));
        let batch = q.take(10);
        assert_eq!(batch.len(), 2);
        assert!(!q.applied_before(1));
        // New call while the batch is in flight, then the batch fails.
        assert!(q.push(k.clone(), cs(30, "D"), 2));
        q.requeue(batch);
        assert_eq!(q.map[&k].op, cs(30, "D"));
        assert_eq!(q.map[&k].first_seq, 0);
        assert_eq!(q.order.len(), 2);
        let _ = q.take(10);
        q.in_flight_min = None;
        assert!(q.applied_before(q.next_seq));
    }

    #[test]
    fn presence_steps_compact_in_order() {
        let c = |n: &str, s| Step::Connected {
            node: n.into(),
            version: "1.6".into(),
            at: at(s),
        };
        let d = |n: &str, s| Step::Disconnected {
            node: n.into(),
            at: at(s),
        };
        let r = Step::Reassert {
            node: "a".into(),
            version: "1.6".into(),
        };
        let mut steps = vec![];
        push_step(&mut steps, r.clone());
        push_step(&mut steps, c("a", 1));
        push_step(&mut steps, r.clone());
        push_step(&mut steps, d("a", 2));
        push_step(&mut steps, d("a", 3));
        assert_eq!(steps, vec![c("a", 1), d("a", 3)]);
        push_step(&mut steps, c("a", 4));
        assert_eq!(steps, vec![c("a", 4)]);
    }
}
