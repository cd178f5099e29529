#!/usr/bin/env bash
# Data lifecycle (see benches/RESULTS.md, "Data lifecycle"): TSBS cpu-only for DAYS days
# ending now, written over HTTP line protocol, the server restarted (everything in
# Parquet) and compacted, default settings. Then:
#   * the latency of deleting one host's rows (HTTP `DELETE FROM cpu WHERE hostname = …`,
#     DELETES hosts, median), and of the compaction that makes the deletes physical;
#   * disk freed by retention: the database's retention set to KEEP, and the bytes of
#     segments before and after the retention pass (default --retention-check-interval,
#     so up to a minute), with how long it took.
#
# usage: benches/lifecycle.sh
# env:   SCALE=100 DAYS=3 KEEP=1d DELETES=5; KILN, KILN_BENCH (default: release builds in
#        $CARGO_TARGET_DIR or target/)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-100}
DAYS=${DAYS:-3}
KEEP=${KEEP:-1d}
DELETES=${DELETES:-5}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${KILN:-}" ] || [ -z "${KILN_BENCH:-}" ]; then
    cargo build --release --locked -p kiln-server -p kiln-bench >&2
fi
KILN=${KILN:-$TARGET/release/kiln}
KILN_BENCH=${KILN_BENCH:-$TARGET/release/kiln-bench}

WORK=$(mktemp -d /tmp/kiln-lifecycle.XXXXXX)
PID=
cleanup() {
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
segment_bytes() { find "$WORK/data/objects/segments" -name '*.parquet' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }
segment_files() { find "$WORK/data/objects/segments" -name '*.parquet' | wc -l; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
start() {
    "$KILN" serve --data-dir "$WORK/data" --http-bind "127.0.0.1:$PORT" --grpc-bind 127.0.0.1:0 \
        --pg-bind 127.0.0.1:0 >>"$WORK/kiln.log" 2>&1 &
    PID=$!
    until curl -fs "$URL/ready" >/dev/null 2>&1; do
        kill -0 "$PID" 2>/dev/null || { tail -n 20 "$WORK/kiln.log" >&2; exit 1; }
        sleep 0.05
    done
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=; }
sql() {
    curl -fsS "$URL/api/v3/query_sql" -H 'content-type: application/json' \
        -d "$(python3 -c 'import json,sys; print(json.dumps({"db": "benchmark", "q": sys.argv[1]}))' "$1")"
}
source benches/common.sh   # median

start
"$KILN_BENCH" ingest --url "$URL" --scale "$SCALE" --duration "${DAYS}d" --start "now-${DAYS}d" |
    grep -m1 "rows/s" || true
stop
start
"$KILN" compact --host "$URL" >/dev/null
rows=$(sql "SELECT count(*) AS n FROM cpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["n"])')
echo "data: $SCALE hosts x $DAYS days = $rows rows, $(segment_files) segments, $(mib "$(segment_bytes)") MiB"

# Deletes of one host's rows each.
: >"$WORK/deletes"
for i in $(seq 1 "$DELETES"); do
    host="host_$(( i * SCALE / (DELETES + 1) ))"
    t0=$(now_ms)
    answer=$(sql "DELETE FROM cpu WHERE hostname = '$host'")
    echo $(( $(now_ms) - t0 )) >>"$WORK/deletes"
    echo "  delete $host: $(( $(now_ms) - t0 )) ms, $answer" >&2
done
left=$(sql "SELECT count(*) AS n FROM cpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["n"])')
echo "delete one host's rows (HTTP, $DELETES hosts): median $(median <"$WORK/deletes") ms; $(( rows - left )) rows deleted"
t0=$(now_ms)
"$KILN" compact --host "$URL" >/dev/null
echo "compaction making the deletes physical: $(( $(now_ms) - t0 )) ms, $(mib "$(segment_bytes)") MiB after"

# Retention.
before=$(segment_bytes)
files_before=$(segment_files)
t0=$(now_ms)
"$KILN" database update benchmark --retention "$KEEP" --host "$URL" >/dev/null
until [ "$(segment_files)" -lt "$files_before" ]; do
    [ $(( $(now_ms) - t0 )) -gt 150000 ] && { echo "retention freed nothing in 150 s" >&2; exit 1; }
    sleep 0.2
done
sleep 2 # the pass deletes the table's files one after another
after=$(segment_bytes)
kept=$(sql "SELECT count(*) AS n FROM cpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["n"])')
echo "retention $KEEP of $DAYS days: $(mib "$before") MiB -> $(mib "$after") MiB ($(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.0f", 100 * (b - a) / b }') % freed) $(( ($(now_ms) - t0) / 1000 )) s after the change; $kept rows queryable"
stop
