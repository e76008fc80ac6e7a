# syntax=docker/dockerfile:1.7
# The authrealm operator (reconciler + sidecar-injection webhook).
#
#   docker build -f images/operator.Dockerfile -t authrealm-operator:dev .
#
# Built from the workspace root. The runtime image is distroless (glibc, CA certificates, no
# shell, no package manager) and runs as the unprivileged user 65532.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# aws-lc-rs (the only crypto provider) builds its C code with the image's gcc; no cmake or Go.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p authrealm-operator \
    && install -D -m 0755 target/release/authrealm-operator /out/authrealm-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="authrealm-operator" \
      org.opencontainers.image.source="https://github.com/authrealm/authrealm" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/authrealm-operator /usr/local/bin/authrealm-operator
USER 65532:65532
# 8080: /healthz, /readyz, /metrics; 9443: the admission webhook (HTTPS).
EXPOSE 8080 9443
ENTRYPOINT ["/usr/local/bin/authrealm-operator"]
