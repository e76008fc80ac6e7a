#!/usr/bin/env bash
# The local demo: the authrealm sidecar in front of the example login app
# (examples/login-app), backed by a real 6-node Redis Cluster on loopback.
#
#   hack/demo.sh           # set up, walk through login/logout with curl, tear down
#   hack/demo.sh --keep    # ... then keep everything running until Ctrl-C
#
# It installs redis-server/redis-tools when missing (hack/install-deps.sh), builds the
# sidecar, starts a Redis Cluster (3 masters + 3 replicas on 127.0.0.1:7101-7106), generates
# an ES256 key set, starts the sidecar (127.0.0.1:8443 public, :8444 issuer API, :9901
# admin) and the app (127.0.0.1:8080), then checks every step's HTTP status. Any unexpected
# status makes it exit non-zero, so it doubles as a smoke test.
#
# Environment:
#   DEMO_PROFILE=debug        build and run the debug sidecar (default: release)
#   AUTHREALM_SIDECAR_BIN=…   use this sidecar binary instead of building one
#   DEMO_VERBOSE=1            print full response bodies
set -euo pipefail
orig_pwd=$PWD
cd "$(dirname "$0")/.."
repo=$(pwd)

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

keep=0
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "demo: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

readonly HOST=127.0.0.1
readonly REDIS_PORTS=(7101 7102 7103 7104 7105 7106)
readonly PUBLIC="http://$HOST:8443" ISSUER="http://$HOST:8444" ADMIN="http://$HOST:9901"
readonly APP_LISTEN="$HOST:8080"
readonly DEMO_USER=alice DEMO_PASSWORD=demo-only-password # see examples/login-app/README.md
profile=${DEMO_PROFILE:-release}
verbose=${DEMO_VERBOSE:-0}

if [ -t 1 ]; then
    bold=$'\e[1m' green=$'\e[32m' red=$'\e[31m' dim=$'\e[2m' reset=$'\e[0m'
else
    bold='' green='' red='' dim='' reset=''
fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset"; }
info() { printf '    %s\n' "$*"; }
die() { printf '%sdemo: %s%s\n' "$red" "$*" "$reset" >&2; exit 1; }

# --- processes we start, and teardown --------------------------------------------------
pids=()
tmp=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "${#pids[@]}" -gt 0 ]; then
        printf '\n%sdemo: stopping sidecar, app and Redis Cluster%s\n' "$dim" "$reset" >&2
        local pid
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for _ in $(seq 50); do
            local alive=0
            for pid in "${pids[@]}"; do
                if kill -0 "$pid" 2>/dev/null; then alive=1; fi
            done
            [ "$alive" -eq 0 ] && break
            sleep 0.1
        done
        for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    fi
    if [ -n "$tmp" ] && [ -d "$tmp" ]; then rm -rf "$tmp"; fi
    exit "$rc"
}
trap cleanup EXIT
# Ctrl-C (or SIGTERM) is the normal way out of --keep once the walk-through passed;
# before that it is a failure.
on_signal() { if [ "$keep" -eq 1 ] && [ "${walked:-0}" -eq 1 ]; then exit 0; else exit "$1"; fi; }
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

show_logs() {
    [ -n "$tmp" ] || return 0
    local f
    for f in "$tmp/sidecar.log" "$tmp/app.log" "$tmp/cluster-create.log"; do
        if [ -s "$f" ]; then
            printf '%s--- last lines of %s ---%s\n' "$dim" "${f##*/}" "$reset" >&2
            tail -n 20 "$f" >&2
        fi
    done
}
fail() {
    printf '%sFAIL: %s%s\n' "$red" "$*" "$reset" >&2
    show_logs
    exit 1
}

# TCP port in use on loopback?
port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Wait until "$@" succeeds, for at most $1 seconds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then fail "timed out after ${secs}s waiting for $what"; fi
        sleep 0.2
    done
}

# --- prerequisites -----------------------------------------------------------------------
step "Prerequisites"
bash hack/install-deps.sh
for cmd in curl python3; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is required (apt-get install -y $cmd)"
done
python3 -c 'import sys; sys.exit(sys.version_info < (3, 7))' || die "python3 >= 3.7 is required"
busy=()
for port in "${REDIS_PORTS[@]}" $((REDIS_PORTS[0] + 10000)) $((REDIS_PORTS[5] + 10000)) 8080 8443 8444 9901; do
    if port_busy "$port"; then busy+=("$port"); fi
done
[ "${#busy[@]}" -eq 0 ] || die "ports already in use on $HOST: ${busy[*]} (another demo running?)"

