//! Errors of the CSI node plugin and their gRPC status codes.

use std::io;
use std::path::PathBuf;

use crate::issuer::IssuerError;

/// A request input that is missing or malformed. Always `InvalidArgument`,
/// and always detected before anything changes on disk.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A required request field is empty or absent.
    #[error("{field} is required")]
    Missing {
        /// The field's name in the CSI request.
        field: &'static str,
    },
    /// The volume id is not a safe identifier.
    #[error("volume id {volume_id:?} is invalid: {reason}")]
    VolumeId {
        /// The id as received (escaped, truncated).
        volume_id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The target path is not acceptable.
    #[error("target path {path:?} is invalid: {reason}")]
    TargetPath {
        /// The path as received (escaped, truncated).
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file name attribute is not a single safe path component.
    #[error("attribute {attribute}: file name {name:?} is invalid: {reason}")]
    FileName {
        /// The attribute that named the file.
        attribute: &'static str,
        /// The name as received (escaped, truncated).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An attribute under credlet's prefix that credlet does not know.
    #[error(
        "unknown volume attribute {key:?}; see docs/volume-attributes.md for the supported ones"
    )]
    UnknownAttribute {
        /// The attribute key (escaped, truncated).
        key: String,
    },
    /// An attribute whose value does not parse or is not allowed.
    #[error("volume attribute {key}: {reason}")]
    Attribute {
        /// The attribute key.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// One attribute value is larger than allowed.
    #[error("volume attribute {key:?} is {len} bytes, more than the {max} allowed")]
    AttributeTooLarge {
        /// The attribute key (escaped, truncated).
        key: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The volume context as a whole is larger than allowed.
    #[error("volume context is {len} bytes, more than the {max} allowed")]
    ContextTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Pod information from `podInfoOnMount` is missing or malformed.
    #[error(
        "pod information {field} is missing or invalid; is podInfoOnMount enabled on the CSIDriver?"
    )]
    PodInfo {
        /// The `csi.storage.k8s.io/...` key.
        field: &'static str,
    },
    /// The service account token map from `tokenRequests` is malformed.
    #[error("service account tokens are malformed: {reason}")]
    Tokens {
        /// What is wrong (never the token itself).
        reason: String,
    },
    /// No service account token for the agent's audience came with the
    /// publish, and the issuer needs one.
    #[error(
        "no service account token for audience {audience:?}: the CSIDriver needs tokenRequests with that audience"
    )]
    MissingToken {
        /// The audience the agent asks for (`--token-audience`).
        audience: String,
    },
    /// The volume capability is missing or not one we can serve.
    #[error("volume capability: {reason}")]
    Capability {
        /// What is wrong.
        reason: &'static str,
    },
}

/// Everything that can go wrong serving a CSI call or rotating a volume.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was changed.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The volume is published already with a different target or
    /// attributes.
    #[error("volume {volume_id} is already published at {existing_target:?} with {difference}")]
    AlreadyPublished {
        /// The volume id.
        volume_id: String,
        /// Where it is published.
        existing_target: PathBuf,
        /// What differs from this request.
        difference: &'static str,
    },
    /// A path component below the kubelet root is a symlink (or not a
    /// directory) — a planted link must never redirect our writes.
    #[error("target path {path:?} is unsafe: {component:?} is a symlink or not a directory")]
    UnsafeTarget {
        /// The target path.
        path: PathBuf,
        /// The offending component.
        component: String,
    },
    /// A mount that is not credlet's covers the target: credlet neither
    /// writes into it nor unmounts it.
    #[error("target path {path:?} is covered by {mount}, which is not credlet's; leaving it")]
    ForeignMount {
        /// The target path.
        path: PathBuf,
        /// What the mount is.
        mount: String,
    },
    /// The target's parent directory does not exist.
    #[error("parent directory of target path {path:?} does not exist")]
    TargetParentMissing {
        /// The target path.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The issuer refused or failed to issue.
    #[error("volume {volume_id}: {source}")]
    Issue {
        /// The volume id.
        volume_id: String,
        /// The issuer's error.
        #[source]
        source: IssuerError,
    },
    /// Generating the key or CSR, or reading back a certificate, failed.
    #[error("volume {volume_id}: {source}")]
    Crypto {
        /// The volume id.
        volume_id: String,
        /// The underlying error.
        #[source]
        source: credlet_ca::CaError,
    },
    /// Persisted volume state could not be written or read.
    #[error("volume state {path:?}: {reason}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The plugin is shutting down or its issuer is not ready.
    #[error("not ready: {reason}")]
    NotReady {
        /// Why.
        reason: &'static str,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The gRPC code a kubelet should see for this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Input(_) | Self::UnsafeTarget { .. } => tonic::Code::InvalidArgument,
            Self::AlreadyPublished { .. } => tonic::Code::AlreadyExists,
            Self::TargetParentMissing { .. } | Self::ForeignMount { .. } => {
                tonic::Code::FailedPrecondition
            }
            Self::Issue { source, .. } => source.code(),
            Self::NotReady { .. } => tonic::Code::Unavailable,
            Self::Io { .. } | Self::Crypto { .. } | Self::State { .. } => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}
