//! `csms loadgen`: a charger simulator for benchmarks.
//!
//! Simulates N stations (a mix of OCPP 1.6 and 2.0.1) over real WebSockets,
//! each with its own id and optional Basic-auth password, following a
//! realistic schedule (boot, heartbeats, status changes, sessions with meter
//! values) in one of four modes: `schedule` (the timeline as is),
//! `sustained` (a fixed total CALL rate), `saturation` (closed loop) and
//! `storm` (drop every socket at once and reconnect with the OCPP 2.0.1
//! back-off). Connections are spread over source addresses 127.0.0.2, ...
//! (one address has about 28,000 ephemeral ports) and over worker processes
//! (one process may hold about 20,000 descriptors here): the parent re-runs
//! its own command line with a hidden `--worker-index`, each worker prints
//! progress and a final [`stats::Summary`] as JSON lines, the parent merges
//! them into one [`Report`].

pub mod acks;
pub mod backoff;
pub mod schedule;
pub mod station;
pub mod stats;

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::schedule::ScheduleParams;
use crate::station::{Pacing, Phase, Station, StationConfig};
use crate::stats::{Progress, Stats, Summary};

/// Where slow CALLs fall in time: their count, the seconds that held them
/// and the busiest few, each as seconds after `reference` (unix seconds,
/// named by `what`). A stall shows as a few seconds holding most of them; a
/// steady tail as many seconds with a few each.
fn slow_calls_line(slow: &[(u64, u64)], reference: u64, what: &str) -> Option<String> {
    let first = slow.iter().map(|p| p.0).min()?;
    let last = slow.iter().map(|p| p.0).max().unwrap_or(first);
    let total: u64 = slow.iter().map(|p| p.1).sum();
    // Negative: before the reference (e.g. connect phase boots).
    let after = |t: u64| t as i64 - reference as i64;
    let mut busiest: Vec<(u64, u64)> = slow.to_vec();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let top: Vec<String> = busiest
        .iter()
        .take(5)
        .map(|(t, n)| format!("{:+}s: {n}", after(*t)))
        .collect();
    Some(format!(
        "{total} in {} distinct seconds over {} s, from {:+} s after {what}; busiest {}",
        slow.len(),
        last - first + 1,
        after(first),
        top.join(", ")
    ))
}

/// The instant slow CALLs are placed against: the storm's drop in a storm
/// run (its tail is what the run is about), else the start of the run phase.
fn time_reference(s: &Summary) -> (u64, &'static str) {
    if s.storm_started_unix > 0 {
        (s.storm_started_unix, "the storm's drop")
    } else {
        (s.run_started_unix, "the run phase began")
    }
}

/// `p50 / p99 / p99.999 / max` of a histogram in ms, and its count.
fn latency_line(h: &hdrhistogram::Histogram<u64>, what: &str) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2} ms ({} {what})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.99999)),
        ms(h.max()),
        h.len()
    )
}

/// How late this process's runtime wakes a 10 ms timer, from the end of the
/// connect phase on: CALL latencies are measured by this same runtime, so a
/// server answer waiting to be read counts in them as if it were late.
async fn lag_probe(stats: Arc<Stats>, phase: watch::Receiver<Phase>) {
    const EVERY: Duration = Duration::from_millis(10);
    let mut due = Instant::now() + EVERY;
    loop {
        tokio::time::sleep_until(due).await;
        let now = Instant::now();
        if *phase.borrow() != Phase::Connecting {
            stats.record_lag(now.saturating_duration_since(due));
        }
        due = now + EVERY;
    }
}

/// Descriptors a process keeps for itself besides station sockets.
const FD_RESERVE: u64 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every station follows its own timeline (heartbeats, sessions).
    Schedule,
    /// A fixed total rate of CALLs (`--rate`), spread evenly over stations.
    Sustained,
    /// Closed loop: each station sends its next CALL once the last is answered.
    Saturation,
    /// Connect all, drop all sockets at once, reconnect with the back-off;
    /// measures the time until all are Accepted again.
    Storm,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Schedule => "schedule",
            Mode::Sustained => "sustained",
            Mode::Saturation => "saturation",
            Mode::Storm => "storm",
        })
    }
}