if [ -n "${AUTHREALM_SIDECAR_BIN:-}" ]; then
    sidecar_bin=$AUTHREALM_SIDECAR_BIN
    case "$sidecar_bin" in /*) ;; *) sidecar_bin="$orig_pwd/$sidecar_bin" ;; esac
    info "using sidecar binary $sidecar_bin"
else
    step "Building the sidecar ($profile)"
    case "$profile" in
        release) cargo build --release -p authrealm-sidecar ;;
        debug) cargo build -p authrealm-sidecar ;;
        *) die "DEMO_PROFILE must be release or debug, not '$profile'" ;;
    esac
    target_dir=$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    sidecar_bin="$target_dir/$profile/authrealm-sidecar"
fi
[ -x "$sidecar_bin" ] || die "no sidecar binary at $sidecar_bin"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/authrealm-demo.XXXXXX")

# --- Redis Cluster -----------------------------------------------------------------------
step "Starting a Redis Cluster: 3 masters + 3 replicas on $HOST:${REDIS_PORTS[0]}-${REDIS_PORTS[5]}"
rcli() { redis-cli -h "$HOST" -p "$1" "${@:2}"; }
for port in "${REDIS_PORTS[@]}"; do
    dir="$tmp/redis/$port"
    mkdir -p "$dir"
    redis-server --port "$port" --bind "$HOST" --daemonize no \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
        --repl-diskless-sync-delay 0 --save "" --appendonly no \
        --dir "$dir" >"$dir/redis.log" 2>&1 &
    pids+=("$!")
done
for port in "${REDIS_PORTS[@]}"; do
    wait_for 15 "redis-server on port $port" sh -c "redis-cli -h $HOST -p $port PING | grep -q PONG"
done
nodes=()
for port in "${REDIS_PORTS[@]}"; do nodes+=("$HOST:$port"); done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$tmp/cluster-create.log" 2>&1 ||
    fail "redis-cli --cluster create failed"
grep -q '\[ERR\]' "$tmp/cluster-create.log" && fail "redis-cli --cluster create reported an error"

cluster_ok() {
    local port
    for port in "${REDIS_PORTS[@]}"; do
        rcli "$port" CLUSTER INFO | grep -q '^cluster_state:ok' || return 1
    done
}
replicas_online() {
    local port masters=0
    for port in "${REDIS_PORTS[@]}"; do
        local repl
        repl=$(rcli "$port" INFO replication | tr -d '\r')
        if grep -q '^role:master' <<<"$repl"; then
            masters=$((masters + 1))
            grep -q '^slave0:.*state=online' <<<"$repl" || return 1
        fi
    done
    [ "$masters" -eq 3 ]
}
wait_for 60 "cluster_state:ok on every node" cluster_ok
wait_for 60 "every master's replica to be online" replicas_online
info "cluster_state:ok; each node's own view:"
for port in "${REDIS_PORTS[@]}"; do
    rcli "$port" CLUSTER NODES | awk -v addr="$HOST:$port" '/myself/ {
        if ($3 ~ /master/) { s = ""; for (i = 9; i <= NF; i++) s = s " " $i; printf "      %s  master, slots%s\n", addr, s }
        else printf "      %s  replica of node %s\n", addr, substr($4, 1, 8) }'
done

# --- keys, sidecar, app ------------------------------------------------------------------
step "Generating an ES256 key set (authrealm-sidecar keygen)"
kid=$(cd "$tmp" && "$sidecar_bin" keygen --alg ES256 --out keyset.json --public-out public-keyset.json)
info "current key id: $kid  ($tmp/keyset.json)"

step "Starting the sidecar (examples/login-app/sidecar.json) and the login app"
# keySetFile in the example config is relative: run the sidecar from the temp dir.
(cd "$tmp" && NO_COLOR=1 exec "$sidecar_bin" run --config "$repo/examples/login-app/sidecar.json" --drain-seconds 2) \
    >"$tmp/sidecar.log" 2>&1 &
pids+=("$!")
LOGIN_APP_LISTEN=$APP_LISTEN python3 examples/login-app/app.py serve >"$tmp/app.log" 2>&1 &
pids+=("$!")
curl_q() { curl -s --noproxy '*' --max-time 2 "$@"; }
wait_for 30 "the sidecar to be ready ($ADMIN/readyz)" curl_q -f "$ADMIN/readyz"
wait_for 15 "the login app on $APP_LISTEN" sh -c "curl -s --noproxy '*' -o /dev/null http://$APP_LISTEN/me"
info "sidecar: public $PUBLIC, issuer API $ISSUER (loopback only), admin $ADMIN"
info "app:     http://$APP_LISTEN (reached only through the sidecar)"
info "$(curl_q "$ADMIN/readyz")"

# --- walk-through --------------------------------------------------------------------------
# call EXPECTED METHOD PATH [curl args...]: one request to the public listener, printed.
# Sets $status and $body; fails the demo when the status differs from EXPECTED.
n=0
status="" body=""
call() {
    local expected=$1 method=$2 path=$3
    shift 3
    n=$((n + 1))
    local shown=()
    local a
    for a in "$@"; do
        # Abbreviate tokens in the printed command line.
        if [[ "$a" == "Authorization: Bearer "* ]]; then a="Authorization: Bearer ${a:22:12}…"; fi
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@-]+$ ]]; then shown+=("$a"); else shown+=("'$a'"); fi
    done
    printf '    %s$ curl -X %s %s%s %s%s\n' "$dim" "$method" "$PUBLIC" "$path" "${shown[*]}" "$reset"
    status=$(curl -sS --noproxy '*' --max-time 10 -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}' \
        -X "$method" "$PUBLIC$path" "$@") || fail "step $n: curl failed"
    body=$(cat "$tmp/body")
    local shown_body=$body
    if [ "$verbose" != 1 ] && [ "${#shown_body}" -gt 160 ]; then shown_body="${shown_body:0:160}…"; fi
    local www
    www=$(grep -i '^www-authenticate:' "$tmp/headers" | tr -d '\r' || true)
    if [ "$status" = "$expected" ]; then
        printf '    %s%s ✓%s %s\n' "$green" "$status" "$reset" "$shown_body"
        if [ -n "$www" ]; then printf '      %s%s%s\n' "$dim" "$www" "$reset"; fi
    else
        printf '    %s%s ✗ expected %s%s %s\n' "$red" "$status" "$expected" "$reset" "$shown_body"
        fail "step $n ($method $path): got HTTP $status, expected $expected"
    fi
}
json_field() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$body" "$1"; }
expect_field() {
    local got
    got=$(json_field "$1") || fail "step $n: no field '$1' in the response"
    [ "$got" = "$2" ] || fail "step $n: '$1' is '$got', expected '$2'"
}
bearer() { printf 'Authorization: Bearer %s' "$1"; }

step "1. GET /me without a token: the sidecar answers, the app never sees the request"
call 401 GET /me

step "2. POST /login with a wrong password"
call 401 POST /login -H 'Content-Type: application/json' \
    --data "{\"username\":\"$DEMO_USER\",\"password\":\"wrong\"}"

step "3. POST /login as $DEMO_USER (a public route): the app checks the scrypt hash, the sidecar mints"
call 200 POST /login -H 'Content-Type: application/json' \
    --data "{\"username\":\"$DEMO_USER\",\"password\":\"$DEMO_PASSWORD\"}"
token1=$(json_field access_token)
jti1=$(json_field jti)
info "token 1: ${token1:0:24}…  jti $jti1  (replicas confirmed: $(json_field replicas_confirmed))"

step "4. GET /me with token 1: the app reads the identity headers the sidecar set"
call 200 GET /me -H "$(bearer "$token1")"
expect_field subject "$DEMO_USER"
expect_field jti "$jti1"

step "5. GET /me with token 1 and a spoofed X-Auth-Subject: the sidecar strips it"
call 200 GET /me -H "$(bearer "$token1")" -H 'X-Auth-Subject: admin' -H 'X_Auth_Subject: admin'
expect_field subject "$DEMO_USER"

step "6. POST /login again (form-encoded): sessionMode single replaces the first session"
call 200 POST /login --data-urlencode "username=$DEMO_USER" --data-urlencode "password=$DEMO_PASSWORD"
token2=$(json_field access_token)
jti2=$(json_field jti)
expect_field replaced_sessions 1
info "token 2: ${token2:0:24}…  jti $jti2  (replaced sessions: 1)"

step "7. GET /me with token 1: rejected on the very next request (its signature is still valid)"
call 401 GET /me -H "$(bearer "$token1")"

step "8. GET /me with token 2"
call 200 GET /me -H "$(bearer "$token2")"
expect_field jti "$jti2"

step "9. POST /logout with token 2: the app revokes its jti through the issuer API"
call 200 POST /logout -H "$(bearer "$token2")"

step "10. GET /me with token 2 after logout"
call 401 GET /me -H "$(bearer "$token2")"

step "11. Log in, then POST /logout-everywhere: every token of $DEMO_USER is revoked"
call 200 POST /login -H 'Content-Type: application/json' \
    --data "{\"username\":\"$DEMO_USER\",\"password\":\"$DEMO_PASSWORD\"}"
token3=$(json_field access_token)
call 200 POST /logout-everywhere -H "$(bearer "$token3")"
call 401 GET /me -H "$(bearer "$token3")"

step "12. POST /logout without a token"
call 401 POST /logout

printf '\n%sAll %d requests answered as expected.%s\n' "$green$bold" "$n" "$reset"
walked=1

cat <<EOF

Keep playing: run hack/demo.sh --keep to leave everything up until Ctrl-C, then
(the password is demo-only; see examples/login-app/README.md):
    TOKEN=\$(curl -s -H 'Content-Type: application/json' \\
        -d '{"username":"$DEMO_USER","password":"$DEMO_PASSWORD"}' $PUBLIC/login | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
    curl -i -H "Authorization: Bearer \$TOKEN" $PUBLIC/me
    curl -i -X POST -H "Authorization: Bearer \$TOKEN" $PUBLIC/logout
    curl -s -d "token=\$TOKEN" $ISSUER/v1/introspect        # RFC 7662, issuer API (loopback only)
    curl -s $PUBLIC/.well-known/jwks.json                    # public keys
    curl -s $ADMIN/metrics | grep sidecar_requests         # outcomes by reason
    redis-cli --cluster call $HOST:${REDIS_PORTS[0]} KEYS 'ar:*'   # session records: ids and expiry only
EOF

if [ "$keep" -eq 1 ]; then
    printf '\nEverything is running (logs in %s). Press Ctrl-C to stop.\n' "$tmp"
    while :; do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || fail "process $pid exited"
        done
        sleep 1
    done
fi
