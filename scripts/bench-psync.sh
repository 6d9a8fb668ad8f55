#!/usr/bin/env bash
# Partition sync's throughput benchmark (psync/benches/throughput): produce and
# consume of one generated repository against `git bundle create` plus a plain upload
# (and download + verify + fetch + push) of the same bytes, measured in the same run,
# then an incremental round against the full one; medians and ranges, printed as
# Markdown for BENCHMARKS.md. PSYNC_BENCH_MIB (default 1024), PSYNC_BENCH_RUNS
# (default 3) and PSYNC_BENCH_DIR (default /tmp/refvote-psync-bench, where the
# generated repository is kept between runs) change the run. Needs SeaweedFS (installed
# by scripts/setup.sh) and about 4x PSYNC_BENCH_MIB of free disk; remove
# PSYNC_BENCH_DIR afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo bench -p refvote-psync --bench throughput
