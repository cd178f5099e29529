#!/usr/bin/env python3
"""Checks deploy/kubernetes: every overlay renders with `kubectl kustomize`, every object
validates against the Kubernetes OpenAPI schema of a pinned version, every Kiln workload
(the single node's StatefulSet; a cluster's ingesters, queriers and compactor) meets our
own policy (limits, probes, non-root, read-only root, no capabilities, grace period above
the shutdown timeout, a volume claim where a WAL lives, NetworkPolicies opening exactly
the ports of the pods they select), and the ConfigMap's kiln.toml passes
`kiln serve --config … --check` with each workload's variables.

usage: tests/kubernetes/check.py path/to/kiln
"""

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"
OVERLAYS = ["base", "overlays/edge-k3s", "overlays/cloud", "overlays/cluster"]
WORKLOADS = ("StatefulSet", "Deployment")

failures: list[str] = []


def fail(where: str, what: str) -> None:
    failures.append(f"{where}: {what}")


def seconds(text: str) -> float:
    """A humantime duration as kiln.toml writes it (30s, 2m, 1m30s)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def render(overlay: str) -> tuple[str, list[dict]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZE / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out, [d for d in yaml.safe_load_all(out) if d]


def validate_schema(overlay: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        run = subprocess.run(
            ["kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, f.name],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            fail(overlay, f"kubernetes-validate {KUBERNETES_VERSION}:\n{run.stdout}{run.stderr}")
    finally:
        os.unlink(f.name)


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def role_of(workload: dict) -> str:
    env = workload["spec"]["template"]["spec"]["containers"][0].get("env", [])
    return next((v.get("value") for v in env if v["name"] == "KILN_ROLE"), "all")


def check_policy(overlay: str, objects: list[dict]) -> list[dict]:
    by_kind: dict[str, list[dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    for kind in ["Namespace", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget",
                 "NetworkPolicy", "ServiceAccount"]:
        if kind not in by_kind:
            fail(overlay, f"no {kind}")
    ns = by_kind.get("Namespace", [{}])[0]
    if ns.get("metadata", {}).get("labels", {}).get("pod-security.kubernetes.io/enforce") != "restricted":
        fail(overlay, "the namespace does not enforce the restricted Pod Security Standard")

    config = by_kind["ConfigMap"][0]
    toml_text = config["data"]["kiln.toml"]
    settings = tomllib.loads(toml_text)
    shutdown = seconds(settings.get("shutdown-timeout", "30s"))

    workloads = [w for kind in WORKLOADS for w in by_kind.get(kind, [])]
    found = []
    for workload in workloads:
        found.append(check_workload(overlay, workload, shutdown))
        found[-1]["config"] = toml_text
    for np in by_kind.get("NetworkPolicy", []):
        selected = [w for w in workloads
                    if matches(np["spec"]["podSelector"], w["spec"]["template"]["metadata"]["labels"])]
        if not selected:
            fail(overlay, f"NetworkPolicy/{np['metadata']['name']} selects no Kiln pod")
        ports = {p["port"] for rule in np["spec"].get("ingress", []) for p in rule.get("ports", [])}
        listening = {p["containerPort"] for w in selected
                     for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        if ports != listening:
            fail(overlay, f"NetworkPolicy/{np['metadata']['name']} opens {sorted(ports)}, "
                          f"its pods listen on {sorted(listening)}")
        if any(not rule.get("from") for rule in np["spec"].get("ingress", [])):
            fail(overlay, f"NetworkPolicy/{np['metadata']['name']} lets anyone in")
    headless = {s["metadata"]["name"] for s in by_kind.get("Service", []) if s["spec"].get("clusterIP") == "None"}
    for w in workloads:
        if w["kind"] == "StatefulSet" and w["spec"].get("serviceName") not in headless:
            fail(overlay, f"StatefulSet/{w['metadata']['name']}: serviceName is not a headless Service")
        labels = w["spec"]["template"]["metadata"]["labels"]
        if not any(matches(np["spec"]["podSelector"], labels) for np in by_kind.get("NetworkPolicy", [])):
            fail(overlay, f"{w['kind']}/{w['metadata']['name']}: no NetworkPolicy")
    return found


def check_workload(overlay: str, workload: dict, shutdown: float) -> dict:
    spec = workload["spec"]["template"]["spec"]
    where = f"{overlay} {workload['kind']}/{workload['metadata']['name']}"
    if spec.get("terminationGracePeriodSeconds", 30) <= shutdown:
        fail(where, f"terminationGracePeriodSeconds is not above shutdown-timeout ({shutdown}s)")
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(where, "no RuntimeDefault seccomp profile")
    if spec.get("automountServiceAccountToken") is not False:
        fail(where, "mounts a service account token")
    role = role_of(workload)
    # A WAL (the single node's, an ingester's) holds acknowledged writes: a volume of its own.
    if role in ("all", "ingester"):
        if workload["kind"] != "StatefulSet" or not workload["spec"].get("volumeClaimTemplates"):
            fail(where, f"role {role} keeps a WAL, and has no volume claim for it")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cw = f"{where} container {c['name']}"
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        if "memory" not in limits:
            fail(cw, "no memory limit")
        if "memory" not in requests or "cpu" not in requests:
            fail(cw, "no cpu and memory requests")
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
            if probe not in c:
                fail(cw, f"no {probe}")
        if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
            fail(cw, "readiness is not /ready")
        if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
            fail(cw, "liveness is not /health")
        startup = c.get("startupProbe", {})
        if role in ("all", "ingester") and startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 300:
            fail(cw, "the startup probe gives WAL replay less than 5 minutes")
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            fail(cw, "may run as root")
        if (sc.get("runAsUser") or pod_sc.get("runAsUser")) in (None, 0):
            fail(cw, "no non-root runAsUser")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(cw, "root file system is writable")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(cw, "allows privilege escalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(cw, "does not drop all capabilities")
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true":
        fail(where, "no Prometheus scrape annotations")
    grpc = next((p["containerPort"] for p in spec["containers"][0].get("ports", []) if p.get("name") == "grpc"), None)
    return {"name": f"{workload['kind']}/{workload['metadata']['name']}", "role": role,
            "pod": f"{workload['metadata']['name']}-0", "container": spec["containers"][0],
            "service": workload["spec"].get("serviceName"), "grpc": grpc}


def check_config(overlay: str, kiln: str, found: dict) -> None:
    """`kiln serve --config kiln.toml --check` with the pod's variables; the admin token
    file and the data directory are this machine's stand-ins for the Secret and volume."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kiln.toml"
        config.write_text(found["config"])
        token = Path(tmp) / "admin-token"
        token.write_text("kiln_" + "ab" * 32 + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        for var in found["container"].get("env", []):
            if "value" in var:
                # Kubernetes expands $(NAME) of variables defined before.
                env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], ""), var["value"])
            elif "fieldPath" in var.get("valueFrom", {}).get("fieldRef", {}):
                env[var["name"]] = found["pod"]
            elif "secretKeyRef" in var.get("valueFrom", {}):
                env[var["name"]] = "stand-in-secret"
        # The image's own variables.
        env.update({
            "KILN_DATA_DIR": str(Path(tmp) / "data"),
            "KILN_HTTP_BIND": "0.0.0.0:8080",
            "KILN_GRPC_BIND": "0.0.0.0:50051",
            "KILN_PG_BIND": "0.0.0.0:5433",
            "KILN_CONFIG": str(config),
            "KILN_ADMIN_TOKEN_FILE": str(token),
        })
        run = subprocess.run([kiln, "serve", "--check"], env=env, capture_output=True, text=True)
        if run.returncode != 0 or not run.stdout.startswith("configuration OK"):
            fail(overlay, f"kiln serve --check refused kiln.toml for {found['name']}:\n{run.stdout}{run.stderr}")
        elif found["role"] == "ingester" and (
            f"joins the catalog as ingester {found['pod']}, asked by queriers at "
            f"http://{found['pod']}.{found['service']}:{found['grpc']}\n"
        ) not in run.stdout:
            # Queriers find the ingesters through the catalog: each must join it with the
            # name its headless Service gives its pod.
            fail(overlay, f"{found['name']} does not join the catalog at its pod's name in "
                          f"Service {found['service']}:\n{run.stdout}")
        else:
            print(f"  {overlay} {found['name']}: {run.stdout.strip().splitlines()[0]}")


def main() -> int:
    kiln = sys.argv[1]
    for overlay in OVERLAYS:
        text, objects = render(overlay)
        print(f"{overlay}: {len(objects)} objects ({', '.join(sorted({o['kind'] for o in objects}))})")
        validate_schema(overlay, text)
        for found in check_policy(overlay, objects):
            check_config(overlay, kiln, found)
    if failures:
        print("\n".join(f"FAIL {f}" for f in failures), file=sys.stderr)
        return 1
    print("kubernetes: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
