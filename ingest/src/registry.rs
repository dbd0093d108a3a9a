//! Stations (with argon2id password hashes) and id tokens.
//!
//! Both registries live as small JSON files in the data dir so the CLI
//! (`csms stations add`) and a running `csms serve` share them without a
//! database: writers take an advisory file lock, read the current file,
//! change it and replace it atomically (temp file + fsync + rename); readers
//! notice a replaced file by its inode/mtime/size, checked at most once per
//! second or immediately when a lookup misses.
//!
//! Password verification is deliberately slow (argon2id), so successful
//! verifications are cached under a keyed hash of the password for as long
//! as the station stays connected and ten minutes after: a reconnect storm
//! of a whole fleet then costs one hash lookup per station instead of one
//! argon2 run. That cache is per process; `crate::shared_auth` shares
//! verifications between the processes of a fleet through Redis, so a
//! station that reconnects to another worker or node does not pay one
//! argon2 run there.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// File name of the station registry inside the data dir.
pub const STATIONS_FILE: &str = "stations.json";
/// File name of the id-token registry inside the data dir.
pub const ID_TOKENS_FILE: &str = "id_tokens.json";

/// Longest station identity OCPP allows (identifierString, 48 chars).
pub const MAX_STATION_ID_LEN: usize = 48;
/// Longest idToken OCPP 2.0.1 allows (1.6 allows 20).
pub const MAX_ID_TOKEN_LEN: usize = 36;
/// Longest password accepted for hashing (OCPP itself uses 16..=40).
const MAX_PASSWORD_LEN: usize = 1024;

/// How long a successful password verification is remembered.
const VERIFY_CACHE_TTL: Duration = Duration::from_secs(10 * 60);
/// How often (at most) a lookup that hits re-checks the file on disk.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of both registries.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The station id breaks the OCPP identifierString rules.
    #[error("invalid station id {id:?}: {reason}")]
    InvalidStationId {
        /// The rejected id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The id token is empty, too long or has control characters.
    #[error("invalid id token {id:?}: {reason}")]
    InvalidIdToken {
        /// The rejected token.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The password is empty or absurdly long.
    #[error("invalid password: {0}")]
    InvalidPassword(&'static str),
    /// Reading, writing or locking a registry file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A registry file is not valid JSON of the expected shape.
    #[error("{}: not a valid registry file: {source}", path.display())]
    Parse {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// argon2 refused to hash (should not happen with default parameters).
    #[error("hashing the password failed: {0}")]
    Hash(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Check a station id against OCPP 2.0.1's identifierString: 1 to 48 of
/// `a-z A-Z 0-9 * - _ = : + | @ .`. The id appears in URLs, file names of
/// exports and log lines, so anything else is refused up front.
pub fn validate_station_id(id: &str) -> Result<(), RegistryError> {
    let bad = |reason: String| RegistryError::InvalidStationId {
        id: id.to_string(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if let Some((pos, c)) = id
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "*-_=:+|@.".contains(c)))
    {
        return Err(bad(format!(
            "character {c:?} at position {} is not allowed (allowed: a-z A-Z 0-9 * - _ = : + | @ .)",
            pos + 1
        )));
    }
    if id.len() > MAX_STATION_ID_LEN {
        return Err(bad(format!(
            "{} characters, at most {MAX_STATION_ID_LEN} allowed",
            id.len()
        )));
    }
    Ok(())
}

/// Check an idToken value: 1 to 36 printable ASCII characters.
pub fn validate_id_token(id: &str) -> Result<(), RegistryError> {
    let bad = |reason: String| RegistryError::InvalidIdToken {
        id: id.to_string(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if let Some((pos, c)) = id.chars().enumerate().find(|&(_, c)| !c.is_ascii_graphic()) {
        return Err(bad(format!(
            "character {c:?} at position {} is not allowed (printable ASCII only)",
            pos + 1
        )));
    }
    if id.len() > MAX_ID_TOKEN_LEN {
        return Err(bad(format!(
            "{} characters, at most {MAX_ID_TOKEN_LEN} allowed",
            id.len()
        )));
    }
    Ok(())
}

/// Hash a password to an argon2id PHC string (`$argon2id$v=19$...`) with a
/// fresh random salt. CPU- and memory-heavy: call from a blocking context.
pub fn hash_password(password: &str) -> Result<String, RegistryError> {
    if password.is_empty() {
        return Err(RegistryError::InvalidPassword("must not be empty"));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(RegistryError::InvalidPassword("longer than 1024 bytes"));
    }
    let mut permit = hash_permits().acquire();
    hash_argon2(&mut permit.memory, password.as_bytes())
        .map_err(|e| RegistryError::Hash(e.to_string()))
}

/// An argon2id PHC string of `password` with the default parameters and a
/// fresh 16-byte salt, computed in `memory` (see [`HashPermits`]).
fn hash_argon2(
    memory: &mut Vec<argon2::Block>,
    password: &[u8],
) -> Result<String, password_hash::Error> {
    let argon = Argon2::default();
    let params = argon.params().clone();
    let salt: [u8; 16] = rand::random();
    memory.clear();
    memory.resize(params.block_count(), argon2::Block::default());
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    argon.hash_password_into_with_memory(password, &salt, &mut out, memory.as_mut_slice())?;
    let phc = argon2::PasswordHash {
        algorithm: argon2::Algorithm::default().ident(),
        version: Some(argon2::Version::default().into()),
        params: password_hash::phc::ParamsString::try_from(&params)?,
        salt: Some(password_hash::phc::Salt::new(&salt)?),
        hash: Some(password_hash::phc::Output::new(&out)?),
    };
    Ok(phc.to_string())
}

// ---------------------------------------------------------------------------
// Bounding concurrent argon2 runs
// ---------------------------------------------------------------------------

/// A counting semaphore for blocking code, one permit per core, each with
/// the argon2 working memory (~19 MiB) that its runs reuse.
///
/// Bounded because a storm of verifications on `spawn_blocking` threads (up
/// to 512 of them) would otherwise hold gigabytes while gaining no
/// throughput over one run per core. Reused because an argon2 run that
/// allocates its own 19 MiB and frees it leaves glibc holding it: past the
/// first free, glibc's dynamic mmap threshold rises above that size and
/// later blocks come from, and stay in, its heaps. Measured: 100 stations
/// authenticating took a node from 116 MB to 1.95 GB RSS, never returned.
struct HashPermits {
    /// Permits left, and the working memories of permits not in use.
    free: Mutex<(usize, Vec<Vec<argon2::Block>>)>,
    cv: Condvar,
}

struct HashPermit<'a> {
    permits: &'a HashPermits,
    memory: Vec<argon2::Block>,
}

impl HashPermits {
    fn acquire(&self) -> HashPermit<'_> {
        let mut free = self.free.lock();
        while free.0 == 0 {
            self.cv.wait(&mut free);
        }
        free.0 -= 1;
        let memory = free.1.pop().unwrap_or_default();
        HashPermit {
            permits: self,
            memory,
        }
    }
}

impl Drop for HashPermit<'_> {
    fn drop(&mut self) {
        let mut free = self.permits.free.lock();
        free.0 += 1;
        free.1.push(std::mem::take(&mut self.memory));
        drop(free);
        self.permits.cv.notify_one();
    }
}

/// How many argon2 runs go at once: one per core.
pub fn hash_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

fn hash_permits() -> &'static HashPermits {
    static PERMITS: std::sync::OnceLock<HashPermits> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| HashPermits {
        free: Mutex::new((hash_parallelism(), Vec::new())),
        cv: Condvar::new(),
    })
}

/// Checks `password` against an argon2 PHC string in `memory` (resized and
/// zeroed as the hash's parameters need): what
/// `Argon2::verify_password` does, minus its allocation per run. The
/// comparison of the outputs is constant-time (`Output`'s equality).
fn verify_argon2(
    memory: &mut Vec<argon2::Block>,
    password: &[u8],
    phc: &str,
) -> Result<(), password_hash::Error> {
    let hash = argon2::PasswordHash::new(phc)?;
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return Err(password_hash::Error::PasswordInvalid);
    };
    let params = argon2::Params::try_from(&hash)?;
    let algorithm = argon2::Algorithm::try_from(hash.algorithm.as_str())?;
    let version = hash
        .version
        .map(argon2::Version::try_from)
        .transpose()?
        .unwrap_or_default();
    memory.clear();
    memory.resize(params.block_count(), argon2::Block::default());
    let mut out = [0u8; 64];
    let out = out
        .get_mut(..expected.len())
        .ok_or(password_hash::Error::OutputSize)?;
    Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password,
        salt,
        out,
        memory.as_mut_slice(),
    )?;
    if password_hash::phc::Output::new(out)? == *expected {
        Ok(())
    } else {
        Err(password_hash::Error::PasswordInvalid)
    }
}

