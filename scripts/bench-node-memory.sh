#!/usr/bin/env bash
# The node memory benchmark: votingd's peak RSS (VmHWM) while a 1 GiB push and a
# 1 GiB clone stream through it over SSHReceivePack/SSHUploadPack, against its idle
# RSS. Release build; prints markdown; exits non-zero if the peak is 100 MB or more.
# SIZE_MIB=N changes the pushed data's size (default 1024). Needs ~4 GiB of free disk
# under the temp dir, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
exec cargo run --quiet --release -p refvote-tests --bin node-memory-bench
