#!/usr/bin/env bash
# A real one-node Kubernetes v1.36.3 on this machine, for end-to-end tests and demos:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (+ runc, CNI bridge),
# kubelet, kube-proxy (iptables mode) and CoreDNS, all as processes of this script, all inside a
# network namespace of their own.
#
# Usage (as root): hack/node.sh up | down | status | env
#
# Contract (for callers such as a Rust test harness):
#   up      Builds what is missing (hack/control-plane.sh, hack/node-bins.sh, hack/images.sh base;
#           minutes on a cold machine), starts the node and returns once the node is Ready, the
#           default ServiceAccount exists and CoreDNS answers. Progress and timings go to stderr;
#           the LAST line of stdout is the path of an admin kubeconfig (cluster-admin, client
#           certificate, server https://10.97.255.1:6443) usable from the host. Exit 0 on success.
#           If the node is already up and healthy it only prints that path ("reuse"); leftovers of
#           a node that died are torn down first. On failure, SIGINT or SIGTERM, everything
#           started so far is torn down before exiting non-zero (AUTHREALM_NODE_KEEP=1 keeps it
#           for debugging; the logs are in $AUTHREALM_NODE_DIR/log either way).
#           Every daemon runs in its own session with stdin/stdout/stderr on files, so a caller
#           reading this script's stdout through a pipe sees EOF when the script exits.
#   down    Stops and removes everything `up` started: processes (by recorded PID, checked
#           against their start time; then any process whose command line names the state
#           directory; then any process in the node's cgroups), mounts, the network namespace
#           with everything in it, the host's veth, the cgroups, containerd's state, the CNI
#           result cache entries and the containerd shim sockets of this node. Idempotent; exit 0
#           when nothing is left, 1 (with a list on stderr) otherwise. Keeps $NODE_DIR/log.
#           The machine-wide names (below) are only touched by the state directory written in
#           /run/authrealm-node.owner (while a node is up); `up` refuses while another owns them.
#   status  Exit 0 when the node is up and healthy (then prints the kubeconfig path as the last
#           stdout line), 1 when nothing runs, 2 when it is partly up. Details on stderr.
#   env     Prints KEY=VALUE lines (kubeconfig, addresses, ranges, containerd socket, netns, bin
#           directories) whether or not the node is up; `eval`-able, values have no spaces.
# `up` and `down` serialise on a lock file next to the state directory. One node per machine:
# the interface names, the address range and the cgroup name below are fixed.
#
# Environment: AUTHREALM_CACHE (default ~/.cache/authrealm), AUTHREALM_NODE_DIR (state, default
# $AUTHREALM_CACHE/node), AUTHREALM_IMAGES_DIR (OCI archives imported by `up`, default
# $AUTHREALM_CACHE/images), AUTHREALM_CONTROL_PLANE_BIN / AUTHREALM_NODE_BIN (prebuilt binaries;
# otherwise hack/control-plane.sh / hack/node-bins.sh are run), AUTHREALM_NODE_KEEP.
#
# Network. The node lives in a network namespace made by this script (bind-mounted at
# $NODE_DIR/run/netns); every component, pod and iptables rule is in it, so the host's iptables
# and sysctls are never changed (the host only gets one veth and one route). Inside, everything
# is in 10.97.0.0/16:
#   pods 10.97.0.0/24 on the bridge ar-pods0 (gateway 10.97.0.1; CNI bridge + host-local,
#   ipMasq off: no NAT to anywhere); Services 10.97.128.0/24 (kube-proxy, iptables mode);
#   node IP 10.97.255.1 on ar-node0, the namespace end of a veth pair whose host end ar-host0
#   carries 10.97.255.2 and the route 10.97.0.0/16 via 10.97.255.1. The host thus reaches the
#   API server, pods and ClusterIPs; the host's ip_forward is left as it is (0 here), so it does
#   not route the node's traffic anywhere. In the namespace: no default route (anything outside the range
#   is unreachable), a blackhole route for the rest of 10.97.0.0/16 (unused pod and Service
#   addresses), and the chain AR-NODE-EGRESS, first in FORWARD, drops anything that arrives from
#   the pod bridge and would leave by another interface, except replies to connections the host
#   opened. ip_forward=1 and bridge-nf-call-iptables=1 are set in the namespace only, where the
#   CNI bridge and kube-proxy need them. Nothing sends traffic outside the machine.
#
# Kernel settings. The kubelet "fixes" six VM-wide sysctls at start (vm.overcommit_memory,
# vm.panic_on_oom, kernel.panic, kernel.panic_on_oops, kernel.keys.root_maxkeys/maxbytes) and no
# setting makes it only warn. It therefore runs in its own mount namespace where files holding
# the values it expects are bind-mounted over those /proc/sys entries: it reads them, writes
# nothing. Its root directory is a shared bind mount made on the host before, so the volumes it
# mounts for pods reach containerd and runc. kube-proxy is told not to touch conntrack sysctls.
#
# Runtime. Debian's containerd 1.6 with its own socket, config, root and state under $NODE_DIR;
# restrict_oom_score_adj (root here lacks CAP_SYS_RESOURCE, so runc cannot give the pause container
# -998), no AppArmor, cgroupfs driver, sandbox image localhost/authrealm/pause. Pods run in the
# cgroup subtree /authrealm-node of every hierarchy (kubelet cgroupRoot), cgroup v1 tolerated
# (the only layout tested: this kind of machine has v1 plus an empty v2 hierarchy).
# Images come from hack/images.sh archives only; nothing is pulled (no route out).
#
# DNS. CoreDNS runs on the node (in the namespace) at 10.97.255.1:53, authoritative for
# cluster.local and the reverse zones only (other names: REFUSED, nothing is forwarded); the
# kubelet hands that address to pods, so *.svc.cluster.local resolves in every pod.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)
CACHE_ROOT=${AUTHREALM_CACHE:-$HOME/.cache/authrealm}
NODE_DIR=${AUTHREALM_NODE_DIR:-${CACHE_ROOT}/node}
IMAGES_DIR=${AUTHREALM_IMAGES_DIR:-${CACHE_ROOT}/images}
LOCK_FILE="${NODE_DIR}.lock"

