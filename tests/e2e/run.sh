#!/usr/bin/env bash
# End-to-end test of credlet on a kind cluster (Kubernetes 1.35):
#
#   1. a CSI volume gets a valid certificate, and it rotates;
#   2. two pods complete a mutual-TLS handshake with their certificates;
#   3. a `podCertificate` projected volume is signed by credlet's signer;
#   4. a pod without pull credentials cannot start from a private image that
#      another pod pulled; a pod with credentials can.
#
# Needs: docker (a running engine), kind, kubectl, openssl. Not part of
# .ci/run (no container engine there). Usage:
#
#   tests/e2e/run.sh              # build, create the cluster, test, delete it
#   CREDLET_E2E_KEEP=1 tests/e2e/run.sh   # keep cluster and registry afterwards
#
# Environment: KIND_NODE_IMAGE (default kindest/node:v1.35.0),
# CREDLET_E2E_CLUSTER (default credlet-e2e), CREDLET_E2E_KEEP.
#
# Bootstrap order of the image guard: the kubelet needs its CRI socket
# before any pod can start, so the guard cannot be a pod. The cluster is
# created with the kubelet on containerd; then each node gets the credlet
# binary and deploy/node/credlet-image-guard.service, the unit is started,
# and only then is the kubelet pointed at the guard's socket and restarted
# (deploy/node/README.md describes the same order for real nodes).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cluster="${CREDLET_E2E_CLUSTER:-credlet-e2e}"
node_image="${KIND_NODE_IMAGE:-kindest/node:v1.35.0}"
image="credlet:e2e"
tools_image="credlet-e2e-tools:1"
registry="credlet-registry"           # container name, on kind's docker network
registry_host_port="127.0.0.1:5001"   # the same registry, from this host
registry_user="e2e"
registry_password="e2e-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
guard_socket="/run/credlet-image-guard/cri.sock"
namespace="credlet-e2e"
signer="credlet.io/pods"
work="$(mktemp -d)"
failures=0
passes=0

log() { printf '\n== %s\n' "$*"; }
pass() { printf 'PASS %s\n' "$*"; passes=$((passes + 1)); }
fail() { printf 'FAIL %s\n' "$*"; failures=$((failures + 1)); }
die() { printf 'FATAL %s\n' "$*" >&2; exit 1; }

cleanup() {
    local status=$?
    if [[ "${CREDLET_E2E_KEEP:-0}" != "1" ]]; then
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
        docker rm -f "$registry" >/dev/null 2>&1 || true
    else
        echo "kept: kind cluster $cluster, registry container $registry"
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

for tool in docker kind kubectl openssl; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
docker info >/dev/null 2>&1 || die "no Docker engine reachable"

k() { kubectl --context "kind-$cluster" "$@"; }

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
    local timeout=$1
    shift
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 2
    done
}

log "images: credlet ($image) and the test tools ($tools_image)"
docker build -t "$image" "$root"
docker build -t "$tools_image" - <<'EOF'
FROM docker.io/library/alpine:3.20
RUN apk add --no-cache openssl
EOF

log "kind cluster $cluster ($node_image)"
kind create cluster --name "$cluster" --image "$node_image" \
    --config "$here/kind-config.yaml" --wait 180s
mapfile -t nodes < <(kind get nodes --name "$cluster")
worker=""
for node in "${nodes[@]}"; do
    [[ "$node" == *worker* ]] && worker="$node" && break
done
[[ -n "$worker" ]] || die "no worker node"
kind load docker-image --name "$cluster" "$image" "$tools_image"

log "private registry: TLS + htpasswd, on kind's network"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=credlet e2e registry CA" -keyout "$work/registry-ca.key" \
    -out "$work/registry-ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$registry" -keyout "$work/registry.key" -out "$work/registry.csr" 2>/dev/null
openssl x509 -req -in "$work/registry.csr" -CA "$work/registry-ca.crt" \
    -CAkey "$work/registry-ca.key" -CAcreateserial -days 2 -out "$work/registry.crt" \
    -extfile <(printf 'subjectAltName=DNS:%s,IP:127.0.0.1\n' "$registry") 2>/dev/null
mkdir -p "$work/auth"
docker run --rm --entrypoint htpasswd docker.io/library/httpd:2 \
    -Bbn "$registry_user" "$registry_password" >"$work/auth/htpasswd"
