#!/usr/bin/env bash
# The voting-core benchmark: vote round trip p50/p99 against its floor, and
# transactions per second at 1, 8 and 64 in flight. Release build; prints markdown.
# SAMPLES=N changes the sample count (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
exec cargo run --quiet --release -p refvote-tests --bin vote-bench
