# syntax=docker/dockerfile:1
#
# defender-offboard controller image: one static-ish Rust binary on distroless.
#
#   docker build -t defender-offboard:dev .
#   docker run --rm defender-offboard:dev crd
#
# The binary links glibc and libgcc_s (rustls/ring, no OpenSSL), hence the
# distroless "cc" base rather than "static".

ARG RUST_VERSION=1

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds on the
# same builder; --locked builds exactly the dependency versions in Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin defender-offboard \
    && cp target/release/defender-offboard /defender-offboard \
    && /defender-offboard --version

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="defender-offboard" \
      org.opencontainers.image.description="Kubernetes operator that offboards Windows devices from Microsoft Defender for Endpoint exactly once" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /defender-offboard /defender-offboard
# 65532 is distroless's "nonroot"; numeric so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/defender-offboard"]
CMD ["run"]
