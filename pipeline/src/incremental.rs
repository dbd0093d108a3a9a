//! The incremental machinery the silver jobs share: which bronze rows a run
//! must read (from the recorded progress and bronze's commit log), scanning
//! them, and merging new rows into a date-partitioned silver table with
//! deduplication on message identity.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::NaiveDate;
use deltalake::DeltaTable;
use std::collections::hash_map::Entry;

use deltalake::arrow::array::{
    Array, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt32Array,
};
use deltalake::arrow::compute::{SortOptions, cast, concat_batches, take_record_batch};
use deltalake::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::row::{Row, RowConverter, Rows, SortField};
use deltalake::datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryReservation,
};
use deltalake::datafusion::prelude::SessionContext;
use futures_util::StreamExt;

use crate::lake;
use crate::silver::{date_in, date_in_sql, days_of_date, range_sql};
use crate::{PipelineError, RunOptions};

pub(crate) const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Which bronze rows a run reads.
pub(crate) enum Source {
    /// Everything in the current snapshot (first run, or log entries gone).
    All,
    /// Files added since the last run, and whole bronze date partitions whose
    /// added files were compacted away meanwhile.
    Since {
        adds: Vec<deltalake::kernel::Add>,
        partitions: BTreeSet<String>,
    },
    /// Bronze received in the `--from/--to` range.
    Range,
}

/// Decides what to read from bronze given the version recorded by the
/// target (`done`); `None` when the target is up to date.
pub(crate) async fn bronze_source(
    bronze: &DeltaTable,
    bronze_loc: &str,
    bronze_version: u64,
    done: Option<i64>,
    opts: &RunOptions,
) -> Result<Option<Source>, PipelineError> {
    if opts.is_range() {
        return Ok(Some(Source::Range));
    }
    match done {
        Some(v) if v >= bronze_version as i64 => Ok(None),
        None => Ok(Some(Source::All)),
        Some(v) => {
            let changes =
                lake::changes_between(bronze, bronze_loc, v.max(0) as u64, bronze_version, "date")
                    .await?;
            if changes.complete {
                Ok(Some(Source::Since {
                    adds: changes.adds,
                    partitions: changes.reread_partitions,
                }))
            } else {
                tracing::warn!(
                    table = bronze_loc,
                    since = v,
                    "bronze log entries are gone: reprocessing all of bronze"
                );
                Ok(Some(Source::All))
            }
        }
    }
}

/// Runs `sql` and hands every batch it yields to `on_batch`; returns the
/// rows read.
pub(crate) async fn scan_sql(
    ctx: &SessionContext,
    sql: &str,
    on_batch: &mut (dyn FnMut(&RecordBatch) -> Result<(), PipelineError> + Send),
) -> Result<u64, PipelineError> {
    let mut stream = ctx.sql(sql).await?.execute_stream().await?;
    let mut read = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        read += batch.num_rows() as u64;
        on_batch(&batch)?;
    }
    Ok(read)
}

