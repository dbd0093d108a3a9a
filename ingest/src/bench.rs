//! `csms bench wal`: how many frames per second this machine makes durable
//! with group commit, next to its raw fsync rate, so the WAL's batching is
//! visible as a number rather than a claim.

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use schemas::OcppVersion;

use crate::wal::{Direction, Wal, WalConfig, WalRecord};

#[derive(Debug, Clone)]
pub struct WalBenchOptions {
    /// Directory on the disk to measure (a fresh sub-directory is used).
    pub dir: PathBuf,
    pub seconds: u64,
    /// Concurrent appenders, each like one station waiting for its answer.
    pub concurrency: usize,
    /// Bytes of raw frame text per record.
    pub frame_bytes: usize,
    pub wal: WalConfig,
}

#[derive(Debug, Clone)]
pub struct WalBenchReport {
    pub raw_fsyncs_per_sec: f64,
    pub appends: u64,
    pub records: u64,
    pub seconds: f64,
    pub fsyncs: u64,
    pub records_per_sec: f64,
    pub mean_records_per_fsync: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for WalBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "| figure | value |")?;
        writeln!(f, "|---|---|")?;
        writeln!(
            f,
            "| raw fsync rate (write 128 B + fdatasync, one thread) | {:.0} /s |",
            self.raw_fsyncs_per_sec
        )?;
        writeln!(
            f,
            "| durable appends (CALL + answer = 2 records each) | {} in {:.1} s |",
            self.appends, self.seconds
        )?;
        writeln!(
            f,
            "| durable records per second | {:.0} |",
            self.records_per_sec
        )?;
        writeln!(
            f,
            "| fsyncs | {} ({:.0} /s) |",
            self.fsyncs,
            self.fsyncs as f64 / self.seconds
        )?;
        writeln!(
            f,
            "| mean records per fsync (group commit batch) | {:.1} |",
            self.mean_records_per_fsync
        )?;
        writeln!(
            f,
            "| append latency p50 / p99 / p99.9 / max | {:.2} / {:.2} / {:.2} / {:.2} ms |",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms
        )?;
        write!(
            f,
            "| speed-up over one fsync per record | {:.1}x |",
            self.records_per_sec / self.raw_fsyncs_per_sec.max(1.0)
        )
    }
}

/// The machine's raw fsync rate on `dir`: small write + fdatasync in a loop.
pub fn raw_fsync_rate(dir: &std::path::Path, duration: Duration) -> std::io::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let buf = [b'x'; 128];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        f.write_all(&buf)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// Runs the benchmark; `progress` is called about every 100 ms with the
/// elapsed fraction.
pub async fn run_wal_bench(
    opts: WalBenchOptions,
    progress: impl Fn(f64) + Send + 'static,
) -> anyhow::Result<WalBenchReport> {
    let dir = opts
        .dir
        .join(format!("csms-wal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let probe_dir = dir.clone();
    let raw =
        tokio::task::spawn_blocking(move || raw_fsync_rate(&probe_dir, Duration::from_secs(2)))
            .await??;

    let (wal, handle) = Wal::open(&dir.join("wal"), opts.wal.clone())?;
    let stop = Arc::new(AtomicBool::new(false));
    let appends = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let frame = format!(
        "[2,\"0123456789\",\"MeterValues\",{{\"pad\":\"{}\"}}]",
        "x".repeat(opts.frame_bytes.saturating_sub(48))
    );
    let fsyncs_before = handle.stats().fsyncs;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..opts.concurrency {
        let (handle, stop, appends, hist, frame) = (
            handle.clone(),
            stop.clone(),
            appends.clone(),
            hist.clone(),
            frame.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let station = format!("BENCH-{i:06}");
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
            while !stop.load(Ordering::Relaxed) {
                let rec = |direction| WalRecord {
                    received_at_us: chrono::Utc::now().timestamp_micros(),
                    station_id: station.clone(),
                    version: OcppVersion::V16,
                    direction,
                    message_type: 2,
                    message_id: "0123456789".into(),
                    action: Some("MeterValues".into()),
                    error_code: None,
                    error_description: None,
                    raw: frame.clone(),
                };
                let t = Instant::now();
                if handle
                    .append(vec![rec(Direction::CsToCsms), rec(Direction::CsmsToCs)])
                    .await
                    .is_err()
                {
                    break;
                }
                let _ = local.record(t.elapsed().as_micros() as u64);
                appends.fetch_add(1, Ordering::Relaxed);
            }
            let _ = hist.lock().add(&local);
        }));
    }
    let total = Duration::from_secs(opts.seconds);
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress(start.elapsed().as_secs_f64() / total.as_secs_f64());
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let fsyncs = handle.stats().fsyncs - fsyncs_before;
    drop(handle);
    wal.close().await?;
    std::fs::remove_dir_all(&dir)?;

    let appends = appends.load(Ordering::Relaxed);
    let records = appends * 2;
    let h = hist.lock();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(WalBenchReport {
        raw_fsyncs_per_sec: raw,
        appends,
        records,
        seconds,
        fsyncs,
        records_per_sec: records as f64 / seconds,
        mean_records_per_fsync: records as f64 / fsyncs.max(1) as f64,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    })
}
