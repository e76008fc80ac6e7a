# syntax=docker/dockerfile:1.7
# The authrealm sidecar (JWT validation with immediate revocation), injected into app pods.
#
#   docker build -f images/sidecar.Dockerfile -t authrealm-sidecar:dev .
#
# Built from the workspace root. Distroless, unprivileged (65532, the UID the injector's
# securityContext names), and it needs no writable file system.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p authrealm-sidecar \
    && install -D -m 0755 target/release/authrealm-sidecar /out/authrealm-sidecar

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="authrealm-sidecar" \
      org.opencontainers.image.source="https://github.com/authrealm/authrealm" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/authrealm-sidecar /usr/local/bin/authrealm-sidecar
USER 65532:65532
# 8443: proxied traffic; 9901: /healthz, /readyz, /metrics (8444, the issuer API, is loopback-only).
EXPOSE 8443 9901
ENTRYPOINT ["/usr/local/bin/authrealm-sidecar"]
CMD ["run", "--config", "/etc/authrealm/config/sidecar.json"]
