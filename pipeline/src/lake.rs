//! Delta Lake plumbing shared by the pipeline stages: table locations,
//! opening/creating tables, reading what a table's log added since a version,
//! partition rewrites (replaceWhere) with application transactions, and the
//! memory-bounded DataFusion session.
//!
//! # Incremental reads: the commit log, not a file-list diff
//! A stage remembers the source table version it has processed in its target
//! table's application transaction (`txn` action, committed atomically with
//! the data). The next run reads the source's commit entries after that
//! version up to the version it pinned, and keeps the `add` actions with
//! `dataChange: true`. This is simpler and cheaper than diffing two snapshots'
//! file lists, and it is correct under maintenance: optimize (compaction)
//! re-adds rows with `dataChange: false` and is skipped; a file added and then
//! compacted away within the range is no longer readable as such, so its
//! whole source partition is read instead (deduplication makes re-reading
//! harmless). If a commit entry is gone (log cleanup after a checkpoint), the
//! run falls back to reading the whole source table.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Once};

use deltalake::arrow::array::{ArrayRef, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::execution::memory_pool::FairSpillPool;
use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
use deltalake::datafusion::prelude::{Expr, SessionContext};
use deltalake::delta_datafusion::{DeltaSessionContext, FileSelection, MissingSelectedFilePolicy};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{Add, Remove, StructType, Transaction};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use crate::PipelineError;

static REGISTER_S3: Once = Once::new();

/// The location of `table` (e.g. `silver/status_events`) under the lake root,
/// by the rule ingest's lake writer also uses
/// (`schemas::tables::table_location`); registers the S3 object store
/// handlers first when the lake is on S3.
pub(crate) fn table_location(lake_url: &str, table: &str) -> Result<String, PipelineError> {
    let location =
        schemas::tables::table_location(lake_url, table).map_err(|e| PipelineError::Url {
            url: e.url,
            reason: e.reason,
        })?;
    if location.starts_with("s3://") || location.starts_with("s3a://") {
        REGISTER_S3.call_once(|| deltalake::aws::register_handlers(None));
    }
    Ok(location)
}

pub(crate) fn delta_err(table: &str) -> impl Fn(DeltaTableError) -> PipelineError + '_ {
    move |source| PipelineError::Delta {
        table: table.to_string(),
        source: Box::new(source),
    }
}

fn builder(
    location: &str,
    storage_options: &HashMap<String, String>,
) -> Result<DeltaTable, PipelineError> {
    let url = deltalake::ensure_table_uri(location).map_err(delta_err(location))?;
    DeltaTableBuilder::from_url(url)
        .map_err(delta_err(location))?
        .with_storage_options(storage_options.clone())
        .build()
        .map_err(delta_err(location))
}

/// Loads the table at `location`; `None` if it does not exist yet.
pub(crate) async fn load_table(
    location: &str,
    storage_options: &HashMap<String, String>,
) -> Result<Option<DeltaTable>, PipelineError> {
    let mut table = builder(location, storage_options)?;
    match table.load().await {
        Ok(()) => Ok(Some(table)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(e) => Err(delta_err(location)(e)),
    }
}

/// Loads the table, creating it empty (with `schema`, partitioned by
/// `partition`) when missing. A concurrent creator wins harmlessly.
pub(crate) async fn open_or_create(
    location: &str,
    storage_options: &HashMap<String, String>,
    schema: &SchemaRef,
    partition: &str,
    comment: &str,
) -> Result<DeltaTable, PipelineError> {
    if let Some(table) = load_table(location, storage_options).await? {
        return Ok(table);
    }
    let columns: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| PipelineError::Arrow(e.to_string()))?;
    let name = location
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("table")
        .to_string();
    let created = builder(location, storage_options)?
        .create()
        .with_table_name(name)
        .with_comment(comment)
        .with_columns(columns.fields().cloned())
        .with_partition_columns([partition])
        .with_save_mode(SaveMode::Ignore)
        .await;
    match created {
        Ok(table) => {
            tracing::info!(table = location, "created table");
            Ok(table)
        }
        Err(e) => match load_table(location, storage_options).await? {
            Some(table) => Ok(table),
            None => Err(delta_err(location)(e)),
        },
    }
}

/// The version the pipeline recorded for `app_id` in `table`'s application
/// transactions: the last source version it processed.
pub(crate) async fn app_version(
    table: &DeltaTable,
    location: &str,
    app_id: &str,
) -> Result<Option<i64>, PipelineError> {
    let log_store = table.log_store();
    table
        .snapshot()
        .map_err(delta_err(location))?
        .transaction_version(log_store.as_ref(), app_id)
        .await
        .map_err(delta_err(location))
}

/// What a table's commits after one version, up to another, did.
#[derive(Debug, Default)]
pub(crate) struct LogChanges {
    /// Files added with `dataChange: true` and still active at the end.
    pub adds: Vec<Add>,
    /// Values of `partition_column` of every file added or removed with
    /// `dataChange: true`, plus those of added files that were removed again
    /// within the range (their rows must be read from the partition).
    pub partitions: BTreeSet<String>,
    /// Partitions whose added files are gone by the end of the range.
    pub reread_partitions: BTreeSet<String>,
    /// False if a commit entry was missing: the caller must read everything.
    pub complete: bool,
}

