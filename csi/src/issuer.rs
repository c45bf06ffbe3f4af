//! The `Issuer` seam: where a key and a pod identity become a certificate.
//!
//! [`EmbeddedIssuer`] signs in-process with a [`credlet_ca::Authority`] (the
//! `--dev-ca` mode and the demo); [`crate::remote::RemoteIssuer`] asks
//! credlet's CA service over mutual TLS.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use credlet_ca::{Authority, IssuanceRequest, IssueError, PrivateKey};

use crate::attributes::{RenewBefore, ServiceAccountToken};

/// A boxed future, so issuers can be used as `dyn Issuer`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One request to an issuer. The key to certify travels beside it (see
/// [`Issuer::issue`]).
#[derive(Debug)]
pub struct IssueRequest {
    /// Pod identity as claimed by the kubelet, names and lifetime. Its
    /// `csr_der` is empty: each issuer proves possession of the key the way
    /// it needs to.
    pub request: IssuanceRequest,
    /// The pod's service account token for the CA's audience, if the kubelet
    /// sent one. The identity the CA trusts comes from this token.
    pub token: Option<ServiceAccountToken>,
    /// The name templates as the volume attributes give them, not
    /// expanded: a remote CA expands them from the facts it verified.
    pub templates: NameTemplates,
    /// When the volume wants its certificate renewed.
    pub renew_before: RenewBefore,
}

/// Name templates of a volume, unexpanded (the grammar of
/// [`credlet_ca::Template`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameTemplates {
    /// DNS SAN templates.
    pub dns_names: Vec<String>,
    /// Subject common name template.
    pub common_name: Option<String>,
    /// SPIFFE ID template (the default one when the volume asks for
    /// none).
    pub spiffe_id: String,
}

/// A certificate as the issuer returns it.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf then intermediates, PEM.
    pub chain_pem: String,
    /// Roots to trust, PEM.
    pub trust_bundle_pem: Arc<str>,
    /// Leaf serial, hex.
    pub serial_hex: String,
    /// Leaf notBefore.
    pub not_before: SystemTime,
    /// Leaf notAfter.
    pub not_after: SystemTime,
    /// When the issuer wants renewal to begin (a remote CA spreads
    /// renewals); `None`: the agent picks a point in the volume's window.
    pub renew_at: Option<SystemTime>,
}

/// Why an issuer did not issue.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IssuerError {
    /// The issuer can not be reached or is not ready; retry later.
    #[error("issuer unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The request breaks the issuance policy or the CSR is bad.
    #[error("issuer refused the request: {reason}")]
    Refused {
        /// What to fix.
        reason: String,
    },
    /// The caller is not allowed to ask for this identity.
    #[error("issuer denied the request: {reason}")]
    Denied {
        /// Why.
        reason: String,
    },
    /// The issuer failed internally.
    #[error("issuer failed: {reason}")]
    Internal {
        /// Why.
        reason: String,
    },
}

impl IssuerError {
    /// The gRPC code for a publish that failed with this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Unavailable { .. } => tonic::Code::Unavailable,
            Self::Refused { .. } => tonic::Code::InvalidArgument,
            Self::Denied { .. } => tonic::Code::PermissionDenied,
            Self::Internal { .. } => tonic::Code::Internal,
        }
    }

    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Internal { .. })
    }
}

/// Signs pod certificates.
pub trait Issuer: Send + Sync + fmt::Debug + 'static {
    /// Issues a certificate for `key`'s public half. A remote issuer sends
    /// a CSR signed with `key` (the proof of possession); the in-process one
    /// needs no proof. The key never leaves the process.
    fn issue<'a>(
        &'a self,
        key: &'a PrivateKey,
        request: IssueRequest,
    ) -> BoxFuture<'a, Result<Issued, IssuerError>>;

    /// Whether the issuer can serve requests now (CSI `Probe` readiness).
    fn is_ready(&self) -> bool;

    /// The trust domain the issuer's policy uses for SPIFFE IDs.
    fn trust_domain(&self) -> &str;

    /// Whether the issuer needs the pod's service account token.
    fn requires_token(&self) -> bool;
}

/// Signs in-process. With `trust_claimed_identity` (the `--dev-ca` mode) the
/// pod identity from the volume context is believed without a token check.
pub struct EmbeddedIssuer {
    authority: Authority,
    trust_bundle: Arc<str>,
}

impl fmt::Debug for EmbeddedIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedIssuer")
            .field("trust_domain", &self.authority.policy().trust_domain)
            .finish_non_exhaustive()
    }
}

impl EmbeddedIssuer {
    /// Wraps an authority. This issuer trusts the identity the kubelet puts
    /// in the volume context: only for local development and the demo.
    pub fn trusting_claimed_identity(authority: Authority) -> Self {
        let trust_bundle = Arc::from(authority.trust_bundle_pem());
        Self {
            authority,
            trust_bundle,
        }
    }

    /// Signs synchronously (used by benchmarks and the async wrapper). The
    /// key is in this process, so no CSR is built or verified.
    pub fn issue_now(
        &self,
        key: &PrivateKey,
        request: &IssuanceRequest,
    ) -> Result<Issued, IssuerError> {
        let issued = self
            .authority
            .issue_for_own_key(key, request, SystemTime::now())
            .map_err(|error| match error {
                IssueError::Csr(_) | IssueError::Policy(_) => IssuerError::Refused {
                    reason: error.to_string(),
                },
                other => IssuerError::Internal {
                    reason: other.to_string(),
                },
            })?;
        Ok(Issued {
            chain_pem: issued.chain_pem,
            trust_bundle_pem: Arc::clone(&self.trust_bundle),
            serial_hex: issued.serial_hex,
            not_before: issued.not_before,
            not_after: issued.not_after,
            renew_at: None,
        })
    }
}

impl Issuer for EmbeddedIssuer {
    fn issue<'a>(
        &'a self,
        key: &'a PrivateKey,
        request: IssueRequest,
    ) -> BoxFuture<'a, Result<Issued, IssuerError>> {
        Box::pin(async move { self.issue_now(key, &request.request) })
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn trust_domain(&self) -> &str {
        &self.authority.policy().trust_domain
    }

    fn requires_token(&self) -> bool {
        false
    }
}