NODE_NAME=authrealm-node
RANGE=10.97.0.0/16
POD_CIDR=10.97.0.0/24
POD_GATEWAY=10.97.0.1
SERVICE_CIDR=10.97.128.0/24
API_SERVICE_IP=10.97.128.1
NODE_IP=10.97.255.1
HOST_IP=10.97.255.2
HOST_IF=ar-host0
NODE_IF=ar-node0
POD_BRIDGE=ar-pods0
CNI_NETWORK=authrealm-node-pods
CGROUP_NAME=authrealm-node
EGRESS_CHAIN=AR-NODE-EGRESS
API_PORT=6443
API_URL="https://${NODE_IP}:${API_PORT}"
PAUSE_IMAGE=localhost/authrealm/pause:v1.36.3
CNI_BIN_DIR=/usr/lib/cni

NETNS="${NODE_DIR}/run/netns"
PIDS="${NODE_DIR}/run/pids"
PKI="${NODE_DIR}/pki"
LOG_DIR="${NODE_DIR}/log"
KUBECONFIG_OUT="${NODE_DIR}/kubeconfig"
CTRD_DIR="${NODE_DIR}/containerd"
CTRD_SOCK="${CTRD_DIR}/containerd.sock"
KUBELET_DIR="${NODE_DIR}/kubelet"
CNI_CACHE=/var/lib/cni/results   # go-cni's fixed cache dir (containerd 1.6 has no setting)
SHIM_SOCKETS=/run/containerd/s   # containerd 1.6's fixed shim socket dir
# Names the state directory of the node that owns the machine-wide names (interface, route,
# cgroup): a teardown of another state directory leaves those alone.
OWNER_FILE=/run/authrealm-node.owner

log() { printf '[node %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------------------------------
# helpers

in_node() { nsenter --net="${NETNS}" -- "$@"; }

# Start time of a process (field 22 of /proc/PID/stat), to tell our PID from a reused one.
proc_start() { awk '{ sub(/^.*\) /, ""); print $20 }' "/proc/$1/stat" 2>/dev/null; }

# True while PID runs. Not `kill -0`: our daemons are re-parented to PID 1, which on this kind of
# machine (a sandbox's process manager) reaps them late, and a zombie answers kill -0.
alive() {
  local state
  state=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n ${state} && ${state} != Z && ${state} != X ]]
}

# start NAME CMD...: a daemon in its own session, logs to $LOG_DIR/NAME.log, recorded in $PIDS.
start() {
  local name=$1 pid
  shift
  setsid "$@" </dev/null >>"${LOG_DIR}/${name}.log" 2>&1 9>&- &
  pid=$!
  disown "${pid}"
  printf '%s %s %s\n' "${name}" "${pid}" "$(proc_start "${pid}")" >>"${PIDS}"
  log "started ${name} (pid ${pid})"
}

recorded_alive() { # NAME -> true if the recorded process of NAME still runs
  local name pid st
  [[ -f ${PIDS} ]] || return 1
  while read -r name pid st; do
    [[ ${name} == "$1" ]] || continue
    [[ -n ${st} && "$(proc_start "${pid}")" == "${st}" ]] && alive "${pid}" && return 0
  done <"${PIDS}"
  return 1
}

log_tail() { [[ -f "${LOG_DIR}/$1.log" ]] && tail -n 25 "${LOG_DIR}/$1.log" | sed "s/^/    $1| /" >&2; return 0; }

# wait_for DESC SECONDS PROCESS CMD...: poll CMD every 0.25 s; fail early if PROCESS died.
wait_for() {
  local desc=$1 secs=$2 proc=$3 deadline
  shift 3
  deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [[ -n ${proc} ]] && ! recorded_alive "${proc}"; then
      log_tail "${proc}"
      die "${proc} exited while waiting for ${desc}"
    fi
    if ((SECONDS >= deadline)); then
      [[ -n ${proc} ]] && log_tail "${proc}"
      die "timed out after ${secs} s waiting for ${desc}"
    fi
    sleep 0.25
  done
}

T0=0
phase() { printf '[node] %-34s %6.1f s\n' "$1" "$(awk -v a="${T0}" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" | tee -a "${NODE_DIR}/run/timings" >&2; }

kubectl_admin() { "${NODE_BIN}/kubectl" --kubeconfig "${KUBECONFIG_OUT}" "$@"; }

