#!/usr/bin/env bash
# Checks refvote's packages (builds them first with scripts/package.sh unless
# --no-build): every .deb and .rpm holds every file it must; the .deb packages install
# on this machine (dpkg -i as root; otherwise unpacked into a temporary root without
# the post-install step); the installed binaries run and the example configs pass
# --check-config while a bad one fails naming the key; the installed votingd runs
# against a throwaway etcd with the packaged hook; the post-install step created
# the git user and refvote's directories and started nothing; the systemd units (the
# partition-sync timers too) pass
# `systemd-analyze verify` where it exists; `rpm -qlp` lists each .rpm (Debian's rpm
# package is installed if missing). What it installed is purged at the end unless
# KEEP_INSTALLED=1 (the git user it may have created stays).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--no-build" ] || bash scripts/package.sh
out=target/packages
fail() { echo "check-packages: FAIL: $*" >&2; exit 1; }
ok() { echo "check-packages: ok: $*"; }
root=false
[ "$(id -u)" -eq 0 ] && root=true

node_files=(
  /usr/bin/votingd
  /usr/bin/votingctl
  /usr/lib/refvote/reference-transaction
  /usr/sbin/refvote-hooks
  /usr/lib/systemd/system/votingd.service
  /usr/share/refvote/votingd.toml.example
  /usr/share/refvote/README.md
  /usr/lib/systemd/system/refvote-partition-sync-produce.service
  /usr/lib/systemd/system/refvote-partition-sync-produce.timer
  /usr/lib/systemd/system/refvote-partition-sync-consume.service
  /usr/lib/systemd/system/refvote-partition-sync-consume.timer
  /usr/share/refvote/partition-sync.toml.example
)
router_files=(
  /usr/bin/refvote-router
  /usr/lib/systemd/system/refvote-router.service
  /usr/share/refvote/refvote-router.toml.example
  /usr/share/refvote/nginx-refvote.conf.example
)

# $1: package name, $2: listing (one path a line), rest: the files it must hold.
expect_files() {
  local name="$1" listing="$2"
  shift 2
  for f in "$@"; do
    grep -qx -- "$f" <<<"$listing" || fail "$name lacks $f; it has:
$listing"
  done
  ok "$name holds its $# files"
}