// ---------------------------------------------------------------------------
// The shared JSON-file store
// ---------------------------------------------------------------------------

/// Identity of one version of a file: an atomic rename always yields a new
/// inode, and mtime/size catch in-place edits by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

fn stamp_of(path: &Path) -> Option<FileStamp> {
    fs::metadata(path).ok().map(|m| FileStamp::of(&m))
}

/// Read the file and its stamp from the same open handle, so the stamp
/// describes exactly the bytes read. `None` when the file does not exist.
fn read_raw(path: &Path) -> Result<Option<(Vec<u8>, FileStamp)>, RegistryError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let stamp = FileStamp::of(&file.metadata().map_err(io_err(path))?);
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(Some((bytes, stamp)))
}

fn decode<T: Default + DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, RegistryError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|source| RegistryError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Replace `path` with `bytes` so readers see the old or the new file, never
/// a torn one, and the new one survives a crash once this returns.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = write_and_rename(&tmp, path, dir, bytes);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_and_rename(
    tmp: &Path,
    path: &Path,
    dir: &Path,
    bytes: &[u8],
) -> Result<(), RegistryError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err(tmp))?;
    f.write_all(bytes).map_err(io_err(tmp))?;
    f.sync_all().map_err(io_err(tmp))?;
    fs::rename(tmp, path).map_err(io_err(path))?;
    // Make the rename itself durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

struct Snapshot<T> {
    data: Arc<T>,
    stamp: Option<FileStamp>,
}

/// One JSON document on disk, cached in memory and reloaded on change.
struct JsonFile<T> {
    path: PathBuf,
    lock_path: PathBuf,
    state: RwLock<Snapshot<T>>,
    last_check: Mutex<Instant>,
    check_interval: Duration,
    /// Serializes writers of this process (the file lock serializes
    /// processes).
    write_mutex: Mutex<()>,
}

