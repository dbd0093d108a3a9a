//! `gold.daily_faults` and `gold.fault_ranking`.
//!
//! Both follow their source incrementally through its Delta log (see
//! [`crate::lake`]): `gold.daily_faults` records the silver version it has
//! processed and recomputes the event dates whose silver partitions changed;
//! `gold.fault_ranking` records the daily_faults version and recomputes the
//! months containing changed dates. Tracking the source log, rather than
//! being told by the silver job what it rewrote, keeps gold correct when a run
//! stops between stages or when `--stage gold` runs alone. Both run through
//! the shared gold driver ([`crate::gold_job`]); this module holds their SQL
//! and the scope decision every incremental job shares.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use deltalake::arrow::array::{Array, Int64Array, RecordBatch};
use deltalake::datafusion::prelude::{Expr, lit};
use deltalake::datafusion::scalar::ScalarValue;
use schemas::tables::{
    GOLD_DAILY_FAULTS, GOLD_FAULT_RANKING, SILVER_STATUS_EVENTS, daily_faults_schema,
    fault_ranking_schema,
};

use crate::gold_job::{GoldJob, Partition, SRC, Sql, WHERE};
use crate::lake;
use crate::silver::days_of_date;
use crate::{PipelineError, RunOptions, TableSummary};

/// SQL name of the daily table.
pub const DAILY_TABLE: &str = "gold.daily_faults";
/// SQL name of the ranking table.
pub const RANKING_TABLE: &str = "gold.fault_ranking";
/// Application transaction id in daily_faults: version = silver version read.
pub const DAILY_APP_ID: &str = "pipeline-gold-daily_faults";
/// Application transaction id in fault_ranking: version = daily_faults
/// version read.
pub const RANKING_APP_ID: &str = "pipeline-gold-fault_ranking";

/// What part of a table a run recomputes.
pub(crate) enum Scope {
    /// Everything (first run, or the source log is gone).
    All,
    /// These source partitions (values of the source's partition column).
    Partitions(BTreeSet<String>),
    /// The `--from/--to` range.
    Range,
}

/// Decides the scope from the recorded progress; `None` = up to date.
pub(crate) async fn scope(
    source: &deltalake::DeltaTable,
    source_loc: &str,
    source_version: u64,
    done: Option<i64>,
    opts: &RunOptions,
) -> Result<Option<Scope>, PipelineError> {
    if opts.is_range() {
        return Ok(Some(Scope::Range));
    }
    match done {
        None => Ok(Some(Scope::All)),
        Some(v) if v >= source_version as i64 => Ok(None),
        Some(v) => {
            let changes =
                lake::changes_between(source, source_loc, v.max(0) as u64, source_version, "date")
                    .await?;
            if changes.complete {
                let mut parts = changes.partitions;
                parts.extend(changes.reread_partitions);
                Ok(Some(Scope::Partitions(parts)))
            } else {
                tracing::warn!(
                    table = source_loc,
                    since = v,
                    "log entries are gone: recomputing everything"
                );
                Ok(Some(Scope::All))
            }
        }
    }
}

pub(crate) fn parse_days(parts: &BTreeSet<String>) -> BTreeSet<i32> {
    parts
        .iter()
        .filter_map(|p| NaiveDate::parse_from_str(p, "%Y-%m-%d").ok())
        .map(days_of_date)
        .collect()
}

pub(crate) fn date_lit(d: NaiveDate) -> Expr {
    lit(ScalarValue::Date32(Some(days_of_date(d))))
}

pub(crate) fn first_i64(batches: &[RecordBatch]) -> u64 {
    batches
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Int64Array>().cloned())
        .filter(|a| !a.is_empty() && !a.is_null(0))
        .map(|a| a.value(0).max(0) as u64)
        .unwrap_or(0)
}

pub(crate) fn empty(name: &str) -> TableSummary {
    TableSummary {
        name: name.into(),
        rows_in: 0,
        rows_out: 0,
        dates_rewritten: 0,
        seconds: 0.0,
    }
}

