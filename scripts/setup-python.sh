#!/bin/sh
# Prepare the Python side of the repository: a virtualenv at <repo>/.venv with
# the pinned grpcio stack from examples/python-echo/requirements.txt, and the
# generated plugvisor.v1 stubs in examples/python-echo/gen/.
#
# Idempotent: an existing, healthy venv is reused and pip only runs when the
# requirements file changed since the last successful install. Safe to re-run.
#
# Environment:
#   PYTHON   interpreter used to create the venv (default: /usr/bin/python3
#            when it is 3.10 or newer, else python3 on PATH; needs >= 3.10).
#            Plugins run as their own unprivileged uid: the interpreter must
#            be reachable by every user, so one under /root is refused.
#   VENV     where to put the venv (default: <repo>/.venv)
#
# Exit status: 0 ready, 1 error (the message says what to do).
set -eu

self=$(readlink -f -- "$0" 2>/dev/null || realpath -- "$0")
repo=$(CDPATH='' cd -- "$(dirname -- "$self")/.." && pwd -P)
example="$repo/examples/python-echo"
requirements="$example/requirements.txt"
venv=${VENV:-"$repo/.venv"}
# The system interpreter first: plugins run as unprivileged users, who
# cannot reach an interpreter installed under a private home (pyenv's).
if [ -z "${PYTHON:-}" ] && [ -x /usr/bin/python3 ] &&
        /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    python=/usr/bin/python3
else
    python=${PYTHON:-python3}
fi
stamp="$venv/.plugvisor-requirements.sha256"

say() { printf 'setup-python: %s\n' "$*" >&2; }
die() { printf 'setup-python: error: %s\n' "$*" >&2; exit 1; }

[ -f "$requirements" ] || die "$requirements is missing; is $repo a plugvisor checkout?"

command -v "$python" >/dev/null 2>&1 ||
    die "'$python' not found on PATH. Install Python 3.10 or newer (Debian/Ubuntu: apt-get install python3), or set PYTHON=/path/to/python3."

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
    die "$("$python" -V 2>&1) is too old: the pinned grpcio needs Python >= 3.10. Set PYTHON to a newer interpreter."

# Debian and Ubuntu split `venv`/`ensurepip` into the python3-venv package.
venv_module_ok() { "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; }

# A venv is healthy when its interpreter runs (a Python upgrade or a moved
# checkout leaves dangling symlinks behind).
venv_ok() {
    [ -x "$venv/bin/python3" ] && "$venv/bin/python3" -c '' >/dev/null 2>&1 &&
        reachable_by_all "$(readlink -f -- "$venv/bin/python3")"
}

# Every directory above `$1` lets others through (o+x), and `$1` is o+x: an
# unprivileged plugin can run it.
reachable_by_all() {
    p=$1
    [ -n "$(find "$p" -maxdepth 0 -perm -o+x 2>/dev/null)" ] || return 1
    while [ "$p" != / ]; do
        p=$(dirname -- "$p")
        [ -n "$(find "$p" -maxdepth 0 -perm -o+x 2>/dev/null)" ] || return 1
    done
}

if ! venv_ok; then
    if ! venv_module_ok; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing python3-venv with apt-get"
            log=$(mktemp)
            if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >"$log" 2>&1; then
                # Stale package lists are the usual cause; refresh once and retry.
                DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 || true
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >>"$log" 2>&1 || {
                    tail -n 20 "$log" >&2
                    die "apt-get install python3-venv failed (full log: $log)"
                }
            fi
            rm -f "$log"
            venv_module_ok || die "python3-venv is installed but '$python -m venv' still cannot work; is '$python' the Debian python3?"
        else
            die "'$python -m venv' is unavailable (the venv/ensurepip modules are missing). On Debian/Ubuntu run 'apt-get install python3-venv' as root, then re-run this script."
        fi
    fi
    if [ -e "$venv" ]; then
        say "recreating broken virtualenv at $venv"
        rm -rf -- "$venv"
    fi
    "$python" -m venv "$venv" || die "'$python -m venv $venv' failed (see above)"
fi

imports_ok() {
    "$venv/bin/python3" -c 'import grpc, grpc_tools, grpc_health.v1.health, google.protobuf' >/dev/null 2>&1
}

want=$(sha256sum "$requirements" | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$want" != "$have" ] || ! imports_ok; then
    say "installing pinned packages into $venv"
    log=$(mktemp)
    # --only-binary: the pinned set ships wheels for common Linux platforms;
    # failing fast beats a silent 20-minute grpcio compile on an odd one.
    if ! "$venv/bin/python3" -m pip install --disable-pip-version-check --no-input \
            --quiet --only-binary=:all: -r "$requirements" >"$log" 2>&1; then
        tail -n 25 "$log" >&2
        die "pip install -r $requirements failed (full log: $log). Check that PyPI is reachable (proxy settings: HTTPS_PROXY / PIP_INDEX_URL) and that wheels exist for $("$venv/bin/python3" -V 2>&1) on $(uname -m)."
    fi
    rm -f "$log"
    printf '%s\n' "$want" >"$stamp"
fi

imports_ok ||
    die "the packages in $venv do not import; delete $venv and re-run this script"

# The plugin helper package (<repo>/python), reinstalled when it changes.
# Not editable: a plain install copies plugin.proto, which the package
# compiles at import time.
helper="$repo/python"
helper_stamp="$venv/.plugvisor-helper.sha256"
helper_want=$(cd "$helper" && find . -path ./build -prune -o -name '*.egg-info' -prune -o -type f -print -o -type l -print | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ "$helper_want" != "$(cat "$helper_stamp" 2>/dev/null || true)" ] ||
        ! "$venv/bin/python3" -c 'import plugvisor.v1' >/dev/null 2>&1; then
    say "installing the plugvisor helper package from $helper"
    log=$(mktemp)
    # --no-build-isolation: build with the pinned setuptools above, offline.
    if ! "$venv/bin/python3" -m pip install --disable-pip-version-check --no-input --quiet \
            --no-deps --no-build-isolation "$helper" >"$log" 2>&1; then
        tail -n 25 "$log" >&2
        die "pip install $helper failed (full log: $log)"
    fi
    rm -rf "$helper/build" "$helper"/*.egg-info
    rm -f "$log"
    printf '%s\n' "$helper_want" >"$helper_stamp"
fi

"$venv/bin/python3" "$example/gen_stubs.py" ||
    die "generating the Python stubs failed (see above)"

versions=$("$venv/bin/python3" -c 'import grpc, google.protobuf as p; print(f"grpcio {grpc.__version__}, protobuf {p.__version__}")')
say "ready: $venv ($versions); stubs in $example/gen"
