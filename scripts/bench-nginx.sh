#!/usr/bin/env bash
# The load-balancer benchmark: real git clones of a large repository and small pushes,
# straight to one router and through nginx (the shipped install/nginx/refvote.conf) in
# front of two routers, in the same run; then CLONES concurrent clones against a router
# with a clone limit of 8 (served, 429s, time to 429, peak queue, RSS). Release build;
# prints markdown. ROUNDS, LARGE_MIB, PUSHES, CLONES, LIMIT_WAIT_MS and ETCD_MEMBERS
# change the run (see tests/src/bin/nginx-bench.rs). Needs nginx (setup.sh installs
# it) and ~1 GiB of free disk under the temp dir, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
# Requests are not logged one by one at debug level while being timed.
export REFVOTE_NODE_LOG="${REFVOTE_NODE_LOG:-info}"
export REFVOTE_ROUTER_LOG="${REFVOTE_ROUTER_LOG:-info}"
# Run the binary the workspace build made (a `cargo run -p` would resolve features
# differently and rebuild votingd), from CARGO_TARGET_DIR when one is set.
exec "${CARGO_TARGET_DIR:-target}/release/nginx-bench"
