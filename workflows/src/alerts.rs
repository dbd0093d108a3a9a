//! Alerts: a connector that goes Faulted, or a station that drops off (no
//! socket and no heartbeat for a while), is announced by email and webhook
//! within a poll or two, once, and announced again when it clears.
//!
//! # How a pass works
//! [`AlertEngine::evaluate`] reads the live status, derives the conditions
//! that hold now ([`conditions`]), and compares them with the persisted set
//! of active alerts ([`AlertState`]): a condition not yet active is
//! *raised*, an active alert whose condition no longer holds (including a
//! station removed from the registry, whose status is gone) is *cleared*.
//! Each raise and clear becomes an outbox entry, persisted before anything
//! is sent, with one pending flag per channel: the `ops.alert_events` lake
//! table, each webhook URL, and the mail. Delivery then works the outbox:
//! whatever fails stays pending, is logged and counted, and is tried again
//! on the next pass, so nothing is dropped silently; a crash between
//! sending and saving repeats a notification rather than losing it.
//!
//! Per pass, one mail lists every event still waiting for mail (subject:
//! the counts) and every webhook gets one JSON POST per event, in order:
//! `{"event": "raised"|"cleared", "alert_id", "kind": "faulted"|"offline",
//! "station_id", "evse_id", "connector_id", "detail", "since", "at"}`.
//!
//! # Several nodes
//! [`AlertEngine::run`] evaluates every `poll_secs` only while it holds the
//! `alerts` lease (time to live 3 × `poll_secs`, renewed each pass), so one
//! node at a time evaluates; with Redis the state is shared, so a takeover
//! by another node neither re-raises nor forgets anything. A pass that runs
//! longer than the lease (an SMTP server timing out repeatedly) may overlap
//! a new leader's pass: the worst case is a repeated notification.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use deltalake::arrow::array::{
    ArrayRef, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder};
use ingest::status::{ConnectorStatus, StationPresence, StatusStore};
use redis::aio::ConnectionManager;
use schemas::tables::{OPS_ALERT_EVENTS, alert_events_schema};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::lease::LeaseStore;
use crate::report::html_escape;
use crate::{JobContext, JobError, SmtpConfig};

/// The lease key under which one node evaluates alerts.
pub const LEASE_KEY: &str = "alerts";

/// `[alerts]` of `csms.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Whether `csms serve` runs the alert engine. Unset: on when there is
    /// anyone to tell (`recipients` or `webhooks`).
    pub enabled: Option<bool>,
    /// Seconds between passes. An alert goes out within about one pass of
    /// the status change (or of `offline_after_secs` passing).
    pub poll_secs: u64,
    /// A station counts as offline when it has no socket and has not been
    /// heard from (any message, heartbeat included) for this long.
    pub offline_after_secs: u64,
    /// Mail addresses alerted (through `[smtp]` / `SMTP_URL`).
    pub recipients: Vec<String>,
    /// `http://` or `https://` URLs each event is POSTed to as JSON.
    pub webhooks: Vec<String>,
    /// Alert on connectors whose status is `Faulted`.
    pub faulted: bool,
    /// Alert on stations that dropped off.
    pub offline: bool,
    /// Attempts per webhook POST within one pass (a failure is tried again
    /// on the next pass anyway).
    pub webhook_attempts: u32,
    /// Wait before the second attempt within a pass; doubled after.
    pub webhook_backoff_ms: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            enabled: None,
            poll_secs: 15,
            offline_after_secs: 300,
            recipients: Vec::new(),
            webhooks: Vec::new(),
            faulted: true,
            offline: true,
            webhook_attempts: 2,
            webhook_backoff_ms: 500,
        }
    }
}

impl AlertsConfig {
    /// `enabled`, or when unset, whether anyone is to be told.
    pub fn is_enabled(&self) -> bool {
        self.enabled
            .unwrap_or(!self.recipients.is_empty() || !self.webhooks.is_empty())
    }

    /// Refuses settings that would make alerts go nowhere unnoticed:
    /// recipients without SMTP, malformed addresses or URLs, a zero poll.
    pub fn validate(&self, smtp: &SmtpConfig) -> Result<(), String> {
        if self.poll_secs == 0 {
            return Err("[alerts] poll_secs must be at least 1".into());
        }
        for r in &self.recipients {
            r.parse::<lettre::message::Mailbox>()
                .map_err(|e| format!("[alerts] recipient {r:?}: {e}"))?;
        }
        if !self.recipients.is_empty() && smtp.url.is_none() {
            return Err(
                "[alerts] recipients are set but SMTP is not configured (set SMTP_URL)".into(),
            );
        }
        for w in &self.webhooks {
            match url::Url::parse(w) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(_) => {
                    return Err(format!(
                        "[alerts] webhook {}: not http(s)",
                        crate::webhook::redact(w)
                    ));
                }
                Err(e) => return Err(format!("[alerts] webhook: invalid URL: {e}")),
            }
        }
        Ok(())
    }
}

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// A connector's live status is `Faulted`.
    Faulted,
    /// A station has no socket and was last seen too long ago.
    Offline,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Faulted => "faulted",
            AlertKind::Offline => "offline",
        }
    }
}

/// An alert condition: `faulted:{station}:{evse}:{connector}` or
/// `offline:{station}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub alert_id: String,
    pub kind: AlertKind,
    pub station_id: String,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    /// Error code and info for a fault; the last-seen time for offline.
    pub detail: Option<String>,
    /// When the condition began (the fault's event time, the last seen time).
    pub since: DateTime<Utc>,
}

/// Raised or cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Raised,
    Cleared,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Raised => "raised",
            EventKind::Cleared => "cleared",
        }
    }
}

