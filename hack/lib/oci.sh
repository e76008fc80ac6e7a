# shellcheck shell=bash
# OCI image archives from a directory, without a registry, a daemon or an image builder: tar,
# sha256sum and jq only. Sourced by hack/images.sh.
#
#   oci_add_binary ROOTFS SRC DEST     copy an executable and the shared libraries ldd names
#                                      (with their paths, and the dynamic loader) into ROOTFS
#   oci_archive ROOTFS NAME CONFIG OUT pack ROOTFS as a one-layer image NAME whose image config
#                                      ("config" object of the OCI image config: User, Entrypoint,
#                                      Cmd, Env, ExposedPorts, WorkingDir, Labels) is the JSON in
#                                      the file CONFIG, into the OCI image-layout tar OUT
#
# The archive's index carries io.containerd.image.name (and org.opencontainers.image.ref.name),
# so `ctr -n k8s.io images import OUT` registers it under NAME. The layer is reproducible (sorted
# names, owner 0:0, mtime 0), so the same input always gives the same image digest.

oci_add_binary() {
  local root=$1 src=$2 dest=$3 lib
  install -D -m 0755 "${src}" "${root}${dest}"
  # A static binary makes ldd fail ("not a dynamic executable"): nothing to copy then.
  while read -r lib; do
    [[ -e "${root}${lib}" ]] && continue
    install -D -m 0755 "$(readlink -f "${lib}")" "${root}${lib}"
  done < <(ldd "${src}" 2>/dev/null | grep -o '/[^ )]*' | sort -u)
}

# Prints "DIGEST SIZE" of FILE and moves it into DIR/blobs/sha256/DIGEST.
_oci_put_blob() {
  local dir=$1 file=$2 digest size
  digest=$(sha256sum "${file}" | cut -d' ' -f1)
  size=$(stat -c %s "${file}")
  mv -f "${file}" "${dir}/blobs/sha256/${digest}"
  echo "${digest} ${size}"
}

oci_archive() {
  local root=$1 name=$2 config=$3 out=$4 w ldig lsize cdig csize mdig msize
  w=$(mktemp -d "${TMPDIR:-/tmp}/authrealm-oci.XXXXXX")
  mkdir -p "${w}/blobs/sha256"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "${root}" -cf "${w}/layer.tar" .
  read -r ldig lsize < <(_oci_put_blob "${w}" "${w}/layer.tar")
  jq -c --arg diff "sha256:${ldig}" --slurpfile cfg "${config}" \
    '{architecture: "amd64", os: "linux", created: "1970-01-01T00:00:00Z", config: $cfg[0],
      rootfs: {type: "layers", diff_ids: [$diff]}, history: [{created: "1970-01-01T00:00:00Z", created_by: "hack/images.sh"}]}' \
    -n >"${w}/config.json"
  read -r cdig csize < <(_oci_put_blob "${w}" "${w}/config.json")
  jq -c -n --arg c "sha256:${cdig}" --argjson cs "${csize}" --arg l "sha256:${ldig}" --argjson ls "${lsize}" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls}]}' \
    >"${w}/manifest.json"
  read -r mdig msize < <(_oci_put_blob "${w}" "${w}/manifest.json")
  echo '{"imageLayoutVersion":"1.0.0"}' >"${w}/oci-layout"
  jq -c -n --arg m "sha256:${mdig}" --argjson ms "${msize}" --arg name "${name}" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
                   platform: {architecture: "amd64", os: "linux"},
                   annotations: {"io.containerd.image.name": $name, "org.opencontainers.image.ref.name": $name}}]}' \
    >"${w}/index.json"
  mkdir -p "$(dirname "${out}")"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "${w}" \
    -cf "${out}.tmp" oci-layout index.json blobs
  mv -f "${out}.tmp" "${out}"
  rm -rf "${w}"
  printf '%s sha256:%s\n' "${name}" "${mdig}"
}