/// Reads `columns` of the bronze rows matching `filter` that `source`
/// selects, handing each batch to `on_batch`. Returns the rows read.
// Each argument is a distinct part of the one scan.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn scan_bronze(
    ctx: &SessionContext,
    bronze: &DeltaTable,
    bronze_loc: &str,
    source: Source,
    opts: &RunOptions,
    columns: &str,
    filter: &str,
    on_batch: &mut (dyn FnMut(&RecordBatch) -> Result<(), PipelineError> + Send),
) -> Result<u64, PipelineError> {
    let mut read = 0;
    match source {
        Source::All | Source::Range => {
            ctx.register_table("bronze_all", lake::provider(ctx, bronze, bronze_loc).await?)?;
            let range = match source {
                Source::Range => range_sql("date", opts),
                _ => "TRUE".to_string(),
            };
            let sql = format!("SELECT {columns} FROM bronze_all WHERE {filter} AND {range}");
            let r = scan_sql(ctx, &sql, on_batch).await;
            ctx.deregister_table("bronze_all")?;
            read += r?;
        }
        Source::Since { adds, partitions } => {
            if !adds.is_empty() {
                let provider = lake::provider_for_adds(ctx, bronze, bronze_loc, adds).await?;
                ctx.register_table("bronze_new", provider)?;
                let sql = format!("SELECT {columns} FROM bronze_new WHERE {filter}");
                let r = scan_sql(ctx, &sql, on_batch).await;
                ctx.deregister_table("bronze_new")?;
                read += r?;
            }
            let days: BTreeSet<i32> = partitions
                .iter()
                .filter_map(|p| NaiveDate::parse_from_str(p, "%Y-%m-%d").ok())
                .map(days_of_date)
                .collect();
            if !days.is_empty() {
                ctx.register_table("bronze_all", lake::provider(ctx, bronze, bronze_loc).await?)?;
                let sql = format!(
                    "SELECT {columns} FROM bronze_all WHERE {filter} AND {}",
                    date_in_sql("date", &days)
                );
                let r = scan_sql(ctx, &sql, on_batch).await;
                ctx.deregister_table("bronze_all")?;
                read += r?;
            }
        }
    }
    Ok(read)
}

/// A column of `batch` by name, cast to `data_type`.
fn column_as(
    batch: &RecordBatch,
    name: &str,
    data_type: &DataType,
) -> Result<Arc<dyn Array>, PipelineError> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| PipelineError::Arrow(format!("scan lacks {name}")))?;
    cast(column, data_type).map_err(|e| PipelineError::Arrow(e.to_string()))
}

fn downcast<T: Clone + 'static>(a: &dyn Array, name: &str) -> Result<T, PipelineError> {
    a.as_any()
        .downcast_ref::<T>()
        .cloned()
        .ok_or_else(|| PipelineError::Arrow(format!("{name} has an unexpected type")))
}

/// A text column (string views and dictionaries are cast to plain UTF-8).
pub(crate) fn strings(batch: &RecordBatch, name: &str) -> Result<StringArray, PipelineError> {
    downcast(column_as(batch, name, &DataType::Utf8)?.as_ref(), name)
}

/// A UTC microsecond timestamp column.
pub(crate) fn timestamps(
    batch: &RecordBatch,
    name: &str,
) -> Result<TimestampMicrosecondArray, PipelineError> {
    let t = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    downcast(column_as(batch, name, &t)?.as_ref(), name)
}

/// An integer column as `Int64`.
pub(crate) fn ints(batch: &RecordBatch, name: &str) -> Result<Int64Array, PipelineError> {
    downcast(column_as(batch, name, &DataType::Int64)?.as_ref(), name)
}

/// A numeric column as `Float64`.
pub(crate) fn floats(batch: &RecordBatch, name: &str) -> Result<Float64Array, PipelineError> {
    downcast(column_as(batch, name, &DataType::Float64)?.as_ref(), name)
}

/// A date column as `Date32`.
pub(crate) fn dates(batch: &RecordBatch, name: &str) -> Result<Date32Array, PipelineError> {
    downcast(column_as(batch, name, &DataType::Date32)?.as_ref(), name)
}

/// A `SELECT` list reading every column of `schema` with the table's types
/// (DataFusion reads strings as views).
pub(crate) fn select_list(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 => format!("CAST(\"{0}\" AS VARCHAR) AS \"{0}\"", f.name()),
            DataType::Date32 => format!("CAST(\"{0}\" AS DATE) AS \"{0}\"", f.name()),
            _ => format!("\"{}\"", f.name()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// How [`merge_dedup`] identifies and orders rows.
pub(crate) struct Dedup<'a> {
    /// Columns of a row's identity (must include `date`).
    pub key: &'a str,
    /// Which copy of an identity wins: the first in this order.
    pub order: &'a str,
    /// Order of the written rows.
    pub sort: &'a str,
}

/// What [`merge_dedup`] wrote.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub rows_out: u64,
    pub dates_rewritten: u64,
}

