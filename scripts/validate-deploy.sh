#!/usr/bin/env bash
# Checks the deployment files, offline:
#   1. lints deploy/Dockerfile and deploy/Dockerfile.cuda with hadolint
#      (any finding fails, style included; the few ignored rules are ignored
#      inline in the Dockerfiles, each with its reason);
#   2. validates every manifest under deploy/kubernetes/ (examples/ included)
#      against the Kubernetes OpenAPI schemas shipped in kubernetes-validate,
#      strictly (unknown fields fail), for each version in K8S_VERSIONS; run
#      in a network namespace of its own when `unshare` allows, which proves
#      no schema is fetched;
#   3. cross-checks what no schema can: kustomization.yaml lists every
#      manifest, the ConfigMaps carry deploy/otel-collector.yaml and
#      models/cifar10_cnn.calibration.json verbatim, the Dockerfile pins the
#      ONNX Runtime of scripts/setup.sh, and every container is locked down
#      (non-root, read-only root, no capabilities, seccomp, memory limit).
# Creates or reuses .venv-deploy with the pinned tools of
# scripts/requirements-deploy.txt. Idempotent; exits non-zero on any failure.
#
#   scripts/validate-deploy.sh
#   K8S_VERSIONS="1.30.0 1.37.0" scripts/validate-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deploy-common.sh

# 1.33: native sidecar containers are GA (the manifests use them; the
# schemas accept them from 1.28). 1.37: the newest schemas shipped.
K8S_VERSIONS=${K8S_VERSIONS:-"1.33.0 1.37.0"}

t0=$(now)
ensure_venv
info "tools: hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)"

# 1. Dockerfiles.
for dockerfile in deploy/Dockerfile deploy/Dockerfile.cuda; do
  if out=$("$VENV/bin/hadolint" --no-color --failure-threshold style "$dockerfile" 2>&1); then
    pass "hadolint $dockerfile"
  else
    fail "hadolint $dockerfile"
    printf '%s\n' "$out"
  fi
done

# 2. Manifests against the schemas.
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
offline=()
if unshare --net true 2>/dev/null; then
  offline=(unshare --net)
  info "kubernetes-validate runs without network (unshare --net)"
fi
for version in $K8S_VERSIONS; do
  if out=$("${offline[@]}" "$VENV/bin/kubernetes-validate" --strict -k "$version" "${manifests[@]}" 2>&1); then
    ok=$(grep -c 'passed for resource' <<<"$out" || true)
    pass "kubernetes-validate --strict -k $version: $ok resources in ${#manifests[@]} files"
  else
    fail "kubernetes-validate --strict -k $version"
    grep -v '^INFO' <<<"$out" || true
  fi
done

# 3. What the schemas cannot see.
if "$VENV/bin/python" - <<'PY'
import json, pathlib, re, sys
import yaml

root = pathlib.Path("deploy/kubernetes")
problems = []

def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]

# kustomization.yaml lists exactly the top-level manifests.
kust = yaml.safe_load((root / "kustomization.yaml").read_text())
listed = kust.get("resources", [])
for r in listed:
    if not (root / r).is_file():
        problems.append(f"kustomization.yaml lists {r}, which does not exist")
for p in sorted(root.glob("*.yaml")):
    if p.name != "kustomization.yaml" and p.name not in listed:
        problems.append(f"{p} is not listed in kustomization.yaml resources")

objects = {}
for p in sorted(root.rglob("*.yaml")):
    if p.name == "kustomization.yaml":
        continue
    for d in docs(p):
        objects.setdefault((d["kind"], d["metadata"]["name"]), []).append((p, d))

def one(kind, name, path=None):
    found = [d for p, d in objects.get((kind, name), []) if path is None or p == path]
    return found[0] if found else None

# ConfigMaps carry the repository's files verbatim.
for name, key, source in [
    ("odin-sidecar-calibration", "calibration.json", "models/cifar10_cnn.calibration.json"),
    ("odin-otel-collector", "config.yaml", "deploy/otel-collector.yaml"),
]:
    cm = one("ConfigMap", name)
    if cm is None or cm.get("data", {}).get(key) != pathlib.Path(source).read_text():
        problems.append(f"ConfigMap {name} key {key} differs from {source}")

