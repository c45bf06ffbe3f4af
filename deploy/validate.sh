#!/usr/bin/env bash
# Renders every overlay in deploy/overlays with kustomize, and the Helm chart
# in deploy/helm with helm, and validates all objects against the Kubernetes
# 1.35 schemas in strict mode (unknown fields fail). See
# validate_manifests.py. The real API server of the cluster tests
# (tests/tests/kubernetes.rs) then applies agent-and-ca for real.
#
# Needs python3 with venv and network access to PyPI on the first run (the
# tools go into a virtualenv under target/, override: CREDLET_VALIDATE_VENV),
# and Go with its module proxy for helm the first time.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CREDLET_VALIDATE_VENV:-$root/target/manifest-validate-venv}"
requirements="$root/deploy/validate-requirements.txt"
# kustomize's Go API as a shared library. Installed without its Python
# wrapper's dependencies and Python-version bound (>= 3.14): only the
# library is used, through ctypes.
pykustomize="pykustomize==0.1.4"

stamp="$venv/.credlet-requirements"
wanted="$(cat "$requirements"; echo "$pykustomize")"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        --no-deps --ignore-requires-python "$pykustomize"
    printf '%s' "$wanted" >"$stamp"
fi

# The Helm chart: helm v4 (built from its Go module, test-util/k8s) lints
# it with every optional part on, and renders the default install, which must
# pass the same checks and hold the same objects as agent-and-ca.
helm="$(bash "$root/test-util/k8s/build.sh" helm)/helm"
chart="$root/deploy/helm/credlet"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$helm" lint --strict --quiet "$chart" --kube-version 1.35.0
"$helm" lint --strict --quiet "$chart" --kube-version 1.35.0 \
    --set podMonitor.enabled=true,prometheusRule.enabled=true,namespace.create=true \
    --set agent.hostNetwork=true,agent.perVolumeMetrics=true,ca.hostNetwork=true,ca.tokenVerification=jwks \
    --set 'ca.allowedIpCidrs={10.0.0.0/8}'
"$helm" template credlet "$chart" --namespace credlet-system --kube-version 1.35.0 \
    --set namespace.create=true >"$out/helm-default.yaml"

"$venv/bin/python" "$root/deploy/validate_manifests.py" --deploy "$root/deploy" \
    --rendered "$out/helm-default.yaml" --same-as agent-and-ca "$@"
