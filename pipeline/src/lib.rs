//! Bronze → silver → gold DataFusion jobs over the Delta lake (issue 5).
//!
//! Two slices so far (table paths and schemas in [`schemas::tables`]):
//! - faults: `bronze.ocpp_messages` → `silver.status_events` →
//!   `gold.daily_faults` → `gold.fault_ranking`;
//! - transactions: bronze → `silver.meter_values` and
//!   `silver.transaction_events` → `silver.transactions` →
//!   `gold.transactions_completed` → `gold.completed_transactions`.
//!
//! # Incremental and idempotent
//! Each target table records, in a Delta application transaction committed
//! with its data, the version of its source table it has processed
//! (app ids [`silver::APP_ID`], [`gold::DAILY_APP_ID`],
//! [`gold::RANKING_APP_ID`]). A run reads only the source commits after that
//! version (see [`lake`] for how), works out the partitions they touch
//! (event dates; for the ranking, months) and rewrites exactly those with
//! replaceWhere, as a pure function of all source rows for them. A rerun
//! without new source commits writes nothing, so it creates no table
//! versions; a late message rewrites the past date (and month) it belongs to.
//!
//! # Layout
//! - [`lake`]: table locations, commit-log reads, replaceWhere writes, the
//!   memory-bounded DataFusion session.
//! - [`silver`]: `silver.status_events` from bronze through the
//!   [`schemas::adapter`] version adapters (the same mapping ingest uses).
//! - [`gold`]: `gold.daily_faults` and `gold.fault_ranking`.
//! - [`silver_misc`]: `silver.boots`, `silver.heartbeats` and
//!   `silver.device_model`.
//! - [`meter`]: `silver.meter_values` and `silver.transaction_events`.
//! - [`transactions`]: `silver.transactions` (the fold, energy and flags).
//! - [`gold_tx`]: `gold.transactions_completed` and
//!   `gold.completed_transactions`.
//! - [`tariffs`]: the versioned tariff file and the pricing of a transaction;
//!   [`billing`]: `gold.billing` and `gold.billing_statements` (run only when
//!   [`PipelineConfig::tariffs_path`] is set).
//! - [`silver_job`]: the silver stage driver: one bronze scan per run
//!   (`bronze`, private: decode once, route to tables) feeding every
//!   bronze-fed table's sink, each keeping its own progress.
//! - `gold_job` (private): the gold driver every gold table runs through
//!   (source, affected partitions, replaceWhere, progress bookkeeping), with
//!   the table's own SQL or Rust computation as a parameter.
//! - `incremental` (private): the bronze-source selection, scans and the
//!   deduplicating merge the silver jobs share.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use deltalake::DeltaTableError;
use deltalake::datafusion::error::DataFusionError;

pub mod billing;
mod bronze;
pub mod gold;
mod gold_job;
pub mod gold_tx;
mod incremental;
pub mod lake;
pub mod meter;
pub mod silver;
pub mod silver_job;
pub mod silver_misc;
pub mod simulate;
pub mod tariffs;
pub mod transactions;

#[cfg(test)]
mod golden_billing_tests;
#[cfg(test)]
mod golden_misc_tests;
#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod golden_tx_tests;

/// Pipeline settings (`[pipeline]` of `csms.toml`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    /// A station enters a month's `gold.fault_ranking` when it faulted at
    /// least this many times within a single day.
    pub fault_threshold: u32,
    /// Bound of DataFusion's memory pool (spilling beyond it), so a run in
    /// the same process as ingest cannot starve it.
    pub memory_limit_bytes: usize,
    /// object_store / delta-rs storage options (as for ingest's lake writer).
    pub storage_options: HashMap<String, String>,
    /// The versioned tariff file ([`tariffs`] has the format), relative to
    /// the working directory, e.g. `workflows/tariffs.toml`. `None` (the
    /// default) skips `gold.billing` and `gold.billing_statements`, with a
    /// log line: prices are the operator's to set, not a guessed default.
    pub tariffs_path: Option<std::path::PathBuf>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            fault_threshold: 5,
            memory_limit_bytes: 512 << 20,
            storage_options: HashMap::new(),
            tariffs_path: None,
        }
    }
}

