#!/usr/bin/env bash
# Installs the real components that credlet-test-util drives (Debian packages only).
# Idempotent: skips apt entirely when everything is present. Needs root.
set -euo pipefail

pkgs=(
  docker-registry   # CNCF distribution 2.8 (binary: docker-registry)
  apache2-utils     # htpasswd -B (bcrypt) for the registry's htpasswd file
  containerd        # containerd 1.6 with the CRI plugin, ctr, containerd-shim-runc-v2
  runc              # OCI runtime behind the runc v2 shim
  skopeo            # pushes the OCI layouts the harness writes to the test registries
  gcc               # compiles the static pause binary (cc -static)
  libc6-dev         # libc.a for that static build
  busybox-static    # the shell image of the test cluster (sh, cat, nc, ...)
  iproute2          # the test cluster's CNI plugin (ip, in each pod's namespace)
  util-linux        # nsenter, mount
  libseccomp-dev    # runc 1.4 built with seccomp (test-util/k8s/build.sh)
)

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No recommends: keeps docker.io and friends out.
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# On a machine with systemd the packages start their own docker-registry
# (port 5000) and containerd (/run/containerd). The harness runs private
# instances and needs neither; stop them. (No systemd here: nothing runs.)
for svc in docker-registry containerd; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

for bin in docker-registry htpasswd containerd containerd-shim-runc-v2 ctr runc skopeo cc; do
  command -v "$bin" >/dev/null || { echo "install-deps: $bin missing after install" >&2; exit 1; }
done
echo "install-deps: ok"

# The real cluster's programs (kube-apiserver, kubelet, etcd, containerd 2,
# runc), cri-tools' critest and helm, built from their Go modules at the versions
# in k8s/versions.env and cached by version outside the clone; nothing to do
# when cached.
command -v go >/dev/null || { echo "install-deps: go is missing (Go 1.26 builds the cluster programs)" >&2; exit 1; }
bash "$(dirname "$0")/k8s/build.sh" etcd containerd runc kubernetes cri-tools helm >/dev/null
echo "install-deps: cluster programs ok"
