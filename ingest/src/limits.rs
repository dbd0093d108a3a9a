//! Abuse limits: per-address upgrade rate, failed-auth slow-down, per-station
//! message rate and bad-frame floods.
//!
//! Everything here is cheap and synchronous so the accept loop and the
//! session tasks can call it on every event. Each limit that fires bumps
//! `csms_limit_triggered_total{limit=...}` through [`record_limit`], so an
//! operator can tell a misbehaving fleet from a too-tight configuration.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Prometheus counter incremented each time a limit fires.
pub const LIMIT_TRIGGERED_METRIC: &str = "csms_limit_triggered_total";

/// Label values of [`LIMIT_TRIGGERED_METRIC`] (the `limit` label).
pub mod limit {
    /// Too many WebSocket upgrades from one source address.
    pub const UPGRADE_RATE: &str = "upgrade_rate";
    /// A failed-auth slow-down was imposed on a source address.
    pub const AUTH_DELAY: &str = "auth_delay";
    /// A station sent messages faster than its token bucket allows.
    pub const MESSAGE_RATE: &str = "message_rate";
    /// The node refused a connection because it is at `max_connections`.
    pub const CONNECTIONS: &str = "connections";
    /// A frame exceeded `max_frame_bytes`.
    pub const FRAME_SIZE: &str = "frame_size";
    /// A connection was closed for sending too many bad frames.
    pub const BAD_FRAMES: &str = "bad_frames";
}

/// Count one firing of `limit` (one of the [`limit`] constants).
pub fn record_limit(limit: &'static str) {
    metrics::counter!(LIMIT_TRIGGERED_METRIC, "limit" => limit).increment(1);
}

/// Abuse-limit settings (the `[limits]` table of the configuration).
///
/// A rate of `0` (or any non-finite or negative value) disables that rate
/// limit, as does `bad_frames_before_close = 0`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(default)]
pub struct LimitsConfig {
    /// Largest accepted WebSocket message; bigger frames are refused.
    pub max_frame_bytes: usize,
    /// Open connections per node; further upgrades are refused.
    pub max_connections: usize,
    /// Sustained WebSocket upgrades per second from one source address.
    /// Generous by default: load tests and NATed depots open many
    /// connections from few addresses.
    pub upgrades_per_ip_per_sec: f64,
    /// Upgrades one source address may make in a burst.
    pub upgrade_burst_per_ip: f64,
    /// Sustained charger-initiated messages per second per station.
    pub messages_per_station_per_sec: f64,
    /// Messages one station may send in a burst (e.g. after reconnecting
    /// with queued transaction events).
    pub message_burst_per_station: f64,
    /// Bad frames within `bad_frame_window_secs` after which the connection
    /// is closed.
    pub bad_frames_before_close: u32,
    /// Length of the sliding window for `bad_frames_before_close`.
    pub bad_frame_window_secs: u64,
    /// Failed authentications from one address tolerated before answers to
    /// that address are delayed.
    pub auth_failures_before_delay: u32,
    /// Upper bound of the failed-auth delay.
    pub auth_delay_max_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 65_536,
            max_connections: 200_000,
            upgrades_per_ip_per_sec: 2_000.0,
            upgrade_burst_per_ip: 4_000.0,
            messages_per_station_per_sec: 20.0,
            message_burst_per_station: 60.0,
            bad_frames_before_close: 20,
            bad_frame_window_secs: 60,
            auth_failures_before_delay: 3,
            auth_delay_max_ms: 5_000,
        }
    }
}

/// A classic token bucket: `burst` tokens at most, refilled at
/// `rate_per_sec`. Time is passed in so callers (and tests) control it.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket. A non-positive or non-finite rate means "unlimited";
    /// a burst below one is raised to one so the limit can ever pass.
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        Self {
            rate_per_sec,
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn unlimited(&self) -> bool {
        !(self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0)
    }

    /// Take one token if available. `now` earlier than the previous call is
    /// treated as no time having passed.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.unlimited() {
            return true;
        }
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
        }
        // Never move `last` backwards, or a stale `now` would mint tokens.
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long a failed authentication counts against an address.
const AUTH_FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Entries untouched this long are dropped by [`AddressLimiter::prune`].
const ADDRESS_IDLE_TTL: Duration = Duration::from_secs(10 * 60);
/// First step of the failed-auth delay; doubles per further failure.
const AUTH_DELAY_BASE: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct AddressState {
    upgrades: TokenBucket,
    auth_failures: u32,
    last_failure: Option<Instant>,
    last_seen: Instant,
}