docker rm -f "$registry" >/dev/null 2>&1 || true
docker run -d --name "$registry" --network kind -p "$registry_host_port:5000" \
    -v "$work:/certs:ro" -v "$work/auth:/auth:ro" \
    -e REGISTRY_HTTP_TLS_CERTIFICATE=/certs/registry.crt \
    -e REGISTRY_HTTP_TLS_KEY=/certs/registry.key \
    -e REGISTRY_AUTH=htpasswd -e REGISTRY_AUTH_HTPASSWD_REALM=credlet-e2e \
    -e REGISTRY_AUTH_HTPASSWD_PATH=/auth/htpasswd \
    docker.io/library/registry:2 >/dev/null
# A private image of its own digest, never loaded into the nodes: the only
# way onto a node is a pull through the image guard.
docker build -t "$registry_host_port/e2e/private:1" - <<EOF
FROM $tools_image
RUN echo "private $(date +%s%N)" >/private
EOF
# Docker treats 127.0.0.0/8 registries as insecure (no CA needed to push).
registry_up() { openssl s_client -connect "$registry_host_port" </dev/null; }
wait_for 30 registry_up || die "the registry did not come up"
docker login "$registry_host_port" -u "$registry_user" --password-stdin <<<"$registry_password" >/dev/null
docker push "$registry_host_port/e2e/private:1" >/dev/null

cat >"$work/hosts.toml" <<EOF
server = "https://$registry:5000"

[host."https://$registry:5000"]
  ca = "/etc/containerd/certs.d/$registry:5000/ca.crt"
EOF
cat >"$work/image-guard.env" <<'EOF'
CREDLET_REGISTRY_CA=/etc/credlet/registry-ca.crt
EOF

log "image guard on every node, then the kubelet through it"
container=$(docker create "$image")
docker cp "$container:/usr/local/bin/credlet" "$work/credlet"
docker rm "$container" >/dev/null
for node in "${nodes[@]}"; do
    docker exec "$node" mkdir -p "/etc/containerd/certs.d/$registry:5000" /etc/credlet
    docker cp "$work/hosts.toml" "$node:/etc/containerd/certs.d/$registry:5000/hosts.toml"
    docker cp "$work/registry-ca.crt" "$node:/etc/containerd/certs.d/$registry:5000/ca.crt"
    docker cp "$work/registry-ca.crt" "$node:/etc/credlet/registry-ca.crt"
    docker cp "$work/image-guard.env" "$node:/etc/credlet/image-guard.env"
    docker cp "$work/credlet" "$node:/usr/local/bin/credlet"
    docker cp "$root/deploy/node/credlet-image-guard.service" \
        "$node:/etc/systemd/system/credlet-image-guard.service"
    docker exec "$node" systemctl daemon-reload
    docker exec "$node" systemctl enable --now credlet-image-guard.service
    wait_for 60 docker exec "$node" test -S "$guard_socket" ||
        die "$node: the image guard did not create $guard_socket: $(docker exec "$node" journalctl -u credlet-image-guard --no-pager -n 30)"
    # deploy/node/kubelet-config-cri-proxy.yaml, applied to kind's kubelet:
    # the two fields in the config file, and no flag overriding them.
    docker exec "$node" sh -c "
        set -e
        sed -i '/^containerRuntimeEndpoint:/d; /^imageServiceEndpoint:/d' /var/lib/kubelet/config.yaml
        printf 'containerRuntimeEndpoint: unix://%s\nimageServiceEndpoint: unix://%s\n' '$guard_socket' '$guard_socket' >>/var/lib/kubelet/config.yaml
        if [ -f /var/lib/kubelet/kubeadm-flags.env ]; then
            sed -i 's# *--container-runtime-endpoint=[^ \"]*##; s# *--image-service-endpoint=[^ \"]*##' /var/lib/kubelet/kubeadm-flags.env
        fi
        systemctl restart kubelet"
done
k wait --for=condition=Ready node --all --timeout=180s
for node in "${nodes[@]}"; do
    if docker exec "$node" crictl --runtime-endpoint "unix://$guard_socket" ps >/dev/null; then
        pass "$node: the kubelet's runtime is reached through the image guard"
    else
        fail "$node: crictl through the image guard"
    fi
done

