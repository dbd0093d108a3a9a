#!/usr/bin/env bash
# Query benchmark: builds csms, writes a simulated bronze history into a
# throw-away lake (`csms simulate`), runs `csms pipeline run` for the gold
# tables, starts `csms serve` on free loopback ports, then times point queries
# on gold and scans over a month of bronze through POST /api/sql (HTTP, JSON:
# the path analysts use) and through DuckDB over the same Parquet files
# (bench/query_bench.py), checks both return the same rows, prints one table
# with p50/p95/max per engine and the ratios, and stops the server.
#
#   bench/query.sh [--debug] [--no-build] [--stations N] [--days D]
#                  [--start YYYY-MM-DD] [--seed S] [--runs R] [--warmup W]
#                  [--keep]
#
# Defaults: 2,000 stations x 31 days from 2026-01-01 (one whole month), 20
# measured runs per query and engine, release build. --keep leaves the lake.
#
# NOTE: a cold release build takes about an HOUR on a 2-core box (deltalake
# and DataFusion). Use --debug for a quick look (figures are then debug-build
# figures, far below release) or --no-build to reuse an existing binary.
# CSMS_BIN=/path/to/csms overrides the binary (and implies --no-build).
set -euo pipefail

PROFILE=release
BUILD=1
STATIONS=2000
DAYS=31
START=2026-01-01
SEED=1
RUNS=20
WARMUP=2
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --stations) STATIONS=$2; shift ;;
    --days) DAYS=$2; shift ;;
    --start) START=$2; shift ;;
    --seed) SEED=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
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
if [ "$RUNS" -lt 1 ] || [ "$WARMUP" -lt 0 ]; then
  echo "--runs must be at least 1 and --warmup at least 0" >&2; exit 2
fi
date -d "$START" +%F >/dev/null 2>&1 || { echo "--start must be YYYY-MM-DD" >&2; exit 2; }

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

WORK=$(mktemp -d /tmp/csms-query-bench.XXXXXX)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -INT "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
export CSMS_DATA_DIR="$WORK/data"
# delta-rs logs every snapshot at info; keep the output to the figures.
export RUST_LOG=${RUST_LOG:-warn}
mkdir -p "$CSMS_DATA_DIR"
LAKE="$CSMS_DATA_DIR/lake"

echo "simulating $STATIONS stations x $DAYS days from $START ($PROFILE build)..." >&2
"$BIN" --data-dir "$CSMS_DATA_DIR" simulate --stations "$STATIONS" --days "$DAYS" \
  --start "$START" --seed "$SEED" >"$WORK/simulate.txt"
cat "$WORK/simulate.txt" >&2
# The pipeline only builds the gold tables here (its speed is
# bench/pipeline.sh's subject); its default 512 MiB pool runs out at about
# 100 stations x 31 days (an external sort fails), so give it 2 GiB unless set.
echo "running csms pipeline run..." >&2
CSMS_PIPELINE__MEMORY_LIMIT_BYTES=${CSMS_PIPELINE__MEMORY_LIMIT_BYTES:-2147483648} \
  "$BIN" --data-dir "$CSMS_DATA_DIR" pipeline run >"$WORK/pipeline.txt" \
  || { cat "$WORK/pipeline.txt" >&2; echo "csms pipeline run failed" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OCPP_PORT=$(free_port); HTTP_PORT=$(free_port); PG_PORT=$(free_port)
TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

env -u REDIS_URL \
  CSMS_OCPP_ADDR=127.0.0.1:$OCPP_PORT CSMS_HTTP_ADDR=127.0.0.1:$HTTP_PORT \
  CSMS_PG_ADDR=127.0.0.1:$PG_PORT CSMS_ADMIN_TOKEN="$TOKEN" \
  "$BIN" --data-dir "$CSMS_DATA_DIR" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "csms serve exited:" >&2; tail -40 "$WORK/server.log" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 \
  || { echo "csms serve not ready after 60 s:" >&2; tail -40 "$WORK/server.log" >&2; exit 1; }

echo "running the queries ($RUNS runs each, $WARMUP warm-up)..." >&2
STATUS=0
python3 "$ROOT/bench/query_bench.py" --url "http://127.0.0.1:$HTTP_PORT" --token "$TOKEN" \
  --lake "$LAKE" --runs "$RUNS" --warmup "$WARMUP" \
  --label "$PROFILE build, $STATIONS stations x $DAYS days" || STATUS=$?
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "csms serve died during the run:" >&2; tail -40 "$WORK/server.log" >&2; exit 1
fi
exit "$STATUS"
