#!/usr/bin/env bash
# What exporting traces costs: TSBS ingest rows/s over HTTP line protocol (and the server's
# CPU time for it) and a small query's latency on a kept-alive connection, on a server
# without --otlp-endpoint, one exporting every trace, and one exporting a tenth
# (--otlp-sample-ratio 0.1), in turn, RUNS times each. The collector is kiln-bench
# otlp-sink on loopback, which counts the spans it receives and keeps none.
#   SCALE=1000 DURATION=6h RUNS=5 SETTLE=10 LATENCY_RUNS=300 benches/tracing.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source benches/common.sh
cargo build --release --locked -p kiln-server -p kiln-bench
bin="${CARGO_TARGET_DIR:-$root/target}/release"
work="$(mktemp -d)"
pid=""
sink=""
trap 'kill "$pid" "$sink" 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin/kiln-bench" otlp-sink --count-file "$work/spans" > "$work/sink.out" &
sink=$!
for _ in $(seq 1 100); do
  [ -s "$work/sink.out" ] && break
  sleep 0.1
done
collector="$(sed -n 's/^OTLP sink listening on //p' "$work/sink.out")"
# The exporter's default batching (every 5 s): what a user gets.
for run in $(seq 1 "${RUNS:-3}"); do
  for mode in off all tenth; do
    rm -rf "$work/data"
    case "$mode" in
      off) start_kiln "$work/data" ;;
      all) start_kiln "$work/data" --otlp-endpoint "$collector" ;;
      tenth) start_kiln "$work/data" --otlp-endpoint "$collector" --otlp-sample-ratio 0.1 ;;
    esac
    spans_before="$(cat "$work/spans")"
    before="$(kiln_cpu)"
    ingest="$("$bin/kiln-bench" ingest --url "$http" --scale "${SCALE:-1000}" \
      --duration "${DURATION:-6h}" 2> /dev/null)"
    server_cpu="$(awk -v a="$before" -v b="$(kiln_cpu)" 'BEGIN { printf "%.2f", b - a }')"
    sleep "${SETTLE:-10}"
    latency="$("$bin/kiln-bench" latency --url "$http" --runs "${LATENCY_RUNS:-300}" \
      | sed 's/url=[^ ]* //; s/ connect_p50_ms=.*//')"
    # Stopping flushes what the exporter still holds.
    stop_kiln
    spans="$(( $(cat "$work/spans") - spans_before ))"
    echo "run=$run mode=$mode $ingest server_cpu_s=$server_cpu $latency spans=$spans"
  done
done
