//! PodCertificateRequests as the API server sends them, and their
//! validation.
//!
//! [`PodCertificateRequest`] is credlet's own serde type for
//! `certificates.k8s.io` `PodCertificateRequest` objects, because
//! k8s-openapi 0.29's `v1beta1` type lacks `spec.stubPKCS10Request` (added
//! in Kubernetes 1.36). It implements [`kube::Resource`] for both API
//! versions through its dynamic type [`ApiVersion`]:
//!
//! ```no_run
//! # async fn demo(client: kube::Client) -> Result<(), kube::Error> {
//! use credlet_signer::request::{ApiVersion, PodCertificateRequest};
//! let beta: kube::Api<PodCertificateRequest> =
//!     kube::Api::namespaced_with(client.clone(), "default", &ApiVersion::V1beta1);
//! let ga: kube::Api<PodCertificateRequest> =
//!     kube::Api::all_with(client, &ApiVersion::V1);
//! # Ok(()) }
//! ```
//!
//! # Validation
//!
//! [`validate`] turns a request into a [`ValidatedRequest`] (the verified
//! public key, the identity fields, the clamped lifetime and the parsed
//! options) or a [`Denial`] whose [`DenialReason::as_str`] is the `reason`
//! of the `Denied` condition. It checks only what the object itself proves;
//! the caller checks that the pod, service account and node exist with
//! these UIDs, applies the CA's SAN policy to [`RequestedOptions`] and
//! issues with `credlet_ca::Authority::issue_for_public_key`.
//!
//! | denial reason | when |
//! |---|---|
//! | `InvalidRequest` | a required name or UID is missing or malformed, `maxExpirationSeconds` < 3600, a key field over [`MAX_KEY_MATERIAL_LEN`], a stub CSR that is not DER PKCS#10 |
//! | `InvalidKeyMaterial` | both shapes, neither, or a public key without its proof (or the reverse) |
//! | `InvalidUnverifiedUserAnnotations` | an annotation key credlet does not read, or a malformed value |
//! | `UnsupportedKeyType` | the key is not one of [`AcceptedKeyTypes`] (RSA2048, other curves, unparseable keys); the message suggests a type |
//! | `InvalidProofOfPossession` | the signature over the pod UID, or the stub CSR's self-signature, does not verify |
//!
//! Proof-of-possession facts (which hash per curve, PSS salt, what the stub
//! CSR proves) are in the `credlet_ca` module that verifies them
//! (`UnverifiedPublicKey`, `UnverifiedCsr`). The stub CSR binds no pod UID
//! (upstream: the kubelet's CSR is empty and only its key counts).
//!
//! # Unverified user annotations
//!
//! `spec.unverifiedUserAnnotations` come from the pod author
//! (`podCertificate.userAnnotations` in the pod spec) and are not checked
//! by Kubernetes. credlet accepts these keys and denies a request carrying
//! any other key with reason `InvalidUnverifiedUserAnnotations`:
//!
//! | key | value |
//! |---|---|
//! | `credlet.io/dns-names` | comma-separated DNS SAN templates, at most [`MAX_DNS_NAMES`], each at most [`MAX_DNS_TEMPLATE_LEN`] bytes; labels of letters, digits and `-`, or the variables `$POD_NAME`, `$POD_NAMESPACE`, `$POD_UID`, `$SERVICE_ACCOUNT_NAME`, `$TRUST_DOMAIN` (each also as `${NAME}`, the grammar of [`credlet_ca::Template`]); no wildcards. The CA's DNS template policy decides which are issued. |

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use credlet_ca::{PublicKeyType, VerifiedPublicKey};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1beta1::PodCertificateRequestStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// API group of PodCertificateRequests.
pub const GROUP: &str = "certificates.k8s.io";
/// Kind of PodCertificateRequests.
pub const KIND: &str = "PodCertificateRequest";
/// Resource (plural) name of PodCertificateRequests.
pub const PLURAL: &str = "podcertificaterequests";