impl<T> JsonFile<T>
where
    T: Default + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn open(data_dir: &Path, file_name: &str) -> Result<Self, RegistryError> {
        fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
        let path = data_dir.join(file_name);
        let lock_path = data_dir.join(format!(".{file_name}.lock"));
        let (data, stamp) = match read_raw(&path)? {
            Some((bytes, stamp)) => (decode(&path, &bytes)?, Some(stamp)),
            None => (T::default(), None),
        };
        Ok(Self {
            path,
            lock_path,
            state: RwLock::new(Snapshot {
                data: Arc::new(data),
                stamp,
            }),
            last_check: Mutex::new(Instant::now()),
            check_interval: RELOAD_CHECK_INTERVAL,
            write_mutex: Mutex::new(()),
        })
    }

    /// The current document. With `force`, the file is checked now;
    /// otherwise at most once per `check_interval`.
    fn current(&self, force: bool) -> Arc<T> {
        self.refresh(force);
        self.state.read().data.clone()
    }

    fn refresh(&self, force: bool) {
        {
            // Non-forced checks skip when another thread is checking anyway.
            let mut last = if force {
                self.last_check.lock()
            } else {
                match self.last_check.try_lock() {
                    Some(guard) => guard,
                    None => return,
                }
            };
            let now = Instant::now();
            if !force && now.saturating_duration_since(*last) < self.check_interval {
                return;
            }
            *last = now;
        }
        let on_disk = stamp_of(&self.path);
        if self.state.read().stamp == on_disk {
            return;
        }
        match read_raw(&self.path) {
            Ok(None) => {
                let mut st = self.state.write();
                if st.stamp.is_some() {
                    tracing::warn!(path = %self.path.display(), "registry file disappeared; now empty");
                }
                *st = Snapshot {
                    data: Arc::new(T::default()),
                    stamp: None,
                };
            }
            Ok(Some((bytes, stamp))) => match decode::<T>(&self.path, &bytes) {
                Ok(data) => {
                    tracing::info!(path = %self.path.display(), "registry reloaded");
                    *self.state.write() = Snapshot {
                        data: Arc::new(data),
                        stamp: Some(stamp),
                    };
                }
                Err(e) => {
                    // Keep serving the last good version; remember the bad
                    // stamp so the warning is logged once per bad version.
                    tracing::warn!(error = %e, "registry file unreadable; keeping previous contents");
                    self.state.write().stamp = Some(stamp);
                }
            },
            Err(e) => tracing::warn!(error = %e, "registry reload failed"),
        }
    }

    /// Read-modify-write under the file lock. `f` returns its result and
    /// whether it changed the document (unchanged documents are not
    /// rewritten).
    fn update<R>(
        &self,
        f: impl FnOnce(&mut T) -> Result<(R, bool), RegistryError>,
    ) -> Result<R, RegistryError> {
        let _in_process = self.write_mutex.lock();
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.lock_path)
            .map_err(io_err(&self.lock_path))?;
        lock_file.lock().map_err(io_err(&self.lock_path))?;
        // Start from the file, not the cache: another process may have
        // written since we last looked. A corrupt file is an error here
        // rather than silently overwritten.
        let (mut data, stamp) = match read_raw(&self.path)? {
            Some((bytes, stamp)) => (decode::<T>(&self.path, &bytes)?, Some(stamp)),
            None => (T::default(), None),
        };
        let (result, changed) = f(&mut data)?;
        let stamp = if changed {
            let mut bytes =
                serde_json::to_vec_pretty(&data).map_err(|source| RegistryError::Parse {
                    path: self.path.clone(),
                    source,
                })?;
            bytes.push(b'\n');
            write_atomic(&self.path, &bytes)?;
            stamp_of(&self.path)
        } else {
            stamp
        };
        *self.state.write() = Snapshot {
            data: Arc::new(data),
            stamp,
        };
        drop(lock_file); // closing the descriptor releases the lock
        Ok(result)
    }
}

// ---------------------------------------------------------------------------
// Stations
// ---------------------------------------------------------------------------

/// A registered charging station.
#[derive(Clone, PartialEq, Serialize)]
pub struct StationRecord {
    /// The station identity (the last path segment of its WebSocket URL).
    pub id: String,
    /// argon2id PHC string of its Basic-auth password; `None` when the
    /// station authenticates by client certificate only. Never serialized.
    #[serde(skip_serializing)]
    pub password_hash: Option<String>,
    /// When it was first registered.
    pub created_at: DateTime<Utc>,
    /// OCPP versions (e.g. `"ocpp1.6"`) it may use; `None` means all.
    pub allowed_versions: Option<Vec<String>>,
}

impl StationRecord {
    /// Whether a Basic-auth password is set.
    pub fn has_password(&self) -> bool {
        self.password_hash.is_some()
    }
}

impl fmt::Debug for StationRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StationRecord")
            .field("id", &self.id)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<redacted>"),
            )
            .field("created_at", &self.created_at)
            .field("allowed_versions", &self.allowed_versions)
            .finish()
    }
}

impl fmt::Display for StationRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  password={}  created={}  versions={}",
            self.id,
            if self.has_password() { "set" } else { "none" },
            self.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.allowed_versions
                .as_ref()
                .map_or_else(|| "all".to_string(), |v| v.join(",")),
        )
    }
}

/// The outcome of a password check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthDecision {
    /// The station exists and the password matches.
    Accepted,
    /// No such station.
    UnknownStation,
    /// The station exists but the password does not match.
    BadPassword,
    /// The station exists without a password: allowed only with mTLS.
    NoPasswordSet,
}

/// What [`StationRegistry::lookup`] could tell without argon2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Settled by the registry or this process's cache.
    Decided(AuthDecision),
    /// The station has a password hash and no cached verification matches:
    /// the password must be checked against `phc`.
    Uncached {
        /// The stored PHC string (argon2id hash with its salt).
        phc: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredStation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password_hash: Option<String>,
    created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allowed_versions: Option<Vec<String>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StationsDoc {
    #[serde(default)]
    stations: BTreeMap<String, StoredStation>,
}

impl StationsDoc {
    fn record(&self, id: &str) -> Option<StationRecord> {
        self.stations.get(id).map(|s| StationRecord {
            id: id.to_string(),
            password_hash: s.password_hash.clone(),
            created_at: s.created_at,
            allowed_versions: s.allowed_versions.clone(),
        })
    }
}

/// A remembered successful verification.
struct CachedOk {
    /// Keyed hash of (station id, password); never the password itself.
    tag: u128,
    /// The PHC string it was verified against: a changed hash invalidates.
    phc: String,
    at: Instant,
}

/// Per-process secret keys for the verification cache tags.
struct TagKeys {
    hasher: RandomState,
    secret: [u8; 32],
}

impl TagKeys {
    fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            secret: rand::random(),
        }
    }

    fn tag(&self, id: &str, password: &str) -> u128 {
        let hi = self.hasher.hash_one((&self.secret, 0u8, id, password));
        let lo = self.hasher.hash_one((&self.secret, 1u8, id, password));
        (u128::from(hi) << 64) | u128::from(lo)
    }
}