/// One raise or clear; serialised, it is the webhook body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub event: EventKind,
    #[serde(flatten)]
    pub alert: Alert,
    /// When the pass decided it.
    pub at: DateTime<Utc>,
}

impl AlertEvent {
    /// Outbox key: sorts chronologically, unique per event.
    fn key(&self) -> String {
        format!(
            "{:020}|{}|{}",
            self.at.timestamp_micros(),
            self.event.as_str(),
            self.alert.alert_id
        )
    }
}

fn fault_detail(c: &ConnectorStatus) -> Option<String> {
    let code = c
        .error_code
        .as_deref()
        .filter(|e| !e.is_empty() && *e != "NoError");
    let info = c.info.as_deref().filter(|i| !i.is_empty());
    match (code, info) {
        (Some(code), Some(info)) => Some(format!("{code} ({info})")),
        (Some(code), None) => Some(code.to_string()),
        (None, Some(info)) => Some(info.to_string()),
        (None, None) => None,
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The conditions that hold at `now` by the live status, by alert id.
/// A station without any last-seen time is not judged offline: nothing
/// says since when it would be.
pub fn conditions(
    config: &AlertsConfig,
    presence: &[StationPresence],
    connectors: &[ConnectorStatus],
    now: DateTime<Utc>,
) -> BTreeMap<String, Alert> {
    let mut out = BTreeMap::new();
    if config.faulted {
        for c in connectors.iter().filter(|c| c.status == "Faulted") {
            let alert_id = format!("faulted:{}:{}:{}", c.station_id, c.evse_id, c.connector_id);
            out.insert(
                alert_id.clone(),
                Alert {
                    alert_id,
                    kind: AlertKind::Faulted,
                    station_id: c.station_id.clone(),
                    evse_id: Some(c.evse_id),
                    connector_id: Some(c.connector_id),
                    detail: fault_detail(c),
                    since: c.event_time,
                },
            );
        }
    }
    if config.offline {
        let after =
            chrono::Duration::seconds(config.offline_after_secs.min(i64::MAX as u64) as i64);
        for p in presence.iter().filter(|p| !p.connected) {
            let Some(last_seen) = p.last_seen else {
                continue;
            };
            if now - last_seen >= after {
                let alert_id = format!("offline:{}", p.station_id);
                out.insert(
                    alert_id.clone(),
                    Alert {
                        alert_id,
                        kind: AlertKind::Offline,
                        station_id: p.station_id.clone(),
                        evse_id: None,
                        connector_id: None,
                        detail: Some(format!("last seen {}", rfc3339(last_seen))),
                        since: last_seen,
                    },
                );
            }
        }
    }
    out
}

/// [`conditions`] read from a status store.
pub async fn current_alerts(
    config: &AlertsConfig,
    status: &StatusStore,
    now: DateTime<Utc>,
) -> Result<BTreeMap<String, Alert>, JobError> {
    let presence = status.stations().await?;
    let connectors = status.connectors(None).await?;
    Ok(conditions(config, &presence, &connectors, now))
}

/// An event and the channels it still has to reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    event: AlertEvent,
    /// Still to be appended to `ops.alert_events`.
    lake: bool,
    /// Still to be mailed.
    email: bool,
    /// Webhook URLs still to be POSTed to.
    webhooks: Vec<String>,
}

impl Pending {
    fn done(&self) -> bool {
        !self.lake && !self.email && self.webhooks.is_empty()
    }
}

/// The persisted state: active alerts and the outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Snapshot {
    active: BTreeMap<String, Alert>,
    outbox: BTreeMap<String, Pending>,
}

/// Where the active alerts and undelivered notifications are kept, so a
/// restart neither re-alerts nor forgets. Cheap to clone.
#[derive(Clone)]
pub enum AlertState {
    /// A JSON file (one node, no Redis), replaced atomically on each save.
    File(PathBuf),
    /// Redis hashes `{prefix}alerts:active` (alert id → JSON alert) and
    /// `{prefix}alerts:pending` (event key → JSON event and its pending
    /// channels), shared by every node.
    Redis {
        conn: ConnectionManager,
        active_key: String,
        pending_key: String,
    },
}

fn state_err(location: impl Into<String>) -> impl Fn(String) -> JobError {
    let location = location.into();
    move |reason| JobError::AlertState {
        location: location.clone(),
        reason,
    }
}

