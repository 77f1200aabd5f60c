#!/bin/sh
# Build the go-echo example plugin with Debian's Go packages, in GOPATH mode
# (no Go module proxy needed):
#
#   apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev \
#       protobuf-compiler protoc-gen-go protoc-gen-go-grpc
#
# The stubs are generated from <repo>/proto at build time into a private
# GOPATH under $OUT (default: <repo>/target/go-echo), at the import path the
# protos' go_package names; the binary lands in $OUT/go-echo, where
# examples/plugins/go-echo/plugin.yaml points.
#
# Exit status: 0 built, 1 error (the message says what is missing).
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
repo=$(CDPATH='' cd -- "$here/../.." && pwd -P)
out=${OUT:-"$repo/target/go-echo"}

die() { printf 'go-echo/build.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "'$tool' not found. On Debian 12: apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc"
done
[ -d /usr/share/gocode/src/google.golang.org/grpc ] ||
    die "grpc-go is not in /usr/share/gocode; apt-get install golang-google-grpc-dev"

mkdir -p "$out"
# One build at a time per output directory (tests build it concurrently).
exec 9>"$out/.lock"
flock 9

gopath="$out/gopath"
pkg="github.com/plugvisor/plugvisor/gen/go/plugvisor/v1"
main="$gopath/src/plugvisor.dev/go-echo"
rm -rf "$gopath/src/github.com/plugvisor" "$main"
mkdir -p "$gopath/src" "$main"

# Stubs: protoc writes them under their go_package import path.
protoc -I "$repo/proto" \
    --go_out="$gopath/src" --go-grpc_out="$gopath/src" \
    "$repo/proto/plugvisor/v1/plugin.proto" "$repo/proto/plugvisor/v1/control.proto"
[ -f "$gopath/src/$pkg/plugin_grpc.pb.go" ] || die "protoc did not write $gopath/src/$pkg/plugin_grpc.pb.go"

cp "$here"/*.go "$main/"
GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOCACHE="$out/cache" \
    CGO_ENABLED=0 go build -o "$out/go-echo.new" plugvisor.dev/go-echo
mv "$out/go-echo.new" "$out/go-echo"
printf 'go-echo/build.sh: built %s\n' "$out/go-echo" >&2
