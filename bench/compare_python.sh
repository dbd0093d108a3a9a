#!/usr/bin/env bash
# The same load against csms and against a central system written with the
# Python `ocpp` package (bench/python_csms.py: one asyncio process, the
# single-node CSMS many projects start from), in one run, over loopback;
# prints both loadgen tables and one comparison table with the ratios.
#
#   bench/compare_python.sh [--debug] [--no-build] [--stations N]
#                           [--mode sustained|saturation] [--rate R]
#                           [--duration SECS]
#
# csms runs through bench/ingest.sh (WAL fsync before every answer, bronze
# lake writer, live status); the Python baseline keeps nothing durable, so
# the comparison is in its favour.
set -euo pipefail

PROFILE_FLAG=()
BUILD_FLAG=()
STATIONS=2000
MODE=sustained
RATE=2000
DURATION=30
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE_FLAG=(--debug) ;;
    --no-build) BUILD_FLAG=(--no-build) ;;
    --stations) STATIONS=$2; shift ;;
    --mode) MODE=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$MODE" in sustained|saturation) ;; *) echo "--mode must be sustained or saturation" >&2; exit 2 ;; esac
# The Python server is one process: at most ~19,800 sockets here.
if [ "$STATIONS" -lt 1 ] || [ "$STATIONS" -gt 18000 ]; then
  echo "--stations must be within 1..18000 (one Python process holds at most ~19,800 sockets)" >&2; exit 2
fi
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 600 ]; then
  echo "--duration must be within 1..600 seconds" >&2; exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/csms-target}
PROFILE=release
[ ${#PROFILE_FLAG[@]} -gt 0 ] && PROFILE=debug
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import ocpp.v16, ocpp.v201, websockets' 2>/dev/null || {
  echo "needs the Python packages ocpp and websockets: scripts/install-test-deps.sh installs them" >&2; exit 1; }

WORK=$(mktemp -d -t csms-compare-XXXXXX)
PY_PID=
cleanup() {
  [ -n "$PY_PID" ] && kill "$PY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

LOAD_ARGS=()
[ "$MODE" = sustained ] && LOAD_ARGS=(--rate "$RATE")

echo "== csms ($PROFILE) =="
"$ROOT/bench/ingest.sh" "${PROFILE_FLAG[@]}" "${BUILD_FLAG[@]}" --stations "$STATIONS" \
  --mode "$MODE" --duration "$DURATION" -- "${LOAD_ARGS[@]}" | tee "$WORK/csms.txt"

CSMS="$CARGO_TARGET_DIR/$PROFILE/csms"
echo
echo "== Python ocpp central system =="
"$PYTHON" "$ROOT/bench/python_csms.py" >"$WORK/py.out" 2>"$WORK/py.err" &
PY_PID=$!
for _ in $(seq 1 100); do
  [ -s "$WORK/py.out" ] && break
  kill -0 "$PY_PID" 2>/dev/null || { echo "python_csms.py exited:" >&2; cat "$WORK/py.err" >&2; exit 1; }
  sleep 0.1
done
PY_PORT=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$WORK/py.out")
PROCESSES=$(( (STATIONS + 17999) / 18000 ))
SOURCE_IPS=$(( (STATIONS + 19999) / 20000 + 1 ))
timeout $(( DURATION * 2 + 600 )) "$CSMS" loadgen \
  --url "ws://127.0.0.1:$PY_PORT/ocpp" \
  --stations "$STATIONS" --mode "$MODE" --duration-secs "$DURATION" \
  --processes "$PROCESSES" --source-ips "$SOURCE_IPS" \
  --server-pid "$PY_PID" "${LOAD_ARGS[@]}" | tee "$WORK/py.txt"

echo
"$PYTHON" - "$WORK/csms.txt" "$WORK/py.txt" <<'PY'
import re, sys

def table(path):
    rows = {}
    for line in open(path):
        # loadgen prints "| figure | value" rows.
        parts = [p.strip() for p in line.strip().strip("|").split("|", 1)]
        if len(parts) == 2 and not parts[0].startswith("-"):
            rows[parts[0]] = parts[1]
    return rows

def number(text):
    m = re.search(r"[-+]?\d+(?:\.\d+)?", text or "")
    return float(m.group()) if m else None

csms, py = table(sys.argv[1]), table(sys.argv[2])
labels = ["throughput (run phase)", "CALLs answered", "CALL timeouts", "CALL latency p50",
          "CALL latency p99", "CALL latency p99.9", "CALL latency p99.999", "CALL latency max"]
labels += ["server RSS per connection"]
print(f"{'figure':<28} {'csms':>26} {'python ocpp':>26} {'ratio':>14}")
for label in labels:
    a, b = number(csms.get(label)), number(py.get(label))
    ratio = ""
    if a is not None and b is not None and a > 0 and b > 0:
        # Higher is better for throughput and answers, lower for the rest.
        better_high = label.startswith("throughput") or label == "CALLs answered"
        r = a / b if better_high else b / a
        ratio = f"{r:.1f}x {'more' if better_high else 'lower'}"
    print(f"{label:<28} {csms.get(label) or '-':>26} {py.get(label) or '-':>26} {ratio:>14}")
PY
