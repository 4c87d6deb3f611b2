# syntax=docker/dockerfile:1
#
# defender-offboard controller image: one static-ish Rust binary on distroless.
#
#   docker build -t defender-offboard:dev .
#   docker run --rm defender-offboard:dev crd
#
# The production image is built with --no-default-features: `run`, `crd` and
# `offboard` only, without the MDE simulator and the in-memory Kubernetes API
# (the `dev` feature) or their dependencies. The `simulator` target builds an
# image with `simulate` for end-to-end tests on a cluster:
#
#   docker build --target simulator -t defender-offboard-simulator:e2e .
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
    cargo build --profile production --locked --no-default-features --features jemalloc \
        --bin defender-offboard \
    && cp target/production/defender-offboard /defender-offboard \
    && /defender-offboard --version

# The test double: the same binary with the `dev` feature (`simulate`, `dev`).
FROM build AS build-simulator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin defender-offboard \
    && cp target/release/defender-offboard /defender-offboard-dev

FROM gcr.io/distroless/cc-debian12:nonroot AS simulator
COPY --from=build-simulator /defender-offboard-dev /defender-offboard
USER 65532:65532
EXPOSE 8090
ENTRYPOINT ["/defender-offboard"]
CMD ["simulate", "--listen", "0.0.0.0:8090"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
LABEL org.opencontainers.image.title="defender-offboard" \
      org.opencontainers.image.description="Kubernetes operator that offboards Windows devices from Microsoft Defender for Endpoint exactly once" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /defender-offboard /defender-offboard
# 65532 is distroless's "nonroot"; numeric so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/defender-offboard"]
CMD ["run"]
