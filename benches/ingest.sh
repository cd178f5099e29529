#!/usr/bin/env bash
# Durable HTTP line-protocol ingest, Kiln against VictoriaMetrics, same client, same data,
# runs interleaved, a fresh data directory for each run.
#
#   1. installs VictoriaMetrics (Debian's `victoria-metrics`) if missing and builds Kiln;
#   2. writes the TSBS cpu-only workload (SCALE hosts, default 1000, over DURATION, default
#      6h, ending now: VictoriaMetrics refuses rows older than its retention) as one
#      line-protocol file;
#   3. RUNS times (default 3): Kiln with default settings (every write acknowledged after
#      its WAL fsync), then VictoriaMetrics with default settings (acknowledged once
#      buffered in memory, flushed about every second), each fed by `lp_ingest.py`
#      (Python standard library, CONNECTIONS kept connections, default 4, LINES lines a
#      request, default 5000);
#   4. prints rows/s per run, medians and the ratio Kiln / VictoriaMetrics.
# BIN_DIR=<dir> measures the `kiln` and `kiln-bench` there instead of building.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source benches/common.sh   # median
scale="${SCALE:-1000}"
duration="${DURATION:-6h}"
runs="${RUNS:-3}"
connections="${CONNECTIONS:-4}"
lines="${LINES:-5000}"
bin="${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}"

if ! command -v victoria-metrics >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq victoria-metrics >/dev/null
fi
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -p kiln-server -p kiln-bench
fi

work="$(mktemp -d /tmp/kiln-ingest.XXXXXX)"
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$work"' EXIT
lp="$work/cpu.lp"
"$bin/kiln-bench" generate --scale "$scale" --duration "$duration" --start "now-$duration" >"$lp"
echo "workload: $(wc -l <"$lp") rows, $(du -h "$lp" | cut -f1) of line protocol;" \
  "$connections connections, $lines lines a request"

wait_for() {
  for _ in $(seq 150); do
    curl -sf "$1" >/dev/null && return
    sleep 0.2
  done
  echo "server did not start ($1)" >&2
  exit 1
}

# Runs the server "$@" (writing under $data) until $health answers, sends it the file at
# $url, stops it and removes $data; prints the client's line of JSON.
measure() {
  local data=$1 health=$2 url=$3
  shift 3
  "$@" >"$data.log" 2>&1 &
  pid=$!
  wait_for "$health"
  python3 benches/lp_ingest.py "$lp" "$url" --lines "$lines" --connections "$connections"
  kill -TERM "$pid"; wait "$pid" || true; pid=
  rm -rf "$data"
}
run_kiln() {
  measure "$work/kiln-$1" http://127.0.0.1:18681/health \
    "http://127.0.0.1:18681/api/v3/write_lp?db=bench" \
    "$bin/kiln" serve --data-dir "$work/kiln-$1" --http-bind 127.0.0.1:18681 \
    --grpc-bind 127.0.0.1:18682 --pg-bind 127.0.0.1:18683
}
run_vm() {
  measure "$work/vm-$1" http://127.0.0.1:18428/health http://127.0.0.1:18428/write \
    victoria-metrics -storageDataPath "$work/vm-$1" -httpListenAddr 127.0.0.1:18428
}

field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

kiln_rates=(); vm_rates=()
echo "| run | Kiln rows/s | Kiln p50 / p99 ms | VictoriaMetrics rows/s | VictoriaMetrics p50 / p99 ms |"
echo "|---|---:|---:|---:|---:|"
for run in $(seq "$runs"); do
  k="$(run_kiln "$run")"
  v="$(run_vm "$run")"
  kiln_rates+=("$(field "$k" rows_per_s)"); vm_rates+=("$(field "$v" rows_per_s)")
  echo "| $run | $(field "$k" rows_per_s) | $(field "$k" p50_ms) / $(field "$k" p99_ms)" \
    "| $(field "$v" rows_per_s) | $(field "$v" p50_ms) / $(field "$v" p99_ms) |"
done
km="$(printf '%s\n' "${kiln_rates[@]}" | median)"
vmm="$(printf '%s\n' "${vm_rates[@]}" | median)"
echo "| **median** | **$km** | | **$vmm** | |"
echo "Kiln / VictoriaMetrics: $(python3 -c "print(f'{$km / $vmm:.2f}x')")"
