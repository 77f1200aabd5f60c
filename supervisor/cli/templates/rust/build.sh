#!/bin/sh
# Builds the {{name}} plugin and installs the binary at ./bin/{{crate}},
# where plugin.yaml's `exec` points.
#
#   ./build.sh              release build (what to deploy)
#   PROFILE=dev ./build.sh  debug build (quicker; shares `cargo test`'s deps)
#
# Extra arguments go to `cargo build` (e.g. --offline, --locked).
# Honours CARGO_TARGET_DIR and Cargo's own config for where target/ is.
#
# Exit status: 0 built, 1 error.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
profile=${PROFILE:-release}
bin={{crate}}

die() { printf '{{name}}/build.sh: error: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null 2>&1 || die "'cargo' not found; install Rust (https://rustup.rs)"

cd "$here"
cargo build --profile "$profile" --bin "$bin" "$@"

# Where Cargo put it: ask Cargo rather than guess (CARGO_TARGET_DIR,
# .cargo/config.toml's build.target-dir).
target=$(cargo metadata --format-version 1 --no-deps --offline |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || die "cannot find the target directory in 'cargo metadata'"
case $profile in
    dev) dir=debug ;;
    *) dir=$profile ;;
esac
[ -x "$target/$dir/$bin" ] || die "cargo did not build $target/$dir/$bin"

mkdir -p "$here/bin"
# Copy, then rename: a running plugin keeps its old binary.
cp "$target/$dir/$bin" "$here/bin/.$bin.new"
chmod 0755 "$here/bin/.$bin.new"
mv "$here/bin/.$bin.new" "$here/bin/$bin"
printf '{{name}}/build.sh: built %s\n' "$here/bin/$bin" >&2
