//! Admission control: how a node stays responsive when more chargers arrive
//! than it can serve at once (every charger reconnecting after a power cut).
//!
//! The load signal is the session runtime's scheduling lag: a probe task
//! asks to be woken every few milliseconds and measures how late it is.
//! Every frame a station sends waits at least that long before it is even
//! read, so the lag is the floor of every CALL's latency, whatever made the
//! runtime busy (handshakes, frames, the WAL's wake-ups).
//!
//! When the lag is over target the node protects the stations it already
//! serves, in two ways the protocol and the kernel provide:
//!
//! - **Accept pacing.** The accept loop admits new connections at a rate
//!   found by additive-increase / multiplicative-decrease on the lag; the
//!   others wait in the kernel's accept queue (then its SYN queue and the
//!   client's SYN retries), where waiting costs the node nothing. Without
//!   it a storm moves the whole backlog into the runtime's ready queue and
//!   every CALL waits behind tens of thousands of handshakes.
//! - **Pending boots.** While the lag is over `pending_lag_ms`,
//!   BootNotification is answered Pending with a short randomised interval:
//!   the station stays connected and quiet (OCPP forbids other traffic
//!   before Accepted) and boots again when the crowd has thinned, spread
//!   over the interval instead of all at once.
//!
//! Both are off when the lag is normal, so a node that is not saturated
//! behaves exactly as without them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Settings of the `[admission]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Scheduling lag above which new connections are paced. `0` turns
    /// admission control off (connections are accepted as fast as they come,
    /// boots are Pending only when the WAL is over its disk budget).
    pub lag_target_ms: u64,
    /// Scheduling lag above which BootNotification is answered Pending
    /// (`0`: every boot while admission control is on; for tests).
    pub pending_lag_ms: u64,
    /// How often the probe measures the lag.
    pub probe_interval_ms: u64,
    /// The accept rate never drops below this (per node), so a saturated
    /// node still lets stations in, slowly.
    pub min_accepts_per_sec: f64,
    /// The interval of an overload Pending is drawn uniformly from
    /// `[pending_min_secs, pending_max_secs]`, so the deferred boots do not
    /// return together.
    pub pending_min_secs: u32,
    pub pending_max_secs: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            lag_target_ms: 100,
            pending_lag_ms: 200,
            probe_interval_ms: 10,
            min_accepts_per_sec: 50.0,
            pending_min_secs: 1,
            pending_max_secs: 3,
        }
    }
}

impl AdmissionConfig {
    /// Checks the settings; the message names the one to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.probe_interval_ms == 0 {
            return Err("admission.probe_interval_ms must be at least 1".into());
        }
        if !(self.min_accepts_per_sec.is_finite() && self.min_accepts_per_sec > 0.0) {
            return Err("admission.min_accepts_per_sec must be a positive number".into());
        }
        if self.pending_min_secs == 0 || self.pending_min_secs > self.pending_max_secs {
            return Err(
                "admission.pending_min_secs must be at least 1 and at most admission.pending_max_secs"
                    .into(),
            );
        }
        Ok(())
    }

    fn enabled(&self) -> bool {
        self.lag_target_ms > 0
    }
}

/// Accepts per second when nothing limits them (no pacing at all).
const UNLIMITED: f64 = f64::INFINITY;
/// Multiplicative decrease per probe over target: halves in ~7 probes.
const DECREASE: f64 = 0.9;
/// Multiplicative increase per probe under half the target.
const INCREASE: f64 = 1.05;
/// Admissions allowed back to back before pacing applies (a burst).
const BURST: f64 = 16.0;
/// A probe this late is logged (at most once per [`STALL_WARNING_EVERY`]).
const STALL_WARNING: Duration = Duration::from_millis(500);
const STALL_WARNING_EVERY: Duration = Duration::from_secs(5);

/// The node's admission state, shared by the probe, the accept loops and
/// the BootNotification handler.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    config: AdmissionConfig,
    /// Smoothed scheduling lag in µs: jumps to a new peak at once, decays
    /// over a few probes.
    lag_us: AtomicU64,
    /// Connections admitted since the probe last looked.
    admitted: AtomicU64,
    pacer: Mutex<Pacer>,
}

