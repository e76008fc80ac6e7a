#!/usr/bin/env bash
# Packs the images the local node runs into OCI archives (no registry, no Docker) and imports them
# into the node's containerd when the node is up (hack/node.sh).
#
# Usage: hack/images.sh [--no-import] [IMAGE...]
#   IMAGE is one of the names below, or `base` (pause + busybox); default: all of them.
#   Archives go to ${AUTHREALM_IMAGES_DIR:-${AUTHREALM_CACHE:-$HOME/.cache/authrealm}/images}/NAME.tar;
#   hack/node.sh up imports every archive of that directory, so images survive a down/up.
#   stdout: one line per image, "REFERENCE sha256:MANIFEST_DIGEST ARCHIVE"; progress on stderr.
#
#   pause     localhost/authrealm/pause:v1.36.3       the node's sandbox image: Kubernetes' pause.c
#                                                     built static by hack/node-bins.sh; user 65535
#   busybox   localhost/authrealm/busybox:<version>   Debian's busybox-static + applet links (sh,
#                                                     nslookup, wget, nc, …) for test pods
#   redis     localhost/authrealm/redis:<version>     Debian's redis-server and redis-cli, plus sh
#                                                     and the tools (bash, getent, grep, awk) that
#                                                     hack/kind/redis-cluster.yaml's commands use;
#                                                     user 999 like the kind manifests
#   operator  localhost/authrealm/authrealm-operator:dev   release binaries, in the runtime shape
#   sidecar   localhost/authrealm/authrealm-sidecar:dev    of images/{operator,sidecar}.Dockerfile
#   login-app localhost/authrealm/login-app:dev       examples/login-app (Python) in the shape of its
#                                                     Dockerfile, on this host's Debian python3
#
# The operator and sidecar images are not hand-written twins of the Dockerfiles: their config
# (USER, EXPOSE, ENTRYPOINT, CMD, ENV, WORKDIR, LABEL) and the binary's destination (the COPY
# --from=build line) are READ from the Dockerfile's last stage, so the two cannot drift. That stage
# must be FROM gcr.io/distroless/cc-debian12:nonroot, which this script stands in for with what the
# distroless image holds and is built from: this Debian 12 host's glibc libraries (as ldd names
# them), CA certificates, /etc/passwd and /etc/group with root and nonroot (65532),
# /etc/nsswitch.conf, /tmp and /home/nonroot, and its default config (user 65532, WorkingDir
# /home/nonroot, PATH, SSL_CERT_FILE).
# No shell is added: like distroless, the image has none.
#
# The binaries come from ${AUTHREALM_BIN_DIR:-${AUTHREALM_RELEASE_DIR:-${CARGO_TARGET_DIR:-target}/release}}:
#   cargo build --release -p authrealm-operator -p authrealm-sidecar
# AUTHREALM_BIN_DIR may name a debug profile directory instead (the end-to-end tests pack the
# debug binaries `cargo test` already built, e.g. target/debug). Debug info is stripped from the
# image's copy either way (`strip --strip-debug`); the code is the binary's own.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=hack/lib/oci.sh
source hack/lib/oci.sh

CACHE_ROOT=${AUTHREALM_CACHE:-$HOME/.cache/authrealm}
IMAGES_DIR=${AUTHREALM_IMAGES_DIR:-${CACHE_ROOT}/images}
RELEASE_DIR=${AUTHREALM_BIN_DIR:-${AUTHREALM_RELEASE_DIR:-${CARGO_TARGET_DIR:-target}/release}}
ALL=(pause busybox redis operator sidecar login-app)
DISTROLESS_BASE=gcr.io/distroless/cc-debian12:nonroot

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

import=1
wanted=()
for arg in "$@"; do
  case "${arg}" in
    --no-import) import=0 ;;
    base) wanted+=(pause busybox) ;;
    pause | busybox | redis | operator | sidecar | login-app) wanted+=("${arg}") ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown image '${arg}' (one of: ${ALL[*]}, base)" ;;
  esac