/// `gold.daily_faults`: faulted status events per station per event date,
/// recomputed for the dates whose silver rows changed.
pub(crate) fn daily_faults() -> GoldJob {
    GoldJob {
        name: DAILY_TABLE,
        source: SILVER_STATUS_EVENTS,
        target: GOLD_DAILY_FAULTS,
        schema: daily_faults_schema(),
        partition: Partition::Date,
        app_id: DAILY_APP_ID,
        comment: "gold.daily_faults: faulted status events per station per UTC event date",
        source_date: "date",
        pin: None,
        compute: Box::new(Sql {
            count: format!("SELECT COUNT(*) FROM {SRC} WHERE is_fault AND {WHERE}"),
            select: format!(
                "SELECT date, station_id, COUNT(*) AS fault_count FROM (
                     SELECT CAST(date AS DATE) AS date, CAST(station_id AS VARCHAR) AS station_id
                     FROM {SRC} WHERE is_fault AND {WHERE})
                 GROUP BY date, station_id ORDER BY date, station_id"
            ),
        }),
    }
}

/// `gold.fault_ranking`, recomputed for the months whose daily faults
/// changed.
///
/// Per month, a station is listed if on at least one day it had at least
/// `fault_threshold` faults. `total_faults` counts all its faults that month
/// (also on days below the threshold); `days_with_5_or_more` counts the days
/// at or above the configured threshold (the column keeps the design's name
/// whatever the threshold); `worst_day` is its day with the most faults (the
/// earliest such day on a tie). `rank` is a row number: 1, 2, 3, ... by
/// `total_faults` descending, ties broken by `station_id` ascending, so every
/// station has a distinct, stable rank and a report can sort by it.
pub(crate) fn fault_ranking(fault_threshold: u32) -> GoldJob {
    let threshold = fault_threshold.max(1);
    GoldJob {
        name: RANKING_TABLE,
        source: GOLD_DAILY_FAULTS,
        target: GOLD_FAULT_RANKING,
        schema: fault_ranking_schema(),
        partition: Partition::Month,
        app_id: RANKING_APP_ID,
        comment: "gold.fault_ranking: per month, stations with a day at or above the fault threshold",
        source_date: "date",
        pin: None,
        compute: Box::new(Sql {
            count: format!("SELECT COUNT(*) FROM {SRC} WHERE {WHERE}"),
            select: format!(
                "WITH d AS (
                     SELECT to_char(date, '%Y-%m') AS month, date, station_id, fault_count
                     FROM (SELECT CAST(date AS DATE) AS date,
                                  CAST(station_id AS VARCHAR) AS station_id,
                                  CAST(fault_count AS BIGINT) AS fault_count
                           FROM {SRC} WHERE {WHERE})),
                 s AS (
                     SELECT month, station_id,
                            SUM(fault_count) AS total_faults,
                            SUM(CASE WHEN fault_count >= {threshold} THEN 1 ELSE 0 END) AS days_at_threshold
                     FROM d GROUP BY month, station_id),
                 w AS (
                     SELECT month, station_id, date AS worst_day, fault_count AS worst_day_faults,
                            row_number() OVER (PARTITION BY month, station_id
                                               ORDER BY fault_count DESC, date ASC) AS rn
                     FROM d)
                 SELECT s.month AS month, s.station_id AS station_id, s.total_faults AS total_faults,
                        s.days_at_threshold AS days_with_5_or_more,
                        w.worst_day AS worst_day, w.worst_day_faults AS worst_day_faults,
                        CAST(row_number() OVER (PARTITION BY s.month
                                                ORDER BY s.total_faults DESC, s.station_id ASC)
                             AS BIGINT) AS \"rank\"
                 FROM s JOIN w ON s.month = w.month AND s.station_id = w.station_id AND w.rn = 1
                 WHERE s.days_at_threshold > 0
                 ORDER BY month, \"rank\""
            ),
        }),
    }
}
