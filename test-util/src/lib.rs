//! Real-component test harness for credlet.
//!
//! - [`cluster::Cluster`]: a real one-node Kubernetes (kube-apiserver, etcd,
//!   controller manager, scheduler, kubelet, containerd 2) built from its Go
//!   modules, with credlet installed from `deploy/`.
//! - [`Registry`]: CNCF distribution (`docker-registry`) on 127.0.0.1 with
//!   TLS, behind htpasswd ([`Registry::start_basic_auth`]) or a token
//!   endpoint served by the harness ([`Registry::start_token_auth`]).
//! - [`build_and_push_image`]: a tiny runnable OCI image written from Rust and
//!   pushed with skopeo.
//! - [`Containerd`]: a private containerd 1.6 with the CRI plugin, runc, our
//!   static pause image and hosts.toml per registry.
//! - [`RegistryClient`]: manifest HEAD checks (Basic and Bearer flows).
//! - [`unix_channel`]: a tonic channel to a CRI socket.
//! - [`ThrottledRelay`]: a TCP relay that serves a registry slowly.
//! - [`FakeApiServer`]: an in-process fake Kubernetes API server (REST +
//!   watch, real object JSON) for `kube::Client` tests.
//! - [`critest`]: cri-tools' CRI validation suite against containerd 2 or
//!   1.6, its images stood in for from a loopback registry that
//!   [`write_mirror_hosts`] points containerd's registry hosts at.
//!
//! All APIs that start processes are blocking (call them directly from
//! `#[tokio::test]` setup, or from plain `#[test]`s); the token endpoint runs
//! on its own thread, so it answers even while the caller blocks. Every
//! guard kills its processes and removes its mounts and files on drop, and
//! each start sweeps leftovers of test processes that died without
//! unwinding. Set `CREDLET_TEST_KEEP=1` to keep the directories (logs) for
//! inspection. Run `test-util/install-deps.sh` first (root, Debian).

mod client;
pub mod cluster;
mod containerd;
pub mod cri;
pub mod critest;
mod fake_apiserver;
mod h2raw;
mod image;
pub mod kubelet;
mod mirror;
mod pki;
mod process;
mod registry;
mod relay;
pub mod sa_token;
mod token;

pub use client::{
    HttpAnswer, ManifestCheck, RegistryClient, manifest_accept, parse_challenge, parse_query,
};
pub use containerd::{CRI_NAMESPACE, Containerd};
pub use cri::{cri_image_id, unix_channel};
pub use fake_apiserver::{
    FakeApiError, FakeApiServer, RecordedRequest, ResourceType, TokenReviewer,
};
pub use h2raw::raw_unary_call;
pub use image::{
    BuiltImage, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, ImageFile, ImageSpec, OCI_INDEX,
    OCI_MANIFEST, PAUSE_IMAGE, PAUSE_PATH, PushedImage, build_and_push_image, delete_manifest,
    pause_binary, push_image, write_oci_archive, write_oci_layout, write_pause_archive,
};
pub use mirror::{CLOSED_SERVER, write_mirror_hosts};
pub use pki::{Leaf, TEST_SERVER_NAME, TestCa, rustls_client_config};
pub use process::{Daemon, WorkDir, free_port, log_tail, mount_points_below, sweep_stale};
pub use registry::{AccessLogEntry, Registry, RegistryAuth};
pub use relay::ThrottledRelay;
pub use token::{ANYONE, Grant, TOKEN_ISSUER, TOKEN_SERVICE, TokenRequest, TokenServer};

// Guards can live in shared fixtures (Arc, Mutex) and move across threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Registry>();
    send_sync::<Containerd>();
    send_sync::<RegistryClient>();
};
