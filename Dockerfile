# syntax=docker/dockerfile:1
# The credlet image: one static binary for every mode (`credlet agent`,
# `credlet ca`). Build from the repository root:
#
#   docker build -t credlet:dev .
#
# Without Docker, `cargo xtask cluster up` writes the test cluster's image
# from Rust and imports it into containerd: README, "The image".
#
# The binary is a static PIE (glibc linked statically with
# `+crt-static`; ASLR kept): no shared libraries at run time, so the final
# stage is distroless/static. ring's C and assembly are built in; no
# protoc, no OpenSSL. Name resolution needs no NSS modules: glibc 2.34+
# has the `files` and `dns` services built in (the image's
# /etc/nsswitch.conf names only those). The agent's tmpfs mounts are
# syscalls through rustix: no mount binary needed. Static linking also
# keeps the idle agent smaller: no shared libc/libm pages (about 0.7 MB
# less RSS measured). agent/build.rs adds the hot-function layout and
# packed relocations (README, "Code layout and idle memory").

FROM docker.io/library/rust:1.95-bookworm AS build
ARG TARGETARCH
WORKDIR /src
# The registry and target dirs are build caches, kept between builds.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    case "${TARGETARCH:-amd64}" in \
      amd64) triple=x86_64-unknown-linux-gnu ;; \
      arm64) triple=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
    # --target keeps the static flag off the build scripts and proc macros.
    && RUSTFLAGS="-C target-feature=+crt-static" \
       cargo build --release --locked -p credlet --target "$triple" \
    && install -D -m 0755 "target/$triple/release/credlet" /out/credlet \
    && /out/credlet --version

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/credlet /usr/local/bin/credlet
# Non-root by default (uid 65532): `credlet ca` runs as is. The node agent
# needs root for its mounts; its DaemonSet sets runAsUser: 0 and privileged.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/credlet"]
