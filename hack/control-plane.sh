#!/usr/bin/env bash
# Build (once) and cache the binaries of a real Kubernetes control plane for tests:
# etcd, kube-apiserver, kube-controller-manager and helm.
#
# Everything is compiled from source fetched through the Go module proxy — no release tarballs,
# no Docker. The binaries land in a version-keyed cache directory OUTSIDE the repository:
#
#   ${AUTHREALM_CACHE:-$HOME/.cache/authrealm}/control-plane/k8s-v1.36.3-etcd-v3.6.x-helm-v3.22.0/bin/
#
# Usage: hack/control-plane.sh
#   Progress goes to stderr; the LAST line of stdout is the bin directory (callers capture it).
#   Idempotent: when every required binary already exists it only prints the directory.
#   Concurrent invocations serialise on a flock(1) lock in the cache directory, and every binary is
#   built under a temporary name and renamed into place, so a half-written binary is never visible.
#
# How Kubernetes is built: k8s.io/kubernetes pins each k8s.io/* "staging" module at v0.0.0 with
# `replace … => ./staging/src/k8s.io/…`, which is why `go install k8s.io/kubernetes/cmd/…@v1.36.3`
# refuses it. A throwaway wrapper module requires k8s.io/kubernetes v1.36.3 and replaces every staging
# module (the list is read from the downloaded k8s.io/kubernetes go.mod) by its published v0.36.3.
# The version is stamped with -ldflags -X, as upstream's hack/lib/version.sh does, so /version is sane.
#
# Notes from building it here (Go 1.26.8):
#   * k8s.io/sample-cli-plugin is a staging module in the v1.36.3 go.mod but is not published on the
#     Go module proxy at all ("not found" for every version). No command we build imports it, so the
#     wrapper replaces such unpublished staging modules by an empty local stub module.
#   * Kubernetes 1.37 needs Go 1.27 (sigs.k8s.io/structured-merge-diff/v7), hence 1.36.x here.
#   * etcd: the main package of go.etcd.io/etcd/server/v3, tried in the order of ETCD_VERSIONS below;
#     the first that builds wins and is recorded in the `versions` file. v3.6.16 built first time.
#   * Nothing failed. Cold build on 2 cores (empty Go module and build caches): etcd 75 s,
#     kube-apiserver 267 s, kube-controller-manager 113 s, helm 132 s — about
#     10 minutes with downloads. With a warm Go build cache a fresh cache directory takes ~15 s.
set -euo pipefail

K8S_VERSION=v1.36.3
K8S_MAJOR=1
K8S_MINOR=36
STAGING_VERSION=v0.36.3
# Tried in order; the first that builds is used.
ETCD_VERSIONS=(v3.6.16 v3.6.15 v3.6.14 v3.6.13)
HELM_VERSION=v3.22.0

CACHE_ROOT=${AUTHREALM_CACHE:-$HOME/.cache/authrealm}
KEY="k8s-${K8S_VERSION}-etcd-v3.6.x-helm-${HELM_VERSION}"
BIN_DIR="${CACHE_ROOT}/control-plane/${KEY}/bin"
REQUIRED=(etcd kube-apiserver kube-controller-manager helm)

log() { printf '[control-plane] %s\n' "$*" >&2; }

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
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
# Never let the Go command switch toolchains behind our back.
export GOTOOLCHAIN=local

WORK=$(mktemp -d "${TMPDIR:-/tmp}/authrealm-control-plane.XXXXXX")
trap 'rm -rf "${WORK}"; rm -f "${BIN_DIR}"/.*.tmp' EXIT
log "work dir ${WORK}, go $(go env GOVERSION)"

# Installs $1 (a freshly built file) as ${BIN_DIR}/$2 atomically.
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