log "CA key material (Secret) and trust (ConfigMap)"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca.key" 2>/dev/null
openssl req -x509 -key "$work/ca.key" -days 30 -subj "/CN=credlet e2e root CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$work/ca.crt"
k create namespace credlet-system
k -n credlet-system create secret generic credlet-ca-key \
    --from-file=tls.crt="$work/ca.crt" --from-file=tls.key="$work/ca.key"
k -n credlet-system create configmap credlet-ca-trust --from-file=ca.crt="$work/ca.crt"

log "deploy: deploy/overlays/agent-and-ca (through tests/e2e/overlay)"
k apply -k "$here/overlay"
k -n credlet-system rollout status deployment/credlet-ca --timeout=180s
k -n credlet-system rollout status daemonset/credlet-agent --timeout=180s

log "test workloads"
k apply -f "$here/manifests/namespace.yaml"
k -n "$namespace" create secret docker-registry e2e-registry \
    --docker-server="$registry:5000" --docker-username="$registry_user" \
    --docker-password="$registry_password"
k apply -f "$here/manifests/rotating.yaml" -f "$here/manifests/mtls-server.yaml" \
    -f "$here/manifests/podcertificate.yaml"

# --- 1. CSI volume: a valid certificate that rotates ---------------------
in_pod() { k -n "$namespace" exec "$1" -- sh -c "$2"; }
if k -n "$namespace" wait --for=condition=Ready pod/rotating --timeout=180s; then
    in_pod rotating "openssl x509 -in /tls/tls.crt -noout -serial -ext subjectAltName" >"$work/first.txt" || true
    if in_pod rotating 'openssl verify -CAfile /tls/ca.crt /tls/tls.crt' |
        grep -q ': OK' &&
        grep -q "URI:spiffe://cluster.local/ns/$namespace/sa/default" "$work/first.txt" &&
        grep -q "DNS:rotating.$namespace.svc" "$work/first.txt"; then
        pass "CSI volume: certificate chains to the CA, SPIFFE ID and DNS name as asked"
    else
        fail "CSI volume: certificate contents ($(cat "$work/first.txt"))"
    fi
    # Private key 0400 on a nodev,nosuid,noexec tmpfs, matching the certificate.
    mode=$(in_pod rotating "stat -L -c %a /tls/tls.key" || true)
    mount_opts=$(in_pod rotating "grep ' /tls ' /proc/mounts" || true)
    key_pub=$(in_pod rotating "openssl pkey -in /tls/tls.key -pubout" || true)
    cert_pub=$(in_pod rotating "openssl x509 -in /tls/tls.crt -noout -pubkey" || true)
    if [[ "$mode" == "400" && "$mount_opts" == *tmpfs* && "$mount_opts" == *nosuid* &&
        "$mount_opts" == *nodev* && "$mount_opts" == *noexec* && "$key_pub" == "$cert_pub" ]]; then
        pass "CSI volume: key 0400 on a nodev,nosuid,noexec tmpfs, matching the certificate"
    else
        fail "CSI volume: key mode $mode, mount '$mount_opts', key matches: $([[ "$key_pub" == "$cert_pub" ]] && echo yes || echo no)"
    fi
    first_serial=$(grep -o 'serial=.*' "$work/first.txt")
    rotated() {
        [[ "$(in_pod rotating 'openssl x509 -in /tls/tls.crt -noout -serial')" != "$first_serial" ]]
    }
    if wait_for 180 rotated; then
        pass "CSI volume: the two-minute certificate was renewed in place"
    else
        fail "CSI volume: no renewal within 180 s"
    fi
else
    fail "CSI volume: pod rotating not ready"
    k -n "$namespace" describe pod rotating | tail -20
fi

# --- 2. mutual TLS between two pods ---------------------------------------
if k -n "$namespace" wait --for=condition=Ready pod/mtls-server --timeout=180s; then
    k apply -f "$here/manifests/mtls-client.yaml"
    client_done() {
        local phase
        phase=$(k -n "$namespace" get pod mtls-client -o jsonpath='{.status.phase}')
        [[ "$phase" == Succeeded || "$phase" == Failed ]]
    }
    wait_for 180 client_done || true
    k -n "$namespace" logs mtls-client >"$work/mtls.log" 2>&1 || true
    if grep -q 'Verification: OK' "$work/mtls.log" && grep -q 'telderc' "$work/mtls.log"; then
        pass "mTLS: handshake with both certificates verified, data exchanged"
    else
        fail "mTLS: client log: $(cat "$work/mtls.log")"
    fi
