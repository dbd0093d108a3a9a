#!/usr/bin/env python3
"""Reads bronze.ocpp_messages with the Python `deltalake` package (as an
analyst would) and prints one JSON document about one station's rows:
{"rows": N, "by_direction": {...}, "by_message_type": {...},
 "by_action": {...}, "messages": [{direction, message_type, message_id,
 action, error_code, ocpp_version, node_id, wal_seq}, ...]}.
Exits 2 when the table does not exist yet, so callers can poll."""

import argparse
import json
import os
import sys
from collections import Counter

from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import TableNotFoundError


def table_uri(lake):
    base = lake.rstrip("/")
    return f"{base}/bronze/ocpp_messages"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lake", required=True, help="lake URL or local path")
    p.add_argument("--station", required=True)
    args = p.parse_args()
    uri = table_uri(args.lake)
    if "://" not in uri and not os.path.isdir(os.path.join(uri, "_delta_log")):
        print(f"no Delta table at {uri}", file=sys.stderr)
        sys.exit(2)
    try:
        dt = DeltaTable(uri)
    except TableNotFoundError as e:
        print(f"no Delta table at {uri}: {e}", file=sys.stderr)
        sys.exit(2)
    cols = ["direction", "message_type", "message_id", "action", "error_code", "ocpp_version", "node_id", "wal_seq", "station_id"]
    station = args.station.replace("'", "''")
    sql = f"SELECT {', '.join(cols)} FROM bronze WHERE station_id = '{station}' ORDER BY wal_seq"
    table = QueryBuilder().register("bronze", dt).execute(sql).read_all()
    data = {name: table.column(name).to_pylist() for name in cols}
    rows = [dict(zip(cols, values)) for values in zip(*(data[c] for c in cols))]
    for row in rows:
        row["message_type"] = int(row["message_type"]) if row["message_type"] is not None else None
        row["wal_seq"] = int(row["wal_seq"]) if row["wal_seq"] is not None else None
    print(
        json.dumps(
            {
                "rows": len(rows),
                "table_version": dt.version(),
                "by_direction": Counter(r["direction"] for r in rows),
                "by_message_type": Counter(str(r["message_type"]) for r in rows),
                "by_action": Counter(str(r["action"]) for r in rows),
                "messages": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
