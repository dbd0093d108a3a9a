//! [`QueryEngine`]: one read-only SQL statement at a time.
//!
//! Each query gets a fresh DataFusion session (cheap) holding only the
//! tables it names, loaded at their latest version: no shared mutable
//! catalog to keep in sync with the lake. All sessions share one
//! [`RuntimeEnv`] whose memory pool is bounded ([`FairSpillPool`]), so the
//! sum of running queries cannot exceed the limit; a query that needs more
//! than it can get fails with "resources exhausted" while the others go on.
//!
//! Queries run on the engine's own multi-threaded Tokio runtime: DataFusion
//! is CPU-bound, and sharing the runtime that answers chargers would delay
//! their answers behind a big scan.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::{DataType, SchemaRef};
use deltalake::datafusion::catalog::{MemorySchemaProvider, TableProvider};
use deltalake::datafusion::common::{ParamValues, TableReference};
use deltalake::datafusion::execution::memory_pool::FairSpillPool;
use deltalake::datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use deltalake::datafusion::execution::session_state::SessionStateBuilder;
use deltalake::datafusion::logical_expr::LogicalPlan;
use deltalake::datafusion::prelude::{SessionConfig, SessionContext};
use futures_util::StreamExt;
use ingest::status::StatusStore;
use tracing::{debug, warn};

use crate::catalog::{
    LAKE_SCHEMAS, LIVE_CONNECTOR_STATUS, LIVE_SCHEMA, LIVE_STATIONS, Lake, connector_status_table,
    stations_table,
};
use crate::{QueryConfig, QueryError, readonly};

/// The catalog every table lives in (the PostgreSQL database name too).
pub(crate) const CATALOG: &str = "csms";
/// The default schema: empty, so unqualified names must be qualified.
const DEFAULT_SCHEMA: &str = "public";

/// The rows of one statement and their schema (also when there are none).
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// SQL over the lake and the live status store; cheap to clone.
#[derive(Clone)]
pub struct QueryEngine {
    inner: Arc<Inner>,
}

struct Inner {
    lake: Lake,
    status: Option<StatusStore>,
    config: QueryConfig,
    threads: usize,
    env: Result<Arc<RuntimeEnv>, String>,
    runtime: QueryRuntime,
}

