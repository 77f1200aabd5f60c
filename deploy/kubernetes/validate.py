#!/usr/bin/env python3
"""Renders every variant of plugvisor's Kubernetes manifests and validates them.

For each overlay under overlays/ (daemonset, deployment, daemonset-cgroups):

1. render it with `kubectl kustomize` (the kustomize built into kubectl);
2. validate every resource against the Kubernetes API's OpenAPI schemas
   shipped by the `kubernetes-validate` package, strictly (unknown fields
   are errors), for each Kubernetes version in KUBE_VERSIONS;
3. validate the ServiceMonitor (a Prometheus Operator CRD, which those
   schemas do not include) against schemas/servicemonitor.json, a subset of
   the CRD's schema written for the fields used here;
4. check what no schema can: probes use the port the config's
   health.address serves and the service names the daemon answers; every
   Service's targetPort is a named container port; selectors match the pod
   labels; the metrics annotation matches metrics_address.

Prints one JSON object per variant on stdout (--json) for the tests that
then probe a real daemon with the rendered probes and check the rendered
config. Exit status: 0 valid, 1 invalid (each problem on stderr), 2 usage
or a missing tool.

Usage: validate.py [--json] [DIR]   (DIR: the deploy/kubernetes tree)
"""

import json
import os
import shutil
import subprocess
import sys

import yaml

KUBE_VERSIONS = ["1.29.0", "1.33.0"]
VARIANTS = ["daemonset", "deployment", "daemonset-cgroups"]
# The health service names the daemon answers (supervisor/cli/src/health_tcp.rs).
HEALTH_SERVICES = {"", "plugvisor.liveness", "plugvisor.readiness"}


def render(root, variant):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl is not installed (it renders the kustomize overlays)", file=sys.stderr)
        sys.exit(2)
    out = subprocess.run(
        [kubectl, "kustomize", os.path.join(root, "overlays", variant)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise Problem(f"{variant}: kubectl kustomize failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class Problem(Exception):
    pass


def validate_schema(variant, docs, problems):
    import kubernetes_validate

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "schemas", "servicemonitor.json")) as f:
        monitor_schema = json.load(f)
    for doc in docs:
        kind = doc.get("kind")
        name = doc.get("metadata", {}).get("name")
        if kind == "ServiceMonitor":
            import jsonschema

            for e in jsonschema.Draft7Validator(monitor_schema).iter_errors(doc):
                path = ".".join(str(p) for p in e.absolute_path)
                problems.append(f"{variant}: ServiceMonitor/{name}: {path}: {e.message}")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(
                    f"{variant}: {kind}/{name} (Kubernetes {version}): {path}: {e.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{variant}: {kind}/{name}: no schema: {e}")


def port_of(address, what):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise Problem(f"{what} `{address}` is not HOST:PORT")
    return int(port)


def check_wiring(variant, docs, problems):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workloads = by_kind.get("DaemonSet", []) + by_kind.get("Deployment", [])
    if len(workloads) != 1:
        raise Problem(f"{variant}: expected one DaemonSet or Deployment, found {len(workloads)}")
    workload = workloads[0]
    template = workload["spec"]["template"]
    pod = template["spec"]
    labels = template["metadata"].get("labels", {})
    selector = workload["spec"]["selector"]["matchLabels"]
    for k, v in selector.items():
        if labels.get(k) != v:
            problems.append(f"{variant}: the selector's {k}={v} is not on the pod template")
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}

    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    config_volume = next(
        (v for v in pod.get("volumes", []) if v["name"] == "config"), None
    )
    if config_volume is None or config_volume["configMap"]["name"] not in configmaps:
        raise Problem(f"{variant}: the config volume names no rendered ConfigMap")
    config_text = configmaps[config_volume["configMap"]["name"]]["data"]["plugvisor.yaml"]
    config = yaml.safe_load(config_text)
    health_port = port_of(config["health"]["address"], "health.address")
    metrics_port = port_of(config["metrics_address"], "metrics_address")
    if ports.get("health") != health_port:
        problems.append(f"{variant}: container port `health` is {ports.get('health')}, the config serves health on {health_port}")
    if ports.get("metrics") != metrics_port:
        problems.append(f"{variant}: container port `metrics` is {ports.get('metrics')}, the config serves metrics on {metrics_port}")
    annotations = template["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(metrics_port):
        problems.append(f"{variant}: prometheus.io/port is {annotations.get('prometheus.io/port')}, metrics are on {metrics_port}")

    probes = {}
    for kind in ["startupProbe", "livenessProbe", "readinessProbe"]:
        probe = container.get(kind)
        if probe is None or "grpc" not in probe:
            problems.append(f"{variant}: {kind} is not a grpc probe")
            continue
        port, service = probe["grpc"]["port"], probe["grpc"].get("service", "")
        if port != health_port:
            problems.append(f"{variant}: {kind} probes port {port}, health is served on {health_port}")
        if service not in HEALTH_SERVICES:
            problems.append(f"{variant}: {kind} asks for service `{service}`, which the daemon does not serve")
        probes[kind] = {"port": port, "service": service}

    for service in by_kind.get("Service", []):
        name = service["metadata"]["name"]
        for k, v in service["spec"].get("selector", {}).items():
            if labels.get(k) != v:
                problems.append(f"{variant}: Service/{name} selects {k}={v}, not on the pods")
        for p in service["spec"]["ports"]:
            if p.get("targetPort") not in ports:
                problems.append(f"{variant}: Service/{name} targets port `{p.get('targetPort')}`, not a named container port")
    for monitor in by_kind.get("ServiceMonitor", []):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matching = [
            s for s in by_kind.get("Service", [])
            if all(s["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]
        if not matching:
            problems.append(f"{variant}: the ServiceMonitor selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if not any(p["name"] == endpoint["port"] for s in matching for p in s["spec"]["ports"]):
                problems.append(f"{variant}: the ServiceMonitor scrapes port `{endpoint['port']}`, which its Services lack")

    security = container.get("securityContext", {})
    return {
        "variant": variant,
        "kind": workload["kind"],
        "probes": probes,
        "config": config_text,
        "capabilities": security.get("capabilities", {}).get("add", []),
        "privileged": bool(security.get("privileged", False)),
    }


def main(argv):
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    root = args[0] if args else os.path.dirname(os.path.abspath(__file__))
    problems = []
    summaries = []
    for variant in VARIANTS:
        try:
            docs = render(root, variant)
            validate_schema(variant, docs, problems)
            summaries.append(check_wiring(variant, docs, problems))
        except (Problem, KeyError, TypeError) as e:
            problems.append(f"{variant}: {e.__class__.__name__}: {e}")
    for p in problems:
        print(f"invalid: {p}", file=sys.stderr)
    if as_json:
        print(json.dumps(summaries))
    else:
        for s in summaries:
            print(f"{s['variant']}: {s['kind']} valid against Kubernetes {', '.join(KUBE_VERSIONS)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
