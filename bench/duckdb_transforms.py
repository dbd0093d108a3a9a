#!/usr/bin/env python3
"""The fault slice of the pipeline as DuckDB SQL over the bronze Parquet files.

Same transforms as the Rust pipeline (pipeline/src/silver.rs, gold.rs):

  silver.status_events  StatusNotification (1.6 and 2.x) and NotifyEvent
                        AvailabilityState changes from charger CALLs, event
                        time from the payload (else received_at), deduplicated
                        on (date, station_id, message_id, action, event_index),
                        first received wins;
  gold.daily_faults     faults per station per UTC day;
  gold.fault_ranking    per month, stations with >= THRESHOLD faults on some
                        day, ranked by total faults (ties by station id), with
                        their worst day.

The files read are exactly those of the current Delta snapshot: the script
replays bronze's _delta_log (add/remove actions) instead of globbing, so
compacted-away files are not double counted. Outputs are written as Parquet
(like the pipeline writes Delta) so both engines do the same work end to end.

Usage: duckdb_transforms.py LAKE_DIR OUT_DIR [--threshold 5] [--memory 512MB]
                            [--compare]   (compare with the pipeline's
                                           gold.fault_ranking and daily_faults)
Prints one JSON object on stdout.
"""

import argparse
import glob
import json
import os
import sys
import time

import duckdb


def active_files(table_dir):
    """Data files of the Delta table's current snapshot (JSON log replay)."""
    log = os.path.join(table_dir, "_delta_log")
    commits = sorted(glob.glob(os.path.join(log, "[0-9]" * 20 + ".json")))
    if not commits or not commits[0].endswith("00000000000000000000.json"):
        sys.exit(f"{log}: commit 0 is gone (log cleaned up); cannot replay the log")
    files = {}
    for path in commits:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                action = json.loads(line)
                if "add" in action:
                    files[action["add"]["path"]] = True
                elif "remove" in action:
                    files.pop(action["remove"]["path"], None)
    from urllib.parse import unquote

    return [os.path.join(table_dir, unquote(p)) for p in files]