/// The engine's Tokio runtime; shut down without blocking when the last
/// engine handle is dropped (which may happen inside another runtime).
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Aborts the query task when the caller stops waiting for it (an HTTP
/// client that went away), instead of letting it run to its timeout.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl QueryEngine {
    /// An engine over the lake at `lake_url` (a path, `file://` or `s3://`
    /// URL, as for ingest) and, if given, the status store's live tables
    /// (without one they are empty). Nothing is read until the first query;
    /// an unusable lake URL is reported by every query.
    pub fn new(
        lake_url: &str,
        storage_options: std::collections::HashMap<String, String>,
        status: Option<StatusStore>,
        config: QueryConfig,
    ) -> Self {
        let threads = if config.threads > 0 {
            config.threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        };
        let env = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(
                config.memory_limit_bytes.max(16 << 20),
            )))
            .build_arc()
            .map_err(|e| format!("cannot set up the query runtime: {e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            // One more worker than DataFusion partitions, so the task that
            // drives a query (and its deadline) still runs while every
            // partition is busy.
            .worker_threads(threads + 1)
            .thread_name("csms-query")
            .enable_all()
            .build()
            .map_err(|e| warn!(error = %e, "no separate query runtime; queries share the caller's"))
            .ok();
        let lake = Lake::new(
            lake_url,
            storage_options,
            Duration::from_millis(config.max_staleness_ms),
        );
        Self {
            inner: Arc::new(Inner {
                lake,
                status,
                config,
                threads,
                env,
                runtime: QueryRuntime(runtime),
            }),
        }
    }

    pub fn config(&self) -> &QueryConfig {
        &self.inner.config
    }

    /// Runs one read-only SQL statement against the latest (at most
    /// `max_staleness_ms` old) version of the tables it names. Writes and
    /// session changes are refused ([`QueryError::ReadOnly`]); the statement
    /// is bounded by the timeout, the engine's memory pool and `max_rows`.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult, QueryError> {
        self.sql_with(sql, Extras::default()).await
    }

    /// [`Self::sql`] with what a protocol front-end adds (the PostgreSQL
    /// wire: its catalog in the session, bound parameter values); the same
    /// read-only checks and limits apply.
    pub(crate) async fn sql_with(
        &self,
        sql: &str,
        extras: Extras,
    ) -> Result<QueryResult, QueryError> {
        let sql = sql.to_string();
        self.bounded(move |inner| async move { inner.run(&sql, &extras).await })
            .await
    }

    /// Plans a statement without running it: its result schema and the
    /// types DataFusion infers for its `$n` parameters (for the PostgreSQL
    /// extended protocol's Describe). Refused statements fail as in
    /// [`Self::sql`].
    pub(crate) async fn describe(
        &self,
        sql: &str,
        setup: Option<SessionSetup>,
    ) -> Result<Described, QueryError> {
        let sql = sql.to_string();
        self.bounded(move |inner| async move {
            let (_, plan) = inner.plan(&sql, setup.as_ref()).await?;
            let params = plan.get_parameter_types()?;
            let mut params: Vec<(String, Option<DataType>)> = params.into_iter().collect();
            // "$1", "$2", ... "$10": by number, not text.
            params.sort_by_key(|(id, _)| id.trim_start_matches('$').parse::<usize>().unwrap_or(0));
            Ok(Described {
                schema: Arc::new(plan.schema().as_arrow().clone()),
                params: params.into_iter().map(|(_, t)| t).collect(),
            })
        })
        .await
    }

    /// Runs `work` on the query runtime under the engine's timeout.
    async fn bounded<T, F, Fut>(&self, work: F) -> Result<T, QueryError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T, QueryError>> + Send + 'static,
    {
        let task = work(self.inner.clone());
        let handle = match &self.inner.runtime.0 {
            Some(rt) => rt.spawn(task),
            None => tokio::spawn(task),
        };
        let mut guard = AbortOnDrop(handle);
        // The query task enforces the timeout itself; this second deadline,
        // on the caller's runtime, answers even when an operator that does
        // not yield keeps the query runtime's workers busy (the task is then
        // aborted and stops at its next yield).
        let limit = Duration::from_secs(self.inner.config.timeout_secs.max(1));
        match tokio::time::timeout(limit + Duration::from_secs(1), &mut guard.0).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(QueryError::Internal(format!("query task failed: {e}"))),
            Err(_) => {
                metrics::counter!("csms_sql_queries_total", "outcome" => "timeout").increment(1);
                Err(QueryError::Timeout(limit))
            }
        }
    }
}

/// Extra setup of a query's session by a protocol front-end (registering
/// the PostgreSQL catalog and functions).
pub(crate) type SessionSetup = Arc<dyn Fn(&SessionContext) -> Result<(), QueryError> + Send + Sync>;

/// What a front-end adds to a statement.
#[derive(Clone, Default)]
pub(crate) struct Extras {
    pub(crate) setup: Option<SessionSetup>,
    /// Values of the statement's `$n` parameters, in order.
    pub(crate) params: Option<ParamValues>,
}

/// A planned, not executed, statement.
#[derive(Debug, Clone)]
pub(crate) struct Described {
    pub(crate) schema: SchemaRef,
    /// The inferred type of `$1`, `$2`, ... (`None`: not inferable).
    pub(crate) params: Vec<Option<DataType>>,
}

fn outcome(r: &Result<QueryResult, QueryError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(QueryError::Sql { .. }) => "sql_error",
        Err(QueryError::ReadOnly(_)) => "refused",
        Err(QueryError::Timeout(_)) => "timeout",
        Err(QueryError::Memory(_)) => "memory",
        Err(QueryError::TooManyRows(_)) => "too_many_rows",
        Err(_) => "error",
    }
}