impl AlertState {
    /// State in a JSON file, e.g. `$CSMS_DATA_DIR/alerts.json`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        AlertState::File(path.into())
    }

    /// State in Redis under `{prefix}alerts:*` (prefix e.g. `csms:`). A
    /// cluster URL uses its first node, as leases do.
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, JobError> {
        let err = state_err("Redis");
        let single = match ingest::status::cluster_nodes(url) {
            Ok(Some(nodes)) => nodes.into_iter().next().unwrap_or_default(),
            Ok(None) => url.to_string(),
            Err(e) => return Err(err(e.to_string())),
        };
        let client = redis::Client::open(single.as_str()).map_err(|e| err(e.to_string()))?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(AlertState::Redis {
            conn,
            active_key: format!("{prefix}alerts:active"),
            pending_key: format!("{prefix}alerts:pending"),
        })
    }

    /// The active alerts, by id.
    pub async fn active(&self) -> Result<BTreeMap<String, Alert>, JobError> {
        Ok(self.load().await?.active)
    }

    /// Events whose notification has not reached every channel yet.
    pub async fn pending(&self) -> Result<Vec<AlertEvent>, JobError> {
        Ok(self
            .load()
            .await?
            .outbox
            .into_values()
            .map(|p| p.event)
            .collect())
    }

    async fn load(&self) -> Result<Snapshot, JobError> {
        match self {
            AlertState::File(path) => {
                let err = state_err(path.display().to_string());
                match tokio::fs::read(path).await {
                    Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Snapshot::default()),
                    Err(e) => Err(err(e.to_string())),
                }
            }
            AlertState::Redis {
                conn,
                active_key,
                pending_key,
            } => {
                let err = state_err(format!("Redis {active_key}"));
                let (active, pending): (BTreeMap<String, String>, BTreeMap<String, String>) =
                    redis::pipe()
                        .hgetall(active_key)
                        .hgetall(pending_key)
                        .query_async(&mut conn.clone())
                        .await
                        .map_err(|e| err(e.to_string()))?;
                let mut snap = Snapshot::default();
                for (k, v) in active {
                    let a = serde_json::from_str(&v).map_err(|e| err(format!("{k}: {e}")))?;
                    snap.active.insert(k, a);
                }
                for (k, v) in pending {
                    let p = serde_json::from_str(&v).map_err(|e| err(format!("{k}: {e}")))?;
                    snap.outbox.insert(k, p);
                }
                Ok(snap)
            }
        }
    }

    /// Stores `after`; for Redis, only what differs from `before`, in one
    /// MULTI/EXEC.
    async fn save(&self, before: &Snapshot, after: &Snapshot) -> Result<(), JobError> {
        if before == after {
            return Ok(());
        }
        match self {
            AlertState::File(path) => {
                let err = state_err(path.display().to_string());
                let bytes = serde_json::to_vec_pretty(after).map_err(|e| err(e.to_string()))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(dir)
                        .await
                        .map_err(|e| err(e.to_string()))?;
                }
                let tmp = tmp_path(path);
                tokio::fs::write(&tmp, bytes)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                tokio::fs::rename(&tmp, path)
                    .await
                    .map_err(|e| err(e.to_string()))
            }
            AlertState::Redis {
                conn,
                active_key,
                pending_key,
            } => {
                let err = state_err(format!("Redis {active_key}"));
                let mut pipe = redis::pipe();
                pipe.atomic();
                diff_into(&mut pipe, active_key, &before.active, &after.active).map_err(&err)?;
                diff_into(&mut pipe, pending_key, &before.outbox, &after.outbox).map_err(&err)?;
                pipe.query_async::<()>(&mut conn.clone())
                    .await
                    .map_err(|e| err(e.to_string()))
            }
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// HSET what is new or changed, HDEL what is gone.
fn diff_into<V: Serialize + PartialEq>(
    pipe: &mut redis::Pipeline,
    key: &str,
    before: &BTreeMap<String, V>,
    after: &BTreeMap<String, V>,
) -> Result<(), String> {
    for (k, v) in after {
        if before.get(k) != Some(v) {
            let json = serde_json::to_string(v).map_err(|e| e.to_string())?;
            pipe.hset(key, k, json).ignore();
        }
    }
    for k in before.keys().filter(|k| !after.contains_key(*k)) {
        pipe.hdel(key, k).ignore();
    }
    Ok(())
}

/// The alert mail for `events`: subject with the counts, text and HTML
/// listing every event in order.
pub fn render_mail(events: &[&AlertEvent]) -> (String, String, String) {
    let raised = events
        .iter()
        .filter(|e| e.event == EventKind::Raised)
        .count();
    let cleared = events.len() - raised;
    let subject = format!("CSMS alerts: {raised} raised, {cleared} cleared");
    let where_ = |a: &Alert| match (a.evse_id, a.connector_id) {
        (Some(e), Some(c)) => format!("EVSE {e} connector {c}"),
        _ => "station".to_string(),
    };
    let mut text = format!("{subject}\n\n");
    let mut html = format!(
        "<html><body><p>{}</p>\n<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">\n\
         <thead><tr><th>Event</th><th>Kind</th><th>Station</th><th>Where</th>\
         <th>Detail</th><th>Since</th><th>At</th></tr></thead>\n<tbody>\n",
        html_escape(&subject)
    );
    for e in events {
        let a = &e.alert;
        let detail = a.detail.as_deref().unwrap_or("");
        let _ = writeln!(
            text,
            "{:<8} {:<8} {} {}{}  since {}  at {}",
            e.event.as_str().to_uppercase(),
            a.kind.as_str(),
            a.station_id,
            where_(a),
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            },
            rfc3339(a.since),
            rfc3339(e.at)
        );
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.event.as_str(),
            a.kind.as_str(),
            html_escape(&a.station_id),
            where_(a),
            html_escape(detail),
            rfc3339(a.since),
            rfc3339(e.at)
        );
    }
    html.push_str("</tbody>\n</table>\n</body></html>\n");
    (subject, text, html)
}

/// Appends `events` to `ops.alert_events`, creating the table when missing.
pub async fn append_events(ctx: &JobContext, events: &[&AlertEvent]) -> Result<(), JobError> {
    if events.is_empty() {
        return Ok(());
    }
    let name = OPS_ALERT_EVENTS.replace('/', ".");
    let err = |reason: String| JobError::LakeWrite {
        table: name.clone(),
        reason,
    };
    let location = crate::report::table_location(&ctx.lake_url, OPS_ALERT_EVENTS)?;
    let table = match crate::report::load(&location, OPS_ALERT_EVENTS, &ctx.storage_options).await?
    {
        Some(t) => t,
        None => create_table(&location, &ctx.storage_options)
            .await
            .map_err(&err)?,
    };
    let batch = events_batch(events, &ctx.node_id).map_err(&err)?;
    table
        .write(vec![batch])
        .with_save_mode(SaveMode::Append)
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

async fn create_table(
    location: &str,
    storage_options: &std::collections::HashMap<String, String>,
) -> Result<DeltaTable, String> {
    let schema = alert_events_schema();
    let columns: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| e.to_string())?;
    let url = deltalake::ensure_table_uri(location).map_err(|e| e.to_string())?;
    let created = DeltaTableBuilder::from_url(url)
        .map_err(|e| e.to_string())?
        .with_storage_options(storage_options.clone())
        .build()
        .map_err(|e| e.to_string())?
        .create()
        .with_table_name("alert_events")
        .with_comment("Alerts raised and cleared (csms workflows)")
        .with_columns(columns.fields().cloned())
        .with_save_mode(SaveMode::Ignore)
        .await;
    match created {
        Ok(t) => {
            tracing::info!(table = location, "created table");
            Ok(t)
        }
        // A concurrent creator won: use its table.
        Err(e) => match crate::report::load(location, OPS_ALERT_EVENTS, storage_options).await {
            Ok(Some(t)) => Ok(t),
            _ => Err(e.to_string()),
        },
    }
}

