#!/usr/bin/env bash
# Runs one ingest benchmark end to end on this machine, over loopback only:
# builds csms, starts `csms serve` with a throw-away data directory, runs the
# load generator against it, prints its table, stops the server.
#
#   bench/ingest.sh [--debug] [--no-build] [--stations N] [--mode MODE]
#                   [--duration SECS] [--processes P] [--workers W]
#                   [--client-nice N] [-- extra loadgen args]
# --workers W runs `csms serve --workers W` with a throw-away redis-server;
# server RSS is then summed over the supervisor and its W workers, and the
# redis-server's RSS is printed after the table. --redis uses a throw-away
# redis-server (live status, presence, transaction ids) with one worker too;
# without either the node keeps its status embedded. --auth registers every
# station with a password of its own (`csms loadgen --credentials-out`, then
# `csms stations import`: one argon2id hash each, timed) and the server
# authenticates them; without it the server accepts unknown stations.
# --client-nice N runs the load generator at that nice value (e.g. -10: the
# simulated chargers get the CPU first, as chargers with CPUs of their own
# would, and their own scheduling delay stays out of the latencies they
# measure; the server gets what is left). Default: the server's (0).
#
# MODE is sustained (default, with --rate), saturation, storm or schedule.
# After the run the server is stopped (its lake writer flushes) and every
# CALL the load generator got a CALLRESULT for is looked up in bronze
# (bench/check_acks.py): the run fails if an acknowledged message is missing.
# --no-verify skips that (it reads all of the run's bronze once).
# Examples:
#   bench/ingest.sh --debug --stations 2000 --mode saturation --duration 20
#   bench/ingest.sh --stations 20000 --processes 2 --mode sustained -- --rate 5000
#
# NOTE: a cold release build takes about an HOUR on a 2-core box (deltalake
# and DataFusion). Use --debug for a quick look (figures are then debug-build
# figures, far below release) or --no-build to reuse an existing binary.
set -euo pipefail

PROFILE=release
BUILD=1
STATIONS=1000
MODE=sustained
DURATION=30
PROCESSES=
WORKERS=1
REDIS=0
AUTH=0
VERIFY=1
CLIENT_NICE=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --no-verify) VERIFY=0 ;;
    --redis) REDIS=1 ;;
    --auth) AUTH=1 ;;
    --stations) STATIONS=$2; shift ;;
    --mode) MODE=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --processes) PROCESSES=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --client-nice) CLIENT_NICE=$2; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Bounded on purpose: this is a benchmark of one box, not a stress tool.
if [ "$STATIONS" -lt 1 ] || [ "$STATIONS" -gt 100000 ]; then
  echo "--stations must be within 1..100000" >&2; exit 2
fi
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 600 ]; then
  echo "--duration must be within 1..600 seconds" >&2; exit 2
fi
# One process may hold about 20,000 descriptors here (ulimit -n).
if [ -z "$PROCESSES" ]; then PROCESSES=$(( (STATIONS + 17999) / 18000 )); fi
# One source address has about 28,000 ephemeral ports, but bind() to an
# address with port 0 (what the load generator does) draws from half of
# them first: keep each address near 10,000 connections.
SOURCE_IPS=$(( (STATIONS + 9999) / 10000 + 1 ))

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/csms-target}
BIN_DIR="$CARGO_TARGET_DIR/$PROFILE"
CARGO_FLAGS=()
[ "$PROFILE" = release ] && CARGO_FLAGS=(--release)

if [ "$BUILD" = 1 ]; then
  if [ "$PROFILE" = release ] && [ ! -x "$BIN_DIR/csms" ]; then
    echo "building csms (release): a cold release build takes about an hour here; --debug is minutes" >&2
  fi
  (cd "$ROOT" && cargo build "${CARGO_FLAGS[@]}" -p csms)
fi
CSMS="$BIN_DIR/csms"
[ -x "$CSMS" ] || { echo "no $CSMS: build it or drop --no-build" >&2; exit 1; }

# `csms loadgen` once the CLI has it, else the crate's own runner.
if "$CSMS" loadgen --help >/dev/null 2>&1; then
  LOADGEN=("$CSMS" loadgen)
else
  [ "$BUILD" = 1 ] && (cd "$ROOT" && cargo build "${CARGO_FLAGS[@]}" -p loadgen --bin loadgen-dev)
  LOADGEN=("$BIN_DIR/loadgen-dev")
  [ -x "${LOADGEN[0]}" ] || { echo "no loadgen binary at ${LOADGEN[0]}" >&2; exit 1; }
