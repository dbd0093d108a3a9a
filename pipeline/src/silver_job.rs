//! The silver stage: every bronze-fed silver table as a [`SilverTable`]
//! (where it lives, its progress marker, and a [`SilverSink`] turning
//! decoded bronze messages into its rows), driven by one [`run_stage`] that
//! reads bronze once per run for all of them.
//!
//! # Progress per table, one scan
//! Each table keeps its own bronze progress (a Delta application transaction,
//! see [`crate::incremental`]). Tables that have read bronze up to the same
//! version need the same bronze files, so they share one scan; a table that
//! is behind (a freshly added one, or one whose last run failed) gets its own
//! scan of exactly the files it has not seen. In steady state every table is
//! at the same version and the run scans and decodes bronze once.
//!
//! # Time per table
//! A table's seconds are the time spent in its sink during the scan (a
//! payload is parsed by the first table that reads it; a message goes to one
//! table, except TransactionEvent and StopTransaction, which feed meter
//! values and transaction events) plus its merge and write. The rest of the
//! scan (reading bronze, filtering, routing) is reported once as
//! [`SCAN_NAME`] in [`crate::RunSummary::shared`].

use std::time::Instant;

use deltalake::DeltaTable;
use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::prelude::SessionContext;
use futures_util::future::BoxFuture;
use schemas::tables::BRONZE_OCPP_MESSAGES;

use crate::bronze::{self, BronzeSink, Message, Select};
use crate::gold::empty;
use crate::incremental::{Dedup, Merged, Source, bronze_source, merge_dedup};
use crate::lake;
use crate::{PipelineConfig, PipelineError, RunOptions, TableSummary};

/// SQL name under which the shared bronze scan is reported.
pub const SCAN_NAME: &str = "bronze.ocpp_messages";

/// A silver table built from bronze.
pub(crate) struct SilverTable {
    /// SQL name, e.g. `silver.boots`.
    pub name: &'static str,
    /// Location under the lake root ([`schemas::tables`]).
    pub path: &'static str,
    /// Application transaction id of its bronze progress.
    pub app_id: &'static str,
    pub schema: fn() -> SchemaRef,
    /// Table comment when created.
    pub comment: &'static str,
    /// A fresh decoder for one run.
    pub sink: fn() -> Box<dyn SilverSink>,
}

/// The opened target of a silver job.
pub(crate) struct Target {
    pub table: DeltaTable,
    pub loc: String,
    pub schema: SchemaRef,
    /// (app id, bronze version) to record; `None` for a range reprocessing.
    pub txn: Option<(&'static str, i64)>,
}

/// What a sink may consult when it finishes.
pub(crate) struct Finish<'a> {
    pub ctx: &'a SessionContext,
    pub bronze: &'a DeltaTable,
    pub bronze_loc: &'a str,
    /// The scan read whole bronze date partitions (first run, log gone, or a
    /// `--from/--to` range), not just the files added since the last run.
    pub whole_partitions: bool,
}

/// A silver table's decoder: fed by the bronze scan, then writes.
pub(crate) trait SilverSink: BronzeSink + Send {
    /// Writes what it collected into `target` (recording its progress even
    /// when nothing changed).
    fn finish<'a>(
        self: Box<Self>,
        cx: &'a Finish<'a>,
        target: Target,
    ) -> BoxFuture<'a, Result<Merged, PipelineError>>;
}

/// The rows of a silver table that is a deduplicated union of decoded
/// messages (all but the heartbeat counts and the paired transaction events).
pub(crate) trait SilverRows: Default + Send + 'static {
    /// The bronze rows it reads.
    const SELECTS: &'static [Select];
    /// Its identity, winner order and write order.
    const DEDUP: Dedup<'static>;
    fn push(&mut self, m: &Message<'_>);
    fn into_batch(self, schema: &SchemaRef) -> Result<RecordBatch, PipelineError>;
}

/// The sink of a [`SilverRows`] table: merge with deduplication.
pub(crate) struct RowSink<R>(R);

/// A boxed sink for `R` (for [`SilverTable::sink`]).
pub(crate) fn row_sink<R: SilverRows>() -> Box<dyn SilverSink> {
    Box::new(RowSink(R::default()))
}

impl<R: SilverRows> BronzeSink for RowSink<R> {
    fn selects(&self) -> &'static [Select] {
        R::SELECTS
    }

    fn accept(&mut self, m: &Message<'_>) {
        self.0.push(m);
    }
}

impl<R: SilverRows> SilverSink for RowSink<R> {
    fn finish<'a>(
        self: Box<Self>,
        cx: &'a Finish<'a>,
        target: Target,
    ) -> BoxFuture<'a, Result<Merged, PipelineError>> {
        Box::pin(async move {
            let batch = self.0.into_batch(&target.schema)?;
            merge_dedup(
                cx.ctx,
                target.table,
                &target.loc,
                &target.schema,
                batch,
                &R::DEDUP,
                target.txn.as_slice(),
            )
            .await
        })
    }
}

