#!/usr/bin/env bash
# The whole system on Kubernetes: the chart's operator, a Redis Cluster as pods, an AuthRealm, and
# the example login app whose pod gets the sidecar injected — then the login story through the
# app's Service.
#
#   hack/up.sh                     # on a local one-node Kubernetes started here (root, Linux;
#                                  # hack/node.sh); stays up with a cheat sheet until Ctrl-C
#   hack/up.sh --context kind-foo  # on an existing cluster instead (a kubeconfig context; kind
#   hack/up.sh --kubeconfig FILE   # contexts get locally built images loaded with `kind load`)
#   hack/up.sh --demo              # the quick sidecar-only demo (hack/demo.sh: processes on
#                                  # loopback, no Kubernetes, no root)
# Options:
#   --exit          tear down and exit after the story (exit 1 if a step failed)
#   --keep          leave everything running when the script ends (Ctrl-C or --exit)
#   --images WHAT   where the cluster gets its images: `local` (localhost/authrealm/* already on
#                   the nodes, as hack/images.sh imports them into the local node), `kind` (docker
#                   build + kind load; the default for kind-* contexts), or a registry prefix
#                   holding authrealm-operator and authrealm-sidecar (tag: $AUTHREALM_TAG or dev)
#
# First run on a fresh machine (local node): installs packages (hack/install-deps.sh), builds the
# Kubernetes binaries from source (hack/control-plane.sh, hack/node-bins.sh: ~20 min, cached) and
# the release binaries (cargo build --release: ~10 min); later runs take about a minute. Running
# it again while it is up reuses what is there, and a run only ever tears down what it created
# itself: the node if it started it, otherwise the demo namespace and the Helm release if they did
# not exist before. Ctrl-C at any step leaves nothing of its own running.
#
# Environment: AUTHREALM_BIN_DIR (operator/sidecar binaries to pack; default: the release build),
# AUTHREALM_CONTROL_PLANE_BIN / AUTHREALM_NODE_BIN (helm / kubectl to use), and hack/node.sh's
# (AUTHREALM_CACHE, AUTHREALM_NODE_DIR, …).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "up: $*" >&2; exit 2; }
exit_after=0 keep=0 context='' kubeconfig='' images=''
while [ $# -gt 0 ]; do
    case "$1" in
        --exit) exit_after=1 ;;
        --keep) keep=1 ;;
        --demo) shift; exec bash hack/demo.sh "$@" ;;
        --context) [ $# -ge 2 ] || die "--context needs a value"; context=$2; shift ;;
        --context=*) context=${1#*=} ;;
        --kubeconfig) [ $# -ge 2 ] || die "--kubeconfig needs a value"; kubeconfig=$2; shift ;;
        --kubeconfig=*) kubeconfig=${1#*=} ;;
        --images) [ $# -ge 2 ] || die "--images needs a value"; images=$2; shift ;;
        --images=*) images=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

target=node
if [ -n "$context" ] || [ -n "$kubeconfig" ]; then target=existing; fi
if [ "$target" = node ]; then
    [ -z "$images" ] || [ "$images" = local ] || die "--images applies to an existing cluster (--context/--kubeconfig)"
    images=local
    [ "$(id -u)" = 0 ] || die "the local node needs root (network namespace, cgroups, mounts); try --context for an existing cluster, or --demo"
elif [ -z "$images" ]; then
    case "$context" in
        kind-*) images=kind ;;
        *) die "say where the cluster gets authrealm's images: --images local|kind|REGISTRY-PREFIX" ;;
    esac
fi

readonly SYSTEM_NS=authrealm-system DEMO_NS=authrealm-demo RELEASE=authrealm
readonly DEMO_USER=alice DEMO_PASSWORD=demo-only-password # see examples/login-app/README.md
readonly TAG=${AUTHREALM_TAG:-dev}
started=$SECONDS
step() { printf '\n\033[1m==> [%3ss] %s\033[0m\n' "$((SECONDS - started))" "$*" >&2; }

