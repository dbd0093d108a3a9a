//! Moves sealed WAL segments into `bronze.ocpp_messages` (Delta Lake),
//! exactly once, and maintains the table (optimize, vacuum, retention).
//!
//! # Exactly once
//! Every commit carries, in the same Delta commit as its data files, an
//! application transaction (`txn` action) with app id `csms-bronze-{node_id}`
//! and version = the highest WAL seq it contains. Before each commit the
//! writer re-reads that version from the log and skips records at or below
//! it, and only deletes WAL segments after the commit. A crash between commit
//! and deletion therefore replays nothing twice; a crash before the commit
//! replays everything.
//!
//! # Object storage (s3://)
//! delta-rs 1.x with object_store 0.13 commits to S3 with conditional put
//! (`If-None-Match: *` on the next `_delta_log` entry), which is safe for
//! any number of concurrent writers without a lock service, provided the
//! store supports conditional writes (AWS S3 since 2024, MinIO, moto, R2).
//! Do **not** set `AWS_S3_ALLOW_UNSAFE_RENAME=true` with several nodes: it
//! switches to a non-atomic rename commit. Use `AWS_S3_LOCKING_PROVIDER=dynamodb`
//! only for stores without conditional put. Other useful storage options:
//! `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ALLOW_HTTP=true` (plain-HTTP test
//! servers), `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`. Conflicts between
//! nodes (blind appends with different app ids) are resolved by delta-rs's
//! own commit retry; anything left over is retried here with backoff.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use deltalake::arrow::array::{
    ArrayRef, Date32Array, Int8Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::StructType;
use deltalake::kernel::Transaction;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::logstore::LogStore;
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError, TableProperty};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::wal::{self, SegmentInfo, WalError, WalHandle, WalRecord};

/// The bronze table's path under the lake root.
pub use schemas::tables::BRONZE_OCPP_MESSAGES as BRONZE_TABLE;

/// Lake writer and maintenance settings.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct LakeConfig {
    /// Seal the WAL and commit at least this often (seconds).
    pub flush_interval_secs: u64,
    /// Flush early once this many records wait; also the most rows per commit.
    pub flush_rows: usize,
    /// `delta.checkpointInterval` of a newly created bronze table.
    pub checkpoint_interval: u64,
    /// Delete bronze rows older than this many days (by `date`), if set.
    pub retention_days: Option<u32>,
    /// Vacuum keeps unreferenced files this long (readers may still use them).
    pub vacuum_retention_hours: u64,
    /// object_store / delta-rs storage options (see the module docs).
    pub storage_options: HashMap<String, String>,
}

