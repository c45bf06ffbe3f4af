# syntax=docker/dockerfile:1
# The credlet image: one static-ish binary for every mode (`credlet agent`,
# `credlet ca`). Build from the repository root:
#
#   docker build -t credlet:dev .
#
# The binary links only glibc and libgcc (ring's C and assembly are built in;
# no protoc, no OpenSSL), so the final stage is distroless/cc. The agent's
# tmpfs mounts are syscalls through rustix: no mount binary needed.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# The registry and target dirs are build caches, kept between builds.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p credlet \
    && install -D -m 0755 target/release/credlet /out/credlet

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/credlet /usr/local/bin/credlet
# Non-root by default (uid 65532): `credlet ca` runs as is. The node agent
# needs root for its mounts; its DaemonSet sets runAsUser: 0 and privileged.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/credlet"]
