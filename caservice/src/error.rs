//! The CA service's error type and its mapping to gRPC status codes.

use credlet_ca::{CaError, CsrError, IssueError, PolicyError};

/// Why the CA service refused or failed a request, or failed to start.
///
/// Every variant names what it is about (pod, node, file, flag) so the
/// message alone says what to fix. No variant ever carries a token or a
/// private key.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request carried no service account token.
    #[error(
        "no service account token in the request; send the pod's projected token for audience {audience:?}"
    )]
    MissingToken {
        /// The audience the CA expects.
        audience: String,
    },
    /// The API server did not authenticate the token.
    #[error(
        "the service account token was not authenticated by the API server (token sha256 {token_hash}): {reason}"
    )]
    TokenNotAuthenticated {
        /// First 16 hex digits of the token's SHA-256.
        token_hash: String,
        /// What the API server said.
        reason: String,
    },
    /// The token is not meant for this CA.
    #[error(
        "the service account token (sha256 {token_hash}) is not valid for audience {expected:?} (token audiences: {got:?}); request a projected token with audience {expected:?}"
    )]
    TokenWrongAudience {
        /// First 16 hex digits of the token's SHA-256.
        token_hash: String,
        /// The CA's audience.
        expected: String,
        /// The audiences the API server reported for the token.
        got: Vec<String>,
    },
    /// The token has expired.
    #[error(
        "the service account token (sha256 {token_hash}) expired at {expired_at} (unix seconds); send a fresh token"
    )]
    TokenExpired {
        /// First 16 hex digits of the token's SHA-256.
        token_hash: String,
        /// Its `exp` claim.
        expired_at: u64,
    },
    /// The token authenticates a user that is not a service account.
    #[error(
        "the token authenticates {username:?}, which is not a service account; only service account tokens are accepted"
    )]
    TokenNotServiceAccount {
        /// The authenticated user name.
        username: String,
    },
    /// The token failed offline verification against the cluster's service
    /// account issuer keys (JWKS): bad signature, unknown key, wrong issuer,
    /// malformed.
    #[error(
        "the service account token (sha256 {token_hash}) failed verification against the cluster's service account issuer keys: {reason}; send the pod's projected token"
    )]
    TokenRejected {
        /// First 16 hex digits of the token's SHA-256.
        token_hash: String,
        /// Why (never any part of the token).
        reason: String,
    },
    /// The token is a service account token not bound to a pod.
    #[error(
        "the token of service account {namespace}/{service_account} is not bound to a pod (no pod-name/pod-uid in its user info); use a projected token from the pod"
    )]
    TokenNotBoundToPod {
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        service_account: String,
    },
    /// A request field contradicts the verified token.
    #[error(
        "the request says {field} {requested:?}, but the token belongs to pod {namespace}/{pod} ({field} {verified:?}); a token can only be used for its own pod"
    )]
    TokenForAnotherPod {
        /// The token's pod namespace.
        namespace: String,
        /// The token's pod name.
        pod: String,
        /// Which request field.
        field: &'static str,
        /// What the request said.
        requested: String,
        /// What the token says.
        verified: String,
    },
    /// IssueAgentCertificate with a token of another service account.
    #[error(
        "agent certificates are only issued to service account {expected}; the token of pod {namespace}/{pod} belongs to {namespace}/{service_account}"
    )]
    NotAgentServiceAccount {
        /// The token's namespace.
        namespace: String,
        /// The token's pod.
        pod: String,
        /// The token's service account.
        service_account: String,
        /// The configured agent service account, `ns/name`.
        expected: String,
    },
    /// IssuePodCertificate without a verified agent client certificate.
    #[error(
        "IssuePodCertificate needs an agent client certificate issued by this CA (URI SAN spiffe://<trust-domain>/credlet/node/<node>); get one with IssueAgentCertificate"
    )]
    NoClientCertificate,
    /// The pod no longer exists.
    #[error(
        "pod {namespace}/{name} does not exist (deleted?); no certificate is issued for a pod that is gone"
    )]
    PodGone {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
    /// A pod of that name exists but it is not the pod the token was issued to.
    #[error(
        "pod {namespace}/{name} has uid {pod_uid}, but the token was issued to uid {token_uid}: the token belongs to an earlier pod of the same name"
    )]
    PodUidMismatch {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The uid in the token.
        token_uid: String,
        /// The current pod's uid.
        pod_uid: String,
    },
    /// The pod (or the token) is on another node than the caller's.
    #[error(
        "pod {namespace}/{name} runs on node {pod_node:?}, but the caller is the agent of node {caller_node:?}; an agent can only get certificates for pods on its own node"
    )]
    NodeMismatch {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The node the pod (or its token) is bound to; empty if unscheduled.
        pod_node: String,
        /// The node the caller proved (client certificate or request).
        caller_node: String,
    },
    /// A requested SAN is outside the policy.
    #[error(
        "{kind} SAN {value:?} (from {template:?}) is not allowed for pod {pod}; allowed: {allowed}"
    )]
    SanNotAllowed {
        /// The pod, `namespace/name`.
        pod: String,
        /// `DNS`, `IP` or `common name`.
        kind: &'static str,
        /// The requested template or literal.
        template: String,
        /// The expanded value.
        value: String,
        /// The allowed templates or ranges, for the message.
        allowed: String,
    },
    /// A requested SAN is one of the CA's own server names: a pod holding
    /// it could pose as the CA to agents that reach the CA by that name.
    #[error(
        "{kind} SAN {value:?} (from {template:?}) is one of the CA's own server names (--server-name) and is never issued to pod {pod}: a pod holding it could pose as the CA"
    )]
    SanReservedForCa {
        /// The pod, `namespace/name`.
        pod: String,
        /// `DNS` or `IP`.
        kind: &'static str,
        /// The requested template or literal.
        template: String,
        /// The expanded value.
        value: String,
    },
    /// A template uses an unknown variable or expands to an invalid name.
    #[error("invalid template {template:?}: {reason}")]
    InvalidTemplate {
        /// The template.
        template: String,
        /// What is wrong.
        reason: String,
    },
    /// A request field is malformed (not an IP address, bad percentage...).
    #[error("invalid request field {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The CSR is malformed, its proof of possession fails, or its key type
    /// is unsupported.
    #[error("{0}")]
    Csr(#[from] CsrError),
    /// The issuance library refused the request.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// Signing failed on the CA side.
    #[error("signing failed: {reason}")]
    Signing {
        /// What went wrong.
        reason: String,
    },
    /// The Kubernetes API server could not be reached or answered an error.
    #[error("the Kubernetes API server is unavailable for {what}: {reason}; retry later")]
    ApiUnavailable {
        /// What was being asked (`TokenReview`, `GET pod ns/name`).
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// CA key material could not be loaded.
    #[error("CA key material from {path}: {reason}")]
    KeyMaterial {
        /// The file (or files) involved.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The issuance library refused the CA certificate or key.
    #[error("CA key material from {path}: {source}")]
    Authority {
        /// The file (or files) involved.
        path: String,
        /// The library's reason.
        #[source]
        source: CaError,
    },
    /// Building the TLS configuration failed.
    #[error("TLS configuration: {reason}")]
    Tls {
        /// What went wrong.
        reason: String,
    },
    /// The service configuration is unusable.
    #[error("invalid CA service configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// Watching the key files failed.
    #[error("watching {path} for changes: {reason}")]
    Watch {
        /// The directory.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Serving failed.
    #[error("serving gRPC: {reason}")]
    Serve {
        /// What went wrong.
        reason: String,
    },
}

impl From<IssueError> for Error {
    fn from(error: IssueError) -> Self {
        match error {
            IssueError::Csr(e) => Self::Csr(e),
            IssueError::Policy(e) => Self::Policy(e),
            IssueError::Signing { reason } => Self::Signing { reason },
        }
    }
}

impl Error {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::MissingToken { .. }
            | Self::TokenNotAuthenticated { .. }
            | Self::TokenRejected { .. }
            | Self::TokenWrongAudience { .. }
            | Self::TokenExpired { .. }
            | Self::NoClientCertificate => Code::Unauthenticated,
            Self::TokenNotServiceAccount { .. }
            | Self::TokenNotBoundToPod { .. }
            | Self::TokenForAnotherPod { .. }
            | Self::NotAgentServiceAccount { .. }
            | Self::PodUidMismatch { .. }
            | Self::NodeMismatch { .. }
            | Self::SanNotAllowed { .. }
            | Self::SanReservedForCa { .. } => Code::PermissionDenied,
            Self::PodGone { .. } => Code::FailedPrecondition,
            Self::InvalidTemplate { .. }
            | Self::InvalidField { .. }
            | Self::Csr(_)
            | Self::Policy(_) => Code::InvalidArgument,
            Self::ApiUnavailable { .. } => Code::Unavailable,
            Self::Signing { .. }
            | Self::KeyMaterial { .. }
            | Self::Authority { .. }
            | Self::Tls { .. }
            | Self::Config { .. }
            | Self::Watch { .. }
            | Self::Serve { .. } => Code::Internal,
        }
    }

    /// A short machine-readable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken { .. } => "MissingToken",
            Self::TokenNotAuthenticated { .. } => "TokenNotAuthenticated",
            Self::TokenRejected { .. } => "TokenRejected",
            Self::TokenWrongAudience { .. } => "TokenWrongAudience",
            Self::TokenExpired { .. } => "TokenExpired",
            Self::TokenNotServiceAccount { .. } => "TokenNotServiceAccount",
            Self::TokenNotBoundToPod { .. } => "TokenNotBoundToPod",
            Self::TokenForAnotherPod { .. } => "TokenForAnotherPod",
            Self::NotAgentServiceAccount { .. } => "NotAgentServiceAccount",
            Self::NoClientCertificate => "NoClientCertificate",
            Self::PodGone { .. } => "PodGone",
            Self::PodUidMismatch { .. } => "PodUidMismatch",
            Self::NodeMismatch { .. } => "NodeMismatch",
            Self::SanNotAllowed { .. } => "SanNotAllowed",
            Self::SanReservedForCa { .. } => "SanReservedForCa",
            Self::InvalidTemplate { .. } => "InvalidTemplate",
            Self::InvalidField { .. } => "InvalidField",
            Self::Csr(CsrError::UnsupportedKeyType { .. }) => "UnsupportedKeyType",
            Self::Csr(CsrError::BadSignature) => "ProofOfPossessionFailed",
            Self::Csr(_) => "MalformedCsr",
            Self::Policy(PolicyError::KeyTypeNotAllowed { .. }) => "UnsupportedKeyType",
            Self::Policy(_) => "PolicyDenied",
            Self::Signing { .. } => "SigningFailed",
            Self::ApiUnavailable { .. } => "ApiUnavailable",
            Self::KeyMaterial { .. } | Self::Authority { .. } => "KeyMaterial",
            Self::Tls { .. } => "Tls",
            Self::Config { .. } => "Config",
            Self::Watch { .. } => "Watch",
            Self::Serve { .. } => "Serve",
        }
    }
}

/// The one mapping of CA service errors to gRPC statuses: `Unauthenticated`
/// (bad, expired or wrong-audience token; no client certificate),
/// `PermissionDenied` (node mismatch, SAN not allowed or the CA's own, token for another
/// pod, not the agent service account), `FailedPrecondition` (pod gone),
/// `InvalidArgument` (malformed CSR, proof of possession, unsupported key
/// type), `Unavailable` (API server unreachable), `Internal` otherwise.
impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}
