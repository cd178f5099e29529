#!/usr/bin/env bash
# Builds deploy/Dockerfile with buildah and runs Kiln inside the image.
#
# No registry is reachable from CI, so the images the Dockerfile starts from are made
# here: the runtime base from Debian's packages (what distroless `cc` holds: glibc,
# libgcc, time zones, the `nonroot` user 65532) and the binary from the `kiln` CI built.
# The Dockerfile's runtime stage, the one users get, is built as written.
#
# Then, inside the image, as its own user: Kiln starts with an admin token from a mounted
# file, takes writes and queries on loopback, answers `kiln probe`, writes nothing outside
# /var/lib/kiln, cannot create a data directory elsewhere, and on SIGTERM persists its
# buffer and exits 0; a second start finds every row in Parquet.
#
# usage: tests/container/run.sh path/to/kiln
set -euo pipefail
cd "$(dirname "$0")/../.."
KILN_BIN=$(realpath "${1:?usage: $0 path/to/kiln}")

if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
    echo "== installing buildah and mmdebstrap (Debian)"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq buildah mmdebstrap >/dev/null
fi

WORK=$(mktemp -d /tmp/kiln-image.XXXXXX)
B() { buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs "$@"; }
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill -9 "$SERVER_PID" 2>/dev/null || true
    pkill -9 -f "kiln serve --http-bind 0.0.0.0:$HTTP_PORT" 2>/dev/null || true
    B rm --all >/dev/null 2>&1 || true
    # vfs layers are plain directories: remove them (some are read-only) with the rest.
    chmod -R u+w "$WORK" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v curl >/dev/null || fail "curl is missing (tests/interop/run.sh installs it)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(free_port); GRPC_PORT=$(free_port); PG_PORT=$(free_port)

echo "== runtime base from Debian's packages"
mmdebstrap --quiet --variant=extract \
    --include=base-files,netbase,tzdata,libc6,libgcc-s1 \
    --customize-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" > "$1/etc/passwd"' \
    --customize-hook='printf "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n" > "$1/etc/group"' \
    --customize-hook='install -d -m 1777 "$1/tmp"; install -d -m 0700 -o 65532 -g 65532 "$1/home/nonroot"' \
    --customize-hook='install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"' \
    bookworm "$WORK/rootfs.tar"
ctr=$(B from scratch)
B add "$ctr" "$WORK/rootfs.tar" / >/dev/null
B commit --quiet "$ctr" localhost/kiln-runtime-base >/dev/null
B rm "$ctr" >/dev/null

echo "== the binary CI built, as BINARY_FROM"
mkdir -p "$WORK/binary/usr/local/bin" "$WORK/binary/var/lib/kiln"
cp "$KILN_BIN" "$WORK/binary/usr/local/bin/kiln"
chmod 0755 "$WORK/binary/usr/local/bin/kiln"
chmod 0750 "$WORK/binary/var/lib/kiln"
ctr=$(B from scratch)
B copy "$ctr" "$WORK/binary" / >/dev/null
B commit --quiet "$ctr" localhost/kiln-binary >/dev/null
B rm "$ctr" >/dev/null

echo "== buildah bud -f deploy/Dockerfile"
B bud --quiet --isolation chroot --format docker \
    --build-arg RUNTIME_IMAGE=localhost/kiln-runtime-base \
    --build-arg BINARY_FROM=localhost/kiln-binary \
    -t localhost/kiln:ci -f deploy/Dockerfile . >/dev/null

echo "== the image's configuration"
B inspect --type image localhost/kiln:ci > "$WORK/inspect.json"
python3 - "$WORK/inspect.json" <<'PY'
import json, sys
image = json.load(open(sys.argv[1]))
config = image["Docker"]["config"]
checks = {
    "User": (config.get("User"), "65532:65532"),
    "ExposedPorts": (sorted(config.get("ExposedPorts") or {}), ["50051/tcp", "5433/tcp", "8080/tcp"]),
    "Volumes": (sorted(config.get("Volumes") or {}), ["/var/lib/kiln"]),
    "StopSignal": (config.get("StopSignal"), "SIGTERM"),
    "Entrypoint": (config.get("Entrypoint"), ["/usr/local/bin/kiln"]),
    "Healthcheck": ((config.get("Healthcheck") or {}).get("Test"), ["CMD", "/usr/local/bin/kiln", "probe"]),
    "licenses label": ((config.get("Labels") or {}).get("org.opencontainers.image.licenses"), "Apache-2.0"),
}
env = dict(e.split("=", 1) for e in config.get("Env") or [])
checks["KILN_HTTP_BIND"] = (env.get("KILN_HTTP_BIND"), "0.0.0.0:8080")
checks["KILN_DATA_DIR"] = (env.get("KILN_DATA_DIR"), "/var/lib/kiln")
bad = [f"{k}: {got!r}, expected {want!r}" for k, (got, want) in checks.items() if got != want]
if bad:
    sys.exit("image configuration:\n  " + "\n  ".join(bad))
print("user, ports, volume, stop signal, health check, labels, variables: as documented")
PY

