#!/usr/bin/env python3
"""psycopg (3) against `csms serve`'s PostgreSQL wire protocol.

Runs a parameterised query (extended protocol with bound values) counting a
station's bronze rows, a server-side typed parameter, a catalog query like the
ones DBeaver sends, and a refused write; prints one JSON line with the results.
"""

import argparse
import json
import sys

import psycopg
from psycopg import errors


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--station", required=True)
    args = ap.parse_args()

    out = {}
    with psycopg.connect(args.dsn, autocommit=True, connect_timeout=10) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) AS n FROM bronze.ocpp_messages WHERE station_id = %s",
                (args.station,),
            )
            out["count"] = cur.fetchone()[0]
            out["columns"] = [d.name for d in cur.description]

            cur.execute(
                "SELECT action, count(*) AS n FROM bronze.ocpp_messages "
                "WHERE station_id = %s AND message_type = %s GROUP BY action ORDER BY action",
                (args.station, 2),
            )
            out["actions"] = {a: n for a, n in cur.fetchall()}

            cur.execute(
                "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s ORDER BY 2",
                ("live",),
            )
            out["live_tables"] = [r[1] for r in cur.fetchall()]

        try:
            with conn.cursor() as cur:
                cur.execute("DROP TABLE bronze.ocpp_messages")
            out["drop"] = "accepted"
        except errors.Error as e:
            out["drop"] = {"sqlstate": e.sqlstate, "message": str(e)}

    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
