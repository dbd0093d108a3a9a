#!/usr/bin/env python3
"""Reads the identity columns of every row of bronze.ocpp_messages with the
Python `deltalake` package, for the durability tests (exactly-once checks
across crashes, object-store outages and several nodes).

Prints one JSON document:
{"version": V, "rows": [[station_id, direction, message_type, message_id,
 node_id, wal_seq], ...], "txn": {app_id: version-or-null, ...}}
where "txn" holds the Delta application-transaction version of each
`--app-id` asked for. Exits 2 when the table does not exist yet, so callers
can poll. Object-store settings (endpoint, credentials, ...) are given as
repeated `--storage-option KEY=VALUE`."""

import argparse
import json
import os
import sys

from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import TableNotFoundError

COLUMNS = ["station_id", "direction", "message_type", "message_id", "node_id", "wal_seq"]


def parse_options(pairs):
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"--storage-option needs KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lake", required=True, help="lake URL (s3://...) or local path")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--app-id", action="append", default=[], help="app transaction id to report")
    args = p.parse_args()
    uri = f"{args.lake.rstrip('/')}/bronze/ocpp_messages"
    if "://" not in uri and not os.path.isdir(os.path.join(uri, "_delta_log")):
        print(f"no Delta table at {uri}", file=sys.stderr)
        sys.exit(2)
    options = parse_options(args.storage_option)
    try:
        dt = DeltaTable(uri, storage_options=options or None)
    except TableNotFoundError as e:
        print(f"no Delta table at {uri}: {e}", file=sys.stderr)
        sys.exit(2)
    sql = f"SELECT {', '.join(COLUMNS)} FROM bronze"
    reader = QueryBuilder().register("bronze", dt).execute(sql)
    rows = []
    for batch in reader:
        cols = [batch.column(name).to_pylist() for name in COLUMNS]
        for station, direction, mtype, mid, node, seq in zip(*cols):
            rows.append([station, direction, int(mtype), mid, node, int(seq)])
    txn = {app: dt.transaction_version(app) for app in args.app_id}
    print(json.dumps({"version": dt.version(), "rows": rows, "txn": txn}))


if __name__ == "__main__":
    main()