fi
if [ "$CLIENT_NICE" != 0 ]; then
  LOADGEN=(nice -n "$CLIENT_NICE" "${LOADGEN[@]}")
fi

WORK=$(mktemp -d -t csms-bench-XXXXXX)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -INT "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  [ -f "$WORK/redis.pid" ] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null
  # The server's log outlives the run, for the post-mortem.
  cp "$WORK/server.log" "${TMPDIR:-/tmp}/csms-bench-server.log" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OCPP_PORT=$(free_port); HTTP_PORT=$(free_port); PG_PORT=$(free_port)

# Several server workers (SO_REUSEPORT) share status through a throw-away
# redis-server; one process alone is capped near 19,800 sockets here.
SERVE_ARGS=(serve)
REDIS_ENV=(-u REDIS_URL)
MAX_CONN=200000
if [ "$WORKERS" -gt 1 ]; then
  # Each worker may hold ~20,000 descriptors: past this it answers 503 (the
  # station retries and usually lands on another worker) instead of failing
  # accept() with EMFILE.
  MAX_CONN=19500
  SERVE_ARGS=(serve --workers "$WORKERS")
  REDIS=1
fi
if [ "$REDIS" = 1 ]; then
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --daemonize yes --pidfile "$WORK/redis.pid" >/dev/null
  REDIS_ENV=(REDIS_URL=redis://127.0.0.1:$REDIS_PORT)
fi

ALLOW_UNKNOWN=true
AUTH_ARGS=()
if [ "$AUTH" = 1 ]; then
  # Each station its own password; registered before the server starts.
  PASSWORD='bench-{id}-7c1e9a40d2'
  "${LOADGEN[@]}" --stations "$STATIONS" --password "$PASSWORD" --credentials-out "$WORK/fleet.csv" >/dev/null
  echo "registering $STATIONS stations (one argon2id hash each)..." >&2
  CSMS_DATA_DIR="$WORK/data" "$CSMS" stations import "$WORK/fleet.csv" >&2
  ALLOW_UNKNOWN=false
  AUTH_ARGS=(--password "$PASSWORD")
fi

# Limits raised for a load test: no per-station message rate, no per-address
# upgrade rate (every simulated station shares a few source addresses).
env "${REDIS_ENV[@]}" \
  CSMS_OCPP_ADDR=127.0.0.1:$OCPP_PORT CSMS_HTTP_ADDR=127.0.0.1:$HTTP_PORT \
  CSMS_PG_ADDR=127.0.0.1:$PG_PORT CSMS_DATA_DIR="$WORK/data" \
  CSMS_ALLOW_UNKNOWN=$ALLOW_UNKNOWN \
  CSMS_LIMITS__MESSAGES_PER_STATION_PER_SEC=0 \
  CSMS_LIMITS__UPGRADES_PER_IP_PER_SEC=0 \
  CSMS_LIMITS__MAX_CONNECTIONS=$MAX_CONN \
  RUST_LOG=${RUST_LOG:-warn} \
  "$CSMS" "${SERVE_ARGS[@]}" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "csms serve exited:" >&2; tail -40 "$WORK/server.log" >&2; exit 1; }
  sleep 0.1
done

# /readyz answers as soon as one worker is up: wait for every worker to
# listen, then let their memory settle before the "RSS before" reading.
if [ "$WORKERS" -gt 1 ]; then
  for _ in $(seq 1 600); do
    n=$(ss -Hltn "sport = :$OCPP_PORT" 2>/dev/null | wc -l)
    [ "$n" -ge "$WORKERS" ] && break
    sleep 0.1
  done
  for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; done
  sleep 3
fi

# CPU seconds (user + system) of the server: the supervisor and its workers.
server_cpu() {
  local pids total=0 t
  pids="$SERVER_PID $(pgrep -P "$SERVER_PID" | tr '\n' ' ')"
  for p in $pids; do
    # Fields 14 and 15 of /proc/PID/stat, after the parenthesised name.
    t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
    total=$(( total + ${t:-0} ))
  done
  echo "$total"
}
CPU_BEFORE=$(server_cpu)