# What this run created, so that its end removes exactly that.
node_started=0 created_release=0 created_system_ns=0 created_demo_ns=0
sleeper='' forwarder='' body=''
k() { "$kubectl_bin" ${kubeconfig:+--kubeconfig "$kubeconfig"} ${context:+--context "$context"} "$@"; }
h() { "$helm_bin" ${kubeconfig:+--kubeconfig "$kubeconfig"} ${context:+--kube-context "$context"} "$@"; }
teardown() {
    trap - INT TERM EXIT
    for p in "$sleeper" "$forwarder"; do [ -z "$p" ] || kill "$p" 2>/dev/null || true; done
    [ -z "$body" ] || rm -f "$body" "$body.pf"
    if [ "$keep" = 1 ]; then
        step "leaving everything running (--keep)"
    elif [ "$node_started" = 1 ]; then
        step "tearing down (hack/node.sh down)"
        bash hack/node.sh down >&2 || true
    elif [ $((created_demo_ns + created_release + created_system_ns)) -gt 0 ]; then
        step "removing what this run created (the cluster itself stays)"
        # The namespace first, while the operator still runs: it removes the realm's finalizer.
        [ "$created_demo_ns" = 0 ] || k delete namespace "$DEMO_NS" --wait --timeout=180s >&2 || true
        [ "$created_release" = 0 ] || h uninstall "$RELEASE" --namespace "$SYSTEM_NS" --wait --timeout 180s >&2 || true
        [ "$created_system_ns" = 0 ] || k delete namespace "$SYSTEM_NS" --wait --timeout=180s >&2 || true
    fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

# A tool from the given build directory (set by the caller, or built and cached here), else PATH.
tool() { # NAME ENV_DIR BUILD_SCRIPT
    local name=$1 dir=$2 script=$3
    if [ -n "$dir" ] && [ -x "$dir/$name" ]; then echo "$dir/$name"; return; fi
    if [ "$target" = existing ] && command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
    echo "$(bash "$script" | tail -n 1)/$name"
}

if [ "$target" = node ]; then
    step "system packages"
    bash hack/install-deps.sh >&2
fi
step "Kubernetes tools (kubectl, helm: yours, or built once from source and cached)"
kubectl_bin=$(tool kubectl "${AUTHREALM_NODE_BIN:-}" hack/node-bins.sh)
helm_bin=$(tool helm "${AUTHREALM_CONTROL_PLANE_BIN:-}" hack/control-plane.sh)
echo "kubectl: $kubectl_bin; helm: $helm_bin" >&2

build_release() {
    if [ -z "${AUTHREALM_BIN_DIR:-}" ]; then
        step "authrealm binaries (cargo build --release)"
        cargo build --release -p authrealm-operator -p authrealm-sidecar >&2
        AUTHREALM_BIN_DIR=${CARGO_TARGET_DIR:-target}/release
    fi
    export AUTHREALM_BIN_DIR
}

if [ "$target" = node ]; then
    AUTHREALM_NODE_BIN=$(dirname "$kubectl_bin")
    export AUTHREALM_NODE_BIN
    build_release
    step "images (packed from the binaries, no registry)"
    bash hack/images.sh --no-import >/dev/null
    step "the node (hack/node.sh up)"
    bash hack/node.sh status >/dev/null 2>&1 || node_started=1
    kubeconfig=$(bash hack/node.sh up | tail -n 1)
    [ "$node_started" = 1 ] || echo "(the node was already up: it stays up when this run ends)" >&2
    bash hack/images.sh >/dev/null # imports into a reused node too
else
    step "the cluster: ${context:-current context}${kubeconfig:+ of $kubeconfig}"
    k get --raw /readyz >/dev/null || die "cannot reach the cluster's API server"
    k get nodes >&2
    if [ "$images" = kind ]; then
        for tool_name in docker kind; do
            command -v "$tool_name" >/dev/null || die "--images kind needs docker and kind ($tool_name is missing)"
        done
        step "images: docker build (images/*.Dockerfile) + kind load into ${context#kind-}"
        docker build -f images/operator.Dockerfile -t "authrealm-operator:${TAG}" . >&2
        docker build -f images/sidecar.Dockerfile -t "authrealm-sidecar:${TAG}" . >&2
        kind load docker-image --name "${context#kind-}" "authrealm-operator:${TAG}" "authrealm-sidecar:${TAG}" >&2
    fi
fi

case "$images" in
    local) image_prefix=localhost/authrealm/ pull=Never ;;
    kind) image_prefix='' pull=Never ;;
    *) image_prefix=${images%/}/ pull=IfNotPresent ;;
