#!/usr/bin/env bash
# The benchmark command: authrealm against its peers in one run (speed figures live here, not in the tests).
#
#   hack/bench.sh                 # full run (~7 min on 2 cores): maximum throughput = median of 3 × 5 s,
#                                 # fixed rate 10 s, 2 s warm-ups
#   hack/bench.sh --quick         # short run (~2 min): one 3 s run each, smaller token pools
#   hack/bench.sh --operator      # also the operator/webhook scale benchmark (hack/bench-operator.sh)
#   hack/bench.sh --all           # same as --operator
#   hack/bench.sh --publish       # also copy results.md and latency.png to docs/bench/ and put the
#                                 # results into README.md's Performance section (between bench markers)
#   hack/bench.sh --only nginx,stateless-es256,oauth2-proxy   # a subset of rows (the anchor always runs)
#   any other flag goes to the benchmark binary (tests/src/bin/bench.rs --help):
#   --duration-secs N --rounds N --fixed-secs N --warmup-secs N --connections N --tokens N
#   --micro-secs N --rate-fraction F (fixed rate as a fraction of the anchor's maximum, default 0.6)
#
# Rows, each its own processes behind the same upstream (Debian's nginx answering 1 KB, keep-alive):
# direct; nginx as a plain reverse proxy (the anchor); authrealm stateless HS256/ES256/EdDSA with warm
# and cold tokens; single-session ES256 (a real Redis Cluster on loopback) with the session cache off
# and on; a revoked-token flood; oauth2-proxy (built here through the Go module proxy) with the same
# ES256 tokens, and with an `aud` its provider does not accept. Each at maximum throughput (wrk,
# closed loop) and warm rows at one fixed rate (open loop, coordinated-omission corrected).
#
# Output: bench-results/<UTC timestamp>/{results.json,results.md,latency.png} (git-ignored; a copy
# chosen for the README lives in docs/bench/). Progress goes to stderr. Only 127.0.0.1 is contacted.
#
# Dependencies installed here only (Debian packages, as root): nginx (run with its own prefix and
# config, never the system service), wrk, and python3-matplotlib for the plot (matplotlib rather than
# the plotters crate: no new Rust dependencies in the workspace, and only this command needs it).
# oauth2-proxy is built once per version into ${AUTHREALM_CACHE:-~/.cache/authrealm}/oauth2-proxy/<version>/
# (OAUTH2_PROXY_VERSION, default v7.15.6, the newest v7 when this was written; "latest" asks the Go
# module proxy). If it cannot be built, its rows say why and the other rows run.
#
# CPU pinning (2+ CPUs): every proxy runs on the last CPU (taskset -c N); the benchmark, wrk, the
# upstream nginx and Redis on the others.
set -euo pipefail
cd "$(dirname "$0")/.."

operator=0
publish=0
pass=()
out=""
for arg in "$@"; do
    case "$arg" in
        --operator | --all) operator=1 ;;
        --publish) publish=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) pass+=("$arg") ;;
    esac
done
for ((i = 0; i < ${#pass[@]}; i++)); do
    if [ "${pass[$i]}" = "--out" ] && [ $((i + 1)) -lt ${#pass[@]} ]; then out=${pass[$((i + 1))]}; fi
done

log() { echo "bench.sh: $*" >&2; }

bash hack/install-deps.sh >&2

# --- benchmark-only packages ---
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1 || need+=(python3-matplotlib)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    else
        log "missing packages: ${need[*]} (install them: sudo apt-get install -y ${need[*]})"
        exit 1
    fi
fi
export PATH="$PATH:/usr/sbin"

# --- oauth2-proxy through the Go module proxy, cached per version outside the repository ---
cache_root=${AUTHREALM_CACHE:-$HOME/.cache/authrealm}
o2p_version=${OAUTH2_PROXY_VERSION:-v7.15.6}
o2p_args=()
o2p_reason=""
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then export PATH="$PATH:/usr/local/go/bin"; fi
if ! command -v go >/dev/null 2>&1; then
    o2p_reason="go is not installed, so oauth2-proxy could not be built"
else
    if [ "$o2p_version" = latest ]; then
        o2p_version=$( (cd /tmp && go list -m -versions github.com/oauth2-proxy/oauth2-proxy/v7 2>/dev/null) | tr ' ' '\n' | grep '^v7\.' | grep -v -- - | tail -n 1) || true
        [ -n "$o2p_version" ] || o2p_reason="the Go module proxy did not list oauth2-proxy v7 versions"
    fi
    if [ -z "$o2p_reason" ]; then
        o2p_dir="$cache_root/oauth2-proxy/$o2p_version"
        o2p_bin="$o2p_dir/bin/oauth2-proxy"
        mkdir -p "$o2p_dir"
        if [ ! -x "$o2p_bin" ]; then
            log "building oauth2-proxy $o2p_version with go install (once; cached in $o2p_dir)"
            (
                flock 9
                if [ ! -x "$o2p_bin" ]; then
                    rm -rf "$o2p_dir/bin.tmp"
                    if (cd /tmp && GOBIN="$o2p_dir/bin.tmp" GOFLAGS=-mod=mod go install "github.com/oauth2-proxy/oauth2-proxy/v7@$o2p_version") >"$o2p_dir/build.log" 2>&1; then
                        rm -rf "${o2p_dir:?}/bin" && mv "$o2p_dir/bin.tmp" "$o2p_dir/bin"
                    fi
                fi
            ) 9>"$o2p_dir/.lock"
        fi
        if [ -x "$o2p_bin" ]; then
            o2p_args=(--oauth2-proxy "$o2p_bin")
            export BENCH_OAUTH2_PROXY_VERSION="$o2p_version"
        else
            o2p_reason="go install github.com/oauth2-proxy/oauth2-proxy/v7@$o2p_version failed: $(tail -n 1 "$o2p_dir/build.log" 2>/dev/null)"
        fi
    fi
fi
if [ -n "$o2p_reason" ]; then
    log "oauth2-proxy unavailable: $o2p_reason"
    o2p_args=(--oauth2-proxy-unavailable "$o2p_reason")
fi

# --- release binaries ---
log "building release binaries (authrealm-sidecar, bench)"
cargo build --release -q -p authrealm-sidecar -p authrealm-tests --bin authrealm-sidecar --bin bench >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { log "cannot find cargo's target directory"; exit 1; }
export AUTHREALM_SIDECAR_BIN="$target_dir/release/authrealm-sidecar"
BENCH_GIT_REV="$(git describe --always --dirty 2>/dev/null || echo unknown) ($(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo '?'))"
export BENCH_GIT_REV

# --- CPU pinning: the proxy on the last CPU, everything else on the rest ---
ncpu=$(nproc)
pin=()
pin_args=()
if [ "$ncpu" -ge 2 ]; then
    proxy_cpu=$((ncpu - 1))
    pin=(taskset -c "0-$((ncpu - 2))")
    pin_args=(--proxy-cpu "$proxy_cpu")
fi

if [ -z "$out" ]; then
    out="bench-results/$(date -u +%Y%m%dT%H%M%SZ)"
    pass+=(--out "$out")
fi
mkdir -p "$out"
log "running the benchmark; results in $out"
"${pin[@]}" "$target_dir/release/bench" "${pin_args[@]}" "${o2p_args[@]}" "${pass[@]}"

log "plotting $out/latency.png"
/usr/bin/python3 hack/lib/bench_plot.py "$out/results.json" "$out/latency.png" >&2

# --- operator and webhook at scale (issue 11 item 5): a separate script, run when asked -------
# HOOK: hack/bench-operator.sh is owned by the operator-scale work. When present and --operator/--all
# is given, it runs with BENCH_OUT_DIR set; whatever Markdown it writes to $BENCH_OUT_DIR/operator.md
# is appended to results.md.
if [ "$operator" = 1 ]; then
    if [ -f hack/bench-operator.sh ]; then
        log "running hack/bench-operator.sh"
        BENCH_OUT_DIR="$out" bash hack/bench-operator.sh >&2
        if [ -f "$out/operator.md" ]; then
            { echo; cat "$out/operator.md"; } >>"$out/results.md"
        fi
    else
        log "--operator: hack/bench-operator.sh is not in this tree; skipped"
    fi
fi

if [ "$publish" = 1 ]; then
    log "publishing to docs/bench/ and README.md"
    mkdir -p docs/bench
    cp "$out/results.md" "$out/latency.png" "$out/results.json" docs/bench/
    /usr/bin/python3 hack/lib/bench_plot.py --readme README.md docs/bench/results.md >&2
fi

log "done: $out/results.json, $out/results.md, $out/latency.png"