/// Merges `new_rows` (of `schema`, first column `date`) into the silver
/// table: per date they touch, the union with the rows already there,
/// deduplicated on `dedup.key`, replaces the partition; `txns` are recorded
/// in the last commit.
///
/// A date is rewritten only when deduplication leaves it more rows than it
/// holds: re-read copies (after bronze compaction, or a `--from/--to`
/// reprocessing) then cost no commit and no downstream recomputation.
///
/// The rows are in memory already (decoded from bronze), so deduplication
/// and ordering run on them directly in Arrow's row format rather than as a
/// DataFusion window query: only the rows the table holds on the touched
/// dates are read through DataFusion. That memory is reserved in the
/// session's memory pool like DataFusion's own, and the dates are merged in
/// chunks sized to fit it (every identity key starts with `date`, so a chunk
/// of dates deduplicates on its own), so a first run over months of bronze
/// holds a few days of one table at a time, not all of them.
// Each argument is a distinct part of the one merge.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn merge_dedup(
    ctx: &SessionContext,
    table: DeltaTable,
    loc: &str,
    schema: &SchemaRef,
    new_rows: RecordBatch,
    dedup: &Dedup<'_>,
    txns: &[(&str, i64)],
) -> Result<Merged, PipelineError> {
    let chunks = date_chunks(&new_rows, merge_budget(ctx))?;
    if chunks.is_empty() {
        lake::record_progress(table, loc, schema, "date", txns).await?;
        return Ok(Merged::default());
    }
    let dates = dates(&new_rows, "date")?;
    let mut table = table;
    let mut total = Merged::default();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let part = if last == 0 {
            new_rows.clone()
        } else {
            let keep: UInt32Array = (0..new_rows.num_rows() as u32)
                .filter(|&r| dates.is_valid(r as usize) && chunk.contains(&dates.value(r as usize)))
                .collect();
            take_record_batch(&new_rows, &keep).map_err(arrow_err)?
        };
        let chunk_txns = if i == last { txns } else { &[] };
        let (t, merged) =
            merge_dates(ctx, table, loc, schema, part, chunk, dedup, chunk_txns).await?;
        table = t;
        total.rows_out += merged.rows_out;
        total.dates_rewritten += merged.dates_rewritten;
    }
    Ok(total)
}

/// Bytes of new rows one merge chunk may carry: a quarter of the memory
/// pool, since a chunk's rows exist up to four times at once (held rows,
/// their concatenation with the new ones, the deduplicated and the sorted
/// copy). Unbounded pools merge everything at once.
fn merge_budget(ctx: &SessionContext) -> usize {
    match ctx.runtime_env().memory_pool.memory_limit() {
        MemoryLimit::Finite(bytes) => (bytes / 4).max(1),
        MemoryLimit::Infinite | MemoryLimit::Unknown => usize::MAX,
    }
}

/// The dates of `batch`, grouped in ascending runs whose rows take at most
/// `budget` bytes (estimated from the batch's average row size, counted
/// twice: the rows the table already holds on a date are about as many as
/// a reprocessing brings). A date over the budget on its own is a chunk.
fn date_chunks(batch: &RecordBatch, budget: usize) -> Result<Vec<BTreeSet<i32>>, PipelineError> {
    let mut per_date: std::collections::BTreeMap<i32, usize> = Default::default();
    for d in dates(batch, "date")?.iter().flatten() {
        *per_date.entry(d).or_default() += 1;
    }
    let row_bytes = batch.get_array_memory_size() / batch.num_rows().max(1);
    let mut chunks: Vec<BTreeSet<i32>> = Vec::new();
    let mut used = 0usize;
    for (date, rows) in per_date {
        let bytes = rows.saturating_mul(row_bytes).saturating_mul(2);
        match chunks.last_mut() {
            Some(chunk) if used.saturating_add(bytes) <= budget => {
                chunk.insert(date);
                used += bytes;
            }
            _ => {
                chunks.push(BTreeSet::from([date]));
                used = bytes;
            }
        }
    }
    Ok(chunks)
}

