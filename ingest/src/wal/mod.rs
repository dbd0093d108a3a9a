//! The node's write-ahead log: every frame, both directions, is made durable
//! here before a charger's CALL is answered.
//!
//! # Design
//! One dedicated OS thread owns the active segment file. Appenders send
//! requests over a bounded channel; the thread drains everything queued (up to
//! `max_batch_records`), optionally waits `commit_window_us` for more, writes
//! the whole batch, issues **one** `fdatasync` and only then completes every
//! waiter (group commit). Nothing is acknowledged before its fsync.
//!
//! Sequence numbers are `u64`, strictly increasing per node and never reused
//! (a failed write leaves a gap rather than risking two records with one
//! number). They survive restarts: [`Wal::open`] recovers the next number from
//! the segment names and the last segment's records, and the lake writer raises
//! it above what bronze already holds with
//! [`WalHandle::ensure_next_seq_at_least`].
//!
//! # On-disk format
//! A directory of segment files named by the sequence number they start at,
//! zero-padded to 20 digits (`00000000000000000001.wal`), so names sort in
//! sequence order. Every segment starts with the 8-byte magic `CSMSWAL1`,
//! followed by records:
//!
//! ```text
//! u32 LE  body length
//! u32 LE  CRC32 (IEEE) of the body
//! body:
//!   u64 LE  seq
//!   i64 LE  received_at_us
//!   u8      OCPP version code (OcppVersion::code)
//!   u8      direction (0 = cs_to_csms, 1 = csms_to_cs)
//!   u8      message type (0 when the frame could not be parsed)
//!   str     station_id
//!   str     message_id
//!   optstr  action
//!   optstr  error_code
//!   optstr  error_description
//!   str     raw
//! str    = u32 LE byte length + UTF-8 bytes
//! optstr = like str; the length u32::MAX means None
//! ```
//!
//! Only the newest segment can hold a torn tail (a segment is fsynced before
//! the next one is created), so [`Wal::open`] truncates that one at the first
//! record that is incomplete or fails its CRC; this is logged, never fatal.
//! Older (sealed) segments are read strictly by [`read_segment`].
//!
//! A segment is rolled when it reaches `segment_bytes` (checked between
//! append requests, so one request never spans two segments) and when the lake
//! writer calls [`WalHandle::seal`], so data reaches the lake by age too. The
//! lake writer deletes a sealed segment with [`WalHandle::remove_segment`]
//! once bronze holds all of it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use schemas::OcppVersion;
use tokio::sync::{mpsc, oneshot};

const MAGIC: &[u8; 8] = b"CSMSWAL1";
const MAGIC_LEN: u64 = MAGIC.len() as u64;
const RECORD_HEADER_LEN: usize = 8;
/// No frame comes near this; a larger length field is garbage (torn tail).
const MAX_BODY_LEN: usize = 256 * 1024 * 1024;
const NONE_LEN: u32 = u32::MAX;
const SEGMENT_SUFFIX: &str = ".wal";

/// Which way a frame travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    CsToCsms,
    CsmsToCs,
}

impl Direction {
    /// The value stored in `bronze.ocpp_messages.direction`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::CsToCsms => "cs_to_csms",
            Direction::CsmsToCs => "csms_to_cs",
        }
    }

    const fn code(self) -> u8 {
        match self {
            Direction::CsToCsms => 0,
            Direction::CsmsToCs => 1,
        }
    }

    const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Direction::CsToCsms),
            1 => Some(Direction::CsmsToCs),
            _ => None,
        }
    }
}

/// One frame, as received or sent.
#[derive(Debug, Clone, PartialEq)]
pub struct WalRecord {
    /// UTC microseconds since the epoch.
    pub received_at_us: i64,
    pub station_id: String,
    pub version: OcppVersion,
    pub direction: Direction,
    /// 2, 3, 4 (5, 6 in 2.1); 0 if the frame could not be parsed.
    pub message_type: u8,
    /// `"-1"` if unreadable.
    pub message_id: String,
    /// For results and errors: the action of the CALL they answer.
    pub action: Option<String>,
    pub error_code: Option<String>,
    pub error_description: Option<String>,
    /// The frame text exactly as received or sent.
    pub raw: String,
}

/// WAL tuning; every field has a default so a partial TOML table works.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct WalConfig {
    /// Roll the active segment once it reaches this size.
    pub segment_bytes: u64,
    /// Extra wait (µs) after the first request of a batch to gather more.
    /// Batches form anyway while an fsync runs; this only helps on very fast
    /// disks and costs that much latency on every answer.
    pub commit_window_us: u64,
    /// Upper bound of records written per fsync.
    pub max_batch_records: usize,
    /// WAL bytes on disk above which [`WalHandle::over_budget`] is true (the
    /// lake is not keeping up): the server then refuses new connections.
    pub disk_budget_bytes: u64,
    /// Capacity (in requests) of the channel to the writer thread.
    pub queue_capacity: usize,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: 64 * 1024 * 1024,
            commit_window_us: 200,
            max_batch_records: 8192,
            disk_budget_bytes: 8 * 1024 * 1024 * 1024,
            queue_capacity: 16_384,
        }
    }
}

