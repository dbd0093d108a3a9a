//! Counters and the CALL latency histogram of one process, and the
//! serializable [`Summary`] that worker processes hand to the parent, which
//! merges them (HDR histograms add exactly, so merged percentiles are as
//! accurate as a single process's).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};

/// Largest latency the histogram tracks (an hour, in microseconds); larger
/// values are clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("histogram is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("histogram does not deserialize: {0:?}")]
    Deserialize(hdrhistogram::serialization::DeserializeError),
    #[error("histograms do not merge: {0:?}")]
    Merge(hdrhistogram::AdditionError),
}

/// A latency histogram in microseconds, 1 µs to an hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

/// Now, in whole seconds since 1970.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_secs())
}

/// The earlier of two unix times, 0 meaning "never".
fn earliest(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, t) | (t, 0) => t,
        (a, b) => a.min(b),
    }
}

/// Records `d` into a shared histogram (clamped to its bounds).
fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    h.lock()
        .expect("histogram lock")
        .record(us)
        .expect("value within bounds");
}

/// Live counters shared by every station task of one process.
pub struct Stats {
    /// Sockets open now.
    pub connected: AtomicU64,
    /// Stations whose latest BootNotification was Accepted and whose socket is open.
    pub accepted: AtomicU64,
    pub boot_accepted: AtomicU64,
    pub boot_pending: AtomicU64,
    pub boot_rejected: AtomicU64,
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    /// CALLs answered with a CALLERROR (also counted in `answered`).
    pub call_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Sockets lost while the station was not asked to drop them.
    pub disconnects: AtomicU64,
    pub csms_calls_answered: AtomicU64,
    /// Stations Accepted again after the storm, and the latest such moment
    /// in µs after the drop.
    pub storm_reaccepted: AtomicU64,
    pub storm_last_accept_us: AtomicU64,
    errors_by_code: Mutex<BTreeMap<String, u64>>,
    connect_errors: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram<u64>>,
    /// BootNotification CALLs alone (connect phase, storm).
    boot_latency: Mutex<Histogram<u64>>,
    /// When CALLs slower than [`SLOW_CALL`] were answered (unix seconds).
    slow_calls: Mutex<BTreeMap<u64, u64>>,
    /// Successful connects: TCP connect plus WebSocket upgrade. Where a
    /// server that paces admissions makes stations wait.
    connect_latency: Mutex<Histogram<u64>>,
    /// How late this process's runtime woke a periodic timer, once the
    /// stations are connected: the part of a measured CALL latency that is
    /// the load generator's own delay (it shares the cores with the server).
    runtime_lag: Mutex<Histogram<u64>>,
    /// When the lag probe woke [`LAG_SPIKE`] or more late (unix seconds), to
    /// line the load generator's own stalls up with the slow CALLs.
    lag_spikes: Mutex<BTreeMap<u64, u64>>,
}

/// A lag probe this late is counted by the second it woke in.
pub const LAG_SPIKE: Duration = Duration::from_millis(250);

/// A CALL this slow is counted by the second it was answered in, so the
/// report can tell a steady tail from a stall.
pub const SLOW_CALL: Duration = Duration::from_secs(1);

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connected: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            boot_accepted: AtomicU64::new(0),
            boot_pending: AtomicU64::new(0),
            boot_rejected: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            call_errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            csms_calls_answered: AtomicU64::new(0),
            storm_reaccepted: AtomicU64::new(0),
            storm_last_accept_us: AtomicU64::new(0),
            errors_by_code: Mutex::new(BTreeMap::new()),
            connect_errors: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(new_histogram()),
            boot_latency: Mutex::new(new_histogram()),
            slow_calls: Mutex::new(BTreeMap::new()),
            connect_latency: Mutex::new(new_histogram()),
            runtime_lag: Mutex::new(new_histogram()),
            lag_spikes: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Stats {
    /// Records one CALL's latency (`boot`: it was a BootNotification, also
    /// kept apart, so the table can tell connect-time from steady-state tails).
    pub fn record_latency(&self, d: Duration, boot: bool) {
        record(&self.latency, d);
        if d >= SLOW_CALL {
            count_this_second(&self.slow_calls);
        }
        if boot {
            record(&self.boot_latency, d);
        }
    }

    /// Records how long a successful connect (TCP + upgrade) took.
    pub fn record_connect(&self, d: Duration) {
        record(&self.connect_latency, d);
    }

    /// Records how late the runtime woke the lag probe's timer.
    pub fn record_lag(&self, d: Duration) {
        record(&self.runtime_lag, d);
        if d >= LAG_SPIKE {
            count_this_second(&self.lag_spikes);
        }
    }

    pub fn record_call_error(&self, code: &str) {
        self.call_errors.fetch_add(1, Relaxed);
        *self
            .errors_by_code
            .lock()
            .expect("errors lock")
            .entry(code.to_string())
            .or_default() += 1;
    }

    pub fn record_connect_failure(&self, reason: &str) {
        self.connect_failures.fetch_add(1, Relaxed);
        *self
            .connect_errors
            .lock()
            .expect("connect errors lock")
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// The figures the progress display needs, cheap to take often.
    pub fn progress(&self) -> Progress {
        Progress {
            connected: self.connected.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            sent: self.sent.load(Relaxed),
            answered: self.answered.load(Relaxed),
            errors: self.call_errors.load(Relaxed) + self.timeouts.load(Relaxed),
            storm_reaccepted: self.storm_reaccepted.load(Relaxed),
        }
    }

    /// Everything, histogram included, as a serializable summary.
    pub fn summary(&self) -> Summary {
        let hist = self.latency.lock().expect("latency lock").clone();
        Summary {
            progress: self.progress(),
            boot_accepted: self.boot_accepted.load(Relaxed),
            boot_pending: self.boot_pending.load(Relaxed),
            boot_rejected: self.boot_rejected.load(Relaxed),
            call_errors: self.call_errors.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            csms_calls_answered: self.csms_calls_answered.load(Relaxed),
            storm_last_accept_us: self.storm_last_accept_us.load(Relaxed),
            errors_by_code: self.errors_by_code.lock().expect("errors lock").clone(),
            connect_errors: self
                .connect_errors
                .lock()
                .expect("connect errors lock")
                .clone(),
            latency: hist,
            boot_latency: self.boot_latency.lock().expect("latency lock").clone(),
            connect_latency: self
                .connect_latency
                .lock()
                .expect("connect latency lock")
                .clone(),
            runtime_lag: self.runtime_lag.lock().expect("lag lock").clone(),
            slow_calls: by_second(&self.slow_calls),
            lag_spikes: by_second(&self.lag_spikes),
            run_answered: 0,
            run_secs: 0.0,
            run_started_unix: 0,
            storm_started_unix: 0,
        }
    }
}

/// Live figures, also sent by worker processes every half second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub connected: u64,
    pub accepted: u64,
    pub sent: u64,
    pub answered: u64,
    pub errors: u64,
    pub storm_reaccepted: u64,
}