/// One chunk of [`merge_dedup`]: `new_rows` all fall on `days`. Returns the
/// table after its commit (if any).
#[allow(clippy::too_many_arguments)]
async fn merge_dates(
    ctx: &SessionContext,
    table: DeltaTable,
    loc: &str,
    schema: &SchemaRef,
    new_rows: RecordBatch,
    days: BTreeSet<i32>,
    dedup: &Dedup<'_>,
    txns: &[(&str, i64)],
) -> Result<(DeltaTable, Merged), PipelineError> {
    let nothing = Merged::default();
    let started = std::time::Instant::now();
    let mut reservation =
        MemoryConsumer::new(format!("silver merge {loc}")).register(&ctx.runtime_env().memory_pool);
    let reserve = |reservation: &mut MemoryReservation, bytes: usize, what: &str| {
        reservation
            .try_resize(bytes)
            .map_err(|_| PipelineError::Memory {
                table: loc.to_string(),
                what: format!("{what} of {} date(s)", days.len()),
                needed_bytes: bytes,
            })
    };
    reserve(
        &mut reservation,
        new_rows.get_array_memory_size(),
        "the new rows",
    )?;
    ctx.register_table("silver_cur", lake::provider(ctx, &table, loc).await?)?;
    let held = async {
        ctx.sql(&format!(
            "SELECT {} FROM silver_cur WHERE {}",
            select_list(schema),
            date_in_sql("date", &days)
        ))
        .await?
        .collect()
        .await
    }
    .await;
    ctx.deregister_table("silver_cur")?;
    let held = held?
        .iter()
        .map(|b| lake::conform(b, schema))
        .collect::<Result<Vec<_>, _>>()?;
    let held_bytes: usize = held.iter().map(RecordBatch::get_array_memory_size).sum();
    // Held and new rows, and their concatenation, exist together.
    reserve(
        &mut reservation,
        2 * (held_bytes + new_rows.get_array_memory_size()),
        "the held and new rows",
    )?;
    let read_held = started.elapsed().as_secs_f64();
    // Silver only grows by union, so a date whose deduplicated row count
    // equals what it holds already gained nothing.
    let mut before: HashMap<i32, u64> = HashMap::new();
    for b in &held {
        for d in dates(b, "date")?.iter().flatten() {
            *before.entry(d).or_default() += 1;
        }
    }
    // Held rows first: on a complete tie of the winner order they stay.
    let all =
        concat_batches(schema, held.iter().chain(std::iter::once(&new_rows))).map_err(arrow_err)?;
    drop(held);
    drop(new_rows);
    let winners = dedup_winners(&all, dedup)?;
    let all_dates = dates(&all, "date")?;
    let mut after: HashMap<i32, u64> = HashMap::new();
    for &i in &winners {
        *after.entry(all_dates.value(i as usize)).or_default() += 1;
    }
    let days: BTreeSet<i32> = days
        .into_iter()
        .filter(|d| after.get(d).copied().unwrap_or(0) != before.get(d).copied().unwrap_or(0))
        .collect();
    if days.is_empty() {
        let table = lake::record_progress(table, loc, schema, "date", txns).await?;
        return Ok((table, nothing));
    }
    let keep: UInt32Array = winners
        .into_iter()
        .filter(|i| days.contains(&all_dates.value(*i as usize)))
        .collect();
    let out = take_record_batch(&all, &keep).map_err(arrow_err)?;
    drop(all);
    let out = sort_batch(&out, dedup.sort)?;
    let rows_out = out.num_rows() as u64;
    let deduped = started.elapsed().as_secs_f64();
    let dates_rewritten = days.len() as u64;
    let table = lake::replace_where(
        ctx,
        table,
        loc,
        schema,
        "date",
        vec![out],
        date_in("date", &days),
        txns,
    )
    .await?;
    tracing::debug!(
        table = loc,
        rows_out,
        dates = dates_rewritten,
        read_held_s = read_held,
        dedup_s = deduped - read_held,
        write_s = started.elapsed().as_secs_f64() - deduped,
        "silver merge"
    );
    Ok((
        table,
        Merged {
            rows_out,
            dates_rewritten,
        },
    ))
}