/// WAL failures. Cloneable because one failed fsync fails every waiter of
/// the batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error(
        "WAL disk is full at {path}: cannot write durable records (free space or raise the lake's throughput)"
    )]
    DiskFull { path: PathBuf },
    #[error("WAL disk is read-only at {path}: cannot write durable records")]
    ReadOnly { path: PathBuf },
    #[error("WAL I/O error ({op}) at {path}: {message}")]
    Io {
        op: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("WAL segment {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("WAL writer queue is full")]
    QueueFull,
    #[error("WAL is closed")]
    Closed,
    #[error("WAL segment {0} is the active segment or unknown; refusing to remove it")]
    NotSealed(u64),
}

impl WalError {
    fn io(op: &'static str, path: &Path, err: &io::Error) -> WalError {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => WalError::DiskFull {
                path: path.to_path_buf(),
            },
            Some(libc::EROFS) => WalError::ReadOnly {
                path: path.to_path_buf(),
            },
            _ => WalError::Io {
                op,
                path: path.to_path_buf(),
                message: err.to_string(),
            },
        }
    }
}

/// A segment file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    /// The sequence number in the file name; every record in it is >= this.
    pub first_seq: u64,
    /// No record in the segment has a higher seq (exact when known, else the
    /// next segment's first seq minus one). Lets the lake writer drop fully
    /// committed segments without reading them.
    pub max_seq: u64,
    pub bytes: u64,
}

/// A snapshot of the WAL's state, for metrics, health and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalStats {
    pub bytes_on_disk: u64,
    pub segments: usize,
    pub sealed_segments: usize,
    /// Highest seq known to be fsynced (0 before the first write).
    pub last_durable_seq: u64,
    /// The seq the next record will get.
    pub next_seq: u64,
    /// `received_at_us` of the oldest record still on disk (not yet moved to
    /// the lake and removed).
    pub oldest_unflushed_us: Option<i64>,
    pub records_written: u64,
    pub batches: u64,
    pub fsyncs: u64,
    pub over_budget: bool,
    /// The last write error, cleared by the next successful fsync.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct SegMeta {
    path: PathBuf,
    bytes: u64,
    first_record_us: Option<i64>,
    last_seq: Option<u64>,
    sealed: bool,
}

/// State shared by the writer thread and the handles.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    budget: u64,
    segments: Mutex<BTreeMap<u64, SegMeta>>,
    bytes: AtomicU64,
    last_durable_seq: AtomicU64,
    next_seq: AtomicU64,
    records: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    /// Recomputes the byte total from the segment map (called with the lock).
    fn refresh_bytes(&self, segments: &BTreeMap<u64, SegMeta>) {
        let bytes: u64 = segments.values().map(|m| m.bytes).sum();
        self.bytes.store(bytes, Ordering::Relaxed);
        metrics::gauge!("csms_wal_bytes").set(bytes as f64);
    }
}

type Reply<T> = oneshot::Sender<Result<T, WalError>>;

enum Request {
    Append {
        records: Vec<WalRecord>,
        done: Option<Reply<u64>>,
        /// When the caller asked: the commit time reported is from here.
        queued_at: Instant,
    },
    Seal {
        done: Reply<Option<SegmentInfo>>,
    },
    EnsureNextSeq {
        min: u64,
        done: Reply<u64>,
    },
    Shutdown {
        done: Reply<()>,
    },
}

impl Request {
    fn weight(&self) -> usize {
        match self {
            Request::Append { records, .. } => records.len().max(1),
            _ => 1,
        }
    }
}

