#!/usr/bin/env bash
# Segments in S3 against segments on local disk, through the client most users have (HTTP
# JSON): the latency of TSBS cpu-only query types and the requests each query sends to the
# object store.
#
#   1. installs s3s-fs from crates.io into ~/.cache/kiln-tools (once) and starts it on
#      loopback: a real S3 server, keeping its objects as files on this machine's disk;
#   2. writes the TSBS workload over HTTP line protocol into a server with default settings
#      and `--object-store s3`, restarts it and compacts;
#   3. copies the bucket's objects into a second data directory (the README's move, the
#      other way round), so that a server with the default `--object-store file` holds the
#      same segments;
#   4. runs `kiln-bench queries --clients http` against
#      a. the file store (an untimed pass, then the timed one);
#      b. S3 with the default disk cache, warm (filled by the untimed pass);
#      c. a querier (`--role querier`) on the same bucket, its cache warm the same way;
#      d. S3 with a cold cache: each query type on a server restarted with an empty cache,
#         timed the first time it runs (RUNS restarts per type, a different instance each);
#      and reads kiln_object_store_requests_total around each to print requests per query.
#
# SCALE (default 100 hosts), DURATION (1d), RUNS (5), TYPES (comma-separated; default five
# types from one host's hour to every host's day).
#
# The S3 server shares the machine: a request costs loopback and a file read, far less
# than a real store's 10-50 ms. The request counts carry over to a real store; the
# latencies of the cold column are a lower bound.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source benches/common.sh
scale="${SCALE:-100}"
duration="${DURATION:-1d}"
runs="${RUNS:-5}"
types="${TYPES:-single-groupby-1-1-1,single-groupby-5-8-1,cpu-max-all-8,double-groupby-all,lastpoint}"
bin="${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}"

need_s3s_fs
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -p kiln-server -p kiln-bench
fi

work="$(mktemp -d /tmp/kiln-object-store.XXXXXX)"
s3_port=18900
http=127.0.0.1:18581
s3_pid=
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  [ -n "$s3_pid" ] && kill "$s3_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
mkdir -p "$work/s3/bench"
"$tools/bin/s3s-fs" --host 127.0.0.1 --port "$s3_port" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" > "$work/s3s-fs.log" 2>&1 &
s3_pid=$!
wait_port "$s3_port"
s3_flags=(--object-store s3 --object-store-bucket bench --object-store-prefix kiln
  --object-store-endpoint "http://127.0.0.1:$s3_port")

# serve DATA_DIR FLAGS...: a server with default settings but the flags given.
serve() {
  local data=$1
  shift
  "$bin/kiln" serve --data-dir "$data" --http-bind "$http" --grpc-bind 127.0.0.1:0 \
    --pg-bind 127.0.0.1:0 "$@" >> "$data.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://$http/health" > /dev/null && return
    sleep 0.2
  done
  echo "kiln did not start; see $data.log" >&2
  exit 1
}
stop() {
  kill -TERM "$pid"
  wait "$pid" || true
  pid=
}
requests() {
  curl -s "http://$http/metrics" | awk '/^kiln_object_store_requests_total/ { s += $2 } END { print s + 0 }'
}
# queries [FLAGS...]: kiln-bench's table of medians (ms) for the chosen types.
queries() {
  "$bin/kiln-bench" queries --url "http://$http" --clients http --scale "$scale" \
    --duration "$duration" --types "$types" "$@"
}

echo "## TSBS cpu-only, scale $scale, $duration; S3: s3s-fs 0.14.1 on loopback"
s3_data="$work/s3-node"
serve "$s3_data" "${s3_flags[@]}"
"$bin/kiln-bench" ingest --url "http://$http" --scale "$scale" --duration "$duration"
stop
serve "$s3_data" "${s3_flags[@]}"
"$bin/kiln" compact --host "http://$http"
stop
echo "segments: $(find "$work/s3/bench/kiln/segments" -name '*.parquet' | wc -l)," \
  "$(du -sh "$work/s3/bench/kiln/segments" | cut -f1)"
file_data="$work/file-node"
mkdir -p "$file_data"
cp -r "$work/s3/bench/kiln" "$file_data/objects"
# The file server takes over the data only: the S3 server's WAL is empty after its stop.

echo "### file store"
serve "$file_data"
queries --runs "$runs" | tee "$work/file.md"
stop

echo "### S3, warm cache (default size)"
serve "$s3_data" "${s3_flags[@]}"
queries --runs "$runs" > /dev/null   # fills the cache
before=$(requests)
queries --runs "$runs" | tee "$work/warm.md"
after=$(requests)
n_types=$(echo "$types" | tr ',' '\n' | wc -l)
echo "requests per query, warm: $(awk -v d=$((after - before)) -v n=$((2 * runs * n_types)) 'BEGIN { printf "%.2f", d / n }')"
stop

echo "### a querier (--role querier) on the S3 bucket, warm cache"
querier_data="$work/querier"
mkdir -p "$querier_data"
serve "$querier_data" "${s3_flags[@]}" --role querier
queries --runs "$runs" > /dev/null   # fills the cache
queries --runs "$runs" | tee "$work/querier.md"
stop

echo "### S3, cold cache: a restart with an empty cache before each query"
: > "$work/cold.txt"
for t in $(echo "$types" | tr ',' ' '); do
  for r in $(seq 1 "$runs"); do
    rm -rf "$s3_data/cache"
    serve "$s3_data" "${s3_flags[@]}"
    before=$(requests)
    ms=$("$bin/kiln-bench" queries --url "http://$http" --clients http --scale "$scale" \
      --duration "$duration" --types "$t" --runs 1 --cold --seed "$r" \
      | awk -F'|' -v t="$t" '$2 ~ " "t" " { gsub(/ /, "", $3); print $3 }')
    after=$(requests)
    echo "$t $ms $((after - before))" >> "$work/cold.txt"
    stop
  done
done

echo
echo "| query type | single node, file store, ms | single node, S3 warm cache, ms | querier, S3 warm cache, ms | S3 cold cache, ms | S3 warm / file | querier / single node (S3) | cold / file | S3 requests per query, cold |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
cell() { awk -F'|' -v t="$1" '$2 ~ " "t" " { gsub(/ /, "", $3); print $3 }' "$2"; }
for t in $(echo "$types" | tr ',' ' '); do
  f=$(cell "$t" "$work/file.md")
  w=$(cell "$t" "$work/warm.md")
  r=$(cell "$t" "$work/querier.md")
  c=$(awk -v t="$t" '$1 == t { print $2 }' "$work/cold.txt" | median)
  q=$(awk -v t="$t" '$1 == t { print $3 }' "$work/cold.txt" | median)
  awk -v t="$t" -v f="$f" -v w="$w" -v r="$r" -v c="$c" -v q="$q" \
    'BEGIN { printf "| %s | %.2f | %.2f | %.2f | %.2f | %.2f× | %.2f× | %.2f× | %s |\n", t, f, w, r, c, w / f, r / w, c / f, q }'
done
