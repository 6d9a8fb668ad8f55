#!/usr/bin/env bash
# Builds refvote's packages into target/packages/: release binaries, then
# refvote-node (the hook, votingd, votingctl, unit, example config, hooks script) and
# refvote-router (the router, unit, example config), each as .deb (cargo-deb) and .rpm
# (cargo-generate-rpm). Installs those two cargo tools first if missing (from
# crates.io, a few minutes of compiling, once). The package metadata lives in
# votingd/Cargo.toml and router/Cargo.toml; the post-install step in packaging/.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in deb generate-rpm; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    echo "package: installing cargo-$tool (once; a few minutes)"
    cargo install --locked "cargo-$tool"
  fi
done

echo "package: building release binaries"
cargo build --release --locked -p refvote-hook -p votingd -p refvote-router --bins

out=target/packages
rm -rf "$out"
mkdir -p "$out"
for crate in votingd refvote-router; do
  # The binaries are built above (the node package takes the hook from another crate).
  cargo deb --no-build --quiet -p "$crate" -o "$out/"
  cargo generate-rpm -p "$crate" -o "$out/"
done
echo "package: built"
ls -l "$out"
