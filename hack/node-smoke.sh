#!/usr/bin/env bash
# Smoke check of the local node (hack/node.sh), as root:
#   up -> a web pod (busybox httpd, restricted securityContext, read-only root) behind a Service,
#   a client pod -> DNS (kubernetes.default and the Service, by full and short name, reverse),
#   pod -> Service, pod -> API server port through the kubernetes Service, host -> ClusterIP and
#   pod IP, names outside cluster.local REFUSED, pod -> the host's veth address and pod -> an
#   unused address of the range dropped -> down -> nothing left, host sysctls/iptables unchanged.
#
# Usage: hack/node-smoke.sh [--keep]   (--keep: leave the node up at the end)
# Prints "N passed, N failed" as its last line; exit 0 only when everything passed.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
[[ ${1:-} == --keep ]] && keep=1
passed=0 failed=0
ok() { passed=$((passed + 1)); printf '  ok   %s\n' "$1" >&2; }
ko() { failed=$((failed + 1)); printf '  FAIL %s\n' "$1" >&2; }
check() { # DESC CMD...
  local desc=$1
  shift
  if "$@" >/dev/null 2>&1; then ok "${desc}"; else ko "${desc}"; fi
}
status_is() { local rc=0; bash hack/node.sh status >/dev/null 2>&1 || rc=$?; ((rc == $1)); }
host_state() {
  local f
  for f in net/ipv4/ip_forward vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
    kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/netfilter/nf_conntrack_max \
    net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables; do
    printf '%s=%s\n' "${f}" "$(cat "/proc/sys/${f}" 2>/dev/null)"
  done
  iptables-save 2>/dev/null | grep -v '^#' || true
  ip6tables-save 2>/dev/null | grep -v '^#' || true
}

before=$(host_state)
((keep)) || trap 'bash hack/node.sh down >/dev/null 2>&1 || true' EXIT
start=${SECONDS}
kubeconfig=$(bash hack/node.sh up | tail -n 1)
up_seconds=$((SECONDS - start))
eval "$(bash hack/node.sh env)"
kubectl() { "${AUTHREALM_NODE_BIN}/kubectl" --kubeconfig "${kubeconfig}" "$@"; }
busybox=$(ctr -a "${AUTHREALM_NODE_CONTAINERD_ADDRESS}" -n k8s.io images ls -q | grep -m1 '^localhost/authrealm/busybox:')
ns=smoke-$$
printf 'node up in %s s; namespace %s\n' "${up_seconds}" "${ns}" >&2

kubectl create namespace "${ns}" >/dev/null
kubectl label namespace "${ns}" pod-security.kubernetes.io/enforce=restricted >/dev/null
kubectl -n "${ns}" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: web
      image: ${busybox}
      imagePullPolicy: Never
      command: [sh, -c, "mkdir -p /tmp/www && echo hello-from-web >/tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
      ports: [{containerPort: 8080}]
      readinessProbe: {httpGet: {path: /index.html, port: 8080}, periodSeconds: 1}
      securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
      volumeMounts: [{name: tmp, mountPath: /tmp}]
  volumes: [{name: tmp, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: client
      image: ${busybox}
      imagePullPolicy: Never
      command: [sleep, "3600"]
      securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
YAML
start=${SECONDS}
check "pods Ready (restricted Pod Security)" kubectl -n "${ns}" wait --for=condition=Ready pod/web pod/client --timeout=60s
printf 'pods Ready in %s s\n' "$((SECONDS - start))" >&2
in_client() { kubectl -n "${ns}" exec client -- "$@"; }
svc_ip=$(kubectl -n "${ns}" get service web -o jsonpath='{.spec.clusterIP}')
pod_ip=$(kubectl -n "${ns}" get pod web -o jsonpath='{.status.podIP}')

# Helpers for the checks (the check's outcome is the helper's exit status).
resolves() { # NAME PATTERN (nslookup fails on REFUSED/NXDOMAIN: only its output counts)
  local out
  out=$(in_client nslookup "$1" 2>&1) || true
  grep -q -- "$2" <<<"${out}"
}
serves() { "$@" 2>/dev/null | grep -qx hello-from-web; }
tcp_open() { in_client sh -c "echo | timeout 3 nc $1 $2"; }
tcp_blocked() { ! tcp_open "$@"; }

check "DNS: kubernetes.default.svc.cluster.local" resolves kubernetes.default.svc.cluster.local 'Address: 10.97.128.1$'
check "DNS: web.${ns}.svc.cluster.local -> ${svc_ip}" resolves "web.${ns}.svc.cluster.local" "${svc_ip}"
check "DNS: reverse ${svc_ip}" resolves "${svc_ip}" "web.${ns}.svc.cluster.local"
check "DNS: names outside cluster.local are REFUSED" resolves example.com REFUSED
# (busybox-static's wget segfaults with -T; `timeout` bounds it instead)
check "pod -> Service by short name" serves in_client timeout 5 wget -qO- http://web/index.html
check "pod -> API server port via the kubernetes Service" tcp_open kubernetes.default.svc 443
check "host -> ClusterIP ${svc_ip}" serves curl -fsS -m 5 "http://${svc_ip}/index.html"
check "host -> pod IP ${pod_ip}" serves curl -fsS -m 5 "http://${pod_ip}:8080/index.html"
check "pod -> host veth address ${AUTHREALM_NODE_HOST_IP} is dropped" tcp_blocked "${AUTHREALM_NODE_HOST_IP}" 22
check "pod -> unused address of the range is dropped" tcp_blocked 10.97.200.200 80
check "kubectl logs" kubectl -n "${ns}" logs web --tail=1
check "host sysctls and iptables unchanged while up" test "${before}" == "$(host_state)"

if ((keep)); then
  kubectl delete namespace "${ns}" --wait=false >/dev/null
  printf 'left up: KUBECONFIG=%s\n' "${kubeconfig}" >&2
else
  start=${SECONDS}
  check "hack/node.sh down" bash hack/node.sh down
  trap - EXIT
  printf 'down in %s s\n' "$((SECONDS - start))" >&2
  check "hack/node.sh status says down" status_is 1
  check "host sysctls and iptables unchanged after down" test "${before}" == "$(host_state)"
fi
printf '%s passed, %s failed\n' "${passed}" "${failed}"
((failed == 0))
