#!/usr/bin/env bash
# The router benchmark: accessor latency and throughput, small-push latency and
# large-fetch throughput, each through the router and straight to a node in the same
# run. Release build; prints markdown. ROUNDS, SECONDS, PUSHES, LARGE_MIB and
# ETCD_MEMBERS change the run (see tests/src/bin/router-bench.rs). Needs ~1 GiB of free
# disk under the temp dir, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
export REFVOTE_NODE_LOG="${REFVOTE_NODE_LOG:-info}"
# Run the binary the workspace build made (a `cargo run -p` would resolve features
# differently and rebuild votingd).
exec target/release/router-bench
