#!/usr/bin/env bash
# Under a root supervisor each plugin runs as its own unprivileged uid, so
# the checkout (plugin executables, the Python virtualenv, built binaries)
# must be reachable by other users. Makes every directory above the checkout
# traversable (o+x: pass through, not list) where it is not, saying so.
set -euo pipefail
dir="$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd -P)"
while :; do
  if [ -z "$(find "$dir" -maxdepth 0 -perm -o+x 2>/dev/null)" ]; then
    echo "== $dir is not traversable by other users; plugins run as their own users: chmod o+x $dir" >&2
    chmod o+x "$dir"
  fi
  [ "$dir" = / ] && break
  dir="$(dirname "$dir")"
done
