//! Where a node's runtime spends its time, for profiling builds only.
//!
//! Built with `RUSTFLAGS="--cfg tokio_unstable"` (a separate target
//! directory: every crate rebuilds), a `csms serve`/`csms ingest` runtime
//! reports, on `/metrics`:
//!
//! - how long woken tasks waited for a worker (`csms_task_schedule_latency_over_total{le}`)
//!   and how long single polls took (`csms_task_poll_over_total{le}`), out of
//!   `csms_task_polls_total`;
//! - which tasks, by the line that spawned them, waited 50 ms or more
//!   (`csms_task_late_polls_total{spawned_at}`) or held a worker 5 ms or more
//!   in one poll (`csms_task_long_polls_total{spawned_at}`, with their time
//!   in `csms_task_long_poll_ms_total{spawned_at}`);
//! - per worker: polls, steals, overflows to the global queue, parks, busy
//!   time, and from a sampling thread (every 10 ms, outside the runtime so
//!   it is not late when the runtime is) the deepest global and local run
//!   queues seen and how often they were deep.
//!
//! `CSMS_PROFILE_DISABLE_LIFO=1` turns off the workers' LIFO slot (a task
//! woken by another task on the same worker runs next there and cannot be
//! stolen) to test whether it holds woken sessions back.
//!
//! A normal build compiles none of this: [`instrument`] and [`start`] do
//! nothing, and nothing is measured on the hot path.

use tokio::runtime::{Builder, Handle};

#[cfg(tokio_unstable)]
pub use profiling::{instrument, start};

/// Does nothing outside a `tokio_unstable` build.
#[cfg(not(tokio_unstable))]
pub fn instrument(_runtime: &mut Builder) {}

/// Does nothing outside a `tokio_unstable` build.
#[cfg(not(tokio_unstable))]
pub fn start(_runtime: &Handle) {}

