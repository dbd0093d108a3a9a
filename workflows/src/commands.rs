//! Scheduled remote commands: send a CALL to a set of stations chosen from
//! the live status, e.g. reboot the faulted ones at a low-use hour.
//!
//! A station is skipped, with its reason counted, when it is not connected
//! (a CALL cannot reach it), when it is busy and `skip_busy` is set, or when
//! the job has no payload for its OCPP version. Per-station failures (a
//! timeout, a CALLERROR) are counted and logged, never fatal: the job fails
//! only when nothing could be attempted because the live status or the
//! command router is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use ingest::session::CallAnswer;
use ingest::status::{ConnectorStatus, StationPresence};
use serde_json::Value;

use crate::{JobContext, JobError};

/// Connector statuses that mean a transaction is (or is about to be) in
/// progress, across 1.6 (`Preparing`, `Charging`, `SuspendedEV`,
/// `SuspendedEVSE`, `Finishing`) and 2.0.1/2.1 (`Occupied`). A station with
/// any connector in one of them is busy.
pub const BUSY_STATUSES: [&str; 6] = [
    "Preparing",
    "Charging",
    "SuspendedEV",
    "SuspendedEVSE",
    "Finishing",
    "Occupied",
];

/// The OCPP versions a payload may be given for.
pub const VERSIONS: [&str; 3] = ["1.6", "2.0.1", "2.1"];

/// Which stations a command job addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandTarget {
    /// Stations with a connector whose live status is Faulted.
    Faulted,
    /// Every connected station.
    Connected,
    /// Exactly the stations listed in `stations`.
    Listed,
}

/// `[job] kind = "command"` parameters.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandJob {
    /// The OCPP action, e.g. `Reset`.
    pub action: String,
    pub target: CommandTarget,
    /// Stations for `target = "listed"`.
    #[serde(default)]
    pub stations: Vec<String>,
    /// Skip stations with a transaction in progress (a connector in one of
    /// [`BUSY_STATUSES`] in the live status).
    #[serde(default = "yes")]
    pub skip_busy: bool,
    /// Payload per OCPP version ("1.6", "2.0.1", "2.1"), since actions differ
    /// (1.6 Reset `{type = "Soft"}`, 2.x `{type = "OnIdle"}`).
    pub payload: BTreeMap<String, toml::Value>,
    /// How long to wait for each station's answer.
    #[serde(default = "thirty")]
    pub timeout_secs: u64,
    /// Stations commanded at the same time.
    #[serde(default = "sixteen")]
    pub concurrency: usize,
}

fn yes() -> bool {
    true
}

fn thirty() -> u64 {
    30
}

fn sixteen() -> usize {
    16
}

impl CommandJob {
    /// Checks what can be checked without the live status: a known version
    /// for every payload, stations for a listed target.
    pub fn validate(&self) -> Result<(), String> {
        if self.action.trim().is_empty() {
            return Err("command job: `action` is empty".into());
        }
        if let Some(v) = self
            .payload
            .keys()
            .find(|k| !VERSIONS.contains(&k.as_str()))
        {
            return Err(format!(
                "command job {}: payload for unknown OCPP version {v:?} (use {})",
                self.action,
                VERSIONS.join(", ")
            ));
        }
        if self.payload.is_empty() {
            return Err(format!("command job {}: no payload given", self.action));
        }
        if self.target == CommandTarget::Listed && self.stations.is_empty() {
            return Err(format!(
                "command job {}: target \"listed\" without `stations`",
                self.action
            ));
        }
        Ok(())
    }
}

/// TOML to JSON. Dates and times become their RFC 3339 text, as OCPP
/// payloads carry them.
pub fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// What happened to each station, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutcome {
    /// The station answered with a result whose `status` is `Accepted` or
    /// `Scheduled` (or that has no `status`).
    pub accepted: Vec<String>,
    /// The station answered with another `status` (`Rejected`, ...).
    pub rejected: Vec<String>,
    /// A CALLERROR, a timeout, or the station was unreachable.
    pub failed: Vec<String>,
    pub busy: Vec<String>,
    pub offline: Vec<String>,
    /// No payload for the station's OCPP version (or the version unknown).
    pub no_payload: Vec<String>,
}

impl CommandOutcome {
    pub fn sent(&self) -> usize {
        self.accepted.len() + self.rejected.len() + self.failed.len()
    }

    pub fn skipped(&self) -> usize {
        self.busy.len() + self.offline.len() + self.no_payload.len()
    }

