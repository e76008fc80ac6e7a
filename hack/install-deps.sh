#!/usr/bin/env bash
# Installs the system packages the test harnesses need (Debian/Ubuntu):
#   redis-server  -> /usr/bin/redis-server   (tests/src/redis_cluster.rs)
#   redis-tools   -> /usr/bin/redis-cli      (cluster create, CLUSTER/INFO queries)
#   openssl       -> /usr/bin/openssl        (test certificates)
#   faketime      -> /usr/bin/faketime       (sidecars whose clocks differ, tests/tests/sidecar_revocation.rs)
# Idempotent: does nothing (and no apt-get update) when all commands are present.
# Does not touch the Rust or Go toolchains.
set -euo pipefail

# command -> Debian package providing it
declare -A PKG_FOR=(
    [redis-server]=redis-server
    [redis-cli]=redis-tools
    [openssl]=openssl
    [shellcheck]=shellcheck
    [faketime]=faketime
)

missing=()
for cmd in redis-server redis-cli openssl shellcheck faketime; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        missing+=("${PKG_FOR[$cmd]}")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: redis-server, redis-cli, openssl, shellcheck and faketime already present"
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

for cmd in redis-server redis-cli openssl shellcheck faketime; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "install-deps: '$cmd' still missing after installing ${missing[*]}" >&2
        exit 1
    fi
done
echo "install-deps: $(redis-server --version | head -n1)"
