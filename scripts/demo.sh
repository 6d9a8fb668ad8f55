#!/usr/bin/env bash
# The demo: a whole refvote cluster on this machine, used with plain git.
#
#   votingctl cluster up (etcd, three votingd storage nodes, a router) -> git push over
#   HTTP creates group/project.git on all three -> clone it back -> stop node2, push
#   again (two of three agree) -> stop node3 too, the push is refused with the reason
#   and reads go on -> node3 back, pushes work -> votingctl status -> node2 back ->
#   cluster down.
#
# Installs what is missing and builds first. Checks every step and exits non-zero if
# one misbehaves (CI runs it). REFVOTE_DEMO_DIR=DIR keeps the cluster's files there
# (default: a temp dir, removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/setup.sh
cargo build --workspace --bins
votingctl="$root/target/debug/votingctl"

dir=${REFVOTE_DEMO_DIR:-$(mktemp -d /tmp/refvote-demo.XXXXXX)}
work=$(mktemp -d /tmp/refvote-demo-git.XXXXXX)
finish() {
  status=$?
  if [ "$status" -ne 0 ]; then
    echo
    echo "demo FAILED (exit $status); the members' logs are in $dir/logs"
    for log in "$dir"/logs/*.log; do
      [ -f "$log" ] || continue
      echo "--- last lines of $log"
      tail -n 8 "$log"
    done
  fi
  "$votingctl" cluster down --dir "$dir" >/dev/null 2>&1 || true
  rm -rf "$work"
  if [ "$status" -eq 0 ] && [ -z "${REFVOTE_DEMO_DIR:-}" ]; then rm -rf "$dir"; fi
}
trap finish EXIT

# Plain git, with nothing from the user's own configuration.
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0
export GIT_AUTHOR_NAME="refvote demo" GIT_AUTHOR_EMAIL=demo@refvote.invalid
export GIT_COMMITTER_NAME="refvote demo" GIT_COMMITTER_EMAIL=demo@refvote.invalid

now_ms() { local t=${EPOCHREALTIME//[.,]/}; echo $((t / 1000)); }
start=$(now_ms)
elapsed() { local ms=$(($(now_ms) - start)); printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100)); }
n=0
step() {
  n=$((n + 1))
  printf '\n[%d] %s  (at %s)\n' "$n" "$*" "$(elapsed)"
}
fail() {
  echo "demo: step $n failed: $*" >&2
  exit 1
}
indent() { sed 's/^/    /'; }
# Every node's `main` of group/project.git, or "-" where it has none.
heads() {
  for node in $NODES; do
    var="$(echo "$node" | tr a-z A-Z)_STORAGE"
    printf '%s=%s ' "$node" "$(git -C "${!var}/group/project.git" rev-parse --short main 2>/dev/null || echo -)"
  done
}
# What etcd records about each replica of group/project.git.
replica_states() {
  ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" get --print-value-only \
    --prefix "/refvote/replicas/default/group%2Fproject.git/" |
    sed -E -e 's/.*"node":"([^"]*)","generation":([0-9]+),"state":"([^"]*)".*"reason":"([^"]*)".*/\1: generation \2, \3 (\4)/' \
      -e 's/ \(\)$//'
}
commit() {
  echo "$1" >>"$work/project/notes.txt"
  git -C "$work/project" add notes.txt
  git -C "$work/project" commit --quiet -m "$1"
  git -C "$work/project" rev-parse --short HEAD
}

step "votingctl cluster up: etcd, three storage nodes (votingd) and a router on loopback"
"$votingctl" cluster up --dir "$dir" 2>&1 | indent
# shellcheck disable=SC1091
. "$dir/cluster.env"
echo "    ROUTER_HTTP=$ROUTER_HTTP  ROUTER_ADDR=$ROUTER_ADDR  ETCD_ENDPOINTS=$ETCD_ENDPOINTS"
echo "    NODES=\"$NODES\"  (pid files and logs in $dir)"
[ "$NODES" = "node1 node2 node3" ] || fail "cluster.env says NODES=$NODES"

