#!/usr/bin/env bash
# Build (once) and cache the binaries a local one-node Kubernetes needs on top of
# hack/control-plane.sh's etcd, kube-apiserver and kube-controller-manager:
#
#   kube-scheduler, kubelet, kube-proxy, kubectl   Kubernetes v1.36.3 (Go module proxy)
#   coredns                                        CoreDNS, cluster DNS for *.svc.cluster.local
#   pause                                          Kubernetes' build/pause/linux/pause.c, gcc -static
#
# They land in a version-keyed cache directory OUTSIDE the repository:
#
#   ${AUTHREALM_CACHE:-$HOME/.cache/authrealm}/node-bins/k8s-v1.36.3-coredns-v1.15.0/bin/
#
# Usage: hack/node-bins.sh
#   Progress goes to stderr; the LAST line of stdout is the bin directory (callers capture it).
#   Idempotent: when every binary already exists it only prints the directory. Concurrent
#   invocations serialise on a flock(1) lock; binaries are built under a temporary name and
#   renamed into place.
#
# Kubernetes is built exactly as hack/control-plane.sh builds kube-apiserver: a throwaway wrapper
# module requires k8s.io/kubernetes v1.36.3 and replaces every staging module by its published
# v0.36.3 (unpublished ones, i.e. k8s.io/sample-cli-plugin, by an empty stub). The module graph is
# the one k8s.io/kubernetes pins, so with CGO_ENABLED=0 and -trimpath every package shared with
# kube-apiserver is a Go build cache hit. Run hack/control-plane.sh first to profit from that.
#
# CoreDNS is built from a small wrapper main (the documented way to choose plugins at compile time):
# only the plugins the node's Corefile uses are linked, so the cloud-provider SDKs of the default
# build (route53, azure, clouddns) are neither downloaded nor compiled. v1.15.0 requires go 1.26.0
# and k8s.io/client-go v0.37.1 (structured-merge-diff v6), which Go 1.26 builds.
#
# pause.c comes from the k8s.io/kubernetes module downloaded for the wrapper (build/pause/linux/),
# compiled with `gcc -static` as upstream's build/pause/Makefile does, so the sandbox image has no
# dependency at all.
set -euo pipefail

K8S_VERSION=v1.36.3
K8S_MAJOR=1
K8S_MINOR=36
STAGING_VERSION=v0.36.3
COREDNS_VERSION=v1.15.0
K8S_CMDS=(kube-scheduler kubelet kube-proxy kubectl)
# CoreDNS plugins linked into the binary, in the chain order of CoreDNS's own
# core/dnsserver/zdirectives.go (the order matters; keep it a subsequence of that list).
COREDNS_PLUGINS=(bind ready health errors log loadbalance cache kubernetes)

CACHE_ROOT=${AUTHREALM_CACHE:-$HOME/.cache/authrealm}
KEY="k8s-${K8S_VERSION}-coredns-${COREDNS_VERSION}"
BIN_DIR="${CACHE_ROOT}/node-bins/${KEY}/bin"
REQUIRED=("${K8S_CMDS[@]}" coredns pause)

log() { printf '[node-bins] %s\n' "$*" >&2; }

all_present() {
  local b
  for b in "${REQUIRED[@]}"; do
    [[ -x "${BIN_DIR}/${b}" ]] || return 1
  done
  [[ -f "${BIN_DIR}/versions" ]]
}

if all_present; then
  echo "${BIN_DIR}"
  exit 0
fi

mkdir -p "${BIN_DIR}"
exec 9>"${BIN_DIR}/../build.lock"
log "waiting for the build lock ${BIN_DIR}/../build.lock"
flock 9
if all_present; then
  echo "${BIN_DIR}"
  exit 0
fi

command -v go >/dev/null || { log "go is not installed"; exit 1; }
command -v gcc >/dev/null || { log "gcc is not installed (needed for the static pause binary)"; exit 1; }
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
export GOTOOLCHAIN=local

WORK=$(mktemp -d "${TMPDIR:-/tmp}/authrealm-node-bins.XXXXXX")
trap 'rm -rf "${WORK}"; rm -f "${BIN_DIR}"/.*.tmp' EXIT
log "work dir ${WORK}, go $(go env GOVERSION)"

install_bin() {
  chmod 0755 "$1"
  mv -f "$1" "${BIN_DIR}/$2"
}

timed() {
  local name=$1 start end
  shift
  start=$(date +%s)
  "$@" || return $?
  end=$(date +%s)
  log "${name}: built in $((end - start)) s"
  printf '%s_build_seconds=%s\n' "${name}" "$((end - start))" >>"${BIN_DIR}/.timings"
}

go_version() { go env GOVERSION | sed 's/^go//'; }

