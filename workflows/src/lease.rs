//! Leases: "exactly one node does this". With several nodes sharing Redis,
//! a scheduled run (or the alert evaluator) is done by whoever takes its
//! lease; the others see it taken and skip. A lease has a time to live, so a
//! node that dies mid-run frees it; the holder renews it while working.
//! A finished run's lease is turned into a "done" marker kept for a while,
//! so a node that wakes up late (catch-up) does not run it again.
//!
//! Without Redis there is one node, and an in-process map gives the same
//! semantics.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use redis::aio::ConnectionManager;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("invalid Redis URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Takes `KEYS[1]` for `ARGV[1]` for `ARGV[2]` ms: renews when the caller
/// holds it already, fails when another holder or a done marker has it.
const ACQUIRE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if v then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Replaces the caller's lease with `ARGV[2]` kept for `ARGV[3]` ms (0:
/// delete), only if the caller holds it.
const FINISH: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
";

/// The in-process leases: key → (holder, expiry).
type LocalLeases = Arc<Mutex<HashMap<String, (String, DateTime<Utc>)>>>;

/// Where leases live. Cheap to clone.
#[derive(Clone)]
pub enum LeaseStore {
    Local(LocalLeases),
    Redis {
        conn: ConnectionManager,
        prefix: String,
    },
}

impl LeaseStore {
    /// One node, no Redis.
    pub fn local() -> Self {
        LeaseStore::Local(Default::default())
    }

    /// Leases in Redis under `{prefix}lease:{key}`. A cluster URL (as the
    /// status store accepts) uses its first node, as command routing does,
    /// so every node agrees on where a lease lives.
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, LeaseError> {
        let single = match ingest::status::cluster_nodes(url) {
            Ok(Some(nodes)) => nodes.into_iter().next().unwrap_or_default(),
            Ok(None) => url.to_string(),
            Err(e) => {
                return Err(LeaseError::Url {
                    url: url.into(),
                    reason: e.to_string(),
                });
            }
        };
        let client = redis::Client::open(single.as_str()).map_err(|e| LeaseError::Url {
            url: url.into(),
            reason: e.to_string(),
        })?;
        let conn = ConnectionManager::new(client).await?;
        Ok(LeaseStore::Redis {
            conn,
            prefix: format!("{prefix}lease:"),
        })
    }

    /// Takes (or renews) `key` for `holder` for `ttl`. `Ok(false)`: another
    /// holder has it, or it was finished with a done marker still kept.
    /// `now` only matters for the local store (Redis expires by itself).
    pub async fn acquire(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, LeaseError> {
        match self {
            LeaseStore::Local(map) => {
                let mut map = map.lock();
                let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
                match map.get(key) {
                    Some((h, exp)) if *exp > now && h != holder => Ok(false),
                    _ => {
                        map.insert(key.to_string(), (holder.to_string(), until));
                        Ok(true)
                    }
                }
            }
            LeaseStore::Redis { conn, prefix } => {
                let taken: i64 = redis::Script::new(ACQUIRE)
                    .key(format!("{prefix}{key}"))
                    .arg(holder)
                    .arg(ttl.as_millis().max(1) as u64)
                    .invoke_async(&mut conn.clone())
                    .await?;
                Ok(taken == 1)
            }
        }
    }

    /// Ends `holder`'s lease on `key`: with `keep_done = Some(d)` a done
    /// marker stays for `d` (nobody can take the key meanwhile), with `None`
    /// the key is free at once. A lease `holder` no longer has is left alone.
    pub async fn finish(
        &self,
        key: &str,
        holder: &str,
        keep_done: Option<Duration>,
        now: DateTime<Utc>,
    ) -> Result<(), LeaseError> {
        let marker = format!("done:{holder}");
        match self {
            LeaseStore::Local(map) => {
                let mut map = map.lock();
                if map.get(key).is_some_and(|(h, _)| h == holder) {
                    match keep_done {
                        Some(d) => {
                            let until = now
                                + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
                            map.insert(key.to_string(), (marker, until));
                        }
                        None => {
                            map.remove(key);
                        }
                    }
                }
                // Keep the map from growing with expired markers.
                map.retain(|_, (_, exp)| *exp > now);
                Ok(())
            }
            LeaseStore::Redis { conn, prefix } => {
                let _: i64 = redis::Script::new(FINISH)
                    .key(format!("{prefix}{key}"))
                    .arg(holder)
                    .arg(marker)
                    .arg(keep_done.map_or(0, |d| d.as_millis().max(1) as u64))
                    .invoke_async(&mut conn.clone())
                    .await?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingest::test_redis::RedisServer;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// The same contract for both stores.
    async fn contract(store: LeaseStore) {
        let now = t("2027-03-01T00:00:00Z");
        let ttl = Duration::from_secs(60);
        assert!(store.acquire("run-a", "n1", ttl, now).await.unwrap());
        assert!(!store.acquire("run-a", "n2", ttl, now).await.unwrap());
        // Renewal by the holder.
        assert!(store.acquire("run-a", "n1", ttl, now).await.unwrap());
        // A stranger cannot finish it.
        store.finish("run-a", "n2", None, now).await.unwrap();
        assert!(!store.acquire("run-a", "n2", ttl, now).await.unwrap());
        // Done marker: nobody, not even the old holder, takes it again.
        store
            .finish("run-a", "n1", Some(Duration::from_secs(3600)), now)
            .await
            .unwrap();
        assert!(!store.acquire("run-a", "n2", ttl, now).await.unwrap());
        assert!(!store.acquire("run-a", "n1", ttl, now).await.unwrap());
        // Released without a marker: free at once.
        assert!(store.acquire("run-b", "n1", ttl, now).await.unwrap());
        store.finish("run-b", "n1", None, now).await.unwrap();
        assert!(store.acquire("run-b", "n2", ttl, now).await.unwrap());
    }

    #[tokio::test]
    async fn local_store_contract_and_expiry() {
        contract(LeaseStore::local()).await;
        let s = LeaseStore::local();
        let now = t("2027-03-01T00:00:00Z");
        assert!(
            s.acquire("k", "n1", Duration::from_secs(10), now)
                .await
                .unwrap()
        );
        let later = now + chrono::Duration::seconds(11);
        assert!(
            s.acquire("k", "n2", Duration::from_secs(10), later)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn redis_store_contract_and_expiry() {
        let server = RedisServer::start();
        let store = LeaseStore::redis(&server.url(), "csms:").await.unwrap();
        contract(store.clone()).await;
        let now = Utc::now();
        assert!(
            store
                .acquire("short", "n1", Duration::from_millis(100), now)
                .await
                .unwrap()
        );
        assert!(server.keys().contains(&"csms:lease:short".to_string()));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            store
                .acquire("short", "n2", Duration::from_secs(5), now)
                .await
                .unwrap(),
            "an expired lease is free"
        );
    }

    #[tokio::test]
    async fn redis_lease_is_exclusive_under_contention() {
        let server = RedisServer::start();
        let mut stores = Vec::new();
        for _ in 0..4 {
            stores.push(LeaseStore::redis(&server.url(), "csms:").await.unwrap());
        }
        let now = Utc::now();
        let tasks: Vec<_> = stores
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                tokio::spawn(async move {
                    s.acquire("contended", &format!("n{i}"), Duration::from_secs(30), now)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            winners += t.await.unwrap() as u32;
        }
        assert_eq!(winners, 1);
    }
}