/// Arguments of `csms loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// WebSocket base URL; the station id is appended.
    #[arg(long, default_value = "ws://127.0.0.1:9000/ocpp")]
    pub url: String,
    /// Number of stations.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub stations: usize,
    /// Fraction of stations speaking OCPP 2.0.1 (the rest speak 1.6).
    #[arg(long, default_value_t = 0.5)]
    pub ratio_201: f64,
    /// Station ids are this prefix plus a six-digit index.
    #[arg(long, default_value = "LG")]
    pub id_prefix: String,
    /// Basic-auth password of every station (none: no Authorization
    /// header); `{id}` in it is replaced by the station's id, so that each
    /// station has its own, e.g. `--password 'secret-{id}'`.
    #[arg(long, env = "LOADGEN_PASSWORD")]
    pub password: Option<String>,
    /// Write `id,password` for every station (the `csms stations import`
    /// format) to this file and exit without connecting: registers the
    /// simulated fleet on a server that authenticates its stations.
    #[arg(long)]
    pub credentials_out: Option<std::path::PathBuf>,
    #[arg(long, value_enum, default_value_t = Mode::Sustained)]
    pub mode: Mode,
    /// Total CALLs per second across all stations (sustained mode).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Length of the measured run phase, after all stations are connected
    /// (storm mode: the longest the reconnect may take).
    #[arg(long, default_value_t = 30)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 60)]
    pub heartbeat_secs: u64,
    /// Meter values interval while charging.
    #[arg(long, default_value_t = 30)]
    pub meter_secs: u64,
    /// Mean session length.
    #[arg(long, default_value_t = 1800)]
    pub session_secs: u64,
    /// Mean idle gap between sessions.
    #[arg(long, default_value_t = 3600)]
    pub gap_secs: u64,
    /// New connections per second while ramping up (all processes together).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Give up waiting for every station to connect after this long.
    #[arg(long, default_value_t = 300)]
    pub connect_timeout_secs: u64,
    #[arg(long, default_value_t = 30)]
    pub call_timeout_secs: u64,
    /// Storm: seconds the fleet runs its schedule before the power cut.
    #[arg(long, default_value_t = 2)]
    pub storm_after_secs: u64,
    /// Back-off: minimum wait before a reconnect (RetryBackOffWaitMinimum).
    #[arg(long, default_value_t = 1.0)]
    pub backoff_min_secs: f64,
    /// Back-off: random part added to each wait (RetryBackOffRandomRange).
    #[arg(long, default_value_t = 5.0)]
    pub backoff_random_secs: f64,
    /// Back-off: doublings of the minimum (RetryBackOffRepeatTimes).
    #[arg(long, default_value_t = 3)]
    pub backoff_doublings: u32,
    /// Source addresses 127.0.0.2, 127.0.0.3, ... to spread connections
    /// over (loopback servers only; 0: let the kernel pick).
    #[arg(long, default_value_t = 4)]
    pub source_ips: usize,
    /// Worker processes; each holds stations/processes sockets.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Write each station's acknowledged CALLs (its last message id and the
    /// ids that got no CALLRESULT) to this file (`PATH.N` for worker process
    /// N), to check afterwards that every acknowledged message reached bronze.
    #[arg(long)]
    pub acks_out: Option<std::path::PathBuf>,
    /// The server's process id, to report its RSS per connection.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Internal: this process is worker i of a multi-process run.
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
}

/// The outcome of a run. `Display` prints one table (nothing for a worker
/// process, whose output is the JSON protocol read by its parent).
pub struct Report {
    pub args: LoadgenArgs,
    pub summary: Summary,
    pub stations_201: usize,
    pub connect_secs: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_connected_kib: Option<u64>,
    /// Connections open when `rss_connected_kib` was read.
    pub rss_connections: u64,
    /// The last reading while every station was still connected (the end
    /// of the run phase): the steady state, after connect-time transients.
    pub rss_steady_kib: Option<u64>,
    /// Anonymous RSS (RssAnon) before, all connected, end of run.
    pub anon_kib: [Option<u64>; 3],
    worker: bool,
}

impl Report {
    /// Server RSS growth per connection, in KiB, when all were connected.
    pub fn rss_per_connection_kib(&self) -> Option<f64> {
        self.per_connection(self.rss_connected_kib)
    }

    /// Server RSS growth per connection, in KiB, at the end of the run.
    pub fn rss_steady_per_connection_kib(&self) -> Option<f64> {
        self.per_connection(self.rss_steady_kib)
    }

    /// Anonymous RSS growth per connection, in KiB: when all were
    /// connected, and at the end of the run.
    pub fn anon_per_connection_kib(&self) -> [Option<f64>; 2] {
        [1, 2].map(|i| self.growth(self.anon_kib[0], self.anon_kib[i]))
    }

