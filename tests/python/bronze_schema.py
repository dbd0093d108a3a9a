#!/usr/bin/env python3
"""Describes bronze.ocpp_messages as a plain Delta reader (the Python
`deltalake` package, no csms code) sees it, so a test can check that the
table is an ordinary Delta table with the documented columns.

Prints one JSON document:
{"version": V,
 "table_fields": [[name, arrow_type, nullable], ...],   # from the Delta log
 "scan_fields": [[name, arrow_type, nullable], ...],    # from reading the data
 "delta_fields": [[name, delta_type, nullable], ...],
 "partition_columns": [...],
 "protocol": {"min_reader_version": R, "min_writer_version": W},
 "files": [data file URIs],
 "num_rows": N,
 "date_mismatches": rows whose date is not the UTC date of received_at,
 "received_at_utc": the first received_at read back, as ISO text,
 "txn": {app_id: version-or-null}}
Arrow types are printed as arro3 shows them without its wrapper, e.g.
`Timestamp(µs, "UTC")`, `Date32`, `Utf8`, `Int64`, `Int8`.
Exits 2 when the table does not exist yet."""

import argparse
import json
import os
import re
import sys

from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import TableNotFoundError


def arrow_type(t):
    text = str(t)
    m = re.fullmatch(r"arro3\.core\.DataType<(.*)>", text.strip(), re.S)
    return m.group(1) if m else text


def fields(schema):
    return [[f.name, arrow_type(f.type), bool(f.nullable)] for f in schema]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lake", required=True, help="lake URL or local path")
    p.add_argument("--app-id", action="append", default=[])
    args = p.parse_args()
    uri = f"{args.lake.rstrip('/')}/bronze/ocpp_messages"
    if "://" not in uri and not os.path.isdir(os.path.join(uri, "_delta_log")):
        print(f"no Delta table at {uri}", file=sys.stderr)
        sys.exit(2)
    try:
        dt = DeltaTable(uri)
    except TableNotFoundError as e:
        print(f"no Delta table at {uri}: {e}", file=sys.stderr)
        sys.exit(2)

    schema = dt.schema()
    delta_fields = [[f.name, str(f.type.type), bool(f.nullable)] for f in schema.fields]
    table_fields = fields(schema.to_arrow())

    qb = QueryBuilder().register("bronze", dt)
    reader = qb.execute("SELECT * FROM bronze ORDER BY wal_seq LIMIT 1")
    scan_fields = fields(reader.schema)
    first = None
    for batch in reader:
        if batch.num_rows:
            first = batch.column("received_at").to_pylist()[0]
            break

    def scalar(sql):
        for batch in qb.execute(sql):
            if batch.num_rows:
                return int(batch.column(0).to_pylist()[0])
        return None

    num_rows = scalar("SELECT count(*) FROM bronze")
    mismatches = scalar(
        "SELECT count(*) FROM bronze WHERE date <> CAST(received_at AS DATE)"
    )
    protocol = dt.protocol()
    out = {
        "version": dt.version(),
        "table_fields": table_fields,
        "scan_fields": scan_fields,
        "delta_fields": delta_fields,
        "partition_columns": list(dt.metadata().partition_columns),
        "protocol": {
            "min_reader_version": protocol.min_reader_version,
            "min_writer_version": protocol.min_writer_version,
        },
        "files": dt.file_uris(),
        "num_rows": num_rows,
        "date_mismatches": mismatches,
        "received_at_utc": first.isoformat() if first is not None else None,
        "txn": {app: dt.transaction_version(app) for app in args.app_id},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