struct StationInner {
    file: JsonFile<StationsDoc>,
    cache: DashMap<String, CachedOk>,
    keys: TagKeys,
    cache_ttl: Duration,
}

/// The station registry: a cheap-to-clone handle.
#[derive(Clone)]
pub struct StationRegistry {
    inner: Arc<StationInner>,
}

impl fmt::Debug for StationRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StationRegistry")
            .field("path", &self.inner.file.path)
            .finish_non_exhaustive()
    }
}

impl StationRegistry {
    /// Open (or start empty) `data_dir/stations.json`, creating the dir.
    pub fn open(data_dir: &Path) -> Result<Self, RegistryError> {
        Ok(Self {
            inner: Arc::new(StationInner {
                file: JsonFile::open(data_dir, STATIONS_FILE)?,
                cache: DashMap::new(),
                keys: TagKeys::new(),
                cache_ttl: VERIFY_CACHE_TTL,
            }),
        })
    }

    /// The registry file's path.
    pub fn path(&self) -> &Path {
        &self.inner.file.path
    }

    /// Register `id`, or replace its password if it exists (`None` removes
    /// the password: mTLS only). Hashes with argon2: blocking.
    pub fn add(&self, id: &str, password: Option<&str>) -> Result<(), RegistryError> {
        self.add_many(&[(id.to_string(), password.map(str::to_string))], |_| {})
            .map(|_| ())
    }

    /// Register many stations at once (a fleet's onboarding): the passwords
    /// are hashed on every core, then the file is written once, where `add`
    /// per station would rewrite the whole file each time. `hashed` is
    /// called after each hash with the count so far (progress). Returns the
    /// number of stations that were new. Nothing is written when an id or a
    /// password is invalid.
    pub fn add_many(
        &self,
        stations: &[(String, Option<String>)],
        hashed: impl Fn(usize) + Sync,
    ) -> Result<usize, RegistryError> {
        for (id, _) in stations {
            validate_station_id(id)?;
        }
        let chunk = stations.len().div_ceil(hash_parallelism()).max(1);
        let done = std::sync::atomic::AtomicUsize::new(0);
        let hashes: Vec<Option<String>> = std::thread::scope(|scope| {
            let workers: Vec<_> = stations
                .chunks(chunk)
                .map(|part| {
                    let (done, hashed) = (&done, &hashed);
                    scope.spawn(move || {
                        part.iter()
                            .map(|(_, pw)| {
                                let h = pw.as_deref().map(hash_password).transpose();
                                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                hashed(n + 1);
                                h
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("hashing thread panicked"))
                .collect::<Result<Vec<Vec<_>>, _>>()
                .map(|v| v.into_iter().flatten().collect())
        })?;
        // Hashed before taking the file lock: tens of milliseconds each.
        let added = self.inner.file.update(|doc| {
            let now = Utc::now();
            let mut added = 0;
            for ((id, _), hash) in stations.iter().zip(hashes) {
                match doc.stations.get_mut(id) {
                    Some(s) => s.password_hash = hash,
                    None => {
                        added += 1;
                        doc.stations.insert(
                            id.clone(),
                            StoredStation {
                                password_hash: hash,
                                created_at: now,
                                allowed_versions: None,
                            },
                        );
                    }
                }
            }
            Ok((added, true))
        })?;
        for (id, _) in stations {
            self.inner.cache.remove(id);
        }
        Ok(added)
    }

    /// Restrict the OCPP versions `id` may use (`None`: all). Returns false
    /// when the station does not exist.
    pub fn set_allowed_versions(
        &self,
        id: &str,
        versions: Option<Vec<String>>,
    ) -> Result<bool, RegistryError> {
        self.inner
            .file
            .update(|doc| match doc.stations.get_mut(id) {
                Some(s) => {
                    s.allowed_versions = versions;
                    Ok((true, true))
                }
                None => Ok((false, false)),
            })
    }

    /// Remove `id`; false when it was not registered.
    pub fn remove(&self, id: &str) -> Result<bool, RegistryError> {
        let removed = self.inner.file.update(|doc| {
            let removed = doc.stations.remove(id).is_some();
            Ok((removed, removed))
        })?;
        self.inner.cache.remove(id);
        Ok(removed)
    }

    /// All stations, sorted by id.
    pub fn list(&self) -> Vec<StationRecord> {
        let doc = self.inner.file.current(false);
        doc.stations
            .keys()
            .filter_map(|id| doc.record(id))
            .collect()
    }

    /// Number of registered stations.
    pub fn len(&self) -> usize {
        self.inner.file.current(false).stations.len()
    }

    /// Whether no station is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One station. A miss re-checks the file at once, so a station added by
    /// another process is found on its first connection attempt.
    pub fn get(&self, id: &str) -> Option<StationRecord> {
        let doc = self.inner.file.current(false);
        if let Some(r) = doc.record(id) {
            return Some(r);
        }
        self.inner.file.current(true).record(id)
    }

    /// Check `password` for station `id`. Blocking (argon2, tens of ms on a
    /// cache miss): call from `tokio::task::spawn_blocking`.
    pub fn verify(&self, id: &str, password: &str) -> AuthDecision {
        match self.lookup(id, password) {
            Lookup::Decided(decision) => decision,
            Lookup::Uncached { phc } => self.verify_hash(id, password, phc),
        }
    }

    /// The cheap part of [`Self::verify`]: the registry and this process's
    /// cache of verifications, no argon2. Lets a caller try a cache shared
    /// with other processes (see `crate::shared_auth`) before paying for
    /// [`Self::verify_hash`].
    pub fn lookup(&self, id: &str, password: &str) -> Lookup {
        let Some(rec) = self.get(id) else {
            return Lookup::Decided(AuthDecision::UnknownStation);
        };
        let Some(phc) = rec.password_hash else {
            return Lookup::Decided(AuthDecision::NoPasswordSet);
        };
        let tag = self.inner.keys.tag(id, password);
        let now = Instant::now();
        if let Some(hit) = self.inner.cache.get(id)
            && hit.tag == tag
            && hit.phc == phc
            && now.saturating_duration_since(hit.at) < self.inner.cache_ttl
        {
            return Lookup::Decided(AuthDecision::Accepted);
        }
        Lookup::Uncached { phc }
    }

    /// Checks `password` against the stored hash `phc` (from
    /// [`Self::lookup`]) with argon2 and caches a success. Blocking.
    pub fn verify_hash(&self, id: &str, password: &str, phc: String) -> AuthDecision {
        let outcome = {
            let mut permit = hash_permits().acquire();
            verify_argon2(&mut permit.memory, password.as_bytes(), &phc)
        };
        match outcome {
            Ok(()) => {
                self.remember_verified(id, password, phc);
                AuthDecision::Accepted
            }
            Err(password_hash::Error::PasswordInvalid) => AuthDecision::BadPassword,
            Err(e) => {
                tracing::warn!(station = id, error = %e, "stored password hash is unusable");
                AuthDecision::BadPassword
            }
        }
    }

    /// Caches a successful verification of `password` against `phc`, made
    /// here by argon2 or by another process (found in a shared cache), so
    /// that the next connection of this station is a [`Self::lookup`] hit.
    pub fn remember_verified(&self, id: &str, password: &str, phc: String) {
        self.inner.cache.insert(
            id.to_string(),
            CachedOk {
                tag: self.inner.keys.tag(id, password),
                phc,
                at: Instant::now(),
            },
        );
    }

    /// Keeps the verification of a station that is still connected fresh.
    /// Called for every connected station now and then, it makes a
    /// verification last as long as the connection plus the cache's TTL:
    /// a fleet that reconnects all at once (a power cut, a network outage)
    /// is then let back in by cache hits, not one argon2 run per station,
    /// however long its stations had been connected.
    pub fn refresh_verified(&self, id: &str) {
        if let Some(mut hit) = self.inner.cache.get_mut(id) {
            hit.at = Instant::now();
        }
    }

    /// Drop expired verification-cache entries (call now and then).
    pub fn prune_cache(&self) {
        let now = Instant::now();
        let ttl = self.inner.cache_ttl;
        self.inner
            .cache
            .retain(|_, e| now.saturating_duration_since(e.at) < ttl);
    }
}

// ---------------------------------------------------------------------------
// Id tokens
// ---------------------------------------------------------------------------

/// Authorization status of an id token (the union of OCPP 1.6 and 2.0.1's
/// values that a registry can produce).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IdTokenStatus {
    /// May charge.
    Accepted,
    /// Known but blocked.
    Blocked,
    /// Known but past its expiry.
    Expired,
    /// Known but not valid.
    Invalid,
    /// Not known (2.0.1 only; 1.6 answers `Invalid`).
    Unknown,
}

impl IdTokenStatus {
    /// The name as spelled in both OCPP versions' enums.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "Accepted",
            Self::Blocked => "Blocked",
            Self::Expired => "Expired",
            Self::Invalid => "Invalid",
            Self::Unknown => "Unknown",
        }
    }

    /// The OCPP 1.6 `AuthorizationStatus` (which has no `Unknown`).
    pub fn ocpp16(self) -> &'static str {
        match self {
            Self::Unknown => "Invalid",
            other => other.as_str(),
        }
    }

    /// The OCPP 2.0.1 / 2.1 `AuthorizationStatusEnumType`.
    pub fn ocpp201(self) -> &'static str {
        self.as_str()
    }
}

