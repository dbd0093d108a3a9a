#!/usr/bin/env bash
# Pipeline benchmark: builds csms, writes a simulated bronze history into a
# throw-away lake (`csms simulate`), runs `csms pipeline run` (timed), then the
# same fault transforms as DuckDB SQL over the same bronze Parquet files
# (bench/duckdb_transforms.py), checks both give the same gold.fault_ranking
# and daily_faults, and prints one table with rows/s per engine and the ratio.
#
#   bench/pipeline.sh [--debug] [--no-build] [--stations N] [--days D]
#                     [--seed S] [--keep]
#
# Defaults: 2,000 stations x 30 days (about 15 million bronze messages),
# release build. --keep leaves the lake directory in place.
#
# NOTE: a cold release build takes about an HOUR on a 2-core box (deltalake
# and DataFusion). Use --debug for a quick look (figures are then debug-build
# figures, far below release) or --no-build to reuse an existing binary.
# CSMS_BIN=/path/to/csms overrides the binary (and implies --no-build).
set -euo pipefail

PROFILE=release
BUILD=1
STATIONS=2000
DAYS=30
SEED=1
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --stations) STATIONS=$2; shift ;;
    --days) DAYS=$2; shift ;;
    --seed) SEED=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$STATIONS" -lt 1 ] || [ "$STATIONS" -gt 100000 ]; then
  echo "--stations must be within 1..100000" >&2; exit 2
fi
if [ "$DAYS" -lt 1 ] || [ "$DAYS" -gt 366 ]; then
  echo "--days must be within 1..366" >&2; exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/csms-target}
if [ -n "${CSMS_BIN:-}" ]; then
  BIN=$CSMS_BIN
  BUILD=0
else
  BIN="$CARGO_TARGET_DIR/$PROFILE/csms"
fi

if [ "$BUILD" = 1 ]; then
  if [ "$PROFILE" = release ]; then
    echo "building csms (release; a cold build takes about an hour on 2 cores)..." >&2
    (cd "$ROOT" && cargo build --release -p csms)
  else
    echo "building csms (debug: figures will be debug-build figures)..." >&2
    (cd "$ROOT" && cargo build -p csms)
  fi
fi
[ -x "$BIN" ] || { echo "no binary at $BIN (build first or set CSMS_BIN)" >&2; exit 1; }

if ! python3 -c 'import duckdb' 2>/dev/null; then
  echo "installing the duckdb Python package..." >&2
  python3 -m pip install --quiet duckdb
fi
DUCKDB_VERSION=$(python3 -c 'import duckdb; print(duckdb.__version__)')

WORK=$(mktemp -d /tmp/csms-pipeline-bench.XXXXXX)
cleanup() { if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
export CSMS_DATA_DIR="$WORK/data"
# delta-rs logs every snapshot at info; keep the output to the figures.
export RUST_LOG=${RUST_LOG:-warn}
mkdir -p "$CSMS_DATA_DIR"
# Start far enough back that months are complete; fixed so reruns compare.
START=2026-01-01

now() { date +%s.%N; }

echo "simulating $STATIONS stations x $DAYS days ($PROFILE build)..." >&2
t0=$(now)
"$BIN" --data-dir "$CSMS_DATA_DIR" simulate --stations "$STATIONS" --days "$DAYS" \
  --start "$START" --seed "$SEED" >"$WORK/simulate.txt"
t1=$(now)
cat "$WORK/simulate.txt" >&2
LAKE="$CSMS_DATA_DIR/lake"

echo "running csms pipeline run..." >&2
t2=$(now)
"$BIN" --data-dir "$CSMS_DATA_DIR" pipeline run >"$WORK/pipeline.txt"
t3=$(now)
cat "$WORK/pipeline.txt" >&2

echo "running the DuckDB transforms (duckdb $DUCKDB_VERSION)..." >&2
t4=$(now)
python3 "$ROOT/bench/duckdb_transforms.py" "$LAKE" "$WORK/duckdb" --compare >"$WORK/duckdb.json"
t5=$(now)

python3 - "$WORK" "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" "$PROFILE" "$STATIONS" "$DAYS" "$DUCKDB_VERSION" <<'EOF'
import json, sys
work, t0, t1, t2, t3, t4, t5 = sys.argv[1], *map(float, sys.argv[2:8])
profile, stations, days, duck_version = sys.argv[8:12]
duck = json.load(open(f"{work}/duckdb.json"))
rows = duck["bronze_rows"]
# The pipeline's closing summary: table, rows in, rows out, rewritten, seconds.
tables = {}
total = None
for line in open(f"{work}/pipeline.txt"):
    parts = line.split()
    if len(parts) == 5 and "." in parts[0]:
        try:
            tables[parts[0]] = (int(parts[1]), int(parts[2]), float(parts[4]))
        except ValueError:
            pass
    elif len(parts) == 2 and parts[0] == "total":
        total = float(parts[1])
fault_tables = ("silver.status_events", "gold.daily_faults", "gold.fault_ranking")
missing = [t for t in fault_tables if t not in tables]
if missing or total is None:
    sys.exit(f"could not read the pipeline summary (missing {missing}); see {work}/pipeline.txt")
# The silver stage reads and decodes bronze once for all silver tables and
# reports that shared pass as its own line; the fault slice needs it, so it
# is charged in full to the slice (an overstatement: the pass also decodes
# meter values and transactions for the other tables).
shared_scan = tables.get("bronze.ocpp_messages", (0, 0, 0.0))[2]
rust_faults = sum(tables[t][2] for t in fault_tables) + shared_scan
duck_s = duck["seconds"]
print()
print(f"pipeline benchmark: {stations} stations x {days} days, {rows:,} bronze messages "
      f"in {duck['bronze_files']} files ({profile} build; simulate took {t1 - t0:.1f} s)")
print(f"{'engine':<34} {'bronze rows':>12} {'seconds':>9} {'rows/s':>12}")
def line(name, s):
    print(f"{name:<34} {rows:>12,} {s:>9.2f} {rows / s if s > 0 else float('inf'):>12,.0f}")
line("csms: fault slice (3 tables + scan)", rust_faults)
line("duckdb: fault slice (3 tables)", duck_s)
line("csms: whole pipeline run", total)
line("csms: pipeline run incl. startup", t3 - t2)
ratio = duck_s / rust_faults if rust_faults > 0 else float("inf")
print(f"ratio duckdb/csms seconds, fault slice: {ratio:.2f} "
      f"({'csms faster' if ratio > 1 else 'duckdb faster'})")
c = duck["compare"]
print(f"results: fault_ranking rows csms={c['fault_ranking_rows_rust']} duckdb={c['fault_ranking_rows_duckdb']}, "
      f"status_events rows csms={c['status_events_rows_rust']} duckdb={c['status_events_rows_duckdb']}, "
      f"daily_faults differences={c['daily_faults_differences']}: "
      + ("EQUAL" if c["equal"] else "DIFFERENT"))
print("notes: duckdb reads the files of bronze's current Delta snapshot (log replay; simulate only "
      "appends, so that is every file) and writes Parquet; csms writes Delta tables with "
      "incremental bookkeeping. The csms fault slice is the sum of its three tables' job times "
      "from the pipeline summary plus the whole shared bronze scan (which decodes every silver "
      "table's messages); the whole run also builds meter values and transactions, which the "
      "DuckDB script does not.")
sys.exit(0 if c["equal"] else 1)
EOF
