#!/usr/bin/env bash
# The sidechannel benchmark: full-clone throughput as gitlab-shell and workhorse fetch
# (backchannel + sidechannel: SSHUploadPackWithSidechannel, PostUploadPackWithSidechannel)
# and over plain PostUploadPack, through refvote-router and straight to a node, in one
# run. Release build; prints markdown. ROUNDS, LARGE_MIB and ETCD_MEMBERS change the
# run (see tests/src/bin/sidechannel-bench.rs). Needs ~1 GiB of free disk under the
# temp dir, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
export REFVOTE_NODE_LOG="${REFVOTE_NODE_LOG:-info}"
export REFVOTE_ROUTER_LOG="${REFVOTE_ROUTER_LOG:-info}"
# The binary the workspace build made, beside the votingd and refvote-router it starts.
exec "${CARGO_TARGET_DIR:-target}/release/sidechannel-bench"
