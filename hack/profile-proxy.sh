#!/usr/bin/env bash
# Profile the sidecar's public proxy path next to nginx as a plain reverse proxy (issue 11).
#
#   hack/profile-proxy.sh [SIDECAR_BIN]       # default: the release build
#   ROUNDS=3 SECONDS_PER_RUN=10 PERF_SECONDS=8 hack/profile-proxy.sh
#
# Setup, all on loopback, each process with its own prefix in a temp dir: an nginx upstream
# answering 1 KiB (worker_processes 1, keep-alive); nginx as a plain reverse proxy in front of it
# (worker_processes 1, upstream keepalive); the sidecar in front of the same upstream
# (TOKIO_WORKER_THREADS=1, stateless, HS256, log level warn, one token minted on its issuer API
# and reused). wrk -t1 -c64 drives each proxy in turn. Pinning: the proxy under test on CPU 1,
# wrk and the upstream on CPU 0.
#
# Prints per run: requests/s, p99, and CPU µs per request of the proxy (utime+stime delta from
# /proc/PID/stat ÷ requests, user share in brackets). Then, if perf is usable, records the
# sidecar under load (perf record -e cpu-clock --call-graph dwarf) and prints its top functions;
# with inferno (cargo install inferno) it also writes a flamegraph SVG. Needs nginx, wrk, curl,
# taskset (hack/install-deps.sh installs nginx and wrk).
#
#   CALLGRIND=1 hack/profile-proxy.sh [SIDECAR_BIN]
#
# Instead of timing: runs the proxy nginx (master_process off) and the sidecar under valgrind's
# callgrind and prints user-space instructions per proxied request for each (instrumentation on
# only while wrk runs, after a warm-up), then the sidecar's top functions by inclusive and self
# instructions. Instruction counts do not move with the machine's load, so they compare two builds
# on a busy machine where CPU time cannot; they leave out the kernel (about half of either proxy's
# CPU here, and the same system calls per request) and cache/branch effects. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-}
if [ -z "$BIN" ]; then
    cargo build --release -p authrealm-sidecar --bin authrealm-sidecar >&2
    target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    BIN=$target_dir/release/authrealm-sidecar
fi
ROUNDS=${ROUNDS:-3}
DUR=${SECONDS_PER_RUN:-10}
PERF_SECONDS=${PERF_SECONDS:-8}
NGINX=${NGINX:-/usr/sbin/nginx}
CALLGRIND=${CALLGRIND:-}
VG=()
if [ -n "$CALLGRIND" ]; then
    command -v valgrind >/dev/null || { echo "profile-proxy: CALLGRIND=1 needs valgrind (apt-get install valgrind)" >&2; exit 1; }
    VG=(valgrind --tool=callgrind --instr-atstart=no)
fi
pinned() { # name cpu command...: exec the command on that CPU (under callgrind when CALLGRIND is
    # set); run it with & so that $! is its pid
    local name=$1 cpu=$2; shift 2
    if [ -n "$CALLGRIND" ]; then
        exec taskset -c "$cpu" "${VG[@]}" --callgrind-out-file="$D/cg.$name.%p" "$@"
    else
        exec taskset -c "$cpu" "$@"
    fi
}
for tool in "$NGINX" wrk curl taskset; do
    command -v "$tool" >/dev/null || { echo "profile-proxy: $tool not found" >&2; exit 1; }
done

D=$(mktemp -d /tmp/authrealm-profile.XXXXXX)
chmod 755 "$D" # nginx workers run unprivileged
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port); NG=$(port); SC=$(port); SCI=$(port); SCA=$(port)
mkdir -p "$D/up" "$D/ng"
head -c 1024 /dev/zero | tr '\0' 'a' >"$D/up/data"
cat >"$D/up.conf" <<EOF
worker_processes 1; daemon off; pid $D/up.pid; error_log $D/up.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { root $D/up; try_files /data =404; } } }
EOF
cat >"$D/ng.conf" <<EOF
${CALLGRIND:+master_process off;} worker_processes 1; daemon off; pid $D/ng.pid; error_log $D/ng.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NG;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
taskset -c 0 "$NGINX" -p "$D/up" -c "$D/up.conf" -e "$D/up.err" & pids+=($!)
pinned nginx 1 "$NGINX" -p "$D/ng" -c "$D/ng.conf" -e "$D/ng.err" 2>"$D/ng.vg" & NGPID=$!; pids+=("$NGPID")
"$BIN" keygen --alg HS256 --out "$D/keys.json" >/dev/null
cat >"$D/sidecar.json" <<EOF
{ "version": "authrealm.dev/sidecar-config/v1", "realm": "bench", "issuer": "https://bench.authrealm.local",
  "audiences": ["app"], "algorithms": ["HS256"], "keySetFile": "$D/keys.json", "sessionMode": "stateless",
  "failurePolicy": "closed",
  "listeners": {"public": "127.0.0.1:$SC", "issuer": "127.0.0.1:$SCI", "admin": "127.0.0.1:$SCA"},
  "upstream": {"address": "127.0.0.1:$UP", "connectTimeoutMs": 1000, "responseTimeoutMs": 30000},
  "identityHeaders": [ { "claim": "sub", "header": "X-Auth-Subject" }, { "claim": "jti", "header": "X-Auth-Jti" } ] }
