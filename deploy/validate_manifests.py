#!/usr/bin/env python3
"""Renders every kustomize overlay under deploy/overlays and validates each
object against the Kubernetes 1.35 OpenAPI schemas, strictly: an unknown or
misspelt field, a wrong type or an unknown kind fails. Installs rendered
elsewhere (--rendered: the Helm chart's `helm template`) get the same schema
and cross-object checks; plain manifests (--manifests) the schema check.

Run it through deploy/validate.sh, which installs the two pinned tools it
needs into a private virtualenv:

- kustomize itself, not a re-implementation: the PyPI package
  `pykustomize` ships kustomize's Go API (sigs.k8s.io/kustomize/api v0.21.3)
  compiled as a C shared library. Its Python wrapper declares Python >= 3.14
  and needs cffi; we use neither, only the library, loaded here with ctypes.
  No kubectl or kustomize binary of a current version is packaged for
  Debian, PyPI or npm (Debian bookworm's kubectl is 1.20, whose kustomize
  predates components).
- `kubernetes-validate` 1.37.0, which bundles the strict JSON schemas of
  Kubernetes 1.34 to 1.37; we ask for 1.35, the version credlet targets.

Besides the schemas it checks what a schema cannot: the names that must
agree across objects (token audience, the agent's service account as the CA
knows it, the signer name in the RBAC rules).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import pathlib
import sys
from typing import Any

import yaml
from kubernetes_validate import utils as kv

KUBERNETES_VERSION = "1.35"


class Kustomize:
    """kustomize's build, from pykustomize's shared library."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("pykustomize")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("pykustomize is not installed (run deploy/validate.sh)")
        package = pathlib.Path(list(spec.submodule_search_locations)[0])
        library = package / "_lib" / "linux-amd64" / "libpykustomize.so"
        if not library.exists():
            raise SystemExit(f"kustomize library missing: {library}")
        self.lib = ctypes.CDLL(str(library))
        self.lib.pykustomize_build.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self.lib.pykustomize_build.restype = ctypes.c_int
        self.lib.pykustomize_last_error.restype = ctypes.c_void_p
        self.lib.pykustomize_version_string.restype = ctypes.c_void_p
        self.lib.pykustomize_free.argtypes = [ctypes.c_void_p]

    def _take(self, pointer: int | None) -> str:
        if not pointer:
            return ""
        try:
            return ctypes.string_at(pointer).decode("utf-8")
        finally:
            self.lib.pykustomize_free(pointer)

    def version(self) -> str:
        return ctypes.string_at(self.lib.pykustomize_version_string()).decode()

    def build(self, path: pathlib.Path) -> str:
        options = json.dumps(
            {
                "load_restrictions": 0,  # files only from inside each kustomization root
                "reorder": "legacy",
                "add_managedby_label": False,
                "enable_plugins": False,
                "enable_helm": False,
                "helm_command": "",
            }
        ).encode()
        result = ctypes.c_void_p()
        status = self.lib.pykustomize_build(
            str(path).encode(), options, ctypes.byref(result)
        )
        if status != 0:
            error = ctypes.string_at(self.lib.pykustomize_last_error()).decode()
            raise RuntimeError(f"kustomize build {path}: {error}")
        return self._take(result.value)