    fn per_connection(&self, after: Option<u64>) -> Option<f64> {
        self.growth(self.rss_before_kib, after)
    }

    fn growth(&self, before: Option<u64>, after: Option<u64>) -> Option<f64> {
        match (before, after) {
            (Some(b), Some(a)) if self.rss_connections > 0 => {
                Some((a as f64 - b as f64) / self.rss_connections as f64)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.worker {
            return Ok(());
        }
        let s = &self.summary;
        let a = &self.args;
        let h = &s.latency;
        // Slow CALLs and lag spikes are placed against the same instant.
        let (reference, what) = time_reference(s);
        let ms = |q: f64| format!("{:.2} ms", h.value_at_quantile(q) as f64 / 1000.0);
        let mut rows: Vec<(String, String)> = vec![
            (
                "mode".into(),
                format!(
                    "{} ({} processes, {} source addresses){}",
                    a.mode,
                    a.processes,
                    a.source_ips,
                    if a.mode == Mode::Sustained {
                        format!(", target {} CALLs/s", a.rate)
                    } else {
                        String::new()
                    }
                ),
            ),
            (
                "stations".into(),
                format!(
                    "{} ({} × 1.6, {} × 2.0.1)",
                    a.stations,
                    a.stations - self.stations_201,
                    self.stations_201
                ),
            ),
            (
                "connected at the end".into(),
                format!(
                    "{} (all connected after {:.1} s)",
                    s.progress.connected, self.connect_secs
                ),
            ),
            (
                "boot answers".into(),
                format!(
                    "{} Accepted, {} Pending, {} Rejected",
                    s.boot_accepted, s.boot_pending, s.boot_rejected
                ),
            ),
            ("CALLs sent".into(), s.progress.sent.to_string()),
            ("CALLs answered".into(), s.progress.answered.to_string()),
            (
                "CALLERRORs".into(),
                if s.errors_by_code.is_empty() {
                    "0".into()
                } else {
                    let by: Vec<String> = s
                        .errors_by_code
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    format!("{} ({})", s.call_errors, by.join(", "))
                },
            ),
            ("CALL timeouts".into(), s.timeouts.to_string()),
            (
                "connect failures".into(),
                if s.connect_errors.is_empty() {
                    "0".into()
                } else {
                    let by: Vec<String> = s
                        .connect_errors
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect();
                    format!("{} ({})", s.connect_failures, by.join("; "))
                },
            ),
            ("unexpected disconnects".into(), s.disconnects.to_string()),
            (
                "CSMS CALLs answered".into(),
                s.csms_calls_answered.to_string(),
            ),
            (
                "throughput (run phase)".into(),
                format!("{:.0} CALLs/s over {:.1} s", s.throughput(), s.run_secs),
            ),
        ];
        if !h.is_empty() {
            for (name, q) in [
                ("p50", 0.5),
                ("p90", 0.9),
                ("p99", 0.99),
                ("p99.9", 0.999),
                ("p99.99", 0.9999),
                ("p99.999", 0.99999),
            ] {
                rows.push((format!("CALL latency {name}"), ms(q)));
            }
            rows.push((
                "CALL latency max".into(),
                format!("{:.2} ms", h.max() as f64 / 1000.0),
            ));
            if let Some(line) = slow_calls_line(&s.slow_calls, reference, what) {
                rows.push((
                    format!(
                        "CALLs over {} s, by second answered",
                        stats::SLOW_CALL.as_secs()
                    ),
                    line,
                ));
            }
            // The same, split: boots (connect phase, storm) and the rest.
            let mut other = h.clone();
            if other.subtract(&s.boot_latency).is_ok() {
                for (name, part) in [
                    ("BootNotification", &s.boot_latency),
                    ("other CALLs", &other),
                ] {
                    if !part.is_empty() {
                        rows.push((
                            format!("{name} latency p50 / p99 / p99.999 / max"),
                            latency_line(part, "CALLs"),
                        ));
                    }
                }
            }
        }
        if !s.connect_latency.is_empty() {
            // Not a CALL: the wait before the first one, where a server
            // pacing its admissions makes stations queue.
            rows.push((
                "connect (TCP + upgrade) p50 / p99 / p99.999 / max".into(),
                latency_line(&s.connect_latency, "connects"),
            ));
        }
        if !s.runtime_lag.is_empty() {
            // Included in every CALL latency above: how late the load
            // generator itself got round to reading an answer.
            rows.push((
                "loadgen's own runtime lag p50 / p99 / p99.999 / max".into(),
                latency_line(&s.runtime_lag, "10 ms timer samples"),
            ));
            // On the same clock as the slow CALLs: do they fall together?
            if let Some(line) = slow_calls_line(&s.lag_spikes, reference, what) {
                rows.push((
                    format!(
                        "loadgen's lag over {} ms, by second",
                        stats::LAG_SPIKE.as_millis()
                    ),
                    line,
                ));
            }
        }
        if a.mode == Mode::Storm {
            rows.push((
                "storm: re-Accepted".into(),
                format!(
                    "{} stations, last after {:.2} s",
                    s.progress.storm_reaccepted,
                    s.storm_last_accept_us as f64 / 1e6
                ),
            ));
        }
        if let Some(b) = self.rss_before_kib {
            rows.push(("server RSS before".into(), format!("{b} KiB")));
        }
        if let Some(c) = self.rss_connected_kib {
            rows.push((
                "server RSS, all connected".into(),
                format!("{c} KiB ({} connections)", self.rss_connections),
            ));
        }
        if let Some(per) = self.rss_per_connection_kib() {
            rows.push(("server RSS per connection".into(), format!("{per:.2} KiB")));
        }
        if let Some(c) = self.rss_steady_kib {
            rows.push(("server RSS, end of run".into(), format!("{c} KiB")));
        }
        if let Some(per) = self.rss_steady_per_connection_kib() {
            rows.push((
                "server RSS per connection, end of run".into(),
                format!("{per:.2} KiB"),
            ));
        }
        for (name, per) in [
            "server anon RSS per connection, all connected",
            "server anon RSS per connection, end of run",
        ]
        .into_iter()
        .zip(self.anon_per_connection_kib())
        {
            if let Some(per) = per {
                rows.push((name.into(), format!("{per:.2} KiB")));
            }
        }
        let w = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        writeln!(f, "| {:<w$} | value", "figure")?;
        writeln!(f, "|-{}-|------", "-".repeat(w))?;
        for (k, v) in rows {
            writeln!(f, "| {k:<w$} | {v}")?;
        }
        Ok(())
    }
}

/// One line of a worker's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum WorkerLine {
    Progress {
        progress: Progress,
    },
    /// All of the worker's stations are connected and Accepted (or the
    /// connect timeout passed).
    Ready {
        connect_secs: f64,
    },
    Done {
        summary: Box<Summary>,
    },
}

/// The worker's share: stations `[start, end)` of `n` split over `p`.
pub fn share(n: usize, p: usize, worker: usize) -> std::ops::Range<usize> {
    (worker * n / p)..((worker + 1) * n / p)
}

/// The soft limit on open files of this process, from /proc/self/limits.
fn fd_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Resident memory of `pid` and all its descendants (a `csms serve
/// --workers N` supervisor and its workers), in KiB (VmRSS of
/// /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib_tree(pid, "VmRSS:")
}

/// Anonymous resident memory (heap, stacks; RssAnon) of `pid` and its
/// descendants, in KiB. Unlike VmRSS it leaves out pages of the executable
/// and other files, which grow as code paths are first run and are shared
/// between the worker processes: this is the memory connections cost.
pub fn anon_rss_kib(pid: u32) -> Option<u64> {
    status_kib_tree(pid, "RssAnon:")
}

fn status_kib_tree(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let own = parse_status_kib(&text, field)?;
    let children: u64 = child_pids(pid)
        .into_iter()
        .filter_map(|c| status_kib_tree(c, field))
        .sum();
    Some(own + children)
}

/// Direct children of `pid`, from every thread's `children` list.
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Writes the fleet's credentials for `--credentials-out` (`id,password`
/// lines); returns how many stations it wrote.
pub fn write_credentials(args: &LoadgenArgs, path: &std::path::Path) -> Result<usize> {
    let Some(template) = &args.password else {
        bail!("--credentials-out needs --password (a template such as 'secret-{{id}}')");
    };
    let mut out = String::from("id,password\n");
    for index in 0..args.stations {
        let id = station::station_id(&args.id_prefix, index);
        let pw = station::station_password(template, &id);
        out.push_str(&format!("{id},{pw}\n"));
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    Ok(args.stations)
}

/// Runs the load generator: as the parent (spawning workers when
/// `--processes` > 1), or as a worker when `--worker-index` is set.
pub async fn run(args: LoadgenArgs) -> Result<Report> {
    if args.stations == 0 {
        bail!("--stations must be at least 1");
    }
    if args.processes == 0 {
        bail!("--processes must be at least 1");
    }
    if args.mode == Mode::Sustained && (args.rate.is_nan() || args.rate <= 0.0) {
        bail!("--rate must be positive in sustained mode");
    }
    let per_process = args.stations.div_ceil(args.processes) as u64;
    if let Some(limit) = fd_limit()
        && per_process + FD_RESERVE > limit
    {
        bail!(
            "{per_process} stations per process exceed the open-file limit {limit}: use --processes {} or more",
            args.stations
                .div_ceil(limit.saturating_sub(FD_RESERVE).max(1) as usize)
        );
    }
    let stations_201 = (0..args.stations)
        .filter(|&i| station::is_v201(i, args.ratio_201))
        .count();
    if let Some(w) = args.worker_index {
        return run_worker(args, w, stations_201).await;
    }
    // Schema compilation takes a moment; do it before the clock starts.
    let _ = schemas::Catalog::global();
    if args.processes == 1 {
        run_single(args, stations_201).await
    } else {
        run_parent(args, stations_201).await
    }
}

/// What the driver loop needs from the fleet, in one or many processes.
struct Driver {
    args: LoadgenArgs,
    bar: indicatif::ProgressBar,
    rss_before: Option<u64>,
    rss_connected: Option<u64>,
    rss_connections: u64,
    rss_steady: Option<u64>,
    anon: [Option<u64>; 3],
}

impl Driver {
    fn new(args: &LoadgenArgs) -> Self {
        let bar = indicatif::ProgressBar::new(args.stations as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed:>4} [{bar:30}] {pos}/{len} accepted  {msg}",
            )
            .expect("static template"),
        );
        Driver {
            rss_before: args.server_pid.and_then(rss_kib),
            args: args.clone(),
            bar,
            rss_connected: None,
            rss_connections: 0,
            rss_steady: None,
            anon: [args.server_pid.and_then(anon_rss_kib), None, None],
        }
    }

