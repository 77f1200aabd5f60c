#!/bin/sh
# Tools that validate deploy/kubernetes offline: a virtualenv at
# <repo>/.venv-k8s with kubernetes-validate (it ships the Kubernetes API's
# OpenAPI schemas, so no cluster is needed) and jsonschema. The overlays are
# rendered with `kubectl kustomize` (kubectl comes with the machine; .ci/run
# installs Debian's kubernetes-client where it is missing).
# Idempotent: an existing venv with the pinned version is reused.
set -eu
self=$(readlink -f -- "$0")
repo=$(CDPATH='' cd -- "$(dirname -- "$self")/.." && pwd -P)
venv=${K8S_VENV:-"$repo/.venv-k8s"}
want=1.37.0
if [ -x "$venv/bin/python" ] &&
        "$venv/bin/python" -c "import kubernetes_validate, jsonschema, yaml, sys; from importlib.metadata import version; sys.exit(version('kubernetes-validate') != '$want')" 2>/dev/null; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q "kubernetes-validate==$want" jsonschema PyYAML
