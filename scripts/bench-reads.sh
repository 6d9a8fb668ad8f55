#!/usr/bin/env bash
# The read benchmark: read RPCs straight to a node and through the router against the
# git command that answers the same question, in one run (see
# tests/src/bin/read-bench.rs; ROUNDS, SECONDS and CONCURRENCY change the run).
# Release build; prints markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
export REFVOTE_NODE_LOG="${REFVOTE_NODE_LOG:-info}"
export REFVOTE_ROUTER_LOG="${REFVOTE_ROUTER_LOG:-info}"
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/read-bench"