/// Per-source-address upgrade rate and failed-auth slow-down, shared by all
/// connections.
///
/// IPv6 addresses are grouped by /64 (one subscriber usually owns a whole
/// /64) and IPv4-mapped IPv6 addresses count as their IPv4 address.
///
/// The auth delay is per address, so many stations behind one NAT share it;
/// callers should impose it before answering a *failed* attempt (which is
/// what slows guessing) rather than before every attempt.
#[derive(Debug)]
pub struct AddressLimiter {
    cfg: LimitsConfig,
    entries: DashMap<IpAddr, AddressState>,
}

/// The key an address is accounted under.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        }
    }
}

impl AddressLimiter {
    /// A limiter with no history.
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            entries: DashMap::new(),
        }
    }

    fn new_state(&self, now: Instant) -> AddressState {
        AddressState {
            upgrades: TokenBucket::new(
                self.cfg.upgrades_per_ip_per_sec,
                self.cfg.upgrade_burst_per_ip,
            ),
            auth_failures: 0,
            last_failure: None,
            last_seen: now,
        }
    }

    /// Whether `ip` may upgrade another connection now.
    pub fn allow_upgrade(&self, ip: IpAddr) -> bool {
        self.allow_upgrade_at(ip, Instant::now())
    }

    /// [`Self::allow_upgrade`] at an explicit time.
    pub fn allow_upgrade_at(&self, ip: IpAddr, now: Instant) -> bool {
        let mut entry = self
            .entries
            .entry(address_key(ip))
            .or_insert_with(|| self.new_state(now));
        entry.last_seen = entry.last_seen.max(now);
        let ok = entry.upgrades.try_take(now);
        drop(entry);
        if !ok {
            record_limit(limit::UPGRADE_RATE);
        }
        ok
    }

    /// Count a failed authentication from `ip`.
    pub fn record_auth_failure(&self, ip: IpAddr) {
        self.record_auth_failure_at(ip, Instant::now());
    }

    /// [`Self::record_auth_failure`] at an explicit time.
    pub fn record_auth_failure_at(&self, ip: IpAddr, now: Instant) {
        let mut entry = self
            .entries
            .entry(address_key(ip))
            .or_insert_with(|| self.new_state(now));
        if entry
            .last_failure
            .is_some_and(|t| now.saturating_duration_since(t) > AUTH_FAILURE_MEMORY)
        {
            entry.auth_failures = 0;
        }
        entry.auth_failures = entry.auth_failures.saturating_add(1);
        entry.last_failure = Some(now);
        entry.last_seen = entry.last_seen.max(now);
    }

    /// A successful authentication from `ip` forgives its failures.
    pub fn record_auth_success(&self, ip: IpAddr) {
        if let Some(mut entry) = self.entries.get_mut(&address_key(ip)) {
            entry.auth_failures = 0;
            entry.last_failure = None;
        }
    }

    /// Delay to impose before answering an auth attempt from `ip`: zero up
    /// to `auth_failures_before_delay` failures, then 250 ms doubling per
    /// further failure, capped at `auth_delay_max_ms`.
    pub fn auth_delay(&self, ip: IpAddr) -> Duration {
        self.auth_delay_at(ip, Instant::now())
    }

    /// [`Self::auth_delay`] at an explicit time.
    pub fn auth_delay_at(&self, ip: IpAddr, now: Instant) -> Duration {
        let failures = match self.entries.get(&address_key(ip)) {
            Some(e)
                if e.last_failure
                    .is_some_and(|t| now.saturating_duration_since(t) <= AUTH_FAILURE_MEMORY) =>
            {
                e.auth_failures
            }
            _ => 0,
        };
        let threshold = self.cfg.auth_failures_before_delay.max(1);
        if failures < threshold {
            return Duration::ZERO;
        }
        let cap = Duration::from_millis(self.cfg.auth_delay_max_ms);
        // 2^20 * 250 ms is days; stop doubling long before overflow.
        let steps = (failures - threshold).min(20);
        let delay = AUTH_DELAY_BASE.saturating_mul(1u32 << steps).min(cap);
        if !delay.is_zero() {
            record_limit(limit::AUTH_DELAY);
        }
        delay
    }

    /// Drop addresses idle for a while (no upgrades, no failures), so the
    /// map does not grow with every address ever seen.
    pub fn prune(&self, now: Instant) {
        self.entries.retain(|_, e| {
            let idle = now.saturating_duration_since(e.last_seen);
            let failure_live = e
                .last_failure
                .is_some_and(|t| now.saturating_duration_since(t) <= AUTH_FAILURE_MEMORY);
            idle <= ADDRESS_IDLE_TTL || failure_live
        });
    }

    /// Addresses currently tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Counts bad frames of one connection in a sliding window.
