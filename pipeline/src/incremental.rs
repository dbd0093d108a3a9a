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
pub(crate) struct Merged {
    pub rows_out: u64,
    pub dates_rewritten: u64,
}

/// Merges `new_rows` (of `schema`, first column `date`) into the silver
/// table: per date they touch, the union with the rows already there,
/// deduplicated on `dedup.key`, replaces the partition, recording `txns` in
/// the same commit.
///
/// A date is rewritten only when deduplication leaves it more rows than it
/// holds: re-read copies (after bronze compaction, or a `--from/--to`
/// reprocessing) then cost no commit and no downstream recomputation.
///
/// The rows are in memory already (decoded from bronze), so deduplication
/// and ordering run on them directly in Arrow's row format rather than as a
/// DataFusion window query: only the rows the table holds on the touched
/// dates are read through DataFusion.
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
    let nothing = Merged {
        rows_out: 0,
        dates_rewritten: 0,
    };
    let days: BTreeSet<i32> = dates(&new_rows, "date")?.iter().flatten().collect();
    if days.is_empty() {
        lake::record_progress(table, loc, schema, "date", txns).await?;
        return Ok(nothing);
    }
    let started = std::time::Instant::now();
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
        lake::record_progress(table, loc, schema, "date", txns).await?;
        return Ok(nothing);
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
    lake::replace_where(
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
        dates = days.len(),
        read_held_s = read_held,
        dedup_s = deduped - read_held,
        write_s = started.elapsed().as_secs_f64() - deduped,
        "silver merge"
    );
    Ok(Merged {
        rows_out,
        dates_rewritten: days.len() as u64,
    })
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