/// Which tables a run builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// `silver.*` from bronze.
    Silver,
    /// `gold.*` from silver (as it is now).
    Gold,
    /// Silver, then gold.
    All,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Silver => "silver",
            Stage::Gold => "gold",
            Stage::All => "all",
        })
    }
}

/// What to run.
///
/// Without `from`/`to` a run is incremental (only unseen source commits).
/// With either bound it is a reprocessing of that date range, regardless of
/// recorded progress, and leaves the progress markers as they are: silver
/// re-reads bronze rows *received* in the range (and rewrites the event
/// dates they fall on, which late messages may put before the range); gold
/// recomputes `gold.daily_faults` for the dates in the range and
/// `gold.fault_ranking` for the months overlapping it. Rewrites are pure
/// functions of their sources, so reprocessing never double counts.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub stage: Stage,
    /// First date (inclusive); unbounded if `None`.
    pub from: Option<NaiveDate>,
    /// Last date (inclusive); unbounded if `None`.
    pub to: Option<NaiveDate>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            stage: Stage::All,
            from: None,
            to: None,
        }
    }
}

impl RunOptions {
    pub(crate) fn is_range(&self) -> bool {
        self.from.is_some() || self.to.is_some()
    }
}

/// What one table's job did.
#[derive(Clone, Debug, PartialEq)]
pub struct TableSummary {
    /// SQL name, e.g. `silver.status_events`.
    pub name: String,
    /// Source rows read (bronze messages for silver, source rows for gold).
    pub rows_in: u64,
    /// Rows written to the rewritten partitions.
    pub rows_out: u64,
    /// Partitions rewritten: dates, or months for `gold.fault_ranking`.
    /// Zero when the table was already up to date.
    pub dates_rewritten: u64,
    pub seconds: f64,
}

/// What a run did, per table, in order.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub tables: Vec<TableSummary>,
    pub seconds: f64,
    /// Work done once for several tables, not counted in any table's
    /// seconds: the silver stage's bronze read, filter and routing
    /// ([`silver_job::SCAN_NAME`]; rows in = bronze rows read, rows out =
    /// rows handed to silver tables, one per table taking a row). Decoding
    /// is counted in the table that decoded.
    pub shared: Vec<TableSummary>,
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<24} {:>12} {:>12} {:>10} {:>9}",
            "table", "rows in", "rows out", "rewritten", "seconds"
        )?;
        for t in self.shared.iter().chain(&self.tables) {
            writeln!(
                f,
                "{:<24} {:>12} {:>12} {:>10} {:>9.2}",
                t.name, t.rows_in, t.rows_out, t.dates_rewritten, t.seconds
            )?;
        }
        write!(f, "{:<24} {:>45.2}", "total", self.seconds)
    }
}

/// Progress of a run, for the CLI's progress bars.
#[derive(Clone, Debug, PartialEq)]
pub enum ProgressEvent {
    /// A stage (silver or gold) begins.
    StageStarted(Stage),
    /// A table's job begins (its SQL name).
    TableStarted(String),
    /// A table's job finished.
    TableDone(TableSummary),
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid lake URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("datafusion: {0}")]
    DataFusion(#[from] Box<DataFusionError>),
    #[error("arrow: {0}")]
    Arrow(String),
    #[error("reading the delta log: {0}")]
    Log(String),
    #[error(transparent)]
    Tariffs(#[from] tariffs::TariffError),
    #[error(
        "{table}: merging {what} needs {needed_bytes} bytes, more than the pipeline's memory \
         limit leaves free; raise pipeline.memory_limit_bytes (CSMS_PIPELINE__MEMORY_LIMIT_BYTES)"
    )]
    Memory {
        table: String,
        what: String,
        needed_bytes: usize,
    },
}

impl From<DataFusionError> for PipelineError {
    fn from(e: DataFusionError) -> Self {
        PipelineError::DataFusion(Box::new(e))
    }
}

/// Collects a run's table summaries: metrics, a log line and a progress
/// event per table.
struct Reporter<'a> {
    summary: RunSummary,
    progress: &'a dyn Fn(ProgressEvent),
}

