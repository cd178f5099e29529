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
