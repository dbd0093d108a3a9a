//! Running one job of any kind, once (the scheduler adds leases, retries and
//! history around it). Each returns a one-line summary for the run history.

use chrono::{DateTime, Datelike, Months, Utc};

use crate::context::{JobContext, JobError};
use crate::definition::{JobSpec, ReportJob, ReportKind, ReportMonth};

/// Default of `retention_hours` for `lake-vacuum`: Delta's minimum.
pub const DEFAULT_VACUUM_HOURS: u64 = 168;

/// The `kind` of a job, as written in its file and in the run history.
pub fn job_kind(spec: &JobSpec) -> &'static str {
    match spec {
        JobSpec::Pipeline { .. } => "pipeline",
        JobSpec::Report(_) => "report",
        JobSpec::Digest(_) => "digest",
        JobSpec::LakeOptimize {} => "lake-optimize",
        JobSpec::LakeVacuum { .. } => "lake-vacuum",
        JobSpec::LakeRetention { .. } => "lake-retention",
        JobSpec::Command(_) => "command",
    }
}

/// The `YYYY-MM` a report covers when scheduled for `at`.
pub fn report_month(month: ReportMonth, at: DateTime<Utc>) -> String {
    let date = at.date_naive();
    let date = match month {
        ReportMonth::Current => date,
        ReportMonth::Previous => date
            .with_day(1)
            .and_then(|d| d.checked_sub_months(Months::new(1)))
            .unwrap_or(date),
    };
    format!("{:04}-{:02}", date.year(), date.month())
}

