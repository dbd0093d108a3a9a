//! `gold.transactions_completed` (one row per completed transaction, by stop
//! date) and `gold.completed_transactions` (per station per stop date).
//!
//! Incremental like the fault tables ([`crate::gold`]): each records the
//! version of its source it has read. `silver.transactions` is partitioned by
//! start date but the detail by stop date, so a changed silver partition
//! maps to the stop dates of its transactions plus the detail dates those
//! transactions were on before; those dates are recomputed from all of
//! silver (a filter on `stopped_at`). The daily table recomputes the dates
//! whose detail partitions changed. Both run through the shared gold driver
//! ([`crate::gold_job`]).

use std::collections::BTreeSet;

use deltalake::datafusion::prelude::SessionContext;
use futures_util::future::BoxFuture;
use schemas::tables::{
    GOLD_COMPLETED_TRANSACTIONS, GOLD_TRANSACTIONS_COMPLETED, SILVER_TRANSACTIONS,
    completed_transactions_schema, transactions_completed_schema,
};

use crate::PipelineError;
use crate::gold_job::{CUR, Compute, Computed, GoldJob, Partition, SRC, Sql, WHERE};
use crate::incremental::dates;
use crate::silver::date_in_sql;

/// SQL name of the detail table.
pub const DETAIL_TABLE: &str = "gold.transactions_completed";
/// SQL name of the daily table.
pub const DAILY_TABLE: &str = "gold.completed_transactions";
/// Application transaction id in the detail: silver.transactions version read.
pub const DETAIL_APP_ID: &str = "pipeline-gold-transactions_completed";
/// Application transaction id in the daily table: detail version read.
pub const DAILY_APP_ID: &str = "pipeline-gold-completed_transactions";

const STOP_DATE: &str = "CAST(stopped_at AS DATE)";

/// The detail's computation: by stop date, so changed start-date partitions
/// of `silver.transactions` map to other dates.
struct Detail(Sql);

impl Compute for Detail {
    fn compute<'a>(
        &'a self,
        ctx: &'a SessionContext,
        where_sql: &'a str,
    ) -> BoxFuture<'a, Result<Computed, PipelineError>> {
        self.0.compute(ctx, where_sql)
    }

    /// The stop dates of the transactions on the changed start dates, and
    /// the detail dates those transactions were on before.
    fn affected<'a>(
        &'a self,
        ctx: &'a SessionContext,
        changed: BTreeSet<i32>,
    ) -> BoxFuture<'a, Result<BTreeSet<i32>, PipelineError>> {
        Box::pin(async move {
            let cond = date_in_sql("date", &changed);
            let found = ctx
                .sql(&format!(
                    "SELECT DISTINCT {STOP_DATE} AS date FROM {SRC}
                       WHERE is_complete AND {cond}
                     UNION
                     SELECT DISTINCT CAST(g.date AS DATE) AS date FROM {CUR} g
                       JOIN (SELECT station_id AS s, transaction_id AS t
                             FROM {SRC} WHERE {cond}) k
                       ON g.station_id = k.s AND g.transaction_id = k.t"
                ))
                .await?
                .collect()
                .await?;
            let mut days = BTreeSet::new();
            for b in &found {
                days.extend(dates(b, "date")?.iter().flatten());
            }
            Ok(days)
        })
    }
}

/// `gold.transactions_completed`, recomputed for the stop dates touched by
/// changed `silver.transactions` partitions.
pub(crate) fn transactions_completed() -> GoldJob {
    GoldJob {
        name: DETAIL_TABLE,
        source: SILVER_TRANSACTIONS,
        target: GOLD_TRANSACTIONS_COMPLETED,
        schema: transactions_completed_schema(),
        partition: Partition::Date,
        app_id: DETAIL_APP_ID,
        comment: "gold.transactions_completed: completed transactions by UTC stop date",
        source_date: STOP_DATE,
        pin: None,
        compute: Box::new(Detail(Sql {
            count: format!("SELECT COUNT(*) FROM {SRC} WHERE is_complete AND {WHERE}"),
            select: format!(
                "SELECT {STOP_DATE} AS date, CAST(station_id AS VARCHAR) AS station_id,
                        CAST(transaction_id AS VARCHAR) AS transaction_id,
                        CAST(id_token AS VARCHAR) AS id_token, started_at, stopped_at,
                        (CAST(stopped_at AS BIGINT) - CAST(started_at AS BIGINT)) / 1000000
                            AS duration_s,
                        energy_wh / 1000.0 AS energy_kwh,
                        CAST(energy_flag AS VARCHAR) AS energy_flag
                 FROM {SRC} WHERE is_complete AND {WHERE}"
            ),
        })),
    }
}

/// `gold.completed_transactions`, recomputed for the dates whose detail
/// rows changed. `energy_kwh` sums unflagged transactions (flagged ones have
/// no energy); `p95_duration_s` is the exact 95th percentile, linearly
/// interpolated between the two nearest ranks (as `percentile_cont`, whose
/// floating-point result is off in the sixth digit), in integer arithmetic
/// until the final division.
pub(crate) fn completed_transactions() -> GoldJob {
    GoldJob {
        name: DAILY_TABLE,
        source: GOLD_TRANSACTIONS_COMPLETED,
        target: GOLD_COMPLETED_TRANSACTIONS,
        schema: completed_transactions_schema(),
        partition: Partition::Date,
        app_id: DAILY_APP_ID,
        comment: "gold.completed_transactions: completed transactions per station per UTC stop date",
        source_date: "date",
        pin: None,
        compute: Box::new(Sql {
            count: format!("SELECT COUNT(*) FROM {SRC} WHERE {WHERE}"),
            select: format!(
                "WITH b AS (
                     SELECT CAST(date AS DATE) AS date, CAST(station_id AS VARCHAR) AS station_id,
                            energy_kwh, duration_s
                     FROM {SRC} WHERE {WHERE}),
                 r AS (
                     SELECT *, CAST(row_number() OVER (PARTITION BY date, station_id
                                                       ORDER BY duration_s) AS BIGINT) - 1 AS i,
                            CAST(COUNT(*) OVER (PARTITION BY date, station_id) AS BIGINT) AS n
                     FROM b),
                 p AS (SELECT *, (95 * (n - 1)) / 100 AS lo, (95 * (n - 1)) % 100 AS frac FROM r)
                 SELECT date, station_id, COUNT(*) AS transactions,
                        COALESCE(SUM(energy_kwh), 0.0) AS energy_kwh,
                        SUM(duration_s) AS total_duration_s,
                        AVG(CAST(duration_s AS DOUBLE)) AS avg_duration_s,
                        CAST(MAX(CASE WHEN i = lo THEN duration_s END) AS DOUBLE)
                          + CAST(COALESCE(MAX(CASE WHEN i = lo + 1 THEN duration_s END)
                                          - MAX(CASE WHEN i = lo THEN duration_s END), 0)
                                 * MAX(frac) AS DOUBLE) / 100.0 AS p95_duration_s
                 FROM p
                 GROUP BY date, station_id ORDER BY date, station_id"
            ),
        }),
    }
}