/// Owns the writer thread. Dropping it detaches the thread, which then ends
/// once every [`WalHandle`] is gone; [`Wal::close`] ends it deterministically.
pub struct Wal {
    tx: mpsc::Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

/// A cheap, cloneable handle for appenders and the lake writer.
#[derive(Clone)]
pub struct WalHandle {
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

impl Wal {
    /// Opens (creating if needed) the WAL in `dir`, recovers the sequence and
    /// truncates a torn tail, then starts the writer thread.
    pub fn open(dir: &Path, config: WalConfig) -> Result<(Wal, WalHandle), WalError> {
        fs::create_dir_all(dir).map_err(|e| WalError::io("create dir", dir, &e))?;
        let found = list_segments(dir)?;
        let mut segments = BTreeMap::new();
        let mut next_seq = 1u64;
        let last_index = found.len().checked_sub(1);
        for (i, seg) in found.into_iter().enumerate() {
            next_seq = next_seq.max(seg.first_seq);
            if Some(i) == last_index {
                let recovered = recover_last_segment(&seg.path)?;
                match recovered {
                    None => {
                        fs::remove_file(&seg.path)
                            .map_err(|e| WalError::io("remove empty segment", &seg.path, &e))?;
                    }
                    Some((first_us, last_seq, bytes)) => {
                        next_seq = next_seq.max(last_seq + 1);
                        segments.insert(
                            seg.first_seq,
                            SegMeta {
                                path: seg.path,
                                bytes,
                                first_record_us: Some(first_us),
                                last_seq: Some(last_seq),
                                sealed: true,
                            },
                        );
                    }
                }
            } else {
                let first_record_us = first_record_time(&seg.path)?;
                segments.insert(
                    seg.first_seq,
                    SegMeta {
                        path: seg.path,
                        bytes: seg.bytes,
                        first_record_us,
                        last_seq: None,
                        sealed: true,
                    },
                );
            }
        }
        let last_durable = next_seq - 1;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            budget: config.disk_budget_bytes,
            segments: Mutex::new(segments),
            bytes: AtomicU64::new(0),
            last_durable_seq: AtomicU64::new(last_durable),
            next_seq: AtomicU64::new(next_seq),
            records: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        {
            let segs = shared.segments.lock();
            shared.refresh_bytes(&segs);
        }
        let mut writer = Writer {
            config: config.clone(),
            shared: shared.clone(),
            active: None,
            next_seq,
            buf: Vec::new(),
            batch_oldest: None,
        };
        writer.ensure_active()?;
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("csms-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| WalError::io("spawn writer thread", dir, &e))?;
        tracing::info!(dir = %dir.display(), next_seq, "WAL opened");
        Ok((
            Wal {
                tx: tx.clone(),
                thread: Some(thread),
            },
            WalHandle { tx, shared },
        ))
    }

    /// Writes and fsyncs everything queued before this call, then stops the
    /// writer thread. Later appends fail with [`WalError::Closed`].
    pub async fn close(mut self) -> Result<(), WalError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Shutdown { done })
            .await
            .map_err(|_| WalError::Closed)?;
        let result = rx.await.map_err(|_| WalError::Closed)?;
        if let Some(thread) = self.thread.take() {
            // The thread exits right after answering; joining is immediate.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }
}

impl WalHandle {
    /// Appends records; resolves only after they are fsynced (group commit).
    /// Returns the seq of the last record (the last durable seq when
    /// `records` is empty).
    pub async fn append(&self, records: Vec<WalRecord>) -> Result<u64, WalError> {
        let queued_at = Instant::now();
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Append {
                records,
                done: Some(done),
                queued_at,
            })
            .await
            .map_err(|_| WalError::Closed)?;
        let result = rx.await.map_err(|_| WalError::Closed)?;
        // Against `csms_wal_commit_seconds` (until the writer answered), the
        // difference is how long the woken caller waited to run again.
        metrics::histogram!("csms_wal_append_seconds").record(queued_at.elapsed().as_secs_f64());
        result
    }

    /// Fire-and-forget append for frames that need no durability wait; still
    /// written in order with the others. Fails when the queue is full rather
    /// than blocking the caller's task.
    pub fn append_nowait(&self, records: Vec<WalRecord>) -> Result<(), WalError> {
        self.tx
            .try_send(Request::Append {
                records,
                done: None,
                queued_at: Instant::now(),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => WalError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => WalError::Closed,
            })
    }

    /// Closes the active segment (if it holds any record) and starts a new
    /// one, so the lake writer can take the data. Returns the sealed segment.
    pub async fn seal(&self) -> Result<Option<SegmentInfo>, WalError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Seal { done })
            .await
            .map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Makes sure the next record gets a seq >= `min` (the lake may already
    /// hold records of this node, e.g. after the WAL directory was lost).
    /// Returns the next seq.
    pub async fn ensure_next_seq_at_least(&self, min: u64) -> Result<u64, WalError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::EnsureNextSeq { min, done })
            .await
            .map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Sealed segments in sequence order (never the one being written).
    pub fn sealed_segments(&self) -> Vec<SegmentInfo> {
        let segs = self.shared.segments.lock();
        segment_infos(&segs, true)
    }

    /// Deletes a sealed segment whose records are all in the lake.
    pub fn remove_segment(&self, first_seq: u64) -> Result<(), WalError> {
        let mut segs = self.shared.segments.lock();
        let Some(meta) = segs.get(&first_seq) else {
            return Err(WalError::NotSealed(first_seq));
        };
        if !meta.sealed {
            return Err(WalError::NotSealed(first_seq));
        }
        match fs::remove_file(&meta.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(WalError::io("remove segment", &meta.path, &e)),
        }
        segs.remove(&first_seq);
        self.shared.refresh_bytes(&segs);
        Ok(())
    }

