#!/usr/bin/env bash
# Renders every overlay in deploy/overlays with kustomize and validates all
# objects against the Kubernetes 1.35 schemas in strict mode (unknown fields
# fail). See validate_manifests.py. The real API server of the cluster tests
# (tests/tests/kubernetes.rs) then applies agent-and-ca for real.
#
# Needs python3 with venv and network access to PyPI on the first run; the
# tools go into a virtualenv under target/ (override: CREDLET_VALIDATE_VENV).
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

exec "$venv/bin/python" "$root/deploy/validate_manifests.py" --deploy "$root/deploy" "$@"
