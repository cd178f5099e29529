#!/usr/bin/env bash
# The edge footprint of a release build with the edge profile (see benches/RESULTS.md):
#   - binary size, as built and stripped;
#   - resident memory idle after start, on an empty data directory and on one that has
#     been through a sustained run and a restart;
#   - resident memory while sustaining RATE rows/s of line protocol over HTTP for DURATION
#     with persistence running, inside a 512 MiB memory cgroup when this machine lets us
#     make one (as a container, a pod or a systemd unit's MemoryMax= would give);
#   - start-up time to /ready with WAL_BYTES of WAL to replay (default settings).
#
# usage: benches/footprint.sh
# env:   RATE=100000 DURATION=5m WAL_BYTES=1073741824 RUNS=3
#        KILN, KILN_BENCH (default: release builds in $CARGO_TARGET_DIR or target/)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-100000}
DURATION=${DURATION:-5m}
WAL_BYTES=${WAL_BYTES:-1073741824}
RUNS=${RUNS:-3}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${KILN:-}" ] || [ -z "${KILN_BENCH:-}" ]; then
    cargo build --release --locked -p kiln-server -p kiln-bench >&2
fi
KILN=${KILN:-$TARGET/release/kiln}
KILN_BENCH=${KILN_BENCH:-$TARGET/release/kiln-bench}

WORK=$(mktemp -d /tmp/kiln-footprint.XXXXXX)
PID=
CGROUP=
cleanup() {
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
    [ -n "$CGROUP" ] && rmdir "$CGROUP" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
rss() { awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status"; }

# A memory cgroup of 512 MiB: v2 if this machine mounts it with the memory controller,
# else v1 under this process's own memory cgroup.
if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null &&
    mkdir /sys/fs/cgroup/kiln-footprint-$$ 2>/dev/null; then
    CGROUP=/sys/fs/cgroup/kiln-footprint-$$
    echo $((512 << 20)) > "$CGROUP/memory.max"
elif own=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ { print $3 }' /proc/self/cgroup) && [ -n "$own" ] &&
    mkdir "/sys/fs/cgroup/memory$own/kiln-footprint-$$" 2>/dev/null; then
    CGROUP="/sys/fs/cgroup/memory$own/kiln-footprint-$$"
    echo $((512 << 20)) > "$CGROUP/memory.limit_in_bytes"
else
    echo "note: no memory cgroup can be made here: the edge profile's own 512 MiB budget sizes memory" >&2
fi

# start DIR [ARGS…]: kiln serve on DIR (in the cgroup if there is one); sets PID and
# START_MS (milliseconds from spawn to /ready).
start() {
    local dir=$1; shift
    local t0; t0=$(date +%s%N)
    if [ -n "$CGROUP" ] && [ "${NO_CGROUP:-}" != 1 ]; then
        bash -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$CGROUP" \
            "$KILN" serve --data-dir "$dir" --http-bind "127.0.0.1:$PORT" --grpc-bind 127.0.0.1:0 \
            --pg-bind 127.0.0.1:0 "$@" >>"$WORK/kiln.log" 2>&1 &
    else
        "$KILN" serve --data-dir "$dir" --http-bind "127.0.0.1:$PORT" --grpc-bind 127.0.0.1:0 \
            --pg-bind 127.0.0.1:0 "$@" >>"$WORK/kiln.log" 2>&1 &
    fi
    PID=$!
    until curl -fs "$URL/ready" >/dev/null 2>&1; do
        kill -0 "$PID" 2>/dev/null || { tail -n 20 "$WORK/kiln.log" >&2; exit 1; }
        sleep 0.01
    done
    START_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=; }

echo "== binary"
cp "$KILN" "$WORK/kiln.stripped" && strip "$WORK/kiln.stripped"
echo "kiln: $(mib "$(stat -c %s "$KILN")") MiB as built, $(mib "$(stat -c %s "$WORK/kiln.stripped")") MiB stripped"

echo "== idle after start, empty data directory, edge profile (median of $RUNS)"
for run in $(seq 1 "$RUNS"); do
    rm -rf "$WORK/idle"
    start "$WORK/idle" --profile edge
    sleep 10
    rss "$PID"
    stop
done | median > "$WORK/idle.txt"
echo "idle RSS: $(mib "$(cat "$WORK/idle.txt")") MiB"
grep -m1 "memory for this process" "$WORK/kiln.log" | sed 's/\x1b\[[0-9;]*m//g' | sed 's/.*INFO[^:]*: /chosen: /' || true

echo "== $RATE rows/s of line protocol for $DURATION, edge profile, persistence running"
start "$WORK/edge" --profile edge
"$KILN_BENCH" sustain --url "$URL" --pid "$PID" --rate "$RATE" --duration "$DURATION" | tee "$WORK/sustain.txt"
stop
persisted=$(grep -c "persisted buffer" "$WORK/kiln.log" || true)
echo "buffer persisted $persisted times; $(find "$WORK/edge" -name '*.parquet' | wc -l) segments"

echo "== idle after a restart on that data (median of $RUNS)"
for run in $(seq 1 "$RUNS"); do
    start "$WORK/edge" --profile edge
    sleep 10
    rss "$PID"
    stop
done | median > "$WORK/idle-data.txt"
echo "idle RSS with data: $(mib "$(cat "$WORK/idle-data.txt")") MiB"

echo "== start-up with $(mib "$WAL_BYTES") MiB of WAL to replay, default settings (median of $RUNS)"
NO_CGROUP=1 start "$WORK/wal" --persist-buffer-bytes 64GiB --max-buffer-bytes 64GiB --persist-interval 24h
while [ "$(du -sb "$WORK/wal/wal" | cut -f1)" -lt "$WAL_BYTES" ]; do
    "$KILN_BENCH" ingest --url "$URL" --scale 1000 --duration 2h --seed $RANDOM >/dev/null
done
kill -9 "$PID"; wait "$PID" || true; PID=
echo "WAL: $(mib "$(du -sb "$WORK/wal/wal" | cut -f1)") MiB in $(ls "$WORK/wal/wal" | wc -l) files"
cp -a "$WORK/wal" "$WORK/wal.copy"
for run in $(seq 1 "$RUNS"); do
    rm -rf "$WORK/wal" && cp -a "$WORK/wal.copy" "$WORK/wal"
    sync
    NO_CGROUP=1 start "$WORK/wal"
    echo "$START_MS $(awk '/^VmHWM:/ { print $2 * 1024 }' "/proc/$PID/status")" >> "$WORK/startup.txt"
    kill -9 "$PID"; wait "$PID" || true; PID=
done
echo "start-up to /ready: $(cut -d' ' -f1 "$WORK/startup.txt" | median) ms (runs: $(cut -d' ' -f1 "$WORK/startup.txt" | tr '\n' ' '))"
echo "peak RSS during replay: $(mib "$(cut -d' ' -f2 "$WORK/startup.txt" | median)") MiB"