# --- Kubernetes -------------------------------------------------------------------------------
K8S_MODULE_DIR=""
build_kubernetes() {
  local mod_json gomod wrapper m stub cmd
  local -a staging missing=()
  wrapper="${WORK}/k8s"
  mkdir -p "${wrapper}"
  log "downloading k8s.io/kubernetes@${K8S_VERSION}"
  mod_json=$(cd "${WORK}" && go mod download -json "k8s.io/kubernetes@${K8S_VERSION}")
  gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"${mod_json}")
  K8S_MODULE_DIR=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"${mod_json}")
  [[ -f "${gomod}" ]] || { log "cannot locate go.mod of k8s.io/kubernetes: ${mod_json}"; return 1; }
  mapfile -t staging < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "${gomod}")
  log "${#staging[@]} staging modules to replace with ${STAGING_VERSION}"
  ((${#staging[@]} > 0)) || { log "no staging replaces found in ${gomod}"; return 1; }

  {
    echo "module authrealm.local/node-bins-k8s"
    echo
    echo "go $(go_version)"
    echo
    echo "require k8s.io/kubernetes ${K8S_VERSION}"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do
      if (cd "${WORK}" && go mod download "${m}@${STAGING_VERSION}") >/dev/null 2>&1; then
        echo "	${m} => ${m} ${STAGING_VERSION}"
      else
        missing+=("${m}")
        stub="${wrapper}/stub/${m#k8s.io/}"
        mkdir -p "${stub}"
        printf 'module %s\n\ngo 1.24\n' "${m}" >"${stub}/go.mod"
        echo "	${m} => ./stub/${m#k8s.io/}"
      fi
    done
    echo ")"
  } >"${wrapper}/go.mod"
  if ((${#missing[@]} > 0)); then
    log "not on the module proxy at ${STAGING_VERSION}, stubbed: ${missing[*]}"
  fi
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for cmd in "${K8S_CMDS[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "${cmd}"; done
    printf ')\n'
  } >"${wrapper}/tools.go"
  log "resolving the Kubernetes module graph (go mod tidy)"
  go -C "${wrapper}" mod tidy

  local ldflags="-s -w" key val
  for key in client-go/pkg/version component-base/version; do
    for val in "gitVersion=${K8S_VERSION}" "gitMajor=${K8S_MAJOR}" "gitMinor=${K8S_MINOR}" \
      "gitTreeState=clean" "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
      ldflags+=" -X k8s.io/${key}.${val}"
    done
  done

  for cmd in "${K8S_CMDS[@]}"; do
    [[ -x "${BIN_DIR}/${cmd}" ]] && continue
    log "building ${cmd} ${K8S_VERSION} (this takes minutes)"
    timed "${cmd}" go -C "${wrapper}" build -trimpath -ldflags "${ldflags}" \
      -o "${BIN_DIR}/.${cmd}.tmp" "k8s.io/kubernetes/cmd/${cmd}"
    install_bin "${BIN_DIR}/.${cmd}.tmp" "${cmd}"
  done
}

# --- pause ------------------------------------------------------------------------------------
build_pause() {
  [[ -x "${BIN_DIR}/pause" ]] && return 0
  local src="${K8S_MODULE_DIR}/build/pause/linux/pause.c"
  [[ -f "${src}" ]] || { log "pause.c not found at ${src}"; return 1; }
  log "compiling pause (${src#"${K8S_MODULE_DIR}/"}) with gcc -static"
  timed pause gcc -Os -Wall -Werror -static -DVERSION="${K8S_VERSION}-authrealm" \
    -o "${BIN_DIR}/.pause.tmp" "${src}"
  strip "${BIN_DIR}/.pause.tmp"
  install_bin "${BIN_DIR}/.pause.tmp" pause
}

# --- CoreDNS ----------------------------------------------------------------------------------
build_coredns() {
  [[ -x "${BIN_DIR}/coredns" ]] && return 0
  local wrapper="${WORK}/coredns" p
  mkdir -p "${wrapper}"
  cat >"${wrapper}/go.mod" <<EOF
module authrealm.local/node-bins-coredns

go $(go_version)

require github.com/coredns/coredns ${COREDNS_VERSION}
EOF
  {
    printf '// A CoreDNS with only the plugins the local node needs (hack/node-bins.sh).\n'
    printf 'package main\n\nimport (\n'
    printf '\t"github.com/coredns/coredns/core/dnsserver"\n'
    printf '\t"github.com/coredns/coredns/coremain"\n\n'
    for p in "${COREDNS_PLUGINS[@]}"; do printf '\t_ "github.com/coredns/coredns/plugin/%s"\n' "${p}"; done
    printf ')\n\nfunc init() {\n\tdnsserver.Directives = []string{\n'
    for p in "${COREDNS_PLUGINS[@]}"; do printf '\t\t"%s",\n' "${p}"; done
    printf '\t}\n}\n\nfunc main() { coremain.Run() }\n'
  } >"${wrapper}/main.go"
  log "resolving the CoreDNS ${COREDNS_VERSION} module graph (go mod tidy)"
  go -C "${wrapper}" mod tidy
  log "building coredns ${COREDNS_VERSION}"
  timed coredns go -C "${wrapper}" build -trimpath \
    -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}" \
    -o "${BIN_DIR}/.coredns.tmp" .
  install_bin "${BIN_DIR}/.coredns.tmp" coredns
}

touch "${BIN_DIR}/.timings"
build_kubernetes
build_pause
build_coredns

{
  echo "# Written by hack/node-bins.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) with $(go env GOVERSION)"
  echo "kubernetes=${K8S_VERSION}"
  echo "kubernetes_staging=${STAGING_VERSION}"
  echo "coredns=${COREDNS_VERSION}"
  echo "coredns_plugins=${COREDNS_PLUGINS[*]}"
  echo "pause=${K8S_VERSION} build/pause/linux/pause.c, $(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion) -static"
  cat "${BIN_DIR}/.timings"
} >"${BIN_DIR}/.versions.tmp"
mv -f "${BIN_DIR}/.versions.tmp" "${BIN_DIR}/versions"

log "done: $(find "${BIN_DIR}" -maxdepth 1 -type f ! -name '.*' -printf '%f ')"
echo "${BIN_DIR}"