def name_of(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    name = meta.get("name", "<no name>")
    kind = obj.get("kind", "<no kind>")
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def validate_object(obj: dict[str, Any]) -> str | None:
    """Returns an error, or None when the object is valid."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return "not a Kubernetes object (apiVersion and kind required)"
    try:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as error:
        path = ".".join(str(p) for p in error.path) or "<root>"
        return f"{path}: {error.message}"
    except kv.SchemaNotFoundError as error:
        # kubernetes-validate only warns here; an unknown kind or version is
        # a typo as far as we are concerned.
        return error.message
    return None


def container_flags(container: dict[str, Any]) -> dict[str, list[str]]:
    """`--flag=value` arguments and CREDLET_* variables, by flag name."""
    flags: dict[str, list[str]] = {}
    for arg in container.get("args") or []:
        if arg.startswith("--") and "=" in arg:
            flag, value = arg[2:].split("=", 1)
            flags.setdefault(flag, []).append(value)
    for env in container.get("env") or []:
        if env.get("name", "").startswith("CREDLET_") and "value" in env:
            flag = env["name"][len("CREDLET_") :].lower().replace("_", "-")
            flags.setdefault(flag, []).append(env["value"])
    return flags


def consistency(objects: list[dict[str, Any]]) -> list[str]:
    """Cross-object checks the schemas cannot make."""
    errors: list[str] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        meta = obj.get("metadata") or {}
        key = (obj["kind"], meta.get("namespace", ""), meta.get("name", ""))
        if key in seen:
            errors.append(f"{name_of(obj)} appears twice")
        seen.add(key)
        by_kind.setdefault(obj["kind"], []).append(obj)

    drivers = by_kind.get("CSIDriver", [])
    agents = [d for d in by_kind.get("DaemonSet", []) if d["metadata"]["name"] == "credlet-agent"]
    cas = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == "credlet-ca"]
    accounts = {
        (sa["metadata"].get("namespace"), sa["metadata"]["name"])
        for sa in by_kind.get("ServiceAccount", [])
    }
    if len(drivers) != 1 or len(agents) != 1:
        return errors + ["expected exactly one CSIDriver and one credlet-agent DaemonSet"]
    driver, agent = drivers[0], agents[0]
    pod = agent["spec"]["template"]["spec"]
    agent_flags = container_flags(pod["containers"][0])
    if len(pod["containers"]) != 1:
        errors.append("the agent pod must have exactly one container")

    audiences = [t.get("audience") for t in driver["spec"].get("tokenRequests") or []]
    agent_audience = agent_flags.get("token-audience", ["credlet-ca"])[0]
    if agent_audience not in audiences:
        errors.append(
            f"CSIDriver tokenRequests audiences {audiences} lack the agent's {agent_audience!r}"
        )
    if agent_flags.get("driver-name", ["csi.credlet.io"])[0] != driver["metadata"]["name"]:
        errors.append("the agent's driver name differs from the CSIDriver's name")
    projected = [
        source["serviceAccountToken"]["audience"]
        for volume in pod.get("volumes") or []
        for source in (volume.get("projected") or {}).get("sources") or []
        if "serviceAccountToken" in source
    ]
    if projected != [agent_audience]:
        errors.append(f"the agent's projected CA token audience {projected} is not {agent_audience!r}")
    agent_account = (agent["metadata"].get("namespace"), pod.get("serviceAccountName"))
    if agent_account not in accounts:
        errors.append(f"the agent's ServiceAccount {agent_account} is not defined")

    for ca in cas:
        ca_pod = ca["spec"]["template"]["spec"]
        flags = container_flags(ca_pod["containers"][0])
        if flags.get("token-audience", ["credlet-ca"])[0] != agent_audience:
            errors.append("the CA's --token-audience differs from the agent's")
        expected = "/".join(agent_account)
        if flags.get("agent-service-account") != [expected]:
            errors.append(f"the CA's --agent-service-account is not {expected}")
        if (ca["metadata"].get("namespace"), ca_pod.get("serviceAccountName")) not in accounts:
            errors.append("the CA's ServiceAccount is not defined")
        ca_url = agent_flags.get("ca-url", [""])[0]
        host = ca_url.removeprefix("https://").rsplit(":", 1)[0]
        if host.endswith(".svc") and host not in flags.get("server-name", []):
            errors.append(f"the agent dials {host}, which is not one of the CA's --server-name")
        for signer in flags.get("signer-name", []):
            granted = {
                (verb, name)
                for role in by_kind.get("ClusterRole", [])
                for rule in role.get("rules") or []
                if "signers" in rule.get("resources", [])
                for verb in rule.get("verbs", [])
                for name in rule.get("resourceNames", [])
            }
            for verb in ("sign", "attest"):
                if (verb, signer) not in granted:
                    errors.append(f"no ClusterRole grants {verb!r} on signer {signer!r}")
    return errors


def workload_shape(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What must agree between two renderings of a workload: each
    container's arguments and environment, and the pod's volumes."""
    pod = obj["spec"]["template"]["spec"]
    containers = tuple(
        (
            c["name"],
            tuple(c.get("args") or []),
            tuple(sorted(yaml.safe_dump(e, sort_keys=True) for e in c.get("env") or [])),
            tuple(sorted(yaml.safe_dump(m, sort_keys=True) for m in c.get("volumeMounts") or [])),
        )
        for c in pod["containers"]
    )
    volumes = tuple(sorted(yaml.safe_dump(v, sort_keys=True) for v in pod.get("volumes") or []))
    return containers, volumes


def same_objects(reference: list[dict[str, Any]], docs: list[dict[str, Any]], label: str) -> list[str]:
    """Differences between an install and the overlay `label` renders."""
    key = lambda o: (o["kind"], (o.get("metadata") or {}).get("namespace", ""), o["metadata"]["name"])
    want = {key(o): o for o in reference}
    have = {key(o): o for o in docs}
    errors = [f"lacks {k[0]} {k[1]}/{k[2]} of overlay {label}" for k in sorted(set(want) - set(have))]
    errors += [f"has {k[0]} {k[1]}/{k[2]}, which overlay {label} does not" for k in sorted(set(have) - set(want))]
    for k in sorted(set(want) & set(have)):
        if k[0] in ("DaemonSet", "Deployment") and workload_shape(want[k]) != workload_shape(have[k]):
            errors.append(f"{k[0]} {k[2]}: containers or volumes differ from overlay {label}")
        if k[0] in ("ClusterRole", "Role") and want[k].get("rules") != have[k].get("rules"):
            errors.append(f"{k[0]} {k[2]}: rules differ from overlay {label}")
    return errors


def check_documents(label: str, text: str) -> tuple[int, list[str]]:
    objects = [doc for doc in yaml.safe_load_all(text) if doc]
    errors = []
    for obj in objects:
        problem = validate_object(obj)
        if problem:
            errors.append(f"{label}: {name_of(obj) if isinstance(obj, dict) else obj!r}: {problem}")
    return len(objects), errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploy", type=pathlib.Path, default=pathlib.Path(__file__).parent)
    parser.add_argument(
        "--manifests",
        type=pathlib.Path,
        action="append",
        default=[],
        help="plain manifest files or directories to validate too",
    )
    parser.add_argument(
        "--overlay",
        type=pathlib.Path,
        action="append",
        default=[],
        help="another kustomization to render and validate",
    )
    parser.add_argument(
        "--rendered",
        type=pathlib.Path,
        action="append",
        default=[],
        help="an install rendered elsewhere (helm template): schemas and cross-object checks",
    )
    parser.add_argument(
        "--same-as",
        metavar="OVERLAY",
        help="every --rendered install must hold the objects this overlay renders (kind, namespace, name), "
        "the same container arguments and environment, and the same volumes",
    )
    parser.add_argument("--out", type=pathlib.Path, help="write each rendered overlay here")
    args = parser.parse_args()

    kustomize = Kustomize()
    print(f"kustomize {kustomize.version()}; Kubernetes {KUBERNETES_VERSION} schemas, strict")
    overlays = sorted(p for p in (args.deploy / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    if not overlays:
        print("no overlays found", file=sys.stderr)
        return 1
    overlays += args.overlay
    failures: list[str] = []
    passed = 0
    reference: list[dict[str, Any]] | None = None
    for overlay in overlays:
        label = overlay.name if overlay.parent.resolve() == (args.deploy / "overlays").resolve() else str(overlay)
        try:
            rendered = kustomize.build(overlay.resolve())
        except RuntimeError as error:
            failures.append(str(error))
            continue
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{overlay.name}.yaml").write_text(rendered)
        if overlay.name == args.same_as:
            reference = [doc for doc in yaml.safe_load_all(rendered) if doc]
        count, errors = check_documents(f"overlay {label}", rendered)
        errors += [
            f"overlay {label}: {e}"
            for e in consistency([doc for doc in yaml.safe_load_all(rendered) if doc])
        ]
        failures += errors
        print(f"overlay {label}: {count} objects, {'ok' if not errors else 'FAILED'}")
        passed += 0 if errors else 1

    if args.same_as and reference is None:
        print(f"--same-as: no overlay {args.same_as!r}", file=sys.stderr)
        return 1
    for path in args.rendered:
        rendered = path.read_text()
        docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
        count, errors = check_documents(str(path), rendered)
        errors += [f"{path}: {e}" for e in consistency(docs)]
        if reference is not None:
            errors += [f"{path}: {e}" for e in same_objects(reference, docs, args.same_as)]
        failures += errors
        print(f"{path}: {count} objects, {'ok' if not errors else 'FAILED'}")
        passed += 0 if errors else 1

    files: list[pathlib.Path] = []
    for item in args.manifests:
        if not item.exists():
            print(f"{item}: no such file or directory", file=sys.stderr)
            return 1
        files += sorted(item.glob("*.yaml")) if item.is_dir() else [item]
    for path in files:
        count, errors = check_documents(str(path), path.read_text())
        failures += errors
        print(f"{path}: {count} objects, {'ok' if not errors else 'FAILED'}")
        passed += 0 if errors else 1

    for failure in failures:
        print(f"ERROR {failure}", file=sys.stderr)
    checked = len(overlays) + len(args.rendered) + len(files)
    print(f"manifests: {passed} passed, {checked - passed} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
