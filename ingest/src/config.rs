//! The one configuration struct, layered: built-in defaults, then a TOML file
//! (`csms.toml`), then the environment. Every component's settings are a
//! section of it so there is one place to look.
//!
//! Environment: the names of DESIGN.md (`CSMS_OCPP_ADDR`, `REDIS_URL`, ...)
//! plus `CSMS_<SECTION>__<KEY>` for any nested setting, e.g.
//! `CSMS_LIMITS__MAX_FRAME_BYTES=4096` or `CSMS_LAKE__FLUSH_INTERVAL_SECS=1`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    admission::AdmissionConfig, lake::LakeConfig, limits::LimitsConfig, status::RedisStatusConfig,
    tls::TlsConfig, wal::WalConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("invalid configuration: {0} (check csms.toml and the CSMS_* environment variables)")]
    Invalid(String),
    #[error("cannot create or read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the server answers to a BootNotification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootPolicy {
    Accept,
    Pending,
    Reject,
}

/// OCPP protocol behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OcppConfig {
    /// Heartbeat interval handed to Accepted stations.
    pub heartbeat_interval_secs: u32,
    pub boot_policy: BootPolicy,
    /// Retry interval handed to Pending/Rejected stations.
    pub pending_interval_secs: u32,
    /// WebSocket ping interval; a connection silent for two intervals is dead.
    pub ping_interval_secs: u64,
    /// How long a CSMS-initiated CALL waits for the station's answer.
    pub call_timeout_secs: u64,
    /// Versions offered at the upgrade (`1.6`, `2.0.1`, `2.1`).
    pub versions: Vec<String>,
    /// Unknown id tokens: `accept` or `reject`.
    pub default_token_policy: String,
    /// WebSocket read buffer per connection; small keeps idle memory low.
    pub read_buffer_bytes: usize,
}

impl Default for OcppConfig {
    fn default() -> Self {
        OcppConfig {
            heartbeat_interval_secs: 300,
            boot_policy: BootPolicy::Accept,
            pending_interval_secs: 60,
            ping_interval_secs: 60,
            call_timeout_secs: 30,
            versions: vec!["1.6".into(), "2.0.1".into(), "2.1".into()],
            default_token_policy: "accept".into(),
            read_buffer_bytes: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub ocpp_addr: SocketAddr,
    /// wss listener; used only when a TLS certificate is configured.
    pub ocpp_tls_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub pg_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Defaults to `$data_dir/lake`.
    pub lake_url: Option<String>,
    /// Unset: the embedded status store.
    pub redis_url: Option<String>,
    /// Defaults to an id generated once and kept in `$data_dir/node_id`.
    pub node_id: Option<String>,
    pub smtp_url: Option<String>,
    pub admin_token: Option<String>,
    /// A secret shared by every node of the fleet, under which they share
    /// password verifications through Redis (`shared_auth`); unset: none
    /// shared, except between the workers of `csms serve --workers`, which
    /// get one made up for the run. `status.verification_ttl_secs = 0`
    /// turns sharing off.
    pub verification_secret: Option<String>,
    /// Accept stations that are not registered, without authentication.
    pub allow_unknown: bool,
    /// Set by `csms serve --workers N` in each worker process (0..N).
    pub worker_index: Option<u32>,
    /// Threads of the process's async runtime (`CSMS_RUNTIME_THREADS`);
    /// unset: one per core, or for each of `csms serve --workers N`, its
    /// share of the cores (at least one).
    pub runtime_threads: Option<usize>,
    /// How often (in tasks polled) a runtime thread of a node takes its
    /// next task from the global queue, where tasks woken from other
    /// threads wait (above all sessions whose frames the WAL thread has
    /// just made durable), before its own queue
    /// (`CSMS_RUNTIME_GLOBAL_QUEUE_INTERVAL`); unset: tokio's default, or
    /// on a runtime of one thread [`ONE_THREAD_GLOBAL_QUEUE_INTERVAL`].
    pub runtime_global_queue_interval: Option<u32>,
    pub ocpp: OcppConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub wal: WalConfig,
    pub lake: LakeConfig,
    /// The Redis status store (used when `redis_url` is set).
    pub status: RedisStatusConfig,
    /// Pacing new connections and deferring boots when the node is saturated.
    pub admission: AdmissionConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ocpp_addr: ([0, 0, 0, 0], 9000).into(),
            ocpp_tls_addr: ([0, 0, 0, 0], 9443).into(),
            http_addr: ([0, 0, 0, 0], 8080).into(),
            pg_addr: ([0, 0, 0, 0], 5433).into(),
            data_dir: PathBuf::from("./data"),
            lake_url: None,
            redis_url: None,
            node_id: None,
            smtp_url: None,
            admin_token: None,
            verification_secret: None,
            allow_unknown: false,
            worker_index: None,
            runtime_threads: None,
            runtime_global_queue_interval: None,
            ocpp: OcppConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            wal: WalConfig::default(),
            lake: LakeConfig::default(),
            status: RedisStatusConfig::default(),
            admission: AdmissionConfig::default(),
        }
    }
}