def parquet_source(paths):
    listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
    return f"read_parquet([{listed}], hive_partitioning = true)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lake")
    ap.add_argument("out")
    ap.add_argument("--threshold", type=int, default=5)
    ap.add_argument("--memory", default="512MB")
    ap.add_argument("--compare", action="store_true")
    a = ap.parse_args()

    os.makedirs(a.out, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET memory_limit = '{a.memory}'")
    con.execute(f"SET temp_directory = '{os.path.join(a.out, 'spill')}'")

    started = time.monotonic()
    bronze = active_files(os.path.join(a.lake, "bronze", "ocpp_messages"))
    con.execute(f"CREATE VIEW bronze AS SELECT * FROM {parquet_source(bronze)}")
    bronze_rows = con.execute("SELECT COUNT(*) FROM bronze").fetchone()[0]
    count_seconds = time.monotonic() - started

    started = time.monotonic()
    con.execute(
        """
        CREATE TABLE status_events AS
        WITH calls AS (
            SELECT station_id, ocpp_version, message_id, action, payload, received_at
            FROM bronze
            WHERE direction = 'cs_to_csms' AND message_type = 2
              AND action IN ('StatusNotification', 'NotifyEvent')
              AND payload IS NOT NULL AND json_valid(payload)),
        sn AS (
            SELECT station_id, ocpp_version, message_id, action, received_at,
                   CASE WHEN ocpp_version = '1.6' THEN NULL
                        ELSE TRY_CAST(payload->>'$.evseId' AS INTEGER) END AS evse_id,
                   TRY_CAST(payload->>'$.connectorId' AS INTEGER) AS connector_id,
                   CASE WHEN ocpp_version = '1.6' THEN payload->>'$.status'
                        ELSE payload->>'$.connectorStatus' END AS status,
                   CASE WHEN ocpp_version = '1.6'
                        THEN NULLIF(payload->>'$.errorCode', 'NoError') END AS error_code,
                   CASE WHEN ocpp_version = '1.6' THEN payload->>'$.info' END AS info,
                   CASE WHEN ocpp_version = '1.6' THEN payload->>'$.vendorErrorCode' END
                       AS vendor_error_code,
                   TRY_CAST(payload->>'$.timestamp' AS TIMESTAMPTZ) AS payload_time,
                   0 AS event_index
            FROM calls WHERE action = 'StatusNotification'),
        ne_raw AS (
            SELECT c.station_id, c.ocpp_version, c.message_id, c.action, c.received_at,
                   o.ord, e.ev
            FROM calls c,
                 LATERAL (SELECT unnest(generate_series(1, CAST(json_array_length(c.payload, '$.eventData') AS BIGINT)))
                                 AS ord) o,
                 LATERAL (SELECT json_extract(c.payload, '$.eventData[' || (o.ord - 1) || ']') AS ev) e
            WHERE c.action = 'NotifyEvent' AND c.ocpp_version <> '1.6'),
        ne AS (
            SELECT station_id, ocpp_version, message_id, action, received_at,
                   CASE ev->>'$.component.name'
                        WHEN 'ChargingStation' THEN 0
                        ELSE TRY_CAST(ev->>'$.component.evse.id' AS INTEGER) END AS evse_id,
                   CASE ev->>'$.component.name'
                        WHEN 'Connector' THEN TRY_CAST(ev->>'$.component.evse.connectorId' AS INTEGER)
                        ELSE 0 END AS connector_id,
                   ev->>'$.actualValue' AS status,
                   ev->>'$.techCode' AS error_code,
                   ev->>'$.techInfo' AS info,
                   NULL AS vendor_error_code,
                   TRY_CAST(ev->>'$.timestamp' AS TIMESTAMPTZ) AS payload_time,
                   row_number() OVER (PARTITION BY station_id, message_id, received_at
                                      ORDER BY ord) - 1 AS event_index
            FROM ne_raw
            WHERE ev->>'$.variable.name' = 'AvailabilityState'
              AND ev->>'$.trigger' IN ('Alerting', 'Delta')
              AND ev->>'$.component.name' IN ('Connector', 'EVSE', 'ChargingStation')
              AND ev->>'$.actualValue' IS NOT NULL),
        events AS (
            SELECT *, coalesce(payload_time, received_at) AS event_time
            FROM (SELECT * FROM sn UNION ALL SELECT * FROM ne)
            WHERE status IS NOT NULL AND connector_id IS NOT NULL
              AND (ocpp_version = '1.6' OR evse_id IS NOT NULL))
        SELECT CAST(event_time AS DATE) AS date, station_id, evse_id, connector_id, status,
               status = 'Faulted' AS is_fault, error_code, info, vendor_error_code,
               event_time, received_at, ocpp_version, message_id, action, event_index
        FROM events
        QUALIFY row_number() OVER (
            PARTITION BY CAST(event_time AS DATE), station_id, message_id, action, event_index
            ORDER BY received_at) = 1
        ORDER BY date, station_id, event_time, connector_id
        """
    )
    con.execute(
        """
        CREATE TABLE daily_faults AS
        SELECT date, station_id, COUNT(*) AS fault_count
        FROM status_events WHERE is_fault
        GROUP BY date, station_id ORDER BY date, station_id
        """
    )
    con.execute(
        f"""
        CREATE TABLE fault_ranking AS
        WITH d AS (SELECT strftime(date, '%Y-%m') AS month, date, station_id, fault_count
                   FROM daily_faults),
        s AS (SELECT month, station_id, SUM(fault_count) AS total_faults,
                     SUM(CASE WHEN fault_count >= {a.threshold} THEN 1 ELSE 0 END) AS days_at
              FROM d GROUP BY month, station_id),
        w AS (SELECT month, station_id, date AS worst_day, fault_count AS worst_day_faults
              FROM d
              QUALIFY row_number() OVER (PARTITION BY month, station_id
                                         ORDER BY fault_count DESC, date) = 1)
        SELECT s.month, s.station_id, s.total_faults, s.days_at AS days_with_5_or_more,
               w.worst_day, w.worst_day_faults,
               rank() OVER (PARTITION BY s.month ORDER BY s.total_faults DESC, s.station_id)
                   AS rank
        FROM s JOIN w USING (month, station_id)
        WHERE s.days_at > 0
        ORDER BY month, rank
        """
    )
    for t in ("status_events", "daily_faults", "fault_ranking"):
        con.execute(
            f"COPY {t} TO '{os.path.join(a.out, t)}' "
            "(FORMAT parquet, PARTITION_BY ("
            + ("month" if t == "fault_ranking" else "date")
            + "), OVERWRITE_OR_IGNORE true)"
        )
    seconds = time.monotonic() - started

    counts = {
        t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("status_events", "daily_faults", "fault_ranking")
    }
    result = {
        "bronze_rows": bronze_rows,
        "bronze_files": len(bronze),
        "count_seconds": count_seconds,
        "seconds": seconds,
        "rows": counts,
    }

    if a.compare:
        def rust_table(name):
            return parquet_source(active_files(os.path.join(a.lake, *name.split("/"))))

        cols = ("month, station_id, total_faults, days_with_5_or_more, "
                "CAST(worst_day AS DATE) AS worst_day, worst_day_faults, rank")
        con.execute(f"CREATE VIEW rust_ranking AS SELECT {cols} FROM {rust_table('gold/fault_ranking')}")
        con.execute(f"CREATE VIEW duck_ranking AS SELECT {cols} FROM fault_ranking")
        only_rust = con.execute(
            "SELECT COUNT(*) FROM (SELECT * FROM rust_ranking EXCEPT ALL SELECT * FROM duck_ranking)"
        ).fetchone()[0]
        only_duck = con.execute(
            "SELECT COUNT(*) FROM (SELECT * FROM duck_ranking EXCEPT ALL SELECT * FROM rust_ranking)"
        ).fetchone()[0]
        rust_rows = con.execute("SELECT COUNT(*) FROM rust_ranking").fetchone()[0]
        con.execute(
            "CREATE VIEW rust_daily AS SELECT CAST(date AS DATE) AS date, station_id, fault_count "
            f"FROM {rust_table('gold/daily_faults')}"
        )
        daily_diff = con.execute(
            """SELECT COUNT(*) FROM (
                 (SELECT * FROM rust_daily EXCEPT ALL SELECT * FROM daily_faults)
                 UNION ALL
                 (SELECT * FROM daily_faults EXCEPT ALL SELECT * FROM rust_daily))"""
        ).fetchone()[0]
        rust_events = con.execute(
            f"SELECT COUNT(*) FROM {rust_table('silver/status_events')}"
        ).fetchone()[0]
        result["compare"] = {
            "fault_ranking_rows_rust": rust_rows,
            "fault_ranking_rows_duckdb": counts["fault_ranking"],
            "fault_ranking_only_rust": only_rust,
            "fault_ranking_only_duckdb": only_duck,
            "daily_faults_differences": daily_diff,
            "status_events_rows_rust": rust_events,
            "status_events_rows_duckdb": counts["status_events"],
            "equal": only_rust == 0 and only_duck == 0 and daily_diff == 0
            and rust_events == counts["status_events"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
