# syntax=docker/dockerfile:1
# The single kvgate binary (EPP, frontend/sidecar, mocker, operator, render) in a minimal,
# non-root runtime image with CA certificates. See docs/kubernetes.md for building and pushing:
#   docker build -t <registry>/kvgate:<tag> . && docker push <registry>/kvgate:<tag>

# --- build: a release binary, stripped (the repository's release profile keeps line tables) ----
FROM rust:1.95.0-slim-bookworm AS build
# The image's toolchain, not rust-toolchain.toml's components (rustfmt/clippy are not needed here).
ENV RUSTUP_TOOLCHAIN=1.95.0
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --release --locked -p kvgate \
    && cp target/release/kvgate /kvgate

# --- runtime: distroless (glibc, libgcc, CA certificates, no shell), user 65532 ----------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /kvgate /usr/local/bin/kvgate
USER 65532:65532
# EPP gRPC, EPP health, metrics, frontend/mocker HTTP.
EXPOSE 9002 9003 9090 8000
ENTRYPOINT ["/usr/local/bin/kvgate"]
CMD ["--help"]