esac
redis_image=docker.io/library/redis:7.2 app_image=docker.io/library/python:3.12-slim
if [ "$images" = local ]; then
    redis_image="localhost/authrealm/redis:$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')"
    app_image=localhost/authrealm/login-app:dev
fi

step "chart charts/authrealm into ${SYSTEM_NS} (two operator replicas)"
k get namespace "$SYSTEM_NS" >/dev/null 2>&1 || created_system_ns=1
h status "$RELEASE" --namespace "$SYSTEM_NS" >/dev/null 2>&1 || created_release=1
[ "$created_release" = 1 ] || echo "(release ${RELEASE} exists: upgrading it; it stays when this run ends)" >&2
h upgrade --install "$RELEASE" charts/authrealm \
    --namespace "$SYSTEM_NS" --create-namespace \
    --set "operator.image.repository=${image_prefix}authrealm-operator" --set "operator.image.tag=${TAG}" \
    --set "operator.image.pullPolicy=${pull}" \
    --set "sidecar.image.repository=${image_prefix}authrealm-sidecar" --set "sidecar.image.tag=${TAG}" \
    --set "sidecar.image.pullPolicy=${pull}" \
    --wait --timeout 180s >&2
k -n "$SYSTEM_NS" get pods

step "Redis Cluster (hack/kind/redis-cluster.yaml) in ${DEMO_NS}, restricted Pod Security"
if ! k get namespace "$DEMO_NS" >/dev/null 2>&1; then
    created_demo_ns=1
    k create namespace "$DEMO_NS" >/dev/null
fi
k label --overwrite namespace "$DEMO_NS" pod-security.kubernetes.io/enforce=restricted >/dev/null
if ! k -n "$DEMO_NS" get secret redis-auth >/dev/null 2>&1; then
    k -n "$DEMO_NS" create secret generic redis-auth --from-literal=password="$(openssl rand -hex 24)" >/dev/null
fi
k -n "$DEMO_NS" label --overwrite secret redis-auth authrealm.dev/redis-credentials=true >/dev/null
sed "s|docker.io/library/redis:7.2|${redis_image}|" hack/kind/redis-cluster.yaml | k -n "$DEMO_NS" apply -f - >&2
k -n "$DEMO_NS" rollout status statefulset/redis-cluster --timeout=300s >&2
k -n "$DEMO_NS" wait --for=condition=complete job/redis-cluster-create --timeout=300s >&2

step "AuthRealm demo (hack/kind/demo-realm.yaml)"
k -n "$DEMO_NS" apply -f hack/kind/demo-realm.yaml >&2
k -n "$DEMO_NS" wait --for=condition=Ready authrealm/demo --timeout=180s >&2
k get authrealms -A

step "login app (hack/kind/login-app.yaml): the operator's webhook injects the sidecar"
k -n "$DEMO_NS" create configmap login-app --from-file=app.py=examples/login-app/app.py \
    --from-file=users.json=examples/login-app/users.json --dry-run=client -o yaml | k apply -f - >/dev/null
sed "s|docker.io/library/python:3.12-slim|${app_image}|" hack/kind/login-app.yaml | k -n "$DEMO_NS" apply -f - >&2
k -n "$DEMO_NS" rollout status deployment/login-app --timeout=180s >&2
k -n "$DEMO_NS" get pods -l app.kubernetes.io/name=login-app \
    -o custom-columns='POD:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,INJECTED_SIDECAR:.spec.initContainers[*].name,APP:.spec.containers[*].name'

