#!/usr/bin/env bash
# Builds (once, cached outside the repo, keyed by version) the cargo tools the test command's
# hygiene gates run, and prints the directory holding their binaries as the last line:
#   cargo-deny     dependency audit: licenses, duplicate versions, sources (and advisories when
#                  the RustSec database can be fetched) — deny.toml
#   cargo-machete  unused dependencies
# Cache: ${AUTHREALM_CACHE:-$HOME/.cache/authrealm}/cargo-tools/deny-<v>-machete-<v>/bin
# (about 5 minutes of compiling on 2 cores the first time; `cargo install --locked`).
set -euo pipefail

readonly DENY_VERSION=0.20.2 MACHETE_VERSION=0.9.1
root="${AUTHREALM_CACHE:-$HOME/.cache/authrealm}/cargo-tools/deny-${DENY_VERSION}-machete-${MACHETE_VERSION}"
log() { printf '[cargo-tools] %s\n' "$*" >&2; }

install() { # CRATE VERSION BINARY
    local crate=$1 version=$2 binary=$3 started=$SECONDS
    if [ -x "$root/bin/$binary" ]; then return 0; fi
    log "building $crate $version (cargo install --locked; cached in $root)"
    # Its own target directory: never the workspace's (whose CARGO_TARGET_DIR may be exported).
    CARGO_TARGET_DIR="$root/build" cargo install --quiet --locked --root "$root" "$crate@$version" >&2
    rm -rf "$root/build"
    log "$crate $version built in $((SECONDS - started)) s"
}

install cargo-deny "$DENY_VERSION" cargo-deny
install cargo-machete "$MACHETE_VERSION" cargo-machete
echo "$root/bin"