/// Cancels its token when dropped: a job future dropped (timed out, or the
/// scheduler stopping) stops the pipeline run it started.
struct CancelOnDrop(tokio_util::sync::CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn run_pipeline(ctx: &JobContext, stage: pipeline::Stage) -> Result<String, JobError> {
    let opts = pipeline::RunOptions {
        stage,
        from: None,
        to: None,
    };
    // `pipeline::run`'s future is not `Send` (it borrows `&dyn Fn`
    // progress callbacks), so it is driven on a blocking thread of its own;
    // the DataFusion work it spawns still runs on the shared runtime.
    let (lake, config) = (ctx.lake_url.clone(), ctx.pipeline.clone());
    let runtime = tokio::runtime::Handle::current();
    let cancel = CancelOnDrop(tokio_util::sync::CancellationToken::new());
    let token = cancel.0.clone();
    let run = tokio::task::spawn_blocking(move || {
        runtime.block_on(async {
            tokio::select! {
                r = pipeline::run(&lake, &config, &opts, &|_| {}) => Some(r),
                _ = token.cancelled() => None,
            }
        })
    });
    let summary = match run.await {
        Ok(Some(r)) => r?,
        Ok(None) => return Err(JobError::Failed("pipeline run cancelled".into())),
        Err(e) => return Err(JobError::Failed(format!("pipeline run aborted: {e}"))),
    };
    drop(cancel);
    let rows: u64 = summary.tables.iter().map(|t| t.rows_out).sum();
    Ok(format!(
        "pipeline {stage}: {} tables, {rows} rows written in {:.1} s",
        summary.tables.len(),
        summary.seconds
    ))
}

async fn run_report(
    ctx: &JobContext,
    job: &ReportJob,
    scheduled_for: DateTime<Utc>,
) -> Result<String, JobError> {
    let ReportKind::FaultRanking = job.report;
    let month = report_month(job.month, scheduled_for);
    let refreshed = if job.refresh {
        format!("{}; ", run_pipeline(ctx, pipeline::Stage::All).await?)
    } else {
        String::new()
    };
    let report = crate::load_fault_ranking(
        &ctx.lake_url,
        &ctx.storage_options,
        &month,
        ctx.pipeline.fault_threshold,
    )
    .await?;
    let rendered = crate::render_fault_ranking(&report)?;
    let stations = report.rows.len();
    if !job.recipients.is_empty() && ctx.smtp.url.is_some() {
        crate::send(&rendered, &ctx.smtp, &job.recipients).await?;
        return Ok(format!(
            "{refreshed}fault ranking {month}: {stations} station(s), mailed to {}",
            job.recipients.join(", ")
        ));
    }
    let dir = ctx.report_dir.join(format!("fault-ranking-{month}"));
    crate::write_to_dir(&rendered, &dir, &ctx.smtp, &job.recipients)?;
    let why = if job.recipients.is_empty() {
        "no recipients"
    } else {
        // Not an error (the report exists), but the recipients get nothing:
        // say so where the operator looks.
        tracing::warn!(
            month,
            dir = %dir.display(),
            "SMTP_URL is not set: the fault-ranking report was written to a folder, not mailed"
        );
        "SMTP_URL not set, not mailed"
    };
    Ok(format!(
        "{refreshed}fault ranking {month}: {stations} station(s), written to {} ({why})",
        dir.display()
    ))
}

/// Runs `spec` once for the occurrence `scheduled_for` (which picks the
/// report month) and returns a one-line summary.
pub async fn run_job(
    ctx: &JobContext,
    spec: &JobSpec,
    scheduled_for: DateTime<Utc>,
) -> Result<String, JobError> {
    match spec {
        JobSpec::Pipeline { stage } => run_pipeline(ctx, (*stage).into()).await,
        JobSpec::Report(job) => run_report(ctx, job, scheduled_for).await,
        JobSpec::Digest(job) => crate::digest::run_digest(ctx, job, scheduled_for).await,
        JobSpec::Command(job) => crate::commands::run_command_job(ctx, job).await,
        JobSpec::LakeOptimize {} => {
            let s = ingest::lake::optimize(&ctx.lake_url, &ctx.storage_options).await?;
            Ok(format!(
                "bronze optimized: {} files added, {} removed, {} partitions",
                s.files_added, s.files_removed, s.partitions_optimized
            ))
        }
        JobSpec::LakeVacuum { retention_hours } => {
            let hours = retention_hours.unwrap_or(DEFAULT_VACUUM_HOURS);
            let s = ingest::lake::vacuum(&ctx.lake_url, hours, &ctx.storage_options).await?;
            Ok(format!(
                "bronze vacuumed: {} files deleted (retention {hours} h)",
                s.files_deleted
            ))
        }
        JobSpec::LakeRetention { days } => {
            let n =
                ingest::lake::apply_retention(&ctx.lake_url, *days, &ctx.storage_options).await?;
            Ok(format!("bronze retention {days} days: {n} files removed"))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;
    use crate::definition::PipelineStage;

    pub(crate) fn ctx(lake: &std::path::Path, report_dir: &std::path::Path) -> JobContext {
        JobContext {
            node_id: "n1".into(),
            lake_url: lake.to_str().unwrap().to_string(),
            storage_options: HashMap::new(),
            pipeline: pipeline::PipelineConfig::default(),
            smtp: crate::SmtpConfig::default(),
            status: None,
            commands: None,
            report_dir: report_dir.to_path_buf(),
            clock: Arc::new(ManualClock::new("2027-01-01T00:00:00Z".parse().unwrap())),
        }
    }

    #[test]
    fn report_month_current_and_previous() {
        let at: DateTime<Utc> = "2027-03-31T20:00:00Z".parse().unwrap();
        assert_eq!(report_month(ReportMonth::Current, at), "2027-03");
        assert_eq!(report_month(ReportMonth::Previous, at), "2027-02");
        let jan: DateTime<Utc> = "2027-01-01T06:00:00Z".parse().unwrap();
        assert_eq!(report_month(ReportMonth::Previous, jan), "2026-12");
    }

    #[tokio::test]
    async fn jobs_on_an_empty_lake() {
        let lake = tempfile::tempdir().unwrap();
        let reports = tempfile::tempdir().unwrap();
        let c = ctx(lake.path(), reports.path());
        let at = "2027-02-28T20:00:00Z".parse().unwrap();
        let s = run_job(&c, &JobSpec::LakeOptimize {}, at).await.unwrap();
        assert!(s.contains("0 files added"), "{s}");
        let s = run_job(
            &c,
            &JobSpec::LakeVacuum {
                retention_hours: None,
            },
            at,
        )
        .await
        .unwrap();
        assert!(s.contains("retention 168 h"), "{s}");
        let s = run_job(&c, &JobSpec::LakeRetention { days: 30 }, at)
            .await
            .unwrap();
        assert!(s.contains("0 files removed"), "{s}");
        let s = run_job(
            &c,
            &JobSpec::Pipeline {
                stage: PipelineStage::Gold,
            },
            at,
        )
        .await
        .unwrap();
        assert!(s.starts_with("pipeline gold:"), "{s}");
        // A report with recipients but no SMTP: written to the folder.
        let job = JobSpec::Report(ReportJob {
            report: ReportKind::FaultRanking,
            month: ReportMonth::Current,
            recipients: vec!["m@example.com".into()],
            refresh: true,
        });
        let s = run_job(&c, &job, at).await.unwrap();
        assert!(s.contains("fault ranking 2027-02: 0 station(s)"), "{s}");
        assert!(
            s.contains("SMTP_URL not set") && s.starts_with("pipeline all"),
            "{s}"
        );
        let dir = reports.path().join("fault-ranking-2027-02");
        let eml = std::fs::read_to_string(dir.join("report.eml")).unwrap();
        assert!(eml.contains("m@example.com"), "{eml}");
    }

    #[tokio::test]
    async fn lake_job_against_a_bad_lake_fails() {
        let reports = tempfile::tempdir().unwrap();
        let mut c = ctx(reports.path(), reports.path());
        c.lake_url = "file://elsewhere/lake".into();
        let at = "2027-02-28T20:00:00Z".parse().unwrap();
        let e = run_job(&c, &JobSpec::LakeRetention { days: 3 }, at)
            .await
            .unwrap_err();
        assert!(matches!(e, JobError::Lake(_)), "{e}");
    }
}