    /// WAL bytes on disk above the budget: the lake is behind.
    pub fn over_budget(&self) -> bool {
        self.shared.bytes.load(Ordering::Relaxed) > self.shared.budget
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn stats(&self) -> WalStats {
        let segs = self.shared.segments.lock();
        let bytes = self.shared.bytes.load(Ordering::Relaxed);
        WalStats {
            bytes_on_disk: bytes,
            segments: segs.len(),
            sealed_segments: segs.values().filter(|m| m.sealed).count(),
            last_durable_seq: self.shared.last_durable_seq.load(Ordering::Acquire),
            next_seq: self.shared.next_seq.load(Ordering::Acquire),
            oldest_unflushed_us: segs.values().find_map(|m| m.first_record_us),
            records_written: self.shared.records.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
            over_budget: bytes > self.shared.budget,
            last_error: self.shared.last_error.lock().clone(),
        }
    }
}

fn segment_infos(segs: &BTreeMap<u64, SegMeta>, sealed_only: bool) -> Vec<SegmentInfo> {
    let keys: Vec<u64> = segs.keys().copied().collect();
    segs.iter()
        .enumerate()
        .filter(|(_, (_, m))| !sealed_only || m.sealed)
        .map(|(i, (&first_seq, m))| {
            let bound = keys.get(i + 1).map(|next| next - 1).unwrap_or(u64::MAX);
            SegmentInfo {
                path: m.path.clone(),
                first_seq,
                max_seq: m.last_seq.unwrap_or(bound),
                bytes: m.bytes,
            }
        })
        .collect()
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// Every segment file in `dir`, in sequence order. `max_seq` is bounded only
/// by the next segment's name (the last one gets `u64::MAX`).
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentInfo>, WalError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(WalError::io("list", dir, &e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io("list", dir, &e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(first_seq) = stem.parse::<u64>() else {
            continue;
        };
        let bytes = entry
            .metadata()
            .map_err(|e| WalError::io("stat", &entry.path(), &e))?
            .len();
        out.push(SegmentInfo {
            path: entry.path(),
            first_seq,
            max_seq: u64::MAX,
            bytes,
        });
    }
    out.sort_by_key(|s| s.first_seq);
    for i in 1..out.len() {
        out[i - 1].max_seq = out[i].first_seq - 1;
    }
    Ok(out)
}

/// Segments of a WAL directory that an open WAL is no longer writing: all but
/// the newest (an open WAL always has its active segment as the newest file).
/// A running node should prefer [`WalHandle::sealed_segments`], which knows
/// exactly which segment is active.
pub fn sealed_segments(dir: &Path) -> Result<Vec<SegmentInfo>, WalError> {
    let mut all = list_segments(dir)?;
    all.pop();
    Ok(all)
}

/// Records of a segment with their seqs.
pub type SegmentRecords = Vec<(u64, WalRecord)>;

/// Reads every record of a segment; any torn or corrupt record is an error.
pub fn read_segment(path: &Path) -> Result<SegmentRecords, WalError> {
    match read_segment_lossy(path)? {
        (records, None) => Ok(records),
        (_, Some(corrupt)) => Err(corrupt),
    }
}

/// Reads a segment up to its first torn or corrupt record: the records before
/// it, and the corruption if there is one. Lets the lake writer keep what is
/// readable instead of stalling on one damaged segment forever. Only failing
/// to read the file at all is an `Err`.
pub fn read_segment_lossy(path: &Path) -> Result<(SegmentRecords, Option<WalError>), WalError> {
    let data = fs::read(path).map_err(|e| WalError::io("read segment", path, &e))?;
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        let corrupt = WalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "missing segment header".into(),
        };
        return Ok((Vec::new(), Some(corrupt)));
    }
    let scan = scan_records(&data[MAGIC.len()..]);
    let corrupt = scan.problem.map(|reason| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: MAGIC_LEN + scan.valid_len as u64,
        reason,
    });
    Ok((scan.records, corrupt))
}

struct Scan {
    records: Vec<(u64, WalRecord)>,
    /// Bytes (after the magic) holding whole, valid records.
    valid_len: usize,
    problem: Option<String>,
}

fn scan_records(data: &[u8]) -> Scan {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let problem = loop {
        if pos == data.len() {
            break None;
        }
        if data.len() - pos < RECORD_HEADER_LEN {
            break Some("incomplete record header".to_string());
        }
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap_or_default());
        if len > MAX_BODY_LEN || data.len() - pos - RECORD_HEADER_LEN < len {
            break Some(format!(
                "record length {len} runs past the end of the segment"
            ));
        }
        let body = &data[pos + RECORD_HEADER_LEN..pos + RECORD_HEADER_LEN + len];
        if crc32fast::hash(body) != crc {
            break Some("CRC mismatch".to_string());
        }
        match decode_body(body) {
            Ok(rec) => records.push(rec),
            Err(reason) => break Some(reason),
        }
        pos += RECORD_HEADER_LEN + len;
    };
    Scan {
        records,
        valid_len: pos,
        problem,
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_opt(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(buf, s),
        None => buf.extend_from_slice(&NONE_LEN.to_le_bytes()),
    }
}

/// Appends one framed record (header + body) to `buf`.
fn encode_record(seq: u64, rec: &WalRecord, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&rec.received_at_us.to_le_bytes());
    buf.push(rec.version.code());
    buf.push(rec.direction.code());
    buf.push(rec.message_type);
    put_str(buf, &rec.station_id);
    put_str(buf, &rec.message_id);
    put_opt(buf, rec.action.as_deref());
    put_opt(buf, rec.error_code.as_deref());
    put_opt(buf, rec.error_description.as_deref());
    put_str(buf, &rec.raw);
    let body_len = (buf.len() - start - RECORD_HEADER_LEN) as u32;
    let crc = crc32fast::hash(&buf[start + RECORD_HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() - self.pos < n {
            return Err("record body too short".into());
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| "short u32")?,
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| "short u64")?,
        ))
    }
    fn opt_str(&mut self) -> Result<Option<String>, String> {
        let len = self.u32()?;
        if len == NONE_LEN {
            return Ok(None);
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| "string is not UTF-8".to_string())
    }
    fn str(&mut self) -> Result<String, String> {
        self.opt_str()?
            .ok_or_else(|| "missing required string".to_string())
    }
}

