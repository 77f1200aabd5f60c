#!/usr/bin/env bash
# The project's test command: formatting, lints, the Python example's
# virtualenv, every binary, then every test (unit, integration, end to end).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== python example virtualenv"
scripts/setup-python.sh
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (binaries the end-to-end tests run)"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace
