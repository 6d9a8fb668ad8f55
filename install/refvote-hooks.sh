#!/usr/bin/env bash
# Points every repository in the given storages at refvote's hook, or undoes it.
#
#   refvote-hooks.sh [--hooks-dir DIR] [--undo] [--dry-run] STORAGE_DIR...
#
# Sets `core.hooksPath = DIR` (default /var/lib/refvote/hooks, votingd's `hooks_dir`)
# in every git repository found under each STORAGE_DIR. Idempotent: repositories that
# already point there are left alone. `--undo` removes core.hooksPath where it points
# at DIR (and only there). Run it as the git user, after votingd has started once (it
# links the hook into DIR). New repositories created through votingd get it already.
set -euo pipefail

hooks_dir=/var/lib/refvote/hooks
undo=false
dry_run=false
storages=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hooks-dir) hooks_dir="${2:?--hooks-dir needs a directory}"; shift 2 ;;
    --hooks-dir=*) hooks_dir="${1#*=}"; shift ;;
    --undo) undo=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "refvote-hooks: unknown option $1 (see --help)" >&2; exit 64 ;;
    *) storages+=("$1"); shift ;;
  esac
done
if [ ${#storages[@]} -eq 0 ]; then
  echo "refvote-hooks: name at least one storage directory (see --help)" >&2
  exit 64
fi
case "$hooks_dir" in
  /*) ;;
  *) echo "refvote-hooks: --hooks-dir must be an absolute path, not $hooks_dir" >&2; exit 64 ;;
esac
if ! $undo && [ ! -x "$hooks_dir/reference-transaction" ]; then
  echo "refvote-hooks: warning: $hooks_dir/reference-transaction is missing; start votingd once so it installs the hook" >&2
fi

found=0 changed=0 unchanged=0 failed=0
for storage in "${storages[@]}"; do
  if [ ! -d "$storage" ]; then
    echo "refvote-hooks: $storage is not a directory" >&2
    exit 66
  fi
  # A repository is a directory with HEAD, objects/ and refs/; do not descend into one.
  while IFS= read -r -d '' head; do
    repo="${head%/HEAD}"
    [ -d "$repo/objects" ] && [ -d "$repo/refs" ] || continue
    found=$((found + 1))
    current="$(git config --file "$repo/config" --get core.hooksPath 2>/dev/null || true)"
    if $undo; then
      if [ "$current" = "$hooks_dir" ]; then
        $dry_run || git config --file "$repo/config" --unset core.hooksPath || { failed=$((failed + 1)); continue; }
        changed=$((changed + 1))
      else
        unchanged=$((unchanged + 1))
      fi
    elif [ "$current" = "$hooks_dir" ]; then
      unchanged=$((unchanged + 1))
    else
      if [ -n "$current" ]; then
        echo "refvote-hooks: $repo had core.hooksPath=$current; replacing it" >&2
      fi
      $dry_run || git config --file "$repo/config" core.hooksPath "$hooks_dir" || { failed=$((failed + 1)); continue; }
      changed=$((changed + 1))
    fi
  done < <(find "$storage" -maxdepth 8 -name HEAD -type f -not -path '*/objects/*' -not -path '*/refs/*' -print0)
done

verb=$($undo && echo "unset" || echo "set")
$dry_run && verb="would be $verb"
echo "refvote-hooks: $found repositories: $changed $verb, $unchanged already as wanted, $failed failed"
[ "$failed" -eq 0 ]