fn decode_body(body: &[u8]) -> Result<(u64, WalRecord), String> {
    let mut c = Cursor { data: body, pos: 0 };
    let seq = c.u64()?;
    let received_at_us = c.u64()? as i64;
    let version_code = c.u8()?;
    let version = OcppVersion::from_code(version_code)
        .ok_or_else(|| format!("unknown OCPP version code {version_code}"))?;
    let dir_code = c.u8()?;
    let direction = Direction::from_code(dir_code)
        .ok_or_else(|| format!("unknown direction code {dir_code}"))?;
    let message_type = c.u8()?;
    let station_id = c.str()?;
    let message_id = c.str()?;
    let action = c.opt_str()?;
    let error_code = c.opt_str()?;
    let error_description = c.opt_str()?;
    let raw = c.str()?;
    if c.pos != body.len() {
        return Err("trailing bytes in record body".into());
    }
    Ok((
        seq,
        WalRecord {
            received_at_us,
            station_id,
            version,
            direction,
            message_type,
            message_id,
            action,
            error_code,
            error_description,
            raw,
        },
    ))
}

/// Validates the newest segment after a restart and truncates a torn tail.
/// Returns `None` when it holds no record (it is then removed by the caller),
/// else (first record time, last seq, file length).
fn recover_last_segment(path: &Path) -> Result<Option<(i64, u64, u64)>, WalError> {
    let data = fs::read(path).map_err(|e| WalError::io("read segment", path, &e))?;
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        // Crashed while creating the segment: it can hold nothing acknowledged.
        tracing::warn!(path = %path.display(), "WAL segment without header after restart; removing it");
        return Ok(None);
    }
    let scan = scan_records(&data[MAGIC.len()..]);
    let valid = MAGIC_LEN + scan.valid_len as u64;
    if let Some(reason) = &scan.problem {
        tracing::warn!(
            path = %path.display(),
            offset = valid,
            dropped_bytes = data.len() as u64 - valid,
            %reason,
            "WAL torn tail after restart; truncating (these records were never acknowledged)"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| WalError::io("open segment", path, &e))?;
        file.set_len(valid)
            .map_err(|e| WalError::io("truncate torn tail", path, &e))?;
        file.sync_all()
            .map_err(|e| WalError::io("fsync", path, &e))?;
    }
    match (scan.records.first(), scan.records.last()) {
        (Some(first), Some(last)) => Ok(Some((first.1.received_at_us, last.0, valid))),
        _ => Ok(None),
    }
}

/// `received_at_us` of a segment's first record, reading only that record.
fn first_record_time(path: &Path) -> Result<Option<i64>, WalError> {
    let mut file = File::open(path).map_err(|e| WalError::io("open segment", path, &e))?;
    let mut head = [0u8; MAGIC.len() + RECORD_HEADER_LEN + 16];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WalError::io("read segment", path, &e)),
        }
    }
    if filled < head.len() || &head[..MAGIC.len()] != MAGIC {
        return Ok(None);
    }
    let at = MAGIC.len() + RECORD_HEADER_LEN + 8;
    Ok(Some(i64::from_le_bytes(
        head[at..at + 8].try_into().unwrap_or_default(),
    )))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io("fsync directory", dir, &e))
}

struct Active {
    file: File,
    path: PathBuf,
    first_seq: u64,
    /// Bytes known to be written and fsynced.
    len: u64,
    records: u64,
}

type Waiter = (Option<Reply<u64>>, u64);

