#!/usr/bin/env bash
# The GitLab hooks benchmark: small-push latency through refvote-router with GitLab's
# hooks on (nodes calling a local internal-API stand-in: /allowed, /pre_receive,
# /post_receive) against the same push with no GitLab side, and gated with no API, in
# one run. Release build; prints markdown. ROUNDS, PUSHES and ETCD_MEMBERS change the
# run (see tests/src/bin/gitlab-hooks-bench.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
export REFVOTE_NODE_LOG="${REFVOTE_NODE_LOG:-info}"
export REFVOTE_ROUTER_LOG="${REFVOTE_ROUTER_LOG:-info}"
# The binary the workspace build made, beside the votingd and refvote-router it starts.
exec "${CARGO_TARGET_DIR:-target}/release/gitlab-hooks-bench"