step "git push \$ROUTER_HTTP/group/project.git main: the first push creates it on three nodes"
git init --quiet -b main "$work/project"
first=$(commit "first commit")
git -C "$work/project" push "$ROUTER_HTTP/group/project.git" main 2>&1 | indent
echo "    replicas: $(heads)"
[ "$(heads)" = "node1=$first node2=$first node3=$first " ] || fail "every replica should have $first"

step "git clone it back through the router"
git clone --quiet "$ROUTER_HTTP/group/project.git" "$work/clone"
echo "    clone's main: $(git -C "$work/clone" rev-parse --short main), notes.txt: $(head -1 "$work/clone/notes.txt")"
[ "$(git -C "$work/clone" rev-parse --short main)" = "$first" ] || fail "the clone should be at $first"

step "votingctl cluster stop node2; push again: two of three replicas agree, so it commits"
"$votingctl" cluster stop --dir "$dir" node2 | indent
second=$(commit "second commit, node2 is down")
git -C "$work/project" push "$ROUTER_HTTP/group/project.git" main 2>&1 | indent
echo "    replicas: $(heads)"
[ "$(heads)" = "node1=$second node2=$first node3=$second " ] || fail "node1 and node3 should have $second"
echo "    etcd's replica records:"
states=$(replica_states)
indent <<<"$states" | indent
grep -Eq '^node2: .*(outdated|repairing)' <<<"$states" || fail "etcd should record node2 as behind"

step "votingctl cluster stop node3 as well: one of three cannot decide, the push is refused at once"
"$votingctl" cluster stop --dir "$dir" node3 | indent
commit "third commit, refused" >/dev/null
if git -C "$work/project" push "$ROUTER_HTTP/group/project.git" main >"$work/push.out" 2>&1; then
  indent <"$work/push.out"
  fail "a push with one of three replicas up must be refused"
fi
indent <"$work/push.out"
grep -q "1 of 3 up, 2 needed" "$work/push.out" || fail "git should show why the push was refused"
echo "    replicas: $(heads)"
[ "$(heads)" = "node1=$second node2=$first node3=$second " ] || fail "nothing may change"
git -C "$work/clone" pull --quiet --ff-only
echo "    reads go on from node1: the clone pulls main = $(git -C "$work/clone" rev-parse --short main)"
[ "$(git -C "$work/clone" rev-parse --short main)" = "$second" ] || fail "the pull should reach $second"

step "votingctl cluster start node3; the same push now commits"
"$votingctl" cluster start --dir "$dir" node3 | indent
git -C "$work/project" push "$ROUTER_HTTP/group/project.git" main 2>&1 | indent
third=$(git -C "$work/project" rev-parse --short main)
echo "    replicas: $(heads)"
[ "$(heads)" = "node1=$third node2=$first node3=$third " ] || fail "node1 and node3 should have $third"

step "votingctl status --config \$NODE1_CONFIG"
healthy=true
"$votingctl" status --config "$NODE1_CONFIG" >"$work/status" 2>&1 || healthy=false
indent <"$work/status"
$healthy || fail "node1 should be healthy"

step "votingctl cluster start node2: back with its data; it missed two pushes, so until it is repaired it serves no reads and casts no votes"
"$votingctl" cluster start --dir "$dir" node2 | indent
"$votingctl" status --config "$NODE2_CONFIG" >"$work/status" 2>&1 || true
head -n 1 "$work/status" | indent
echo "    replicas: $(heads)"
echo "    etcd's replica records:"
replica_states | indent | indent

step "votingctl cluster down"
pids=$(cat "$dir"/*.pid)
"$votingctl" cluster down --dir "$dir" | indent
for pid in $pids; do
  if [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
    fail "pid $pid still runs after cluster down"
  fi
done
echo "    no process left"

printf '\ndemo complete in %s: every step behaved as expected\n' "$(elapsed)"
[ $(($(now_ms) - start)) -lt 60000 ] || fail "the story took over a minute"