one() {
  local matches=( $out/$1 )
  [ ${#matches[@]} -eq 1 ] && [ -f "${matches[0]}" ] || fail "expected one $1 in $out, found: ${matches[*]}"
  echo "${matches[0]}"
}
node_deb=$(one 'refvote-node_*.deb')
router_deb=$(one 'refvote-router_*.deb')
node_rpm=$(one 'refvote-node-*.rpm')
router_rpm=$(one 'refvote-router-*.rpm')

# --- the .deb packages: contents, then install ---
deb_list() { dpkg-deb -c "$1" | awk '{print $6}' | sed 's|^\./|/|; s|/$||'; }
expect_files refvote-node.deb "$(deb_list "$node_deb")" "${node_files[@]}"
expect_files refvote-router.deb "$(deb_list "$router_deb")" "${router_files[@]}"
dpkg-deb -I "$node_deb" postinst >/dev/null || fail "refvote-node.deb has no postinst"
dpkg-deb -I "$router_deb" postinst >/dev/null || fail "refvote-router.deb has no postinst"

if $root; then
  prefix=""
  DEBIAN_FRONTEND=noninteractive dpkg -i "$node_deb" "$router_deb" >/dev/null \
    || fail "dpkg -i failed"
  ok "dpkg -i installed both packages"
  cleanup() {
    [ "${KEEP_INSTALLED:-0}" = 1 ] || dpkg --purge refvote-node refvote-router >/dev/null 2>&1 || true
  }
  trap cleanup EXIT
  getent passwd git >/dev/null || fail "the post-install step did not create the git user"
  getent group git >/dev/null || fail "the post-install step did not create the git group"
  [ -d /etc/refvote ] || fail "/etc/refvote is missing"
  [ "$(stat -c %U /var/lib/refvote)" = git ] || fail "/var/lib/refvote is not owned by git"
  ok "post-install: git user and group, /etc/refvote, /var/lib/refvote"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    for unit in votingd refvote-router refvote-partition-sync-produce.timer refvote-partition-sync-consume.timer; do
      if systemctl is-enabled --quiet "$unit" || systemctl is-active --quiet "$unit"; then
        fail "$unit is enabled or running right after install"
      fi
    done
    ok "nothing enabled or started"
  fi
else
  prefix=$(mktemp -d)
  trap 'rm -rf "$prefix"' EXIT
  dpkg -x "$node_deb" "$prefix"
  dpkg -x "$router_deb" "$prefix"
  ok "not root: unpacked both .deb into $prefix (post-install not run)"
fi

# --- the binaries run, the examples are valid, a bad config names the key ---
"$prefix/usr/bin/votingd" --version | grep -q '^votingd ' || fail "votingd --version"
"$prefix/usr/bin/votingctl" --help >/dev/null || fail "votingctl --help"
"$prefix/usr/bin/votingctl" partition-sync check --config "$prefix/usr/share/refvote/partition-sync.toml.example" >/dev/null \
  || fail "votingctl partition-sync rejects its example config"
"$prefix/usr/bin/refvote-router" --version | grep -q '^refvote-router ' || fail "refvote-router --version"
printf '' | "$prefix/usr/lib/refvote/reference-transaction" committed \
  || fail "the hook refuses an update outside refvote"
bash "$prefix/usr/sbin/refvote-hooks" --help | grep -q core.hooksPath || fail "refvote-hooks --help"
"$prefix/usr/bin/votingd" --check-config --config "$prefix/usr/share/refvote/votingd.toml.example" >/dev/null \
  || fail "votingd rejects its example config"
"$prefix/usr/bin/refvote-router" --check-config --config "$prefix/usr/share/refvote/refvote-router.toml.example" >/dev/null \
  || fail "refvote-router rejects its example config"
bad=$(mktemp)
printf 'node_name = "n1"\n[vote]\nvote_timeout_ms = "soon"\n' >"$bad"
set +e
msg=$("$prefix/usr/bin/votingd" --check-config --config "$bad" 2>&1); code=$?
set -e
[ "$code" -eq 64 ] && grep -q vote_timeout_ms <<<"$msg" || fail "votingd on a bad config: exit $code, $msg"
printf 'replication_factor = 0\n' >"$bad"
set +e
msg=$("$prefix/usr/bin/refvote-router" --check-config --config "$bad" 2>&1); code=$?
set -e
[ "$code" -eq 64 ] && grep -q replication_factor <<<"$msg" || fail "refvote-router on a bad config: exit $code, $msg"
sed 's/^part_size_mib = 16$/part_size_mib = 1/' "$prefix/usr/share/refvote/partition-sync.toml.example" >"$bad"
set +e
msg=$("$prefix/usr/bin/votingctl" partition-sync check --config "$bad" 2>&1); code=$?
set -e
rm -f "$bad"
[ "$code" -eq 64 ] && grep -q store.part_size_mib <<<"$msg" || fail "partition-sync on a bad config: exit $code, $msg"
ok "binaries run; example configs valid; bad configs exit 64 naming the key"

# --- the installed votingd runs: against a throwaway etcd on loopback, it links the
# packaged hook into its hooks dir, takes its lease and serves /metrics ---
if $root && command -v etcd >/dev/null; then
  smoke=$(mktemp -d)
  # A loopback port nothing listens on (bash alone: a fresh machine may lack python).
  port() {
    local p
    for _ in $(seq 1 100); do
      p=$((20000 + RANDOM % 40000))
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
    fail "no free loopback port"
  }
  cport=$(port); pport=$(port); gport=$(port); mport=$(port)
  etcd --name smoke --data-dir "$smoke/etcd" \
    --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "smoke=http://127.0.0.1:$pport" >"$smoke/etcd.log" 2>&1 &
  etcd_pid=$!
  mkdir -p "$smoke/storage"
  cat >"$smoke/votingd.toml" <<TOML
node_name = "smoke"
listen_addr = "127.0.0.1:$gport"
prometheus_listen_addr = "127.0.0.1:$mport"
[etcd]
endpoints = ["http://127.0.0.1:$cport"]
lease_ttl_secs = 3
[vote]
socket_path = "$smoke/vote.sock"
hooks_dir = "$smoke/hooks"
[[storage]]
name = "default"
path = "$smoke/storage"
TOML
  /usr/bin/votingd --config "$smoke/votingd.toml" >"$smoke/votingd.log" 2>&1 &
  votingd_pid=$!
  healthy=false
  for _ in $(seq 1 100); do
    if /usr/bin/votingctl status --config "$smoke/votingd.toml" >/dev/null 2>&1; then healthy=true; break; fi
    sleep 0.2
  done
  metrics=$(exec 3<>"/dev/tcp/127.0.0.1/$mport" \
    && printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3 \
    && tr -d '\r' <&3 || true)
  hook=$(readlink -f "$smoke/hooks/reference-transaction" || true)
  kill "$votingd_pid" 2>/dev/null || true; wait "$votingd_pid" 2>/dev/null || true
  kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true
  $healthy || fail "the installed votingd did not become healthy: $(tail -5 "$smoke/votingd.log")"
  [ "$hook" = /usr/lib/refvote/reference-transaction ] || fail "hooks dir links $hook, not the packaged hook"
  grep -q '^votingd_lease_held 1$' <<<"$metrics" || fail "no votingd_lease_held 1 on /metrics: $metrics"
  rm -rf "$smoke"
  ok "installed votingd: healthy against etcd, packaged hook linked, /metrics served"
else
  echo "check-packages: skipped running the installed votingd (needs root and etcd)"
fi

# --- the units ---
if command -v systemd-analyze >/dev/null; then
  if $root; then
    # It only warns about unknown keys (exit 0); any word from it fails the check.
    verify=$(systemd-analyze verify /usr/lib/systemd/system/votingd.service \
      /usr/lib/systemd/system/refvote-router.service \
      /usr/lib/systemd/system/refvote-partition-sync-{produce,consume}.{service,timer} 2>&1) \
      || fail "systemd-analyze verify: $verify"
    [ -z "$verify" ] || fail "systemd-analyze verify warns: $verify"
    ok "systemd-analyze verify: all six units, no warnings"
  else
    echo "check-packages: skipped systemd-analyze verify: the units name /usr/bin binaries, installed only as root"
  fi
else
  echo "check-packages: skipped systemd-analyze verify: not installed"
fi

# --- the .rpm packages ---
if ! command -v rpm >/dev/null; then
  if $root; then
    echo "check-packages: installing Debian's rpm package to read the .rpm files"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null
  else
    fail "rpm is missing; install it (apt-get install rpm) to inspect the .rpm packages"
  fi
fi
expect_files refvote-node.rpm "$(rpm -qlp "$node_rpm" 2>/dev/null)" "${node_files[@]}"
expect_files refvote-router.rpm "$(rpm -qlp "$router_rpm" 2>/dev/null)" "${router_files[@]}"
for p in "$node_rpm" "$router_rpm"; do
  rpm -qp --scripts "$p" 2>/dev/null | grep -q 'useradd --system' || fail "$p has no post-install step"
done
rpm -qpR "$node_rpm" 2>/dev/null | grep -q '^git' || fail "refvote-node.rpm does not require git"
ok "rpm -qlp: both .rpm hold their files and post-install step"
echo "check-packages: all checks passed"
