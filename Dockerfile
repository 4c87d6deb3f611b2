# syntax=docker/dockerfile:1.26.0@sha256:ecfaec9ed6d810b56388c508f4121597bfbba70d41a6dfeee4d8cad5f295fc32
#
# (The BuildKit frontend above is an image too: pinned by digest like the
# base images below; it was docker/dockerfile:1 when pinned.)
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

# Base images are pinned by digest (the multi-arch index), the tag kept for
# reading: a tag moves to new content, a digest does not. To update, resolve
# the tag again (`docker buildx imagetools inspect <image>:<tag>`), review, and
# replace both; a build can override the pins with --build-arg.
# rust:1.98.1-bookworm was rust:1-bookworm when pinned.
ARG RUST_IMAGE=docker.io/library/rust:1.98.1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

FROM ${RUST_IMAGE} AS build
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

FROM ${RUNTIME_IMAGE} AS simulator
COPY --from=build-simulator /defender-offboard-dev /defender-offboard
USER 65532:65532
EXPOSE 8090
ENTRYPOINT ["/defender-offboard"]
CMD ["simulate", "--listen", "0.0.0.0:8090"]

FROM ${RUNTIME_IMAGE} AS operator
LABEL org.opencontainers.image.title="defender-offboard" \
      org.opencontainers.image.description="Kubernetes operator that offboards Windows devices from Microsoft Defender for Endpoint exactly once" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /defender-offboard /defender-offboard
# 65532 is distroless's "nonroot"; numeric so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/defender-offboard"]
CMD ["run"]