    /// Updates the display; reads the server's RSS the first time every
    /// station is connected.
    fn tick(&mut self, p: &Progress, last: &mut (Instant, u64)) {
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64();
        let rate = if dt > 0.0 {
            p.answered.saturating_sub(last.1) as f64 / dt
        } else {
            0.0
        };
        *last = (now, p.answered);
        self.bar.set_position(p.accepted);
        self.bar.set_message(format!(
            "{} open, {} sent, {} answered, {} errors, {rate:.0}/s",
            p.connected, p.sent, p.answered, p.errors
        ));
        if p.connected as usize >= self.args.stations
            && let Some(pid) = self.args.server_pid
        {
            let rss = rss_kib(pid);
            let anon = anon_rss_kib(pid);
            if self.rss_connected.is_none() {
                self.rss_connected = rss;
                self.anon[1] = anon;
                self.rss_connections = p.connected;
            } else {
                self.rss_steady = rss;
                self.anon[2] = anon;
            }
        }
    }

    fn finish(self, summary: Summary, stations_201: usize, connect_secs: f64) -> Report {
        self.bar.finish_and_clear();
        Report {
            args: self.args,
            summary,
            stations_201,
            connect_secs,
            rss_before_kib: self.rss_before,
            rss_connected_kib: self.rss_connected,
            rss_connections: self.rss_connections,
            rss_steady_kib: self.rss_steady,
            anon_kib: self.anon,
            worker: false,
        }
    }
}

