#!/usr/bin/env bash
# Builds plugvisor and the example plugins, prepares the Python example's
# virtualenv, and runs the daemon on examples/plugins in the foreground.
# In another shell: `target/release/plugvisor ps`, `... call echo upper --data hi`.
# Extra arguments are passed to `plugvisor run`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# Plugins run as their own unprivileged users when the daemon is root.
if [ "$(id -u)" -eq 0 ]; then scripts/reachable.sh "$repo"; fi
cargo build --release -p plugvisor-cli -p plugvisor-example-echo -p plugvisor-example-kv
scripts/setup-python.sh
exec target/release/plugvisor run --plugins-dir examples/plugins "$@"