/// The global queue interval of a node's runtime when it has one thread
/// (see [`Config::runtime_global_queue_interval`]). On one thread tokio's
/// default (the global queue once per few dozen local polls) kept sessions
/// the WAL had answered waiting: at 20,000 CALLs/s 44 % of CALLs waited
/// over 50 ms between durable and answered. 1 (the global queue always
/// first) fixed that, but in a reconnect storm it starved the local queue
/// (timers, sockets just readable) for as long as the WAL kept the global
/// one fed: admission control's own probe went 20 s without running
/// (bench/README.md).
pub const ONE_THREAD_GLOBAL_QUEUE_INTERVAL: u32 = 2;

/// Environment variables with names of their own, and the setting each sets.
const NAMED_ENV: &[(&str, &[&str])] = &[
    ("CSMS_OCPP_ADDR", &["ocpp_addr"]),
    ("CSMS_OCPP_TLS_ADDR", &["ocpp_tls_addr"]),
    ("CSMS_HTTP_ADDR", &["http_addr"]),
    ("CSMS_PG_ADDR", &["pg_addr"]),
    ("CSMS_DATA_DIR", &["data_dir"]),
    ("CSMS_LAKE_URL", &["lake_url"]),
    ("REDIS_URL", &["redis_url"]),
    ("CSMS_NODE_ID", &["node_id"]),
    ("SMTP_URL", &["smtp_url"]),
    ("CSMS_ADMIN_TOKEN", &["admin_token"]),
    ("CSMS_VERIFICATION_SECRET", &["verification_secret"]),
    ("CSMS_TLS_CERT", &["tls", "cert_path"]),
    ("CSMS_TLS_KEY", &["tls", "key_path"]),
    ("CSMS_TLS_CLIENT_CA", &["tls", "client_ca_path"]),
];

/// Named settings that are booleans rather than strings.
const NAMED_BOOL_ENV: &[(&str, &str)] = &[("CSMS_ALLOW_UNKNOWN", "allow_unknown")];