async fn run_single(args: LoadgenArgs, stations_201: usize) -> Result<Report> {
    let mut driver = Driver::new(&args);
    let stats = Arc::new(Stats::default());
    let fleet = Fleet::start(&args, share(args.stations, 1, 0), stats.clone())?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (storm_tx, storm_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(fleet.drive(ready_tx, storm_rx));
    let mut ready_rx = Some(ready_rx);
    let mut storm_tx = Some(storm_tx);
    let mut connect_secs = 0.0;
    let mut last = (Instant::now(), 0);
    let mut interval = tokio::time::interval(Duration::from_millis(250));
    while !task.is_finished() {
        interval.tick().await;
        driver.tick(&stats.progress(), &mut last);
        if let Some(rx) = ready_rx.as_mut()
            && let Ok(secs) = rx.try_recv()
        {
            connect_secs = secs;
            ready_rx = None;
            // One process: the storm may start as soon as it is ready.
            if let Some(tx) = storm_tx.take() {
                let _ = tx.send(());
            }
        }
    }
    let summary = task.await.context("fleet task")??;
    Ok(driver.finish(summary, stations_201, connect_secs))
}

async fn run_worker(args: LoadgenArgs, worker: usize, stations_201: usize) -> Result<Report> {
    let stats = Arc::new(Stats::default());
    let range = share(args.stations, args.processes, worker);
    let fleet = Fleet::start(&args, range, stats.clone())?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (storm_tx, storm_rx) = tokio::sync::oneshot::channel();
    // The parent says when to cut power, so every worker drops together.
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "storm" {
                let _ = storm_tx.send(());
                break;
            }
        }
    });
    let task = tokio::spawn(fleet.drive(ready_tx, storm_rx));
    let out = Arc::new(Mutex::new(tokio::io::stdout()));
    let emit = |line: WorkerLine| {
        let out = out.clone();
        async move {
            let mut text = serde_json::to_string(&line).expect("worker line serializes");
            text.push('\n');
            let mut o = out.lock().await;
            let _ = o.write_all(text.as_bytes()).await;
            let _ = o.flush().await;
        }
    };
    let mut ready_rx = Some(ready_rx);
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    while !task.is_finished() {
        interval.tick().await;
        emit(WorkerLine::Progress {
            progress: stats.progress(),
        })
        .await;
        if let Some(rx) = ready_rx.as_mut()
            && let Ok(connect_secs) = rx.try_recv()
        {
            ready_rx = None;
            emit(WorkerLine::Ready { connect_secs }).await;
        }
    }
    let summary = task.await.context("fleet task")??;
    emit(WorkerLine::Done {
        summary: Box::new(summary.clone()),
    })
    .await;
    Ok(Report {
        args,
        summary,
        stations_201,
        connect_secs: 0.0,
        rss_before_kib: None,
        rss_connected_kib: None,
        rss_connections: 0,
        rss_steady_kib: None,
        anon_kib: [None; 3],
        worker: true,
    })
}

