#!/usr/bin/env bash
# Kafka to queryable vs HTTP line protocol (kiln-bench kafka), through the tansu broker
# (built from crates.io into ~/.cache/kiln-tools once; librdkafka's mock cluster keeps only
# 5 MB per partition, too little to preload a topic).
#   SCALE=1000 DURATION=6h RUNS=3 ROWS_PER_MESSAGE=100 benches/kafka.sh [kiln-bench kafka flags]
# tansu answers a fetch only when fetch.wait.max.ms is over, even with data waiting (Kafka
# answers at once): Kiln is told to wait 5 ms here, so the broker's wait is not measured.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
. benches/common.sh
need_tansu
cargo build --release --locked -p kiln-server -p kiln-bench
port="${TANSU_PORT:-19092}"
work="$(mktemp -d)"
"$tools/bin/tansu" broker --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ \
  > "$work/tansu.log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null || true; rm -rf "$work"' EXIT
wait_port "$port"
for run in $(seq 0 $(( ${RUNS:-3} - 1 ))); do
  for format in lp json; do
    "$tools/bin/tansu" topic create --broker "tcp://127.0.0.1:$port" --partitions 3 "tsbs-$format-$run" > /dev/null
  done
done
./target/release/kiln-bench kafka --brokers "127.0.0.1:$port" \
  --scale "${SCALE:-1000}" --duration "${DURATION:-6h}" --runs "${RUNS:-3}" \
  --rows-per-message "${ROWS_PER_MESSAGE:-100}" \
  --kiln-arg=--kafka-option=fetch.wait.max.ms=5 \
  --kiln-arg=--kafka-option=max.partition.fetch.bytes=16777216 "$@"
