#!/usr/bin/env bash
# Compaction's memory (see benches/RESULTS.md): one hour partition of the TSBS cpu-only
# table written ROUNDS times (each round's seed draws other tag values, so other series),
# each round persisted by a restart into a segment of its own; then `kiln compact` merges
# the partition while the server's resident memory is watched.
# Reports the partition's segments and bytes, RSS before, the peak during the merge
# (VmHWM, reset just before) and the merged segment. Default settings otherwise.
#
# usage: benches/compaction.sh
# env:   SCALE=4000 ROUNDS=4; KILN, KILN_BENCH (default: release builds in
#        $CARGO_TARGET_DIR or target/)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-4000}
ROUNDS=${ROUNDS:-4}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${KILN:-}" ] || [ -z "${KILN_BENCH:-}" ]; then
    cargo build --release --locked -p kiln-server -p kiln-bench >&2
fi
KILN=${KILN:-$TARGET/release/kiln}
KILN_BENCH=${KILN_BENCH:-$TARGET/release/kiln-bench}

WORK=$(mktemp -d /tmp/kiln-compaction.XXXXXX)
PID=
cleanup() {
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
status() { awk -v k="$2:" '$1 == k { print $2 * 1024 }' "/proc/$1/status"; }
start() {
    "$KILN" serve --data-dir "$WORK/data" --http-bind "127.0.0.1:$PORT" --grpc-bind 127.0.0.1:0 \
        --pg-bind 127.0.0.1:0 --compaction-interval 0s >>"$WORK/kiln.log" 2>&1 &
    PID=$!
    until curl -fs "$URL/ready" >/dev/null 2>&1; do
        kill -0 "$PID" 2>/dev/null || { tail -n 20 "$WORK/kiln.log" >&2; exit 1; }
        sleep 0.05
    done
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=; }

for round in $(seq 1 "$ROUNDS"); do
    start
    "$KILN_BENCH" ingest --url "$URL" --scale "$SCALE" --duration 1h --seed "$round" |
        grep -m1 "rows/s" || true
    stop
done
segments=$(find "$WORK/data/objects/segments" -name '*.parquet')
echo "partition: $(echo "$segments" | wc -l) segments, $(mib "$(cat $segments | wc -c)") MiB"

start
sleep 2
before=$(status "$PID" VmRSS)
echo 5 > "/proc/$PID/clear_refs"
t0=$(date +%s%N)
"$KILN" compact --host "$URL"
elapsed=$(( ($(date +%s%N) - t0) / 1000000 ))
peak=$(status "$PID" VmHWM)
echo "RSS before: $(mib "$before") MiB; peak during the merge: $(mib "$peak") MiB (+$(mib $((peak - before))) MiB); $elapsed ms"
curl -fsS "$URL/api/v3/query_sql" --data-urlencode "db=benchmark" \
    --data-urlencode "q=SELECT count(*) AS n FROM cpu" -G
echo
stop
