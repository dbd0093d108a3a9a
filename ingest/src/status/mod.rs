//! The live status store: the latest status per (station, evse, connector) and
//! each station's presence (connected, node, last seen, boot info).
//!
//! Writes follow one rule: a connector status is replaced only by an event
//! with a newer timestamp, so replays and out-of-order delivery are harmless.
//! Two implementations share one contract (see the `contract` tests):
//! [`EmbeddedStore`] (in-process, used when no `REDIS_URL` is configured) and
//! [`RedisStore`] (shared by every node). [`StatusStore`] is the handle callers
//! hold. Writes never block nor fail the caller; reads are async and fallible
//! because Redis may be unreachable.
//!
//! Timestamps are compared at microsecond precision in both implementations
//! (Redis Lua numbers are doubles; microseconds since 1970 stay exact).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod embedded;
mod redis;

#[cfg(test)]
mod contract;

pub use self::redis::RedisStore;
pub use self::redis::cluster_nodes;
pub use embedded::EmbeddedStore;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorStatus {
    pub station_id: String,
    /// 0 where the version has no EVSE level (1.6).
    pub evse_id: i32,
    pub connector_id: i32,
    pub status: String,
    pub error_code: Option<String>,
    pub info: Option<String>,
    pub event_time: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StationPresence {
    pub station_id: String,
    pub connected: bool,
    /// The node holding the socket, or the last one that held it.
    pub node: Option<String>,
    pub last_seen: Option<DateTime<Utc>>,
    pub ocpp_version: Option<String>,
    pub boot: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("invalid Redis URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid status store configuration: {0}")]
    BadConfig(String),
    #[error("Redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("undecodable value in Redis key {key}: {reason}")]
    Decode { key: String, reason: String },
}

/// Settings of the Redis status store (`[status]`-style TOML table or defaults).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct RedisStatusConfig {
    /// Most distinct pending updates (per connector / per station field) held
    /// while Redis is slow or down; beyond it new keys are dropped and counted.
    pub queue_capacity: usize,
    /// Presence keys expire unless refreshed: a crashed node's stations show
    /// disconnected after this. The store refreshes the stations its node
    /// holds every third of it.
    pub presence_ttl_secs: u64,
    /// Prefix of every key; must not contain `{` or `}` (hash tags).
    pub key_prefix: String,
    /// How long a password verification shared by the nodes stays valid
    /// without a connection of its station (see `crate::shared_auth`);
    /// 0 shares none (nothing derived from passwords is stored in Redis).
    pub verification_ttl_secs: u64,
}

impl Default for RedisStatusConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 100_000,
            presence_ttl_secs: 60,
            key_prefix: "csms:".into(),
            verification_ttl_secs: 24 * 60 * 60,
        }
    }
}

/// One handle for both implementations; cheap to clone.
#[derive(Clone)]
pub enum StatusStore {
    Embedded(EmbeddedStore),
    Redis(RedisStore),
}

impl StatusStore {
    pub fn embedded() -> Self {
        Self::Embedded(EmbeddedStore::new())
    }

    /// Connects and starts the background writer task. Accepts `redis://` and
    /// `rediss://` (TLS) URLs for one server, and for Redis Cluster either a
    /// comma-separated list of node URLs
    /// (`redis://h1:7000,redis://h2:7000`) or `redis+cluster://h1:7000,h2:7000`
    /// (`rediss+cluster://` for TLS; user info, path and query of the URL apply
    /// to every node). Fails when the URL is invalid or no server answers.
    pub async fn redis(url: &str, config: RedisStatusConfig) -> Result<Self, StatusError> {
        Ok(Self::Redis(RedisStore::connect(url, config).await?))
    }

    pub fn is_redis(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    /// The Redis store, for what only a store shared by nodes can do.
    pub fn as_redis(&self) -> Option<&RedisStore> {
        match self {
            Self::Redis(r) => Some(r),
            Self::Embedded(_) => None,
        }
    }

    /// Stores `s` unless the stored status for its connector is at least as new.
    pub fn put_connector(&self, s: ConnectorStatus) {
        match self {
            Self::Embedded(e) => {
                e.put_connector(s);
            }
            Self::Redis(r) => r.put_connector(s),
        }
    }

    /// `node` now holds the station's socket, unless another node holds it
    /// since a later time.
    pub fn connected(&self, station: &str, node: &str, version: &str, at: DateTime<Utc>) {
        match self {
            Self::Embedded(e) => e.connected(station, node, version, at),
            Self::Redis(r) => r.connected(station, node, version, at),
        }
    }

    /// Marks the station disconnected, only if `node` still holds it.
    pub fn disconnected(&self, station: &str, node: &str, at: DateTime<Utc>) {
        match self {
            Self::Embedded(e) => e.disconnected(station, node, at),
            Self::Redis(r) => r.disconnected(station, node, at),
        }
    }

    pub fn seen(&self, station: &str, at: DateTime<Utc>) {
        match self {
            Self::Embedded(e) => e.seen(station, at),
            Self::Redis(r) => r.seen(station, at),
        }
    }

    pub fn boot(&self, station: &str, info: Value) {
        match self {
            Self::Embedded(e) => e.boot(station, info),
            Self::Redis(r) => r.boot(station, info),
        }
    }

    /// Presence repair after an outage: re-asserts `connected` for every
    /// station `node` holds, without displacing another node that holds one
    /// of them. The Redis store already does this by itself for the stations
    /// it saw connect through `connected` (periodically and when Redis comes
    /// back); this is for callers that want to force it.
    pub fn reassert_presence(&self, node: &str, stations: Vec<(String, String)>) {
        match self {
            Self::Embedded(e) => e.reassert_presence(node, stations),
            Self::Redis(r) => r.reassert_presence(node, stations),
        }
    }

    pub async fn station(&self, station: &str) -> Result<Option<StationPresence>, StatusError> {
        match self {
            Self::Embedded(e) => Ok(e.station(station)),
            Self::Redis(r) => r.station(station).await,
        }
    }

    /// Every station with presence information, sorted by id.
    pub async fn stations(&self) -> Result<Vec<StationPresence>, StatusError> {
        match self {
            Self::Embedded(e) => Ok(e.stations()),
            Self::Redis(r) => r.stations().await,
        }
    }

    /// Connector statuses of one station or all, sorted by (station, evse, connector).
    pub async fn connectors(
        &self,
        station: Option<&str>,
    ) -> Result<Vec<ConnectorStatus>, StatusError> {
        match self {
            Self::Embedded(e) => Ok(e.connectors(station)),
            Self::Redis(r) => r.connectors(station).await,
        }
    }

    /// Forgets a station (it was removed from the registry): every key of it,
    /// and its pending queued updates.
    pub async fn remove_station(&self, station: &str) -> Result<(), StatusError> {
        match self {
            Self::Embedded(e) => {
                e.remove_station(station);
                Ok(())
            }
            Self::Redis(r) => r.remove_station(station).await,
        }
    }

    /// Waits until the writes queued before this call are applied (tests,
    /// shutdown), bounded by `timeout`. Returns whether they were.
    pub async fn flush(&self, timeout: Duration) -> bool {
        match self {
            Self::Embedded(_) => true,
            Self::Redis(r) => r.flush(timeout).await,
        }
    }

    /// Changes each time Redis comes back after an outage (None for the
    /// embedded store). The store repairs the presence of the stations it saw
    /// connect by itself; subscribe to do more.
    pub fn recoveries(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Self::Embedded(_) => None,
            Self::Redis(r) => Some(r.recoveries()),
        }
    }
}