impl fmt::Display for IdTokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdTokenStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "accepted" => Self::Accepted,
            "blocked" => Self::Blocked,
            "expired" => Self::Expired,
            "invalid" => Self::Invalid,
            "unknown" => Self::Unknown,
            _ => {
                return Err(format!(
                    "unknown id token status {s:?} (Accepted, Blocked, Expired, Invalid, Unknown)"
                ));
            }
        })
    }
}

/// A registered id token (RFID card, app account, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdTokenRecord {
    /// The token value as registered (lookups ignore ASCII case, as OCPP
    /// defines idTokens case-insensitive).
    pub id_token: String,
    /// Stored status.
    pub status: IdTokenStatus,
    /// After this instant an `Accepted` token answers `Expired`.
    #[serde(default)]
    pub expiry: Option<DateTime<Utc>>,
    /// Group (1.6 parentIdTag, 2.0.1 groupIdToken).
    #[serde(default)]
    pub group_id: Option<String>,
}

/// What to answer for tokens that are not registered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DefaultPolicy {
    /// Unknown tokens may charge (config `"accept"`).
    #[default]
    #[serde(rename = "accept")]
    AcceptAll,
    /// Unknown tokens are refused (config `"reject"`).
    #[serde(rename = "reject")]
    RejectUnknown,
}

impl FromStr for DefaultPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "accept" => Ok(Self::AcceptAll),
            "reject" => Ok(Self::RejectUnknown),
            _ => Err(format!(
                "unknown id token policy {s:?} (expected \"accept\" or \"reject\")"
            )),
        }
    }
}

/// The authorization answer for one token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdTokenDecision {
    /// `Unknown` for unregistered tokens under [`DefaultPolicy::RejectUnknown`];
    /// map with [`IdTokenStatus::ocpp16`] / [`IdTokenStatus::ocpp201`].
    pub status: IdTokenStatus,
    /// The token's expiry, to pass on as `expiryDate` / `cacheExpiryDateTime`.
    pub expiry: Option<DateTime<Utc>>,
    /// The token's group, to pass on as `parentIdTag` / `groupIdToken`.
    pub group_id: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IdTokensDoc {
    /// Keyed by the ASCII-uppercased token.
    #[serde(default)]
    id_tokens: BTreeMap<String, IdTokenRecord>,
}