ctr=$(B from --quiet localhost/kiln:ci)
mkdir -p "$WORK/secrets"
head -c 24 /dev/urandom | base64 | tr -d '/+=' | sed 's/^/kiln_/' > "$WORK/secrets/admin-token"
TOKEN=$(cat "$WORK/secrets/admin-token")
chmod 0644 "$WORK/secrets/admin-token"
# The volume, as `docker run -v` gives it: a directory of the host, owned by the user.
# buildah 1.28 lays its own copy of an image's VOLUME over a bind mount at the same
# path now and then, so the test mounts it at /data (the image's /var/lib/kiln is
# checked for its owner below).
install -d -o 65532 -g 65532 "$WORK/data"
RUN=(B run --isolation chroot --user 65532:65532
     -v "$WORK/data:/data" -v "$WORK/secrets:/etc/kiln/secrets:ro"
     --env KILN_DATA_DIR=/data
     --env KILN_ADMIN_TOKEN_FILE=/etc/kiln/secrets/admin-token
     --env KILN_HTTP_BIND="0.0.0.0:$HTTP_PORT"
     --env KILN_GRPC_BIND="0.0.0.0:$GRPC_PORT"
     --env KILN_PG_BIND="0.0.0.0:$PG_PORT")

echo "== without a token, beyond loopback, it refuses to start"
if B run --isolation chroot "$ctr" -- /usr/local/bin/kiln serve --http-bind "0.0.0.0:$HTTP_PORT" \
        --grpc-bind "0.0.0.0:$GRPC_PORT" --pg-bind "0.0.0.0:$PG_PORT" >"$WORK/noauth.log" 2>&1; then
    fail "served beyond loopback without a token"
fi
grep -q "admin token" "$WORK/noauth.log" || fail "no word of the admin token: $(cat "$WORK/noauth.log")"

echo "== it cannot make a data directory outside its volume"
if B run --isolation chroot "$ctr" -- /usr/local/bin/kiln serve --data-dir /opt/kiln-data \
        --http-bind 127.0.0.1:0 --grpc-bind 127.0.0.1:0 --pg-bind 127.0.0.1:0 >"$WORK/elsewhere.log" 2>&1; then
    fail "started with a data directory outside /var/lib/kiln"
fi
grep -q "Permission denied" "$WORK/elsewhere.log" || fail "$(cat "$WORK/elsewhere.log")"

touch "$WORK/before"
sleep 1
start_server() {
    # `serve` spelled out with the bind flag: the cleanup finds the process by it.
    "${RUN[@]}" "$ctr" -- /usr/local/bin/kiln serve --http-bind "0.0.0.0:$HTTP_PORT" \
        >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if curl -fsS "http://127.0.0.1:$HTTP_PORT/ready" >/dev/null 2>&1; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || fail "kiln exited: $(cat "$WORK/server.log")"
        sleep 0.2
    done
    fail "kiln not ready: $(cat "$WORK/server.log")"
}
kiln_pid() { pgrep -f "^/usr/local/bin/kiln serve --http-bind 0.0.0.0:$HTTP_PORT" | head -n1; }

echo "== serve as 65532 with the token from a mounted file"
start_server
[ "$(stat -c %u /proc/"$(kiln_pid)")" = 65532 ] || fail "kiln does not run as 65532"
AUTH=(-H "Authorization: Bearer $TOKEN")
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$HTTP_PORT/api/v3/write_lp?db=plant" --data-binary 'm v=1 1')
[ "$code" = 401 ] || fail "a write without a token got $code"
for i in $(seq 1 50); do echo "press,line=l$((i % 3)) temp=$i.5 $((1700000000000000000 + i * 1000000000))"; done |
    curl -fsS "${AUTH[@]}" -X POST "http://127.0.0.1:$HTTP_PORT/api/v3/write_lp?db=plant" --data-binary @- ||
    fail "write"
count() {
    curl -fsS "${AUTH[@]}" "http://127.0.0.1:$HTTP_PORT/api/v3/query_sql" \
        --data-urlencode db=plant --data-urlencode "q=SELECT count(*) AS n, sum(temp) AS s FROM press" \
        --data-urlencode format=jsonl -G
}
[ "$(count)" = '{"n":50,"s":1300.0}' ] || fail "query gave $(count)"
"${RUN[@]}" "$ctr" -- /usr/local/bin/kiln probe --ready >/dev/null || fail "kiln probe --ready"
"${RUN[@]}" "$ctr" -- /usr/local/bin/kiln probe >/dev/null || fail "kiln probe"

echo "== SIGTERM: buffer persisted, exit 0"
kill -TERM "$(kiln_pid)"
wait "$SERVER_PID" || fail "kiln exited with $? on SIGTERM: $(tail -n 20 "$WORK/server.log")"
SERVER_PID=
find "$WORK/data" -name '*.parquet' | grep -q . || fail "the buffer was not persisted to Parquet"
[ -z "$(find "$WORK/data" -not -user 65532)" ] || fail "files in the volume not owned by 65532"

echo "== nothing written outside the data volume"
ROOT=$(B mount "$ctr")
[ "$(stat -c %u "$ROOT/var/lib/kiln")" = 65532 ] || fail "/var/lib/kiln is not owned by 65532"
changed=$(find "$ROOT" -xdev -newer "$WORK/before" \
    -not -path "$ROOT/data" \
    -not -path "$ROOT/etc/kiln*" -not -path "$ROOT/dev*" -not -path "$ROOT/proc*" \
    -not -path "$ROOT/sys*" -not -path "$ROOT/etc/hosts" -not -path "$ROOT/etc/resolv.conf" \
    -not -path "$ROOT/etc/hostname" -not -path "$ROOT/run" -not -path "$ROOT/etc" \
    -not -path "$ROOT" -print)
[ -z "$changed" ] || fail "written outside the volume: $changed"
B umount "$ctr" >/dev/null

echo "== a second start reads every row back"
start_server
[ "$(count)" = '{"n":50,"s":1300.0}' ] || fail "after restart the query gave $(count)"
kill -TERM "$(kiln_pid)"
wait "$SERVER_PID" || fail "second SIGTERM: exit $?"
SERVER_PID=
echo "container: OK"