impl silver_job::StageReport for Reporter<'_> {
    fn started(&mut self, name: &str) {
        (self.progress)(ProgressEvent::TableStarted(name.into()));
    }

    fn done(&mut self, t: TableSummary) {
        metrics::counter!("csms_pipeline_rows_out_total", "table" => t.name.clone())
            .increment(t.rows_out);
        metrics::histogram!("csms_pipeline_table_seconds", "table" => t.name.clone())
            .record(t.seconds);
        tracing::info!(
            table = %t.name,
            rows_in = t.rows_in,
            rows_out = t.rows_out,
            rewritten = t.dates_rewritten,
            seconds = t.seconds,
            "pipeline table done"
        );
        (self.progress)(ProgressEvent::TableDone(t.clone()));
        self.summary.tables.push(t);
    }

    fn shared(&mut self, t: TableSummary) {
        metrics::histogram!("csms_pipeline_shared_seconds", "work" => t.name.clone())
            .record(t.seconds);
        tracing::info!(
            work = %t.name,
            rows_in = t.rows_in,
            rows_out = t.rows_out,
            seconds = t.seconds,
            "pipeline shared work done"
        );
        self.summary.shared.push(t);
    }
}

/// Bronze-fed silver tables, in run order (all read by one bronze scan).
const SILVER_TABLES: [silver_job::SilverTable; 6] = [
    silver::STATUS_EVENTS,
    silver_misc::BOOTS,
    silver_misc::HEARTBEATS,
    silver_misc::DEVICE_MODEL,
    meter::METER_VALUES,
    meter::TRANSACTION_EVENTS,
];

/// Runs the pipeline over the lake at `lake_url` (a path, `file://` or
/// `s3://` URL, as for ingest), reporting progress through `progress`.
pub async fn run(
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
    progress: &dyn Fn(ProgressEvent),
) -> Result<RunSummary, PipelineError> {
    use silver_job::StageReport;
    let started = Instant::now();
    let ctx = lake::session(config.memory_limit_bytes)?;
    let mut report = Reporter {
        summary: RunSummary::default(),
        progress,
    };
    if matches!(opts.stage, Stage::Silver | Stage::All) {
        progress(ProgressEvent::StageStarted(Stage::Silver));
        silver_job::run_stage(&ctx, lake_url, config, opts, &SILVER_TABLES, &mut report).await?;
        report.started(transactions::TABLE);
        report.done(transactions::transactions(&ctx, lake_url, config, opts).await?);
    }
    if matches!(opts.stage, Stage::Gold | Stage::All) {
        progress(ProgressEvent::StageStarted(Stage::Gold));
        let mut jobs = vec![
            gold::daily_faults(),
            gold::fault_ranking(config.fault_threshold),
            gold_tx::transactions_completed(),
            gold_tx::completed_transactions(),
        ];
        match &config.tariffs_path {
            Some(path) => {
                // Loaded per run, so an edited file takes effect without a
                // restart (and a changed file reprices everything).
                let book = Arc::new(tariffs::TariffBook::load(path)?);
                jobs.push(billing::billing(book, lake_url, config));
                jobs.push(billing::billing_statements());
            }
            None => tracing::info!(
                "no tariff file configured ([pipeline] tariffs_path): \
                 gold.billing and gold.billing_statements skipped"
            ),
        }
        for job in jobs {
            report.started(job.name());
            report.done(job.run(&ctx, lake_url, config, opts).await?);
        }
    }
    let mut summary = report.summary;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_partial_toml_like_json() {
        let c: PipelineConfig = serde_json::from_str(r#"{"fault_threshold": 3}"#).unwrap();
        assert_eq!(c.fault_threshold, 3);
        assert_eq!(c.memory_limit_bytes, 512 << 20);
        assert_eq!(PipelineConfig::default().fault_threshold, 5);
    }

    #[test]
    fn summary_renders_a_table() {
        let s = RunSummary {
            tables: vec![TableSummary {
                name: "silver.status_events".into(),
                rows_in: 10,
                rows_out: 7,
                dates_rewritten: 2,
                seconds: 0.5,
            }],
            seconds: 1.25,
            shared: Vec::new(),
        };
        let text = s.to_string();
        assert!(text.lines().count() == 3, "{text}");
        assert!(text.contains("silver.status_events"));
        assert!(text.contains("1.25"));
    }
}