/// Reports of a stage run, in table order.
pub(crate) trait StageReport {
    /// A table's job begins.
    fn started(&mut self, name: &str);
    /// A table's job is done.
    fn done(&mut self, summary: TableSummary);
    /// Work shared by several tables (the bronze scan) is done.
    fn shared(&mut self, summary: TableSummary);
}

/// One table's state during a run.
struct Job {
    target: Option<Target>,
    done: Option<i64>,
    sink: Box<dyn SilverSink>,
    rows_in: u64,
    /// Time spent in the sink during the scan (decoding its rows).
    decode_seconds: f64,
}

/// Brings every table of `tables` up to date with bronze (see the module
/// docs), reporting through `report`.
pub(crate) async fn run_stage(
    ctx: &SessionContext,
    lake_url: &str,
    config: &PipelineConfig,
    opts: &RunOptions,
    tables: &[SilverTable],
    report: &mut dyn StageReport,
) -> Result<(), PipelineError> {
    let Some(first) = tables.first() else {
        return Ok(());
    };
    report.started(first.name);
    let bronze_loc = lake::table_location(lake_url, BRONZE_OCPP_MESSAGES)?;
    let Some(bronze) = lake::load_table(&bronze_loc, &config.storage_options).await? else {
        tracing::info!(table = bronze_loc, "no bronze table yet: nothing to do");
        for (i, t) in tables.iter().enumerate() {
            if i > 0 {
                report.started(t.name);
            }
            report.done(empty(t.name));
        }
        return Ok(());
    };
    let bronze_version = bronze.version().unwrap_or(0);

    let opened = Instant::now();
    let mut jobs = Vec::with_capacity(tables.len());
    for t in tables {
        let loc = lake::table_location(lake_url, t.path)?;
        let schema = (t.schema)();
        let table =
            lake::open_or_create(&loc, &config.storage_options, &schema, "date", t.comment).await?;
        let done = lake::app_version(&table, &loc, t.app_id).await?;
        let up_to_date = !opts.is_range() && done.is_some_and(|v| v >= bronze_version as i64);
        jobs.push(Job {
            target: (!up_to_date).then(|| Target {
                table,
                loc,
                schema,
                txn: (!opts.is_range()).then_some((t.app_id, bronze_version as i64)),
            }),
            done,
            sink: (t.sink)(),
            rows_in: 0,
            decode_seconds: 0.0,
        });
    }
    tracing::debug!(
        seconds = opened.elapsed().as_secs_f64(),
        "silver targets opened"
    );

    // One scan per distinct progress among the tables with work to do.
    let mut scan_summary = empty(SCAN_NAME);
    let mut whole = vec![false; jobs.len()];
    let mut groups: Vec<Option<i64>> = Vec::new();
    for j in jobs.iter().filter(|j| j.target.is_some()) {
        if !groups.contains(&j.done) {
            groups.push(j.done);
        }
    }
    for done in groups {
        let Some(source) = bronze_source(&bronze, &bronze_loc, bronze_version, done, opts).await?
        else {
            continue;
        };
        let whole_partitions = !matches!(source, Source::Since { .. });
        let members: Vec<usize> = (0..jobs.len())
            .filter(|i| jobs[*i].target.is_some() && jobs[*i].done == done)
            .collect();
        let mut sinks: Vec<&mut dyn BronzeSink> = Vec::new();
        for (i, j) in jobs.iter_mut().enumerate() {
            if members.contains(&i) {
                whole[i] = whole_partitions;
                sinks.push(j.sink.as_mut());
            }
        }
        let scanned = bronze::scan(ctx, &bronze, &bronze_loc, source, opts, &mut sinks).await?;
        drop(sinks);
        scan_summary.rows_in += scanned.rows;
        scan_summary.seconds += scanned.seconds;
        scan_summary.rows_out += scanned.selected.iter().sum::<u64>();
        for ((i, n), spent) in members.iter().zip(scanned.selected).zip(scanned.decode) {
            jobs[*i].rows_in = n;
            jobs[*i].decode_seconds = spent.as_secs_f64();
        }
    }
    // What the tables spent decoding is theirs; the rest (reading,
    // filtering, routing) is shared.
    let decoded: f64 = jobs.iter().map(|j| j.decode_seconds).sum();
    scan_summary.seconds = (scan_summary.seconds - decoded).max(0.0);
    tracing::debug!(
        rows = scan_summary.rows_in,
        seconds = scan_summary.seconds,
        "bronze scanned and decoded for silver"
    );
    report.shared(scan_summary);

    for (i, (t, job)) in tables.iter().zip(jobs).enumerate() {
        if i > 0 {
            report.started(t.name);
        }
        let started = Instant::now();
        let mut summary = empty(t.name);
        if let Some(target) = job.target {
            let cx = Finish {
                ctx,
                bronze: &bronze,
                bronze_loc: &bronze_loc,
                whole_partitions: whole[i],
            };
            let merged = job.sink.finish(&cx, target).await?;
            summary.rows_in = job.rows_in;
            summary.rows_out = merged.rows_out;
            summary.dates_rewritten = merged.dates_rewritten;
        }
        summary.seconds = job.decode_seconds + started.elapsed().as_secs_f64();
        report.done(summary);
    }
    Ok(())
}