# The Dockerfile serves the ONNX Runtime that scripts/setup.sh fetches.
setup = re.search(r"^ORT_VERSION=(\S+)", pathlib.Path("scripts/setup.sh").read_text(), re.M).group(1)
docker = re.search(r"^ARG ORT_VERSION=(\S+)", pathlib.Path("deploy/Dockerfile").read_text(), re.M).group(1)
if setup != docker:
    problems.append(f"deploy/Dockerfile ORT_VERSION={docker} but scripts/setup.sh fetches {setup}")

def mem_mib(q):
    m = re.fullmatch(r"(\d+)(Mi|Gi)", str(q))
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1) if m else None

in_base = {(d["kind"], d["metadata"]["name"]) for r in listed for d in docs(root / r)}
for path in [root / "deployment.yaml", root / "examples" / "deployment-mtls.yaml"]:
    dep = one("Deployment", "odin-sidecar", path)
    where = str(path)
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    if dep["spec"]["selector"]["matchLabels"].items() - labels.items():
        problems.append(f"{where}: selector does not match the pod labels")
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod securityContext needs runAsNonRoot and seccomp RuntimeDefault")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    containers = pod.get("initContainers", []) + pod["containers"]
    for c in containers:
        sc = c.get("securityContext", {})
        if not (sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in sc.get("capabilities", {}).get("drop", [])):
            problems.append(f"{where}: container {c['name']} is not locked down")
        if mem_mib(c.get("resources", {}).get("limits", {}).get("memory")) is None:
            problems.append(f"{where}: container {c['name']} has no memory limit")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{where}: container {c['name']} mounts undefined volume {m['name']}")
    for v in volumes.values():
        ref = ("ConfigMap", v["configMap"]["name"]) if "configMap" in v else \
              ("Secret", v["secret"]["secretName"]) if "secret" in v else None
        if ref and ref not in objects:
            problems.append(f"{where}: volume {v['name']} refers to {ref[0]} {ref[1]}, defined nowhere")
        if ref and path.parent == root and ref not in in_base:
            problems.append(f"{where}: volume {v['name']} refers to {ref[0]} {ref[1]}, not in kustomization.yaml")
    odin = next(c for c in containers if c["name"] == "odin-sidecar")
    limit = mem_mib(odin["resources"]["limits"]["memory"])
    if limit != 512:
        problems.append(f"{where}: odin-sidecar memory limit is {limit} MiB, not 512")
    budget = [int(a.split("=", 1)[1]) for a in odin["args"] if a.startswith("--memory-budget-mib=")]
    if not budget or budget[0] >= limit:
        problems.append(f"{where}: --memory-budget-mib must be set below the memory limit")
    if {p["name"]: p["containerPort"] for p in odin["ports"]} != {"grpc": 50051, "metrics": 9464}:
        problems.append(f"{where}: odin-sidecar ports must be grpc 50051 and metrics 9464")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe not in odin:
            problems.append(f"{where}: odin-sidecar has no {probe}")
        elif path.name == "deployment.yaml" and odin[probe].get("grpc", {}).get("port") != 50051:
            problems.append(f"{where}: {probe} is not a native gRPC probe on 50051")
    for flag in ("--calibration=", "--auth-token-file="):
        files = [a.split("=", 1)[1] for a in odin["args"] if a.startswith(flag)]
        if not files or not any(files[0].startswith(m["mountPath"].rstrip("/") + "/")
                                for m in odin.get("volumeMounts", [])):
            problems.append(f"{where}: {flag}FILE must point into a mounted volume")
    svc = one("Service", "odin-sidecar")
    if svc["spec"]["selector"].items() - labels.items():
        problems.append(f"{where}: Service odin-sidecar does not select the pods")

svc = one("Service", "odin-sidecar")
grpc = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
if not grpc or grpc[0].get("appProtocol") != "grpc":
    problems.append("Service odin-sidecar needs a port named grpc with appProtocol grpc")
for (kind, name), found in objects.items():
    for p, d in found:
        target = d["spec"].get("scaleTargetRef") if kind == "HorizontalPodAutoscaler" else None
        if target and (target["kind"], target["name"]) not in objects:
            problems.append(f"{p}: HPA targets {target['kind']} {target['name']}, defined nowhere")

for problem in problems:
    print(f"      {problem}")
sys.exit(1 if problems else 0)
PY
then
  pass "cross-checks: kustomization, ConfigMaps = repository files, ORT version, container lockdown"
else
  fail "cross-checks"
fi

if [ "$failures" -eq 0 ]; then
  echo "PASS  validate-deploy: all checks ($(since "$t0") s)"
else
  echo "FAIL  validate-deploy: $failures check(s) failed ($(since "$t0") s)"
  exit 1
fi