done
((${#wanted[@]} > 0)) || wanted=("${ALL[@]}")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/authrealm-images.XXXXXX")
trap 'rm -rf "${WORK}"' EXIT
mkdir -p "${IMAGES_DIR}"

# config JSON on stdin -> ${WORK}/NAME.json; packs ROOTFS; records "ref digest archive".
BUILT=()
pack() {
  local short=$1 ref=$2 root=$3 line
  cat >"${WORK}/${short}.json"
  line=$(oci_archive "${root}" "${ref}" "${WORK}/${short}.json" "${IMAGES_DIR}/${short}.tar")
  BUILT+=("${line} ${IMAGES_DIR}/${short}.tar")
  log "${short}: ${line}"
}

passwd_files() { # ROOTFS "name:uid" ...
  local root=$1 entry name uid home
  shift
  mkdir -p "${root}/etc"
  : >"${root}/etc/passwd"
  : >"${root}/etc/group"
  for entry in "$@"; do
    name=${entry%%:*} uid=${entry#*:}
    case "${name}" in
      root) home=/root ;;
      nonroot) home=/home/nonroot ;;
      *) home=/nonexistent ;;
    esac
    printf '%s:x:%s:%s:%s:%s:/sbin/nologin\n' "${name}" "${uid}" "${uid}" "${name}" "${home}" >>"${root}/etc/passwd"
    printf '%s:x:%s:\n' "${name}" "${uid}" >>"${root}/etc/group"
  done
}

tmp_dir() { mkdir -p "$1/tmp" && chmod 1777 "$1/tmp"; }

busybox_tree() { # ROOTFS: /bin/busybox and one link per applet
  local root=$1 applet
  [[ -x /bin/busybox ]] || die "/bin/busybox missing: run hack/install-deps.sh (busybox-static)"
  ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is dynamic; install busybox-static"
  install -D -m 0755 /bin/busybox "${root}/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [[ ${applet} == busybox || -e "${root}/bin/${applet}" ]] || ln -s busybox "${root}/bin/${applet}"
  done
}

image_pause() {
  local bin_dir root="${WORK}/pause"
  bin_dir=${AUTHREALM_NODE_BIN:-$(bash hack/node-bins.sh | tail -n 1)}
  [[ -x "${bin_dir}/pause" ]] || die "no pause binary in ${bin_dir}"
  install -D -m 0755 "${bin_dir}/pause" "${root}/pause"
  pack pause localhost/authrealm/pause:v1.36.3 "${root}" <<'JSON'
{"User": "65535:65535", "Entrypoint": ["/pause"], "WorkingDir": "/"}
JSON
}

image_busybox() {
  local root="${WORK}/busybox" version
  busybox_tree "${root}"
  passwd_files "${root}" root:0 nobody:65534 nonroot:65532
  tmp_dir "${root}"
  version=$(/bin/busybox | sed -n '1s/^BusyBox v\([0-9.]*\).*/\1/p')
  pack busybox "localhost/authrealm/busybox:${version}" "${root}" <<'JSON'
{"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"}
JSON
}

image_redis() {
  local root="${WORK}/redis" version bin
  for bin in redis-server redis-cli bash getent; do
    command -v "${bin}" >/dev/null || die "${bin} missing: run hack/install-deps.sh"
  done
  busybox_tree "${root}"
  mkdir -p "${root}/usr/local/bin"
  for bin in redis-server redis-cli bash getent; do
    rm -f "${root}/bin/${bin}"
    oci_add_binary "${root}" "$(readlink -f "$(command -v "${bin}")")" "/usr/local/bin/${bin}"
  done
  passwd_files "${root}" root:0 redis:999 nonroot:65532
  printf 'hosts: files dns\npasswd: files\ngroup: files\n' >"${root}/etc/nsswitch.conf"
  tmp_dir "${root}"
  mkdir -p "${root}/data" && chmod 0777 "${root}/data"
  version=$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')
  pack redis "localhost/authrealm/redis:${version}" "${root}" <<'JSON'
{"User": "999:999", "Cmd": ["redis-server"], "Env": ["PATH=/usr/local/bin:/bin"],
 "ExposedPorts": {"6379/tcp": {}}, "WorkingDir": "/data"}
JSON
}

# Prints the instructions of the last stage of a Dockerfile, one per line ("KEYWORD args"), with
# continuation lines joined and comments dropped.
dockerfile_runtime_stage() {
  awk '
    /^[[:space:]]*#/ { next }
    { line = cont $0; cont = "" }
    line ~ /\\[[:space:]]*$/ { sub(/\\[[:space:]]*$/, " ", line); cont = line; next }
    line ~ /^[[:space:]]*$/ { next }
    { sub(/^[[:space:]]+/, "", line); split(line, w, /[[:space:]]+/)
      if (toupper(w[1]) == "FROM") { n = 0 }
      stage[n++] = line }
    END { for (i = 0; i < n; i++) print stage[i] }
  ' "$1"
}

# words of a shell-quoted string, one per line (LABEL a="b c" d=e -> a=b c / d=e)
words() { printf '%s' "$1" | xargs -n 1 printf '%s\n'; }

# parse_stage DOCKERFILE BASE_CONFIG_JSON: reads the last stage of DOCKERFILE into STAGE_FROM,
# STAGE_CFG (BASE_CONFIG_JSON with USER, WORKDIR, EXPOSE, ENTRYPOINT, CMD, ENV and LABEL applied),
# STAGE_COPIES (the arguments of each COPY) and STAGE_RUNS (each RUN, for the caller to judge).
# Anything else in the stage is refused: the recipe would silently differ from the Dockerfile.
parse_stage() {
  local dockerfile=$1 kw args kv
  STAGE_FROM="" STAGE_CFG=$2 STAGE_COPIES=() STAGE_RUNS=()
  while read -r kw args; do
    case "${kw^^}" in
      FROM) STAGE_FROM=${args%% *} ;;
      USER) STAGE_CFG=$(jq -c --arg u "${args}" '.User = $u' <<<"${STAGE_CFG}") ;;
      WORKDIR) STAGE_CFG=$(jq -c --arg d "${args}" '.WorkingDir = $d' <<<"${STAGE_CFG}") ;;
      EXPOSE)
        STAGE_CFG=$(jq -c --arg p "${args}" '.ExposedPorts = ((.ExposedPorts // {}) + ([$p | splits(" +") | select(. != "")
          | if test("/") then . else . + "/tcp" end | {(.): {}}] | add))' <<<"${STAGE_CFG}") ;;
      ENTRYPOINT | CMD)
        [[ ${args} == \[* ]] || die "${dockerfile}: only the exec (JSON) form of ${kw} is supported"
        STAGE_CFG=$(jq -c --arg k "${kw^^}" --argjson v "${args}" \
          '(if $k == "CMD" then "Cmd" else "Entrypoint" end) as $key | .[$key] = $v' <<<"${STAGE_CFG}") ;;
      ENV | LABEL)
        while read -r kv; do
          [[ ${kv} == *=* ]] || die "${dockerfile}: only the key=value form of ${kw} is supported"
          if [[ ${kw^^} == ENV ]]; then
            STAGE_CFG=$(jq -c --arg k "${kv%%=*}" --arg kv "${kv}" \
              '.Env = ([(.Env // [])[] | select(startswith($k + "=") | not)] + [$kv])' <<<"${STAGE_CFG}")
          else
            STAGE_CFG=$(jq -c --arg k "${kv%%=*}" --arg v "${kv#*=}" '.Labels[$k] = $v' <<<"${STAGE_CFG}")
          fi
        done < <(words "${args}")
        ;;
      COPY) STAGE_COPIES+=("${args}") ;;
      RUN) STAGE_RUNS+=("${args}") ;;
      ARG | "") ;;
      *) die "${dockerfile}: the runtime stage has ${kw}, which this recipe does not reproduce" ;;
    esac
  done < <(dockerfile_runtime_stage "${dockerfile}")
}

