#!/usr/bin/env bash
# The operator and webhook at scale (issue 11, item 5):
#
#   hack/bench-operator.sh                          # 1,000 realms, 120 s idle, 1,000 admissions
#   hack/bench-operator.sh --realms 100 --idle-secs 30 --admissions 200    # a quick run
#   AUTHREALM_OPERATOR_BIN=/path/to/authrealm-operator hack/bench-operator.sh   # another build
#
# Builds the release operator and the benchmark binary (tests/src/bin/bench_operator.rs), then
# runs it against a real kube-apiserver (with an audit log) and a real Redis Cluster, both on
# loopback and torn down afterwards: time until all realms are Ready and the operator's peak
# RSS, API requests/s and new Redis connections/min while idle, webhook latency. Prints a
# Markdown table with the targets and writes bench-results/<timestamp>/operator.{json,md}
# (--out-dir to choose). Needs the control plane binaries (hack/control-plane.sh, or
# AUTHREALM_CONTROL_PLANE_BIN) and helm, as the tests do. About 4 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-deps.sh >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "bench-operator: cannot find cargo's target directory" >&2; exit 1; }
if [ -z "${AUTHREALM_OPERATOR_BIN:-}" ]; then
    echo "bench-operator: building release binaries (authrealm-operator, bench_operator)" >&2
    cargo build --release -p authrealm-operator -p authrealm-tests --bin authrealm-operator --bin bench_operator
    export AUTHREALM_OPERATOR_BIN="$target_dir/release/authrealm-operator"
else
    echo "bench-operator: operator $AUTHREALM_OPERATOR_BIN; building the benchmark binary" >&2
    cargo build --release -p authrealm-tests --bin bench_operator
fi
exec "$target_dir/release/bench_operator" "$@"
