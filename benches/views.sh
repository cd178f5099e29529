#!/usr/bin/env bash
# Continuous aggregates (see benches/RESULTS.md, "Continuous aggregates"), default settings:
#   1. A 30-day dashboard query, TSBS double-groupby style (the mean of five CPU metrics
#      per host and hour over DAYS days), on the raw table and on its one-minute roll-up
#      (a materialized view): TSBS cpu-only at SCALE hosts for DAYS days ending now,
#      written over HTTP line protocol, the view created, the server restarted (everything
#      in Parquet) and compacted; queries over HTTP JSON, RUNS each, medians and ratio.
#   2. What maintaining the view costs: the server's CPU time (user + system, from its
#      rusage) to ingest LIVE of SCALE hosts ending now and persist it, with the view
#      defined (and refreshed to the end) and without, REPEAT times each; medians.
#
# usage: benches/views.sh
# env:   SCALE=100 DAYS=30 RUNS=9 LIVE=1d REPEAT=3 PARTS="1 2" (LIVE=3d REPEAT=3 PARTS=2: the
#        steadier maintenance figure); KILN, KILN_BENCH (default:
#        release builds in $CARGO_TARGET_DIR or target/)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-100}
DAYS=${DAYS:-30}
RUNS=${RUNS:-9}
LIVE=${LIVE:-1d}
REPEAT=${REPEAT:-3}
PARTS=${PARTS:-1 2}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${KILN:-}" ] || [ -z "${KILN_BENCH:-}" ]; then
    cargo build --release --locked -p kiln-server -p kiln-bench >&2
fi
KILN=${KILN:-$TARGET/release/kiln}
KILN_BENCH=${KILN_BENCH:-$TARGET/release/kiln-bench}

WORK=$(mktemp -d /tmp/kiln-views.XXXXXX)
PID=
cleanup() {
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# The server runs under a Python parent that reports its CPU time (rusage) when it exits.
start() {
    python3 - "$WORK/cpu" "$WORK/pid" "$KILN" serve --data-dir "$WORK/data" \
        --http-bind "127.0.0.1:$PORT" --grpc-bind 127.0.0.1:0 --pg-bind 127.0.0.1:0 \
        >>"$WORK/kiln.log" 2>&1 <<'PY' &
import resource, subprocess, sys
child = subprocess.Popen(sys.argv[3:])
open(sys.argv[2], "w").write(str(child.pid))
child.wait()
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{r.ru_utime + r.ru_stime:.3f}\n")
PY
    WRAPPER=$!
    until curl -fs "$URL/ready" >/dev/null 2>&1; do
        kill -0 "$WRAPPER" 2>/dev/null || { tail -n 20 "$WORK/kiln.log" >&2; exit 1; }
        sleep 0.05
    done
    PID=$(cat "$WORK/pid")
}
# Stops the server (a clean stop persists the buffer); its CPU seconds in CPU.
stop() { kill -TERM "$PID"; wait "$WRAPPER" || true; PID=; CPU=$(cat "$WORK/cpu"); }
sql() {
    curl -fsS "$URL/api/v3/query_sql" -H 'content-type: application/json' \
        -d "$(python3 -c 'import json,sys; print(json.dumps({"db": "benchmark", "q": sys.argv[1]}))' "$1")"
}
source benches/common.sh   # median
# Whole hours (a dashboard's range snapped to its interval): the last DAYS days up to the
# last complete hour.
RANGE="time >= time_bucket('1 hour', now() - INTERVAL '$DAYS days') AND time < time_bucket('1 hour', now())"
METRICS="usage_user usage_system usage_idle usage_nice usage_iowait"
VIEW="CREATE MATERIALIZED VIEW cpu_1m AS SELECT time_bucket('1 minute', time) AS time, hostname, $(
    for m in $METRICS; do printf 'avg(%s) AS %s, ' "$m" "$m"; done) count(*) AS readings FROM cpu GROUP BY 1, 2"
RAW="SELECT time_bucket('1 hour', time) AS hour, hostname, $(
    for m in $METRICS; do printf 'avg(%s) AS %s, ' "$m" "$m"; done | sed 's/, $//') FROM cpu WHERE $RANGE GROUP BY 1, 2 ORDER BY 1, 2"