impl Config {
    /// Loads defaults ← `file` (or `./csms.toml` when present) ← environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::from_table(layered_table(file, env)?)
    }

    /// Deserialises and checks the ingest settings of a layered table (see
    /// [`layered_table`]); sections owned by other crates must be removed first.
    pub fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        let config: Config =
            Config::deserialize(table).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.versions().is_empty() {
            return Err(ConfigError::Invalid(
                "ocpp.versions must name at least one of 1.6, 2.0.1, 2.1".into(),
            ));
        }
        for v in &self.ocpp.versions {
            if schemas::OcppVersion::parse(v).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "ocpp.versions: unknown version {v:?} (use 1.6, 2.0.1 or 2.1)"
                )));
            }
        }
        if !matches!(self.ocpp.default_token_policy.as_str(), "accept" | "reject") {
            return Err(ConfigError::Invalid(format!(
                "ocpp.default_token_policy must be \"accept\" or \"reject\", not {:?}",
                self.ocpp.default_token_policy
            )));
        }
        if self.ocpp.heartbeat_interval_secs == 0 || self.ocpp.ping_interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "ocpp intervals must be greater than zero".into(),
            ));
        }
        self.admission.validate().map_err(ConfigError::Invalid)?;
        if self.runtime_threads == Some(0) {
            return Err(ConfigError::Invalid(
                "runtime_threads (CSMS_RUNTIME_THREADS) must be at least 1; unset it for one per core"
                    .into(),
            ));
        }
        if self.runtime_global_queue_interval == Some(0) {
            return Err(ConfigError::Invalid(
                "runtime_global_queue_interval (CSMS_RUNTIME_GLOBAL_QUEUE_INTERVAL) must be at least 1; unset it for the default"
                    .into(),
            ));
        }
        if let Some(secret) = &self.verification_secret
            && secret.len() < crate::shared_auth::MIN_SECRET_LEN
        {
            return Err(ConfigError::Invalid(format!(
                "verification_secret (CSMS_VERIFICATION_SECRET) needs at least {} characters",
                crate::shared_auth::MIN_SECRET_LEN
            )));
        }
        Ok(())
    }

    pub fn versions(&self) -> Vec<schemas::OcppVersion> {
        self.ocpp
            .versions
            .iter()
            .filter_map(|v| schemas::OcppVersion::parse(v))
            .collect()
    }

    /// Each node has its own WAL; workers of one machine share the data
    /// directory (registries, lake) but not their logs.
    pub fn wal_dir(&self) -> PathBuf {
        match self.worker_index {
            Some(i) => self.data_dir.join(format!("wal-w{i}")),
            None => self.data_dir.join("wal"),
        }
    }

    /// The lake root: `lake_url`, or `$data_dir/lake` as an absolute path.
    pub fn lake_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.lake_url {
            return Ok(url.clone());
        }
        let dir = self.data_dir.join("lake");
        std::fs::create_dir_all(&dir).map_err(|source| ConfigError::Io {
            path: dir.clone(),
            source,
        })?;
        let abs = dir.canonicalize().map_err(|source| ConfigError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(abs.to_string_lossy().into_owned())
    }

    /// This node's id: configured, or generated once and kept in the data
    /// directory so the WAL's committed position survives restarts.
    pub fn node_id(&self) -> Result<String, ConfigError> {
        if let Some(id) = &self.node_id {
            return Ok(id.clone());
        }
        let path = self.data_dir.join("node_id");
        match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Io { path, source }),
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|source| ConfigError::Io {
            path: self.data_dir.clone(),
            source,
        })?;
        let id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        std::fs::write(&path, &id).map_err(|source| ConfigError::Io { path, source })?;
        Ok(id)
    }
}

/// Defaults are applied later by each section's `Default`; this is the file
/// (`file`, or `./csms.toml` when present) overlaid with the environment, as
/// one TOML table. Each crate deserialises its own section from it, so every
/// setting is layered the same way.
pub fn layered_table(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<toml::Table, ConfigError> {
    let default_file = Path::new("csms.toml");
    let path = file.or_else(|| default_file.exists().then_some(default_file));
    let mut table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            text.parse::<toml::Table>().map_err(|e| ConfigError::Toml {
                path: p.to_path_buf(),
                message: e.to_string(),
            })?
        }
        None => toml::Table::new(),
    };
    for (key, value) in env {
        if let Some((_, path)) = NAMED_ENV.iter().find(|(name, _)| *name == key) {
            set_path(&mut table, path, toml::Value::String(value));
        } else if let Some((_, field)) = NAMED_BOOL_ENV.iter().find(|(name, _)| *name == key) {
            let b = parse_bool(&value).ok_or_else(|| {
                ConfigError::Invalid(format!("{key}={value:?}: expected true or false"))
            })?;
            set_path(&mut table, &[field], toml::Value::Boolean(b));
        } else if key == "CSMS_WORKER_INDEX" {
            set_path(&mut table, &["worker_index"], scalar(&value));
        } else if key == "CSMS_RUNTIME_THREADS" {
            set_path(&mut table, &["runtime_threads"], scalar(&value));
        } else if key == "CSMS_RUNTIME_GLOBAL_QUEUE_INTERVAL" {
            set_path(
                &mut table,
                &["runtime_global_queue_interval"],
                scalar(&value),
            );
        } else if let Some(rest) = key.strip_prefix("CSMS_")
            && let Some((section, field)) = rest.split_once("__")
        {
            let path = [section.to_ascii_lowercase(), field.to_ascii_lowercase()];
            set_path(
                &mut table,
                &[path[0].as_str(), path[1].as_str()],
                scalar(&value),
            );
        }
    }
    Ok(table)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// An environment value as the TOML scalar it looks like.