///
/// Stores nothing until the first bad frame, so well-behaved connections
/// pay only a few words of memory.
#[derive(Debug)]
pub struct BadFrameCounter {
    threshold: u32,
    window: Duration,
    seen: VecDeque<Instant>,
}

impl BadFrameCounter {
    /// An empty counter for the configured threshold and window.
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            threshold: cfg.bad_frames_before_close,
            window: Duration::from_secs(cfg.bad_frame_window_secs),
            seen: VecDeque::new(),
        }
    }

    /// Record one bad frame at `now`; true when the connection should now be
    /// closed (the threshold was reached within the window).
    pub fn record(&mut self, now: Instant) -> bool {
        if self.threshold == 0 {
            return false;
        }
        while self
            .seen
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            self.seen.pop_front();
        }
        self.seen.push_back(now);
        // Only the newest `threshold` timestamps can matter.
        while self.seen.len() > self.threshold as usize {
            self.seen.pop_front();
        }
        let close = self.seen.len() >= self.threshold as usize;
        if close {
            record_limit(limit::BAD_FRAMES);
        }
        close
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn token_bucket_burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0), "burst of 3 exhausted");
        // 10/s: one token per 100 ms.
        assert!(!b.try_take(t0 + ms(50)));
        assert!(b.try_take(t0 + ms(100)));
        assert!(!b.try_take(t0 + ms(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.try_take(later));
        assert!(b.try_take(later));
        assert!(b.try_take(later));
        assert!(!b.try_take(later));
    }

    #[test]
    fn token_bucket_time_going_backwards_mints_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 1.0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 - Duration::from_secs(5)));
        assert!(!b.try_take(t0 + ms(500)));
        assert!(b.try_take(t0 + ms(1000)));
    }

    #[test]
    fn token_bucket_zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.0, 1.0);
        for _ in 0..1000 {
            assert!(b.try_take(t0));
        }
    }

    #[test]
    fn upgrade_rate_per_address() {
        let cfg = LimitsConfig {
            upgrades_per_ip_per_sec: 1.0,
            upgrade_burst_per_ip: 2.0,
            ..LimitsConfig::default()
        };
        let l = AddressLimiter::new(&cfg);
        let t0 = Instant::now();
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert!(l.allow_upgrade_at(a, t0));
        assert!(l.allow_upgrade_at(a, t0));
        assert!(!l.allow_upgrade_at(a, t0));
        assert!(l.allow_upgrade_at(b, t0), "other address unaffected");
        assert!(l.allow_upgrade_at(a, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn ipv6_grouped_by_slash_64_and_mapped_v4_is_v4() {
        let cfg = LimitsConfig {
            upgrades_per_ip_per_sec: 1.0,
            upgrade_burst_per_ip: 1.0,
            ..LimitsConfig::default()
        };
        let l = AddressLimiter::new(&cfg);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(l.allow_upgrade_at(a, t0));
        assert!(!l.allow_upgrade_at(b, t0), "same /64 shares the bucket");
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(l.allow_upgrade_at(v4, t0));
        assert!(!l.allow_upgrade_at(mapped, t0));
    }

    #[test]
    fn auth_delay_grows_caps_and_resets_on_success() {
        let cfg = LimitsConfig {
            auth_failures_before_delay: 3,
            auth_delay_max_ms: 1_000,
            ..LimitsConfig::default()
        };
        let l = AddressLimiter::new(&cfg);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let t0 = Instant::now();
        assert_eq!(l.auth_delay_at(ip, t0), Duration::ZERO);
        l.record_auth_failure_at(ip, t0);
        l.record_auth_failure_at(ip, t0);
        assert_eq!(l.auth_delay_at(ip, t0), Duration::ZERO);
        l.record_auth_failure_at(ip, t0);
        assert_eq!(l.auth_delay_at(ip, t0), ms(250));
        l.record_auth_failure_at(ip, t0);
        assert_eq!(l.auth_delay_at(ip, t0), ms(500));
        l.record_auth_failure_at(ip, t0);
        assert_eq!(l.auth_delay_at(ip, t0), ms(1000));
        for _ in 0..100 {
            l.record_auth_failure_at(ip, t0);
        }
        assert_eq!(l.auth_delay_at(ip, t0), ms(1000), "capped");
        l.record_auth_success(ip);
        assert_eq!(l.auth_delay_at(ip, t0), Duration::ZERO);
    }

    #[test]
    fn auth_failures_are_forgotten_after_a_while() {
        let l = AddressLimiter::new(&LimitsConfig::default());
        let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 1));
        let t0 = Instant::now();
        for _ in 0..5 {
            l.record_auth_failure_at(ip, t0);
        }
        assert!(l.auth_delay_at(ip, t0) > Duration::ZERO);
        let later = t0 + AUTH_FAILURE_MEMORY + Duration::from_secs(1);
        assert_eq!(l.auth_delay_at(ip, later), Duration::ZERO);
        l.record_auth_failure_at(ip, later);
        assert_eq!(
            l.auth_delay_at(ip, later),
            Duration::ZERO,
            "count restarted"
        );
    }

    #[test]
    fn prune_drops_idle_addresses_only() {
        let l = AddressLimiter::new(&LimitsConfig::default());
        let t0 = Instant::now();
        let idle = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let busy = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert!(l.allow_upgrade_at(idle, t0));
        assert!(l.allow_upgrade_at(busy, t0));
        let later = t0 + ADDRESS_IDLE_TTL + Duration::from_secs(1);
        assert!(l.allow_upgrade_at(busy, later));
        l.prune(later);
        assert_eq!(l.len(), 1);
        assert!(l.entries.contains_key(&busy));
    }

    #[test]
    fn bad_frames_close_only_within_window() {
        let cfg = LimitsConfig {
            bad_frames_before_close: 3,
            bad_frame_window_secs: 10,
            ..LimitsConfig::default()
        };
        let mut c = BadFrameCounter::new(&cfg);
        let t0 = Instant::now();
        assert!(!c.record(t0));
        assert!(!c.record(t0 + Duration::from_secs(5)));
        // The first one has left the window by t0+10s.
        assert!(!c.record(t0 + Duration::from_secs(10)));
        assert!(c.record(t0 + Duration::from_secs(11)));
        // Spread-out bad frames never close.
        let mut c = BadFrameCounter::new(&cfg);
        for i in 0..20 {
            assert!(!c.record(t0 + Duration::from_secs(6 * i)));
        }
    }

    #[test]
    fn bad_frames_disabled_with_zero() {
        let cfg = LimitsConfig {
            bad_frames_before_close: 0,
            ..LimitsConfig::default()
        };
        let mut c = BadFrameCounter::new(&cfg);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(!c.record(t0));
        }
    }

    #[test]
    fn config_defaults_fill_missing_fields() {
        let cfg: LimitsConfig = serde_json::from_str(r#"{"max_frame_bytes": 1024}"#).unwrap();
        assert_eq!(cfg.max_frame_bytes, 1024);
        assert_eq!(cfg.max_connections, 200_000);
        assert_eq!(cfg.auth_failures_before_delay, 3);
    }
}
