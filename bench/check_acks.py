#!/usr/bin/env python3
"""Checks that every CALL the load generator got a CALLRESULT for is in
bronze: the CSMS answers a CALL only after it is durable, so none may be
missing after the server has stopped and its lake writer flushed.

    check_acks.py ACKS_BASE BRONZE_CSV

ACKS_BASE is the load generator's --acks-out path (its worker files are
ACKS_BASE.0, ACKS_BASE.1, ...; lines "STATION LAST_ID UNACKED,..|-").
BRONZE_CSV is `csms query --format csv` of the charger CALLs in bronze
(columns station_id, message_id). Prints one summary line; exits 1 when an
acknowledged CALL is missing (and lists the first few)."""

import csv
import glob
import sys


def main() -> int:
    base, bronze_csv = sys.argv[1], sys.argv[2]
    files = sorted(glob.glob(base + ".*")) or [base]
    in_bronze: dict[str, set[int]] = {}
    with open(bronze_csv, newline="") as f:
        for row in csv.DictReader(f):
            try:
                in_bronze.setdefault(row["station_id"], set()).add(int(row["message_id"]))
            except ValueError:
                pass  # not a load generator id
    stations = acked = unacked = 0
    missing: list[tuple[str, int]] = []
    for path in files:
        with open(path) as f:
            for line in f:
                station, last, rest = line.split()
                stations += 1
                skip = set() if rest == "-" else {int(x) for x in rest.split(",")}
                unacked += len(skip)
                have = in_bronze.get(station, set())
                for mid in range(1, int(last) + 1):
                    if mid in skip:
                        continue
                    acked += 1
                    if mid not in have:
                        missing.append((station, mid))
    total = sum(len(v) for v in in_bronze.values())
    print(
        f"| acknowledged CALLs in bronze | {acked - len(missing):,} of {acked:,} "
        f"from {stations:,} stations ({len(missing):,} missing; {unacked:,} CALLs "
        f"without a CALLRESULT; {total:,} distinct charger CALLs in bronze) |"
    )
    if missing:
        print("missing, first 10:", missing[:10], file=sys.stderr)
        return 1
    if stations == 0:
        print("no acknowledgement records found at", base, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