body=$(mktemp)
if [ "$target" = node ]; then
    url="http://$(k -n "$DEMO_NS" get service login-app -o jsonpath='{.spec.clusterIP}')"
    reach="the login app's Service ${url} (from this host)"
else
    # exec: $! must be kubectl itself, not a subshell running k (killing that would orphan it).
    (exec "$kubectl_bin" ${kubeconfig:+--kubeconfig "$kubeconfig"} ${context:+--context "$context"} \
        -n "$DEMO_NS" port-forward service/login-app :80 >"$body.pf" 2>&1) &
    forwarder=$!
    port=''
    for _ in $(seq 1 100); do
        port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$body.pf" | head -n 1)
        [ -z "$port" ] || break
        kill -0 "$forwarder" 2>/dev/null || { cat "$body.pf" >&2; die "kubectl port-forward failed"; }
        sleep 0.1
    done
    [ -n "$port" ] || die "kubectl port-forward did not start"
    url="http://127.0.0.1:${port}"
    reach="a port-forward to the login app's Service (${url})"
fi

failed=0
expect() { # WANT DESCRIPTION curl-args...
    local want=$1 what=$2 got
    shift 2
    got=$(curl -s -o "$body" -w '%{http_code}' --max-time 10 "$@" || true)
    if [ "$got" = "$want" ]; then mark=ok; else mark="UNEXPECTED"; failed=1; fi
    printf '  %-58s %s (%s)\n' "$what" "$got" "$mark"
}
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["access_token"])' "$body" 2>/dev/null || true; }
login=(-X POST -H 'Content-Type: application/json' -d "{\"username\":\"$DEMO_USER\",\"password\":\"$DEMO_PASSWORD\"}" "$url/login")

step "the story, through ${reach}"
expect 401 "GET /me without a token" "$url/me"
expect 200 "POST /login as ${DEMO_USER}" "${login[@]}"
t1=$(token)
expect 200 "GET /me with the token (identity from the sidecar)" -H "Authorization: Bearer $t1" "$url/me"
printf '    %s\n' "$(cat "$body")"
expect 200 "POST /login again (sessionMode: single)" "${login[@]}"
t2=$(token)
expect 401 "GET /me with the first token (superseded)" -H "Authorization: Bearer $t1" "$url/me"
expect 200 "POST /logout with the second token" -X POST -H "Authorization: Bearer $t2" "$url/logout"
expect 401 "GET /me with the second token (revoked in Redis)" -H "Authorization: Bearer $t2" "$url/me"

if [ "$exit_after" = 1 ]; then
    [ "$failed" = 0 ] || { echo "up: a step of the story went wrong" >&2; exit 1; }
    exit 0
fi
kube_flags="${kubeconfig:+ --kubeconfig $kubeconfig}${context:+ --context $context}"
if [ "$target" = node ]; then
    stop_note="Ctrl-C tears everything down$([ "$node_started" = 1 ] || echo ' that this run created (the node was already up)')."
else
    stop_note="Ctrl-C removes what this run created (the cluster itself stays) and ends the port-forward."
fi
[ "$keep" = 0 ] || stop_note="Ctrl-C ends this script; everything stays running (--keep)."
cat >&2 <<EOF

Everything is up (in $((SECONDS - started)) s). Cheat sheet:
  alias kubectl='$kubectl_bin$kube_flags'
  kubectl get authrealms -A                      # realms, current key, next rotation
  kubectl -n $DEMO_NS describe authrealm demo    # conditions, keys, events
  kubectl -n $DEMO_NS get pods                   # Redis Cluster + login app (2/2: app + sidecar)
  kubectl -n $SYSTEM_NS logs deploy/authrealm-operator
  curl -s -X POST -H 'Content-Type: application/json' \\
       -d '{"username":"$DEMO_USER","password":"$DEMO_PASSWORD"}' $url/login
  curl -s -H "Authorization: Bearer \$TOKEN" $url/me
  curl -s -X POST -H "Authorization: Bearer \$TOKEN" $url/logout
$stop_note
EOF
while :; do
    sleep 3600 &
    sleeper=$!
    wait "$sleeper"
done