    /// `sent N (accepted A, rejected R, failed F), skipped S (busy B,
    /// offline O, no payload P)`.
    pub fn summary(&self, action: &str) -> String {
        format!(
            "{action}: sent {} (accepted {}, rejected {}, failed {}), skipped {} (busy {}, offline {}, no payload {})",
            self.sent(),
            self.accepted.len(),
            self.rejected.len(),
            self.failed.len(),
            self.skipped(),
            self.busy.len(),
            self.offline.len(),
            self.no_payload.len()
        )
    }
}

enum Plan {
    Send(String, Value),
    Busy(String),
    Offline(String),
    NoPayload(String, String),
}

/// Decides per station, from the live status, what to do.
fn plan(
    job: &CommandJob,
    presence: &[StationPresence],
    connectors: &[ConnectorStatus],
) -> Vec<Plan> {
    let by_id: BTreeMap<&str, &StationPresence> = presence
        .iter()
        .map(|p| (p.station_id.as_str(), p))
        .collect();
    let mut busy: BTreeSet<&str> = BTreeSet::new();
    let mut faulted: BTreeSet<&str> = BTreeSet::new();
    for c in connectors {
        if BUSY_STATUSES.contains(&c.status.as_str()) {
            busy.insert(&c.station_id);
        }
        if c.status == "Faulted" {
            faulted.insert(&c.station_id);
        }
    }
    let targets: BTreeSet<&str> = match job.target {
        CommandTarget::Faulted => faulted,
        CommandTarget::Connected => presence
            .iter()
            .filter(|p| p.connected)
            .map(|p| p.station_id.as_str())
            .collect(),
        CommandTarget::Listed => job.stations.iter().map(String::as_str).collect(),
    };
    targets
        .into_iter()
        .map(|station| {
            let p = by_id.get(station).filter(|p| p.connected);
            let Some(p) = p else {
                return Plan::Offline(station.to_string());
            };
            if job.skip_busy && busy.contains(station) {
                return Plan::Busy(station.to_string());
            }
            let version = p.ocpp_version.clone().unwrap_or_default();
            match job.payload.get(&version) {
                Some(payload) => Plan::Send(station.to_string(), toml_to_json(payload)),
                None => Plan::NoPayload(station.to_string(), version),
            }
        })
        .collect()
}

/// Whether a result payload means the station will do it.
fn accepted(result: &Value) -> bool {
    match result.get("status").and_then(Value::as_str) {
        None => true,
        Some(s) => s == "Accepted" || s == "Scheduled",
    }
}

fn count(action: &str, outcome: &'static str) {
    metrics::counter!("csms_workflow_commands_total", "action" => action.to_string(), "outcome" => outcome)
        .increment(1);
}

/// Sends `job.action` to the stations `job.target` picks from the live
/// status; returns the counts as one line (see [`CommandOutcome::summary`]).
pub async fn run_command_job(ctx: &JobContext, job: &CommandJob) -> Result<String, JobError> {
    run_command_job_detailed(ctx, job)
        .await
        .map(|o| o.summary(&job.action))
}

