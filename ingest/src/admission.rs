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
//! Two more bounds act before a queue has delayed anyone (the lag is only
//! known once the probe, stuck in the same queue, gets to run):
//!
//! - **Admission slots.** At most `max_admitting` connections are between
//!   their accept and the answer to their first message at once; the accept
//!   loop takes the next connection only when one of them is through. The
//!   slots keep the queue from forming however fast stations arrive, and the
//!   admission rate follows what the node actually gets done (Little's law:
//!   slots / time per admission).
//! - **Run queue depth.** No connection is taken while the runtime's global
//!   run queue holds `max_run_queue` tasks or more: a new station's frames
//!   would wait behind all of them. Such a queue is a burst that is already
//!   there, e.g. every socket of the node closing at once when a power cut
//!   drops the fleet, just before the fleet comes back.
//!
//! Pacing and Pending boots are off when the lag is normal, and the slots
//! are never all taken on a node that is not saturated, so such a node
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
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
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
    /// Connections between their accept and the answer to their first
    /// message, at most, per node; the next waits in the kernel's accept
    /// queue. Each listener's accept loop holds one slot while it waits
    /// for a connection, so keep this well above the number of listeners.
    /// `0`: no limit.
    pub max_admitting: usize,
    /// A connection gives its admission slot back after this long even if
    /// its first message has not been answered, so that silent or slow
    /// clients cannot hold the door shut.
    pub slot_hold_ms: u64,
    /// No connection is accepted while the runtime's global run queue holds
    /// this many tasks. `0`: no limit.
    pub max_run_queue: usize,
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
            max_admitting: 64,
            slot_hold_ms: 5_000,
            max_run_queue: 500,
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
        if self.max_admitting > 0 && self.slot_hold_ms == 0 {
            return Err("admission.slot_hold_ms must be at least 1 (or admission.max_admitting 0: no slots)".into());
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
/// How often a connection held back by a deep run queue looks again.
const QUEUE_RECHECK: Duration = Duration::from_millis(5);
/// ... and the longest it is held back that way.
const QUEUE_WAIT_MAX: Duration = Duration::from_secs(1);
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
    /// When the probe last reported, in µs since `epoch` (0: never yet).
    probed_us: AtomicU64,
    epoch: Instant,
    /// Connections admitted since the probe last looked.
    admitted: AtomicU64,
    pacer: Mutex<Pacer>,
    /// The admission slots; `None` when unlimited.
    slots: Option<Arc<Semaphore>>,
}

/// One connection's admission slot: held from before its accept until its
/// first message is answered, the connection ends, or the hold runs out.
/// Dropping it gives the slot back.
#[derive(Debug)]
pub struct AdmissionSlot {
    permit: Option<OwnedSemaphorePermit>,
    until: Instant,
}

impl AdmissionSlot {
    /// A slot that holds nothing (no limit, tests).
    pub fn none() -> Self {
        AdmissionSlot {
            permit: None,
            until: Instant::now(),
        }
    }

    /// When the slot will be given back unless released first; `None` once
    /// it has been.
    pub fn deadline(&self) -> Option<Instant> {
        self.permit.as_ref().map(|_| self.until)
    }

    /// Gives the slot back (the connection is through admission).
    pub fn release(&mut self) {
        self.permit = None;
    }

    /// Gives the slot back if its hold has run out by `now`.
    pub fn expire(&mut self, now: Instant) {
        if self.deadline().is_some_and(|d| d <= now) {
            metrics::counter!("csms_admission_slots_expired_total").increment(1);
            self.release();
        }
    }

    /// Awaits `fut`; should the hold run out first, gives the slot back and
    /// goes on waiting without it (a slow handshake keeps its connection,
    /// not the door).
    pub async fn during<F: Future>(&mut self, fut: F) -> F::Output {
        let Some(until) = self.deadline() else {
            return fut.await;
        };
        let mut fut = std::pin::pin!(fut);
        tokio::select! {
            out = &mut fut => out,
            () = tokio::time::sleep_until(until) => {
                self.expire(until);
                fut.await
            }
        }
    }
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
        let slots = (config.enabled() && config.max_admitting > 0)
            .then(|| Arc::new(Semaphore::new(config.max_admitting)));
        Admission {
            inner: Arc::new(Inner {
                slots,
                config,
                lag_us: AtomicU64::new(0),
                probed_us: AtomicU64::new(0),
                epoch: Instant::now(),
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

    /// The runtime's recent scheduling lag: what the probe last measured,
    /// or, if the probe has been waiting longer than that to run, how long.
    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.inner.lag_us.load(Ordering::Relaxed)).max(self.probe_overdue())
    }

    /// How long the probe is overdue: a probe that has not run is stuck in
    /// the very queue it measures, and until it runs this is the only sign
    /// of it (a starved probe once left a node accepting at full rate for
    /// 20 s of a storm).
    fn probe_overdue(&self) -> Duration {
        let probed = self.inner.probed_us.load(Ordering::Relaxed);
        if probed == 0 {
            return Duration::ZERO;
        }
        let every = Duration::from_millis(self.inner.config.probe_interval_ms);
        let since = self
            .inner
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_micros(probed));
        since.saturating_sub(every)
    }

