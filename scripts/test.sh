#!/usr/bin/env bash
# Runs refvote's tests: unit tests, and the integration suites against real etcd, real
# votingd processes and real git. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The integration tests start the workspace's binaries; build them first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