ROLLUP="SELECT time_bucket('1 hour', time) AS hour, hostname, $(
    for m in $METRICS; do printf 'sum(%s * readings) / sum(readings) AS %s, ' "$m" "$m"; done | sed 's/, $//') FROM cpu_1m WHERE $RANGE GROUP BY 1, 2 ORDER BY 1, 2"

# 1. The 30-day dashboard query, raw table vs roll-up.
if [[ " $PARTS " == *" 1 "* ]]; then
start
"$KILN_BENCH" ingest --url "$URL" --scale "$SCALE" --duration "${DAYS}d" --start "now-${DAYS}d" |
    grep -m1 "rows/s" || true
t0=$(now_ms)
created=$(sql "$VIEW")
echo "view created (its first refresh, $DAYS days): $(( $(now_ms) - t0 )) ms, $created"
stop
start
"$KILN" compact --host "$URL" >/dev/null
rows=$(sql "SELECT count(*) AS n FROM cpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["n"])')
view_rows=$(sql "SELECT count(*) AS n FROM cpu_1m" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["n"])')
echo "data: $SCALE hosts x $DAYS days = $rows rows; roll-up: $view_rows rows"
same=$(python3 - "$URL" "$RAW" "$ROLLUP" <<'PY'
import json, sys, urllib.request
def run(q):
    body = json.dumps({"db": "benchmark", "q": q}).encode()
    req = urllib.request.Request(sys.argv[1] + "/api/v3/query_sql", body, {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
raw, rollup = run(sys.argv[2]), run(sys.argv[3])
close = len(raw) == len(rollup) and all(
    a["hour"] == b["hour"] and a["hostname"] == b["hostname"]
    and all(abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(a[k])) for k in a if k.startswith("usage"))
    for a, b in zip(raw, rollup))
if not close:
    diff = next(((a, b) for a, b in zip(raw, rollup) if a != b), None)
    print(f"first difference: {diff}", file=sys.stderr)
print(f"{len(raw)} rows, {'equal' if close else 'DIFFERENT'}")
PY
)
echo "answers: $same"
for name in raw rollup; do
    q=$RAW; [ "$name" = rollup ] && q=$ROLLUP
    sql "$q" >/dev/null # warm-up
    : >"$WORK/$name"
    for _ in $(seq 1 "$RUNS"); do
        t0=$(date +%s%N)
        sql "$q" >/dev/null
        echo $(( ($(date +%s%N) - t0) / 1000000 )) >>"$WORK/$name"
    done
done
raw_ms=$(median <"$WORK/raw")
rollup_ms=$(median <"$WORK/rollup")
echo "$DAYS-day double-groupby (5 metrics, per host and hour; HTTP JSON, median of $RUNS): raw $raw_ms ms, roll-up $rollup_ms ms, roll-up / raw = $(awk -v a="$rollup_ms" -v b="$raw_ms" 'BEGIN { printf "%.3f", a / b }')"
stop
rm -rf "$WORK/data"
fi

# 2. Maintenance: server CPU to ingest LIVE and persist it, with and without the view.
[[ " $PARTS " == *" 2 "* ]] || exit 0
: >"$WORK/cpu-without"
: >"$WORK/cpu-with"
for i in $(seq 1 "$REPEAT"); do
    for mode in without with; do
        rm -rf "$WORK/data"
        start
        # The table exists before the view: one minute of data first.
        "$KILN_BENCH" ingest --url "$URL" --scale "$SCALE" --duration 1m --start "now-$LIVE" >/dev/null
        [ "$mode" = with ] && sql "$VIEW" >/dev/null
        "$KILN_BENCH" ingest --url "$URL" --scale "$SCALE" --duration "$LIVE" --start "now-$LIVE" >/dev/null
        [ "$mode" = with ] && sql "REFRESH MATERIALIZED VIEW cpu_1m" >/dev/null
        stop
        echo "$CPU" >>"$WORK/cpu-$mode"
        echo "  run $i $mode view: $CPU s CPU" >&2
    done
done
without=$(median <"$WORK/cpu-without")
with=$(median <"$WORK/cpu-with")
echo "ingest of $LIVE at $SCALE hosts and its persistence, server CPU (median of $REPEAT): without view $without s, with view $with s; maintenance = $(awk -v a="$with" -v b="$without" 'BEGIN { printf "%.1f", 100 * (a - b) / b }') % of ingest CPU"