    /// The current admission rate per second (`inf` when not pacing).
    pub fn rate(&self) -> f64 {
        self.inner.pacer.lock().rate
    }

    /// Waits for a free admission slot and a run queue under its limit (at
    /// once when neither is limited): the accept loop takes one before each
    /// accept.
    pub async fn slot(&self) -> AdmissionSlot {
        let slot = match &self.inner.slots {
            None => AdmissionSlot::none(),
            Some(slots) => {
                let permit = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the admission semaphore is never closed");
                AdmissionSlot {
                    permit: Some(permit),
                    until: Instant::now() + self.slot_hold(),
                }
            }
        };
        self.wait_for_short_queue().await;
        slot
    }

    /// Returns once the runtime's global run queue is under `max_run_queue`
    /// (or after [`QUEUE_WAIT_MAX`]).
    async fn wait_for_short_queue(&self) {
        let c = &self.inner.config;
        if !c.enabled() || c.max_run_queue == 0 {
            return;
        }
        let runtime = tokio::runtime::Handle::current().metrics();
        if runtime.global_queue_depth() < c.max_run_queue {
            return;
        }
        metrics::counter!("csms_admission_queue_waits_total").increment(1);
        // A queue that never drains is overload, not a burst: let one in now
        // and then, as the pacer's floor does.
        let give_up = Instant::now() + QUEUE_WAIT_MAX;
        while runtime.global_queue_depth() >= c.max_run_queue && Instant::now() < give_up {
            tokio::time::sleep(QUEUE_RECHECK).await;
        }
    }

    /// Starts a slot's hold now: the accept loop calls it when the slot has
    /// its connection (it may have waited long for one).
    pub fn hold_from_now(&self, slot: &mut AdmissionSlot) {
        slot.until = Instant::now() + self.slot_hold();
    }

    fn slot_hold(&self) -> Duration {
        Duration::from_millis(self.inner.config.slot_hold_ms)
    }

    /// Admission slots taken now (0 when unlimited).
    pub fn admitting(&self) -> usize {
        self.inner.slots.as_ref().map_or(0, |s| {
            self.inner.config.max_admitting - s.available_permits()
        })
    }