/// Prefix of every unverified user annotation credlet reads.
pub const ANNOTATION_PREFIX: &str = "credlet.io/";
/// Comma-separated DNS SAN templates.
pub const DNS_NAMES_ANNOTATION: &str = "credlet.io/dns-names";
/// Every annotation key credlet accepts.
pub const KNOWN_ANNOTATIONS: [&str; 1] = [DNS_NAMES_ANNOTATION];

/// Most DNS SAN templates in `credlet.io/dns-names`.
pub const MAX_DNS_NAMES: usize = 32;
/// Longest DNS SAN template, in bytes.
pub const MAX_DNS_TEMPLATE_LEN: usize = 253;

/// Lifetime when `spec.maxExpirationSeconds` is absent (the API default).
pub const DEFAULT_MAX_EXPIRATION: Duration = Duration::from_secs(86_400);
/// Shortest lifetime the API allows.
pub const MIN_MAX_EXPIRATION: Duration = Duration::from_secs(3_600);
/// Longest lifetime the API allows (91 days).
pub const MAX_MAX_EXPIRATION: Duration = Duration::from_secs(7_862_400);

/// Largest `pkixPublicKey`, `proofOfPossession` or `stubPKCS10Request`
/// accepted, in bytes (the API server's own limit is 10 KiB).
pub const MAX_KEY_MATERIAL_LEN: usize = 10 * 1024;
/// Largest total size of `unverifiedUserAnnotations` (keys plus values),
/// in bytes.
pub const MAX_ANNOTATIONS_LEN: usize = 16 * 1024;

/// The API version a request was read from (the kube dynamic type of
/// [`PodCertificateRequest`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ApiVersion {
    /// `certificates.k8s.io/v1beta1` (Kubernetes 1.35 and 1.36), both
    /// request shapes.
    #[default]
    V1beta1,
    /// `certificates.k8s.io/v1` (Kubernetes 1.37), stub CSR shape only.
    V1,
}

impl ApiVersion {
    /// The version alone: `v1beta1` or `v1`.
    pub fn version(&self) -> &'static str {
        match self {
            Self::V1beta1 => "v1beta1",
            Self::V1 => "v1",
        }
    }

    /// The `apiVersion` field: `certificates.k8s.io/v1beta1` or
    /// `certificates.k8s.io/v1`.
    pub fn api_version(&self) -> &'static str {
        match self {
            Self::V1beta1 => "certificates.k8s.io/v1beta1",
            Self::V1 => "certificates.k8s.io/v1",
        }
    }

    /// Parses an `apiVersion` field.
    pub fn from_api_version(api_version: &str) -> Option<Self> {
        [Self::V1beta1, Self::V1]
            .into_iter()
            .find(|v| v.api_version() == api_version)
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_version())
    }
}

/// A `certificates.k8s.io` `PodCertificateRequest`, either API version.
///
/// `apiVersion` and `kind` are checked when present and written back when
/// `api_version` is set; list items (which the API server sends without
/// them) deserialize with `api_version: None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodCertificateRequest {
    /// The API version the object was read from, if it said.
    pub api_version: Option<ApiVersion>,
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The request, immutable after creation.
    pub spec: PodCertificateRequestSpec,
    /// Conditions and the issued certificate, written by the signer.
    pub status: Option<PodCertificateRequestStatus>,
}

/// The spec of a [`PodCertificateRequest`]. Field names are the API's.
/// Required string fields deserialize to `""` when missing so that one
/// malformed object can not break a watch; [`validate`] denies it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCertificateRequestSpec {
    /// The signer asked to issue, for example `credlet.io/pod`.
    #[serde(default)]
    pub signer_name: String,
    /// Name of the pod the certificate is for.
    #[serde(default)]
    pub pod_name: String,
    /// UID of that pod.
    #[serde(default, rename = "podUID")]
    pub pod_uid: String,
    /// The pod's service account.
    #[serde(default)]
    pub service_account_name: String,
    /// UID of that service account.
    #[serde(default, rename = "serviceAccountUID")]
    pub service_account_uid: String,
    /// The node the pod runs on.
    #[serde(default)]
    pub node_name: String,
    /// UID of that node.
    #[serde(default, rename = "nodeUID")]
    pub node_uid: String,
    /// Longest lifetime the requester accepts, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_expiration_seconds: Option<i32>,
    /// 1.35 shape (deprecated in 1.36, gone in v1): DER
    /// SubjectPublicKeyInfo of the key to certify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkix_public_key: Option<ByteString>,
    /// 1.35 shape: signature by that key over the ASCII pod UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_of_possession: Option<ByteString>,
    /// 1.36 shape: DER PKCS#10 request signed by the key to certify.
    #[serde(
        default,
        rename = "stubPKCS10Request",
        skip_serializing_if = "Option::is_none"
    )]
    pub stub_pkcs10_request: Option<ByteString>,
    /// Pod-author options for the signer (see the module documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unverified_user_annotations: Option<BTreeMap<String, String>>,
}

