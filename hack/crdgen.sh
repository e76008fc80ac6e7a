#!/usr/bin/env bash
# Regenerate the AuthRealm CRD from the Rust types into both committed copies:
# crds/authrealm.yaml (kubectl apply) and charts/authrealm/crds/authrealm.yaml (Helm).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p authrealm-operator -- crdgen > crds/authrealm.yaml
cp crds/authrealm.yaml charts/authrealm/crds/authrealm.yaml
echo "wrote crds/authrealm.yaml and charts/authrealm/crds/authrealm.yaml"
