#!/usr/bin/env bash
# The whole system on a real one-node Kubernetes on this machine (root, Linux; hack/node.sh):
# the chart's operator, a Redis Cluster as pods, an AuthRealm, and the example login app whose
# pod gets the sidecar injected — then the login story through the app's Service.
#
#   hack/up.sh            # build what is missing, bring everything up, tell the story, then stay
#                         # up with a cheat sheet until Ctrl-C (which tears everything down)
#   hack/up.sh --exit     # ... tear down and exit after the story (exit 1 if a step failed)
#   hack/demo.sh          # the quick sidecar-only demo (processes on loopback, no Kubernetes)
#   hack/kind-up.sh       # the same system on a kind cluster (Docker)
#
# First run on a fresh machine: installs packages (hack/install-deps.sh), builds the Kubernetes
# binaries from source (hack/control-plane.sh, hack/node-bins.sh: ~20 min, cached) and the release
# binaries (cargo build --release: ~10 min). Later runs take about a minute. Running it while it is
# already up reuses the node. Ctrl-C at any step leaves nothing running.
#
# Environment: AUTHREALM_BIN_DIR (operator/sidecar binaries to pack; default: the release build),
# and hack/node.sh's (AUTHREALM_CACHE, AUTHREALM_NODE_DIR, …).
set -euo pipefail
cd "$(dirname "$0")/.."

exit_after=0
for arg in "$@"; do
    case "$arg" in
        --exit) exit_after=1 ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "up: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "up: the local node needs root (network namespace, cgroups, mounts); try hack/demo.sh" >&2; exit 1; }

readonly SYSTEM_NS=authrealm-system DEMO_NS=authrealm-demo
readonly DEMO_USER=alice DEMO_PASSWORD=demo-only-password # see examples/login-app/README.md
started=$SECONDS
step() { printf '\n\033[1m==> [%3ss] %s\033[0m\n' "$((SECONDS - started))" "$*" >&2; }

