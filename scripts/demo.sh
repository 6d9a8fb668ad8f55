#!/usr/bin/env bash
# The demo: a voted push across three replicas on one machine (real etcd, three real
# votingd nodes, real git), then a replica that drifted losing the vote and being
# marked outdated, and `votingctl status`. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins
exec cargo run --quiet -p refvote-tests --bin demo -- "$@"