fn scalar(s: &str) -> toml::Value {
    if let Some(b) = parse_bool(s).filter(|_| !s.trim().chars().all(|c| c.is_ascii_digit())) {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = s.trim().parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = s.trim().parse::<f64>() {
        return toml::Value::Float(f);
    }
    if s.starts_with('[')
        && let Ok(t) = format!("v = {s}").parse::<toml::Table>()
        && let Some(v) = t.get("v")
    {
        return v.clone();
    }
    toml::Value::String(s.to_string())
}

fn set_path(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if !entry.is_table() {
            *entry = toml::Value::Table(Default::default());
        }
        t = entry.as_table_mut().expect("table");
    }
    t.insert(last.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.ocpp_addr.port(), 9000);
        assert_eq!(c.http_addr.port(), 8080);
        assert_eq!(c.pg_addr.port(), 5433);
        assert_eq!(c.versions().len(), 3);
        assert!(!c.allow_unknown);
    }

    #[test]
    fn file_then_env_layering() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("csms.toml");
        std::fs::write(
            &f,
            "http_addr = \"127.0.0.1:1\"\nnode_id = \"a\"\n[ocpp]\nheartbeat_interval_secs = 10\n",
        )
        .unwrap();
        let c = Config::load_from(
            Some(&f),
            env(&[
                ("CSMS_NODE_ID", "42"),
                ("CSMS_OCPP__HEARTBEAT_INTERVAL_SECS", "20"),
                ("CSMS_ALLOW_UNKNOWN", "true"),
                ("CSMS_OCPP__BOOT_POLICY", "pending"),
                ("CSMS_OCPP__VERSIONS", "[\"1.6\"]"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http_addr.port(), 1);
        assert_eq!(c.node_id.as_deref(), Some("42"));
        assert_eq!(c.ocpp.heartbeat_interval_secs, 20);
        assert_eq!(c.ocpp.boot_policy, BootPolicy::Pending);
        assert_eq!(c.versions(), vec![schemas::OcppVersion::V16]);
        assert!(c.allow_unknown);
    }

    #[test]
    fn bad_values_say_what_to_fix() {
        let refusal =
            |pairs: &[(&str, &str)]| Config::load_from(None, env(pairs)).unwrap_err().to_string();
        let e = refusal(&[("CSMS_OCPP__HEARTBEAT_INTERVALL", "3")]);
        assert!(e.contains("heartbeat_intervall"), "{e}");
        let e = refusal(&[("CSMS_HTTP_ADDR", "nope")]);
        assert!(e.contains("invalid"), "{e}");
        let e = refusal(&[("CSMS_ALLOW_UNKNOWN", "maybe")]);
        assert!(e.contains("CSMS_ALLOW_UNKNOWN"), "{e}");
        let e = refusal(&[
            ("CSMS_ADMISSION__PENDING_MIN_SECS", "10"),
            ("CSMS_ADMISSION__PENDING_MAX_SECS", "2"),
        ]);
        assert!(e.contains("admission.pending_min_secs"), "{e}");
        let e = refusal(&[("CSMS_VERIFICATION_SECRET", "short")]);
        assert!(e.contains("CSMS_VERIFICATION_SECRET"), "{e}");
        let e = refusal(&[("CSMS_RUNTIME_THREADS", "0")]);
        assert!(e.contains("CSMS_RUNTIME_THREADS"), "{e}");
        let c = Config::load_from(None, env(&[("CSMS_RUNTIME_THREADS", "3")])).unwrap();
        assert_eq!(c.runtime_threads, Some(3));
        let e = refusal(&[("CSMS_RUNTIME_GLOBAL_QUEUE_INTERVAL", "0")]);
        assert!(e.contains("CSMS_RUNTIME_GLOBAL_QUEUE_INTERVAL"), "{e}");
        let c =
            Config::load_from(None, env(&[("CSMS_RUNTIME_GLOBAL_QUEUE_INTERVAL", "4")])).unwrap();
        assert_eq!(c.runtime_global_queue_interval, Some(4));
        let c = Config::load_from(
            None,
            env(&[("CSMS_VERIFICATION_SECRET", "a fleet secret 0123456789")]),
        )
        .unwrap();
        assert_eq!(
            c.verification_secret.as_deref(),
            Some("a fleet secret 0123456789")
        );
    }

    #[test]
    fn node_id_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let a = c.node_id().unwrap();
        assert_eq!(a, c.node_id().unwrap());
        assert!(a.starts_with("node-"));
    }
}
