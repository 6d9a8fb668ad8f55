#!/usr/bin/env bash
# Fuzzes refvote's parsers of untrusted bytes with cargo-fuzz (libFuzzer), each target
# for a bounded time: the hook's stdin parser, the hook<->votingd frame, the router's
# first-frame parsing and rewrite, and a push's command section as the node reads it
# (refvote-pktline). Usage: bash scripts/fuzz.sh [SECONDS] [TARGET...]
# (default 20 s per target, every target). A crash stops the run, prints the input and
# leaves it under fuzz/artifacts/<target>/; replay it with
#   cargo fuzz run -s none -O <target> fuzz/artifacts/<target>/<file>   (from fuzz/)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(hook_stdin hook_message router_frame pktline_section)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (once)"
  cargo install --locked --quiet cargo-fuzz
fi
cd fuzz
# `-s none`: coverage-guided without a sanitizer, so the stable toolchain builds it
# (the code under test forbids unsafe; panics are what we hunt).
cargo fuzz build -s none -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "fuzzing $t for ${seconds}s"
  cargo fuzz run -s none -O "$t" "corpus/$t" -- -max_total_time="$seconds" 2>&1 |
    grep -E '^(Done|#[0-9]+ +DONE)|panicked|SUMMARY|Test unit' || true
  # cargo fuzz exits non-zero on a crash; pipefail is off for grep's sake, so check
  # for a crash artifact instead.
  if compgen -G "artifacts/$t/*" >/dev/null; then
    echo "fuzz target $t crashed; input kept in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
