//! Generated protocol types and gRPC stubs credlet serves and calls.
//!
//! The `.proto` sources live in `proto/proto/` and are compiled at build time
//! without a system `protoc`.

/// CSI v1: the Identity and Node services of a node plugin.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The CRI v1 messages the CRI proxy reads or answers (no services: the
/// proxy forwards at the HTTP/2 level).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

/// credlet's CA API: agent and pod certificates, trust bundle updates.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod ca {
    tonic::include_proto!("credlet.ca.v1");
}

/// The kubelet's plugin registration API (`pluginregistration.k8s.io` v1),
/// served by the agent so that no registrar sidecar is needed.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

mod redact;
