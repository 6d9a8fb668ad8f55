#!/usr/bin/env bash
# The long fault soak: a real cluster (3-member etcd, 3 or 5 nodes, 2 routers) under
# random faults from a seed, with a checker at the end. Usage:
5]|5]
# Prints the report RELIABILITY.md is written from; exits non-zero on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
REFVOTE_BIN_DIR="$PWD/target/release" exec target/release/fault-soak "$@"