#[derive(Default)]
struct WorkerState {
    progress: Progress,
    ready: Option<f64>,
    done: Option<Summary>,
}

async fn run_parent(args: LoadgenArgs, stations_201: usize) -> Result<Report> {
    let mut driver = Driver::new(&args);
    let exe = std::env::current_exe().context("locating this executable for the workers")?;
    let own_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let states: Arc<std::sync::Mutex<Vec<WorkerState>>> = Arc::new(std::sync::Mutex::new(
        (0..args.processes)
            .map(|_| WorkerState::default())
            .collect(),
    ));
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    let mut readers = Vec::new();
    for w in 0..args.processes {
        let mut child = tokio::process::Command::new(&exe)
            .args(&own_args)
            .arg("--worker-index")
            .arg(w.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {w} ({})", exe.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        stdins.push(child.stdin.take().expect("piped stdin"));
        let states = states.clone();
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(parsed) = serde_json::from_str::<WorkerLine>(&line) else {
                    continue;
                };
                let mut st = states.lock().expect("worker states lock");
                match parsed {
                    WorkerLine::Progress { progress } => st[w].progress = progress,
                    WorkerLine::Ready { connect_secs } => st[w].ready = Some(connect_secs),
                    WorkerLine::Done { summary } => st[w].done = Some(*summary),
                }
            }
        }));
        children.push(child);
    }
    let mut storm_sent = false;
    let mut connect_secs = 0.0;
    let mut last = (Instant::now(), 0);
    let mut interval = tokio::time::interval(Duration::from_millis(250));
    loop {
        interval.tick().await;
        let (total, all_ready, ready_secs, finished) = {
            let st = states.lock().expect("worker states lock");
            let mut total = Progress::default();
            for s in st.iter() {
                total.add(&s.progress);
            }
            let secs: Vec<f64> = st.iter().filter_map(|s| s.ready).collect();
            (
                total,
                secs.len() == st.len(),
                secs.into_iter().fold(0.0, f64::max),
                readers.iter().all(|r| r.is_finished()),
            )
        };
        driver.tick(&total, &mut last);
        if all_ready && !storm_sent {
            storm_sent = true;
            connect_secs = ready_secs;
            for stdin in &mut stdins {
                let _ = stdin.write_all(b"storm\n").await;
                let _ = stdin.flush().await;
            }
        }
        if finished {
            break;
        }
    }
    for (w, mut child) in children.into_iter().enumerate() {
        let status = child.wait().await?;
        if !status.success() {
            bail!("worker {w} failed ({status}); see its messages above");
        }
    }
    let mut merged: Option<Summary> = None;
    let states = std::mem::take(&mut *states.lock().expect("worker states lock"));
    for (w, s) in states.into_iter().enumerate() {
        let summary = s
            .done
            .with_context(|| format!("worker {w} exited without its summary"))?;
        match merged.as_mut() {
            None => merged = Some(summary),
            Some(m) => m.merge(&summary)?,
        }
    }
    let summary = merged.context("no workers")?;
    Ok(driver.finish(summary, stations_201, connect_secs))
}