/// The wire form: the object with `apiVersion` and `kind`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodCertificateRequestSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<PodCertificateRequestStatus>,
}

impl<'de> Deserialize<'de> for PodCertificateRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let wire = Wire::deserialize(deserializer)?;
        if let Some(kind) = wire.kind.as_deref()
            && kind != KIND
        {
            return Err(D::Error::custom(format!("kind {kind:?} is not {KIND:?}")));
        }
        let api_version = match wire.api_version.as_deref() {
            None => None,
            Some(v) => Some(ApiVersion::from_api_version(v).ok_or_else(|| {
                D::Error::custom(format!(
                    "apiVersion {v:?} is neither {} nor {}",
                    ApiVersion::V1beta1,
                    ApiVersion::V1
                ))
            })?),
        };
        Ok(Self {
            api_version,
            metadata: wire.metadata,
            spec: wire.spec,
            status: wire.status,
        })
    }
}

impl Serialize for PodCertificateRequest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Clones the object once per write; requests are a few KiB.
        Wire {
            api_version: self.api_version.map(|v| Cow::Borrowed(v.api_version())),
            kind: self.api_version.map(|_| Cow::Borrowed(KIND)),
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.clone(),
        }
        .serialize(serializer)
    }
}

/// Namespaced in the API. The scope type is kube's dynamic one because
/// kube offers `Api::namespaced_with` (the constructor that takes the
/// dynamic type) only for it.
impl kube::Resource for PodCertificateRequest {
    type DynamicType = ApiVersion;
    type Scope = kube::core::DynamicResourceScope;

    fn kind(_: &ApiVersion) -> Cow<'_, str> {
        Cow::Borrowed(KIND)
    }

    fn group(_: &ApiVersion) -> Cow<'_, str> {
        Cow::Borrowed(GROUP)
    }

    fn version(version: &ApiVersion) -> Cow<'_, str> {
        Cow::Borrowed(version.version())
    }

    fn api_version(version: &ApiVersion) -> Cow<'_, str> {
        Cow::Borrowed(version.api_version())
    }

    fn plural(_: &ApiVersion) -> Cow<'_, str> {
        Cow::Borrowed(PLURAL)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Which key types the signer issues for. Requests with any other type are
/// denied with [`DenialReason::UnsupportedKeyType`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedKeyTypes {
    types: Vec<PublicKeyType>,
}

impl Default for AcceptedKeyTypes {
    /// Every type the API defines.
    fn default() -> Self {
        Self {
            types: PublicKeyType::ALL.to_vec(),
        }
    }
}

impl AcceptedKeyTypes {
    /// Accepts exactly `types`; `None` when it is empty. The first one is
    /// the type suggested in denials.
    pub fn new(types: impl IntoIterator<Item = PublicKeyType>) -> Option<Self> {
        let mut list: Vec<PublicKeyType> = Vec::new();
        for t in types {
            if !list.contains(&t) {
                list.push(t);
            }
        }
        (!list.is_empty()).then_some(Self { types: list })
    }

    /// True when `key_type` is accepted.
    pub fn accepts(&self, key_type: PublicKeyType) -> bool {
        self.types.contains(&key_type)
    }

    /// The accepted types, most preferred first.
    pub fn types(&self) -> &[PublicKeyType] {
        &self.types
    }