impl Inner {
    async fn run(&self, sql: &str, extras: &Extras) -> Result<QueryResult, QueryError> {
        let started = Instant::now();
        let limit = Duration::from_secs(self.config.timeout_secs.max(1));
        let result = match tokio::time::timeout(limit, self.execute(sql, extras)).await {
            Ok(r) => r,
            Err(_) => Err(QueryError::Timeout(limit)),
        };
        let elapsed = started.elapsed();
        metrics::counter!("csms_sql_queries_total", "outcome" => outcome(&result)).increment(1);
        metrics::histogram!("csms_sql_query_seconds").record(elapsed.as_secs_f64());
        match &result {
            Ok(r) => debug!(rows = r.num_rows(), ?elapsed, "query done"),
            Err(e) => debug!(error = %e, ?elapsed, "query failed"),
        }
        result
    }

    fn session(&self) -> Result<SessionContext, QueryError> {
        let env = self
            .env
            .as_ref()
            .map_err(|e| QueryError::Internal(e.clone()))?;
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, DEFAULT_SCHEMA)
            .with_create_default_catalog_and_schema(true)
            .with_information_schema(true)
            .with_target_partitions(self.threads)
            // As delta-rs's own sessions: hash-join IN-list pushdown can
            // panic on dictionary-encoded keys (partition columns).
            .set_usize("datafusion.optimizer.hash_join_inlist_pushdown_max_size", 0)
            .set_usize(
                "datafusion.optimizer.hash_join_inlist_pushdown_max_distinct_values",
                0,
            );
        // Spans let planning errors point at the offending identifier.
        config.options_mut().sql_parser.collect_spans = true;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(env.clone())
            .with_default_features()
            .build();
        let ctx = SessionContext::new_with_state(state);
        let catalog = ctx
            .catalog(CATALOG)
            .ok_or_else(|| QueryError::Internal("default catalog missing".into()))?;
        for schema in LAKE_SCHEMAS.iter().chain([&LIVE_SCHEMA]) {
            catalog.register_schema(schema, Arc::new(MemorySchemaProvider::new()))?;
        }
        Ok(ctx)
    }

    /// Parses, checks, registers the named tables and plans one statement.
    async fn plan(
        &self,
        sql: &str,
        setup: Option<&SessionSetup>,
    ) -> Result<(SessionContext, LogicalPlan), QueryError> {
        let ctx = self.session()?;
        if let Some(setup) = setup {
            setup(&ctx)?;
        }
        let state = ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(sql, &dialect)?;
        readonly::check_statement(&statement)?;
        let references = state.resolve_table_references(&statement)?;
        self.register(&ctx, &references).await?;
        let plan = ctx.state().statement_to_plan(statement).await?;
        readonly::check_plan(&plan)?;
        Ok((ctx, plan))
    }

    async fn execute(&self, sql: &str, extras: &Extras) -> Result<QueryResult, QueryError> {
        let (ctx, plan) = self.plan(sql, extras.setup.as_ref()).await?;
        let plan = match &extras.params {
            Some(values) => plan.replace_params_with_values(values)?,
            None => plan,
        };
        let frame = ctx.execute_logical_plan(plan).await?;
        let mut stream = frame.execute_stream().await?;
        let schema = stream.schema();
        let mut batches = Vec::new();
        let mut rows = 0usize;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            rows += batch.num_rows();
            if rows > self.config.max_rows {
                return Err(QueryError::TooManyRows(self.config.max_rows));
            }
            if batch.num_rows() > 0 {
                batches.push(batch);
            }
        }
        Ok(QueryResult { schema, batches })
    }

    /// Registers the tables the statement names (all of them for catalog
    /// queries on `information_schema`, so `SHOW TABLES` lists the lake).
    /// Names that match no table stay unregistered: DataFusion then reports
    /// its usual "table not found".
    async fn register(
        &self,
        ctx: &SessionContext,
        references: &[TableReference],
    ) -> Result<(), QueryError> {
        let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
        // pg_catalog (the PostgreSQL wire's) lists the session's tables too.
        let catalog_query = references.iter().any(|r| {
            matches!(r.schema(), Some("information_schema" | "pg_catalog"))
                || (r.schema().is_none() && r.table().starts_with("pg_"))
        });
        if catalog_query {
            for schema in LAKE_SCHEMAS {
                for name in self.lake.table_names(schema).await? {
                    wanted.insert((schema.to_string(), name));
                }
            }
            for name in [LIVE_CONNECTOR_STATUS, LIVE_STATIONS] {
                wanted.insert((LIVE_SCHEMA.to_string(), name.to_string()));
            }
        }
        for r in references {
            if r.catalog().is_some_and(|c| c != CATALOG) {
                continue;
            }
            if let Some(schema) = r.schema()
                && (LAKE_SCHEMAS.contains(&schema) || schema == LIVE_SCHEMA)
            {
                wanted.insert((schema.to_string(), r.table().to_string()));
            }
        }
        let catalog = ctx
            .catalog(CATALOG)
            .ok_or_else(|| QueryError::Internal("default catalog missing".into()))?;
        for (schema, name) in wanted {
            let provider: Arc<dyn TableProvider> = if schema == LIVE_SCHEMA {
                match name.as_str() {
                    LIVE_CONNECTOR_STATUS => connector_status_table(self.status.as_ref()).await?,
                    LIVE_STATIONS => stations_table(self.status.as_ref()).await?,
                    _ => continue,
                }
            } else {
                let Some(table) = self.lake.table(&schema, &name).await? else {
                    continue;
                };
                table
                    .update_datafusion_session(&ctx.state())
                    .map_err(|e| QueryError::Lake(e.to_string()))?;
                let scan = table
                    .table_provider()
                    .with_session(Arc::new(ctx.state()))
                    .build()
                    .await?;
                Arc::new(scan)
            };
            if let Some(s) = catalog.schema(&schema) {
                s.register_table(name, provider)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    use chrono::{TimeZone, Utc};
    use deltalake::arrow::array::{
        Array, ArrayRef, AsArray, Date32Array, Int8Array, Int64Array, StringArray,
        TimestampMicrosecondArray,
    };
    use deltalake::arrow::datatypes::Int64Type;
    use deltalake::protocol::SaveMode;
    use deltalake::{DeltaTableBuilder, ensure_table_uri};
    use ingest::status::ConnectorStatus;

    fn config() -> QueryConfig {
        QueryConfig {
            max_staleness_ms: 0,
            ..QueryConfig::default()
        }
    }

    fn engine(lake: &Path, status: Option<StatusStore>, config: QueryConfig) -> QueryEngine {
        QueryEngine::new(lake.to_str().unwrap(), HashMap::new(), status, config)
    }

    /// Appends `batch` to the Delta table `table` (e.g. `bronze/ocpp_messages`),
    /// creating it on first use.
    async fn append(lake: &Path, table: &str, batch: RecordBatch) {
        let path = lake.join(table);
        std::fs::create_dir_all(&path).unwrap();
        let url = ensure_table_uri(path.to_str().unwrap()).unwrap();
        let mut t = DeltaTableBuilder::from_url(url).unwrap().build().unwrap();
        let _ = t.load().await;
        t.write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .await
            .unwrap();
    }

    fn strings(v: Vec<&str>) -> ArrayRef {
        Arc::new(StringArray::from(v))
    }

    /// Bronze rows: one CALL per (station, wal_seq).
    fn bronze(rows: &[(&str, i64)]) -> RecordBatch {
        let n = rows.len();
        let at = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        RecordBatch::try_new(
            schemas::tables::bronze_schema(),
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from(vec![at.timestamp_micros(); n])
                        .with_timezone("UTC"),
                ),
                Arc::new(Date32Array::from(vec![20513; n])),
                strings(vec!["node-a"; n]),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                strings(vec!["1.6"; n]),
                strings(vec!["cs_to_csms"; n]),
                Arc::new(Int8Array::from(vec![2; n])),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| format!("m{}", r.1)),
                )),
                strings(vec!["Heartbeat"; n]),
                strings(vec!["{}"; n]),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
                strings(vec!["[2,\"m\",\"Heartbeat\",{}]"; n]),
            ],
        )
        .unwrap()
    }

    fn ranking(rows: &[(&str, i64, i64)]) -> RecordBatch {
        let n = rows.len();
        RecordBatch::try_new(
            schemas::tables::fault_ranking_schema(),
            vec![
                strings(vec!["2026-03"; n]),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from(vec![1; n])),
                Arc::new(Date32Array::from(vec![20513; n])),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    fn single_i64(r: &QueryResult) -> i64 {
        assert_eq!(r.num_rows(), 1, "{r:?}");
        r.batches[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    #[tokio::test]
    async fn selects_latest_bronze_and_finds_new_tables_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let q = engine(dir.path(), None, config());

        // No table yet: DataFusion's own error.
        match q.sql("SELECT count(*) FROM bronze.ocpp_messages").await {
            Err(QueryError::Sql { message, .. }) => {
                assert!(message.contains("not found"), "{message}")
            }
            other => panic!("{other:?}"),
        }

        append(
            dir.path(),
            "bronze/ocpp_messages",
            bronze(&[("CP1", 1), ("CP1", 2), ("CP2", 3)]),
        )
        .await;
        let sql = "SELECT count(*) AS n FROM bronze.ocpp_messages WHERE station_id = 'CP1'";
        let r = q.sql(sql).await.unwrap();
        assert_eq!(r.schema.field(0).name(), "n");
        assert_eq!(single_i64(&r), 2);

        // A later commit is visible to the next query.
        append(dir.path(), "bronze/ocpp_messages", bronze(&[("CP1", 4)])).await;
        assert_eq!(single_i64(&q.sql(sql).await.unwrap()), 3);

        // Upper-case keywords and unquoted identifiers are normalised.
        let r = q
            .sql("select STATION_ID, count(*) from BRONZE.OCPP_MESSAGES group by 1 order by 1")
            .await
            .unwrap();
        assert_eq!(r.num_rows(), 2);
    }

    #[tokio::test]
    async fn live_status_joins_gold() {
        let dir = tempfile::tempdir().unwrap();
        append(
            dir.path(),
            "gold/fault_ranking",
            ranking(&[("CP1", 12, 1), ("CP2", 7, 2)]),
        )
        .await;
        let status = StatusStore::embedded();
        let t = Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).unwrap();
        status.put_connector(ConnectorStatus {
            station_id: "CP1".into(),
            evse_id: 0,
            connector_id: 1,
            status: "Faulted".into(),
            error_code: Some("GroundFailure".into()),
            info: None,
            event_time: t,
            updated_at: t,
        });
        status.connected("CP1", "node-a", "1.6", t);
        let q = engine(dir.path(), Some(status.clone()), config());
        let r = q
            .sql(
                "SELECT r.station_id, r.total_faults, c.status, c.error_code, s.connected \
                 FROM gold.fault_ranking r \
                 JOIN live.connector_status c ON c.station_id = r.station_id \
                 JOIN live.stations s ON s.station_id = r.station_id \
                 ORDER BY r.rank",
            )
            .await
            .unwrap();
        assert_eq!(r.num_rows(), 1);
        let json: serde_json::Value =
            serde_json::from_slice(&crate::render::render_json(&r).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"station_id": "CP1", "total_faults": 12, "status": "Faulted",
                "error_code": "GroundFailure", "connected": true}])
        );

        // Live tables are read per query.
        status.put_connector(ConnectorStatus {
            station_id: "CP1".into(),
            evse_id: 0,
            connector_id: 1,
            status: "Available".into(),
            error_code: None,
            info: None,
            event_time: t + chrono::Duration::minutes(1),
            updated_at: t + chrono::Duration::minutes(1),
        });
        let r = q
            .sql("SELECT status, error_code, event_time FROM live.connector_status")
            .await
            .unwrap();
        let b = &r.batches[0];
        assert_eq!(b.column(0).as_string::<i32>().value(0), "Available");
        assert!(b.column(1).is_null(0));
        assert_eq!(
            b.column(2)
                .as_primitive::<deltalake::arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            (t + chrono::Duration::minutes(1)).timestamp_micros()
        );
    }

    #[tokio::test]
    async fn catalog_queries_list_lake_and_live_tables() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), "bronze/ocpp_messages", bronze(&[("CP1", 1)])).await;
        append(dir.path(), "gold/fault_ranking", ranking(&[("CP1", 5, 1)])).await;
        // Not a table: no Delta log.
        std::fs::create_dir_all(dir.path().join("silver/scratch")).unwrap();
        let q = engine(dir.path(), None, config());
        let r = q
            .sql(
                "SELECT table_schema || '.' || table_name AS t FROM information_schema.tables \
                 WHERE table_catalog = 'csms' AND table_schema <> 'information_schema' ORDER BY t",
            )
            .await
            .unwrap();
        let names: Vec<String> = r
            .batches
            .iter()
            .flat_map(|b| {
                let c = deltalake::arrow::compute::cast(
                    b.column(0),
                    &deltalake::arrow::datatypes::DataType::Utf8,
                )
                .unwrap();
                (0..c.len())
                    .map(move |i| c.as_string::<i32>().value(i).to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            names,
            [
                "bronze.ocpp_messages",
                "gold.fault_ranking",
                "live.connector_status",
                "live.stations"
            ]
        );
        q.sql("SHOW TABLES").await.unwrap();
    }

    #[tokio::test]
    async fn writes_and_session_changes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), "bronze/ocpp_messages", bronze(&[("CP1", 1)])).await;
        let q = engine(dir.path(), None, config());
        let target = dir.path().join("copied.csv");
        let copy = format!("COPY (SELECT 1) TO '{}'", target.display());
        for sql in [
            "DROP TABLE bronze.ocpp_messages",
            "INSERT INTO bronze.ocpp_messages SELECT * FROM bronze.ocpp_messages",
            "CREATE TABLE gold.x AS SELECT 1",
            copy.as_str(),
            "DELETE FROM bronze.ocpp_messages",
            "SET datafusion.execution.target_partitions = 1",
            "EXPLAIN ANALYZE INSERT INTO bronze.ocpp_messages SELECT * FROM bronze.ocpp_messages",
        ] {
            match q.sql(sql).await {
                Err(QueryError::ReadOnly(_)) => {}
                other => panic!("{sql}: {other:?}"),
            }
        }
        assert!(!target.exists());
        assert_eq!(
            single_i64(
                &q.sql("SELECT count(*) FROM bronze.ocpp_messages")
                    .await
                    .unwrap()
            ),
            1
        );
    }

    #[tokio::test]
    async fn syntax_errors_carry_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let q = engine(dir.path(), None, config());
        match q.sql("SELECT 1,\n  FROM WHERE").await {
            Err(QueryError::Sql {
                position: Some(p), ..
            }) => assert_eq!(p.line, 2),
            other => panic!("{other:?}"),
        }
        match q.sql("SELECT 1; SELECT 2").await {
            Err(QueryError::Sql { message, .. }) => {
                assert!(message.contains("single SQL statement"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn slow_queries_time_out_and_the_engine_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let q = engine(
            dir.path(),
            None,
            QueryConfig {
                timeout_secs: 1,
                ..config()
            },
        );
        let started = Instant::now();
        let r = q
            .sql("SELECT count(DISTINCT value % 1000003) FROM generate_series(1, 100000000000)")
            .await;
        assert!(matches!(r, Err(QueryError::Timeout(_))), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            single_i64(&q.sql("SELECT CAST(42 AS BIGINT)").await.unwrap()),
            42
        );
    }

    #[tokio::test]
    async fn memory_and_row_limits_fail_the_query_alone() {
        let dir = tempfile::tempdir().unwrap();
        let q = engine(
            dir.path(),
            None,
            QueryConfig {
                memory_limit_bytes: 16 << 20,
                max_rows: 10,
                ..config()
            },
        );
        let r = q
            .sql("SELECT array_agg(value) FROM generate_series(1, 5000000)")
            .await;
        assert!(matches!(r, Err(QueryError::Memory(_))), "{r:?}");
        let r = q.sql("SELECT * FROM generate_series(1, 100)").await;
        assert!(matches!(r, Err(QueryError::TooManyRows(10))), "{r:?}");
        assert_eq!(
            q.sql("SELECT * FROM generate_series(1, 10)")
                .await
                .unwrap()
                .num_rows(),
            10
        );
    }
}