STATUS_STORE=embedded; [ "$REDIS" = 1 ] && STATUS_STORE=redis
AUTH_NOTE="unknown stations allowed"; [ "$AUTH" = 1 ] && AUTH_NOTE="Basic auth, a password per station"
echo "csms $PROFILE build, $WORKERS server worker(s), status store $STATUS_STORE, $AUTH_NOTE, $STATIONS stations, mode $MODE, ${DURATION}s, $PROCESSES loadgen processes at nice $CLIENT_NICE, $SOURCE_IPS source addresses, runtime threads ${CSMS_RUNTIME_THREADS:-a share of the cores each}, net.core.somaxconn $(cat /proc/sys/net/core/somaxconn)"
# Hard time bound: connect phase + run + slack.
timeout $(( DURATION * 2 + 600 )) "${LOADGEN[@]}" \
  --url "ws://127.0.0.1:$OCPP_PORT/ocpp" \
  --stations "$STATIONS" --mode "$MODE" --duration-secs "$DURATION" \
  --processes "$PROCESSES" --source-ips "$SOURCE_IPS" \
  --server-pid "$SERVER_PID" --acks-out "$WORK/acks" "${AUTH_ARGS[@]}" "${EXTRA[@]}"
# The server's own view of CALL time (frame read → answer written), from
# csms_call_seconds of whichever worker answers the scrape: against the
# load generator's figures it tells server time from socket and client time.
# The WAL's fsyncs of the same worker: each CALL's answer waits for one.
# Its runtime's wake-up delay (admission control's probe): how long a task
# that became ready waited for a thread.
curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null | awk -v w="$WORKERS" '
  function label(line, key) {
    if (!match(line, key "=\"[^\"]*\"")) return ""
    return substr(line, RSTART + length(key) + 2, RLENGTH - length(key) - 3)
  }
  # Every *_seconds histogram: count and cumulative buckets, summed over series.
  function over(m, le) { return cnt[m] - below[m, le] }
  /^csms_[a-z_]+_seconds_(bucket|count)[{ ]/ {
    m = $1; sub(/[{].*/, "", m)
    if (sub(/_bucket$/, "", m)) {
      below[m, label($0, "le")] += $NF
      if (m == "csms_call_seconds" && label($0, "le") == "1") a_under[label($0, "action")] += $NF
    } else {
      sub(/_count$/, "", m); cnt[m] += $NF
      if (m == "csms_call_seconds") a_n[label($0, "action")] += $NF
    }
  }
  # A runtime profiling build (src/runtime_profile.rs) adds these.
  /^csms_task_polls_total /                    { polls = $NF }
  /^csms_task_schedule_latency_over_total[{]/  { lat[label($0, "le")] = $NF }
  /^csms_task_poll_over_total[{]/              { pol[label($0, "le")] = $NF }
  /^csms_task_late_polls_total[{]/             { if ($NF > 0) late = late sprintf("%s%s %d", (late == "" ? "" : "; "), label($0, "spawned_at"), $NF) }
  /^csms_task_long_polls_total[{]/             { if ($NF > 0) longn[label($0, "spawned_at")] = $NF }
  /^csms_task_long_poll_ms_total[{]/           { longms[label($0, "spawned_at")] = $NF }
  /^csms_runtime_worker_[a-z_]+_total[{]/      { k = $1; sub(/[{].*/, "", k); sub(/^csms_runtime_worker_/, "", k); sub(/_total$/, "", k); wk[label($0, "worker"), k] = $NF; nw = (label($0, "worker") + 1 > nw ? label($0, "worker") + 1 : nw) }
  /^csms_runtime_[a-z]+_queue_depth_max /      { k = $1; sub(/^csms_runtime_/, "", k); sub(/_queue_depth_max$/, "", k); qmax[k] = $NF }
  /^csms_runtime_[a-z]+_queue_samples_over_total[{]/ { k = $1; sub(/^csms_runtime_/, "", k); sub(/_queue_samples.*/, "", k); qover[k, label($0, "depth")] = $NF }
  END {
    c = "csms_call_seconds"; n = cnt[c]
    if (n > 0) printf "| server-side CALL time over 50 ms / over 1 s (csms_call_seconds, one worker of %d) | %d / %d of %d (%.4f%% / %.4f%%) |\n", w, over(c, "0.05"), over(c, "1"), n, 100 * over(c, "0.05") / n, 100 * over(c, "1") / n
    by = ""
    for (a in a_n) if (a_n[a] > a_under[a]) by = by sprintf("%s%s %d of %d", (by == "" ? "" : "; "), a, a_n[a] - a_under[a], a_n[a])
    if (by != "") printf "| ... of which, by action | %s |\n", by
    m = "csms_wal_fsync_seconds"
    if (cnt[m] > 0) printf "| WAL fsyncs over 100 ms / over 1 s (same worker) | %d / %d of %d |\n", over(m, "0.1"), over(m, "1"), cnt[m]
    m = "csms_wal_commit_seconds"
    if (cnt[m] > 0) printf "| WAL batches whose oldest request waited over 50 ms / over 1 s, queued → durable (same worker) | %d / %d of %d |\n", over(m, "0.05"), over(m, "1"), cnt[m]
    m = "csms_wal_append_seconds"
    if (cnt[m] > 0) printf "| WAL appends over 50 ms / over 1 s as the session sees them, until it runs again (same worker) | %d / %d of %d |\n", over(m, "0.05"), over(m, "1"), cnt[m]
    m = "csms_runtime_probe_delay_seconds"
    if (cnt[m] > 0) printf "| server runtime wake-up delay over 50 ms / 100 ms / 1 s (10 ms probe, same worker) | %d / %d / %d of %d |\n", over(m, "0.05"), over(m, "0.1"), over(m, "1"), cnt[m]
    if (polls > 0) {
      printf "| profiling: task polls that waited ≥ 1 ms / 10 ms / 50 ms / 250 ms / 1 s since woken (same worker) | %d / %d / %d / %d / %d of %d |\n", lat["0.001"], lat["0.01"], lat["0.05"], lat["0.25"], lat["1"], polls
      printf "| profiling: polls that took ≥ 0.1 ms / 1 ms / 5 ms / 50 ms | %d / %d / %d / %d |\n", pol["0.0001"], pol["0.001"], pol["0.005"], pol["0.05"]
      printf "| profiling: waited ≥ 50 ms, by spawn site | %s |\n", (late == "" ? "none" : late)
      by = ""
      for (k in longn) by = by sprintf("%s%s %d (%d ms)", (by == "" ? "" : "; "), k, longn[k], longms[k])
      printf "| profiling: polls ≥ 5 ms, by spawn site | %s |\n", (by == "" ? "none" : by)
      by = ""
      for (i = 0; i < nw; i++) by = by sprintf("%sworker %d: %d polls, %d steals, %d overflows, %d parks, %d s busy", (i ? "; " : ""), i, wk[i, "polls"], wk[i, "steals"], wk[i, "overflows"], wk[i, "parks"], wk[i, "busy_seconds"])
      printf "| profiling: workers | %s |\n", by
      printf "| profiling: deepest global / local run queue; 10 ms samples with global ≥ 10 / 100 / 1000, local ≥ 10 / 100 / 1000 | %d / %d; %d / %d / %d, %d / %d / %d |\n", qmax["global"], qmax["local"], qover["global", "10"], qover["global", "100"], qover["global", "1000"], qover["local", "10"], qover["local", "100"], qover["local", "1000"]
    }
  }' || true
TICKS=$(getconf CLK_TCK)
echo "| server CPU time during the run (user + system, all workers) | $(awk -v a="$CPU_BEFORE" -v b="$(server_cpu)" -v t="$TICKS" 'BEGIN {printf "%.1f s", (b - a) / t}') |"
if [ -f "$WORK/redis.pid" ]; then
  echo "| redis-server RSS after the run | $(awk '/VmRSS/ {print $2}' "/proc/$(cat "$WORK/redis.pid")/status") KiB"
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "csms serve died during the run:" >&2; tail -40 "$WORK/server.log" >&2; exit 1
fi

if [ "$VERIFY" = 1 ]; then
  echo "stopping csms serve (the lake writer flushes) to look up every acknowledged CALL in bronze..." >&2
  kill -INT "$SERVER_PID"
  for _ in $(seq 1 1200); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "csms serve did not stop within 120 s of SIGINT" >&2; exit 1
  fi
  SERVER_PID=
  env -u REDIS_URL CSMS_DATA_DIR="$WORK/data" "$CSMS" query --format csv \
    "SELECT station_id, message_id FROM bronze.ocpp_messages WHERE direction = 'cs_to_csms' AND message_type = 2" \
    >"$WORK/bronze_calls.csv"
  python3 "$ROOT/bench/check_acks.py" "$WORK/acks" "$WORK/bronze_calls.csv"
fi
