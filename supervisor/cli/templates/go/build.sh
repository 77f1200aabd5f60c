#!/bin/sh
# Builds (or tests) the {{name}} plugin with Debian's Go packages, in GOPATH
# mode (no Go module proxy needed):
#
#   apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev \
#       protobuf-compiler protoc-gen-go protoc-gen-go-grpc
#
#   ./build.sh          builds ./bin/{{name}}, where plugin.yaml's `exec` points
#   ./build.sh test     runs the tests in main_test.go (extra args go to `go test`)
#
# The stubs are generated from ./proto at build time into a private GOPATH
# under ./.build, at the import path the proto's go_package names.
#
# Exit status: 0 built (or tests passed), 1 error.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
work="$here/.build"

die() { printf '{{name}}/build.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "'$tool' not found. On Debian 12: apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc"
done
[ -d /usr/share/gocode/src/google.golang.org/grpc ] ||
    die "grpc-go is not in /usr/share/gocode; apt-get install golang-google-grpc-dev"

mkdir -p "$work"
# One build at a time in this directory.
exec 9>"$work/.lock"
flock 9

gopath="$work/gopath"
pkg="github.com/plugvisor/plugvisor/gen/go/plugvisor/v1"
main="$gopath/src/plugvisor.dev/{{name}}"
rm -rf "$gopath/src/github.com/plugvisor" "$main"
mkdir -p "$gopath/src" "$main"

# Stubs: protoc writes them under their go_package import path.
protoc -I "$here/proto" --go_out="$gopath/src" --go-grpc_out="$gopath/src" \
    "$here/proto/plugvisor/v1/plugin.proto"
[ -f "$gopath/src/$pkg/plugin_grpc.pb.go" ] || die "protoc did not write $gopath/src/$pkg/plugin_grpc.pb.go"

cp "$here"/*.go "$main/"
export GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOCACHE="${GOCACHE:-$work/cache}" CGO_ENABLED=0
if [ "${1:-}" = test ]; then
    shift
    cd "$main"
    exec go test "$@" .
fi
mkdir -p "$here/bin"
go build -o "$here/bin/.{{name}}.new" "plugvisor.dev/{{name}}"
# Rename into place: a running plugin keeps its old binary.
mv "$here/bin/.{{name}}.new" "$here/bin/{{name}}"
printf '{{name}}/build.sh: built %s\n' "$here/bin/{{name}}" >&2