impl Progress {
    pub fn add(&mut self, o: &Progress) {
        self.connected += o.connected;
        self.accepted += o.accepted;
        self.sent += o.sent;
        self.answered += o.answered;
        self.errors += o.errors;
        self.storm_reaccepted += o.storm_reaccepted;
    }
}

/// The final figures of one process (or, merged, of all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub progress: Progress,
    pub boot_accepted: u64,
    pub boot_pending: u64,
    pub boot_rejected: u64,
    pub call_errors: u64,
    pub timeouts: u64,
    pub connect_failures: u64,
    pub disconnects: u64,
    pub csms_calls_answered: u64,
    pub storm_last_accept_us: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    pub connect_errors: BTreeMap<String, u64>,
    #[serde(with = "histogram_b64")]
    pub latency: Histogram<u64>,
    #[serde(with = "histogram_b64")]
    pub boot_latency: Histogram<u64>,
    #[serde(with = "histogram_b64")]
    pub connect_latency: Histogram<u64>,
    #[serde(with = "histogram_b64")]
    pub runtime_lag: Histogram<u64>,
    /// CALLs slower than [`SLOW_CALL`] per unix second they were answered
    /// in, as pairs: worker lines are an internally tagged enum, through
    /// which serde cannot read integer map keys back.
    #[serde(default)]
    pub slow_calls: Vec<(u64, u64)>,
    /// Lag probes [`LAG_SPIKE`] late or more, per unix second, the same way.
    #[serde(default)]
    pub lag_spikes: Vec<(u64, u64)>,
    /// CALLs answered during the measured run phase and its length: the
    /// throughput figure (connect and boot excluded).
    pub run_answered: u64,
    pub run_secs: f64,
    /// When the run phase began (unix seconds; the earliest of the
    /// processes), to place slow CALLs in the run.
    #[serde(default)]
    pub run_started_unix: u64,
    /// When the storm dropped every socket (unix seconds; the earliest of
    /// the processes; 0: no storm).
    #[serde(default)]
    pub storm_started_unix: u64,
}

