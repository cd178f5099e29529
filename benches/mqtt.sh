#!/usr/bin/env bash
# MQTT to queryable vs the broker alone and HTTP line protocol (kiln-bench mqtt), through
# Debian's Mosquitto (installed if missing) on a free loopback port. Mosquitto runs with
# its defaults (max_inflight_messages 20 for MQTT 3.1.1 sessions) except that it queues
# without limit, so a whole workload can wait for a session.
#   SCALE=1000 DURATION=6h RUNS=3 ROWS_PER_MESSAGE=100 benches/mqtt.sh [kiln-bench mqtt flags]
# e.g. --kiln-arg=--mqtt-protocol=5 (receive maximum 1000) or --formats=sparkplug.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
. benches/common.sh
bash tests/tools/debian-packages.sh mosquitto
cargo build --release --locked -p kiln-server -p kiln-bench
port="${MQTT_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
work="$(mktemp -d)"
cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_queued_bytes 0
CONF
/usr/sbin/mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null || true; rm -rf "$work"' EXIT
wait_port "$port"
bin="${CARGO_TARGET_DIR:-$root/target}/release"
"$bin/kiln-bench" mqtt --kiln "$bin/kiln" --broker-port "$port" \
  --scale "${SCALE:-1000}" --duration "${DURATION:-6h}" --runs "${RUNS:-3}" \
  --rows-per-message "${ROWS_PER_MESSAGE:-100}" "$@"
