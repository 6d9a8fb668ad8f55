#!/usr/bin/env bash
# Issue 13's engine comparison: a pooled `git cat-file --batch-command` process against
# gitoxide in process, for the read benchmark's object lookups, on the read fixture
# (tests/fixtures/read-repo.sh) plus the benchmark's 4 KiB blob. Builds the standalone
# crate bench/gix-compare (release; not part of the workspace) and prints markdown.
# ITERATIONS (2000) changes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --manifest-path bench/gix-compare/Cargo.toml --target-dir "$target_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bash tests/fixtures/read-repo.sh "$work/fixture" >/dev/null
(
    cd "$work/fixture"
    git checkout --quiet main
    head -c 4096 /dev/urandom | base64 -w 76 | head -c 4096 > blob-4k.txt
    git add blob-4k.txt
    GIT_CONFIG_NOSYSTEM=1 git -c user.name=bench -c user.email=bench@refvote.invalid \
        commit --quiet -m "a 4 KiB blob"
)
git clone --quiet --bare "$work/fixture" "$work/bare.git"
git -C "$work/bare.git" repack -adq
"$target_dir/release/gix-compare" "$work/bare.git" main blob-4k.txt "${ITERATIONS:-2000}"
