#!/usr/bin/env bash
# Ingest through a cluster: TSBS rows/s from a Kafka topic of 6 partitions (the tansu
# broker) through 1 and through 2 ingesters (`--role ingester`, one consumer group)
# persisting to one S3 bucket (s3s-fs on loopback), and the CPU time the ingesters spend
# per row (kiln-bench cluster). A querier checks after each run that every row arrived.
#   SCALE=1000 DURATION=6h RUNS=3 benches/cluster.sh [kiln-bench cluster flags]
# On a 2-core machine two ingesters share the cores one has: the figures show what a second
# ingester costs, not what a second machine would add.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source benches/common.sh
bin="${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}"
runs="${RUNS:-3}"
need_tansu
need_s3s_fs
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release --locked -p kiln-server -p kiln-bench
fi
kafka_port="${TANSU_PORT:-19092}"
s3_port="${S3_PORT:-18901}"
work="$(mktemp -d /tmp/kiln-cluster.XXXXXX)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
"$tools/bin/tansu" broker --listener-url "tcp://127.0.0.1:$kafka_port" \
  --advertised-listener-url "tcp://127.0.0.1:$kafka_port" --storage-engine memory://tansu/ \
  > "$work/tansu.log" 2>&1 &
pids+=($!)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
mkdir -p "$work/s3/bench"
"$tools/bin/s3s-fs" --host 127.0.0.1 --port "$s3_port" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" > "$work/s3s-fs.log" 2>&1 &
pids+=($!)
wait_port "$kafka_port"
wait_port "$s3_port"
for run in $(seq 0 $(( runs - 1 ))); do
  for n in 1 2; do
    # The broker listens a moment before it answers: retried for up to 10 s.
    for attempt in $(seq 20); do
      "$tools/bin/tansu" topic create --broker "tcp://127.0.0.1:$kafka_port" --partitions 6 \
        "cluster-$n-$run" > /dev/null 2>&1 && break
      [ "$attempt" = 20 ] && { echo "cannot create topic cluster-$n-$run" >&2; exit 1; }
      sleep 0.5
    done
  done
done
"$bin/kiln-bench" cluster --kiln "$bin/kiln" --brokers "127.0.0.1:$kafka_port" \
  --scale "${SCALE:-1000}" --duration "${DURATION:-6h}" --runs "$runs" \
  --data-dir "$work/data" \
  --store-arg=--object-store=s3 --store-arg=--object-store-bucket=bench \
  --store-arg=--object-store-endpoint="http://127.0.0.1:$s3_port" \
  --kiln-arg=--kafka-option=fetch.wait.max.ms=5 \
  --kiln-arg=--kafka-option=max.partition.fetch.bytes=16777216 "$@"
