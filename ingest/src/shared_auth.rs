//! Password verifications shared by the processes of a fleet.
//!
//! A station's password is checked with argon2id (~16 ms of a core here) and
//! each process caches its successes (`registry`). After a power cut a station
//! reconnects to whichever worker or node the balancer picks, which with N of
//! them is another one N-1 times in N: a fleet of 100,000 on 6 workers would
//! pay some 83,000 argon2 runs (over ten minutes of two cores) to come back.
//! So a node that verified a password stores a tag of it in Redis, and the
//! others accept a matching tag instead of running argon2.
//!
//! The tag is a keyed BLAKE3 hash of (station id, stored PHC hash, password)
//! under a key derived from `verification_secret`, a secret every node is
//! given (`csms serve --workers` makes one for its workers) and Redis never
//! sees:
//! - whoever reads Redis, even with the registry file, cannot test password
//!   guesses against a tag without the secret (with it a guess costs a hash,
//!   not an argon2 run: keep the secret apart from the data directory);
//! - a tag names the PHC it was verified against, so a changed password (new
//!   hash, new salt) orphans every tag at once, and a removed station is
//!   refused by the registry before any tag is read.
//!
//! Tags expire `status.verification_ttl_secs` after they were last stored or
//! refreshed; a node refreshes those of the stations connected to it. Redis
//! slow or down costs at most [`LOOKUP_TIMEOUT`], then argon2 runs as before.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::status::{RedisStore, StatusStore};

/// How long a connection waits for Redis before checking the password itself.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(250);

/// BLAKE3 key-derivation context: a new one invalidates every stored tag.
const KEY_CONTEXT: &str = "csms 2026-12-06 shared station password verification v1";

/// The shortest `verification_secret` accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// A fresh secret (256 random bits, hex), for processes that share it among
/// themselves only, such as the workers of one `csms serve --workers`.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Shares verifications through Redis; see the module docs.
pub struct SharedAuth {
    key: [u8; 32],
    store: RedisStore,
    ttl: Duration,
    last_refresh: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for SharedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAuth")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl SharedAuth {
    /// Sharing needs a store the nodes share (Redis), a secret they share
    /// and a TTL; without any of them there is nothing to do: `None`.
    pub fn new(secret: Option<&str>, status: &StatusStore, ttl: Duration) -> Option<Self> {
        let secret = secret?;
        if ttl.is_zero() {
            return None;
        }
        let store = status.as_redis()?.clone();
        Some(Self {
            key: blake3::derive_key(KEY_CONTEXT, secret.as_bytes()),
            store,
            ttl,
            last_refresh: Mutex::new(None),
        })
    }

