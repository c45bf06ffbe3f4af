//! credlet's signer for Kubernetes' native pod certificates: `credlet ca`
//! answers `PodCertificateRequest`s for its signer name(s) with the same
//! issuance policy as CSI volumes, and publishes its trust bundle as a
//! `ClusterTrustBundle`.
//!
//! - [`request`]: a request as the API server sends it (the 1.35
//!   `pkixPublicKey` + `proofOfPossession` shape and the 1.36
//!   `stubPKCS10Request` shape), checked into a validated request or a
//!   denial with its API reason.

#![warn(missing_docs)]

pub mod request;
