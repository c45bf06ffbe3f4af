//! credlet's CA service (`credlet ca`): issues agent client certificates
//! and pod certificates over gRPC with mutual TLS.
//!
//! - [`tokens`]: service account tokens verified with TokenReview, cached by
//!   SHA-256 of the token until it expires (at most 5 minutes).
//! - [`jwks`]: or verified offline against the cluster's service account
//!   issuer keys ([`jwt`]), fetched from the API server and refreshed.
//! - [`pods`]: the token's pod must exist, with the token's uid, on the
//!   caller's node; answered from a watch-fed cache of every pod's uid and
//!   node when it is synced and current, else (and to confirm any denial)
//!   with a GET.
//! - [`policy`]: SPIFFE IDs, DNS SAN templates, IP ranges, lifetimes,
//!   renewal spread. Agent client certificates carry the URI SAN
//!   `spiffe://<trust-domain>/credlet/node/<node>`.
//! - [`keys`]: CA certificate and key from files, hot reload with `notify`,
//!   trust bundle with old and new roots during a rollover.
//! - [`tls`]: TLS 1.3 (ring) with optional, verified client certificates.
//! - [`service`]: the `credlet.ca.v1.CertificateAuthority` handlers, with
//!   [`metrics`] by RPC and outcome.
//! - [`server`]: everything started together on one listener.
//!
//! Tokens and private keys are never logged; denials are logged with pod,
//! node and reason (and at most a token hash).

#![warn(missing_docs)]

pub mod error;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod server;
pub mod service;
pub mod tls;
pub mod tokens;

pub use error::Error;
pub use jwks::{JwksSettings, JwksVerifier};
pub use keys::{KeyFiles, KeyStatus, KeyStore, TrustBundle};
pub use pods::{PodCache, PodCacheSettings, PodFacts};
pub use policy::ServicePolicy;
pub use server::{CaServer, Settings};
pub use service::CaService;
pub use tls::{PeerInfo, ServerNames, ServerTls};
pub use tokens::{TokenReviewSettings, TokenReviewVerifier, TokenVerifier, VerifiedToken};
