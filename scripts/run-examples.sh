#!/usr/bin/env bash
# Builds plugvisor and the example plugins (Rust, Go), prepares the Python
# example's virtualenv, and runs the daemon on examples/plugins in the
# foreground.
# In another shell: `target/release/plugvisor ps`, `... call echo upper --data hi`.
# Extra arguments are passed to `plugvisor run`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# Plugins run as their own unprivileged users when the daemon is root.
if [ "$(id -u)" -eq 0 ]; then scripts/reachable.sh "$repo"; fi
cargo build --release -p plugvisor-cli -p plugvisor-example-echo -p plugvisor-example-kv
scripts/setup-python.sh
# The Go example, with Debian's Go packages (installed here when run as root
# with apt-get, as .ci/run does). Without them only go-echo does not start.
go_packages=(golang-go golang-google-grpc-dev golang-google-protobuf-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc)
if ! command -v go >/dev/null || ! command -v protoc-gen-go-grpc >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${go_packages[*]} for the Go example"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${go_packages[@]}" >/dev/null
  fi
fi
examples/go-echo/build.sh || echo "== go-echo was not built (see above); the other examples still run" >&2
exec target/release/plugvisor run --plugins-dir examples/plugins "$@"