image_from_dockerfile() { # SHORT DOCKERFILE: a release binary on the distroless stand-in
  local short=$1 dockerfile=$2 root="${WORK}/$1" copy src dest binary
  parse_stage "${dockerfile}" '{"User": "65532", "WorkingDir": "/home/nonroot", "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]}'
  [[ ${STAGE_FROM} == "${DISTROLESS_BASE}" ]] ||
    die "${dockerfile}: runtime stage is FROM '${STAGE_FROM}'; this recipe stands in for ${DISTROLESS_BASE} only"
  ((${#STAGE_RUNS[@]} == 0)) || die "${dockerfile}: RUN in a distroless runtime stage: ${STAGE_RUNS[0]}"
  ((${#STAGE_COPIES[@]} > 0)) || die "${dockerfile}: no COPY --from=build in the runtime stage"

  for copy in "${STAGE_COPIES[@]}"; do
    [[ ${copy} == --from=build\ * ]] || die "${dockerfile}: unexpected COPY in the runtime stage: ${copy}"
    read -r src dest <<<"${copy#--from=build }"
    # The build stage installs target/release/NAME as /out/NAME.
    binary="${RELEASE_DIR}/$(basename "${src}")"
    [[ -x ${binary} ]] || die "${binary} not found: cargo build --release -p $(basename "${src}") (or set AUTHREALM_BIN_DIR)"
    [[ ${dest} == */ ]] && dest="${dest}$(basename "${src}")"
    oci_add_binary "${root}" "${binary}" "${dest}"
    strip --strip-debug "${root}${dest}"
  done
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "${root}/etc/ssl/certs/ca-certificates.crt"
  passwd_files "${root}" root:0 nobody:65534 nonroot:65532
  printf 'hosts: files dns\n' >"${root}/etc/nsswitch.conf"
  tmp_dir "${root}"
  mkdir -p "${root}/home/nonroot"
  pack "${short}" "localhost/authrealm/authrealm-${short}:dev" "${root}" <<<"${STAGE_CFG}"
}

# The example login app (Python standard library only) from examples/login-app/Dockerfile, whose
# single stage is FROM python:3-slim. The stand-in for that base is this host's Debian python3
# (interpreter, standard library without its tests and GUI/dev parts, and the shared libraries of
# the interpreter and its C modules), linked as python3 in /usr/local/bin like the official image.
# The Dockerfile's RUN steps are reproduced here, each one checked against the text: the user
# app (10001) in passwd/group, the files 0444, and the app's own `check` (run on the host).
image_login_app() {
  local dir=examples/login-app root="${WORK}/login-app" py stdlib so run copy src dest
  parse_stage "${dir}/Dockerfile" '{"Env": ["PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"], "Cmd": ["python3"]}'
  [[ ${STAGE_FROM} == python:3-slim ]] || die "${dir}/Dockerfile: FROM '${STAGE_FROM}'; this recipe stands in for python:3-slim only"
  for run in "${STAGE_RUNS[@]}"; do
    run=$(tr -s '[:space:]' ' ' <<<"${run}")
    case "${run% }" in
      "groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app "*) ;;
      "chmod 0444 /app/app.py /app/users.json && python3 /app/app.py check") ;;
      *) die "${dir}/Dockerfile: a RUN step this recipe does not reproduce: ${run}" ;;
    esac
  done
  py=$(readlink -f /usr/bin/python3) || die "/usr/bin/python3 missing: run hack/install-deps.sh"
  stdlib="/usr/lib/$(basename "${py}")"
  [[ -d ${stdlib} ]] || die "no standard library at ${stdlib}"
  oci_add_binary "${root}" "${py}" "${py}"
  ln -s "$(basename "${py}")" "${root}/usr/bin/python3"
  mkdir -p "${root}/usr/local/bin"
  ln -s "${py}" "${root}/usr/local/bin/python3"
  mkdir -p "${root}${stdlib}"
  tar -C "${stdlib}" --exclude=./test --exclude=./idlelib --exclude=./tkinter --exclude=./turtledemo \
    --exclude=./ensurepip --exclude=./lib2to3 --exclude=./pydoc_data --exclude='./config-*' \
    --exclude=./site-packages --exclude=./dist-packages -cf - . | tar -C "${root}${stdlib}" -xf -
  for so in "${root}${stdlib}"/lib-dynload/*.so; do
    oci_add_binary "${WORK}/login-app-libs" "${so}" /so
  done
  tar -C "${WORK}/login-app-libs" --exclude=./so -cf - . | tar -C "${root}" -xf -
  for copy in "${STAGE_COPIES[@]}"; do
    [[ ${copy} != --* ]] || die "${dir}/Dockerfile: unexpected COPY ${copy}"
    dest=${copy##* }
    for src in ${copy% *}; do
      install -D -m 0444 "${dir}/${src}" "${root}${dest%/}/${src}"
    done
  done
  "${py}" "${dir}/app.py" check >/dev/null || die "python3 app.py check failed"
  passwd_files "${root}" root:0 app:10001 nobody:65534
  tmp_dir "${root}"
  pack login-app localhost/authrealm/login-app:dev "${root}" <<<"${STAGE_CFG}"
}

for image in "${wanted[@]}"; do
  case "${image}" in
    pause) image_pause ;;
    busybox) image_busybox ;;
    redis) image_redis ;;
    operator) image_from_dockerfile operator images/operator.Dockerfile ;;
    sidecar) image_from_dockerfile sidecar images/sidecar.Dockerfile ;;
    login-app) image_login_app ;;
  esac
done

if ((import)); then
  node_env=$(bash hack/node.sh env 2>/dev/null || true)
  address=$(sed -n 's/^AUTHREALM_NODE_CONTAINERD_ADDRESS=//p' <<<"${node_env}")
  if [[ -n ${address} && -S ${address} ]] && bash hack/node.sh status >/dev/null 2>&1; then
    for line in "${BUILT[@]}"; do
      read -r _ _ archive <<<"${line}"
      ctr -a "${address}" -n k8s.io images import "${archive}" >/dev/null
      log "imported ${archive##*/} into the node"
    done
  else
    log "the node is not up: archives are in ${IMAGES_DIR}; hack/node.sh up imports them"
  fi
fi
printf '%s\n' "${BUILT[@]}"