fn token_key(id: &str) -> String {
    id.to_ascii_uppercase()
}

struct IdTokenInner {
    file: JsonFile<IdTokensDoc>,
    default_policy: DefaultPolicy,
}

/// The id-token registry: a cheap-to-clone handle.
#[derive(Clone)]
pub struct IdTokenRegistry {
    inner: Arc<IdTokenInner>,
}

impl fmt::Debug for IdTokenRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdTokenRegistry")
            .field("path", &self.inner.file.path)
            .field("default_policy", &self.inner.default_policy)
            .finish_non_exhaustive()
    }
}

impl IdTokenRegistry {
    /// Open (or start empty) `data_dir/id_tokens.json`, creating the dir.
    pub fn open(data_dir: &Path, default_policy: DefaultPolicy) -> Result<Self, RegistryError> {
        Ok(Self {
            inner: Arc::new(IdTokenInner {
                file: JsonFile::open(data_dir, ID_TOKENS_FILE)?,
                default_policy,
            }),
        })
    }

    /// The policy for unregistered tokens.
    pub fn default_policy(&self) -> DefaultPolicy {
        self.inner.default_policy
    }

    /// Register or replace a token.
    pub fn add(&self, rec: IdTokenRecord) -> Result<(), RegistryError> {
        validate_id_token(&rec.id_token)?;
        if let Some(g) = &rec.group_id {
            validate_id_token(g)?;
        }
        self.inner.file.update(|doc| {
            doc.id_tokens.insert(token_key(&rec.id_token), rec);
            Ok(((), true))
        })
    }

    /// Remove a token; false when it was not registered.
    pub fn remove(&self, id: &str) -> Result<bool, RegistryError> {
        self.inner.file.update(|doc| {
            let removed = doc.id_tokens.remove(&token_key(id)).is_some();
            Ok((removed, removed))
        })
    }

    /// All tokens, sorted by (uppercased) token.
    pub fn list(&self) -> Vec<IdTokenRecord> {
        self.inner
            .file
            .current(false)
            .id_tokens
            .values()
            .cloned()
            .collect()
    }

    /// One token (case-insensitive); a miss re-checks the file at once.
    pub fn get(&self, id_token: &str) -> Option<IdTokenRecord> {
        let key = token_key(id_token);
        if let Some(r) = self.inner.file.current(false).id_tokens.get(&key) {
            return Some(r.clone());
        }
        self.inner.file.current(true).id_tokens.get(&key).cloned()
    }