/// Reads commit entries `after+1 ..= upto` of `table` (Delta versions).
pub(crate) async fn changes_between(
    table: &DeltaTable,
    location: &str,
    after: u64,
    upto: u64,
    partition_column: &str,
) -> Result<LogChanges, PipelineError> {
    let log_store = table.log_store();
    let mut adds: Vec<Add> = Vec::new();
    let mut removed: HashSet<String> = HashSet::new();
    let mut changes = LogChanges {
        complete: true,
        ..LogChanges::default()
    };
    let partition_of =
        |values: &HashMap<String, Option<String>>| values.get(partition_column).cloned().flatten();
    for version in (after + 1)..=upto {
        let Some(bytes) = log_store
            .read_commit_entry(version)
            .await
            .map_err(delta_err(location))?
        else {
            changes.complete = false;
            return Ok(changes);
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let value: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| PipelineError::Log(format!("{location} v{version}: {e}")))?;
            if let Some(add) = value.get("add") {
                let add: Add = serde_json::from_value(add.clone())
                    .map_err(|e| PipelineError::Log(format!("{location} v{version}: {e}")))?;
                if add.data_change {
                    changes
                        .partitions
                        .extend(partition_of(&add.partition_values));
                    adds.push(add);
                }
            } else if let Some(remove) = value.get("remove") {
                let remove: Remove = serde_json::from_value(remove.clone())
                    .map_err(|e| PipelineError::Log(format!("{location} v{version}: {e}")))?;
                if remove.data_change
                    && let Some(values) = &remove.partition_values
                {
                    changes.partitions.extend(partition_of(values));
                }
                removed.insert(remove.path);
            }
        }
    }
    for add in adds {
        if removed.contains(&add.path) {
            changes
                .reread_partitions
                .extend(partition_of(&add.partition_values));
        } else {
            changes.adds.push(add);
        }
    }
    Ok(changes)
}

/// A table provider over `table` reading only `adds` (files no longer active
/// are skipped; see [`LogChanges::reread_partitions`]).
pub(crate) async fn provider_for_adds(
    ctx: &SessionContext,
    table: &DeltaTable,
    location: &str,
    adds: Vec<Add>,
) -> Result<Arc<dyn deltalake::datafusion::catalog::TableProvider>, PipelineError> {
    table
        .update_datafusion_session(&ctx.state())
        .map_err(delta_err(location))?;
    let selection =
        FileSelection::from_adds(adds).with_missing_file_policy(MissingSelectedFilePolicy::Ignore);
    let scan = table
        .table_provider()
        .with_session(Arc::new(ctx.state()))
        .with_file_selection(selection)
        .build()
        .await?;
    Ok(Arc::new(scan))
}

/// A table provider over the whole (current snapshot of the) table.
pub(crate) async fn provider(
    ctx: &SessionContext,
    table: &DeltaTable,
    location: &str,
) -> Result<Arc<dyn deltalake::datafusion::catalog::TableProvider>, PipelineError> {
    table
        .update_datafusion_session(&ctx.state())
        .map_err(delta_err(location))?;
    let scan = table
        .table_provider()
        .with_session(Arc::new(ctx.state()))
        .build()
        .await?;
    Ok(Arc::new(scan))
}

/// A DataFusion session with delta-rs's planner and tuned defaults and a
/// bounded, spilling memory pool, so a pipeline run sharing a process with
/// ingest cannot take all its memory.
pub(crate) fn session(memory_limit_bytes: usize) -> Result<SessionContext, PipelineError> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(
            memory_limit_bytes.max(16 << 20),
        )))
        .build_arc()?;
    Ok(DeltaSessionContext::with_runtime_env(runtime).into_inner())
}

/// Casts and reorders `batch`'s columns (by name) to `schema`: DataFusion
/// reads strings as views and aggregates to its own types; Delta writes
/// must match the table schema.
pub(crate) fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, PipelineError> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let column = batch
                .column_by_name(f.name())
                .ok_or_else(|| PipelineError::Arrow(format!("missing column {}", f.name())))?;
            cast(column, f.data_type()).map_err(|e| PipelineError::Arrow(e.to_string()))
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| PipelineError::Arrow(e.to_string()))
}

/// Replaces the rows matching `predicate` (on the partition column) by
/// `batches`, recording `txns` (app id, source version) in the same commit.
// Each argument is a distinct part of the one write; a struct would only
// rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replace_where(
    ctx: &SessionContext,
    table: DeltaTable,
    location: &str,
    schema: &SchemaRef,
    partition: &str,
    batches: Vec<RecordBatch>,
    predicate: Expr,
    txns: &[(&str, i64)],
) -> Result<DeltaTable, PipelineError> {
    let mut batches = batches;
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(schema.clone()));
    }
    let commit = CommitProperties::default().with_application_transactions(
        txns.iter()
            .map(|(app_id, version)| Transaction::new(*app_id, *version))
            .collect(),
    );
    table
        .write(batches)
        .with_save_mode(SaveMode::Overwrite)
        .with_replace_where(predicate)
        .with_partition_columns([partition])
        .with_session_state(Arc::new(ctx.state()))
        .with_commit_properties(commit)
        .await
        .map_err(delta_err(location))
}

/// Records `txns` alone (an empty append): the source advanced but nothing in
/// this table changed, and the next run must not read those commits again.
/// Without `txns` (a range reprocessing) it writes nothing.
pub(crate) async fn record_progress(
    table: DeltaTable,
    location: &str,
    schema: &SchemaRef,
    partition: &str,
    txns: &[(&str, i64)],
) -> Result<DeltaTable, PipelineError> {
    if txns.is_empty() {
        return Ok(table);
    }
    table
        .write(vec![RecordBatch::new_empty(schema.clone())])
        .with_save_mode(SaveMode::Append)
        .with_partition_columns([partition])
        .with_commit_properties(
            CommitProperties::default().with_application_transactions(
                txns.iter()
                    .map(|(app_id, version)| Transaction::new(*app_id, *version))
                    .collect(),
            ),
        )
        .await
        .map_err(delta_err(location))
}