# --- Kubernetes -------------------------------------------------------------------------------
build_kubernetes() {
  local mod_json gomod wrapper m stub
  local -a staging missing=()
  wrapper="${WORK}/k8s"
  mkdir -p "${wrapper}"
  log "downloading k8s.io/kubernetes@${K8S_VERSION} go.mod"
  mod_json=$(cd "${WORK}" && go mod download -json "k8s.io/kubernetes@${K8S_VERSION}")
  gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"${mod_json}")
  [[ -f "${gomod}" ]] || { log "cannot locate go.mod of k8s.io/kubernetes: ${mod_json}"; return 1; }
  mapfile -t staging < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "${gomod}")
  log "${#staging[@]} staging modules to replace with ${STAGING_VERSION}"
  ((${#staging[@]} > 0)) || { log "no staging replaces found in ${gomod}"; return 1; }

  {
    echo "module authrealm.local/control-plane-k8s"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//')"
    echo
    echo "require k8s.io/kubernetes ${K8S_VERSION}"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do
      if (cd "${WORK}" && go mod download "${m}@${STAGING_VERSION}") >/dev/null 2>&1; then
        echo "	${m} => ${m} ${STAGING_VERSION}"
      else
        # Unpublished staging module (k8s.io/sample-cli-plugin): an empty stub satisfies the graph.
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
  cat >"${wrapper}/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
EOF
  log "resolving the Kubernetes module graph (go mod tidy)"
  go -C "${wrapper}" mod tidy

  local ldflags="-s -w" key val
  for key in client-go/pkg/version component-base/version; do
    for val in "gitVersion=${K8S_VERSION}" "gitMajor=${K8S_MAJOR}" "gitMinor=${K8S_MINOR}" \
      "gitTreeState=clean" "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
      ldflags+=" -X k8s.io/${key}.${val}"
    done
  done

  local cmd
  for cmd in kube-apiserver kube-controller-manager; do
    [[ -x "${BIN_DIR}/${cmd}" ]] && continue
    log "building ${cmd} ${K8S_VERSION} (this takes minutes)"
    timed "${cmd}" go -C "${wrapper}" build -trimpath -ldflags "${ldflags}" \
      -o "${BIN_DIR}/.${cmd}.tmp" "k8s.io/kubernetes/cmd/${cmd}"
    install_bin "${BIN_DIR}/.${cmd}.tmp" "${cmd}"
  done
}

# --- etcd -------------------------------------------------------------------------------------
ETCD_BUILT=""
build_etcd_version() {
  local v=$1 wrapper="${WORK}/etcd-$1"
  mkdir -p "${wrapper}"
  cat >"${wrapper}/go.mod" <<EOF
module authrealm.local/control-plane-etcd

go $(go env GOVERSION | sed 's/^go//')

require go.etcd.io/etcd/server/v3 ${v}
EOF
  cat >"${wrapper}/tools.go" <<'EOF'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
  go -C "${wrapper}" mod tidy &&
    timed etcd go -C "${wrapper}" build -trimpath -ldflags "-s -w" \
      -o "${BIN_DIR}/.etcd.tmp" go.etcd.io/etcd/server/v3
}

build_etcd() {
  local v
  if [[ -x "${BIN_DIR}/etcd" ]]; then
    ETCD_BUILT=$("${BIN_DIR}/etcd" --version | sed -n 's/^etcd Version: /v/p')
    return 0
  fi
  for v in "${ETCD_VERSIONS[@]}"; do
    log "building etcd ${v}"
    if build_etcd_version "${v}"; then
      install_bin "${BIN_DIR}/.etcd.tmp" etcd
      ETCD_BUILT=${v}
      return 0
    fi
    log "etcd ${v} failed to build; trying the next patch version"
    echo "# etcd ${v} failed to build" >>"${WORK}/failures"
  done
  log "no etcd version built"
  return 1
}

# --- helm ------------------------------------------------------------------------------------
build_helm() {
  [[ -x "${BIN_DIR}/helm" ]] && return 0
  log "building helm ${HELM_VERSION}"
  mkdir -p "${WORK}/gobin"
  timed helm env GOBIN="${WORK}/gobin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  install_bin "${WORK}/gobin/helm" helm
}

touch "${BIN_DIR}/.timings" "${WORK}/failures"
build_etcd
build_kubernetes
build_helm

{
  echo "# Written by hack/control-plane.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) with $(go env GOVERSION)"
  echo "kubernetes=${K8S_VERSION}"
  echo "kubernetes_staging=${STAGING_VERSION}"
  echo "etcd=${ETCD_BUILT}"
  echo "helm=${HELM_VERSION}"
  cat "${BIN_DIR}/.timings" "${WORK}/failures"
} >"${BIN_DIR}/.versions.tmp"
mv -f "${BIN_DIR}/.versions.tmp" "${BIN_DIR}/versions"

log "done: $(find "${BIN_DIR}" -maxdepth 1 -type f ! -name '.*' -printf '%f ')"
echo "${BIN_DIR}"
