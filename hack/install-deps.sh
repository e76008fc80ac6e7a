#!/usr/bin/env bash
# Installs the system packages the test harnesses need (Debian/Ubuntu):
#   redis-server  -> /usr/bin/redis-server   (tests/src/redis_cluster.rs)
#   redis-tools   -> /usr/bin/redis-cli      (cluster create, CLUSTER/INFO queries)
#   openssl       -> /usr/bin/openssl        (test certificates)
#   /usr/bin/shellcheck (package shellcheck): lint of hack/*.sh
#   faketime      -> /usr/bin/faketime       (sidecars whose clocks differ, tests/tests/sidecar_revocation.rs)
# and what the local one-node Kubernetes (hack/node.sh, hack/images.sh) needs:
#   containerd                  -> /usr/bin/containerd, /usr/bin/ctr   (container runtime, CRI)
#   runc                        -> /usr/sbin/runc                      (OCI runtime)
#   containernetworking-plugins -> /usr/lib/cni/bridge, host-local, …  (pod network)
#   iptables                    -> /usr/sbin/iptables                  (kube-proxy, drop rule)
#   busybox-static              -> /bin/busybox                        (test image with a shell)
#   jq                          -> /usr/bin/jq                         (OCI image configs, hack/images.sh)
#   python3                     -> /usr/bin/python3                    (the login app's image, hack/images.sh)
# Idempotent: does nothing (and no apt-get update) when everything is present.
# Debian's containerd package starts no daemon here (no systemd); hack/node.sh runs its own.
# Does not touch the Rust or Go toolchains.
set -euo pipefail

# what must exist (a command name, or an absolute path) -> Debian package providing it
checks=(
    redis-server:redis-server
    redis-cli:redis-tools
    openssl:openssl
    shellcheck:shellcheck
    faketime:faketime
    containerd:containerd
    ctr:containerd
    runc:runc
    /usr/lib/cni/bridge:containernetworking-plugins
    /usr/lib/cni/host-local:containernetworking-plugins
    /usr/lib/cni/loopback:containernetworking-plugins
    iptables:iptables
    /bin/busybox:busybox-static
    jq:jq
    /usr/bin/python3:python3
)

present() {
    case "$1" in
        /*) [ -x "$1" ] ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

missing_packages() {
    local entry what pkg
    local -A seen=()
    for entry in "${checks[@]}"; do
        what=${entry%%:*}
        pkg=${entry#*:}
        if ! present "$what" && [ -z "${seen[$pkg]:-}" ]; then
            seen[$pkg]=1
            printf '%s\n' "$pkg"
        fi
    done
}

mapfile -t missing < <(missing_packages)

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: redis-server, redis-cli, openssl, shellcheck, faketime, containerd, runc, CNI plugins, iptables, busybox, jq and python3 already present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}" >&2
    echo "install-deps: not running as root; install them with:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing packages: ${missing[*]}, and apt-get is not available" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing ${missing[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"

mapfile -t still_missing < <(missing_packages)
if [ "${#still_missing[@]}" -ne 0 ]; then
    echo "install-deps: still missing after installing ${missing[*]}: ${still_missing[*]}" >&2
    exit 1
fi
echo "install-deps: $(redis-server --version | head -n1)"
echo "install-deps: containerd $(containerd --version | awk '{print $3}'), $(runc --version | head -n1)"
