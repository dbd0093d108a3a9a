//! Scheduled workflows, alerts and emailed reports.
//!
//! Workflow definitions (`workflows/*.toml`) say when (cron, UTC) to run
//! which job (a pipeline stage, a report, lake maintenance, a remote command
//! sweep); the scheduler runs them inside `csms serve`, one node per run
//! through a lease, with persisted history, catch-up and retries. Alerts
//! watch the live status and notify by email and webhook.
//!
//! # Layout
//! - [`clock`]: time as an input (system or manual clock).
//! - [`lease`]: exactly-one-node leases, in Redis or in process.
//! - [`context`]: what jobs can reach ([`JobContext`]) and [`JobError`].
//! - [`cron`]: schedules (five-field cron, UTC, `L` = last day of month).
//! - [`definition`]: workflow files: schedule, job, retry, catch-up.
//! - [`history`]: run history in the Delta table `ops.workflow_runs`.
//! - [`scheduler`]: due runs, catch-up, leases, retries with backoff.
//! - [`jobs`]: running one job of any kind.
//! - [`digest`]: the daily digest of stations gone Faulted or offline.
//! - [`commands`]: scheduled remote commands chosen from the live status.
//! - [`alerts`]: Faulted / offline alerts, deduplicated and cleared.
//! - [`webhook`]: JSON POST delivery with retries.
//! - [`report`]: the monthly fault-ranking report: loading, rendering, files.
//! - [`chart`]: the PNG chart (plotters, bitmap backend).
//! - [`email`]: SMTP configuration, MIME message, delivery with retries.

pub mod alerts;
pub mod chart;
pub mod clock;
pub mod commands;
pub mod context;
pub mod cron;
pub mod definition;
pub mod digest;
pub mod email;
pub mod history;
pub mod jobs;
pub mod lease;
pub mod report;
pub mod scheduler;
pub mod webhook;

#[cfg(test)]
mod smtp_tests;

pub use context::{JobContext, JobError, WorkflowsConfig};
pub use email::{SmtpConfig, build_message, send};
pub use report::{
    FaultRankingReport, RankingRow, RenderedReport, load_fault_ranking, render_fault_ranking,
    write_to_dir,
};

/// Everything that can go wrong producing or delivering a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("invalid month {0:?}: expected YYYY-MM")]
    Month(String),
    #[error("invalid lake URL {url:?}: {reason}")]
    LakeUrl { url: String, reason: String },
    #[error("reading {table}: {reason}")]
    Lake { table: String, reason: String },
    #[error("rendering the chart: {0}")]
    Chart(String),
    #[error("writing {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the message: {0}")]
    Message(String),
    #[error("SMTP is not configured: set SMTP_URL (e.g. smtp://user:pass@host:587?tls=required)")]
    NoSmtp,
    #[error("no recipients: give at least one address")]
    NoRecipients,
    #[error("invalid SMTP_URL: {0}")]
    SmtpUrl(String),
    #[error("sending to SMTP server {server} failed after {attempts} attempt(s): {what}")]
    Smtp {
        server: String,
        attempts: u32,
        what: String,
    },
}
