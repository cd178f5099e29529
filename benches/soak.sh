#!/usr/bin/env bash
# Soak (see benches/RESULTS.md): a release kiln with default settings takes RATE rows/s of
# line protocol over HTTP for DURATION while a dashboard's queries run every 5 s over the
# most recent data; resident memory is sampled every 10 s. Reports RSS after WARMUP
# (min, median, max, spread (max - min) / median, and medians per 10 minutes, whose
# growth is the goal's measure: within 10 %), the dashboard's errors and latencies, and
# the write refusals. The default rate is about half of what 2 cores take (the soak the
# robustness issue asks for); RATE=300000 saturates them.
#
# usage: benches/soak.sh
# env:   RATE=150000 DURATION=1h WARMUP=10m SCALE=1000
#        KILN, KILN_BENCH (default: release builds in $CARGO_TARGET_DIR or target/)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-150000}
DURATION=${DURATION:-1h}
WARMUP=${WARMUP:-10m}
SCALE=${SCALE:-1000}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${KILN:-}" ] || [ -z "${KILN_BENCH:-}" ]; then
    cargo build --release --locked -p kiln-server -p kiln-bench >&2
fi
KILN=${KILN:-$TARGET/release/kiln}
KILN_BENCH=${KILN_BENCH:-$TARGET/release/kiln-bench}
seconds() { python3 -c "import sys,re; m={'s':1,'m':60,'h':3600}; v=sys.argv[1]; print(int(float(v[:-1])*m[v[-1]]) if v[-1] in m else int(v))" "$1"; }
WARMUP_S=$(seconds "$WARMUP")

WORK=$(mktemp -d /tmp/kiln-soak.XXXXXX)
PID=
JOBS=()
cleanup() {
    for j in "${JOBS[@]}"; do kill "$j" 2>/dev/null || true; done
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
"$KILN" serve --data-dir "$WORK/data" --http-bind "127.0.0.1:$PORT" \
    --grpc-bind "127.0.0.1:$(free_port)" --pg-bind "127.0.0.1:$(free_port)" \
    >"$WORK/stdout" 2>"$WORK/kiln.log" &
PID=$!
for _ in $(seq 100); do curl -sf "$URL/ready" >/dev/null && break; sleep 0.1; done

# Resident memory every 10 s: seconds since start, bytes, and what the write buffer holds
# (bytes, from /metrics), to tell the buffer's growth from the rest.
T0=$(date +%s)
(while kill -0 "$PID" 2>/dev/null; do
    echo "$(($(date +%s) - T0)) $(awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$PID/status")" \
        "$(curl -sf "$URL/metrics" | awk '/^kiln_buffer_bytes / { print $2 }')"
    sleep 10
done) >"$WORK/rss.txt" &
JOBS+=($!)

# The dashboard: four panels over the last minutes of data, refreshed every 5 s.
python3 - "$URL" >"$WORK/dashboard.txt" <<'EOF' &
import json, sys, time, urllib.parse, urllib.request
url = sys.argv[1]
recent = "time > (SELECT max(time) FROM cpu) - INTERVAL '{}'"
panels = [
    "SELECT date_bin(INTERVAL '1 minute', time) AS t, avg(usage_user) FROM cpu WHERE "
    + recent.format("15 minutes") + " GROUP BY 1 ORDER BY 1",
    "SELECT hostname, max(usage_user) FROM cpu WHERE " + recent.format("5 minutes")
    + " GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
    "SELECT count(*) FROM cpu WHERE " + recent.format("1 minute"),
    "SELECT * FROM cpu WHERE hostname = 'host_7' AND " + recent.format("1 hour")
    + " ORDER BY time DESC LIMIT 100",
]
while True:
    start = time.time()
    for sql in panels:
        q = urllib.parse.urlencode({"db": "benchmark", "q": sql})
        t = time.time()
        try:
            with urllib.request.urlopen(f"{url}/api/v3/query_sql?{q}", timeout=60) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
            if status != 404:  # before the first write, the database does not exist
                print("error", status, e.read()[:200], flush=True)
        except Exception as e:
            status = 0
            print("error", 0, repr(e)[:200], flush=True)
        print("query", status, round((time.time() - t) * 1000, 1), flush=True)
    time.sleep(max(0.0, 5 - (time.time() - start)))
EOF
JOBS+=($!)

"$KILN_BENCH" sustain --url "$URL" --db benchmark --pid "$PID" --rate "$RATE" \
    --duration "$DURATION" --scale "$SCALE" --connections 4 | tee "$WORK/sustain.txt"

echo "--- soak: RATE=$RATE DURATION=$DURATION, RSS after WARMUP=$WARMUP"
# After warm-up: RSS, and RSS less the write buffer (what the buffer's fill and persist
# saw-tooth does not explain), each as min/median/max and spread (max - min) / median;
# then medians per 10 minutes, and the growth of the last 10 minutes' median over the
# first's (a leak shows there, the buffer's saw-tooth does not).
python3 - "$WORK/rss.txt" "$WARMUP_S" <<'EOF'
import statistics, sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 3]
warmup, mib = int(sys.argv[2]), 1 << 20
after = [r for r in rows if r[0] >= warmup]
if not after:
    sys.exit(print("no samples after warm-up"))
def summary(name, values):
    med = statistics.median(values)
    print(f"{name} samples={len(values)} min_mib={min(values) / mib:.1f} "
          f"median_mib={med / mib:.1f} max_mib={max(values) / mib:.1f} "
          f"spread={(max(values) - min(values)) * 100 / med:.1f}%")
summary("rss", [r[1] for r in after])
summary("rss-buffer", [r[1] - r[2] for r in after])
print("per 10 minutes (MiB): minutes rss_median rss_max buffer_median rss-buffer_median")
windows = {}
for t, rss, buf in rows:
    windows.setdefault(t // 600, []).append((rss, buf))
medians = []
for w, v in sorted(windows.items()):
    m = statistics.median(r for r, _ in v)
    if w * 600 >= warmup:
        medians.append(m)
    print(f"  {w * 10}-{w * 10 + 10} {m / mib:.0f} {max(r for r, _ in v) / mib:.0f} "
          f"{statistics.median(b for _, b in v) / mib:.0f} "
          f"{statistics.median(r - b for r, b in v) / mib:.0f}")
if len(medians) > 1:
    print(f"growth of the 10-minute median after warm-up, last over first: "
          f"{(medians[-1] - medians[0]) * 100 / medians[0]:+.1f}%")
EOF
echo "every 10 s (seconds:RSS MiB/buffer MiB):"
awk '{ printf "%s:%.0f/%.0f ", $1, $2 / 1048576, $3 / 1048576 } END { print "" }' "$WORK/rss.txt"
grep '^query 200' "$WORK/dashboard.txt" | awk '{ print $3 }' | sort -n | awk '
    { a[NR] = $1 }
    END {
        if (NR == 0) exit
        p99 = int(NR * 0.99); if (p99 < 1) p99 = 1
        printf "dashboard queries=%d p50_ms=%.1f p99_ms=%.1f max_ms=%.1f\n", NR, a[int((NR + 1) / 2)], a[p99], a[NR]
    }'
echo "dashboard errors: $(grep -c '^error' "$WORK/dashboard.txt" || true)"
grep '^error' "$WORK/dashboard.txt" | sort | uniq -c | head -5 || true
echo "server log errors: $(grep -c ' ERROR ' "$WORK/kiln.log" || true)"
echo "data directory: $(du -sh "$WORK/data" | cut -f1)"
