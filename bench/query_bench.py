#!/usr/bin/env python3
"""Query latency: csms's POST /api/sql against DuckDB over the same files.

The queries an analyst runs most (see bench/README.md):

  floor            SELECT 1: the fixed cost of one HTTP round trip + planning
  gold point       gold.fault_ranking for one month and station,
                   gold.daily_faults for one station and day
  bronze month     count by action and direction over one month of
                   bronze.ocpp_messages, and a LIKE filter on the payload text
                   (DataFusion here has no JSON functions, so LIKE is the
                   filter both engines can run alike)

Each query runs --warmup times unmeasured, then --runs times per engine,
alternating csms and DuckDB so background noise hits both. csms is timed from
sending the request to the parsed JSON rows (urllib, a new connection per
request, the way a script or notebook calls it); DuckDB from execute() to
fetched Python rows, in process. DuckDB reads exactly the files of each Delta
table's current snapshot (replayed from _delta_log, as
bench/duckdb_transforms.py does) through views named like the csms tables, so
the SQL text is the same for both.

Both engines must return the same rows (as multisets, compared column by
column by name); the script exits non-zero when any query differs.

Usage: query_bench.py --url http://127.0.0.1:PORT --token TOKEN --lake DIR
                      [--runs 20] [--warmup 2] [--month YYYY-MM]
                      [--label "debug build, ..."]
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

import duckdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from duckdb_transforms import active_files, parquet_source  # noqa: E402

TABLES = ("bronze/ocpp_messages", "gold/fault_ranking", "gold/daily_faults")


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


class Csms:
    def __init__(self, url, token):
        self.url = url.rstrip("/") + "/api/sql"
        self.token = token

    def run(self, sql):
        req = urllib.request.Request(
            self.url,
            data=sql.encode(),
            method="POST",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                "Content-Type": "text/plain",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            sys.exit(f"csms refused {sql!r}: HTTP {e.code} {e.read().decode(errors='replace')}")


class Duck:
    def __init__(self, lake):
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        self.files = {}
        for name in TABLES:
            schema, table = name.split("/")
            files = active_files(os.path.join(lake, schema, table))
            self.files[name] = len(files)
            self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            self.con.execute(f"CREATE VIEW {schema}.{table} AS SELECT * FROM {parquet_source(files)}")

    def run(self, sql):
        cur = self.con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]


def canonical(rows):
    """Rows as a sorted list of (column, text) tuples: engine-neutral (dates
    print alike, column order and row order do not matter)."""

    def text(v):
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return str(v)

    return sorted(
        (tuple(sorted((k, text(v)) for k, v in r.items())) for r in rows),
        key=repr,
    )


def pick_parameters(duck, month):
    """A month, a station ranked in it and a (station, day) with faults, so
    the point queries return rows; taken from the gold tables themselves."""
    where = f"WHERE month = '{month}'" if month else ""
    r = duck.con.execute(
        f"SELECT month, station_id, CAST(worst_day AS DATE) FROM gold.fault_ranking {where} "
        "ORDER BY month, rank LIMIT 1"
    ).fetchone()
    if r is None:
        # No station crossed the threshold: fall back to any day with faults.
        r = duck.con.execute(
            "SELECT strftime(CAST(date AS DATE), '%Y-%m'), station_id, CAST(date AS DATE) "
            "FROM gold.daily_faults "
            + (f"WHERE strftime(CAST(date AS DATE), '%Y-%m') = '{month}' " if month else "")
            + "ORDER BY fault_count DESC, date, station_id LIMIT 1"
        ).fetchone()
    if r is None:
        sys.exit("the gold tables are empty: simulate more stations or days")
    return r[0], r[1], r[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--month", default=None)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    if a.runs < 1 or a.warmup < 0:
        sys.exit("--runs must be at least 1 and --warmup at least 0")

    duck = Duck(a.lake)
    csms = Csms(a.url, a.token)
    month, station, day = pick_parameters(duck, a.month)
    y, m = map(int, month.split("-"))
    first = f"{y:04d}-{m:02d}-01"
    after = f"{y + m // 12:04d}-{m % 12 + 1:02d}-01"
    month_range = f"date >= DATE '{first}' AND date < DATE '{after}'"
    st = station.replace("'", "''")
    bronze_month_rows = duck.con.execute(
        f"SELECT COUNT(*) FROM bronze.ocpp_messages WHERE {month_range}"
    ).fetchone()[0]

    queries = [
        ("floor: SELECT 1", "SELECT 1 AS one"),
        (
            "gold.fault_ranking point",
            f"SELECT * FROM gold.fault_ranking WHERE month = '{month}' AND station_id = '{st}'",
        ),
        (
            "gold.daily_faults point",
            f"SELECT * FROM gold.daily_faults WHERE date = DATE '{day}' AND station_id = '{st}'",
        ),
        (
            "bronze month: by action,direction",
            "SELECT action, direction, COUNT(*) AS n FROM bronze.ocpp_messages "
            f"WHERE {month_range} GROUP BY action, direction",
        ),
        (
            "bronze month: payload LIKE",
            "SELECT ocpp_version, COUNT(*) AS n FROM bronze.ocpp_messages "
            f"WHERE {month_range} AND payload LIKE '%Faulted%' GROUP BY ocpp_version",
        ),
    ]

    results = []
    all_same = True
    for name, sql in queries:
        for _ in range(a.warmup):
            csms.run(sql)
            duck.run(sql)
        t_csms, t_duck = [], []
        rows_csms = rows_duck = None
        for _ in range(a.runs):
            t0 = time.perf_counter()
            rows_csms = csms.run(sql)
            t1 = time.perf_counter()
            rows_duck = duck.run(sql)
            t2 = time.perf_counter()
            t_csms.append((t1 - t0) * 1000)
            t_duck.append((t2 - t1) * 1000)
        same = canonical(rows_csms) == canonical(rows_duck)
        all_same &= same
        results.append((name, sql, sorted(t_csms), sorted(t_duck), rows_csms, rows_duck, same))

    print()
    print(
        f"query benchmark{' (' + a.label + ')' if a.label else ''}: month {month}, "
        f"{bronze_month_rows:,} bronze rows in that month; files: "
        + ", ".join(f"{t.replace('/', '.')} {n}" for t, n in duck.files.items())
    )
    print(f"{a.runs} measured runs per query and engine after {a.warmup} warm-up runs; "
          f"latency in ms; duckdb {duckdb.__version__}")
    head = (f"{'query':<34} {'rows':>5} | {'csms p50':>8} {'p95':>8} {'max':>8} | "
            f"{'duck p50':>8} {'p95':>8} {'max':>8} | {'p50 ratio':>9} {'same':>4}")
    print(head)
    print("-" * len(head))
    for name, _sql, tc, td, rc, rd, same in results:
        c50, d50 = percentile(tc, 50), percentile(td, 50)
        print(
            f"{name:<34} {len(rc):>5} | {c50:>8.2f} {percentile(tc, 95):>8.2f} {tc[-1]:>8.2f} | "
            f"{d50:>8.2f} {percentile(td, 95):>8.2f} {td[-1]:>8.2f} | "
            f"{c50 / d50 if d50 > 0 else float('inf'):>8.1f}x {'yes' if same else 'NO':>4}"
        )
    print("p50 ratio = csms p50 / duckdb p50 (above 1: csms slower).")
    print(f"parameters: station {station}, day {day}; rows checked equal as multisets: "
          + ("ALL EQUAL" if all_same else "DIFFERENT"))
    for name, sql, _tc, _td, rc, rd, same in results:
        if name.startswith("bronze"):
            total = sum(int(r["n"]) for r in rc)
            print(f"  {name}: {total:,} messages counted by csms, "
                  f"{sum(int(r['n']) for r in rd):,} by duckdb")
        if not same:
            print(f"  DIFFERENT: {sql}\n    csms:   {rc[:5]}\n    duckdb: {rd[:5]}")
    print("notes: csms times include HTTP on loopback, its admin-token check, the catalog's "
          "Delta snapshot refresh (at most query.max_staleness_ms old, default 1 s) and JSON "
          "rendering and parsing; DuckDB runs in this Python process over the file list read "
          "once at start. The floor row is the cost every csms query pays before reading data.")
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
