//! What a job can reach: the lake, the pipeline settings, SMTP, and, inside
//! `csms serve`, the live status and the command router. One struct handed
//! to every job kind, so a job's inputs are explicit and tests build one
//! from real parts (a temporary lake, an embedded status store, a local
//! command router).

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use futures_util::FutureExt;
use ingest::{
    router::CommandRouter,
    session::{CallAnswer, CallFailure},
    status::StatusStore,
};
use serde_json::Value;

use crate::{ReportError, SmtpConfig, clock::Clock};

/// Everything a job may use. Cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    /// This node's id: lease holder name and `ops.workflow_runs.node_id`.
    pub node_id: String,
    /// Lake root URL (path, `file://` or `s3://`).
    pub lake_url: String,
    pub storage_options: HashMap<String, String>,
    pub pipeline: pipeline::PipelineConfig,
    pub smtp: SmtpConfig,
    /// The live status store; `None` where there is none to read (a CLI run
    /// without `REDIS_URL`).
    pub status: Option<StatusStore>,
    /// Sends CSMS-initiated CALLs to stations, wherever they are connected.
    pub commands: Option<CommandRouter>,
    /// Where reports are written when they are not mailed.
    pub report_dir: PathBuf,
    pub clock: Arc<dyn Clock>,
}

/// Why a job failed. Every variant says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("pipeline: {0}")]
    Pipeline(#[from] pipeline::PipelineError),
    #[error(transparent)]
    Report(#[from] ReportError),
    /// Boxed: `LakeError` is large and would make every `Result` carry it.
    #[error("lake maintenance: {0}")]
    Lake(Box<ingest::lake::LakeError>),
    #[error("live status: {0}")]
    Status(#[from] ingest::status::StatusError),
    #[error("{0} is not available here: {1}")]
    Unavailable(&'static str, String),
    #[error("webhook {url}: {reason}")]
    Webhook { url: String, reason: String },
    /// Reading or writing the persisted alert state (file or Redis).
    #[error("alert state {location}: {reason}")]
    AlertState { location: String, reason: String },
    /// Appending to a lake table (e.g. `ops.alert_events`).
    #[error("writing {table}: {reason}")]
    LakeWrite { table: String, reason: String },
    #[error("{0}")]
    Failed(String),
}

impl From<ingest::lake::LakeError> for JobError {
    fn from(e: ingest::lake::LakeError) -> Self {
        JobError::Lake(Box::new(e))
    }
}

impl JobContext {
    /// The live status store, or an error saying why there is none.
    pub fn status(&self) -> Result<&StatusStore, JobError> {
        self.status.as_ref().ok_or_else(|| {
            JobError::Unavailable(
                "live status",
                "run inside `csms serve`, or set REDIS_URL".into(),
            )
        })
    }

    /// Sends `action` to `station` through the command router, looking up
    /// which node holds it in the live status.
    pub async fn send_command(
        &self,
        station: &str,
        action: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<CallAnswer, JobError> {
        let router = self.commands.as_ref().ok_or_else(|| {
            JobError::Unavailable(
                "remote commands",
                "run inside `csms serve`, or set REDIS_URL so the command reaches the node holding the station".into(),
            )
        })?;
        let status = self.status()?.clone();
        let presence = move |s: String| {
            let status = status.clone();
            async move {
                status
                    .station(&s)
                    .await
                    .ok()
                    .flatten()
                    .filter(|p| p.connected)
                    .and_then(|p| p.node)
            }
            .boxed()
        };
        router
            .route(&presence, station, action, payload, timeout)
            .await
            .map_err(|e: CallFailure| JobError::Failed(format!("{action} to {station}: {e}")))
    }
}

/// `[workflows]` of `csms.toml`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkflowsConfig {
    /// The folder of workflow definitions (`*.toml` with a `[workflow]`
    /// table), relative to the working directory.
    pub dir: PathBuf,
    /// Run the scheduler inside `csms serve` (every node may: a lease per
    /// run makes exactly one of them do it).
    pub scheduler: bool,
    /// Where reports and digests go when they are not mailed (default:
    /// `reports/` in the data directory).
    pub report_dir: Option<PathBuf>,
}

impl Default for WorkflowsConfig {
    fn default() -> Self {
        WorkflowsConfig {
            dir: PathBuf::from("workflows"),
            scheduler: true,
            report_dir: None,
        }
    }
}