/// Admission pacing by theoretical arrival time (GCRA): each admission
/// moves `next` on by `1 / rate`; an admission waits for as much of it as
/// lies beyond a burst's worth of steps.
struct Pacer {
    rate: f64,
    next: Instant,
    /// Admissions per second actually made, smoothed over ~10 probes: where
    /// pacing starts from (one probe's window is too short to count on).
    admitted_rate: f64,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Admission {
            inner: Arc::new(Inner {
                config,
                lag_us: AtomicU64::new(0),
                admitted: AtomicU64::new(0),
                pacer: Mutex::new(Pacer {
                    rate: UNLIMITED,
                    next: Instant::now(),
                    admitted_rate: 0.0,
                }),
            }),
        }
    }

    /// Never paces, never defers (tests, tools).
    pub fn disabled() -> Self {
        Admission::new(AdmissionConfig {
            lag_target_ms: 0,
            ..AdmissionConfig::default()
        })
    }

    /// The runtime's recent scheduling lag.
    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.inner.lag_us.load(Ordering::Relaxed))
    }

    /// The current admission rate per second (`inf` when not pacing).
    pub fn rate(&self) -> f64 {
        self.inner.pacer.lock().rate
    }

    /// How long the accept loop waits before taking the next connection
    /// (zero when not pacing). Counts the admission.
    pub fn admit_delay(&self) -> Duration {
        self.inner.admitted.fetch_add(1, Ordering::Relaxed);
        let mut p = self.inner.pacer.lock();
        if p.rate.is_infinite() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let step = Duration::from_secs_f64(1.0 / p.rate);
        // An idle pacer restarts from now: it never banks more than a burst.
        let due = p.next.max(now);
        p.next = due + step;
        due.saturating_duration_since(now)
            .saturating_sub(step.mul_f64(BURST - 1.0))
    }

    /// The interval of a Pending BootNotification answer when the node is
    /// too busy to take the station now; `None` when it can.
    pub fn defer_boot(&self) -> Option<u32> {
        let c = &self.inner.config;
        if !c.enabled() || self.lag() < Duration::from_millis(c.pending_lag_ms) {
            return None;
        }
        Some(rand::random_range(c.pending_min_secs..=c.pending_max_secs))
    }

    /// One probe's finding: the lag it measured and the time since the
    /// previous probe. Updates the smoothed lag and the accept rate.
    fn observe(&self, lag: Duration, elapsed: Duration) {
        let c = &self.inner.config;
        let lag_us = lag.as_micros() as u64;
        let old = self.inner.lag_us.load(Ordering::Relaxed);
        let smoothed = lag_us.max(old - old / 4);
        self.inner.lag_us.store(smoothed, Ordering::Relaxed);
        let admitted = self.inner.admitted.swap(0, Ordering::Relaxed) as f64;
        if !c.enabled() {
            return;
        }
        let target_us = c.lag_target_ms * 1000;
        let mut p = self.inner.pacer.lock();
        let now_rate = admitted / elapsed.as_secs_f64().max(1e-3);
        p.admitted_rate += (now_rate - p.admitted_rate) * 0.1;
        if smoothed > target_us {
            // Start from what was actually admitted, not from "unlimited".
            let base = p.rate.min(p.admitted_rate.max(c.min_accepts_per_sec));
            p.rate = (base * DECREASE).max(c.min_accepts_per_sec);
        } else if smoothed < target_us / 2 && p.rate.is_finite() {
            p.rate = (p.rate * INCREASE).max(p.rate + 1.0);
            // Well above anything one node accepts: stop pacing altogether.
            if p.rate > 100_000.0 {
                p.rate = UNLIMITED;
            }
        }
    }

    /// Runs the lag probe on the current runtime until `shutdown`.
    pub async fn run_probe(self, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.inner.config.probe_interval_ms.max(1));
        let mut last = Instant::now();
        let mut last_warning: Option<Instant> = None;
        loop {
            let asked = Instant::now() + every;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(asked) => {}
            }
            let now = Instant::now();
            let late = now.saturating_duration_since(asked);
            // Every probe, not only the smoothed peak: the distribution says
            // how often a frame waits that long before it is even read.
            metrics::histogram!("csms_runtime_probe_delay_seconds").record(late.as_secs_f64());
            // A stall this long delays every station's answer on this node;
            // the log line's time says when, for lining it up with the rest.
            if late >= STALL_WARNING && last_warning.is_none_or(|w| now - w >= STALL_WARNING_EVERY)
            {
                tracing::warn!(
                    stalled_ms = late.as_millis() as u64,
                    accept_rate = self.rate(),
                    "session runtime stalled"
                );
                last_warning = Some(now);
            }
            self.observe(late, now - last);
            last = now;
            metrics::gauge!("csms_runtime_lag_seconds").set(self.lag().as_secs_f64());
            let rate = self.rate();
            metrics::gauge!("csms_admission_rate").set(if rate.is_finite() { rate } else { -1.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quiet_node_never_paces_nor_defers() {
        let a = Admission::new(AdmissionConfig::default());
        for _ in 0..100 {
            a.observe(ms(1), ms(10));
        }
        assert!(a.rate().is_infinite());
        assert_eq!(a.admit_delay(), Duration::ZERO);
        assert_eq!(a.defer_boot(), None);
    }

    #[test]
    fn lag_over_target_paces_from_the_observed_rate_down_to_the_floor() {
        let a = Admission::new(AdmissionConfig::default());
        // 3,000 admissions/s for a while (30 per 10 ms probe) ...
        for _ in 0..50 {
            for _ in 0..30 {
                a.admit_delay();
            }
            a.observe(ms(1), ms(10));
        }
        // ... then the lag goes over target, in a window with no admission.
        a.observe(ms(150), ms(10));
        let r = a.rate();
        assert!((2_200.0..=2_700.0).contains(&r), "rate {r}");
        for _ in 0..200 {
            a.observe(ms(150), ms(10));
        }
        assert_eq!(a.rate(), AdmissionConfig::default().min_accepts_per_sec);
    }

    #[test]
    fn pacing_spaces_admissions_after_a_burst() {
        let a = Admission::new(AdmissionConfig {
            min_accepts_per_sec: 100.0,
            ..AdmissionConfig::default()
        });
        for _ in 0..100 {
            a.observe(ms(500), ms(10));
        }
        assert_eq!(a.rate(), 100.0);
        let delays: Vec<Duration> = (0..40).map(|_| a.admit_delay()).collect();
        assert!(delays[..BURST as usize].iter().all(|d| d.is_zero()));
        // Past the burst, each waits 10 ms more than the one before.
        let last = delays[39];
        assert!(last >= ms(230) && last <= ms(250), "{last:?}");
    }

    #[test]
    fn rate_recovers_to_unlimited_when_the_lag_falls() {
        let a = Admission::new(AdmissionConfig::default());
        for _ in 0..100 {
            a.observe(ms(150), ms(10));
        }
        assert!(a.rate().is_finite());
        // The smoothed lag decays first, then the rate climbs back.
        for _ in 0..400 {
            a.observe(ms(0), ms(10));
        }
        assert!(a.rate().is_infinite(), "rate {}", a.rate());
    }

    #[test]
    fn boots_are_deferred_only_over_the_pending_lag_with_a_spread_interval() {
        let a = Admission::new(AdmissionConfig::default());
        a.observe(ms(150), ms(10));
        assert_eq!(
            a.defer_boot(),
            None,
            "over the accept target, under pending"
        );
        a.observe(ms(300), ms(10));
        let intervals: Vec<u32> = (0..200).filter_map(|_| a.defer_boot()).collect();
        assert_eq!(intervals.len(), 200);
        assert!(intervals.iter().all(|i| (1..=3).contains(i)));
        assert!(intervals.iter().any(|i| *i != intervals[0]), "spread");
    }

    #[test]
    fn disabled_measures_but_never_acts() {
        let a = Admission::disabled();
        a.observe(ms(5_000), ms(10));
        assert_eq!(a.lag(), ms(5_000));
        assert!(a.rate().is_infinite());
        assert_eq!(a.defer_boot(), None);
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let bad = AdmissionConfig {
            pending_min_secs: 9,
            ..AdmissionConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("pending_min_secs"));
        let bad = AdmissionConfig {
            min_accepts_per_sec: 0.0,
            ..AdmissionConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("min_accepts_per_sec"));
        assert!(AdmissionConfig::default().validate().is_ok());
    }

    #[tokio::test]
    async fn the_probe_sees_a_blocked_runtime() {
        let a = Admission::new(AdmissionConfig::default());
        let stop = CancellationToken::new();
        let probe = tokio::spawn(a.clone().run_probe(stop.clone()));
        tokio::time::sleep(ms(50)).await;
        assert!(a.lag() < ms(40), "idle lag {:?}", a.lag());
        // Hold the (single) runtime thread as a flood of work would.
        std::thread::sleep(ms(200));
        tokio::time::sleep(ms(5)).await;
        assert!(a.lag() >= ms(150), "blocked lag {:?}", a.lag());
        stop.cancel();
        probe.await.unwrap();
    }
}