    /// The authorization decision for a token at `now`: the stored status,
    /// except that an `Accepted` token past its expiry is `Expired`;
    /// unregistered tokens follow the default policy (`Accepted`, or
    /// `Unknown` which 1.6 callers map to `Invalid`).
    pub fn authorize(&self, id_token: &str, now: DateTime<Utc>) -> IdTokenDecision {
        match self.get(id_token) {
            Some(rec) => {
                let status = match rec.status {
                    IdTokenStatus::Accepted if rec.expiry.is_some_and(|e| e < now) => {
                        IdTokenStatus::Expired
                    }
                    s => s,
                };
                IdTokenDecision {
                    status,
                    expiry: rec.expiry,
                    group_id: rec.group_id,
                }
            }
            None => IdTokenDecision {
                status: match self.inner.default_policy {
                    DefaultPolicy::AcceptAll => IdTokenStatus::Accepted,
                    DefaultPolicy::RejectUnknown => IdTokenStatus::Unknown,
                },
                expiry: None,
                group_id: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn station_id_rules() {
        for ok in ["CP-1", "a", "Z9*-_=:+|@.", &"x".repeat(48)] {
            validate_station_id(ok).unwrap();
        }
        let e = validate_station_id("CP 1").unwrap_err().to_string();
        assert!(e.contains("' '") && e.contains("position 3"), "{e}");
        let e = validate_station_id("CP/1").unwrap_err().to_string();
        assert!(e.contains("'/'"), "{e}");
        assert!(validate_station_id("").is_err());
        assert!(validate_station_id(&"x".repeat(49)).is_err());
        assert!(validate_station_id("stätion").is_err());
    }

    #[test]
    fn id_token_rules() {
        validate_id_token("04A1B2C3D4E5F6").unwrap();
        assert!(validate_id_token("").is_err());
        assert!(validate_id_token("with space").is_err());
        assert!(validate_id_token(&"1".repeat(37)).is_err());
    }

    #[test]
    fn add_verify_persist_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let reg = StationRegistry::open(dir.path()).unwrap();
        assert!(reg.is_empty());
        reg.add("CP-1", Some("correct horse")).unwrap();
        reg.add("CP-2", None).unwrap();
        assert!(reg.add("bad id", Some("x")).is_err());

        let rec = reg.get("CP-1").unwrap();
        let hash = rec.password_hash.clone().unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let shown = format!("{rec} {rec:?}");
        assert!(!shown.contains("argon2"), "hash leaked: {shown}");
        let json = serde_json::to_string(&rec).unwrap();
        assert!(!json.contains("argon2"), "hash leaked: {json}");

        assert_eq!(reg.verify("CP-1", "correct horse"), AuthDecision::Accepted);
        assert_eq!(reg.verify("CP-1", "wrong"), AuthDecision::BadPassword);
        assert_eq!(reg.verify("CP-9", "x"), AuthDecision::UnknownStation);
        assert_eq!(reg.verify("CP-2", "x"), AuthDecision::NoPasswordSet);

        // The file holds the hash, never the password.
        let text = fs::read_to_string(dir.path().join(STATIONS_FILE)).unwrap();
        assert!(text.contains("$argon2id$") && !text.contains("correct horse"));

        drop(reg);
        let reg = StationRegistry::open(dir.path()).unwrap();
        let ids: Vec<_> = reg.list().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["CP-1", "CP-2"]);
        assert_eq!(reg.verify("CP-1", "correct horse"), AuthDecision::Accepted);
        assert!(reg.remove("CP-2").unwrap());
        assert!(!reg.remove("CP-2").unwrap());
        assert!(reg.get("CP-2").is_none());
    }

    #[test]
    fn replacing_password_keeps_created_at_and_invalidates_cache() {
        let dir = tempfile::tempdir().unwrap();
        let reg = StationRegistry::open(dir.path()).unwrap();
        reg.add("CP-1", Some("first-password")).unwrap();
        let created = reg.get("CP-1").unwrap().created_at;
        assert_eq!(reg.verify("CP-1", "first-password"), AuthDecision::Accepted);
        // Another process changes the password: the cached success must not
        // survive the hash change.
        let other = StationRegistry::open(dir.path()).unwrap();
        other.add("CP-1", Some("second-password")).unwrap();
        reg.inner.file.refresh(true);
        assert_eq!(
            reg.verify("CP-1", "first-password"),
            AuthDecision::BadPassword
        );
        assert_eq!(
            reg.verify("CP-1", "second-password"),
            AuthDecision::Accepted
        );
        assert_eq!(reg.get("CP-1").unwrap().created_at, created);
    }

    #[test]
    fn cached_verification_skips_argon2_until_expiry_or_hash_change() {
        let dir = tempfile::tempdir().unwrap();
        let reg = StationRegistry::open(dir.path()).unwrap();
        reg.add("CP-1", Some("pw-pw-pw-pw")).unwrap();
        assert_eq!(reg.verify("CP-1", "pw-pw-pw-pw"), AuthDecision::Accepted);
        {
            let entry = reg.inner.cache.get("CP-1").unwrap();
            assert_eq!(entry.tag, reg.inner.keys.tag("CP-1", "pw-pw-pw-pw"));
            assert_ne!(entry.tag, reg.inner.keys.tag("CP-1", "other"));
            assert_ne!(entry.tag, reg.inner.keys.tag("CP-2", "pw-pw-pw-pw"));
        }
        // Re-key the entry to a wrong password: only a cache hit (no argon2)
        // can accept it, which proves the hit path is taken.
        let forged = reg.inner.keys.tag("CP-1", "forged");
        reg.inner.cache.get_mut("CP-1").unwrap().tag = forged;
        assert_eq!(reg.verify("CP-1", "forged"), AuthDecision::Accepted);
        // A different PHC string (password changed) bypasses the entry.
        reg.inner.cache.get_mut("CP-1").unwrap().phc = "$argon2id$stale".into();
        assert_eq!(reg.verify("CP-1", "forged"), AuthDecision::BadPassword);
        // So does an expired entry.
        reg.inner.cache.get_mut("CP-1").unwrap().phc =
            reg.get("CP-1").unwrap().password_hash.unwrap();
        reg.inner.cache.get_mut("CP-1").unwrap().at =
            Instant::now() - VERIFY_CACHE_TTL - Duration::from_secs(1);
        assert_eq!(reg.verify("CP-1", "forged"), AuthDecision::BadPassword);
        // Refreshed (the station is still connected): valid again.
        reg.refresh_verified("CP-1");
        assert_eq!(reg.verify("CP-1", "forged"), AuthDecision::Accepted);
        reg.inner.cache.get_mut("CP-1").unwrap().at =
            Instant::now() - VERIFY_CACHE_TTL - Duration::from_secs(1);
        reg.refresh_verified("CP-9");
        reg.prune_cache();
        assert!(reg.inner.cache.is_empty());
    }

    #[test]
    fn argon2_in_reused_memory_matches_the_library() {
        use argon2::{PasswordHasher, PasswordVerifier};
        let mut memory = Vec::new();
        // Ours verified by the library, the library's (other parameters,
        // other variant) by ours; wrong passwords refused both ways.
        let ours = hash_argon2(&mut memory, b"pw-pw-pw-pw").unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        let lib = Argon2::default();
        assert!(lib.verify_password(b"pw-pw-pw-pw", ours.as_str()).is_ok());
        assert!(lib.verify_password(b"other", ours.as_str()).is_err());
        let small = argon2::Params::new(1024, 3, 2, Some(24)).unwrap();
        let theirs = Argon2::new(argon2::Algorithm::Argon2i, argon2::Version::V0x10, small)
            .hash_password(b"hunter42-hunter42")
            .unwrap()
            .to_string();
        assert!(verify_argon2(&mut memory, b"hunter42-hunter42", &theirs).is_ok());
        assert_eq!(
            verify_argon2(&mut memory, b"hunter43-hunter42", &theirs),
            Err(password_hash::Error::PasswordInvalid)
        );
        assert!(verify_argon2(&mut memory, b"pw-pw-pw-pw", &ours).is_ok());
        assert!(verify_argon2(&mut memory, b"pw", "$argon2id$not-a-hash").is_err());
        // The working memory is kept for the next run, not reallocated.
        assert_eq!(memory.len(), 19_456);
        let before = memory.as_ptr();
        verify_argon2(&mut memory, b"pw-pw-pw-pw", &ours).unwrap();
        assert_eq!(memory.as_ptr(), before);
    }

    #[test]
    fn add_many_hashes_all_and_writes_once() {
        let dir = tempfile::tempdir().unwrap();
        let reg = StationRegistry::open(dir.path()).unwrap();
        reg.add("CP-0", Some("old-password")).unwrap();
        let batch: Vec<(String, Option<String>)> = (0..6)
            .map(|i| (format!("CP-{i}"), (i != 5).then(|| format!("pw-{i}"))))
            .collect();
        let seen = std::sync::Mutex::new(Vec::new());
        let added = reg
            .add_many(&batch, |n| seen.lock().unwrap().push(n))
            .unwrap();
        assert_eq!(added, 5, "CP-0 existed");
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, (1..=6).collect::<Vec<_>>());
        assert_eq!(reg.len(), 6);
        assert_eq!(reg.verify("CP-0", "pw-0"), AuthDecision::Accepted);
        assert_eq!(
            reg.verify("CP-0", "old-password"),
            AuthDecision::BadPassword
        );
        assert_eq!(reg.verify("CP-3", "pw-3"), AuthDecision::Accepted);
        assert_eq!(reg.verify("CP-5", "x"), AuthDecision::NoPasswordSet);
        // One bad id: nothing is written.
        let bad = vec![
            ("CP-7".to_string(), Some("pw".to_string())),
            ("bad id".to_string(), None),
        ];
        assert!(reg.add_many(&bad, |_| {}).is_err());
        assert!(reg.get("CP-7").is_none());
    }

