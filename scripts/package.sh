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
cargo build --release --locked -p refvote-hook -p votingd -p votingctl -p refvote-router --bins

# Both tools take the binaries from target/package-stage/ (the crates' metadata says
# so): the release builds without debug info, symbols kept for backtraces. The node
# package holds binaries of three crates, which neither tool would build by itself.
release="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
stage=target/package-stage
out=target/packages
rm -rf "$stage" "$out"
mkdir -p "$stage" "$out"
for bin in votingd votingctl reference-transaction refvote-router; do
  strip --strip-debug -o "$stage/$bin" "$release/$bin"
done
for crate in votingd router; do
  cargo deb --no-build --no-strip --quiet --manifest-path "$crate/Cargo.toml" -o "$out/"
  cargo generate-rpm -p "$crate" -o "$out/"
done
echo "package: built"
ls -l "$out"