resolve_bins() {
  if [[ -n ${AUTHREALM_CONTROL_PLANE_BIN:-} ]]; then
    CP_BIN=${AUTHREALM_CONTROL_PLANE_BIN}
  else
    CP_BIN=$(bash "${ROOT_DIR}/hack/control-plane.sh" | tail -n 1)
  fi
  if [[ -n ${AUTHREALM_NODE_BIN:-} ]]; then
    NODE_BIN=${AUTHREALM_NODE_BIN}
  else
    NODE_BIN=$(bash "${ROOT_DIR}/hack/node-bins.sh" | tail -n 1)
  fi
  local b
  for b in "${CP_BIN}/etcd" "${CP_BIN}/kube-apiserver" "${CP_BIN}/kube-controller-manager" \
    "${NODE_BIN}/kube-scheduler" "${NODE_BIN}/kubelet" "${NODE_BIN}/kube-proxy" \
    "${NODE_BIN}/kubectl" "${NODE_BIN}/coredns"; do
    [[ -x ${b} ]] || die "missing ${b}"
  done
}

# Bin directories for `env`/`status` without building anything.
guess_bins() {
  local -a cp=("${CACHE_ROOT}"/control-plane/k8s-v1.36.3-*/bin) node=("${CACHE_ROOT}"/node-bins/k8s-v1.36.3-*/bin)
  CP_BIN=${AUTHREALM_CONTROL_PLANE_BIN:-${cp[0]}}
  NODE_BIN=${AUTHREALM_NODE_BIN:-${node[0]}}
}

check_host() {
  [[ $(id -u) == 0 ]] || die "must run as root (network namespace, mounts, cgroups)"
  local c
  for c in containerd ctr runc iptables nsenter unshare openssl curl "${CNI_BIN_DIR}/bridge" \
    "${CNI_BIN_DIR}/host-local" "${CNI_BIN_DIR}/loopback" "${CNI_BIN_DIR}/portmap"; do
    command -v "${c}" >/dev/null 2>&1 || die "${c} not found: run hack/install-deps.sh"
  done
  [[ -d /sys/fs/cgroup/pids || -f /sys/fs/cgroup/cgroup.controllers ]] || die "no cgroup file system"
}

owned_by_other() { [[ -f ${OWNER_FILE} && $(cat "${OWNER_FILE}") != "${NODE_DIR}" ]]; }

cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts; }

# ------------------------------------------------------------------------------------------
# up

