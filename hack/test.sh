#!/usr/bin/env bash
# The one command that runs every test: installs what the harnesses need, builds (once,
# cached outside the repo) the Kubernetes control plane from source, then runs format,
# lint and the whole test suite against a real Redis Cluster and a real kube-apiserver — and, as
# root, on a real one-node Kubernetes (tests/tests/node_e2e.rs: hack/node.sh, images packed from
# the debug binaries this `cargo test` builds; the node binaries are built once and cached).
# Gates before the tests: rustfmt, clippy with the workspace lints as errors, unused dependencies
# (cargo-machete), the dependency audit (cargo-deny; deny.toml) and shellcheck (a test).
#
#   hack/test.sh            # everything
#   hack/test.sh -- <args>  # extra arguments for `cargo test` (e.g. a test name filter)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "system packages (redis-server, redis-tools, openssl, faketime, containerd, runc, CNI plugins, iptables, …)"
bash hack/install-deps.sh

step "toolchains"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
command -v go >/dev/null || { echo "go not found: needed once to build kube-apiserver/etcd/helm from source" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

step "Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, helm; cached)"
bin_dir=$(bash hack/control-plane.sh | tail -n 1)
export AUTHREALM_CONTROL_PLANE_BIN="$bin_dir"
echo "control plane binaries: $bin_dir" >&2

step "local node binaries (kube-scheduler, kubelet, kube-proxy, kubectl, CoreDNS, pause; cached)"
node_started=$SECONDS
node_bin_dir=$(bash hack/node-bins.sh | tail -n 1)
export AUTHREALM_NODE_BIN="$node_bin_dir"
echo "node binaries: $node_bin_dir ($((SECONDS - node_started)) s)" >&2

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "dependency gates: unused dependencies (cargo machete), audit (cargo deny, deny.toml)"
tools=$(bash hack/cargo-tools.sh | tail -n 1)
"$tools/cargo-machete"
"$tools/cargo-deny" check bans licenses sources
# Advisories need the RustSec database from GitHub, which CI machines may not reach.
if "$tools/cargo-deny" fetch db >/dev/null 2>&1; then
    "$tools/cargo-deny" check advisories
elif compgen -G "$HOME/.cargo/advisory-dbs/advisory-db-*/crates" >/dev/null; then
    db=$(compgen -G "$HOME/.cargo/advisory-dbs/advisory-db-*" | head -n 1)
    echo "advisories: github.com unreachable; checking against the local copy ($(git -C "$db" log -1 --format=%cs 2>/dev/null || echo 'date unknown'))" >&2
    "$tools/cargo-deny" --offline check advisories
else
    echo "advisories: SKIPPED — the RustSec database (github.com/RustSec/advisory-db) cannot be fetched from this machine" >&2
fi

step "build every binary and test once (cargo test --no-run); the harnesses get their paths"
cargo test --workspace --no-run
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export AUTHREALM_BIN_DIR="$target_dir/debug"
export AUTHREALM_SIDECAR_BIN="$AUTHREALM_BIN_DIR/authrealm-sidecar"
for bin in authrealm-operator authrealm-sidecar; do
    [ -x "$AUTHREALM_BIN_DIR/$bin" ] || { echo "test: $AUTHREALM_BIN_DIR/$bin was not built" >&2; exit 1; }
done

step "cargo test (unit tests, real Redis Cluster, real kube-apiserver, real node: node_e2e)"
extra=()
if [ "${1:-}" = "--" ]; then shift; extra=("$@"); fi
cargo test --workspace --no-fail-fast -- "${extra[@]}"