fn events_batch(events: &[&AlertEvent], node_id: &str) -> Result<RecordBatch, String> {
    let strs = |f: &dyn Fn(&AlertEvent) -> String| -> ArrayRef {
        Arc::new(StringArray::from(
            events.iter().map(|e| f(e)).collect::<Vec<_>>(),
        ))
    };
    let times = |f: &dyn Fn(&AlertEvent) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from(events.iter().map(|e| f(e)).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        strs(&|e| e.alert.alert_id.clone()),
        strs(&|e| e.alert.kind.as_str().into()),
        strs(&|e| e.event.as_str().into()),
        strs(&|e| e.alert.station_id.clone()),
        Arc::new(Int32Array::from(
            events.iter().map(|e| e.alert.evse_id).collect::<Vec<_>>(),
        )),
        Arc::new(Int32Array::from(
            events
                .iter()
                .map(|e| e.alert.connector_id)
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            events
                .iter()
                .map(|e| e.alert.detail.clone())
                .collect::<Vec<_>>(),
        )),
        times(&|e| e.alert.since.timestamp_micros()),
        times(&|e| e.at.timestamp_micros()),
        strs(&|_| node_id.to_string()),
    ];
    RecordBatch::try_new(alert_events_schema(), columns).map_err(|e| e.to_string())
}

fn counted(channel: &'static str, outcome: &'static str, n: usize) {
    metrics::counter!("csms_alert_notifications_total", "channel" => channel, "outcome" => outcome)
        .increment(n as u64);
}

/// Evaluates alerts and delivers their notifications.
pub struct AlertEngine {
    config: AlertsConfig,
    ctx: JobContext,
    lease: LeaseStore,
    state: AlertState,
    client: reqwest::Client,
}

impl AlertEngine {
    pub fn new(
        config: AlertsConfig,
        ctx: JobContext,
        lease: LeaseStore,
        state: AlertState,
    ) -> Self {
        AlertEngine {
            config,
            ctx,
            lease,
            state,
            client: crate::webhook::client(),
        }
    }

    pub fn state(&self) -> &AlertState {
        &self.state
    }

    /// Whether events are to be mailed: recipients and SMTP both set
    /// ([`AlertsConfig::validate`] refuses recipients without SMTP).
    fn mails(&self) -> bool {
        !self.config.recipients.is_empty() && self.ctx.smtp.url.is_some()
    }

    /// One pass (see the module documentation). Returns the events this
    /// pass raised or cleared; notifications of earlier passes that were
    /// still pending are delivered too. Fails when the live status or the
    /// state cannot be read or saved; a failed delivery is not an error
    /// (it stays pending).
    pub async fn evaluate(&self, now: DateTime<Utc>) -> Result<Vec<AlertEvent>, JobError> {
        let status = self.ctx.status()?;
        let mut snap = self.state.load().await?;
        let before = snap.clone();
        let current = current_alerts(&self.config, status, now).await?;

        let mut events = Vec::new();
        for (id, alert) in &current {
            if !snap.active.contains_key(id) {
                events.push(AlertEvent {
                    event: EventKind::Raised,
                    alert: alert.clone(),
                    at: now,
                });
            }
        }
        for (id, alert) in &snap.active {
            if !current.contains_key(id) {
                events.push(AlertEvent {
                    event: EventKind::Cleared,
                    alert: alert.clone(),
                    at: now,
                });
            }
        }
        for e in &events {
            match e.event {
                EventKind::Raised => {
                    snap.active
                        .insert(e.alert.alert_id.clone(), e.alert.clone());
                }
                EventKind::Cleared => {
                    snap.active.remove(&e.alert.alert_id);
                }
            }
            tracing::info!(
                event = e.event.as_str(),
                alert = %e.alert.alert_id,
                detail = e.alert.detail.as_deref().unwrap_or(""),
                "alert"
            );
            metrics::counter!("csms_alert_events_total", "event" => e.event.as_str(), "kind" => e.alert.kind.as_str())
                .increment(1);
            snap.outbox.insert(
                e.key(),
                Pending {
                    event: e.clone(),
                    lake: true,
                    email: self.mails(),
                    webhooks: self.config.webhooks.clone(),
                },
            );
        }
        // Persist the decision before telling anyone.
        self.state.save(&before, &snap).await?;

        let decided = snap.clone();
        self.deliver(&mut snap).await;
        self.state.save(&decided, &snap).await?;
        metrics::gauge!("csms_alerts_active").set(snap.active.len() as f64);
        metrics::gauge!("csms_alert_notifications_pending").set(snap.outbox.len() as f64);
        Ok(events)
    }