/// The stations of one process and their phase.
struct Fleet {
    args: LoadgenArgs,
    cfg: Arc<StationConfig>,
    stats: Arc<Stats>,
    range: std::ops::Range<usize>,
}

impl Fleet {
    fn start(args: &LoadgenArgs, range: std::ops::Range<usize>, stats: Arc<Stats>) -> Result<Self> {
        let url = args.url.trim_end_matches('/');
        let rest = url
            .strip_prefix("ws://")
            .context("--url must start with ws:// (wss is not simulated)")?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let server: SocketAddr = authority
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{authority} has no IPv4 address"))?;
        // Extra source addresses exist only on loopback.
        let source_ips: Vec<IpAddr> = if server.ip().is_loopback() {
            (0..args.source_ips).map(station::source_ip).collect()
        } else {
            Vec::new()
        };
        let pacing = match args.mode {
            Mode::Schedule | Mode::Storm => Pacing::Schedule,
            Mode::Saturation => Pacing::ClosedLoop,
            Mode::Sustained => {
                // Each station's share of the total rate.
                Pacing::Every(Duration::from_secs_f64(args.stations as f64 / args.rate))
            }
        };
        let cfg = StationConfig {
            server,
            url_base: format!("{url}/"),
            password: args.password.clone(),
            ports_per_station: if source_ips.is_empty() {
                0
            } else {
                station::ports_per_station(args.stations.div_ceil(source_ips.len()))
            },
            source_ips,
            schedule: ScheduleParams {
                heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
                meter: Duration::from_secs(args.meter_secs.max(1)),
                session: Duration::from_secs(args.session_secs.max(1)),
                gap: Duration::from_secs(args.gap_secs),
            },
            pacing,
            backoff: Backoff {
                min: Duration::from_secs_f64(args.backoff_min_secs.max(0.0)),
                random_range: Duration::from_secs_f64(args.backoff_random_secs.max(0.0)),
                doublings: args.backoff_doublings,
            },
            call_timeout: Duration::from_secs(args.call_timeout_secs.max(1)),
            storm_at: std::sync::OnceLock::new(),
        };
        Ok(Fleet {
            args: args.clone(),
            cfg: Arc::new(cfg),
            stats,
            range,
        })
    }

