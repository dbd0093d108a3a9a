//! Scheduled workflows and emailed reports (issue 7).
//!
//! This first slice is the monthly fault-ranking report: read
//! `gold.fault_ranking` and `gold.daily_faults` for a month, render a mail
//! (HTML table, plain-text part, CSV attachment, PNG chart of daily faults)
//! and either write it to a folder for a person to look at or deliver it over
//! SMTP with retries.
//!
//! # Layout
//! - [`report`]: loading the month from the lake, rendering, writing files.
//! - [`chart`]: the PNG chart (plotters, bitmap backend).
//! - [`email`]: SMTP configuration, MIME message, delivery with retries.

pub mod chart;
pub mod email;
pub mod report;

#[cfg(test)]
mod smtp_tests;

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
