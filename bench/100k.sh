#!/usr/bin/env bash
# 100,000 concurrently connected stations on one box, end to end, over
# loopback: `csms serve --workers 6` (SO_REUSEPORT, one WAL each, a
# throw-away redis-server shared by them) and 6 loadgen processes over 11
# source addresses (one process may hold ~20,000 descriptors; see
# bench/README.md for why ~10,000 connections per source address). Prints connected stations, CALL
# latency percentiles, server RSS summed over the workers (per connection
# when all were connected and at the end of the run) and redis-server RSS.
#
#   bench/100k.sh [--debug] [--no-build] [--auth] [--no-verify] [--stations N] [--duration SECS]
#                 [--workers W] [--storm] [--client-nice N] [-- extra loadgen args]
#
# Default: `schedule` mode, the steady state of a real fleet: a heartbeat
# every 60 s, sessions with meter values every 30 s (~2,800 CALLs/s at
# 100,000 stations). --storm: all stations drop at once and reconnect with
# the OCPP 2.0.1 back-off (1 s minimum, 10 s random range); the table says
# when the last one was Accepted again.
#
# Release build: `cargo build --release -p csms` first (a cold one takes
# about an hour here); the run itself takes 4-6 minutes.
set -euo pipefail

STATIONS=100000
DURATION=120
WORKERS=6
MODE=schedule
PASS=()
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --debug|--no-build|--auth|--no-verify) PASS+=("$1") ;;
    --stations) STATIONS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --storm) MODE=storm ;;
    --client-nice) PASS+=("$1" "$2"); shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

LOADGEN_ARGS=(--heartbeat-secs 60 --meter-secs 30 --connect-rate 1000
  --connect-timeout-secs 400 --call-timeout-secs 30)
if [ "$MODE" = storm ]; then
  LOADGEN_ARGS+=(--backoff-min-secs 1 --backoff-random-secs 10 --backoff-doublings 3
    --storm-after-secs 10)
fi

exec "$(dirname "$0")/ingest.sh" "${PASS[@]}" --stations "$STATIONS" --workers "$WORKERS" \
  --mode "$MODE" --duration "$DURATION" -- "${LOADGEN_ARGS[@]}" "${EXTRA[@]}"
