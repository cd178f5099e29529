#!/usr/bin/env bash
# The TSBS cpu-only query benchmark, Kiln against DuckDB on the same data, in two modes.
#
# MODE=users (the default): as a new user meets Kiln, at each scale of SCALES (default
# "100 1000 4000"):
#   1. installs DuckDB (PyPI) in a venv, builds release binaries;
#   2. writes the workload over HTTP line protocol into a fresh data directory with default
#      settings, restarts the server (everything is then in Parquet segments) and compacts;
#      no last-value cache is created;
#   3. has DuckDB write its own copy of the data (`duckdb_queries.py prepare`: one Parquet
#      file a day sorted by host then time, zoneless timestamps, and a native table);
#   4. runs `kiln-bench queries`: every query type over Kiln's HTTP API (JSON results) and
#      its PostgreSQL interface (simple protocol, text, as psql), and on DuckDB over its
#      own Parquet files and its native table; prints the table of medians and ratios.
#
# MODE=tuned: Kiln in its best conditions, at SCALE (default 4000): written over gRPC
# Arrow, a last-value cache created for lastpoint, queried over Flight SQL (with
# KEEP_DICTIONARIES=1, tags as Arrow dictionaries), DuckDB over the segments Kiln wrote.
#
# Sizes: DURATION (default 1d), RUNS (per query type, 10). TYPES=a,b runs only those query
# types. DATA=<dir> (one scale) keeps the data directory there and, when it already holds
# data, queries it again without ingesting (to compare builds on the same segments).
# BIN_DIR=<dir> runs the `kiln` and `kiln-bench` there instead of building (to measure an
# earlier build in the same way).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode="${MODE:-users}"
duration="${DURATION:-1d}"
runs="${RUNS:-10}"
bin="${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}"

venv="${KILN_BENCH_VENV:-$HOME/.cache/kiln-bench-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check duckdb pyarrow
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -p kiln-server -p kiln-bench
fi

http=127.0.0.1:18581
grpc=127.0.0.1:18551
pg=18532
pid=
serve() {
  "$bin/kiln" serve --data-dir "$data" --http-bind "$http" --grpc-bind "$grpc" \
    --pg-bind "127.0.0.1:$pg" >>"$data.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://$http/health" >/dev/null && return
    sleep 0.2
  done
  echo "kiln did not start; see $data.log" >&2
  exit 1
}
stop() {
  kill -TERM "$pid"; wait "$pid" || true   # a clean stop persists the buffer
}
trap '[ -n "$pid" ] && kill $pid 2>/dev/null || true' EXIT

segments_of() {
  echo "segments: $(find "$data/objects/segments" -name '*.parquet' | wc -l)," \
    "$(du -sh "$data/objects/segments" | cut -f1)"
}

run_scale() {
  local scale=$1
  keep="${DATA:-}"
  data="${DATA:-$(mktemp -d /tmp/kiln-queries.XXXXXX)}"
  mkdir -p "$data"
  echo "## scale $scale ($mode)"
  if [ ! -d "$data/objects/segments" ]; then
    serve
    if [ "$mode" = tuned ]; then
      "$bin/kiln-bench" ingest --protocol grpc-arrow --url "http://$http" \
        --grpc-url "http://$grpc" --scale "$scale" --duration "$duration"
    else
      "$bin/kiln-bench" ingest --url "http://$http" --scale "$scale" \
        --duration "$duration"
    fi
    stop
    serve
    if [ "$mode" = tuned ]; then
      "$bin/kiln" last-cache create --host "http://$http" -d benchmark -t cpu \
        --key-columns hostname
    fi
  else
    serve
  fi
  if [ "$mode" = tuned ]; then
    # Reading the cache waits until it is warm (filled from the segments).
    "$bin/kiln" query --host "http://$http" -d benchmark \
      "SELECT count(*) AS cached_series FROM last_cache('benchmark', 'cpu')"
  fi
  # Partitions the ingest persisted in two parts are merged, as the background compactor
  # would within a minute; now, so that every query reads the merged files.
  "$bin/kiln" compact --host "http://$http"
  segments_of
  local glob="$data/objects/segments/*/*/*.parquet"
  if [ "$mode" = tuned ]; then
    "$bin/kiln-bench" queries --grpc-url "http://$grpc" --scale "$scale" \
      --duration "$duration" --runs "$runs" --python "$venv/bin/python" \
      --script "$root/benches/duckdb_queries.py" --clients flight --segments "$glob" \
      ${TYPES:+--types "$TYPES"} ${KEEP_DICTIONARIES:+--keep-dictionaries}
  else
    if [ ! -f "$data.duck/cpu.duckdb" ]; then
      "$venv/bin/python" "$root/benches/duckdb_queries.py" prepare "$glob" "$data.duck"
    fi
    "$bin/kiln-bench" queries --url "http://$http" \
      --pg "host=127.0.0.1 port=$pg user=kiln" --scale "$scale" --duration "$duration" \
      --runs "$runs" --python "$venv/bin/python" --script "$root/benches/duckdb_queries.py" \
      --clients http,pg --duckdb-parquet "$data.duck/parquet" \
      --duckdb-native "$data.duck/cpu.duckdb" ${TYPES:+--types "$TYPES"}
  fi
  stop
  if [ -z "$keep" ]; then
    rm -rf "$data" "$data.log" "$data.duck"
  fi
}

if [ "$mode" = tuned ]; then
  run_scale "${SCALE:-4000}"
else
  for scale in ${SCALES:-100 1000 4000}; do
    run_scale "$scale"
  done
fi