/// The writer thread's state.
struct Writer {
    config: WalConfig,
    shared: Arc<Shared>,
    active: Option<Active>,
    next_seq: u64,
    /// Encoded records of the current batch, not yet written.
    buf: Vec<u8>,
    /// When the oldest request of the current batch was queued.
    batch_oldest: Option<Instant>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let max = self.config.max_batch_records.max(1);
        let window = Duration::from_micros(self.config.commit_window_us);
        let mut reqs = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut n = first.weight();
            reqs.push(first);
            drain(&mut rx, &mut reqs, &mut n, max);
            if !window.is_zero() && n < max {
                std::thread::sleep(window);
                drain(&mut rx, &mut reqs, &mut n, max);
            }
            if self.process(&mut reqs) {
                return;
            }
        }
        // Every handle is gone: nothing can be waiting any more.
    }

    /// Handles one batch; returns true on shutdown.
    fn process(&mut self, reqs: &mut Vec<Request>) -> bool {
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut batch_records = 0usize;
        let mut stop = false;
        for req in reqs.drain(..) {
            match req {
                Request::Append {
                    records,
                    done,
                    queued_at,
                } => {
                    self.batch_oldest =
                        Some(self.batch_oldest.map_or(queued_at, |o| o.min(queued_at)));
                    if records.is_empty() {
                        waiters.push((done, self.next_seq - 1));
                        continue;
                    }
                    if let Some(a) = &self.active
                        && a.records > 0
                        && a.len + self.buf.len() as u64 >= self.config.segment_bytes
                    {
                        self.flush(&mut waiters, batch_records);
                        batch_records = 0;
                        self.close_active();
                    }
                    if let Err(e) = self.ensure_active() {
                        self.note_error(&e);
                        if let Some(done) = done {
                            let _ = done.send(Err(e));
                        }
                        continue;
                    }
                    let first_us = records[0].received_at_us;
                    for rec in &records {
                        encode_record(self.next_seq, rec, &mut self.buf);
                        self.next_seq += 1;
                    }
                    batch_records += records.len();
                    if let Some(a) = &mut self.active
                        && a.records == 0
                    {
                        let mut segs = self.shared.segments.lock();
                        if let Some(m) = segs.get_mut(&a.first_seq)
                            && m.first_record_us.is_none()
                        {
                            m.first_record_us = Some(first_us);
                        }
                    }
                    if let Some(a) = &mut self.active {
                        a.records += records.len() as u64;
                    }
                    waiters.push((done, self.next_seq - 1));
                }
                Request::Seal { done } => {
                    self.flush(&mut waiters, batch_records);
                    batch_records = 0;
                    let _ = done.send(self.seal());
                }
                Request::EnsureNextSeq { min, done } => {
                    self.flush(&mut waiters, batch_records);
                    batch_records = 0;
                    let _ = done.send(self.raise_next_seq(min));
                }
                Request::Shutdown { done } => {
                    self.flush(&mut waiters, batch_records);
                    batch_records = 0;
                    let _ = done.send(Ok(()));
                    stop = true;
                    break;
                }
            }
        }
        self.flush(&mut waiters, batch_records);
        self.shared.next_seq.store(self.next_seq, Ordering::Release);
        stop
    }

    /// Writes the buffered records, fsyncs once, then answers every waiter.
    fn flush(&mut self, waiters: &mut Vec<Waiter>, batch_records: usize) {
        if self.buf.is_empty() {
            self.batch_oldest = None;
            for (done, seq) in waiters.drain(..) {
                if let Some(done) = done {
                    let _ = done.send(Ok(seq));
                }
            }
            return;
        }
        let result = match &mut self.active {
            None => Err(WalError::Closed),
            Some(a) => write_and_sync(a, &self.buf),
        };
        let written = self.buf.len() as u64;
        self.buf.clear();
        match result {
            Ok(fsync_secs) => {
                let a = self
                    .active
                    .as_mut()
                    .expect("active segment after a successful write");
                a.len += written;
                {
                    let mut segs = self.shared.segments.lock();
                    if let Some(m) = segs.get_mut(&a.first_seq) {
                        m.bytes = a.len;
                        m.last_seq = Some(self.next_seq - 1);
                    }
                    self.shared.refresh_bytes(&segs);
                }
                self.shared
                    .last_durable_seq
                    .store(self.next_seq - 1, Ordering::Release);
                self.shared.next_seq.store(self.next_seq, Ordering::Release);
                self.shared
                    .records
                    .fetch_add(batch_records as u64, Ordering::Relaxed);
                self.shared.batches.fetch_add(1, Ordering::Relaxed);
                self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                *self.shared.last_error.lock() = None;
                metrics::histogram!("csms_wal_fsync_seconds").record(fsync_secs);
                // The batch's longest wait, queue to durable: the fsync plus
                // the queue ahead of it and the writer thread's own delays.
                if let Some(oldest) = self.batch_oldest.take() {
                    metrics::histogram!("csms_wal_commit_seconds")
                        .record(oldest.elapsed().as_secs_f64());
                }
                metrics::histogram!("csms_wal_batch_records").record(batch_records as f64);
                metrics::counter!("csms_wal_records_total").increment(batch_records as u64);
                for (done, seq) in waiters.drain(..) {
                    if let Some(done) = done {
                        let _ = done.send(Ok(seq));
                    }
                }
            }
            Err(e) => {
                self.batch_oldest = None;
                self.note_error(&e);
                // Cut back to the last fsynced length, then leave this segment:
                // after a failed fsync the file's page-cache state is unknown.
                if let Some(a) = &mut self.active
                    && let Err(te) = a
                        .file
                        .set_len(a.len)
                        .and_then(|_| a.file.seek(SeekFrom::Start(a.len)).map(|_| ()))
                {
                    tracing::error!(path = %a.path.display(), error = %te, "WAL could not truncate after a failed write");
                }
                if let Some(a) = &mut self.active {
                    // Records that failed are not in the segment any more.
                    a.records = a.records.saturating_sub(batch_records as u64);
                }
                self.close_active();
                for (done, _) in waiters.drain(..) {
                    if let Some(done) = done {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    fn note_error(&self, e: &WalError) {
        tracing::error!(error = %e, "WAL write failed");
        *self.shared.last_error.lock() = Some(e.to_string());
    }

    /// Creates the active segment (named by the next seq) if there is none.
    fn ensure_active(&mut self) -> Result<(), WalError> {
        if self.active.is_some() {
            return Ok(());
        }
        let first_seq = self.next_seq;
        let path = self.shared.dir.join(segment_name(first_seq));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| WalError::io("create segment", &path, &e))?;
        let init = file.write_all(MAGIC).and_then(|_| file.sync_data());
        if let Err(e) = init {
            let _ = fs::remove_file(&path);
            return Err(WalError::io("write segment header", &path, &e));
        }
        if let Err(e) = sync_dir(&self.shared.dir) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        {
            let mut segs = self.shared.segments.lock();
            segs.insert(
                first_seq,
                SegMeta {
                    path: path.clone(),
                    bytes: MAGIC_LEN,
                    first_record_us: None,
                    last_seq: None,
                    sealed: false,
                },
            );
            self.shared.refresh_bytes(&segs);
        }
        self.active = Some(Active {
            file,
            path,
            first_seq,
            len: MAGIC_LEN,
            records: 0,
        });
        Ok(())
    }

    /// Stops writing the active segment: sealed if it holds records, removed
    /// if empty. Its records were fsynced by the preceding flush.
    fn close_active(&mut self) -> Option<SegmentInfo> {
        let a = self.active.take()?;
        let mut segs = self.shared.segments.lock();
        let info = if a.records == 0 {
            if let Err(e) = fs::remove_file(&a.path) {
                tracing::warn!(path = %a.path.display(), error = %e, "could not remove empty WAL segment");
            }
            segs.remove(&a.first_seq);
            None
        } else {
            segs.get_mut(&a.first_seq).map(|m| {
                m.sealed = true;
                m.bytes = a.len;
                SegmentInfo {
                    path: a.path.clone(),
                    first_seq: a.first_seq,
                    max_seq: m.last_seq.unwrap_or(self.next_seq - 1),
                    bytes: a.len,
                }
            })
        };
        self.shared.refresh_bytes(&segs);
        info
    }

    fn seal(&mut self) -> Result<Option<SegmentInfo>, WalError> {
        match &self.active {
            Some(a) if a.records > 0 => {}
            _ => return Ok(None),
        }
        let info = self.close_active();
        // The seal itself succeeded; a failure to start the next segment is
        // retried by the next append.
        if let Err(e) = self.ensure_active() {
            self.note_error(&e);
        }
        Ok(info)
    }

    fn raise_next_seq(&mut self, min: u64) -> Result<u64, WalError> {
        if self.next_seq < min {
            tracing::info!(
                from = self.next_seq,
                to = min,
                "raising WAL seq above what the lake holds"
            );
            self.close_active();
            self.next_seq = min;
            self.shared.next_seq.store(min, Ordering::Release);
            self.shared
                .last_durable_seq
                .fetch_max(min - 1, Ordering::AcqRel);
            self.ensure_active()?;
        }
        Ok(self.next_seq)
    }
}

fn drain(rx: &mut mpsc::Receiver<Request>, reqs: &mut Vec<Request>, n: &mut usize, max: usize) {
    while *n < max {
        match rx.try_recv() {
            Ok(r) => {
                *n += r.weight();
                let control = !matches!(r, Request::Append { .. });
                reqs.push(r);
                if control {
                    break;
                }
            }
            Err(_) => break,
        }
    }
}

/// Appends `buf` and fdatasyncs; returns the fsync duration in seconds.
fn write_and_sync(a: &mut Active, buf: &[u8]) -> Result<f64, WalError> {
    a.file
        .write_all(buf)
        .map_err(|e| WalError::io("write", &a.path, &e))?;
    let started = Instant::now();
    a.file
        .sync_data()
        .map_err(|e| WalError::io("fdatasync", &a.path, &e))?;
    Ok(started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> WalRecord {
        WalRecord {
            received_at_us: 1_700_000_000_000_000 + i as i64,
            station_id: format!("CP{}", i % 7),
            version: OcppVersion::V16,
            direction: if i.is_multiple_of(2) {
                Direction::CsToCsms
            } else {
                Direction::CsmsToCs
            },
            message_type: 2,
            message_id: format!("m{i}"),
            action: Some("Heartbeat".into()),
            error_code: if i.is_multiple_of(3) {
                Some("InternalError".into())
            } else {
                None
            },
            error_description: None,
            raw: format!(r#"[2,"m{i}","Heartbeat",{{}}]"#),
        }
    }

    fn small_config() -> WalConfig {
        WalConfig {
            commit_window_us: 0,
            ..WalConfig::default()
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut buf = Vec::new();
        let r = rec(3);
        encode_record(42, &r, &mut buf);
        let scan = scan_records(&buf);
        assert!(scan.problem.is_none());
        assert_eq!(scan.records, vec![(42, r)]);
        buf[20] ^= 0xff;
        assert_eq!(scan_records(&buf).problem.as_deref(), Some("CRC mismatch"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_uses_fewer_fsyncs_than_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = WalConfig {
            commit_window_us: 20_000,
            ..WalConfig::default()
        };
        let (wal, h) = Wal::open(dir.path(), config).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.append(vec![rec(i)]).await.unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
        let stats = h.stats();
        assert_eq!(stats.records_written, 200);
        assert_eq!(stats.last_durable_seq, 200);
        assert!(
            stats.fsyncs < 200 / 4,
            "expected group commit, got {} fsyncs",
            stats.fsyncs
        );
        wal.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovers_and_continues_seq_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, h) = Wal::open(dir.path(), small_config()).unwrap();
            assert_eq!(h.append((0..5).map(rec).collect()).await.unwrap(), 5);
            h.append_nowait(vec![rec(5)]).unwrap();
            assert_eq!(h.append(vec![rec(6)]).await.unwrap(), 7);
            wal.close().await.unwrap();
            assert!(matches!(
                h.append(vec![rec(7)]).await,
                Err(WalError::Closed)
            ));
        }
        let (wal, h) = Wal::open(dir.path(), small_config()).unwrap();
        assert_eq!(h.stats().next_seq, 8);
        assert_eq!(h.stats().oldest_unflushed_us, Some(rec(0).received_at_us));
        assert_eq!(h.append(vec![rec(7)]).await.unwrap(), 8);
        h.seal().await.unwrap().unwrap();
        let mut all = Vec::new();
        for seg in h.sealed_segments() {
            all.extend(read_segment(&seg.path).unwrap());
        }
        let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
        assert_eq!(all[5].1, rec(5));
        wal.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, h) = Wal::open(dir.path(), small_config()).unwrap();
            h.append((0..3).map(rec).collect()).await.unwrap();
            wal.close().await.unwrap();
        }
        let seg = list_segments(dir.path()).unwrap().pop().unwrap();
        let good_len = fs::metadata(&seg.path).unwrap().len();
        // A crash mid-write: a record header and half a body.
        let mut torn = Vec::new();
        encode_record(4, &rec(3), &mut torn);
        torn.truncate(torn.len() / 2);
        OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        assert!(matches!(
            read_segment(&seg.path),
            Err(WalError::Corrupt { .. })
        ));

        let (wal, h) = Wal::open(dir.path(), small_config()).unwrap();
        assert_eq!(fs::metadata(&seg.path).unwrap().len(), good_len);
        assert_eq!(read_segment(&seg.path).unwrap().len(), 3);
        assert_eq!(h.append(vec![rec(3)]).await.unwrap(), 4);
        wal.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seal_rolls_and_remove_frees_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let config = WalConfig {
            segment_bytes: 600,
            disk_budget_bytes: 1000,
            ..small_config()
        };
        let (wal, h) = Wal::open(dir.path(), config).unwrap();
        for i in 0..20 {
            h.append(vec![rec(i)]).await.unwrap();
        }
        // Rolled by size: several sealed segments, none above ~one record past the limit.
        let sealed = h.sealed_segments();
        assert!(sealed.len() >= 2, "{sealed:?}");
        assert!(h.over_budget());
        let sealed_now = h.seal().await.unwrap().unwrap();
        assert_eq!(sealed_now.max_seq, 20);
        assert!(
            h.seal().await.unwrap().is_none(),
            "an empty active segment is not sealed"
        );
        let mut seqs = Vec::new();
        for seg in h.sealed_segments() {
            let recs = read_segment(&seg.path).unwrap();
            assert!(
                recs.iter()
                    .all(|(s, _)| *s >= seg.first_seq && *s <= seg.max_seq)
            );
            seqs.extend(recs.into_iter().map(|(s, _)| s));
            h.remove_segment(seg.first_seq).unwrap();
        }
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
        assert!(!h.over_budget());
        assert_eq!(h.stats().sealed_segments, 0);
        assert_eq!(h.stats().oldest_unflushed_us, None);
        // The active segment cannot be removed.
        let active = list_segments(dir.path()).unwrap();
        assert_eq!(active.len(), 1);
        assert!(matches!(
            h.remove_segment(active[0].first_seq),
            Err(WalError::NotSealed(_))
        ));
        assert_eq!(sealed_segments(dir.path()).unwrap(), vec![]);
        wal.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn next_seq_can_be_raised() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, h) = Wal::open(dir.path(), small_config()).unwrap();
        h.append(vec![rec(0)]).await.unwrap();
        assert_eq!(h.ensure_next_seq_at_least(100).await.unwrap(), 100);
        assert_eq!(h.ensure_next_seq_at_least(50).await.unwrap(), 100);
        assert_eq!(h.append(vec![rec(1)]).await.unwrap(), 100);
        wal.close().await.unwrap();
        let (wal, h) = Wal::open(dir.path(), small_config()).unwrap();
        assert_eq!(h.stats().next_seq, 101);
        wal.close().await.unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_disk_is_a_clear_error_and_not_fatal() {
        // /dev/full fails every write with ENOSPC.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let err = WalError::io(
            "write",
            Path::new("/dev/full"),
            &io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(err.to_string().contains("disk is full"), "{err}");
        let file = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut a = Active {
            file,
            path: "/dev/full".into(),
            first_seq: 1,
            len: 0,
            records: 0,
        };
        let e = write_and_sync(&mut a, &[0u8; 64 * 1024]).unwrap_err();
        assert!(matches!(e, WalError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("/dev/full"), "{e}");
    }
}
