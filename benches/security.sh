#!/usr/bin/env bash
# What tokens and TLS cost: TSBS ingest rows/s over HTTP line protocol, a small query's
# latency on a kept-alive connection (a max over one host, and `SELECT 1` for the fixed
# cost), and a new connection's first request, on a server without tokens or TLS, one with
# tokens, and one with tokens and TLS (a throwaway CA from kiln-bench certs), in turn, RUNS
# times each.
#   SCALE=1000 DURATION=6h RUNS=5 SETTLE=10 LATENCY_RUNS=300 benches/security.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source benches/common.sh
cargo build --release --locked -p kiln-server -p kiln-bench
bin="${CARGO_TARGET_DIR:-$root/target}/release"
work="$(mktemp -d)"
pid=""
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin/kiln-bench" certs --dir "$work/tls"
admin="kiln_$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "$admin" > "$work/admin-token"


for run in $(seq 1 "${RUNS:-3}"); do
  for mode in plain tokens secure; do
    rm -rf "$work/data"
    if [ "$mode" = plain ]; then
      start_kiln "$work/data"
      access=()
    elif [ "$mode" = tokens ]; then
      start_kiln "$work/data" --admin-token-file "$work/admin-token"
      token="$("$bin/kiln" token create --host "$http" --token "$admin" --name bench \
        --database benchmark --read --write 2> /dev/null)"
      access=(--token "$token")
    else
      start_kiln "$work/data" --tls-cert "$work/tls/tls.crt" --tls-key "$work/tls/tls.key" \
        --admin-token-file "$work/admin-token"
      token="$("$bin/kiln" token create --host "$http" --tls-ca "$work/tls/ca.pem" \
        --token "$admin" --name bench --database benchmark --read --write 2> /dev/null)"
      access=(--token "$token" --tls-ca "$work/tls/ca.pem")
    fi
    before="$(kiln_cpu)"
    ingest="$("$bin/kiln-bench" ingest --url "$http" --scale "${SCALE:-1000}" \
      --duration "${DURATION:-6h}" "${access[@]}" 2> /dev/null)"
    server_cpu="$(awk -v a="$before" -v b="$(kiln_cpu)" 'BEGIN { printf "%.2f", b - a }')"
    # Let persistence of the ingested buffer finish before timing queries.
    sleep "${SETTLE:-10}"
    latency="$("$bin/kiln-bench" latency --url "$http" --runs "${LATENCY_RUNS:-300}" \
      "${access[@]}")"
    trivial="$("$bin/kiln-bench" latency --url "$http" --runs "${LATENCY_RUNS:-300}" \
      --query "SELECT 1" "${access[@]}" | sed 's/query_p50_ms/select1_p50_ms/; s/url=[^ ]* //; s/ connect_p50_ms=.*//')"
    echo "run=$run mode=$mode $ingest server_cpu_s=$server_cpu $latency $trivial"
    stop_kiln
  done
done