    /// The type suggested to requesters whose key was refused: ECDSAP256
    /// when accepted, else the first accepted type.
    pub fn suggested(&self) -> PublicKeyType {
        if self.accepts(PublicKeyType::EcdsaP256) {
            PublicKeyType::EcdsaP256
        } else {
            self.types[0]
        }
    }
}

/// The options a pod author asked for through
/// `spec.unverifiedUserAnnotations`, syntax-checked but not yet held to the
/// CA's policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestedOptions {
    /// DNS SAN templates from `credlet.io/dns-names`, in request order,
    /// without duplicates; literal text lowercased, `$VARIABLES` kept as
    /// the CA's template grammar spells them.
    pub dns_names: Vec<String>,
}

/// A request whose fields are well formed and whose public key's
/// possession is proven. Identity fields are as the request states them:
/// the caller still checks them against the API.
#[derive(Clone, Debug)]
pub struct ValidatedRequest {
    /// Namespace of the request (and of the pod).
    pub namespace: String,
    /// Name of the request.
    pub name: String,
    /// UID of the request object, when set.
    pub uid: Option<String>,
    /// The signer name asked for.
    pub signer_name: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's UID.
    pub pod_uid: String,
    /// The pod's service account.
    pub service_account_name: String,
    /// The service account's UID.
    pub service_account_uid: String,
    /// The pod's node.
    pub node_name: String,
    /// The node's UID.
    pub node_uid: String,
    /// The key to certify, possession proven.
    pub public_key: VerifiedPublicKey,
    /// Which request shape proved possession.
    pub shape: RequestShape,
    /// Longest lifetime to issue: `spec.maxExpirationSeconds` (default
    /// 86400 s), lowered to 7862400 s when above; below 3600 s is denied.
    /// Never issue longer: issue `min(max_expiration, CA policy maximum)`
    /// (the API rejects lifetimes under an hour).
    pub max_expiration: Duration,
    /// The parsed unverified user annotations.
    pub options: RequestedOptions,
}

/// How a request carries its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestShape {
    /// 1.35: `pkixPublicKey` + `proofOfPossession` over the pod UID.
    PublicKeyAndProof,
    /// 1.36 and v1: `stubPKCS10Request`.
    StubCsr,
}

/// Why a request is denied: the `reason` of its `Denied` condition.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenialReason {
    /// The key is not of an accepted type, or not a parseable public key
    /// at all (the API's well-known reason).
    UnsupportedKeyType,
    /// An unknown or malformed `unverifiedUserAnnotations` entry (the API's
    /// well-known reason).
    InvalidUnverifiedUserAnnotations,
    /// The proof of possession (signature over the pod UID, or the stub
    /// CSR's self-signature) does not verify with the key.
    InvalidProofOfPossession,
    /// Both request shapes, or neither, are present.
    InvalidKeyMaterial,
    /// A required field is missing or malformed, or a field is too large.
    InvalidRequest,
}

impl DenialReason {
    /// The API reason string (CamelCase).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::UnsupportedKeyType => "UnsupportedKeyType",
            Self::InvalidUnverifiedUserAnnotations => "InvalidUnverifiedUserAnnotations",
            Self::InvalidProofOfPossession => "InvalidProofOfPossession",
            Self::InvalidKeyMaterial => "InvalidKeyMaterial",
            Self::InvalidRequest => "InvalidRequest",
        }
    }
}

impl fmt::Display for DenialReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: the `Denied` condition's reason and message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Denial {
    /// The condition reason.
    pub reason: DenialReason,
    /// What is wrong and what to do about it, for the pod's owner.
    pub message: String,
}

impl Denial {
    pub(crate) fn new(reason: DenialReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Checks `request` and proves possession of its key. See the module
/// documentation for what is checked and what is left to the caller.
///
/// Cheap checks come first (names, sizes, lifetime, annotations, which key
/// shape), then the key type against `accepted`, then the signature.
pub fn validate(
    request: &PodCertificateRequest,
    accepted: &AcceptedKeyTypes,
) -> Result<ValidatedRequest, Denial> {
    validate::validate(request, accepted)
}

mod annotations;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod validate_tests;