fn arrow_err(e: ArrowError) -> PipelineError {
    PipelineError::Arrow(e.to_string())
}

/// The columns of `batch` named in the comma-separated `list`, in Arrow's
/// row format: ascending, nulls last (DataFusion's `ORDER BY` default).
fn rows_of(batch: &RecordBatch, list: &str) -> Result<Rows, PipelineError> {
    let columns = list
        .split(',')
        .map(|name| {
            let name = name.trim();
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| PipelineError::Arrow(format!("no column {name}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fields = columns
        .iter()
        .map(|c| {
            SortField::new_with_options(
                c.data_type().clone(),
                SortOptions {
                    descending: false,
                    nulls_first: false,
                },
            )
        })
        .collect();
    RowConverter::new(fields)
        .and_then(|conv| conv.convert_columns(&columns))
        .map_err(arrow_err)
}

/// Indices (ascending) of the rows of `batch` that win their identity
/// (`dedup.key`): the first in `dedup.order`, the earlier row on a tie.
fn dedup_winners(batch: &RecordBatch, dedup: &Dedup<'_>) -> Result<Vec<u32>, PipelineError> {
    let keys = rows_of(batch, dedup.key)?;
    let order = rows_of(batch, dedup.order)?;
    let mut best: HashMap<Row<'_>, u32> = HashMap::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        match best.entry(keys.row(i)) {
            Entry::Occupied(mut e) => {
                if order.row(i) < order.row(*e.get() as usize) {
                    e.insert(i as u32);
                }
            }
            Entry::Vacant(e) => {
                e.insert(i as u32);
            }
        }
    }
    let mut winners: Vec<u32> = best.into_values().collect();
    winners.sort_unstable();
    Ok(winners)
}

/// `batch` ordered by the comma-separated columns `sort` (stable).
fn sort_batch(batch: &RecordBatch, sort: &str) -> Result<RecordBatch, PipelineError> {
    let rows = rows_of(batch, sort)?;
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    order.sort_by(|a, b| rows.row(*a as usize).cmp(&rows.row(*b as usize)));
    take_record_batch(batch, &UInt32Array::from(order)).map_err(arrow_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::datatypes::{Field, Schema};

    fn dated(days: &[(i32, usize)], text_bytes: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("date", DataType::Date32, false),
            Field::new("id", DataType::Utf8, false),
            Field::new("received", DataType::Int64, true),
            Field::new("text", DataType::Utf8, false),
        ]));
        let mut date = Vec::new();
        let mut id = Vec::new();
        for &(d, n) in days {
            for i in 0..n {
                date.push(d);
                id.push(format!("{d}-{i}"));
            }
        }
        let n = date.len();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Date32Array::from(date)),
                Arc::new(StringArray::from(id)),
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
                Arc::new(StringArray::from(vec!["x".repeat(text_bytes); n])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn dates_are_chunked_to_the_budget_in_order() {
        let b = dated(&[(3, 100), (1, 100), (2, 300), (4, 10)], 100);
        let all = date_chunks(&b, usize::MAX).unwrap();
        assert_eq!(all, vec![BTreeSet::from([1, 2, 3, 4])]);
        // Each row counts twice its size: a budget of ~400 rows' worth.
        let row = b.get_array_memory_size() / b.num_rows();
        let chunks = date_chunks(&b, row * 2 * 400).unwrap();
        assert_eq!(
            chunks,
            vec![BTreeSet::from([1, 2]), BTreeSet::from([3, 4])],
            "in date order, a date never split"
        );
        // A date larger than the budget is a chunk of its own.
        let one_each = date_chunks(&b, 1).unwrap();
        assert_eq!(one_each.len(), 4);
        assert!(date_chunks(&dated(&[], 1), 1).unwrap().is_empty());
    }

    /// The table at `loc`, checked to be at `version` with `app` progress.
    async fn reloaded(loc: &str, version: u64, app: i64, why: &str) -> DeltaTable {
        let table = lake::load_table(loc, &HashMap::new())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(table.version().unwrap(), version, "{why}");
        assert_eq!(
            lake::app_version(&table, loc, "app").await.unwrap(),
            Some(app)
        );
        table
    }

    /// With a pool small enough that each date is its own chunk, a merge
    /// commits per chunk, records the progress once at the end, keeps every
    /// row once and a rerun of the same rows rewrites nothing.
    #[tokio::test]
    async fn chunked_merge_is_complete_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let loc = dir.path().join("t").to_str().unwrap().to_string();
        let rows = dated(&[(20_000, 2_000), (20_001, 2_000), (20_002, 2_000)], 1_000);
        let schema = rows.schema();
        let table = lake::open_or_create(&loc, &HashMap::new(), &schema, "date", "test")
            .await
            .unwrap();
        let created = table.version().unwrap();
        let ctx = lake::session(16 << 20).unwrap();
        assert_eq!(date_chunks(&rows, merge_budget(&ctx)).unwrap().len(), 3);
        let dedup = Dedup {
            key: "date, id",
            order: "received",
            sort: "date, id",
        };
        // The same rows twice in one batch: duplicates count once.
        let doubled = concat_batches(&schema, [&rows, &rows]).unwrap();
        let m = merge_dedup(&ctx, table, &loc, &schema, doubled, &dedup, &[("app", 7)])
            .await
            .unwrap();
        assert_eq!((m.rows_out, m.dates_rewritten), (6_000, 3));
        let table = reloaded(&loc, created + 3, 7, "one commit per chunk").await;
        let m = merge_dedup(&ctx, table, &loc, &schema, rows, &dedup, &[("app", 8)])
            .await
            .unwrap();
        assert_eq!((m.rows_out, m.dates_rewritten), (0, 0));
        let table = reloaded(&loc, created + 4, 8, "only the progress").await;
        ctx.register_table("t", lake::provider(&ctx, &table, &loc).await.unwrap())
            .unwrap();
        let n = ctx
            .sql("SELECT count(*) AS n, count(DISTINCT id) AS d FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let (n, d) = (ints(&n[0], "n").unwrap(), ints(&n[0], "d").unwrap());
        assert_eq!((n.value(0), d.value(0)), (6_000, 6_000));
    }

    #[tokio::test]
    async fn a_date_larger_than_the_pool_fails_with_what_to_raise() {
        let dir = tempfile::tempdir().unwrap();
        let loc = dir.path().join("t").to_str().unwrap().to_string();
        // ~20 MB on one date, against a 16 MiB pool.
        let rows = dated(&[(20_000, 20_000)], 1_000);
        let schema = rows.schema();
        let table = lake::open_or_create(&loc, &HashMap::new(), &schema, "date", "test")
            .await
            .unwrap();
        let ctx = lake::session(16 << 20).unwrap();
        let dedup = Dedup {
            key: "date, id",
            order: "received",
            sort: "id",
        };
        let err = merge_dedup(&ctx, table, &loc, &schema, rows, &dedup, &[])
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PipelineError::Memory { .. }), "{text}");
        assert!(text.contains("pipeline.memory_limit_bytes"), "{text}");
    }

    fn batch(ids: &[&str], received: &[Option<i64>], tag: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("received", DataType::Int64, true),
            Field::new("tag", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(Int64Array::from(received.to_vec())),
                Arc::new(StringArray::from(tag.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn first_in_order_wins_nulls_last_and_ties_keep_the_earlier_row() {
        let b = batch(
            &["a", "a", "b", "b", "c", "c"],
            &[Some(5), Some(3), None, Some(9), Some(1), Some(1)],
            &["late", "early", "null", "nine", "first", "second"],
        );
        let d = Dedup {
            key: "id",
            order: "received",
            sort: "tag",
        };
        assert_eq!(dedup_winners(&b, &d).unwrap(), vec![1, 3, 4]);
        let sorted = sort_batch(&b, "id, received").unwrap();
        let tags = strings(&sorted, "tag").unwrap();
        let tags: Vec<&str> = (0..tags.len()).map(|i| tags.value(i)).collect();
        assert_eq!(tags, ["early", "late", "nine", "null", "first", "second"]);
    }
}