impl Default for LakeConfig {
    fn default() -> Self {
        LakeConfig {
            flush_interval_secs: 10,
            flush_rows: 200_000,
            checkpoint_interval: 20,
            retention_days: None,
            vacuum_retention_hours: 168,
            storage_options: HashMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("invalid lake URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error("building bronze batch: {0}")]
    Arrow(#[from] ArrowError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("background task failed: {0}")]
    Task(String),
}

/// What [`optimize`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptimizeSummary {
    pub files_added: u64,
    pub files_removed: u64,
    pub partitions_optimized: u64,
}

/// What [`vacuum`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumSummary {
    pub files_deleted: usize,
}

/// The bronze schema, defined once in `schemas::tables`.
pub use schemas::tables::bronze_schema;

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The payload element of a CALL / SEND (`[t, id, action, payload]`) or
/// CALLRESULT (`[3, id, payload]`), as its exact JSON text; `None` for errors
/// and frames that do not parse.
fn extract_payload(message_type: u8, raw: &str) -> Option<String> {
    let index = match message_type {
        2 | 6 => 3,
        3 => 2,
        _ => return None,
    };
    let parts: Vec<&RawValue> = serde_json::from_str(raw).ok()?;
    parts.get(index).map(|v| v.get().to_string())
}

/// Builds one bronze batch from WAL records.
pub fn bronze_batch(node_id: &str, rows: &[(u64, WalRecord)]) -> Result<RecordBatch, ArrowError> {
    let received: Vec<i64> = rows.iter().map(|(_, r)| r.received_at_us).collect();
    let date: Vec<i32> = rows
        .iter()
        .map(|(_, r)| r.received_at_us.div_euclid(MICROS_PER_DAY) as i32)
        .collect();
    let str_col = |f: &dyn Fn(&WalRecord) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(_, r)| f(r)),
        ))
    };
    let opt_col = |f: &dyn Fn(&WalRecord) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(|(_, r)| f(r)).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMicrosecondArray::from(received).with_timezone("UTC")),
        Arc::new(Date32Array::from(date)),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| node_id))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|(s, _)| *s as i64),
        )),
        str_col(&|r| &r.station_id),
        str_col(&|r| r.version.as_str()),
        str_col(&|r| r.direction.as_str()),
        Arc::new(Int8Array::from_iter_values(
            rows.iter().map(|(_, r)| r.message_type as i8),
        )),
        str_col(&|r| &r.message_id),
        opt_col(&|r| r.action.as_deref()),
        Arc::new(
            rows.iter()
                .map(|(_, r)| extract_payload(r.message_type, &r.raw))
                .collect::<StringArray>(),
        ),
        opt_col(&|r| r.error_code.as_deref()),
        opt_col(&|r| r.error_description.as_deref()),
        str_col(&|r| &r.raw),
    ];
    RecordBatch::try_new(bronze_schema(), columns)
}

static REGISTER_S3: Once = Once::new();

/// The location of `table` under the lake root (the rule shared with the
/// pipeline and readers, `schemas::tables::table_location`); registers the
/// S3 object store handlers first when the lake is on S3.
fn table_location(lake_url: &str, table: &str) -> Result<String, LakeError> {
    let location =
        schemas::tables::table_location(lake_url, table).map_err(|e| LakeError::Url {
            url: e.url,
            reason: e.reason,
        })?;
    if location.starts_with("s3://") || location.starts_with("s3a://") {
        REGISTER_S3.call_once(|| deltalake::aws::register_handlers(None));
    }
    Ok(location)
}

fn delta_err(table: &str) -> impl Fn(DeltaTableError) -> LakeError + '_ {
    move |source| LakeError::Delta {
        table: table.to_string(),
        source,
    }
}

