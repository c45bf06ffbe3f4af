#!/usr/bin/env bash
# Builds the real cluster programs from their released Go modules at the
# versions pinned in versions.env and caches them by version under
# ${CREDLET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/credlet}/bin/<name>-<version>/.
# A second run with the same versions builds nothing. Prints the directory of
# each program set it made or found.
#
#   build.sh [kubernetes|etcd|containerd|runc|cri-tools|helm ...]   (default: all)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
KUBERNETES_VERSION=${CREDLET_K8S_VERSION:-$KUBERNETES_VERSION}

cache=${CREDLET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/credlet}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }

log() { printf 'k8s/build.sh: %s\n' "$*" >&2; }

# A throwaway module that requires $1 at $2, in the cache's source area.
# Extra lines (replace directives) come on stdin.
new_module() {
  local dir=$1
  rm -rf "$dir"
  mkdir -p "$dir"
  {
    echo "module credlet.invalid/build"
    echo
    echo "go 1.25"
    cat
  } >"$dir/go.mod"
}

# Installs into $out atomically: builds into $out.tmp, renames at the end, so
# an interrupted build never leaves a cache entry that looks complete.
finish() {
  local out=$1
  rm -rf "$out"
  mv "$out.tmp" "$out"
  log "ready: $out"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION out="$cache/bin/kubernetes-$KUBERNETES_VERSION"
  if [[ -x $out/kubectl ]]; then echo "$out"; return; fi
  log "building Kubernetes $v (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl)"
  local src="$cache/src/kubernetes-$v" staging=v0.${v#v1.}
  go mod download -json "k8s.io/kubernetes@$v" >/dev/null
  local modfile
  modfile=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
  # k8s.io/kubernetes names its staging modules v0.0.0 and replaces them with
  # directories; a dependent module pins each to the matching v0.X.Y release.
  grep -oE '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$modfile" | awk -v s="$staging" '
    BEGIN { print "replace (" } { printf "\t%s => %s %s\n", $1, $1, s } END { print ")" }' |
    new_module "$src"
  (
    cd "$src"
    local pkgs=(cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl)
    local p get=()
    for p in "${pkgs[@]}"; do get+=("k8s.io/kubernetes/$p@$v"); done
    go get "${get[@]}" >/dev/null
    local minor=${v#v1.}
    minor=${minor%%.*}
    local ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
      ld+=" -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    mkdir -p "$out.tmp"
    for p in "${pkgs[@]}"; do
      log "go build $p"
      go build -trimpath -ldflags "$ld" -o "$out.tmp/${p#cmd/}" "k8s.io/kubernetes/$p"
    done
  )
  finish "$out"
  echo "$out"
}

build_etcd() {
  local v=$ETCD_VERSION out="$cache/bin/etcd-$ETCD_VERSION"
  if [[ -x $out/etcd ]]; then echo "$out"; return; fi
  log "building etcd $v"
  local src="$cache/src/etcd-$v"
  new_module "$src" </dev/null
  (
    cd "$src"
    go get "go.etcd.io/etcd/server/v3@$v" >/dev/null
    mkdir -p "$out.tmp"
    go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  )
  finish "$out"
  echo "$out"
}

build_containerd() {
  local v=$CONTAINERD_VERSION out="$cache/bin/containerd-$CONTAINERD_VERSION"
  if [[ -x $out/containerd ]]; then echo "$out"; return; fi
  log "building containerd $v"
  local src="$cache/src/containerd-$v" m=github.com/containerd/containerd/v2
  new_module "$src" </dev/null
  (
    cd "$src"
    go get "$m/cmd/containerd@$v" "$m/cmd/containerd-shim-runc-v2@$v" "$m/cmd/ctr@$v" >/dev/null
    # btrfs needs its C headers; the tests use the overlayfs snapshotter.
    local ld="-s -w -X $m/version.Version=$v"
    mkdir -p "$out.tmp"
    go build -trimpath -tags no_btrfs -ldflags "$ld" -o "$out.tmp/containerd" "$m/cmd/containerd"
    go build -trimpath -tags no_btrfs -ldflags "$ld" -o "$out.tmp/ctr" "$m/cmd/ctr"
    CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$out.tmp/containerd-shim-runc-v2" "$m/cmd/containerd-shim-runc-v2"
  )
  finish "$out"
  echo "$out"
}

build_runc() {
  local v=$RUNC_VERSION out="$cache/bin/runc-$RUNC_VERSION"
  if [[ -x $out/runc ]]; then echo "$out"; return; fi
  log "building runc $v"
  local src="$cache/src/runc-$v" m=github.com/opencontainers/runc
  new_module "$src" </dev/null
  (
    cd "$src"
    go get "$m@$v" >/dev/null
    mkdir -p "$out.tmp"
    # seccomp needs libseccomp-dev (install-deps.sh); cgo for nsenter.
    CGO_ENABLED=1 go build -trimpath -tags seccomp -ldflags "-s -w -X main.version=${v#v}" -o "$out.tmp/runc" "$m"
  )
  finish "$out"
  echo "$out"
}

build_cri_tools() {
  local v=$CRI_TOOLS_VERSION out="$cache/bin/cri-tools-$CRI_TOOLS_VERSION"
  if [[ -x $out/critest ]]; then echo "$out"; return; fi
  log "building cri-tools $v (critest, crictl)"
  local src="$cache/src/cri-tools-$v" m=sigs.k8s.io/cri-tools
  new_module "$src" </dev/null
  (
    cd "$src"
    go get "$m/cmd/critest@$v" "$m/cmd/crictl@$v" >/dev/null
    local ld="-s -w -X $m/pkg/version.Version=$v"
    mkdir -p "$out.tmp"
    go test -c -trimpath -ldflags "$ld" -o "$out.tmp/critest" "$m/cmd/critest"
    go build -trimpath -ldflags "$ld" -o "$out.tmp/crictl" "$m/cmd/crictl"
  )
  finish "$out"
  echo "$out"
}

build_helm() {
  local v=$HELM_VERSION out="$cache/bin/helm-$HELM_VERSION"
  if [[ -x $out/helm ]]; then echo "$out"; return; fi
  log "building helm $v"
  local src="$cache/src/helm-$v" m=helm.sh/helm/v4
  new_module "$src" </dev/null
  (
    cd "$src"
    go get "$m/cmd/helm@$v" >/dev/null
    mkdir -p "$out.tmp"
    go build -trimpath -ldflags "-s -w -X $m/internal/version.version=$v" -o "$out.tmp/helm" "$m/cmd/helm"
  )
  finish "$out"
  echo "$out"
}

targets=("$@")
((${#targets[@]})) || targets=(etcd containerd runc kubernetes cri-tools helm)
for t in "${targets[@]}"; do
  case $t in
    kubernetes) build_kubernetes ;;
    etcd) build_etcd ;;
    containerd) build_containerd ;;
    runc) build_runc ;;
    cri-tools) build_cri_tools ;;
    helm) build_helm ;;
    *) echo "build.sh: unknown program '$t'" >&2; exit 64 ;;
  esac
done
