# syntax=docker/dockerfile:1
# Images of outbox-worker and outbox-operator, built from the workspace root:
#
#   docker build --target worker   -t ghcr.io/outbox-dev/outbox-worker:0.1.0 .
#   docker build --target operator -t ghcr.io/outbox-dev/outbox-operator:0.1.0 .
#
# (`make images` does both with the tag taken from Cargo.toml.) Stages:
#   chef     Rust toolchain + cargo-chef
#   planner  computes the dependency recipe (changes only when manifests/Cargo.lock do)
#   deps     compiles the dependencies alone: the cached layer
#   build    compiles both binaries in release mode
#   worker / operator   distroless, non-root, holding one binary

ARG RUST_VERSION=1.94
ARG CARGO_CHEF_VERSION=0.1.78

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS deps
COPY --from=planner /src/recipe.json recipe.json
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo chef cook --release --locked --recipe-path recipe.json -p worker -p operator

FROM deps AS build
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked -p worker --bin outbox-worker -p operator --bin outbox-operator \
 && install -D -m 0755 target/release/outbox-worker /out/outbox-worker \
 && install -D -m 0755 target/release/outbox-operator /out/outbox-operator

# glibc of bookworm (the builder) = glibc of distroless cc-debian12; CA certificates included.
FROM gcr.io/distroless/cc-debian12:nonroot AS worker
COPY --from=build /out/outbox-worker /usr/local/bin/outbox-worker
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-worker"]
CMD ["relay"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/outbox-operator /usr/local/bin/outbox-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-operator"]
CMD ["run"]