#[cfg(tokio_unstable)]
mod profiling {
    use std::collections::HashMap;
    use std::panic::Location;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::{LazyLock, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use super::{Builder, Handle};

    /// Thresholds of the schedule-latency counters, in seconds.
    const LATENCY_OVER: [f64; 5] = [0.001, 0.01, 0.05, 0.25, 1.0];
    /// Thresholds of the poll-duration counters, in seconds.
    const POLL_OVER: [f64; 4] = [0.0001, 0.001, 0.005, 0.05];
    /// A task that waited this long is named in `csms_task_late_polls_total`.
    const LATE: Duration = Duration::from_millis(50);
    /// A poll this long is named in `csms_task_long_polls_total`.
    const LONG: Duration = Duration::from_millis(5);
    /// A global run queue this deep is logged (`runtime queue deep`).
    const DEEP: usize = 1000;
    /// Queue depths counted in `csms_runtime_*_queue_samples_over_total`.
    const DEPTH_OVER: [usize; 3] = [10, 100, DEEP];

    type Site = &'static Location<'static>;

    #[derive(Default)]
    struct Counts {
        polls: AtomicU64,
        latency_over: [AtomicU64; LATENCY_OVER.len()],
        poll_over: [AtomicU64; POLL_OVER.len()],
        /// Spawn site → (late polls, long polls, long-poll nanoseconds);
        /// touched only by outliers, so a lock is cheap enough.
        sites: Mutex<HashMap<Site, [u64; 3]>>,
    }

    static COUNTS: LazyLock<Counts> = LazyLock::new(Counts::default);

    thread_local! {
        static POLL_STARTED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }

    fn bump(over: &[AtomicU64], thresholds: &[f64], secs: f64) {
        for (n, &t) in over.iter().zip(thresholds) {
            if secs < t {
                break;
            }
            n.fetch_add(1, Relaxed);
        }
    }

    fn site(at: Site, f: impl FnOnce(&mut [u64; 3])) {
        f(COUNTS
            .sites
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(at)
            .or_default());
    }

    /// Adds the poll hooks (and, if asked, no LIFO slot) to a node runtime.
    pub fn instrument(runtime: &mut Builder) {
        runtime
            .track_task_schedule_latency()
            .on_before_task_poll(|meta| {
                COUNTS.polls.fetch_add(1, Relaxed);
                if let Some(waited) = meta.schedule_latency() {
                    bump(&COUNTS.latency_over, &LATENCY_OVER, waited.as_secs_f64());
                    if waited >= LATE {
                        site(meta.spawned_at(), |s| s[0] += 1);
                    }
                }
                POLL_STARTED.set(Some(Instant::now()));
            })
            .on_after_task_poll(|meta| {
                let Some(started) = POLL_STARTED.take() else {
                    return;
                };
                let took = started.elapsed();
                bump(&COUNTS.poll_over, &POLL_OVER, took.as_secs_f64());
                if took >= LONG {
                    site(meta.spawned_at(), |s| {
                        s[1] += 1;
                        s[2] += took.as_nanos() as u64;
                    });
                }
            });
        if lifo_disabled() {
            runtime.disable_lifo_slot();
        }
    }

    fn lifo_disabled() -> bool {
        std::env::var_os("CSMS_PROFILE_DISABLE_LIFO").is_some_and(|v| v == "1")
    }

    /// Starts the thread that samples the runtime's queues and publishes
    /// every figure to the metrics recorder once a second.
    pub fn start(runtime: &Handle) {
        let handle = runtime.clone();
        let spawned = std::thread::Builder::new()
            .name("csms-profile".into())
            .spawn(move || sample(handle));
        match spawned {
            Ok(_) => tracing::info!(
                lifo_slot = !lifo_disabled(),
                "runtime profiling on (tokio_unstable build)"
            ),
            Err(e) => tracing::warn!(error = %e, "runtime profiling thread did not start"),
        }
    }

    #[derive(Default)]
    struct Depths {
        global_max: usize,
        local_max: usize,
        global_over: [u64; DEPTH_OVER.len()],
        local_over: [u64; DEPTH_OVER.len()],
    }

    fn sample(handle: Handle) {
        let metrics = handle.metrics();
        let mut depths = Depths::default();
        let mut last_publish = Instant::now();
        let mut last_deep_log = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(10));
            let global = metrics.global_queue_depth();
            let local: usize = (0..metrics.num_workers())
                .map(|w| metrics.worker_local_queue_depth(w))
                .sum();
            if global >= DEEP && last_deep_log.elapsed() >= Duration::from_secs(1) {
                last_deep_log = Instant::now();
                tracing::warn!(global, local, "runtime queue deep");
            }
            depths.global_max = depths.global_max.max(global);
            depths.local_max = depths.local_max.max(local);
            for (n, &d) in DEPTH_OVER.iter().enumerate() {
                depths.global_over[n] += u64::from(global >= d);
                depths.local_over[n] += u64::from(local >= d);
            }
            if last_publish.elapsed() >= Duration::from_secs(1) {
                last_publish = Instant::now();
                publish(&metrics, &depths);
            }
        }
    }

    fn publish(rt: &tokio::runtime::RuntimeMetrics, depths: &Depths) {
        use metrics::{counter, gauge};
        counter!("csms_task_polls_total").absolute(COUNTS.polls.load(Relaxed));
        for (n, t) in LATENCY_OVER.iter().enumerate() {
            counter!("csms_task_schedule_latency_over_total", "le" => t.to_string())
                .absolute(COUNTS.latency_over[n].load(Relaxed));
        }
        for (n, t) in POLL_OVER.iter().enumerate() {
            counter!("csms_task_poll_over_total", "le" => t.to_string())
                .absolute(COUNTS.poll_over[n].load(Relaxed));
        }
        let sites: Vec<(Site, [u64; 3])> = COUNTS
            .sites
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        for (at, [late, long, nanos]) in sites {
            let at = format!("{}:{}", at.file(), at.line());
            counter!("csms_task_late_polls_total", "spawned_at" => at.clone()).absolute(late);
            counter!("csms_task_long_polls_total", "spawned_at" => at.clone()).absolute(long);
            counter!("csms_task_long_poll_ms_total", "spawned_at" => at)
                .absolute(nanos / 1_000_000);
        }
        for w in 0..rt.num_workers() {
            let worker = w.to_string();
            counter!("csms_runtime_worker_polls_total", "worker" => worker.clone())
                .absolute(rt.worker_poll_count(w));
            counter!("csms_runtime_worker_steals_total", "worker" => worker.clone())
                .absolute(rt.worker_steal_count(w));
            counter!("csms_runtime_worker_overflows_total", "worker" => worker.clone())
                .absolute(rt.worker_overflow_count(w));
            counter!("csms_runtime_worker_parks_total", "worker" => worker.clone())
                .absolute(rt.worker_park_count(w));
            counter!("csms_runtime_worker_busy_seconds_total", "worker" => worker)
                .absolute(rt.worker_total_busy_duration(w).as_secs());
        }
        counter!("csms_runtime_remote_schedules_total").absolute(rt.remote_schedule_count());
        counter!("csms_runtime_budget_forced_yields_total")
            .absolute(rt.budget_forced_yield_count());
        gauge!("csms_runtime_global_queue_depth_max").set(depths.global_max as f64);
        gauge!("csms_runtime_local_queue_depth_max").set(depths.local_max as f64);
        for (n, d) in DEPTH_OVER.iter().enumerate() {
            counter!("csms_runtime_global_queue_samples_over_total", "depth" => d.to_string())
                .absolute(depths.global_over[n]);
            counter!("csms_runtime_local_queue_samples_over_total", "depth" => d.to_string())
                .absolute(depths.local_over[n]);
        }
    }
}
