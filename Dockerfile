# syntax=docker/dockerfile:1
# Images of outbox-worker and outbox-operator, built from the workspace root:
#
#   docker build --target worker   -t ghcr.io/outbox-dev/outbox-worker:0.1.0 .
#   docker build --target operator -t ghcr.io/outbox-dev/outbox-operator:0.1.0 .
#
# (`make images` does both with the tag taken from Cargo.toml.) The images carry stripped
# binaries; their debug info (line tables, as [profile.release] keeps them) is split into
# outbox-worker.debug and outbox-operator.debug, exported with
#
#   docker build --target debug-symbols -o target/debug-symbols .
#
# Keep those files with the release: gdb and addr2line find them through the binaries'
# .gnu_debuglink (put them next to a copy of the binary). Stages:
#   chef     Rust toolchain + cargo-chef
#   planner  computes the dependency recipe (changes only when manifests/Cargo.lock do)
#   deps     compiles the dependencies alone: the cached layer
#   build    compiles both binaries in release mode, splits off the debug info and strips
#            them: /out/<binary> (stripped) and /out/debug/<binary>.debug
#   debug-symbols       scratch, holding only the two .debug files (not part of any image)
#   worker / operator   distroless, non-root, holding one stripped binary

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
    cargo build --release --locked -p worker --bin outbox-worker -p operator --bin outbox-operator
# objcopy is GNU binutils, which the image's gcc depends on. The debug info goes to a .debug
# file (compressed); the installed binary loses its debug sections and symbol table and gets a
# .gnu_debuglink naming that file (with its CRC). charts/tests/test_packaging.py runs this very
# script on a small binary; docs/kubernetes.md has the sizes before and after.
RUN set -eu; mkdir -p /out/debug; \
    for bin in outbox-worker outbox-operator; do \
      objcopy --only-keep-debug --compress-debug-sections=zlib "target/release/$bin" "/out/debug/$bin.debug"; \
      objcopy --strip-debug --strip-unneeded --add-gnu-debuglink="/out/debug/$bin.debug" "target/release/$bin" "/out/$bin"; \
      chmod 0755 "/out/$bin"; \
    done

# Only the split debug info: `docker build --target debug-symbols -o DIR .` writes
# DIR/outbox-worker.debug and DIR/outbox-operator.debug.
FROM scratch AS debug-symbols
COPY --from=build /out/debug/ /

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