else
    fail "mTLS: server pod not ready"
fi

# --- 3. podCertificate projected volume, signed by credlet's signer -------
if k -n "$namespace" wait --for=condition=Ready pod/podcertificate --timeout=180s; then
    # The leaf (first certificate of the key-then-chain bundle) verifies
    # against the projected ClusterTrustBundle and against the CA created
    # above (sent on stdin).
    check='cat >/tmp/ca.crt &&
        openssl x509 -in /identity/credentialbundle.pem -out /tmp/leaf.pem &&
        openssl verify -CAfile /identity/ca.pem -untrusted /identity/credentialbundle.pem /tmp/leaf.pem &&
        openssl verify -CAfile /tmp/ca.crt -untrusted /identity/credentialbundle.pem /tmp/leaf.pem'
    if k -n "$namespace" exec -i podcertificate -- sh -c "$check" <"$work/ca.crt" |
        grep -c ': OK$' | grep -qx 2; then
        pass "podCertificate: issued by credlet's CA, trust bundle from the ClusterTrustBundle"
    else
        fail "podCertificate: chain does not verify"
    fi
    issued=$(k get podcertificaterequests.v1beta1.certificates.k8s.io -n "$namespace" \
        -o jsonpath='{range .items[*]}{.spec.signerName} {.status.conditions[?(@.type=="Issued")].status}{"\n"}{end}')
    if grep -q "^$signer True" <<<"$issued"; then
        pass "podCertificate: PodCertificateRequest Issued by $signer"
    else
        fail "podCertificate: requests: $issued"
    fi
    if k get clustertrustbundles.v1beta1.certificates.k8s.io \
        "${signer//\//:}:credlet" >/dev/null 2>&1; then
        pass "podCertificate: ClusterTrustBundle ${signer//\//:}:credlet published"
    else
        fail "podCertificate: no ClusterTrustBundle for $signer"
    fi
else
    fail "podCertificate: pod not ready"
    k -n "$namespace" describe pod podcertificate | tail -20
fi

# --- 4. cached private images need the pod's own credentials --------------
# All three on one worker: E2E_NODE in the manifests.
apply_on_worker() { sed "s/E2E_NODE/$worker/" "$here/manifests/$1.yaml" | k apply -f -; }
apply_on_worker private-first
if k -n "$namespace" wait --for=condition=Ready pod/private-first --timeout=180s; then
    pass "private image: pulled by the pod with credentials"
    apply_on_worker private-without-credentials
    denied() {
        k -n "$namespace" get events --field-selector \
            "involvedObject.name=private-without-credentials,reason=CachedImageAccessDenied" \
            -o name | grep -q .
    }
    if wait_for 120 denied; then
        pass "private image: pod without credentials refused the cached image (CachedImageAccessDenied)"
    else
        fail "private image: no denial Event for the pod without credentials"
    fi
    phase=$(k -n "$namespace" get pod private-without-credentials -o jsonpath='{.status.phase}')
    started=$(k -n "$namespace" get pod private-without-credentials \
        -o jsonpath='{.status.containerStatuses[0].state.running}')
    if [[ "$phase" == Pending && -z "$started" ]]; then
        pass "private image: the pod without credentials is not running"
    else
        fail "private image: pod without credentials is $phase (running: $started)"
    fi
    apply_on_worker private-second
    if k -n "$namespace" wait --for=condition=Ready pod/private-second --timeout=120s; then
        pass "private image: a second pod with credentials starts from the cache"
    else
        fail "private image: second pod with credentials did not start"
    fi
    if docker exec "$worker" journalctl -u credlet-image-guard --no-pager |
        grep -q 'private-without-credentials'; then
        pass "private image: the decision is in the image guard's log"
    else
        fail "private image: no log line naming the refused pod"
    fi
else
    fail "private image: the pod with credentials did not start"
    k -n "$namespace" describe pod private-first | tail -20
fi

log "logs (last lines)"
k -n credlet-system logs daemonset/credlet-agent --tail=20 || true
k -n credlet-system logs deployment/credlet-ca --tail=20 || true

echo
echo "e2e: $passes passed, $failures failed"
((failures == 0))