sleeper=
teardown() {
    trap - INT TERM EXIT
    [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null || true
    step "tearing down (hack/node.sh down)"
    bash hack/node.sh down >&2 || true
}
trap teardown EXIT
trap 'exit 130' INT TERM

step "system packages"
bash hack/install-deps.sh >&2

step "Kubernetes binaries (built once from source and cached; minutes the first time)"
AUTHREALM_CONTROL_PLANE_BIN=$(bash hack/control-plane.sh | tail -n 1)
AUTHREALM_NODE_BIN=$(bash hack/node-bins.sh | tail -n 1)
export AUTHREALM_CONTROL_PLANE_BIN AUTHREALM_NODE_BIN
kubectl_bin="$AUTHREALM_NODE_BIN/kubectl"
helm_bin="$AUTHREALM_CONTROL_PLANE_BIN/helm"

if [ -z "${AUTHREALM_BIN_DIR:-}" ]; then
    step "authrealm binaries (cargo build --release)"
    cargo build --release -p authrealm-operator -p authrealm-sidecar >&2
    AUTHREALM_BIN_DIR=${CARGO_TARGET_DIR:-target}/release
fi
export AUTHREALM_BIN_DIR

step "images (packed from the binaries, no registry)"
bash hack/images.sh --no-import >/dev/null

step "the node (hack/node.sh up)"
kubeconfig=$(bash hack/node.sh up | tail -n 1)
bash hack/images.sh >/dev/null # imports into a reused node too
k() { "$kubectl_bin" --kubeconfig "$kubeconfig" "$@"; }

step "chart charts/authrealm into ${SYSTEM_NS} (two operator replicas)"
"$helm_bin" --kubeconfig "$kubeconfig" upgrade --install authrealm charts/authrealm \
    --namespace "$SYSTEM_NS" --create-namespace \
    --set operator.image.repository=localhost/authrealm/authrealm-operator --set operator.image.tag=dev \
    --set operator.image.pullPolicy=Never \
    --set sidecar.image.repository=localhost/authrealm/authrealm-sidecar --set sidecar.image.tag=dev \
    --set sidecar.image.pullPolicy=Never \
    --wait --timeout 180s >&2
k -n "$SYSTEM_NS" get pods

step "Redis Cluster (hack/kind/redis-cluster.yaml) in ${DEMO_NS}, restricted Pod Security"
k create namespace "$DEMO_NS" --dry-run=client -o yaml | k apply -f - >/dev/null
k label --overwrite namespace "$DEMO_NS" pod-security.kubernetes.io/enforce=restricted >/dev/null
if ! k -n "$DEMO_NS" get secret redis-auth >/dev/null 2>&1; then
    k -n "$DEMO_NS" create secret generic redis-auth --from-literal=password="$(openssl rand -hex 24)" >/dev/null
fi
k -n "$DEMO_NS" label --overwrite secret redis-auth authrealm.dev/redis-credentials=true >/dev/null
redis_version=$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')
sed "s|docker.io/library/redis:7.2|localhost/authrealm/redis:${redis_version}|" hack/kind/redis-cluster.yaml | k -n "$DEMO_NS" apply -f - >&2
k -n "$DEMO_NS" rollout status statefulset/redis-cluster --timeout=180s >&2
k -n "$DEMO_NS" wait --for=condition=complete job/redis-cluster-create --timeout=180s >&2

step "AuthRealm demo (hack/kind/demo-realm.yaml)"
k -n "$DEMO_NS" apply -f hack/kind/demo-realm.yaml >&2
k -n "$DEMO_NS" wait --for=condition=Ready authrealm/demo --timeout=120s >&2
k get authrealms -A

step "login app (hack/kind/login-app.yaml): the operator's webhook injects the sidecar"
k -n "$DEMO_NS" create configmap login-app --from-file=app.py=examples/login-app/app.py \
    --from-file=users.json=examples/login-app/users.json --dry-run=client -o yaml | k apply -f - >/dev/null
sed "s|docker.io/library/python:3.12-slim|localhost/authrealm/login-app:dev|" hack/kind/login-app.yaml | k -n "$DEMO_NS" apply -f - >&2
k -n "$DEMO_NS" rollout status deployment/login-app --timeout=120s >&2
k -n "$DEMO_NS" get pods -l app.kubernetes.io/name=login-app \
    -o custom-columns='POD:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,INJECTED_SIDECAR:.spec.initContainers[*].name,APP:.spec.containers[*].name'

url="http://$(k -n "$DEMO_NS" get service login-app -o jsonpath='{.spec.clusterIP}')"
failed=0
expect() { # WANT DESCRIPTION curl-args...
    local want=$1 what=$2 got
    shift 2
    got=$(curl -s -o /tmp/authrealm-up-body -w '%{http_code}' --max-time 10 "$@" || true)
    if [ "$got" = "$want" ]; then mark=ok; else mark="UNEXPECTED"; failed=1; fi
    printf '  %-58s %s (%s)\n' "$what" "$got" "$mark"
}
token() { python3 -c 'import json,sys; print(json.load(open("/tmp/authrealm-up-body"))["access_token"])'; }
login=(-X POST -H 'Content-Type: application/json' -d "{\"username\":\"$DEMO_USER\",\"password\":\"$DEMO_PASSWORD\"}" "$url/login")

step "the story, through the login app's Service ${url} (from this host)"
expect 401 "GET /me without a token" "$url/me"
expect 200 "POST /login as ${DEMO_USER}" "${login[@]}"
t1=$(token)
expect 200 "GET /me with the token (identity from the sidecar)" -H "Authorization: Bearer $t1" "$url/me"
printf '    %s\n' "$(cat /tmp/authrealm-up-body)"
expect 200 "POST /login again (sessionMode: single)" "${login[@]}"
t2=$(token)
expect 401 "GET /me with the first token (superseded)" -H "Authorization: Bearer $t1" "$url/me"
expect 200 "POST /logout with the second token" -X POST -H "Authorization: Bearer $t2" "$url/logout"
expect 401 "GET /me with the second token (revoked in Redis)" -H "Authorization: Bearer $t2" "$url/me"
rm -f /tmp/authrealm-up-body

if [ "$exit_after" = 1 ]; then
    [ "$failed" = 0 ] || { echo "up: a step of the story went wrong" >&2; exit 1; }
    exit 0
fi
cat >&2 <<EOF

Everything is up (in $((SECONDS - started)) s). Cheat sheet:
  export KUBECONFIG=$kubeconfig
  alias kubectl=$kubectl_bin
  kubectl get authrealms -A                      # realms, current key, next rotation
  kubectl -n $DEMO_NS describe authrealm demo    # conditions, keys, events
  kubectl -n $DEMO_NS get pods                   # Redis Cluster + login app (2/2: app + sidecar)
  kubectl -n $SYSTEM_NS logs deploy/authrealm-operator
  curl -s -X POST -H 'Content-Type: application/json' \\
       -d '{"username":"$DEMO_USER","password":"$DEMO_PASSWORD"}' $url/login
  curl -s -H "Authorization: Bearer \$TOKEN" $url/me
  curl -s -X POST -H "Authorization: Bearer \$TOKEN" $url/logout
Ctrl-C tears everything down.
EOF
while :; do
    sleep 3600 &
    sleeper=$!
    wait "$sleeper"
done