setup_network() {
  touch "${NETNS}"
  unshare --net="${NETNS}" true
  ip link add "${HOST_IF}" type veth peer name "${NODE_IF}" netns "${NETNS}"
  ip addr add "${HOST_IP}/32" dev "${HOST_IF}"
  ip link set "${HOST_IF}" up
  # Through the node IP as gateway: the host must ARP for an address the namespace owns.
  ip route add "${RANGE}" via "${NODE_IP}" dev "${HOST_IF}" src "${HOST_IP}" onlink
  in_node ip link set lo up
  in_node ip addr add "${NODE_IP}/32" dev "${NODE_IF}"
  in_node ip link set "${NODE_IF}" up
  in_node ip route add "${HOST_IP}/32" dev "${NODE_IF}" src "${NODE_IP}"
  in_node ip route add blackhole "${RANGE}"
  # Per-namespace settings (the writer's network namespace decides which /proc/sys/net it sees).
  in_node sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward
    if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables; fi'
  in_node iptables -N "${EGRESS_CHAIN}"
  in_node iptables -A "${EGRESS_CHAIN}" -i "${POD_BRIDGE}" -o "${POD_BRIDGE}" -j RETURN
  in_node iptables -A "${EGRESS_CHAIN}" -i "${POD_BRIDGE}" -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
  in_node iptables -A "${EGRESS_CHAIN}" -i "${POD_BRIDGE}" -j DROP
  in_node iptables -I FORWARD 1 -j "${EGRESS_CHAIN}"

  mkdir -p "${NODE_DIR}/cni/net.d" "${NODE_DIR}/cni/ipam"
  cat >"${NODE_DIR}/cni/net.d/10-authrealm-node.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "${CNI_NETWORK}",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "${POD_BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "${NODE_DIR}/cni/ipam",
        "ranges": [[{"subnet": "${POD_CIDR}", "gateway": "${POD_GATEWAY}"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
JSON
}

# Puts the egress chain back in first position of FORWARD (kube-proxy and the kubelet prepend
# their own jumps).
egress_rule_first() {
  in_node iptables -D FORWARD -j "${EGRESS_CHAIN}"
  in_node iptables -I FORWARD 1 -j "${EGRESS_CHAIN}"
}

egress_rule_is_first() {
  [[ $(in_node iptables -S FORWARD 2>/dev/null | sed -n 2p) == "-A FORWARD -j ${EGRESS_CHAIN}" ]]
}

start_containerd() {
  mkdir -p "${CTRD_DIR}"
  cat >"${CTRD_DIR}/config.toml" <<TOML
version = 2
root = "${CTRD_DIR}/root"
state = "${CTRD_DIR}/state"
# opt would create /opt/containerd; the others are snapshotters/exporters this node does not use.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "${CTRD_SOCK}"
[ttrpc]
  address = "${CTRD_SOCK}.ttrpc"
[debug]
  address = "${CTRD_DIR}/debug.sock"
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${PAUSE_IMAGE}"
  disable_apparmor = true              # no AppArmor in this kernel
  # root here lacks CAP_SYS_RESOURCE: nothing may lower an oom_score_adj below its own, and runc
  # dies on the pause container's -998 ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true  # pod netns bind mounts under the state dir
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "${NODE_DIR}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${CNI_BIN_DIR}"
    conf_dir = "${NODE_DIR}/cni/net.d"
TOML
  start containerd nsenter --net="${NETNS}" -- containerd --config "${CTRD_DIR}/config.toml"
  wait_for "containerd" 30 containerd ctr -a "${CTRD_SOCK}" version
}

import_images() {
  AUTHREALM_NODE_BIN="${NODE_BIN}" AUTHREALM_IMAGES_DIR="${IMAGES_DIR}" \
    bash "${ROOT_DIR}/hack/images.sh" --no-import base >/dev/null
  local archive
  for archive in "${IMAGES_DIR}"/*.tar; do
    ctr -a "${CTRD_SOCK}" -n k8s.io images import "${archive}" >/dev/null
  done
  log "images: $(ctr -a "${CTRD_SOCK}" -n k8s.io images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
}

gen_pki() {
  mkdir -p "${PKI}"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "${PKI}/ca.key" -out "${PKI}/ca.crt" -days 7 \
    -subj "/CN=authrealm-node-ca" 2>/dev/null
  sign() { # NAME SUBJECT [SAN]
    local ext="${PKI}/$1.ext"
    openssl req "${ec[@]}" -keyout "${PKI}/$1.key" -out "${PKI}/$1.csr" -subj "$2" 2>/dev/null
    {
      echo "basicConstraints=CA:FALSE"
      echo "keyUsage=digitalSignature,keyEncipherment"
      if [[ -n ${3:-} ]]; then
        echo "extendedKeyUsage=serverAuth,clientAuth"
        echo "subjectAltName=$3"
      else
        echo "extendedKeyUsage=clientAuth"
      fi
    } >"${ext}"
    openssl x509 -req -in "${PKI}/$1.csr" -CA "${PKI}/ca.crt" -CAkey "${PKI}/ca.key" -CAcreateserial \
      -out "${PKI}/$1.crt" -days 7 -extfile "${ext}" 2>/dev/null
    rm -f "${PKI}/$1.csr" "${ext}"
  }
  sign apiserver "/CN=kube-apiserver" "IP:${NODE_IP},IP:${API_SERVICE_IP},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign admin "/O=system:masters/CN=authrealm-node-admin"
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  sign controller-manager "/CN=system:kube-controller-manager"
  sign scheduler "/CN=system:kube-scheduler"
  sign kubelet "/O=system:nodes/CN=system:node:${NODE_NAME}"
  sign kube-proxy "/CN=system:kube-proxy"
  sign coredns "/CN=system:authrealm-node:coredns"
  openssl ecparam -name prime256v1 -genkey -noout -out "${PKI}/sa.key" 2>/dev/null
  openssl ec -in "${PKI}/sa.key" -pubout -out "${PKI}/sa.pub" 2>/dev/null
  chmod 0600 "${PKI}"/*.key

  local c
  for c in admin controller-manager scheduler kubelet kube-proxy coredns; do
    write_kubeconfig "${c}" >"${PKI}/${c}.kubeconfig"
  done
  write_kubeconfig admin >"${KUBECONFIG_OUT}.tmp"
  chmod 0600 "${KUBECONFIG_OUT}.tmp" "${PKI}"/*.kubeconfig
  mv -f "${KUBECONFIG_OUT}.tmp" "${KUBECONFIG_OUT}"
}

write_kubeconfig() { # CLIENT: self-contained kubeconfig (certificates inline)
  cat <<YAML
apiVersion: v1
kind: Config
clusters:
- name: ${NODE_NAME}
  cluster:
    server: ${API_URL}
    certificate-authority-data: $(base64 -w0 "${PKI}/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(base64 -w0 "${PKI}/$1.crt")
    client-key-data: $(base64 -w0 "${PKI}/$1.key")
contexts:
- name: ${NODE_NAME}
  context: {cluster: ${NODE_NAME}, user: $1}
current-context: ${NODE_NAME}
YAML
}

api_ready() {
  curl -fsS --max-time 2 --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" --key "${PKI}/admin.key" \
    "${API_URL}/readyz"
}

start_control_plane() {
  mkdir -p "${NODE_DIR}/etcd"
  start etcd nsenter --net="${NETNS}" -- "${CP_BIN}/etcd" --name=authrealm-node \
    --data-dir="${NODE_DIR}/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=authrealm-node=http://127.0.0.1:2380 \
    --listen-metrics-urls=http://127.0.0.1:2381 \
    --unsafe-no-fsync=true --log-level=warn
  wait_for "etcd /health" 30 etcd in_node curl -fsS --max-time 2 http://127.0.0.1:2379/health

  start kube-apiserver nsenter --net="${NETNS}" -- "${CP_BIN}/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address="${NODE_IP}" --advertise-address="${NODE_IP}" --secure-port="${API_PORT}" \
    --cert-dir="${PKI}/apiserver-generated" \
    --tls-cert-file="${PKI}/apiserver.crt" --tls-private-key-file="${PKI}/apiserver.key" \
    --client-ca-file="${PKI}/ca.crt" \
    --kubelet-client-certificate="${PKI}/apiserver-kubelet-client.crt" \
    --kubelet-client-key="${PKI}/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${PKI}/sa.pub" --service-account-signing-key-file="${PKI}/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true \
    --enable-aggregator-routing=true \
    --profiling=false
  wait_for "kube-apiserver /readyz" 120 kube-apiserver api_ready
  phase "etcd + kube-apiserver ready"

  start kube-controller-manager nsenter --net="${NETNS}" -- "${CP_BIN}/kube-controller-manager" \
    --kubeconfig="${PKI}/controller-manager.kubeconfig" \
    --authentication-kubeconfig="${PKI}/controller-manager.kubeconfig" \
    --authorization-kubeconfig="${PKI}/controller-manager.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 \
    --root-ca-file="${PKI}/ca.crt" --service-account-private-key-file="${PKI}/sa.key" \
    --cluster-signing-cert-file="${PKI}/ca.crt" --cluster-signing-key-file="${PKI}/ca.key" \
    --use-service-account-credentials=true --service-cluster-ip-range="${SERVICE_CIDR}" \
    --profiling=false
  start kube-scheduler nsenter --net="${NETNS}" -- "${NODE_BIN}/kube-scheduler" \
    --kubeconfig="${PKI}/scheduler.kubeconfig" \
    --authentication-kubeconfig="${PKI}/scheduler.kubeconfig" \
    --authorization-kubeconfig="${PKI}/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false
}

start_coredns() {
  kubectl_admin apply -f - >/dev/null <<'YAML'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: authrealm-node:coredns
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: authrealm-node:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: authrealm-node:coredns
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: User
    name: system:authrealm-node:coredns
YAML
  mkdir -p "${NODE_DIR}/coredns"
  cat >"${NODE_DIR}/coredns/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind ${NODE_IP}
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig ${PKI}/coredns.kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
    loadbalance
}
EOF
  start coredns nsenter --net="${NETNS}" -- "${NODE_BIN}/coredns" -conf "${NODE_DIR}/coredns/Corefile"
}

make_cgroup_root() {
  local m
  while read -r m; do
    mkdir -p "${m}/${CGROUP_NAME}"
    # A new cpuset cgroup starts with no CPUs and no memory nodes: copy the parent's.
    if [[ -f "${m}/cpuset.cpus" && -f "${m}/${CGROUP_NAME}/cpuset.cpus" ]]; then
      [[ -n $(cat "${m}/${CGROUP_NAME}/cpuset.cpus") ]] || cat "${m}/cpuset.cpus" >"${m}/${CGROUP_NAME}/cpuset.cpus"
      [[ -n $(cat "${m}/${CGROUP_NAME}/cpuset.mems") ]] || cat "${m}/cpuset.mems" >"${m}/${CGROUP_NAME}/cpuset.mems"
    fi
  done < <(cgroup_mounts)
}

start_kubelet() {
  local shield="${NODE_DIR}/run/sysctl-shield"
  mkdir -p "${KUBELET_DIR}" "${NODE_DIR}/pod-logs" "${shield}"
  if ! mountpoint -q "${KUBELET_DIR}"; then
    mount --bind "${KUBELET_DIR}" "${KUBELET_DIR}"
    mount --make-rshared "${KUBELET_DIR}"
  fi
  make_cgroup_root
  # The values the kubelet's setupKernelTunables wants, as files to mount over /proc/sys.
  echo 1 >"${shield}/vm.overcommit_memory"
  echo 0 >"${shield}/vm.panic_on_oom"
  echo 10 >"${shield}/kernel.panic"
  echo 1 >"${shield}/kernel.panic_on_oops"
  echo 1000000 >"${shield}/kernel.keys.root_maxkeys"
  echo 25000000 >"${shield}/kernel.keys.root_maxbytes"
  printf 'nameserver %s\n' "${NODE_IP}" >"${NODE_DIR}/run/resolv.conf"
  cat >"${NODE_DIR}/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false            # Kubernetes >= 1.35 refuses cgroup v1 unless told
cgroupDriver: cgroupfs         # no systemd
cgroupRoot: /${CGROUP_NAME}
failSwapOn: false
containerRuntimeEndpoint: unix://${CTRD_SOCK}
imageServiceEndpoint: unix://${CTRD_SOCK}
address: ${NODE_IP}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: ${PKI}/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [${NODE_IP}]
resolvConf: ${NODE_DIR}/run/resolv.conf
podLogsDir: ${NODE_DIR}/pod-logs
staticPodPath: ""
registerNode: true
syncFrequency: 10s             # mounted Secret/ConfigMap updates reach pods within ~10 s
imageGCHighThresholdPercent: 100   # never collect the imported images: they cannot be pulled
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
serializeImagePulls: false
YAML
  local -a args=(--config="${NODE_DIR}/kubelet-config.yaml" --kubeconfig="${PKI}/kubelet.kubeconfig"
    --root-dir="${KUBELET_DIR}" --cert-dir="${KUBELET_DIR}/pki" --hostname-override="${NODE_NAME}"
    --node-ip="${NODE_IP}" --v=1)
  # shellcheck disable=SC2016 # expanded by the inner shell
  start kubelet nsenter --net="${NETNS}" -- unshare --mount --propagation unchanged -- sh -c '
    s=$1; shift
    for f in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops \
             kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do
      mount --bind "$s/$f" "/proc/sys/$(echo "$f" | tr . /)" || exit 1
    done
    exec "$@"' kubelet-shield "${shield}" "${NODE_BIN}/kubelet" "${args[@]}"
  wait_for "kubelet /healthz" 60 kubelet in_node curl -fsS --max-time 2 http://127.0.0.1:10248/healthz

  cat >"${NODE_DIR}/kube-proxy-config.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: ${PKI}/kube-proxy.kubeconfig}
hostnameOverride: ${NODE_NAME}
bindAddress: ${NODE_IP}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clusterCIDR: ${POD_CIDR}
nodePortAddresses: ["${NODE_IP}/32"]
iptables: {localhostNodePorts: false, masqueradeAll: false}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  start kube-proxy nsenter --net="${NETNS}" -- "${NODE_BIN}/kube-proxy" --config="${NODE_DIR}/kube-proxy-config.yaml"
  wait_for "kube-proxy /healthz" 60 kube-proxy in_node curl -fsS --max-time 2 http://127.0.0.1:10256/healthz
}

node_ready() {
  [[ $(kubectl_admin get node "${NODE_NAME}" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

dns_answers() { # the kubernetes Service's name resolves to its ClusterIP through CoreDNS
  busybox nslookup "kubernetes.default.svc.cluster.local" "${NODE_IP}" 2>/dev/null | grep -q "${API_SERVICE_IP}"
}

UP_DONE=0
on_up_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if ((UP_DONE == 0)); then
    if [[ -n ${AUTHREALM_NODE_KEEP:-} ]]; then
      log "up failed (exit ${rc}); AUTHREALM_NODE_KEEP is set: leaving it for inspection (hack/node.sh down)"
    else
      log "up did not finish (exit ${rc}): tearing down"
      teardown || true
    fi
    ((rc != 0)) || rc=1
  fi
  exit "${rc}"
}

cmd_up() {
  local p
  check_host
  mkdir -p "$(dirname "${NODE_DIR}")"
  exec 9>"${LOCK_FILE}"
  flock -w 900 9 || die "another hack/node.sh holds ${LOCK_FILE}"
  if health_check >/dev/null 2>&1; then
    log "already up (reuse)"
    echo "${KUBECONFIG_OUT}"
    return 0
  fi
  trap on_up_exit EXIT
  trap 'log "interrupted"; exit 130' INT
  trap 'log "terminated"; exit 143' TERM
  teardown quiet || die "leftovers of a previous node could not be removed"
  if owned_by_other; then
    die "the node of $(cat "${OWNER_FILE}") is up: AUTHREALM_NODE_DIR=$(cat "${OWNER_FILE}") hack/node.sh down"
  fi
  if ip link show "${HOST_IF}" >/dev/null 2>&1 || ip route show "${RANGE}" | grep -q .; then
    die "${HOST_IF} or a route for ${RANGE} already exists: another node (other AUTHREALM_NODE_DIR?) is up"
  fi

  resolve_bins
  # Fresh state; the previous run's logs go away only now.
  rm -rf "${LOG_DIR}"
  mkdir -p "${NODE_DIR}/run" "${LOG_DIR}"
  : >"${PIDS}"
  : >"${NODE_DIR}/run/timings"
  # Fixed paths outside the state directory that the kubelet, containerd and go-cni create.
  for p in /var/lib/kubelet /var/lib/cni /run/containerd; do
    [[ -e ${p} ]] || echo "${p}" >>"${NODE_DIR}/run/created-paths"
  done
  echo "${NODE_DIR}" >"${OWNER_FILE}"
  T0=$(date +%s.%N)
  setup_network
  phase "network namespace + veth + rules"
  start_containerd
  import_images
  phase "containerd + images"
  gen_pki
  phase "PKI"
  start_control_plane
  start_coredns
  start_kubelet
  phase "kubelet + kube-proxy healthy"
  egress_rule_first
  wait_for "node ${NODE_NAME} Ready" 120 kubelet node_ready
  phase "node Ready"
  wait_for "kube-scheduler /healthz" 60 kube-scheduler in_node curl -fsSk --max-time 2 https://127.0.0.1:10259/healthz
  wait_for "kube-controller-manager /healthz" 60 kube-controller-manager in_node curl -fsSk --max-time 2 https://127.0.0.1:10257/healthz
  wait_for "default ServiceAccount" 60 kube-controller-manager kubectl_admin -n default get serviceaccount default
  wait_for "CoreDNS ready" 60 coredns in_node curl -fsS --max-time 2 http://127.0.0.1:8181/ready
  wait_for "kubernetes.default.svc.cluster.local via CoreDNS" 30 coredns dns_answers
  phase "ServiceAccount + DNS ready"
  egress_rule_first # again: kube-proxy's first sync may have come after the first time
  egress_rule_is_first || die "${EGRESS_CHAIN} is not the first rule of FORWARD in the node's namespace"
  UP_DONE=1
  trap - EXIT INT TERM
  log "up: kubectl --kubeconfig ${KUBECONFIG_OUT} get pods -A   (down: hack/node.sh down)"
  echo "${KUBECONFIG_OUT}"
}

# ------------------------------------------------------------------------------------------
# down

stop_pids() { # SECONDS PID...: SIGTERM, wait up to SECONDS, then SIGKILL
  local secs=$1 p i running
  shift
  (($# > 0)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do
    running=0
    for p in "$@"; do alive "${p}" && running=1 && break; done
    ((running)) || return 0
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
  for p in "$@"; do
    while alive "${p}"; do sleep 0.05; done
  done
}

recorded_pids() { # NAME... -> live PIDs recorded under those names (start time checked)
  local name pid st want
  [[ -f ${PIDS} ]] || return 0
  while read -r name pid st; do
    for want in "$@"; do
      [[ ${name} == "${want}" && -n ${st} && "$(proc_start "${pid}")" == "${st}" ]] && alive "${pid}" && echo "${pid}"
    done
  done <"${PIDS}"
  return 0
}

# PIDs whose command line mentions the state directory (containerd shims name our socket), except
# this script and its ancestors (the pattern goes to grep through a file, so that grep's own
# command line does not match).
pids_naming_state_dir() {
  local f pid p=${BASHPID} ancestors=" "
  while [[ -n ${p} && ${p} != 0 && ${p} != 1 ]]; do
    ancestors+="${p} "
    p=$(awk '{ sub(/^.*\) /, ""); print $2 }' "/proc/${p}/stat" 2>/dev/null || true)
  done
  while read -r f; do
    pid=${f#/proc/}
    pid=${pid%/cmdline}
    [[ ${ancestors} == *" ${pid} "* ]] || echo "${pid}"
  done < <(grep -laF -f <(printf '%s/\n' "${NODE_DIR}") /proc/[0-9]*/cmdline 2>/dev/null)
  return 0
}

cgroup_pids() {
  local m
  while read -r m; do
    [[ -d "${m}/${CGROUP_NAME}" ]] && find "${m}/${CGROUP_NAME}" -name cgroup.procs -exec cat {} + 2>/dev/null
  done < <(cgroup_mounts)
  return 0
}

# IDs of this node's containerd tasks and pod sandboxes: from the shims' command lines and from
# containerd's state directory (which outlives a crashed run).
containerd_ids() {
  local pid
  for pid in $(pids_naming_state_dir); do
    { tr '\0' '\n' <"/proc/${pid}/cmdline"; } 2>/dev/null | grep -A1 -x -- -id | sed -n 2p
  done
  find "${CTRD_DIR}/state/io.containerd.runtime.v2.task/k8s.io" \
    "${CTRD_DIR}/state/io.containerd.grpc.v1.cri/sandboxes" -mindepth 1 -maxdepth 1 -type d \
    -printf '%f\n' 2>/dev/null
  return 0
}

# Files this node leaves at containerd 1.6's and go-cni's fixed paths, named after its IDs:
# shim sockets /run/containerd/s/sha256(<grpc address>/<namespace>/<id>) and CNI result cache
# entries <network>-<id>-<interface>.
fixed_path_files() {
  local id
  for id in $(containerd_ids | sort -u); do
    printf '%s/%s\n' "${SHIM_SOCKETS}" "$(printf '%s' "${CTRD_SOCK}/k8s.io/${id}" | sha256sum | cut -d' ' -f1)"
    printf '%s\n' "${CNI_CACHE}/${CNI_NETWORK}-${id}-eth0" "${CNI_CACHE}/cni-loopback-${id}-lo"
  done
}

mounts_under_state_dir() { findmnt -rn -o TARGET | awk -v d="${NODE_DIR}/" 'index($0, d) == 1' | sort -r; }

# teardown [quiet]: stops and removes everything; returns 1 if something is left. A subshell, so
# that its `set +e` and its ignoring of SIGINT (a second Ctrl-C must not leave half a node
# behind) stay local.
teardown() (
  set +e
  trap '' INT
  local quiet=${1:-} p m f shared=1
  local -a files=() pids=()
  if owned_by_other; then
    shared=0
    [[ -e ${NODE_DIR} ]] || return 0
    log "${HOST_IF}, ${RANGE} and the /${CGROUP_NAME} cgroups belong to the node of $(cat "${OWNER_FILE}"): left alone"
  fi
  [[ -e ${NODE_DIR} ]] || [[ -n $(cgroup_pids) ]] || ip link show "${HOST_IF}" >/dev/null 2>&1 || return 0
  [[ -n ${quiet} ]] || log "tearing down ${NODE_DIR}"

  # 1. The node agents first: a running kubelet recreates pods that disappear.
  # shellcheck disable=SC2046
  stop_pids 3 $(recorded_pids kube-proxy kubelet)
  [[ -n ${quiet} ]] || log "node agents stopped"
  # 2. Every container (they live in our cgroups only), at once.
  mapfile -t files < <(fixed_path_files)
  for _ in 1 2 3 4 5; do
    ((shared)) || break
    mapfile -t pids < <(cgroup_pids | sort -u)
    ((${#pids[@]} > 0)) || break
    kill -KILL "${pids[@]}" 2>/dev/null
    sleep 0.2
  done
  [[ -n ${quiet} ]] || log "containers killed"
  # 3. The rest at once, then anything else naming the state directory (containerd shims, a lost
  #    pid record). Nothing here has state worth a graceful stop (etcd runs without fsync and is
  #    wiped), so the grace period is short: kube-apiserver alone lingers for more than 8 s.
  # shellcheck disable=SC2046
  stop_pids 2 $(recorded_pids coredns kube-scheduler kube-controller-manager kube-apiserver etcd containerd)
  # shellcheck disable=SC2046
  stop_pids 0 $(pids_naming_state_dir)
  [[ -n ${quiet} ]] || log "control plane, CoreDNS and containerd stopped"
  rm -f "${PIDS}"
  for f in "${files[@]}"; do rm -f "${f}"; done
  rmdir "${SHIM_SOCKETS}" /run/containerd "${CNI_CACHE}" /var/lib/cni 2>/dev/null
  # The kubelet's device-plugin socket directory is a fixed path; remove it if `up` created it.
  if ((shared)) && grep -qx /var/lib/kubelet "${NODE_DIR}/run/created-paths" 2>/dev/null; then
    rm -rf --one-file-system /var/lib/kubelet
  fi

  # 4. Mounts under the state dir (container rootfs, shm, pod netns, kubelet volumes, the shared
  #    kubelet dir, the node netns), deepest first; a few passes for stacked mounts.
  for _ in 1 2 3 4 5; do
    m=$(mounts_under_state_dir)
    [[ -n ${m} ]] || break
    while read -r p; do umount "${p}" 2>/dev/null || umount -l "${p}" 2>/dev/null; done <<<"${m}"
  done

  [[ -n ${quiet} ]] || log "mounts removed"
  # 5. Network: the namespace went with its last mount and process (bridge, veths, iptables);
  #    its destruction is asynchronous, and the host end of the veth goes with it.
  if ((shared)); then
    for _ in $(seq 1 50); do
      ip link show "${HOST_IF}" >/dev/null 2>&1 || break
      sleep 0.1
    done
    ip link del "${HOST_IF}" 2>/dev/null
    [[ -n ${quiet} ]] || log "network namespace gone"

    # 6. cgroups, deepest first.
    while read -r m; do
      [[ -d "${m}/${CGROUP_NAME}" ]] && find "${m}/${CGROUP_NAME}" -depth -type d -exec rmdir {} + 2>/dev/null
    done < <(cgroup_mounts)
  fi

  # 7. State (kept: the logs of the last run and the lock file).
  rm -rf --one-file-system "${NODE_DIR:?}/run" "${PKI}" "${NODE_DIR}/etcd" "${CTRD_DIR}" \
    "${KUBELET_DIR}" "${NODE_DIR}/runc" "${NODE_DIR}/cni" "${NODE_DIR}/pod-logs" \
    "${NODE_DIR}/coredns" "${NODE_DIR}"/*.yaml "${KUBECONFIG_OUT}" 2>/dev/null
  ((shared)) && rm -f "${OWNER_FILE}"
  leftovers "${shared}"
)

leftovers() { # [SHARED]: prints what is left of the node; returns 1 if anything is
  local left=() m
  [[ -z $(pids_naming_state_dir) ]] || left+=("processes: $(pids_naming_state_dir | tr '\n' ' ')")
  [[ -z $(mounts_under_state_dir) ]] || left+=("mounts: $(mounts_under_state_dir | tr '\n' ' ')")
  if ((${1:-1})); then
    [[ -z $(cgroup_pids) ]] || left+=("processes in /${CGROUP_NAME} cgroups: $(cgroup_pids | tr '\n' ' ')")
    ! ip link show "${HOST_IF}" >/dev/null 2>&1 || left+=("interface ${HOST_IF}")
    [[ -z $(ip route show "${RANGE}") ]] || left+=("route ${RANGE}")
    while read -r m; do
      [[ ! -d "${m}/${CGROUP_NAME}" ]] || left+=("cgroup ${m}/${CGROUP_NAME}")
    done < <(cgroup_mounts)
  fi
  ((${#left[@]} == 0)) && return 0
  printf '[node] left over: %s\n' "${left[@]}" >&2
  return 1
}

cmd_down() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  mkdir -p "$(dirname "${NODE_DIR}")"
  exec 9>"${LOCK_FILE}"
  flock -w 900 9 || die "another hack/node.sh holds ${LOCK_FILE}"
  local t=${SECONDS}
  if teardown; then
    log "down ($((SECONDS - t)) s): nothing left"
  else
    die "down: something is left (see above)"
  fi
}

# ------------------------------------------------------------------------------------------
# status, env

COMPONENTS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler coredns kubelet kube-proxy)

health_check() { # exit 0 healthy, 1 nothing, 2 partial
  local c alive=0 dead=0
  [[ -f ${PIDS} ]] || return 1
  guess_bins
  for c in "${COMPONENTS[@]}"; do
    if recorded_alive "${c}"; then
      alive=$((alive + 1))
      log "${c}: running"
    else
      dead=$((dead + 1))
      log "${c}: not running"
    fi
  done
  ((alive > 0)) || return 1
  ((dead == 0)) || return 2
  api_ready >/dev/null 2>&1 || { log "kube-apiserver: not ready"; return 2; }
  node_ready || { log "node ${NODE_NAME}: not Ready"; return 2; }
  log "node ${NODE_NAME}: Ready"
  egress_rule_is_first || { log "${EGRESS_CHAIN} is not the first rule of FORWARD"; return 2; }
  return 0
}

cmd_status() {
  local rc=0
  health_check || rc=$?
  case ${rc} in
    0) echo "${KUBECONFIG_OUT}" ;;
    1) log "down" ;;
    *) log "partly up: hack/node.sh down" ;;
  esac
  return "${rc}"
}

cmd_env() {
  guess_bins
  cat <<EOF
AUTHREALM_NODE_DIR=${NODE_DIR}
AUTHREALM_NODE_KUBECONFIG=${KUBECONFIG_OUT}
AUTHREALM_NODE_NAME=${NODE_NAME}
AUTHREALM_NODE_API_URL=${API_URL}
AUTHREALM_NODE_IP=${NODE_IP}
AUTHREALM_NODE_HOST_IP=${HOST_IP}
AUTHREALM_NODE_DNS=${NODE_IP}
AUTHREALM_NODE_POD_CIDR=${POD_CIDR}
AUTHREALM_NODE_SERVICE_CIDR=${SERVICE_CIDR}
AUTHREALM_NODE_CONTAINERD_ADDRESS=${CTRD_SOCK}
AUTHREALM_NODE_NETNS=${NETNS}
AUTHREALM_NODE_LOG_DIR=${LOG_DIR}
AUTHREALM_NODE_IMAGES_DIR=${IMAGES_DIR}
AUTHREALM_NODE_BIN=${NODE_BIN}
AUTHREALM_CONTROL_PLANE_BIN=${CP_BIN}
EOF
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) echo "usage: $0 up|down|status|env (see --help)" >&2; exit 2 ;;
esac
