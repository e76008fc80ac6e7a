#!/usr/bin/env bash
# Try authrealm on a local kind cluster: creates the cluster, builds and loads the operator and
# sidecar images, runs a 6-node Redis Cluster in it, installs the Helm chart, applies the demo
# AuthRealm and the example login app, then shows 401 -> login -> 200 -> logout -> 401 with curl.
#
#   hack/kind-up.sh            # everything; leaves the cluster running
#   hack/kind-up.sh --down     # delete the cluster
#
# Needs: docker (a running engine), kind, kubectl, helm (v3), curl, python3, openssl.
# Environment:
#   KIND_CLUSTER=authrealm                  cluster name
#   KIND_NODE_IMAGE=kindest/node:v1.33.1    node image (Kubernetes >= 1.29 for native sidecars)
#   AUTHREALM_TAG=dev                       tag of the locally built images
#   DEMO_PORT=18080                         local port of the port-forward to the login app
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-authrealm}
NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.33.1}
TAG=${AUTHREALM_TAG:-dev}
PORT=${DEMO_PORT:-18080}
SYSTEM_NS=authrealm-system
DEMO_NS=authrealm-demo
KCTX="kind-${CLUSTER}"
# The example login app's demo user (examples/login-app/users.json).
DEMO_USER=alice
DEMO_PASSWORD=demo-only-password

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'kind-up: %s\n' "$*" >&2; exit 1; }
k() { kubectl --context "$KCTX" "$@"; }

if [[ ${1:-} == --down ]]; then
    kind delete cluster --name "$CLUSTER"
    exit 0
elif [[ $# -gt 0 ]]; then
    die "unknown argument '$1' (use --down to delete the cluster)"
fi

for cmd in docker kind kubectl helm curl python3 openssl; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is not installed"
done
docker info >/dev/null 2>&1 || die "the docker engine is not running (kind needs it)"

step "kind cluster ${CLUSTER} (${NODE_IMAGE})"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "reusing the existing cluster"
else
    kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --wait 120s
fi

step "build and load images (authrealm-operator:${TAG}, authrealm-sidecar:${TAG})"
docker build -f images/operator.Dockerfile -t "authrealm-operator:${TAG}" .
docker build -f images/sidecar.Dockerfile -t "authrealm-sidecar:${TAG}" .
kind load docker-image --name "$CLUSTER" "authrealm-operator:${TAG}" "authrealm-sidecar:${TAG}"

step "namespace ${DEMO_NS}, Redis password"
k create namespace "$DEMO_NS" --dry-run=client -o yaml | k apply -f -
if ! k -n "$DEMO_NS" get secret redis-auth >/dev/null 2>&1; then
    k -n "$DEMO_NS" create secret generic redis-auth --from-literal=password="$(openssl rand -hex 24)"
fi
# The operator uses a Secret for its Redis check only when its owner opted in with this label.
k -n "$DEMO_NS" label --overwrite secret redis-auth authrealm.dev/redis-credentials=true

step "Redis Cluster (StatefulSet of 6 + cluster-create Job)"
k -n "$DEMO_NS" apply -f hack/kind/redis-cluster.yaml
k -n "$DEMO_NS" rollout status statefulset/redis-cluster --timeout=300s
k -n "$DEMO_NS" wait --for=condition=complete job/redis-cluster-create --timeout=300s

step "authrealm chart into ${SYSTEM_NS}"
helm --kube-context "$KCTX" upgrade --install authrealm charts/authrealm \
    --namespace "$SYSTEM_NS" --create-namespace \
    --set operator.image.repository=authrealm-operator \
    --set operator.image.tag="$TAG" \
    --set operator.image.pullPolicy=Never \
    --set sidecar.image.repository=authrealm-sidecar \
    --set sidecar.image.tag="$TAG" \
    --set sidecar.image.pullPolicy=Never \
    --wait --timeout 300s

step "AuthRealm demo"
k -n "$DEMO_NS" apply -f hack/kind/demo-realm.yaml
k -n "$DEMO_NS" wait --for=condition=Ready authrealm/demo --timeout=180s
k -n "$DEMO_NS" get authrealm demo

step "login app (examples/login-app) with the injected sidecar"
k -n "$DEMO_NS" create configmap login-app \
    --from-file=app.py=examples/login-app/app.py \
    --from-file=users.json=examples/login-app/users.json \
    --dry-run=client -o yaml | k apply -f -
k -n "$DEMO_NS" apply -f hack/kind/login-app.yaml
k -n "$DEMO_NS" rollout status deployment/login-app --timeout=300s
pod=$(k -n "$DEMO_NS" get pod -l app.kubernetes.io/name=login-app -o jsonpath='{.items[0].metadata.name}')
echo "pod ${pod}: init containers $(k -n "$DEMO_NS" get pod "$pod" -o jsonpath='{.spec.initContainers[*].name}')"

step "port-forward svc/login-app -> 127.0.0.1:${PORT}"
k -n "$DEMO_NS" port-forward svc/login-app "${PORT}:80" >/dev/null 2>&1 &
pf=$!
trap 'kill "$pf" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
    curl -s -o /dev/null "http://127.0.0.1:${PORT}/me" && break
    sleep 0.2
done

URL="http://127.0.0.1:${PORT}"
expect() { # expect STATUS DESCRIPTION curl-args...
    local want=$1 what=$2 got
    shift 2
    got=$(curl -s -o /tmp/authrealm-kind-body -w '%{http_code}' "$@")
    printf '%-48s %s (expected %s)\n' "$what" "$got" "$want"
    [[ $got == "$want" ]] || { cat /tmp/authrealm-kind-body >&2; die "unexpected status"; }
}

step "walk-through"
expect 401 "GET /me without a token" "$URL/me"
token=$(curl -s -H 'Content-Type: application/json' \
    -d "{\"username\":\"${DEMO_USER}\",\"password\":\"${DEMO_PASSWORD}\"}" "$URL/login" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
echo "POST /login                                      token ${token:0:24}..."
expect 200 "GET /me with the token" -H "Authorization: Bearer ${token}" "$URL/me"
expect 200 "POST /logout" -X POST -H "Authorization: Bearer ${token}" "$URL/logout"
expect 401 "GET /me with the same token after logout" -H "Authorization: Bearer ${token}" "$URL/me"

cat <<EOF

Done. Try it yourself (keep a port-forward running in another terminal):

    kubectl --context ${KCTX} -n ${DEMO_NS} port-forward svc/login-app ${PORT}:80

    curl -i ${URL}/me                                             # 401
    TOKEN=\$(curl -s -H 'Content-Type: application/json' \\
        -d '{"username":"${DEMO_USER}","password":"${DEMO_PASSWORD}"}' ${URL}/login |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
    curl -i -H "Authorization: Bearer \$TOKEN" ${URL}/me           # 200, X-Auth-* identity
    curl -i -X POST -H "Authorization: Bearer \$TOKEN" ${URL}/logout
    curl -i -H "Authorization: Bearer \$TOKEN" ${URL}/me           # 401: revoked at once

    kubectl --context ${KCTX} -n ${DEMO_NS} describe authrealm demo   # keys, conditions, injection events
    hack/kind-up.sh --down                                           # delete the cluster
EOF
