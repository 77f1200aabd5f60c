#!/usr/bin/env bash
# Builds the daemon image (docker/Dockerfile) from binaries built on the host,
# runs it with the Rust example plugins (echo, kv) mounted from a volume, and
# checks that `plugvisor ps` inside shows them ready, that calls go through,
# and that `podman stop` ends the daemon with exit code 0. Removes its
# container and image on the way out.
#
# Usage: docker/test-container.sh [BIN_DIR]
#   BIN_DIR holds plugvisor, echo-plugin and kv-plugin (default:
#   target/release if all three are built there, else target/debug).
# Exit status: 0 passed; 77 containers cannot run here (a `SKIP: <reason>`
# line says why); anything else failed.
#
# No registry is needed: the base image is a Debian 12 rootfs made with
# `debootstrap --variant=minbase` from $DEBIAN_MIRROR (default
# deb.debian.org) and imported once as localhost/plugvisor-base:bookworm;
# later runs reuse it. Nothing is compiled in the container.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base=localhost/plugvisor-base:bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
name="plugvisor-test-$$"
image="localhost/plugvisor:test-$$"
# Containers and images of this script carry the pid of the run that made
# them, so a later run can remove what a killed one left behind.
label=plugvisor.test.pid

skip() { echo "SKIP: $*"; exit 77; }
step() { echo "== [${SECONDS}s] $*"; }

bin_dir="${1:-}"
if [ -z "$bin_dir" ]; then
  bin_dir="$repo/target/debug"
  if [ -x "$repo/target/release/plugvisor" ] && [ -x "$repo/target/release/echo-plugin" ] &&
    [ -x "$repo/target/release/kv-plugin" ]; then
    bin_dir="$repo/target/release"
  fi
fi
for b in plugvisor echo-plugin kv-plugin; do
  if [ ! -x "$bin_dir/$b" ]; then
    echo "$bin_dir/$b is not built; run \`cargo build --workspace --bins\` first" >&2
    exit 1
  fi
done

command -v podman >/dev/null || skip "podman is not installed (Debian: apt-get install podman runc debootstrap)"
# Without systemd as init there is neither a systemd cgroup manager nor a
# journal for events; runc is the runtime this is tested with.
podman=(podman --events-backend file)
[ -d /run/systemd/system ] || podman+=(--cgroup-manager cgroupfs)
command -v runc >/dev/null && podman+=(--runtime runc)
pm() { "${podman[@]}" "$@"; }
if ! info=$(pm info 2>&1); then
  skip "podman cannot run here: $(tail -n 1 <<<"$info")"
fi
# podman's default rlimits (nofile 1048576) need CAP_SYS_RESOURCE to set,
# which a sandboxed root may lack: ask for no more than this shell has.
nofile=$(ulimit -Hn)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

work=$(mktemp -d "/tmp/plugvisor-container.$$.XXXXXX")
cleanup() {
  pm rm -f -t 0 "$name" >/dev/null 2>&1 || true
  pm rmi -f "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

fail() {
  echo "FAIL: $*"
  echo "-- container log:"
  pm logs "$name" 2>&1 | tail -n 40 || true
  exit 1
}

# What killed runs left behind.
while read -r id pid; do
  if [ -n "$id" ] && ! kill -0 "$pid" 2>/dev/null; then pm rm -f -t 0 "$id" >/dev/null 2>&1 || true; fi
done < <(pm ps -a --filter "label=$label" --format "{{.ID}} {{index .Labels \"$label\"}}")
while read -r ref; do
  pid="${ref##*:test-}"
  if [ -n "$ref" ] && ! kill -0 "$pid" 2>/dev/null; then pm rmi -f "$ref" >/dev/null 2>&1 || true; fi
done < <(pm images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/plugvisor:test-[0-9]*$' || true)
for dir in /tmp/plugvisor-container.*.*; do
  pid="${dir#/tmp/plugvisor-container.}"
  pid="${pid%%.*}"
  if [ -d "$dir" ] && [ "$dir" != "$work" ] && ! kill -0 "$pid" 2>/dev/null; then rm -rf "$dir"; fi
done

if pm image exists "$base"; then
  step "base image $base: cached"
else
  command -v debootstrap >/dev/null ||
    skip "no base image $base, and debootstrap is not installed to make one (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || skip "no base image $base, and debootstrap needs root to make one"
  step "base image $base: debootstrap --variant=minbase bookworm from $mirror"
  if ! timeout --foreground 300 debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log"
    skip "debootstrap could not make a Debian 12 rootfs from $mirror (log above)"
  fi
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | pm import --quiet --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$work/rootfs"
fi

# Whether containers start at all here, with nothing of ours in them.
if ! out=$(pm run --rm --network none "${limits[@]}" "$base" true 2>&1); then
  skip "podman cannot start a container here: $(tail -n 1 <<<"$out")"
fi

step "image $image from $bin_dir/plugvisor"
mkdir "$work/context"
cp "$bin_dir/plugvisor" "$repo/docker/plugvisor.yaml" "$work/context/"
pm build --quiet --pull=never --build-arg "BASE=$base" -f "$repo/docker/Dockerfile" \
  -t "$image" "$work/context" >/dev/null

# The example manifests, with each executable beside its manifest.
plugins="$work/plugins"
for p in echo kv; do
  mkdir -p "$plugins/$p"
  cp "$bin_dir/$p-plugin" "$plugins/$p/"
  sed "s|^exec: .*|exec: ./$p-plugin|" "$repo/examples/plugins/$p/plugin.yaml" >"$plugins/$p/plugin.yaml"
  grep -q "^exec: ./$p-plugin$" "$plugins/$p/plugin.yaml" || fail "no exec: line in examples/plugins/$p/plugin.yaml"
done

step "run $name with $plugins mounted at /plugins"
pm run -d --name "$name" --label "$label=$$" --network none "${limits[@]}" \
  -v "$plugins:/plugins:ro" "$image" >/dev/null

deadline=$((SECONDS + 60))
while :; do
  table=$(pm exec "$name" plugvisor ps 2>&1) || true
  ready=$(awk 'NR > 1 && $3 == "ready"' <<<"$table" | wc -l)
  [ "$ready" -eq 2 ] && break
  [ "$(pm inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || fail "the container stopped"
  [ "$SECONDS" -lt "$deadline" ] || fail "the plugins were not ready within 60s:"$'\n'"$table"
  sleep 0.5
done
step "plugvisor ps in the container"
echo "$table"

reply=$(pm exec "$name" plugvisor call echo upper --data hi)
[ "$reply" = HI ] || fail "call echo upper answered \`$reply\`"
pm exec "$name" plugvisor call kv set --data colour=blue >/dev/null
reply=$(pm exec "$name" plugvisor call kv get --data colour)
[ "$reply" = blue ] || fail "call kv get answered \`$reply\`"

step "podman stop"
pm stop -t 20 "$name" >/dev/null
code=$(pm inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "the daemon exited with $code after SIGTERM"
pm logs "$name" 2>&1 | grep -iE "warn|error" | head -n 5 || true
step "passed"
