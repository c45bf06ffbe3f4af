//! Errors of the signer's API interactions and configuration.

/// An error of the signer (not a denial: denials are answers, written to the
/// request's status).
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// A setting is out of range.
    #[error("signer configuration: {reason}")]
    Config {
        /// What is wrong, naming the setting.
        reason: String,
    },
    /// A Kubernetes API call failed (after retries, where retried).
    #[error("{what}: {source}")]
    Api {
        /// The call, e.g. `GET lease credlet/credlet-signer`.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A Kubernetes API call did not answer in time.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        /// The call.
        what: String,
        /// The bound.
        timeout: std::time::Duration,
    },
    /// API discovery could not tell which PodCertificateRequest version the
    /// server serves.
    #[error("discovering certificates.k8s.io: {reason}")]
    Discovery {
        /// Why.
        reason: String,
    },
    /// Every attempt to write an object met a concurrent writer (409).
    #[error("{what}: kept conflicting with other writers")]
    Conflict {
        /// The object, e.g. `clustertrustbundle example.com:pods:credlet`.
        what: String,
    },
}

impl SignerError {
    /// The HTTP status the API server answered with, if it answered.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            Self::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            _ => None,
        }
    }

    /// Whether a retry may succeed: timeouts, connection errors, 429 and
    /// 5xx answers.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::Api { source, .. } => is_transient(source),
            Self::Conflict { .. } => true,
            Self::Config { .. } | Self::Discovery { .. } => false,
        }
    }
}

/// Whether a kube error is worth retrying.
pub(crate) fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Runs one API call with a timeout, naming it in the error.
pub(crate) async fn call<T>(
    what: impl FnOnce() -> String,
    timeout: std::time::Duration,
    future: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, SignerError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(SignerError::Api {
            what: what(),
            source,
        }),
        Err(_) => Err(SignerError::Timeout {
            what: what(),
            timeout,
        }),
    }
}
