#!/usr/bin/env bash
# The TSBS cpu-only query benchmark, Kiln against DuckDB on the same data:
#   1. installs DuckDB (PyPI) in a venv, builds release binaries;
#   2. ingests the workload through Kiln's normal write path (gRPC Arrow) into a fresh
#      data directory, and restarts the server so that everything is in Parquet segments;
#   3. gives `cpu` a last-value cache keyed by hostname (lastpoint reads it) and compacts
#      (`kiln compact`: a partition persisted in several segments becomes one);
#   4. runs `kiln-bench queries`: every query type on Kiln (Flight SQL) and on DuckDB over
#      the segments Kiln wrote, and prints the table of medians.
# Sizes: SCALE (hosts, default 4000), DURATION (default 1d), RUNS (per query type, 10).
# TYPES=a,b runs only those query types. KEEP_DICTIONARIES=1 receives tags as Arrow
# dictionaries (the `kiln-dictionaries: keep` Flight header) instead of strings.
# DATA=<dir> keeps the data directory there and, when it already holds data, queries it
# again without ingesting (to compare builds on the same segments).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scale="${SCALE:-4000}"
duration="${DURATION:-1d}"
runs="${RUNS:-10}"
target="${CARGO_TARGET_DIR:-$root/target}"

venv="${KILN_BENCH_VENV:-$HOME/.cache/kiln-bench-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check duckdb pyarrow
cargo build --release -p kiln-server -p kiln-bench

keep="${DATA:-}"
data="${DATA:-$(mktemp -d /tmp/kiln-queries.XXXXXX)}"
mkdir -p "$data"
http=127.0.0.1:18581
grpc=127.0.0.1:18551
serve() {
  "$target/release/kiln" serve --data-dir "$data" --http-bind "$http" --grpc-bind "$grpc" \
    --pg-bind 127.0.0.1:18532 >>"$data.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://$http/health" >/dev/null && return
    sleep 0.2
  done
  echo "kiln did not start; see $data.log" >&2
  exit 1
}
trap 'kill $pid 2>/dev/null || true' EXIT

if [ ! -d "$data/objects/segments" ]; then
  serve
  "$target/release/kiln-bench" ingest --protocol grpc-arrow --url "http://$http" \
    --grpc-url "http://$grpc" --scale "$scale" --duration "$duration"
  kill -TERM "$pid"; wait "$pid"   # a clean stop persists the buffer
  serve
  "$target/release/kiln" last-cache create --host "http://$http" -d benchmark -t cpu \
    --key-columns hostname
else
  serve
fi
# Reading the cache waits until it is warm (filled from the segments).
"$target/release/kiln" query --host "http://$http" -d benchmark \
  "SELECT count(*) AS cached_series FROM last_cache('benchmark', 'cpu')"
# Partitions the ingest persisted in two parts are merged, as the background compactor
# would within a minute; now, so that DuckDB's glob sees only the merged files.
"$target/release/kiln" compact --host "http://$http"
echo "segments: $(find "$data/objects/segments" -name '*.parquet' | wc -l)," \
  "$(du -sh "$data/objects/segments" | cut -f1)"
"$target/release/kiln-bench" queries --grpc-url "http://$grpc" --scale "$scale" \
  --duration "$duration" --runs "$runs" --python "$venv/bin/python" \
  --script "$root/benches/duckdb_queries.py" \
  --segments "$data/objects/segments/*/*/*.parquet" ${TYPES:+--types "$TYPES"} \
  ${KEEP_DICTIONARIES:+--keep-dictionaries}
kill -TERM "$pid"; wait "$pid" || true
if [ -z "$keep" ]; then
  rm -rf "$data" "$data.log"
fi