/// Loads a table at `location` (not creating it); `None` if it does not exist.
async fn load_table(
    location: &str,
    storage_options: &HashMap<String, String>,
) -> Result<Option<DeltaTable>, LakeError> {
    let url = deltalake::ensure_table_uri(location).map_err(delta_err(location))?;
    let mut table = DeltaTableBuilder::from_url(url)
        .map_err(delta_err(location))?
        .with_storage_options(storage_options.clone())
        .build()
        .map_err(delta_err(location))?;
    match table.load().await {
        Ok(()) => Ok(Some(table)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(e) => Err(delta_err(location)(e)),
    }
}

/// Opens bronze, creating it (partitioned by `date`) when missing. Another
/// node may create it at the same moment; then its table is used.
async fn open_or_create_bronze(
    location: &str,
    storage_options: &HashMap<String, String>,
    checkpoint_interval: u64,
) -> Result<DeltaTable, LakeError> {
    if let Some(table) = load_table(location, storage_options).await? {
        return Ok(table);
    }
    let url = deltalake::ensure_table_uri(location).map_err(delta_err(location))?;
    let blank = DeltaTableBuilder::from_url(url)
        .map_err(delta_err(location))?
        .with_storage_options(storage_options.clone())
        .build()
        .map_err(delta_err(location))?;
    let columns: StructType = bronze_schema().as_ref().try_into_kernel()?;
    let created = blank
        .create()
        .with_table_name("ocpp_messages")
        .with_comment(
            "bronze.ocpp_messages: every OCPP frame, both directions, as received or sent",
        )
        .with_columns(columns.fields().cloned())
        .with_partition_columns(["date"])
        .with_configuration_property(
            TableProperty::CheckpointInterval,
            Some(checkpoint_interval.max(1).to_string()),
        )
        .with_save_mode(SaveMode::Ignore)
        .await;
    match created {
        Ok(table) => {
            tracing::info!(table = location, "created bronze table");
            Ok(table)
        }
        Err(e) => match load_table(location, storage_options).await? {
            Some(table) => Ok(table),
            None => Err(delta_err(location)(e)),
        },
    }
}

/// Moves WAL segments into bronze.
pub struct LakeWriter {
    lake_url: String,
    table: DeltaTable,
    location: String,
    node_id: String,
    app_id: String,
    wal_dir: PathBuf,
    wal: WalHandle,
    config: LakeConfig,
    committed_seq: u64,
}

impl LakeWriter {
    /// Opens (creating if needed) bronze, reads this node's committed WAL seq
    /// (app transaction `csms-bronze-{node_id}`), raises the WAL's next seq
    /// above it, deletes fully committed segments and returns the committed
    /// seq.
    pub async fn open(
        lake_url: &str,
        node_id: &str,
        wal_dir: &Path,
        wal: WalHandle,
        config: LakeConfig,
    ) -> Result<(LakeWriter, u64), LakeError> {
        let location = table_location(lake_url, BRONZE_TABLE)?;
        let table = open_or_create_bronze(
            &location,
            &config.storage_options,
            config.checkpoint_interval,
        )
        .await?;
        let mut writer = LakeWriter {
            lake_url: lake_url.to_string(),
            table,
            location,
            node_id: node_id.to_string(),
            app_id: format!("csms-bronze-{node_id}"),
            wal_dir: wal_dir.to_path_buf(),
            wal,
            config,
            committed_seq: 0,
        };
        writer.read_committed_seq().await?;
        let committed = writer.committed_seq;
        writer.wal.ensure_next_seq_at_least(committed + 1).await?;
        for seg in writer.wal.sealed_segments() {
            if seg.max_seq <= committed {
                writer.wal.remove_segment(seg.first_seq)?;
            }
        }
        tracing::info!(table = %writer.location, node_id, committed_seq = committed, wal_dir = %writer.wal_dir.display(), "lake writer open");
        Ok((writer, committed))
    }

    /// The highest WAL seq of this node that bronze holds.
    pub fn committed_seq(&self) -> u64 {
        self.committed_seq
    }

    /// Refreshes the table and this node's app transaction version.
    async fn read_committed_seq(&mut self) -> Result<u64, LakeError> {
        let err = delta_err(&self.location);
        if self.table.version().is_some() {
            self.table.update_incremental(None).await.map_err(&err)?;
        } else {
            self.table.load().await.map_err(&err)?;
        }
        let log_store = self.table.log_store();
        let version = self
            .table
            .snapshot()
            .map_err(&err)?
            .transaction_version(log_store.as_ref(), &self.app_id)
            .await
            .map_err(&err)?;
        let seq = version.map(|v| v.max(0) as u64).unwrap_or(0);
        self.committed_seq = self.committed_seq.max(seq);
        Ok(self.committed_seq)
    }

    /// Runs until `shutdown`: flushes every `flush_interval_secs` or when
    /// `flush_rows` records wait; on failure logs, counts and retries with
    /// exponential backoff (the WAL keeps growing meanwhile). One last flush
    /// is attempted at shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let interval = Duration::from_secs(self.config.flush_interval_secs.max(1));
        let tick = interval.min(Duration::from_secs(1));
        let mut next_flush = Instant::now() + interval;
        let mut backoff = Duration::from_secs(1);
        // Retention runs a minute after start, then daily.
        let mut next_retention = Instant::now() + Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
            if let Some(days) = self.config.retention_days
                && Instant::now() >= next_retention
            {
                next_retention = Instant::now() + Duration::from_secs(24 * 3600);
                match apply_retention(&self.lake_url, days, &self.config.storage_options).await {
                    Ok(files) => tracing::info!(days, files, "bronze retention applied"),
                    Err(e) => {
                        tracing::warn!(error = %e, days, "bronze retention failed; retrying tomorrow")
                    }
                }
            }
            let stats = self.wal.stats();
            let age = stats
                .oldest_unflushed_us
                .map(|us| (chrono::Utc::now().timestamp_micros() - us).max(0) as f64 / 1e6)
                .unwrap_or(0.0);
            metrics::gauge!("csms_lake_backlog_age_seconds").set(age);
            let waiting = stats.last_durable_seq.saturating_sub(self.committed_seq);
            if Instant::now() < next_flush && (waiting as usize) < self.config.flush_rows {
                continue;
            }
            match self.flush_once().await {
                Ok(_) => {
                    backoff = Duration::from_secs(1);
                    next_flush = Instant::now() + interval;
                }
                Err(e) => {
                    metrics::counter!("csms_lake_commit_failures_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, "lake flush failed; WAL keeps the data");
                    next_flush = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
        }
        if let Err(e) = self.flush_once().await {
            metrics::counter!("csms_lake_commit_failures_total").increment(1);
            tracing::warn!(error = %e, "final lake flush at shutdown failed; the WAL keeps the data for the next start");
        }
    }

    /// One flush now: seals the WAL, commits every sealed segment (in groups
    /// of about `flush_rows` rows) and deletes them. Returns rows committed.
    pub async fn flush_once(&mut self) -> Result<usize, LakeError> {
        self.wal.seal().await?;
        let segments = self.wal.sealed_segments();
        if segments.is_empty() {
            return Ok(0);
        }
        self.read_committed_seq().await?;
        let mut total = 0;
        let mut group: Vec<SegmentInfo> = Vec::new();
        let mut rows: Vec<(u64, WalRecord)> = Vec::new();
        for seg in segments {
            if seg.max_seq > self.committed_seq {
                let path = seg.path.clone();
                let (records, corrupt) =
                    tokio::task::spawn_blocking(move || wal::read_segment_lossy(&path))
                        .await
                        .map_err(|e| LakeError::Task(e.to_string()))??;
                if let Some(corrupt) = corrupt {
                    keep_corrupt_copy(&seg.path, &corrupt);
                }
                let committed = self.committed_seq;
                rows.extend(records.into_iter().filter(|(seq, _)| *seq > committed));
            }
            group.push(seg);
            if rows.len() >= self.config.flush_rows.max(1) {
                total += self.commit_group(&mut group, &mut rows).await?;
            }
        }
        if !group.is_empty() {
            total += self.commit_group(&mut group, &mut rows).await?;
        }
        Ok(total)
    }

    /// Commits `rows` with the app transaction in the same commit, then
    /// deletes the segments they came from.
    async fn commit_group(
        &mut self,
        group: &mut Vec<SegmentInfo>,
        rows: &mut Vec<(u64, WalRecord)>,
    ) -> Result<usize, LakeError> {
        let count = rows.len();
        if let Some(max_seq) = rows.iter().map(|(s, _)| *s).max() {
            let batch = bronze_batch(&self.node_id, rows)?;
            let started = Instant::now();
            let commit = CommitProperties::default()
                .with_application_transaction(Transaction::new(&self.app_id, max_seq as i64));
            let table = self
                .table
                .clone()
                .write(vec![batch])
                .with_save_mode(SaveMode::Append)
                .with_partition_columns(["date"])
                .with_commit_properties(commit)
                .await
                .map_err(delta_err(&self.location))?;
            metrics::histogram!("csms_lake_commit_seconds").record(started.elapsed().as_secs_f64());
            metrics::counter!("csms_lake_rows_total").increment(count as u64);
            if let Some(version) = table.version() {
                match table.log_store().read_commit_entry(version).await {
                    Ok(Some(bytes)) => {
                        let files = bytes
                            .split(|b| *b == b'\n')
                            .filter(|l| l.starts_with(b"{\"add\""))
                            .count();
                        metrics::counter!("csms_lake_files_total").increment(files as u64);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "could not read back the commit to count files")
                    }
                }
            }
            self.table = table;
            self.committed_seq = self.committed_seq.max(max_seq);
            tracing::debug!(rows = count, max_seq, "committed WAL records to bronze");
        }
        for seg in group.drain(..) {
            self.wal.remove_segment(seg.first_seq)?;
        }
        rows.clear();
        Ok(count)
    }
}

/// A sealed segment with a damaged record: its readable prefix goes to the
/// lake (so one bad segment cannot stall the node), and a copy is kept as
/// `<segment>.corrupt` beside it for inspection before the segment is removed.
fn keep_corrupt_copy(path: &Path, corrupt: &WalError) {
    metrics::counter!("csms_lake_corrupt_segments_total").increment(1);
    let mut copy = path.as_os_str().to_owned();
    copy.push(".corrupt");
    let copy = PathBuf::from(copy);
    let kept = if copy.exists() {
        Ok(0)
    } else {
        std::fs::copy(path, &copy)
    };
    tracing::error!(
        error = %corrupt,
        copy = %copy.display(),
        copy_ok = kept.is_ok(),
        "corrupt WAL segment: committing its readable prefix, the rest is lost"
    );
}

/// Compacts small files of bronze (delta-rs optimize, bin-packing).
pub async fn optimize(
    lake_url: &str,
    storage_options: &HashMap<String, String>,
) -> Result<OptimizeSummary, LakeError> {
    let location = table_location(lake_url, BRONZE_TABLE)?;
    let Some(table) = load_table(&location, storage_options).await? else {
        return Ok(OptimizeSummary {
            files_added: 0,
            files_removed: 0,
            partitions_optimized: 0,
        });
    };
    let (_, m) = table.optimize().await.map_err(delta_err(&location))?;
    tracing::info!(
        table = location,
        files_added = m.num_files_added,
        files_removed = m.num_files_removed,
        "optimized"
    );
    Ok(OptimizeSummary {
        files_added: m.num_files_added,
        files_removed: m.num_files_removed,
        partitions_optimized: m.partitions_optimized,
    })
}

/// Deletes files no longer referenced by bronze and older than
/// `retention_hours` (full mode: also files of failed commits). Retention
/// below the table's `deletedFileRetentionDuration` (7 days) is refused by
/// delta-rs, since readers may still use those files.
pub async fn vacuum(
    lake_url: &str,
    retention_hours: u64,
    storage_options: &HashMap<String, String>,
) -> Result<VacuumSummary, LakeError> {
    let location = table_location(lake_url, BRONZE_TABLE)?;
    let Some(table) = load_table(&location, storage_options).await? else {
        return Ok(VacuumSummary { files_deleted: 0 });
    };
    let (_, m) = table
        .vacuum()
        .with_retention_period(chrono::Duration::hours(retention_hours as i64))
        .with_mode(VacuumMode::Full)
        .await
        .map_err(delta_err(&location))?;
    tracing::info!(
        table = location,
        files_deleted = m.files_deleted.len(),
        "vacuumed"
    );
    Ok(VacuumSummary {
        files_deleted: m.files_deleted.len(),
    })
}

/// Deletes bronze rows whose `date` is more than `days` days before today
/// (UTC). The predicate is on the partition column, so whole files are
/// removed without rewriting. Returns the number of data files removed.
pub async fn apply_retention(
    lake_url: &str,
    days: u32,
    storage_options: &HashMap<String, String>,
) -> Result<usize, LakeError> {
    use deltalake::datafusion::prelude::{col, lit};
    use deltalake::datafusion::scalar::ScalarValue;

    let location = table_location(lake_url, BRONZE_TABLE)?;
    let Some(table) = load_table(&location, storage_options).await? else {
        return Ok(0);
    };
    let today = chrono::Utc::now()
        .timestamp_micros()
        .div_euclid(MICROS_PER_DAY) as i32;
    let cutoff = today - days as i32;
    let (_, m) = table
        .delete()
        .with_predicate(col("date").lt(lit(ScalarValue::Date32(Some(cutoff)))))
        .await
        .map_err(delta_err(&location))?;
    tracing::info!(
        table = location,
        days,
        files_removed = m.num_removed_files,
        "applied bronze retention"
    );
    Ok(m.num_removed_files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{Direction, Wal, WalConfig};
    use deltalake::arrow::array::Array;
    use deltalake::datafusion::prelude::SessionContext;
    use schemas::OcppVersion;

    fn rec(i: usize) -> WalRecord {
        let day = 1_767_225_600_000_000i64; // 2026-01-01T00:00:00Z
        let (message_type, raw, action, error_code) = match i % 3 {
            0 => (
                2,
                format!(r#"[2,"m{i}","Heartbeat",{{"n":{i}}}]"#),
                Some("Heartbeat".to_string()),
                None,
            ),
            1 => (
                3,
                format!(r#"[3,"m{i}",{{"currentTime":"2026-01-01T00:00:00Z"}}]"#),
                Some("Heartbeat".to_string()),
                None,
            ),
            _ => (
                4,
                format!(r#"[4,"m{i}","InternalError","boom",{{}}]"#),
                Some("Heartbeat".to_string()),
                Some("InternalError".to_string()),
            ),
        };
        WalRecord {
            // Two dates: records spread over 2026-01-01 and 2026-01-02.
            received_at_us: day + (i as i64 % 2) * MICROS_PER_DAY + i as i64,
            station_id: format!("CP{}", i % 5),
            version: OcppVersion::V201,
            direction: if i.is_multiple_of(2) {
                Direction::CsToCsms
            } else {
                Direction::CsmsToCs
            },
            message_type,
            message_id: format!("m{i}"),
            action,
            error_code,
            error_description: None,
            raw,
        }
    }

    fn wal_config() -> WalConfig {
        WalConfig {
            commit_window_us: 0,
            ..WalConfig::default()
        }
    }

    async fn query(lake: &Path, sql: &str) -> Vec<RecordBatch> {
        let location = table_location(lake.to_str().unwrap(), BRONZE_TABLE).unwrap();
        let table = load_table(&location, &HashMap::new())
            .await
            .unwrap()
            .unwrap();
        let ctx = SessionContext::new();
        table.update_datafusion_session(&ctx.state()).unwrap();
        ctx.register_table("bronze", table.table_provider().await.unwrap())
            .unwrap();
        ctx.sql(sql).await.unwrap().collect().await.unwrap()
    }

    async fn count(lake: &Path, sql: &str) -> i64 {
        let batches = query(lake, sql).await;
        batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    }

    #[test]
    fn payload_extraction() {
        assert_eq!(
            extract_payload(2, r#"[2, "a", "Boot", {"x": [1, 2]}]"#).as_deref(),
            Some(r#"{"x": [1, 2]}"#)
        );
        assert_eq!(extract_payload(3, r#"[3,"a",{}]"#).as_deref(), Some("{}"));
        assert_eq!(
            extract_payload(6, r#"[6,"a","NotifyPeriodicEventStream",{"d":1}]"#).as_deref(),
            Some(r#"{"d":1}"#)
        );
        assert_eq!(extract_payload(4, r#"[4,"a","X","y",{}]"#), None);
        assert_eq!(extract_payload(0, "not json"), None);
        assert_eq!(extract_payload(2, r#"[2,"a"]"#), None);
    }

    #[test]
    fn batch_matches_schema() {
        let rows: Vec<(u64, WalRecord)> = (0..6).map(|i| (i as u64 + 1, rec(i))).collect();
        let batch = bronze_batch("node-a", &rows).unwrap();
        assert_eq!(batch.num_rows(), 6);
        assert_eq!(batch.schema(), bronze_schema());
        let dates = batch
            .column(1)
            .as_any()
            .downcast_ref::<Date32Array>()
            .unwrap();
        assert_eq!(dates.value(0), 20454); // 2026-01-01
        assert_eq!(dates.value(1), 20455);
        let payload = batch
            .column(10)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(payload.value(0), r#"{"n":0}"#);
        assert!(payload.is_null(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_to_bronze_exactly_once() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("lake");
        let wal_dir = tmp.path().join("wal");
        let (wal, h) = Wal::open(&wal_dir, wal_config()).unwrap();
        let (mut writer, committed) = LakeWriter::open(
            lake.to_str().unwrap(),
            "node-a",
            &wal_dir,
            h.clone(),
            LakeConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(committed, 0);
        h.append((0..30).map(rec).collect()).await.unwrap();
        assert_eq!(writer.flush_once().await.unwrap(), 30);
        assert_eq!(writer.flush_once().await.unwrap(), 0, "nothing new");
        assert_eq!(
            h.stats().sealed_segments,
            0,
            "committed segments are deleted"
        );
        assert_eq!(count(&lake, "select count(*) from bronze").await, 30);
        assert_eq!(
            count(
                &lake,
                "select count(distinct wal_seq) from bronze where node_id = 'node-a'"
            )
            .await,
            30
        );
        assert_eq!(
            count(&lake, "select count(*) from bronze where payload is null").await,
            10
        );
        assert_eq!(
            count(
                &lake,
                "select count(*) from bronze where date = DATE '2026-01-02'"
            )
            .await,
            15
        );
        assert_eq!(
            count(&lake, "select count(*) from bronze where ocpp_version = '2.0.1' and direction = 'cs_to_csms' and message_type = 2").await,
            5
        );
        let batches = query(&lake, "select * from bronze limit 1").await;
        let names: Vec<String> = batches[0]
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let expected: Vec<String> = bronze_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut sorted_names = names.clone();
        sorted_names.sort();
        let mut sorted_expected = expected.clone();
        sorted_expected.sort();
        assert_eq!(sorted_names, sorted_expected);

        // Crash between commit and segment deletion: commit by hand with the
        // app transaction, keep the segment, reopen.
        h.append((30..40).map(rec).collect()).await.unwrap();
        h.seal().await.unwrap().unwrap();
        let seg = h.sealed_segments().pop().unwrap();
        let rows = wal::read_segment(&seg.path).unwrap();
        let max_seq = rows.last().unwrap().0;
        let batch = bronze_batch("node-a", &rows).unwrap();
        writer
            .table
            .clone()
            .write(vec![batch])
            .with_partition_columns(["date"])
            .with_commit_properties(CommitProperties::default().with_application_transaction(
                Transaction::new("csms-bronze-node-a", max_seq as i64),
            ))
            .await
            .unwrap();
        drop(writer);
        let (mut writer, committed) = LakeWriter::open(
            lake.to_str().unwrap(),
            "node-a",
            &wal_dir,
            h.clone(),
            LakeConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(committed, 40);
        assert_eq!(
            h.stats().sealed_segments,
            0,
            "open deletes fully committed segments"
        );
        assert_eq!(writer.flush_once().await.unwrap(), 0);
        assert_eq!(count(&lake, "select count(*) from bronze").await, 40);

        // A segment straddling the committed seq is only partly replayed.
        h.append((40..45).map(rec).collect()).await.unwrap();
        assert_eq!(writer.flush_once().await.unwrap(), 5);
        assert_eq!(count(&lake, "select count(*) from bronze").await, 45);
        assert_eq!(
            count(&lake, "select count(distinct wal_seq) from bronze").await,
            45
        );
        wal.close().await.unwrap();

        // A lost WAL directory: the new WAL starts above what bronze holds.
        let wal_dir2 = tmp.path().join("wal2");
        let (wal2, h2) = Wal::open(&wal_dir2, wal_config()).unwrap();
        let (_w, committed) = LakeWriter::open(
            lake.to_str().unwrap(),
            "node-a",
            &wal_dir2,
            h2.clone(),
            LakeConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(committed, 45);
        assert_eq!(h2.append(vec![rec(0)]).await.unwrap(), 46);
        wal2.close().await.unwrap();

        // Maintenance runs on the table.
        let summary = optimize(lake.to_str().unwrap(), &HashMap::new())
            .await
            .unwrap();
        assert!(summary.files_removed >= summary.files_added);
        assert_eq!(count(&lake, "select count(*) from bronze").await, 45);
        assert_eq!(
            apply_retention(lake.to_str().unwrap(), 36_500, &HashMap::new())
                .await
                .unwrap(),
            0
        );
        assert_eq!(count(&lake, "select count(*) from bronze").await, 45);
        assert!(
            apply_retention(lake.to_str().unwrap(), 0, &HashMap::new())
                .await
                .unwrap()
                > 0
        );
        assert_eq!(count(&lake, "select count(*) from bronze").await, 0);
        vacuum(lake.to_str().unwrap(), 168, &HashMap::new())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_segment_commits_readable_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("lake");
        let wal_dir = tmp.path().join("wal");
        let (wal, h) = Wal::open(&wal_dir, wal_config()).unwrap();
        let (mut writer, _) = LakeWriter::open(
            lake.to_str().unwrap(),
            "node-c",
            &wal_dir,
            h.clone(),
            LakeConfig::default(),
        )
        .await
        .unwrap();
        h.append((0..5).map(rec).collect()).await.unwrap();
        let seg = h.seal().await.unwrap().unwrap();
        // Flip the last byte of the last record (bit rot).
        let mut data = std::fs::read(&seg.path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&seg.path, &data).unwrap();
        assert_eq!(writer.flush_once().await.unwrap(), 4);
        assert!(!seg.path.exists());
        assert!(
            wal_dir
                .join(format!(
                    "{}.corrupt",
                    seg.path.file_name().unwrap().to_str().unwrap()
                ))
                .exists()
        );
        assert_eq!(count(&lake, "select count(*) from bronze").await, 4);
        wal.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_append_concurrently() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("lake");
        let lake_str = lake.to_str().unwrap().to_string();
        let mut tasks = Vec::new();
        for node in ["node-a", "node-b"] {
            let wal_dir = tmp.path().join(node);
            let lake_str = lake_str.clone();
            tasks.push(tokio::spawn(async move {
                let (wal, h) = Wal::open(&wal_dir, wal_config()).unwrap();
                let (mut writer, _) =
                    LakeWriter::open(&lake_str, node, &wal_dir, h.clone(), LakeConfig::default())
                        .await
                        .unwrap();
                let mut total = 0;
                for round in 0..4 {
                    h.append((round * 10..round * 10 + 10).map(rec).collect())
                        .await
                        .unwrap();
                    total += writer.flush_once().await.unwrap();
                }
                wal.close().await.unwrap();
                total
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 40);
        }
        assert_eq!(count(&lake, "select count(*) from bronze").await, 80);
        assert_eq!(
            count(
                &lake,
                "select count(*) from (select distinct node_id, wal_seq from bronze)"
            )
            .await,
            80
        );
        assert_eq!(
            count(
                &lake,
                "select count(*) from bronze where node_id = 'node-b'"
            )
            .await,
            40
        );
    }
}
