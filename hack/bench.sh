#!/usr/bin/env bash
# The benchmark command (speed figures live here, not in the tests):
#
#   hack/bench.sh                       # defaults: 64 connections, 10 s per mode, 1000 tokens
#   hack/bench.sh --duration-secs 5 --connections 32 --tokens 500 --micro-secs 1
#
# Builds the release sidecar and the benchmark binary (tests/src/bin/bench.rs), then runs it:
# a token::validate micro-benchmark per algorithm, and end-to-end load on loopback against a
# real Redis Cluster (started and torn down by the benchmark) in four modes — direct to the
# upstream, stateless ES256, single-mode ES256, and a flood of revoked tokens. Only
# 127.0.0.1 is contacted; the run takes about a minute with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-deps.sh >&2
echo "bench: building release binaries (authrealm-sidecar, bench)" >&2
cargo build --release -p authrealm-sidecar -p authrealm-tests --bin authrealm-sidecar --bin bench

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "bench: cannot find cargo's target directory" >&2; exit 1; }
export AUTHREALM_SIDECAR_BIN="${AUTHREALM_SIDECAR_BIN:-$target_dir/release/authrealm-sidecar}"
exec "$target_dir/release/bench" "$@"