impl Summary {
    /// Adds another process's figures. Run phases overlap in time, so the
    /// merged run length is the longest one.
    pub fn merge(&mut self, o: &Summary) -> Result<(), StatsError> {
        self.progress.add(&o.progress);
        self.boot_accepted += o.boot_accepted;
        self.boot_pending += o.boot_pending;
        self.boot_rejected += o.boot_rejected;
        self.call_errors += o.call_errors;
        self.timeouts += o.timeouts;
        self.connect_failures += o.connect_failures;
        self.disconnects += o.disconnects;
        self.csms_calls_answered += o.csms_calls_answered;
        self.storm_last_accept_us = self.storm_last_accept_us.max(o.storm_last_accept_us);
        for (k, v) in &o.errors_by_code {
            *self.errors_by_code.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.connect_errors {
            *self.connect_errors.entry(k.clone()).or_default() += v;
        }
        self.latency.add(&o.latency).map_err(StatsError::Merge)?;
        self.boot_latency
            .add(&o.boot_latency)
            .map_err(StatsError::Merge)?;
        self.connect_latency
            .add(&o.connect_latency)
            .map_err(StatsError::Merge)?;
        self.runtime_lag
            .add(&o.runtime_lag)
            .map_err(StatsError::Merge)?;
        merge_by_second(&mut self.slow_calls, &o.slow_calls);
        merge_by_second(&mut self.lag_spikes, &o.lag_spikes);
        self.run_answered += o.run_answered;
        self.run_secs = self.run_secs.max(o.run_secs);
        self.run_started_unix = earliest(self.run_started_unix, o.run_started_unix);
        self.storm_started_unix = earliest(self.storm_started_unix, o.storm_started_unix);
        Ok(())
    }

    /// CALLs answered per second during the run phase.
    pub fn throughput(&self) -> f64 {
        if self.run_secs > 0.0 {
            self.run_answered as f64 / self.run_secs
        } else {
            0.0
        }
    }
}

/// Serializes a histogram as base64 of its V2 encoding.
pub fn histogram_to_b64(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("V2 serialization into a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn histogram_from_b64(s: &str) -> Result<Histogram<u64>, StatsError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s)?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(StatsError::Deserialize)
}

mod histogram_b64 {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::histogram_to_b64(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let text = String::deserialize(d)?;
        super::histogram_from_b64(&text).map_err(serde::de::Error::custom)
    }
}

/// Counts one event in the current unix second.
fn count_this_second(counts: &Mutex<BTreeMap<u64, u64>>) {
    *counts
        .lock()
        .expect("per-second counts lock")
        .entry(unix_secs())
        .or_default() += 1;
}

fn by_second(counts: &Mutex<BTreeMap<u64, u64>>) -> Vec<(u64, u64)> {
    let counts = counts.lock().expect("per-second counts lock");
    counts.iter().map(|(t, n)| (*t, *n)).collect()
}

fn merge_by_second(into: &mut Vec<(u64, u64)>, other: &[(u64, u64)]) {
    let mut merged: BTreeMap<u64, u64> = into.drain(..).collect();
    for (t, n) in other {
        *merged.entry(*t).or_default() += n;
    }
    *into = merged.into_iter().collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_merge_through_json() {
        let a = Stats::default();
        let b = Stats::default();
        for ms in 1..=99 {
            a.record_latency(Duration::from_millis(ms), false);
            a.answered.fetch_add(1, Relaxed);
        }
        b.record_latency(Duration::from_secs(2), true);
        b.answered.fetch_add(1, Relaxed);
        a.record_connect(Duration::from_millis(3));
        b.record_connect(Duration::from_millis(900));
        a.record_lag(Duration::from_micros(200));
        b.record_lag(Duration::from_millis(1500));
        a.record_call_error("NotSupported");
        b.record_call_error("NotSupported");
        b.record_call_error("InternalError");
        let mut sa = a.summary();
        sa.run_answered = 99;
        sa.run_secs = 10.0;
        let mut sb = b.summary();
        sb.run_answered = 1;
        sb.run_secs = 12.0;
        // Only b saw the storm; a process without one does not hide it.
        sb.storm_started_unix = 1_700_000_010;
        // Through the worker wire format, as the parent receives it.
        let sb: Summary = serde_json::from_str(&serde_json::to_string(&sb).unwrap()).unwrap();
        sa.merge(&sb).unwrap();
        assert_eq!(sa.latency.len(), 100);
        assert_eq!(sa.boot_latency.len(), 1, "boots are also kept apart");
        assert_eq!(sa.connect_latency.len(), 2, "connects merge too");
        assert!(sa.connect_latency.max() >= 899_000);
        assert_eq!(sa.runtime_lag.len(), 2, "lag samples merge too");
        assert!(sa.runtime_lag.max() >= 1_499_000);
        assert_eq!(
            sa.slow_calls.iter().map(|p| p.1).sum::<u64>(),
            1,
            "the 2 s CALL is slow"
        );
        assert_eq!(
            sa.lag_spikes.iter().map(|p| p.1).sum::<u64>(),
            1,
            "the 1.5 s lag is a spike, the 0.2 ms one is not"
        );
        assert_eq!(sa.progress.answered, 100);
        assert!(sa.latency.max() >= 1_999_000, "{}", sa.latency.max());
        let p50 = sa.latency.value_at_quantile(0.5);
        assert!((49_000..=51_000).contains(&p50), "p50 {p50}");
        assert_eq!(sa.errors_by_code["NotSupported"], 2);
        assert_eq!(sa.errors_by_code["InternalError"], 1);
        assert_eq!(sa.call_errors, 3);
        assert_eq!(sa.run_secs, 12.0);
        assert_eq!(sa.storm_started_unix, 1_700_000_010);
        assert!((sa.throughput() - 100.0 / 12.0).abs() < 1e-9);
    }

    #[test]
    fn bad_histogram_text_is_an_error() {
        assert!(histogram_from_b64("!!").is_err());
        assert!(histogram_from_b64("AAAA").is_err());
    }
}