EOF
AUTHREALM_LOG=warn TOKIO_WORKER_THREADS=1 pinned sidecar 1 "$BIN" run --config "$D/sidecar.json" --drain-seconds 1 \
    2>"$D/sidecar.log" & SCPID=$!; pids+=("$SCPID")
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$SCA/healthz" >/dev/null && break; sleep 0.1; done
TOKEN=$(curl -sf -XPOST -H 'content-type: application/json' -d '{"subject":"bench-user"}' \
    "http://127.0.0.1:$SCI/v1/tokens" | sed 's/.*"access_token":"\([^"]*\)".*/\1/')
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$SC/x")" = 200 ] ||
    { echo "profile-proxy: the sidecar does not answer 200; log in $D/sidecar.log" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NG/x")" = 200 ] ||
    { echo "profile-proxy: nginx does not answer 200; see $D" >&2; exit 1; }
NGW=$(pgrep -P "$NGPID" | head -1 || true) # none with master_process off (CALLGRIND)

if [ -n "$CALLGRIND" ]; then
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$NG/x" && break; sleep 0.1; done
    count() { # name pid port [wrk args...]: user-space instructions per request
        local name=$1 pid=$2 p=$3; shift 3
        taskset -c 0 wrk -t1 -c64 -d2s "$@" "http://127.0.0.1:$p/x" >/dev/null # warm-up
        callgrind_control -i on "$pid" >/dev/null
        taskset -c 0 wrk -t1 -c64 -d"${DUR}s" "$@" "http://127.0.0.1:$p/x" >"$D/wrk.$name"
        callgrind_control -i off "$pid" >/dev/null
        callgrind_control -d "$pid" >/dev/null
        for _ in $(seq 100); do compgen -G "$D/cg.$name.*.1" >/dev/null && break; sleep 0.1; done
        sleep 0.5 # the dump file is complete once valgrind has written its totals line
        local n ir
        n=$(awk '/requests in/ { print $1 }' "$D/wrk.$name")
        ir=$(awk '$1 == "totals:" { t = $2 } END { print t + 0 }' "$D/cg.$name".*.1)
        printf '%-8s %6d requests  %7d instructions per request (user space)\n' "$name" "$n" $((ir / n))
    }
    echo "callgrind: wrk -t1 -c64 -d${DUR}s after a 2 s warm-up; instrumentation on only during the measured run"
    count nginx "$NGPID" "$NG"
    count sidecar "$SCPID" "$SC" -H "Authorization: Bearer $TOKEN"
    dump=$(compgen -G "$D/cg.sidecar.*.1" | head -n 1)
    echo "sidecar, inclusive (top 30):"
    callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '3,32p'
    echo "sidecar, self (top 30):"
    callgrind_annotate "$dump" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '3,32p'
    echo "files: $D (callgrind_annotate $dump)"
    exit 0
fi

tck=$(getconf CLK_TCK)
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
one() { # name pid port [wrk args...]
    local name=$1 pid=$2 p=$3; shift 3
    read -r u0 s0 < <(ticks "$pid")
    taskset -c 0 wrk -t1 -c64 -d"${DUR}s" --latency "$@" "http://127.0.0.1:$p/x" >"$D/wrk.out"
    read -r u1 s1 < <(ticks "$pid")
    awk -v name="$name" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v tck="$tck" '
        /requests in/ { n = $1 } /Requests\/sec/ { rps = $2 } $1 == "99%" { p99 = $2 } /Non-2xx/ { bad = $NF }
        END { printf "%-8s req/s %8.0f  p99 %-9s  CPU µs/req %5.1f (user %4.1f)  non-2xx %d\n",
              name, rps, p99, (u + s) * 1e6 / tck / n, u * 1e6 / tck / n, bad }' "$D/wrk.out"
}
echo "wrk -t1 -c64 -d${DUR}s; proxies on CPU 1, wrk and upstream on CPU 0; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do
    one nginx "$NGW" "$NG"
    one sidecar "$SCPID" "$SC" -H "Authorization: Bearer $TOKEN"
done

if command -v perf >/dev/null && [ "$PERF_SECONDS" -gt 0 ]; then
    taskset -c 0 wrk -t1 -c64 -d$((PERF_SECONDS + 2))s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$SC/x" \
        >/dev/null & W=$!
    sleep 1
    if perf record -q -e cpu-clock -F 999 --call-graph dwarf,8192 -p "$SCPID" -o "$D/perf.data" \
        -- sleep "$PERF_SECONDS" >/dev/null 2>&1; then
        wait "$W" || true
        perf report -i "$D/perf.data" --no-children --stdio --sort symbol 2>/dev/null |
            grep -E '^ +[0-9.]+%' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' | head -25
        if command -v inferno-collapse-perf >/dev/null; then
            perf script -i "$D/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph >"$D/sidecar.svg"
            echo "flamegraph: $D/sidecar.svg"
        fi
    else
        wait "$W" || true
        echo "perf record failed (perf_event_paranoid?); no profile" >&2
    fi
fi
echo "files: $D"
