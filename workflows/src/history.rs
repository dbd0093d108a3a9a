//! Run history in the Delta table `ops.workflow_runs`: one row per attempt
//! (schema: `schemas::tables::workflow_runs_schema`). The scheduler reads it
//! at start-up to find the runs it missed; operators read it with SQL
//! (`SELECT * FROM ops.workflow_runs`) or `csms workflows list`.
//!
//! Each attempt is its own tiny append commit; at a few runs a day that is
//! nothing, and every [`COMPACT_EVERY`] commits the table is compacted so
//! reads stay cheap over the years. Several nodes append concurrently:
//! appends never conflict in Delta.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, TimeUnit};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use schemas::tables::{OPS_WORKFLOW_RUNS, workflow_runs_schema};

/// Compact the table after every this many commits.
pub const COMPACT_EVERY: u64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("invalid lake URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("ops.workflow_runs at {location}: {reason}")]
    Lake { location: String, reason: String },
}

/// Why a run was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// At its scheduled time.
    Schedule,
    /// Late, for an occurrence missed while no node ran it.
    CatchUp,
    /// By hand (`csms workflows run NAME`).
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch-up",
            Trigger::Manual => "manual",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "schedule" => Trigger::Schedule,
            "catch-up" => Trigger::CatchUp,
            "manual" => Trigger::Manual,
            _ => return None,
        })
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Succeeded,
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt of one run: a row of `ops.workflow_runs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    pub workflow: String,
    /// [`crate::jobs::job_kind`] of the job.
    pub job_kind: String,
    /// The occurrence this run is for (the time itself for manual runs);
    /// all attempts of a run share it.
    pub scheduled_for: DateTime<Utc>,
    pub trigger: Trigger,
    /// 1-based.
    pub attempt: u32,
    pub node_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub status: RunStatus,
    /// No further attempt follows (it succeeded, or retries are exhausted).
    pub is_final: bool,
    /// The job's summary, or the error.
    pub message: Option<String>,
}

/// The run history of a lake. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RunHistory {
    location: String,
    storage_options: HashMap<String, String>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Escapes a string for a SQL literal.
fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl RunHistory {
    /// The history of the lake at `lake_url` (path, `file://` or `s3://`).
    /// Nothing is read or created until used; a missing table reads as an
    /// empty history and is created by the first [`RunHistory::record`].
    pub fn open(
        lake_url: &str,
        storage_options: &HashMap<String, String>,
    ) -> Result<Self, HistoryError> {
        let location =
            schemas::tables::table_location(lake_url, OPS_WORKFLOW_RUNS).map_err(|e| {
                HistoryError::Url {
                    url: e.url,
                    reason: e.reason,
                }
            })?;
        if location.starts_with("s3://") || location.starts_with("s3a://") {
            static REGISTER_S3: std::sync::Once = std::sync::Once::new();
            REGISTER_S3.call_once(|| deltalake::aws::register_handlers(None));
        }
        Ok(RunHistory {
            location,
            storage_options: storage_options.clone(),
        })
    }

    /// Where the table is.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn err(&self, e: impl std::fmt::Display) -> HistoryError {
        HistoryError::Lake {
            location: self.location.clone(),
            reason: e.to_string(),
        }
    }

    fn table(&self) -> Result<DeltaTable, HistoryError> {
        let url = deltalake::ensure_table_uri(&self.location).map_err(|e| self.err(e))?;
        DeltaTableBuilder::from_url(url)
            .map_err(|e| self.err(e))?
            .with_storage_options(self.storage_options.clone())
            .build()
            .map_err(|e| self.err(e))
    }

    async fn load(&self) -> Result<Option<DeltaTable>, HistoryError> {
        let mut table = self.table()?;
        match table.load().await {
            Ok(()) => Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Appends one attempt (creating the table on first use).
    pub async fn record(&self, r: &RunRecord) -> Result<(), HistoryError> {
        let ts = |t: DateTime<Utc>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(vec![micros(t)]).with_timezone("UTC"))
        };
        let s = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v])) };
        let batch = RecordBatch::try_new(
            workflow_runs_schema(),
            vec![
                s(&r.workflow),
                s(&r.job_kind),
                ts(r.scheduled_for),
                s(r.trigger.as_str()),
                Arc::new(Int32Array::from(vec![r.attempt as i32])),
                s(&r.node_id),
                ts(r.started_at),
                ts(r.finished_at),
                s(r.status.as_str()),
                Arc::new(BooleanArray::from(vec![r.is_final])),
                Arc::new(StringArray::from(vec![r.message.clone()])),
            ],
        )
        .map_err(|e| self.err(e))?;
        // An unloaded table is created by the write, a loaded one appended
        // to. Two nodes creating it at once: the loser appends on a retry.
        let mut creating_retried = false;
        let table = loop {
            let (table, creating) = match self.load().await? {
                Some(t) => (t, false),
                None => (self.table()?, true),
            };
            let written = table
                .write(vec![batch.clone()])
                .with_save_mode(SaveMode::Append)
                .with_table_name("workflow_runs")
                .await;
            match written {
                Ok(t) => break t,
                Err(e) if creating && !creating_retried => {
                    tracing::debug!(error = %e, "creating run history raced; appending instead");
                    creating_retried = true;
                }
                Err(e) => return Err(self.err(e)),
            }
        };
        if let Some(v) = table.version()
            && v > 0
            && v % COMPACT_EVERY == 0
        {
            match table.optimize().await {
                Ok((_, m)) => tracing::info!(
                    table = %self.location,
                    files_removed = m.num_files_removed,
                    "compacted run history"
                ),
                Err(e) => {
                    tracing::warn!(table = %self.location, error = %e, "compacting run history failed")
                }
            }
        }
        Ok(())
    }

    /// Rows matching `filter` (SQL over the table as `t`), newest first.
    async fn select(&self, filter: &str, limit: usize) -> Result<Vec<RunRecord>, HistoryError> {
        let Some(table) = self.load().await? else {
            return Ok(Vec::new());
        };
        let ctx = SessionContext::new();
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.err(e))?;
        let provider = table
            .table_provider()
            .with_session(Arc::new(ctx.state()))
            .build()
            .await
            .map_err(|e| self.err(e))?;
        ctx.register_table("t", Arc::new(provider))
            .map_err(|e| self.err(e))?;
        let sql = format!(
            "SELECT * FROM t WHERE {filter} \
             ORDER BY scheduled_for DESC, started_at DESC, attempt DESC LIMIT {limit}"
        );
        let batches = ctx
            .sql(&sql)
            .await
            .map_err(|e| self.err(e))?
            .collect()
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for b in &batches {
            self.rows(b, &mut out)?;
        }
        Ok(out)
    }

    fn rows(&self, b: &RecordBatch, out: &mut Vec<RunRecord>) -> Result<(), HistoryError> {
        fn col<T: Clone + 'static>(
            h: &RunHistory,
            b: &RecordBatch,
            name: &str,
            ty: &DataType,
        ) -> Result<T, HistoryError> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| h.err(format!("missing column {name}")))?;
            let c = cast(c, ty).map_err(|e| h.err(e))?;
            c.as_any()
                .downcast_ref::<T>()
                .cloned()
                .ok_or_else(|| h.err(format!("column {name} has an unexpected type")))
        }
        let utf8 = DataType::Utf8;
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let workflow: StringArray = col(self, b, "workflow", &utf8)?;
        let kind: StringArray = col(self, b, "job_kind", &utf8)?;
        let scheduled: TimestampMicrosecondArray = col(self, b, "scheduled_for", &ts)?;
        let trigger: StringArray = col(self, b, "trigger", &utf8)?;
        let attempt: Int32Array = col(self, b, "attempt", &DataType::Int32)?;
        let node: StringArray = col(self, b, "node_id", &utf8)?;
        let started: TimestampMicrosecondArray = col(self, b, "started_at", &ts)?;
        let finished: TimestampMicrosecondArray = col(self, b, "finished_at", &ts)?;
        let status: StringArray = col(self, b, "status", &utf8)?;
        let fin: BooleanArray = col(self, b, "final", &DataType::Boolean)?;
        let message: StringArray = col(self, b, "message", &utf8)?;
        for i in 0..b.num_rows() {
            out.push(RunRecord {
                workflow: workflow.value(i).to_string(),
                job_kind: kind.value(i).to_string(),
                scheduled_for: from_micros(scheduled.value(i)),
                trigger: Trigger::parse(trigger.value(i))
                    .ok_or_else(|| self.err(format!("unknown trigger {:?}", trigger.value(i))))?,
                attempt: attempt.value(i).max(0) as u32,
                node_id: node.value(i).to_string(),
                started_at: from_micros(started.value(i)),
                finished_at: from_micros(finished.value(i)),
                status: RunStatus::parse(status.value(i))
                    .ok_or_else(|| self.err(format!("unknown status {:?}", status.value(i))))?,
                is_final: fin.value(i),
                message: (!message.is_null(i)).then(|| message.value(i).to_string()),
            });
        }
        Ok(())
    }

    /// The latest final attempt of `workflow`, by `scheduled_for`: when it
    /// was scheduled for and how it ended.
    pub async fn last_final(
        &self,
        workflow: &str,
    ) -> Result<Option<(DateTime<Utc>, RunStatus)>, HistoryError> {
        let rows = self
            .select(
                &format!("workflow = {} AND \"final\"", sql_str(workflow)),
                1,
            )
            .await?;
        Ok(rows.first().map(|r| (r.scheduled_for, r.status)))
    }

    /// As [`RunHistory::last_final`], counting only scheduled and catch-up
    /// runs: what the scheduler catches up from (a manual run is not an
    /// occurrence of the schedule).
    pub async fn last_scheduled_final(
        &self,
        workflow: &str,
    ) -> Result<Option<(DateTime<Utc>, RunStatus)>, HistoryError> {
        let rows = self
            .select(
                &format!(
                    "workflow = {} AND \"final\" AND \"trigger\" <> 'manual'",
                    sql_str(workflow)
                ),
                1,
            )
            .await?;
        Ok(rows.first().map(|r| (r.scheduled_for, r.status)))
    }

    /// The latest `limit` attempts (of one workflow, or of all), newest
    /// first.
    pub async fn recent(
        &self,
        workflow: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, HistoryError> {
        let filter = match workflow {
            Some(w) => format!("workflow = {}", sql_str(w)),
            None => "true".into(),
        };
        self.select(&filter, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn rec(workflow: &str, at: &str, attempt: u32, status: RunStatus, fin: bool) -> RunRecord {
        RunRecord {
            workflow: workflow.into(),
            job_kind: "pipeline".into(),
            scheduled_for: t(at),
            trigger: Trigger::Schedule,
            attempt,
            node_id: "n1".into(),
            started_at: t(at) + chrono::Duration::seconds(attempt as i64),
            finished_at: t(at) + chrono::Duration::seconds(attempt as i64 + 1),
            status,
            is_final: fin,
            message: Some(format!("attempt {attempt}")),
        }
    }

    #[tokio::test]
    async fn missing_table_is_empty_and_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let h = RunHistory::open(dir.path().to_str().unwrap(), &HashMap::new()).unwrap();
        assert!(h.recent(None, 10).await.unwrap().is_empty());
        assert_eq!(h.last_final("a").await.unwrap(), None);

        let mut first = rec("a", "2027-02-27T00:15:00Z", 1, RunStatus::Failed, false);
        first.message = None;
        let second = rec("a", "2027-02-27T00:15:00Z", 2, RunStatus::Succeeded, true);
        let mut manual = rec(
            "a",
            "2027-02-28T09:00:00.123456Z",
            1,
            RunStatus::Failed,
            true,
        );
        manual.trigger = Trigger::Manual;
        let other = rec(
            "o'brien",
            "2027-03-01T00:00:00Z",
            1,
            RunStatus::Succeeded,
            true,
        );
        for r in [&first, &second, &manual, &other] {
            h.record(r).await.unwrap();
        }
        assert!(dir.path().join("ops/workflow_runs/_delta_log").is_dir());

        let all = h.recent(None, 10).await.unwrap();
        assert_eq!(
            all,
            vec![other.clone(), manual.clone(), second.clone(), first.clone()]
        );
        assert_eq!(
            h.recent(Some("a"), 2).await.unwrap(),
            vec![manual.clone(), second]
        );
        assert_eq!(h.recent(Some("o'brien"), 5).await.unwrap(), vec![other]);
        assert_eq!(
            h.last_final("a").await.unwrap(),
            Some((manual.scheduled_for, RunStatus::Failed))
        );
        assert_eq!(
            h.last_scheduled_final("a").await.unwrap(),
            Some((t("2027-02-27T00:15:00Z"), RunStatus::Succeeded))
        );
        assert_eq!(h.last_final("nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn concurrent_appends_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let h = RunHistory::open(dir.path().to_str().unwrap(), &HashMap::new()).unwrap();
        h.record(&rec(
            "w",
            "2027-01-01T00:00:00Z",
            1,
            RunStatus::Succeeded,
            true,
        ))
        .await
        .unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move {
                    let at = format!("2027-01-0{}T00:00:00Z", i + 2);
                    h.record(&rec("w", &at, 1, RunStatus::Succeeded, true))
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(h.recent(Some("w"), 100).await.unwrap().len(), 5);
    }

    #[test]
    fn bad_lake_url_is_refused() {
        assert!(matches!(
            RunHistory::open("file://elsewhere/lake", &HashMap::new()),
            Err(HistoryError::Url { .. })
        ));
    }
}