    /// The tag of a successful verification of `password` against `phc`.
    pub fn tag(&self, station: &str, phc: &str, password: &str) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        // Length-prefixed, so no two different triples hash the same input.
        for part in [station, phc, password] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize()
    }

    /// Whether a node stored this very tag for `station`. False when Redis
    /// has none, answers garbage, fails or takes longer than [`LOOKUP_TIMEOUT`].
    pub async fn verified_elsewhere(&self, station: &str, tag: &blake3::Hash) -> bool {
        match tokio::time::timeout(LOOKUP_TIMEOUT, self.store.verification(station)).await {
            // `Hash` compares in constant time.
            Ok(Ok(Some(stored))) => blake3::Hash::from_hex(stored.trim()).is_ok_and(|s| s == *tag),
            Ok(Ok(None)) => false,
            Ok(Err(e)) => {
                tracing::debug!(station, error = %e, "shared verification lookup failed");
                false
            }
            Err(_) => {
                metrics::counter!("csms_shared_auth_timeouts_total").increment(1);
                false
            }
        }
    }

    /// Stores the tag of a verification this node made, in the background:
    /// the connection does not wait for it, and a failure only means the
    /// next node runs argon2.
    pub fn share(&self, station: &str, tag: blake3::Hash) {
        let store = self.store.clone();
        let ttl = self.ttl;
        let station = station.to_string();
        tokio::spawn(async move {
            if let Err(e) = store
                .put_verification(&station, tag.to_hex().as_str(), ttl)
                .await
            {
                tracing::debug!(station, error = %e, "storing a shared verification failed");
            }
        });
    }

    /// Whether the tags of connected stations are due for a refresh (once
    /// per quarter of the TTL, so they never lapse while connected); marks
    /// the refresh done when they are.
    pub fn refresh_due(&self, now: Instant) -> bool {
        let mut last = self.last_refresh.lock();
        match *last {
            Some(at) if now.saturating_duration_since(at) < self.ttl / 4 => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// Extends the tags of `stations` (those connected to this node) to a
    /// full TTL from now.
    pub async fn refresh(&self, stations: &[String]) {
        if let Err(e) = self.store.touch_verifications(stations, self.ttl).await {
            tracing::warn!(error = %e, "refreshing shared verifications failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis::RedisServer;

    const SECRET: &str = "fleet secret 0123456789";

    async fn node(server: &RedisServer, secret: &str) -> (SharedAuth, StatusStore) {
        let status = StatusStore::redis(&server.url(), Default::default())
            .await
            .unwrap();
        let auth = SharedAuth::new(Some(secret), &status, Duration::from_secs(60)).unwrap();
        (auth, status)
    }

    #[test]
    fn random_secrets_are_long_and_differ() {
        let (a, b) = (random_secret(), random_secret());
        assert_eq!(a.len(), 64);
        assert!(a.len() >= MIN_SECRET_LEN);
        assert_ne!(a, b);
    }

    #[test]
    fn nothing_to_share_without_redis_or_secret() {
        let embedded = StatusStore::embedded();
        assert!(SharedAuth::new(Some(SECRET), &embedded, Duration::ZERO).is_none());
    }

    #[tokio::test]
    async fn a_tag_stored_by_one_node_is_accepted_by_another() {
        let server = RedisServer::start();
        let (a, status) = node(&server, SECRET).await;
        let (b, _) = node(&server, SECRET).await;
        let (other, _) = node(&server, "another secret 0123456789").await;
        assert!(SharedAuth::new(None, &status, Duration::from_secs(60)).is_none());
        assert!(SharedAuth::new(Some(SECRET), &status, Duration::ZERO).is_none());

        let tag = a.tag("CP-1", "$argon2id$phc", "pw");
        assert!(
            !b.verified_elsewhere("CP-1", &tag).await,
            "nothing stored yet"
        );
        a.share("CP-1", tag);
        let mut seen = false;
        for _ in 0..40 {
            seen = b.verified_elsewhere("CP-1", &tag).await;
            if seen {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seen, "node b accepts node a's tag");
        // The same secret gives the same tag.
        assert_eq!(b.tag("CP-1", "$argon2id$phc", "pw"), tag);
        // Another password, another PHC (a changed password) or another
        // secret: no match; nor the same tag for another station.
        for wrong in [
            b.tag("CP-1", "$argon2id$phc", "pw2"),
            b.tag("CP-1", "$argon2id$new", "pw"),
            other.tag("CP-1", "$argon2id$phc", "pw"),
        ] {
            assert!(!b.verified_elsewhere("CP-1", &wrong).await);
        }
        assert!(!b.verified_elsewhere("CP-2", &tag).await);

        // Stored with the TTL; a refresh extends it; removing the station
        // removes its tag.
        let mut raw = server.raw();
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg("csms:{CP-1}:auth")
            .query(&mut raw)
            .unwrap();
        assert!((1..=60_000).contains(&ttl), "{ttl}");
        let _: i64 = ::redis::cmd("PEXPIRE")
            .arg("csms:{CP-1}:auth")
            .arg(1_000)
            .query(&mut raw)
            .unwrap();
        a.refresh(&["CP-1".to_string(), "CP-unknown".to_string()])
            .await;
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg("csms:{CP-1}:auth")
            .query(&mut raw)
            .unwrap();
        assert!(ttl > 59_000, "{ttl}");
        status.remove_station("CP-1").await.unwrap();
        assert!(!b.verified_elsewhere("CP-1", &tag).await);
    }

    #[tokio::test]
    async fn refresh_is_due_once_per_quarter_ttl() {
        let server = RedisServer::start();
        let (a, _status) = node(&server, SECRET).await;
        let t0 = Instant::now();
        assert!(a.refresh_due(t0));
        assert!(!a.refresh_due(t0 + Duration::from_secs(14)));
        assert!(a.refresh_due(t0 + Duration::from_secs(15)));
    }
}