    /// Connects the stations, signals `ready`, runs the mode, stops them and
    /// returns this process's summary.
    async fn drive(
        self,
        ready: tokio::sync::oneshot::Sender<f64>,
        storm: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<Summary> {
        let n = self.range.len() as u64;
        let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
        let probe = tokio::spawn(lag_probe(self.stats.clone(), phase_rx.clone()));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let share_of_rate = self.args.connect_rate * n as f64 / self.args.stations as f64;
        let gap = Duration::from_secs_f64(1.0 / share_of_rate.max(1.0));
        let mut next = Instant::now();
        for index in self.range.clone() {
            let version = if station::is_v201(index, self.args.ratio_201) {
                schemas::OcppVersion::V201
            } else {
                schemas::OcppVersion::V16
            };
            let st = Station::new(
                index,
                station::station_id(&self.args.id_prefix, index),
                version,
                self.cfg.clone(),
                self.stats.clone(),
                phase_rx.clone(),
            );
            tasks.spawn(st.run());
            next += gap;
            tokio::time::sleep_until(next).await;
        }
        let connect_deadline = started + Duration::from_secs(self.args.connect_timeout_secs);
        while self
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
            < n
            && Instant::now() < connect_deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let connect_secs = started.elapsed().as_secs_f64();
        if self
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
            < n
        {
            tracing::warn!("connect timeout: not every station is Accepted; running anyway");
        }
        let _ = ready.send(connect_secs);
        let before = self.stats.progress().answered;
        let run_start = Instant::now();
        let run_started_unix = stats::unix_secs();
        let mut storm_started_unix = 0;
        let _ = phase_tx.send(Phase::Running);
        let limit = Duration::from_secs(self.args.duration_secs);
        if self.args.mode == Mode::Storm {
            tokio::time::sleep(Duration::from_secs(self.args.storm_after_secs)).await;
            // Wait for the parent's signal (all processes ready), bounded.
            let _ = tokio::time::timeout(limit, storm).await;
            let dropped = self
                .stats
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed);
            let _ = self.cfg.storm_at.set(Instant::now());
            storm_started_unix = stats::unix_secs();
            let _ = phase_tx.send(Phase::Storm);
            // Timestamped, to line the storm up with the server's log.
            tracing::info!(stations = dropped, "storm: dropping every socket");
            let storm_deadline = Instant::now() + limit;
            while self
                .stats
                .storm_reaccepted
                .load(std::sync::atomic::Ordering::Relaxed)
                < dropped
                && Instant::now() < storm_deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            tokio::time::sleep(limit).await;
        }
        let run_secs = run_start.elapsed().as_secs_f64();
        let answered = self.stats.progress().answered - before;
        let connected_at_end = self
            .stats
            .connected
            .load(std::sync::atomic::Ordering::Relaxed);
        let _ = phase_tx.send(Phase::Stop);
        probe.abort();
        // Outstanding CALLs get their answer (or time out) before the tally.
        let mut acks = Vec::with_capacity(n as usize);
        while let Some(done) = tasks.join_next().await {
            if let Ok(a) = done {
                acks.push(a);
            }
        }
        if let Some(base) = &self.args.acks_out {
            let path = acks::path_for(base, self.args.worker_index);
            acks::write(&path, &acks)
                .with_context(|| format!("writing --acks-out {}", path.display()))?;
        }
        let mut summary = self.stats.summary();
        summary.progress.connected = connected_at_end;
        summary.run_answered = answered;
        summary.run_secs = run_secs;
        summary.run_started_unix = run_started_unix;
        summary.storm_started_unix = storm_started_unix;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_calls_are_placed_against_the_storm_when_there_was_one() {
        let mut s = Stats::default().summary();
        s.run_started_unix = 1_000;
        s.slow_calls = vec![(1_012, 3), (1_013, 40), (1_020, 1)];
        let (at, what) = time_reference(&s);
        assert_eq!(
            slow_calls_line(&s.slow_calls, at, what).unwrap(),
            "44 in 3 distinct seconds over 9 s, from +12 s after the run phase began; \
             busiest +13s: 40, +12s: 3, +20s: 1"
        );
        s.storm_started_unix = 1_011;
        let (at, what) = time_reference(&s);
        assert_eq!(
            slow_calls_line(&s.slow_calls, at, what).unwrap(),
            "44 in 3 distinct seconds over 9 s, from +1 s after the storm's drop; \
             busiest +2s: 40, +1s: 3, +9s: 1"
        );
        assert_eq!(slow_calls_line(&[], at, what), None);
    }

    #[test]
    fn shares_cover_all_stations_once() {
        for (n, p) in [(10, 3), (100_000, 6), (5, 5), (7, 1)] {
            let mut next = 0;
            for w in 0..p {
                let r = share(n, p, w);
                assert_eq!(r.start, next);
                next = r.end;
                assert!(r.len() <= n.div_ceil(p));
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tcsms\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(12345));
        assert_eq!(parse_status_kib("Name: x\n", "VmRSS:"), None);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        let anon = anon_rss_kib(std::process::id()).unwrap();
        assert!(anon > 0 && anon <= rss_kib(std::process::id()).unwrap());
    }

    #[test]
    fn worker_lines_round_trip() {
        let line = serde_json::to_string(&WorkerLine::Ready { connect_secs: 1.5 }).unwrap();
        assert_eq!(line, r#"{"kind":"ready","connect_secs":1.5}"#);
        let back: WorkerLine = serde_json::from_str(&line).unwrap();
        assert!(matches!(back, WorkerLine::Ready { connect_secs } if connect_secs == 1.5));
        // A final summary with everything filled in survives the tagged enum.
        let stats = Stats::default();
        stats.record_latency(Duration::from_secs(2), true);
        let done = WorkerLine::Done {
            summary: Box::new(stats.summary()),
        };
        let back: WorkerLine =
            serde_json::from_str(&serde_json::to_string(&done).unwrap()).unwrap();
        let WorkerLine::Done { summary } = back else {
            panic!("not a summary")
        };
        assert_eq!(summary.slow_calls.len(), 1);
        assert_eq!(summary.boot_latency.len(), 1);
    }
}
