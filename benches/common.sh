# Helpers the benchmark scripts share; sourced, not run.

# The median of the numbers on stdin, one a line (the mean of the middle two for an even
# count).
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Waits (up to 10 s) until something listens on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 1 100); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# Where the scripts keep tools built from crates.io.
tools="${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}"

# Builds the tansu Kafka broker into $tools once.
need_tansu() {
  if [ ! -x "$tools/bin/tansu" ]; then
    echo "installing tansu 0.6.0 into $tools (once)"
    env -u CARGO_TARGET_DIR cargo install --quiet --locked --root "$tools" tansu@0.6.0 --features dynostore,libsql
  fi
}

# Builds the s3s-fs S3 server into $tools once.
need_s3s_fs() {
  if ! "$tools/bin/s3s-fs" --version 2>/dev/null | grep -q 0.14.1; then
    echo "installing s3s-fs 0.14.1 into $tools (once)"
    env -u CARGO_TARGET_DIR cargo install --quiet --locked --root "$tools" s3s-fs@0.14.1 --features binary
  fi
}

# A `kiln serve` on ephemeral ports with the data directory $1 and the flags after it, its
# output in $work; sets $pid and $http (the HTTP base URL). Needs $bin and $work.
start_kiln() {
  local data="$1"; shift
  "$bin/kiln" serve --data-dir "$data" --http-bind 127.0.0.1:0 --grpc-bind 127.0.0.1:0 \
    --pg-bind 127.0.0.1:0 "$@" > "$work/stdout" 2> "$work/server.log" &
  pid=$!
  for _ in $(seq 1 100); do
    [ "$(wc -l < "$work/stdout")" -ge 3 ] && break
    sleep 0.1
  done
  http="$(sed -n 's/^Kiln HTTP listening on //p' "$work/stdout")"
}
stop_kiln() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
# CPU seconds the server of start_kiln has used (user + system).
kiln_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$pid/stat"
}