    /// How long the accept loop waits before taking the next connection
    /// (zero when not pacing). Counts the admission.
    pub fn admit_delay(&self) -> Duration {
        self.inner.admitted.fetch_add(1, Ordering::Relaxed);
        let c = &self.inner.config;
        // Until an overdue probe reports, admit at the floor rate.
        let overdue = c.enabled() && self.probe_overdue() > Duration::from_millis(c.lag_target_ms);
        let mut p = self.inner.pacer.lock();
        let rate = if overdue {
            p.rate.min(c.min_accepts_per_sec)
        } else {
            p.rate
        };
        if rate.is_infinite() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let step = Duration::from_secs_f64(1.0 / rate);
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
        let probed = self.inner.epoch.elapsed().as_micros() as u64;
        self.inner.probed_us.store(probed.max(1), Ordering::Relaxed);
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
        // Stalls not logged since the last warning (rate limit): counted,
        // so a second stall soon after the first is not invisible.
        let (mut unlogged, mut unlogged_worst) = (0u64, Duration::ZERO);
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
            if late >= STALL_WARNING {
                if last_warning.is_none_or(|w| now - w >= STALL_WARNING_EVERY) {
                    tracing::warn!(
                        stalled_ms = late.as_millis() as u64,
                        accept_rate = self.rate(),
                        stalls_since_last_warning = unlogged,
                        worst_since_last_warning_ms = unlogged_worst.as_millis() as u64,
                        "session runtime stalled"
                    );
                    last_warning = Some(now);
                    (unlogged, unlogged_worst) = (0, Duration::ZERO);
                } else {
                    tracing::debug!(
                        stalled_ms = late.as_millis() as u64,
                        accept_rate = self.rate(),
                        "session runtime stalled"
                    );
                    unlogged += 1;
                    unlogged_worst = unlogged_worst.max(late);
                }
            }
            self.observe(late, now - last);
            last = now;
            metrics::gauge!("csms_runtime_lag_seconds").set(self.lag().as_secs_f64());
            let rate = self.rate();
            metrics::gauge!("csms_admission_rate").set(if rate.is_finite() { rate } else { -1.0 });
            metrics::gauge!("csms_admission_slots_taken").set(self.admitting() as f64);
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

    #[tokio::test]
    async fn slots_bound_admissions_in_progress_until_released_or_expired() {
        let a = Admission::new(AdmissionConfig {
            max_admitting: 2,
            slot_hold_ms: 1_000,
            ..AdmissionConfig::default()
        });
        let mut first = a.slot().await;
        let second = a.slot().await;
        assert_eq!(a.admitting(), 2);
        // A third waits while both are held ...
        let third = tokio::time::timeout(ms(10), a.slot()).await;
        assert!(third.is_err(), "a third slot while two are held");
        // ... and gets one as soon as the first is through.
        first.release();
        assert_eq!(first.deadline(), None);
        let mut third = tokio::time::timeout(ms(10), a.slot())
            .await
            .expect("freed slot");
        drop(second);
        assert_eq!(a.admitting(), 1);
        // A slot not released in time is given back by its hold.
        let deadline = third.deadline().expect("held");
        third.expire(deadline - ms(1));
        assert_eq!(a.admitting(), 1, "not before its deadline");
        third.expire(deadline);
        assert_eq!(a.admitting(), 0);
    }

    #[tokio::test]
    async fn a_slow_handshake_gives_its_slot_back_and_goes_on() {
        let a = Admission::new(AdmissionConfig {
            max_admitting: 1,
            slot_hold_ms: 100,
            ..AdmissionConfig::default()
        });
        let mut slot = a.slot().await;
        let out = slot
            .during(async {
                tokio::time::sleep(ms(300)).await;
                "done"
            })
            .await;
        assert_eq!(out, "done");
        assert_eq!(slot.deadline(), None);
        assert_eq!(a.admitting(), 0);
        // A fast one keeps its slot for the session to release.
        let mut slot = a.slot().await;
        slot.during(tokio::time::sleep(ms(10))).await;
        assert!(slot.deadline().is_some());
        assert_eq!(a.admitting(), 1);
    }

    #[tokio::test]
    async fn no_admission_while_the_run_queue_is_deep() {
        let a = Admission::new(AdmissionConfig {
            max_run_queue: 50,
            ..AdmissionConfig::default()
        });
        // Tasks spawned from outside the runtime wait in its global queue
        // until this (single-threaded) test yields.
        let handle = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            for _ in 0..200 {
                handle.spawn(async {});
            }
        })
        .join()
        .unwrap();
        let queue = || {
            tokio::runtime::Handle::current()
                .metrics()
                .global_queue_depth()
        };
        assert_eq!(queue(), 200);
        let mut slot = std::pin::pin!(a.slot());
        let first_look = tokio::time::timeout(Duration::ZERO, &mut slot).await;
        assert!(first_look.is_err(), "admitted while 200 tasks were queued");
        // Once the queue has drained (the test yields to those tasks), it is.
        let slot = slot.await;
        assert!(queue() < 50);
        assert!(slot.deadline().is_some());
    }

    #[tokio::test]
    async fn no_slots_when_unlimited_or_disabled() {
        for config in [
            AdmissionConfig {
                max_admitting: 0,
                ..AdmissionConfig::default()
            },
            AdmissionConfig {
                lag_target_ms: 0,
                ..AdmissionConfig::default()
            },
        ] {
            let a = Admission::new(config);
            let slots: Vec<AdmissionSlot> =
                futures_util::future::join_all((0..200).map(|_| a.slot())).await;
            assert!(slots.iter().all(|s| s.deadline().is_none()));
            assert_eq!(a.admitting(), 0);
        }
    }

    #[test]
    fn an_overdue_probe_counts_as_lag_and_paces_at_the_floor() {
        let a = Admission::new(AdmissionConfig::default());
        // Never probed: nothing is overdue.
        std::thread::sleep(ms(150));
        assert_eq!(a.lag(), Duration::ZERO);
        a.observe(ms(1), ms(10));
        assert!(a.rate().is_infinite());
        assert_eq!(a.admit_delay(), Duration::ZERO);
        // The probe stops reporting (starved): its delay shows as lag ...
        std::thread::sleep(ms(400));
        assert!(a.lag() >= ms(380), "lag {:?}", a.lag());
        assert!(a.defer_boot().is_some(), "over pending_lag_ms");
        // ... and admissions go at the floor rate after a burst.
        let delays: Vec<Duration> = (0..40).map(|_| a.admit_delay()).collect();
        assert!(delays[..BURST as usize].iter().all(|d| d.is_zero()));
        assert!(delays[39] >= ms(400), "{:?}", delays[39]);
        // Once it reports a short lag again, nothing is held back.
        a.observe(ms(1), ms(10));
        assert_eq!(a.lag(), ms(1));
        assert!(a.rate().is_infinite());
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
        let bad = AdmissionConfig {
            slot_hold_ms: 0,
            ..AdmissionConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("slot_hold_ms"));
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
