//! credlet's signer for Kubernetes' native pod certificates: `credlet ca`
//! answers `PodCertificateRequest`s for its signer name(s) with the same
//! issuance policy as CSI volumes, and publishes its trust bundle as a
//! `ClusterTrustBundle`.
//!
//! - [`request`]: a request as the API server sends it (the 1.35
//!   `pkixPublicKey` + `proofOfPossession` shape and the 1.36
//!   `stubPKCS10Request` shape), checked into a validated request or a
//!   denial with its API reason.
//! - [`controller`]: watches the requests of the configured signer names
//!   and answers each once (issued, denied or failed) through the `status`
//!   subresource, with bounded workers and retries.
//! - [`leader`]: leader election on a `coordination.k8s.io/v1` Lease; only
//!   the leader writes, and it checks before every write.
//! - [`trust_bundle`]: the CA's roots as one `ClusterTrustBundle` per
//!   signer name, kept current by the leader.
//! - [`metrics`]: Prometheus metrics (`credlet_signer_*`).
//! - [`error`]: errors of API calls and configuration.
//!
//! [`SignerRuntime`] starts the three together for `credlet ca`.

#![warn(missing_docs)]

pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
mod queue;
pub mod request;
mod runtime;
pub mod trust_bundle;

pub use controller::{ApiVersionChoice, Signer, SignerSettings};
pub use error::SignerError;
pub use leader::{LeaderElector, Leadership, LeaseSettings};
pub use metrics::SignerMetrics;
pub use runtime::{SignerRuntime, SignerRuntimeSettings};
pub use trust_bundle::{PublisherSettings, TrustBundlePublisher};