/// [`run_command_job`], returning which station ended how.
pub async fn run_command_job_detailed(
    ctx: &JobContext,
    job: &CommandJob,
) -> Result<CommandOutcome, JobError> {
    job.validate().map_err(JobError::Failed)?;
    let status = ctx.status()?;
    if ctx.commands.is_none() {
        return Err(JobError::Unavailable(
            "remote commands",
            "run inside `csms serve`, or set REDIS_URL so the command reaches the node holding the station".into(),
        ));
    }
    let presence = status.stations().await?;
    let connectors = status.connectors(None).await?;
    let timeout = Duration::from_secs(job.timeout_secs.max(1));
    let action = job.action.as_str();

    let mut outcome = CommandOutcome::default();
    let mut sends = Vec::new();
    for p in plan(job, &presence, &connectors) {
        match p {
            Plan::Send(station, payload) => sends.push((station, payload)),
            Plan::Busy(station) => {
                tracing::info!(%station, action, "skipped: a transaction is in progress");
                count(action, "skipped_busy");
                outcome.busy.push(station);
            }
            Plan::Offline(station) => {
                tracing::info!(%station, action, "skipped: not connected");
                count(action, "skipped_offline");
                outcome.offline.push(station);
            }
            Plan::NoPayload(station, version) => {
                tracing::warn!(%station, action, version = %version, "skipped: the job has no payload for this OCPP version");
                count(action, "skipped_no_payload");
                outcome.no_payload.push(station);
            }
        }
    }

    let results: Vec<(String, Result<CallAnswer, JobError>)> = stream::iter(sends)
        .map(|(station, payload)| async move {
            let r = ctx.send_command(&station, action, payload, timeout).await;
            (station, r)
        })
        .buffer_unordered(job.concurrency.max(1))
        .collect()
        .await;
    for (station, r) in results {
        match r {
            Ok(CallAnswer::Result(result)) if accepted(&result) => {
                tracing::info!(%station, action, %result, "command accepted");
                count(action, "accepted");
                outcome.accepted.push(station);
            }
            Ok(CallAnswer::Result(result)) => {
                tracing::warn!(%station, action, %result, "command rejected by the station");
                count(action, "rejected");
                outcome.rejected.push(station);
            }
            Ok(CallAnswer::Error {
                code, description, ..
            }) => {
                tracing::warn!(%station, action, %code, %description, "station answered with a CALLERROR");
                count(action, "failed");
                outcome.failed.push(station);
            }
            Err(e) => {
                tracing::warn!(%station, action, error = %e, "command not delivered");
                count(action, "failed");
                outcome.failed.push(station);
            }
        }
    }
    for list in [
        &mut outcome.accepted,
        &mut outcome.rejected,
        &mut outcome.failed,
    ] {
        list.sort();
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{DateTime, Utc};
    use ingest::router::{CommandRouter, execute_fn};
    use ingest::session::CallFailure;
    use ingest::status::StatusStore;
    use parking_lot::Mutex;

    use super::*;
    use crate::clock::ManualClock;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn connector(station: &str, connector_id: i32, status: &str) -> ConnectorStatus {
        ConnectorStatus {
            station_id: station.into(),
            evse_id: if connector_id == 0 { 0 } else { 1 },
            connector_id,
            status: status.into(),
            error_code: (status == "Faulted").then(|| "GroundFailure".into()),
            info: None,
            event_time: t("2027-03-01T02:00:00Z"),
            updated_at: t("2027-03-01T02:00:00Z"),
        }
    }

    pub(crate) fn context(
        status: Option<StatusStore>,
        commands: Option<CommandRouter>,
    ) -> JobContext {
        JobContext {
            node_id: "n1".into(),
            lake_url: "/nonexistent".into(),
            storage_options: Default::default(),
            pipeline: pipeline::PipelineConfig::default(),
            smtp: crate::SmtpConfig::default(),
            status,
            commands,
            report_dir: std::env::temp_dir(),
            clock: Arc::new(ManualClock::new(t("2027-03-01T03:00:00Z"))),
        }
    }

    type Received = Arc<Mutex<Vec<(String, String, Value)>>>;

    /// A local router whose stations answer Reset with `Accepted`, except
    /// `REJ` (Rejected), `ERR` (CALLERROR) and `GONE` (not connected).
    fn router(received: Received) -> CommandRouter {
        CommandRouter::local(
            "n1".into(),
            execute_fn(move |station, action, payload| {
                let received = received.clone();
                async move {
                    received.lock().push((station.clone(), action, payload));
                    match station.as_str() {
                        "REJ" => Ok(CallAnswer::Result(
                            serde_json::json!({"status": "Rejected"}),
                        )),
                        "ERR" => Ok(CallAnswer::Error {
                            code: "InternalError".into(),
                            description: "boom".into(),
                            details: serde_json::json!({}),
                        }),
                        "GONE" => Err(CallFailure::NotConnected(station)),
                        _ => Ok(CallAnswer::Result(
                            serde_json::json!({"status": "Accepted"}),
                        )),
                    }
                }
            }),
        )
    }

    fn reset_job(target: CommandTarget) -> CommandJob {
        toml::from_str::<CommandJob>(&format!(
            r#"
            action = "Reset"
            target = "{}"
            payload."1.6" = {{ type = "Soft" }}
            payload."2.0.1" = {{ type = "OnIdle" }}
            timeout_secs = 5
            "#,
            match target {
                CommandTarget::Faulted => "faulted",
                CommandTarget::Connected => "connected",
                CommandTarget::Listed => "listed",
            }
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn resets_only_idle_connected_faulted_stations_with_their_versions_payload() {
        let status = StatusStore::embedded();
        let at = t("2027-03-01T01:00:00Z");
        // IDLE: faulted, nothing else going on (2.0.1).
        status.connected("IDLE", "n1", "2.0.1", at);
        status.put_connector(connector("IDLE", 1, "Faulted"));
        status.put_connector(connector("IDLE", 2, "Available"));
        // BUSY: one connector faulted, another charging.
        status.connected("BUSY", "n1", "1.6", at);
        status.put_connector(connector("BUSY", 1, "Faulted"));
        status.put_connector(connector("BUSY", 2, "Charging"));
        // OK: available, not a target.
        status.connected("OK", "n1", "1.6", at);
        status.put_connector(connector("OK", 1, "Available"));
        // DOWN: faulted but disconnected.
        status.connected("DOWN", "n1", "1.6", at);
        status.disconnected("DOWN", "n1", at);
        status.put_connector(connector("DOWN", 1, "Faulted"));

        let received: Received = Default::default();
        let ctx = context(Some(status), Some(router(received.clone())));
        let job = reset_job(CommandTarget::Faulted);
        let summary = run_command_job(&ctx, &job).await.unwrap();
        assert_eq!(
            summary,
            "Reset: sent 1 (accepted 1, rejected 0, failed 0), skipped 2 (busy 1, offline 1, no payload 0)"
        );
        assert_eq!(
            *received.lock(),
            vec![(
                "IDLE".to_string(),
                "Reset".to_string(),
                serde_json::json!({"type": "OnIdle"})
            )]
        );
        let o = run_command_job_detailed(&ctx, &job).await.unwrap();
        assert_eq!(o.busy, ["BUSY"]);
        assert_eq!(o.offline, ["DOWN"]);

        // Without skip_busy the busy one is reset too, with the 1.6 payload.
        received.lock().clear();
        let job = CommandJob {
            skip_busy: false,
            ..job
        };
        run_command_job(&ctx, &job).await.unwrap();
        let mut got = received.lock().clone();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got[0].0, "BUSY");
        assert_eq!(got[0].2, serde_json::json!({"type": "Soft"}));
        assert_eq!(got.len(), 2);
    }

    #[tokio::test]
    async fn outcomes_are_counted_per_station() {
        let status = StatusStore::embedded();
        let at = t("2027-03-01T01:00:00Z");
        for (s, v) in [
            ("A", "1.6"),
            ("REJ", "1.6"),
            ("ERR", "2.0.1"),
            ("GONE", "1.6"),
            ("NEW", "2.1"),
        ] {
            status.connected(s, "n1", v, at);
        }
        let received: Received = Default::default();
        let ctx = context(Some(status), Some(router(received.clone())));
        let mut job = reset_job(CommandTarget::Listed);
        job.stations = ["A", "REJ", "ERR", "GONE", "NEW", "UNKNOWN"]
            .map(String::from)
            .to_vec();
        let o = run_command_job_detailed(&ctx, &job).await.unwrap();
        assert_eq!(o.accepted, ["A"]);
        assert_eq!(o.rejected, ["REJ"]);
        assert_eq!(o.failed, ["ERR", "GONE"]);
        assert_eq!(o.no_payload, ["NEW"]);
        assert_eq!(o.offline, ["UNKNOWN"]);
        assert_eq!(
            o.summary("Reset"),
            "Reset: sent 4 (accepted 1, rejected 1, failed 2), skipped 2 (busy 0, offline 1, no payload 1)"
        );

        // "connected": every connected station, none offline.
        let o = run_command_job_detailed(&ctx, &reset_job(CommandTarget::Connected))
            .await
            .unwrap();
        assert_eq!(o.sent(), 4);
        assert!(o.offline.is_empty());
    }

    #[tokio::test]
    async fn nothing_to_attempt_without_live_status_or_router() {
        let job = reset_job(CommandTarget::Faulted);
        let err = run_command_job(&context(None, None), &job)
            .await
            .unwrap_err();
        assert!(
            matches!(err, JobError::Unavailable("live status", _)),
            "{err}"
        );
        let err = run_command_job(&context(Some(StatusStore::embedded()), None), &job)
            .await
            .unwrap_err();
        assert!(
            matches!(err, JobError::Unavailable("remote commands", _)),
            "{err}"
        );
    }

    #[test]
    fn validation_and_payload_conversion() {
        let mut job = reset_job(CommandTarget::Listed);
        assert!(job.validate().unwrap_err().contains("without `stations`"));
        job.target = CommandTarget::Faulted;
        job.validate().unwrap();
        job.payload.insert("2.0".into(), toml::Value::Integer(1));
        assert!(job.validate().unwrap_err().contains("\"2.0\""));
        assert!(
            toml::from_str::<CommandJob>("action = \"Reset\"\ntarget = \"all\"\npayload = {}")
                .is_err()
        );

        let v: toml::Value =
            toml::from_str("a = 1\nb = 1.5\nc = [true, \"x\"]\nd = { e = 1979-05-27T07:32:00Z }")
                .unwrap();
        assert_eq!(
            toml_to_json(&v),
            serde_json::json!({"a": 1, "b": 1.5, "c": [true, "x"], "d": {"e": "1979-05-27T07:32:00Z"}})
        );
    }
}
