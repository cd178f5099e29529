#!/usr/bin/env bash
# Alert rules under ingest load (see benches/RESULTS.md, "Alerting"): TSBS cpu-only over
# HTTP with no rules, with RULES rules over SCALE series every EVERY (default settings), and
# with the rules over a cache keyed by hostname created by hand; the delay from a crossing
# row to its webhook.
#   usage: benches/alerts.sh
#   env:   RUNS=3 SCALE=10000 DURATION=2h REPEAT=6 RULES=1000 EVERY=10s
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p kiln-server -p kiln-bench >&2
python3 benches/alerts.py "$TARGET/release/kiln" "$TARGET/release/kiln-bench"