    /// Works the outbox: lake, then each webhook in event order, then one
    /// mail. Clears the flags of what was delivered.
    async fn deliver(&self, snap: &mut Snapshot) {
        // ops.alert_events
        let keys: Vec<String> = snap
            .outbox
            .iter()
            .filter(|(_, p)| p.lake)
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            let events: Vec<&AlertEvent> = keys.iter().map(|k| &snap.outbox[k].event).collect();
            match append_events(&self.ctx, &events).await {
                Ok(()) => {
                    counted("lake", "delivered", keys.len());
                    for k in &keys {
                        if let Some(p) = snap.outbox.get_mut(k) {
                            p.lake = false;
                        }
                    }
                }
                Err(e) => {
                    counted("lake", "failed", keys.len());
                    tracing::error!(error = %e, events = keys.len(), "alert events not recorded in the lake; retrying next pass");
                }
            }
        }

        // Webhooks: per URL, events in order; the first failure defers the
        // rest for that URL to the next pass, keeping their order.
        let configured: BTreeSet<&str> = self.config.webhooks.iter().map(String::as_str).collect();
        let mut urls: Vec<String> = Vec::new();
        for p in snap.outbox.values() {
            for u in &p.webhooks {
                if !urls.contains(u) {
                    urls.push(u.clone());
                }
            }
        }
        let backoff = Duration::from_millis(self.config.webhook_backoff_ms);
        for url in urls {
            let keys: Vec<String> = snap
                .outbox
                .iter()
                .filter(|(_, p)| p.webhooks.contains(&url))
                .map(|(k, _)| k.clone())
                .collect();
            if !configured.contains(url.as_str()) {
                counted("webhook", "dropped", keys.len());
                tracing::warn!(webhook = %crate::webhook::redact(&url), events = keys.len(), "webhook no longer configured: its pending alert notifications are dropped");
                for k in &keys {
                    if let Some(p) = snap.outbox.get_mut(k) {
                        p.webhooks.retain(|u| u != &url);
                    }
                }
                continue;
            }
            for k in keys {
                let Some(p) = snap.outbox.get_mut(&k) else {
                    continue;
                };
                let body = match serde_json::to_value(&p.event) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "alert event not serialisable");
                        break;
                    }
                };
                match crate::webhook::post_json(
                    &self.client,
                    &url,
                    &body,
                    self.config.webhook_attempts,
                    backoff,
                )
                .await
                {
                    Ok(()) => {
                        counted("webhook", "delivered", 1);
                        p.webhooks.retain(|u| u != &url);
                    }
                    Err(e) => {
                        counted("webhook", "failed", 1);
                        tracing::error!(error = %e, alert = %p.event.alert.alert_id, "alert webhook not delivered; retrying next pass");
                        break;
                    }
                }
            }
        }

        // One mail for everything waiting for mail.
        let keys: Vec<String> = snap
            .outbox
            .iter()
            .filter(|(_, p)| p.email)
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            if self.mails() {
                let events: Vec<&AlertEvent> = keys.iter().map(|k| &snap.outbox[k].event).collect();
                let (subject, text, html) = render_mail(&events);
                match crate::email::send_simple(
                    &self.ctx.smtp,
                    &self.config.recipients,
                    &subject,
                    &text,
                    &html,
                )
                .await
                {
                    Ok(()) => {
                        counted("email", "delivered", keys.len());
                        for k in &keys {
                            if let Some(p) = snap.outbox.get_mut(k) {
                                p.email = false;
                            }
                        }
                    }
                    Err(e) => {
                        counted("email", "failed", keys.len());
                        tracing::error!(error = %e, events = keys.len(), "alert mail not delivered; retrying next pass");
                    }
                }
            } else {
                counted("email", "dropped", keys.len());
                tracing::warn!(
                    events = keys.len(),
                    "alert mail no longer configured (no recipients or no SMTP): pending alert mails dropped"
                );
                for k in &keys {
                    if let Some(p) = snap.outbox.get_mut(k) {
                        p.email = false;
                    }
                }
            }
        }
        snap.outbox.retain(|_, p| !p.done());
    }

    /// Evaluates every `poll_secs` while this node holds the `alerts` lease,
    /// until `shutdown`; then releases the lease so another node takes over
    /// at once.
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.config.is_enabled() {
            tracing::info!("alerts disabled");
            return;
        }
        if !self.config.recipients.is_empty() && self.ctx.smtp.url.is_none() {
            tracing::error!(
                "alert recipients are set but SMTP is not configured: alerts are not mailed"
            );
        }
        let poll = Duration::from_secs(self.config.poll_secs.max(1));
        let ttl = poll * 3;
        let node = self.ctx.node_id.clone();
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let now = self.ctx.clock.now();
            match self.lease.acquire(LEASE_KEY, &node, ttl, now).await {
                Ok(true) => {
                    if !leading {
                        tracing::info!(%node, "this node evaluates alerts");
                        leading = true;
                    }
                    let pass = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = self.evaluate(now) => r,
                    };
                    match pass {
                        Ok(events) if !events.is_empty() => {
                            tracing::debug!(events = events.len(), "alert pass");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            metrics::counter!("csms_alert_passes_failed_total").increment(1);
                            tracing::warn!(error = %e, "alert pass failed; trying again next poll");
                        }
                    }
                }
                Ok(false) => {
                    if leading {
                        tracing::info!(%node, "another node evaluates alerts now");
                    }
                    leading = false;
                }
                Err(e) => {
                    leading = false;
                    tracing::warn!(error = %e, "alert lease unavailable; skipping this pass");
                }
            }
        }
        if leading
            && let Err(e) = self
                .lease
                .finish(LEASE_KEY, &node, None, self.ctx.clock.now())
                .await
        {
            tracing::warn!(error = %e, "could not release the alert lease (it expires by itself)");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use chrono::Duration as Span;
    use ingest::status::StatusStore;
    use ingest::test_redis::RedisServer;
    use serde_json::{Value, json};

    use super::*;
    use crate::clock::{Clock, ManualClock, SystemClock};
    use crate::smtp_tests::Sink;
    use crate::webhook::tests::Receiver;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    const T0: &str = "2027-03-01T02:00:00Z";

    fn ctx(
        status: &StatusStore,
        smtp: SmtpConfig,
        lake: &Path,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> JobContext {
        JobContext {
            node_id: "n1".into(),
            lake_url: lake.to_str().unwrap().into(),
            storage_options: Default::default(),
            pipeline: pipeline::PipelineConfig::default(),
            smtp,
            status: Some(status.clone()),
            commands: None,
            report_dir: lake.join("reports"),
            clock,
        }
    }

    fn config(recipients: &[&str], webhooks: &[String]) -> AlertsConfig {
        AlertsConfig {
            recipients: recipients.iter().map(|s| s.to_string()).collect(),
            webhooks: webhooks.to_vec(),
            webhook_attempts: 1,
            webhook_backoff_ms: 10,
            ..AlertsConfig::default()
        }
    }

    fn fault(station: &str, status: &str, at: DateTime<Utc>) -> ConnectorStatus {
        ConnectorStatus {
            station_id: station.into(),
            evse_id: 1,
            connector_id: 1,
            status: status.into(),
            error_code: Some(
                if status == "Faulted" {
                    "GroundFailure"
                } else {
                    "NoError"
                }
                .into(),
            ),
            info: None,
            event_time: at,
            updated_at: at,
        }
    }

    fn cells(m: &Value) -> Vec<Vec<String>> {
        m["html_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap().to_string())
                    .collect()
            })
            .collect()
    }

    /// Rows of ops.alert_events: (alert_id, event), in time order.
    async fn lake_rows(lake: &Path) -> Vec<(String, String)> {
        let loc = crate::report::table_location(lake.to_str().unwrap(), OPS_ALERT_EVENTS).unwrap();
        let Some(table) = crate::report::load(&loc, OPS_ALERT_EVENTS, &Default::default())
            .await
            .unwrap()
        else {
            return Vec::new();
        };
        let batches = crate::report::query(
            &table,
            OPS_ALERT_EVENTS,
            "SELECT alert_id, event FROM t ORDER BY at, event DESC, alert_id",
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        for b in &batches {
            let ids: StringArray = crate::report::column(
                b,
                "alert_id",
                &deltalake::arrow::datatypes::DataType::Utf8,
                "t",
            )
            .unwrap();
            let ev: StringArray = crate::report::column(
                b,
                "event",
                &deltalake::arrow::datatypes::DataType::Utf8,
                "t",
            )
            .unwrap();
            for i in 0..b.num_rows() {
                out.push((ids.value(i).to_string(), ev.value(i).to_string()));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_fault_is_alerted_once_by_mail_and_webhook_and_cleared_on_recovery() {
        let sink = Sink::start(&[]).await;
        let rx = Receiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let status = StatusStore::embedded();
        let t0 = t(T0);
        let clock = Arc::new(ManualClock::new(t0));
        let engine = AlertEngine::new(
            config(&["ops@example.com", "crew@example.com"], &[rx.url()]),
            ctx(&status, sink.config(), dir.path(), clock),
            LeaseStore::local(),
            AlertState::file(dir.path().join("state/alerts.json")),
        );
        status.connected("CP1", "n1", "1.6", t0);
        status.put_connector(fault("CP1", "Available", t0));
        assert!(engine.evaluate(t0).await.unwrap().is_empty());

        // Faulted: one event, one POST, one mail.
        let t1 = t0 + Span::seconds(20);
        status.put_connector(fault("CP1", "Faulted", t1));
        let events = engine.evaluate(t1 + Span::seconds(5)).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, EventKind::Raised);
        assert_eq!(events[0].alert.alert_id, "faulted:CP1:1:1");
        assert_eq!(
            rx.bodies(),
            vec![json!({
                "event": "raised",
                "alert_id": "faulted:CP1:1:1",
                "kind": "faulted",
                "station_id": "CP1",
                "evse_id": 1,
                "connector_id": 1,
                "detail": "GroundFailure",
                "since": "2027-03-01T02:00:20Z",
                "at": "2027-03-01T02:00:25Z",
            })]
        );
        assert_eq!(sink.received().len(), 1);
        let m = sink.message(1).await;
        assert_eq!(m["subject"], "CSMS alerts: 1 raised, 0 cleared");
        assert_eq!(m["to"], json!(["ops@example.com", "crew@example.com"]));
        assert_eq!(
            cells(&m),
            vec![vec![
                "raised",
                "faulted",
                "CP1",
                "EVSE 1 connector 1",
                "GroundFailure",
                "2027-03-01T02:00:20Z",
                "2027-03-01T02:00:25Z"
            ]]
        );
        assert!(m["text"].as_str().unwrap().contains("RAISED"));

        // Still faulted (even re-reported): nothing new.
        status.put_connector(fault("CP1", "Faulted", t1 + Span::seconds(30)));
        assert!(
            engine
                .evaluate(t1 + Span::seconds(40))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(rx.bodies().len(), 1);
        assert_eq!(sink.received().len(), 1);
        assert_eq!(engine.state().active().await.unwrap().len(), 1);

        // Recovered: one "cleared" POST and one mail.
        let t2 = t1 + Span::seconds(60);
        status.put_connector(fault("CP1", "Available", t2));
        let events = engine.evaluate(t2).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, EventKind::Cleared);
        let bodies = rx.bodies();
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[1]["event"], "cleared");
        assert_eq!(bodies[1]["alert_id"], "faulted:CP1:1:1");
        assert_eq!(bodies[1]["since"], "2027-03-01T02:00:20Z");
        assert_eq!(
            sink.message(2).await["subject"],
            "CSMS alerts: 0 raised, 1 cleared"
        );
        assert!(engine.evaluate(t2).await.unwrap().is_empty());
        assert_eq!(sink.received().len(), 2);
        assert!(engine.state().active().await.unwrap().is_empty());
        assert!(engine.state().pending().await.unwrap().is_empty());

        // A station removed from the registry clears.
        status.put_connector(fault("CP1", "Faulted", t2 + Span::seconds(1)));
        assert_eq!(
            engine.evaluate(t2 + Span::seconds(1)).await.unwrap().len(),
            1
        );
        status.remove_station("CP1").await.unwrap();
        let events = engine.evaluate(t2 + Span::seconds(2)).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, EventKind::Cleared);

        assert_eq!(
            lake_rows(dir.path()).await,
            [
                ("faulted:CP1:1:1", "raised"),
                ("faulted:CP1:1:1", "cleared"),
                ("faulted:CP1:1:1", "raised"),
                ("faulted:CP1:1:1", "cleared"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[tokio::test]
    async fn offline_after_the_configured_silence_and_back() {
        let rx = Receiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let status = StatusStore::embedded();
        let t0 = t(T0);
        let clock = ManualClock::new(t0);
        let mut cfg = config(&[], &[rx.url()]);
        cfg.offline_after_secs = 300;
        let engine = AlertEngine::new(
            cfg,
            ctx(
                &status,
                SmtpConfig::default(),
                dir.path(),
                Arc::new(clock.clone()),
            ),
            LeaseStore::local(),
            AlertState::file(dir.path().join("alerts.json")),
        );
        status.connected("CP2", "n1", "2.0.1", t0);
        status.seen("CP2", t0 + Span::seconds(60));
        // Connected but silent for long: a socket is there, not offline.
        assert!(
            engine
                .evaluate(t0 + Span::hours(1))
                .await
                .unwrap()
                .is_empty()
        );
        let gone = t0 + Span::seconds(70);
        status.disconnected("CP2", "n1", gone);
        clock.set(gone + Span::seconds(299));
        assert!(engine.evaluate(clock.now()).await.unwrap().is_empty());
        clock.advance(Span::seconds(1));
        let events = engine.evaluate(clock.now()).await.unwrap();
        assert_eq!(events.len(), 1);
        let body = &rx.bodies()[0];
        assert_eq!(body["alert_id"], "offline:CP2");
        assert_eq!(body["kind"], "offline");
        assert_eq!(body["evse_id"], Value::Null);
        assert_eq!(body["since"], "2027-03-01T02:01:10Z");
        assert_eq!(body["detail"], "last seen 2027-03-01T02:01:10Z");
        clock.advance(Span::minutes(10));
        assert!(engine.evaluate(clock.now()).await.unwrap().is_empty());

        status.connected("CP2", "n1", "2.0.1", clock.now());
        let events = engine.evaluate(clock.now()).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, EventKind::Cleared);
        assert_eq!(rx.bodies().len(), 2);
        assert_eq!(rx.bodies()[1]["event"], "cleared");
    }

    #[tokio::test]
    async fn failed_deliveries_are_retried_on_the_next_pass() {
        // SMTP answers 451 once; with one attempt per pass the first pass
        // fails to mail. The webhook receiver is down for the first pass.
        let sink = Sink::start(&["--fail-first", "1"]).await;
        let mut smtp = sink.config();
        smtp.attempts = 1;
        let rx = Receiver::start().await;
        let addr = rx.addr;
        let url = rx.url();
        rx.stop().await;
        let dir = tempfile::tempdir().unwrap();
        let status = StatusStore::embedded();
        let t0 = t(T0);
        let engine = AlertEngine::new(
            config(&["ops@example.com"], std::slice::from_ref(&url)),
            ctx(&status, smtp, dir.path(), Arc::new(ManualClock::new(t0))),
            LeaseStore::local(),
            AlertState::file(dir.path().join("alerts.json")),
        );
        status.put_connector(fault("CP3", "Faulted", t0));
        let events = engine.evaluate(t0).await.unwrap();
        assert_eq!(events.len(), 1);
        assert!(sink.received().is_empty());
        let pending = engine.state().pending().await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].alert.alert_id, "faulted:CP3:1:1");

        // Receiver back on the same port; the next pass delivers both.
        let rx = Receiver::start_on(addr).await;
        assert!(
            engine
                .evaluate(t0 + Span::seconds(15))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(rx.bodies().len(), 1);
        assert_eq!(rx.bodies()[0]["event"], "raised");
        assert_eq!(rx.bodies()[0]["at"], "2027-03-01T02:00:00Z");
        assert_eq!(
            sink.message(1).await["subject"],
            "CSMS alerts: 1 raised, 0 cleared"
        );
        assert!(engine.state().pending().await.unwrap().is_empty());
        // And nothing more after.
        engine.evaluate(t0 + Span::seconds(30)).await.unwrap();
        assert_eq!(rx.bodies().len(), 1);
        assert_eq!(sink.received().len(), 1);
    }

    /// A new engine on the same state neither re-raises nor forgets.
    async fn survives_restart(state: impl Fn() -> AlertState) {
        let rx = Receiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let status = StatusStore::embedded();
        let t0 = t(T0);
        let make = || {
            AlertEngine::new(
                config(&[], &[rx.url()]),
                ctx(
                    &status,
                    SmtpConfig::default(),
                    dir.path(),
                    Arc::new(SystemClock),
                ),
                LeaseStore::local(),
                state(),
            )
        };
        status.put_connector(fault("CP4", "Faulted", t0));
        assert_eq!(make().evaluate(t0).await.unwrap().len(), 1);
        assert_eq!(rx.bodies().len(), 1);
        let engine = make();
        assert!(
            engine
                .evaluate(t0 + Span::seconds(15))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(rx.bodies().len(), 1);
        status.put_connector(fault("CP4", "Available", t0 + Span::seconds(20)));
        let events = make().evaluate(t0 + Span::seconds(30)).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, EventKind::Cleared);
        assert_eq!(rx.bodies().len(), 2);
    }

    #[tokio::test]
    async fn file_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.json");
        survives_restart(|| AlertState::file(&path)).await;
        let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(saved["active"], json!({}));
        // A damaged file is an error, not a silent reset (which re-alerts).
        std::fs::write(&path, b"{not json").unwrap();
        let err = AlertState::file(&path).active().await.unwrap_err();
        assert!(err.to_string().contains("alerts.json"), "{err}");
    }

    #[tokio::test]
    async fn redis_state_survives_a_restart() {
        let server = RedisServer::start();
        let url = server.url();
        let states: Vec<AlertState> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(AlertState::redis(&url, "csms:").await.unwrap());
            }
            v
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        survives_restart(|| {
            states[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 3].clone()
        })
        .await;
        // Keys exist while something is active.
        let status = StatusStore::embedded();
        let dir = tempfile::tempdir().unwrap();
        status.put_connector(fault("CP5", "Faulted", t(T0)));
        let engine = AlertEngine::new(
            config(&[], &[]),
            ctx(
                &status,
                SmtpConfig::default(),
                dir.path(),
                Arc::new(SystemClock),
            ),
            LeaseStore::local(),
            states[0].clone(),
        );
        engine.evaluate(t(T0)).await.unwrap();
        assert!(server.keys().contains(&"csms:alerts:active".to_string()));
        let active = states[1].active().await.unwrap();
        assert_eq!(active.keys().collect::<Vec<_>>(), ["faulted:CP5:1:1"]);
    }

    #[tokio::test]
    async fn two_nodes_alert_once() {
        let server = RedisServer::start();
        let rx = Receiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let status = StatusStore::embedded();
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        for node in ["n1", "n2"] {
            let mut c = ctx(
                &status,
                SmtpConfig::default(),
                dir.path(),
                Arc::new(SystemClock),
            );
            c.node_id = node.into();
            let mut cfg = config(&[], &[rx.url()]);
            cfg.poll_secs = 1;
            let engine = AlertEngine::new(
                cfg,
                c,
                LeaseStore::redis(&server.url(), "csms:").await.unwrap(),
                AlertState::redis(&server.url(), "csms:").await.unwrap(),
            );
            tasks.push(tokio::spawn(engine.run(shutdown.clone())));
        }
        status.put_connector(fault("CP6", "Faulted", Utc::now()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx.bodies().is_empty() {
            assert!(Instant::now() < deadline, "no alert within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A few more passes of both nodes: still one.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(rx.bodies().len(), 1);
        shutdown.cancel();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .unwrap()
                .unwrap();
        }
        // The leader released its lease on shutdown.
        assert!(!server.keys().contains(&"csms:lease:alerts".to_string()));
    }

    #[test]
    fn config_defaults_validation_and_enabling() {
        let c: AlertsConfig = toml::from_str("").unwrap();
        assert_eq!(c, AlertsConfig::default());
        assert_eq!((c.poll_secs, c.offline_after_secs), (15, 300));
        assert!(c.faulted && c.offline && !c.is_enabled());
        let c: AlertsConfig =
            toml::from_str("webhooks = [\"https://hooks.example.com/x\"]\npoll_secs = 5").unwrap();
        assert!(c.is_enabled());
        c.validate(&SmtpConfig::default()).unwrap();
        let c: AlertsConfig =
            toml::from_str("enabled = false\nrecipients = [\"a@example.com\"]").unwrap();
        assert!(!c.is_enabled());
        assert!(
            c.validate(&SmtpConfig::default())
                .unwrap_err()
                .contains("SMTP")
        );
        assert!(toml::from_str::<AlertsConfig>("poll = 5").is_err());
        let bad: AlertsConfig = toml::from_str("webhooks = [\"ftp://x/y\"]").unwrap();
        assert!(bad.validate(&SmtpConfig::default()).is_err());
        let bad: AlertsConfig = toml::from_str("recipients = [\"not an address\"]").unwrap();
        assert!(bad.validate(&SmtpConfig::default()).is_err());
    }

    #[test]
    fn conditions_follow_the_switches() {
        let now = t(T0);
        let presence = vec![StationPresence {
            station_id: "A".into(),
            connected: false,
            node: None,
            last_seen: Some(now - Span::minutes(10)),
            ocpp_version: Some("1.6".into()),
            boot: None,
        }];
        let mut f = fault("A", "Faulted", now);
        f.info = Some("relay <stuck>".into());
        let connectors = vec![f];
        let all = conditions(&AlertsConfig::default(), &presence, &connectors, now);
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            ["faulted:A:1:1", "offline:A"]
        );
        assert_eq!(
            all["faulted:A:1:1"].detail.as_deref(),
            Some("GroundFailure (relay <stuck>)")
        );
        let only_offline = AlertsConfig {
            faulted: false,
            ..AlertsConfig::default()
        };
        assert_eq!(
            conditions(&only_offline, &presence, &connectors, now).len(),
            1
        );
        let (subject, _, html) = render_mail(&[&AlertEvent {
            event: EventKind::Raised,
            alert: all["faulted:A:1:1"].clone(),
            at: now,
        }]);
        assert_eq!(subject, "CSMS alerts: 1 raised, 0 cleared");
        assert!(html.contains("relay &lt;stuck&gt;"));
    }
}