    #[test]
    fn another_handle_writing_is_seen_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let server = StationRegistry::open(dir.path()).unwrap();
        assert!(server.list().is_empty());
        let cli = StationRegistry::open(dir.path()).unwrap();
        cli.add("CP-NEW", None).unwrap();
        // A miss re-checks the file immediately.
        assert!(server.get("CP-NEW").is_some());
        // Removal is a hit in the stale cache: seen after the check interval.
        cli.remove("CP-NEW").unwrap();
        std::thread::sleep(RELOAD_CHECK_INTERVAL + Duration::from_millis(100));
        assert!(server.get("CP-NEW").is_none());
        assert!(server.list().is_empty());
    }

    #[test]
    fn concurrent_writers_do_not_lose_updates() {
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let reg = StationRegistry::open(dir.path()).unwrap();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        reg.add(&format!("CP-{t}-{i}"), None).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(StationRegistry::open(dir.path()).unwrap().len(), 40);
    }

    #[test]
    fn corrupt_file_is_refused_at_open_and_kept_on_reload() {
        let dir = tempfile::tempdir().unwrap();
        let reg = StationRegistry::open(dir.path()).unwrap();
        reg.add("CP-1", None).unwrap();
        fs::write(dir.path().join(STATIONS_FILE), b"{not json").unwrap();
        let err = StationRegistry::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("stations.json"), "{err}");
        reg.inner.file.refresh(true);
        assert!(reg.get("CP-1").is_some(), "last good contents kept");
        assert!(
            reg.add("CP-2", None).is_err(),
            "corrupt file not overwritten"
        );
    }

    fn token(id: &str, status: IdTokenStatus, expiry: Option<DateTime<Utc>>) -> IdTokenRecord {
        IdTokenRecord {
            id_token: id.into(),
            status,
            expiry,
            group_id: Some("FLEET-A".into()),
        }
    }

    #[test]
    fn id_token_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        let reg = IdTokenRegistry::open(dir.path(), DefaultPolicy::RejectUnknown).unwrap();
        reg.add(token(
            "aabb01",
            IdTokenStatus::Accepted,
            Some(now + chrono::Duration::days(1)),
        ))
        .unwrap();
        reg.add(token(
            "OLD",
            IdTokenStatus::Accepted,
            Some(now - chrono::Duration::seconds(1)),
        ))
        .unwrap();
        reg.add(token("STOLEN", IdTokenStatus::Blocked, None))
            .unwrap();

        let d = reg.authorize("AABB01", now);
        assert_eq!(d.status, IdTokenStatus::Accepted, "case-insensitive");
        assert_eq!(d.group_id.as_deref(), Some("FLEET-A"));
        assert!(d.expiry.is_some());
        assert_eq!(reg.authorize("OLD", now).status, IdTokenStatus::Expired);
        assert_eq!(
            reg.authorize("OLD", now - chrono::Duration::hours(1))
                .status,
            IdTokenStatus::Accepted
        );
        assert_eq!(reg.authorize("STOLEN", now).status, IdTokenStatus::Blocked);
        let unknown = reg.authorize("NOPE", now);
        assert_eq!(unknown.status, IdTokenStatus::Unknown);
        assert_eq!(unknown.status.ocpp16(), "Invalid");
        assert_eq!(unknown.status.ocpp201(), "Unknown");

        let open = IdTokenRegistry::open(dir.path(), DefaultPolicy::AcceptAll).unwrap();
        assert_eq!(open.authorize("NOPE", now).status, IdTokenStatus::Accepted);
        assert_eq!(open.list().len(), 3, "persisted");
        assert!(open.remove("stolen").unwrap());
        assert_eq!(open.get("STOLEN"), None);
        reg.inner.file.refresh(true);
        assert_eq!(reg.get("stolen"), None, "other handle sees the removal");
        assert!(matches!(
            reg.add(token("", IdTokenStatus::Accepted, None)),
            Err(RegistryError::InvalidIdToken { .. })
        ));
    }

    #[test]
    fn id_token_file_format() {
        let rec: IdTokenRecord = serde_json::from_str(
            r#"{"id_token":"X1","status":"Blocked","expiry":"2030-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(rec.status, IdTokenStatus::Blocked);
        assert_eq!(rec.group_id, None);
        assert_eq!(
            serde_json::to_value(IdTokenStatus::Accepted).unwrap(),
            serde_json::json!("Accepted")
        );
        assert_eq!(
            serde_json::from_str::<DefaultPolicy>("\"reject\"").unwrap(),
            DefaultPolicy::RejectUnknown
        );
        assert_eq!(
            "accept".parse::<DefaultPolicy>().unwrap(),
            DefaultPolicy::AcceptAll
        );
        assert!("maybe".parse::<DefaultPolicy>().is_err());
    }
}
