//! Error types. Every variant carries the context needed to act on it
//! without a debugger: which input, which value, which limit.

use std::time::Duration;

use crate::key::KeyType;
use crate::public_key::PublicKeyType;

/// Errors from key handling, PEM and certificate parsing, CA construction
/// and chain verification.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The key pair could not be generated.
    #[error("generating a {key_type} key failed: {reason}")]
    KeyGeneration {
        /// Key type that was requested.
        key_type: KeyType,
        /// What went wrong.
        reason: String,
    },
    /// A private key was not an unencrypted PKCS#8 key of a supported type.
    #[error("invalid private key: {reason}")]
    InvalidPrivateKey {
        /// What is wrong with it.
        reason: String,
    },
    /// PEM text could not be decoded.
    #[error("invalid PEM in {what}: {reason}")]
    Pem {
        /// Which input (for example "trust bundle").
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate could not be parsed or has an unusable field.
    #[error("invalid certificate ({what}): {reason}")]
    Certificate {
        /// Which certificate (for example "leaf certificate").
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate that must sign others is not a CA certificate.
    #[error("certificate {subject:?} can not act as a CA: {reason}")]
    NotACa {
        /// The certificate's subject.
        subject: String,
        /// Which constraint it fails.
        reason: String,
    },
    /// A private key does not belong to the certificate it was paired with.
    #[error("the private key does not match the public key of {what}")]
    KeyMismatch {
        /// Which certificate (for example "CA certificate \"CN=x\"").
        what: String,
    },
    /// The issuance policy given to an authority is unusable.
    #[error("invalid issuance policy: {reason}")]
    InvalidPolicy {
        /// What is wrong with it.
        reason: String,
    },
    /// Building a certificate or CSR failed.
    #[error("building {what} failed: {reason}")]
    Encoding {
        /// What was being built.
        what: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A CA certificate can not be used by the signer as it is.
    #[error("unsupported CA certificate {subject:?}: {reason}")]
    UnsupportedCaCertificate {
        /// The certificate's subject.
        subject: String,
        /// Why it can not be used.
        reason: String,
    },
    /// A certificate in a chain is outside its validity period at the time of
    /// the check.
    #[error(
        "certificate {subject:?} is not valid at {now}: valid from {not_before} until {not_after}"
    )]
    NotValidAt {
        /// The certificate's subject.
        subject: String,
        /// Its notBefore (RFC 3339, UTC).
        not_before: String,
        /// Its notAfter (RFC 3339, UTC).
        not_after: String,
        /// The time checked (RFC 3339, UTC).
        now: String,
    },
    /// No certificate in the chain or the trust bundle issued this certificate.
    #[error(
        "no trusted issuer found for certificate {subject:?} (issuer {issuer:?}); \
         it does not chain to the trust bundle"
    )]
    UnknownIssuer {
        /// The certificate's subject.
        subject: String,
        /// The issuer named in the certificate.
        issuer: String,
    },
    /// A certificate's signature does not verify with its issuer's key.
    #[error(
        "signature of certificate {subject:?} does not verify with issuer {issuer:?}: {reason}"
    )]
    BadCertificateSignature {
        /// The certificate's subject.
        subject: String,
        /// The issuer whose key was tried.
        issuer: String,
        /// Why it failed.
        reason: String,
    },
    /// The chain is longer than any chain this crate accepts.
    #[error("certificate chain is longer than {max} certificates")]
    ChainTooLong {
        /// The limit.
        max: usize,
    },
    /// A time is outside the range certificates can express.
    #[error("time out of range: {reason}")]
    TimeOutOfRange {
        /// What was out of range.
        reason: String,
    },
}

/// Errors from parsing a [`KeyType`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyTypeError {
    /// A known key type that this version does not implement yet.
    #[error(
        "key type {name:?} is not supported yet; supported key types are ECDSAP256, ECDSAP384 and ED25519"
    )]
    NotYetSupported {
        /// The name as given.
        name: String,
    },
    /// Not a key type name at all.
    #[error("unknown key type {name:?}; supported key types are ECDSAP256, ECDSAP384 and ED25519")]
    Unknown {
        /// The name as given.
        name: String,
    },
}

/// Why a certificate signing request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// No bytes at all.
    #[error("the certificate signing request is empty")]
    Empty,
    /// Larger than any CSR this crate accepts.
    #[error("the certificate signing request is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a well-formed DER PKCS#10 request.
    #[error("malformed certificate signing request: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// The self-signature does not verify: the requester did not prove
    /// possession of the private key.
    #[error(
        "the certificate signing request's signature does not verify with its public key \
         (proof of possession failed)"
    )]
    BadSignature,
    /// The key or signature algorithm is not one of ECDSA P-256/SHA-256,
    /// ECDSA P-384/SHA-384 or Ed25519.
    #[error(
        "unsupported key or signature algorithm in certificate signing request: {algorithm}; \
         supported are ECDSA P-256 with SHA-256, ECDSA P-384 with SHA-384 and Ed25519"
    )]
    UnsupportedKeyType {
        /// Description of the algorithm found.
        algorithm: String,
    },
}

/// Why a public key of a PodCertificateRequest, its proof of possession or
/// its stub CSR was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    /// No bytes at all.
    #[error("the {what} is empty")]
    Empty {
        /// Which input ("public key", "proof of possession",
        /// "certificate signing request").
        what: &'static str,
    },
    /// Larger than any such input this crate accepts.
    #[error("the {what} is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// Which input.
        what: &'static str,
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a public key of a supported type: another algorithm, curve or
    /// RSA size, or not a parseable key at all.
    #[error(
        "unsupported public key: {found}; supported are RSA3072, RSA4096, ECDSAP256, ECDSAP384, \
         ECDSAP521 and ED25519"
    )]
    UnsupportedKeyType {
        /// What was found instead (for example "an RSA key of 2048 bits").
        found: String,
    },
    /// The input is not well-formed DER of its kind.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The CSR is signed with an algorithm that does not fit its key or is
    /// not accepted.
    #[error(
        "the certificate signing request's {key_type} key signed with {algorithm}; \
         accepted for this key type: {supported}"
    )]
    UnsupportedSignatureAlgorithm {
        /// The CSR's key type.
        key_type: PublicKeyType,
        /// The signature algorithm found.
        algorithm: String,
        /// The accepted signature algorithms for the key type.
        supported: &'static str,
    },
    /// The signature does not verify with the key: possession of the
    /// private key is not proven.
    #[error("the {what}'s signature does not verify with its {key_type} public key")]
    BadSignature {
        /// The key's type.
        key_type: PublicKeyType,
        /// What was signed ("proof of possession" or "certificate signing
        /// request").
        what: &'static str,
    },
}

/// Why the issuance policy refused a request.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A pod identity field is empty.
    #[error("pod identity field {field} is empty")]
    EmptyIdentityField {
        /// Field name.
        field: &'static str,
    },
    /// A pod identity field is not a valid Kubernetes name.
    #[error("pod identity field {field} has invalid value {value:?}: {reason}")]
    InvalidIdentityField {
        /// Field name.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The SPIFFE ID is not syntactically valid.
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId {
        /// The ID given.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The SPIFFE ID has a query or fragment part.
    #[error("SPIFFE ID {id:?} must not contain a query or fragment")]
    SpiffeIdQueryOrFragment {
        /// The ID given.
        id: String,
    },
    /// The SPIFFE ID names another trust domain.
    #[error(
        "SPIFFE ID {id:?} is in trust domain {trust_domain:?}, but this CA issues for {expected:?}"
    )]
    ForeignTrustDomain {
        /// The ID given.
        id: String,
        /// The trust domain in the ID.
        trust_domain: String,
        /// The policy's trust domain.
        expected: String,
    },
    /// The SPIFFE ID's path does not belong to the pod's namespace and
    /// service account.
    #[error(
        "SPIFFE ID {id:?} is outside the pod's identity: the path must be {expected} or start with {expected}/"
    )]
    SpiffeIdOutsideIdentity {
        /// The ID given.
        id: String,
        /// The path prefix the pod may use (`ns/<ns>/sa/<sa>`).
        expected: String,
    },
    /// A DNS name is not a valid host name.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A DNS name is a wildcard; wildcards are not issued.
    #[error("wildcard DNS name {name:?} is not allowed")]
    WildcardDnsName {
        /// The name given.
        name: String,
    },
    /// More DNS names than the policy allows.
    #[error("{count} DNS names requested, the policy allows at most {max}")]
    TooManyDnsNames {
        /// Number requested.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More IP addresses than the policy allows.
    #[error("{count} IP addresses requested, the policy allows at most {max}")]
    TooManyIpAddresses {
        /// Number requested.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The common name is unusable.
    #[error("invalid common name {value:?}: {reason}")]
    InvalidCommonName {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The requested lifetime is below the policy minimum.
    #[error("requested certificate lifetime {requested:?} is shorter than the minimum {min:?}")]
    DurationTooShort {
        /// Lifetime requested.
        requested: Duration,
        /// The minimum.
        min: Duration,
    },
    /// The requested lifetime is above the policy maximum.
    #[error("requested certificate lifetime {requested:?} is longer than the maximum {max:?}")]
    DurationTooLong {
        /// Lifetime requested.
        requested: Duration,
        /// The maximum.
        max: Duration,
    },
    /// The CSR's key type is not allowed by the policy.
    #[error("key type {key_type} is not allowed; allowed: {allowed}")]
    KeyTypeNotAllowed {
        /// The CSR's key type.
        key_type: KeyType,
        /// The allowed key types, comma separated.
        allowed: String,
    },
}

/// Why [`Authority::issue`](crate::Authority::issue) did not issue.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR is unusable (client error).
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The request breaks the issuance policy (client error).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Signing failed on the CA side (server error).
    #[error("signing the certificate failed: {reason}")]
    Signing {
        /// What went wrong.
        reason: String,
    },
}

impl IssueError {
    /// True when the request itself is at fault (bad CSR or refused by
    /// policy), so retrying it unchanged can not succeed. Callers map this
    /// to `InvalidArgument`, everything else to `Internal`.
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::Csr(_) | Self::Policy(_))
    }
}

/// Why a name [`Template`](crate::Template) does not parse. Messages do
/// not repeat the template: callers name it together with where it came
/// from (which attribute, flag or request field).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `$NAME` or `${NAME}` names no variable credlet knows.
    #[error("unknown variable {variable}; known: {KNOWN_VARIABLES}")]
    UnknownVariable {
        /// The variable as written (`$HOSTNAME`, `${pod_name}`), shortened
        /// when long.
        variable: String,
    },
    /// A `$` followed by no variable name: at the end, before a character
    /// that can not start one (variables are uppercase), or `${}`.
    #[error("\"$\" at byte {offset} is not followed by a variable name; known: {KNOWN_VARIABLES}")]
    MissingVariableName {
        /// Byte offset of the `$`.
        offset: usize,
    },
    /// A `${` without a closing `}`.
    #[error("\"${{\" at byte {offset} has no closing \"}}\"")]
    UnterminatedBrace {
        /// Byte offset of the `$`.
        offset: usize,
    },
    /// A control character (newline, tab, DEL...): never part of a name.
    #[error("contains control characters")]
    ControlCharacter,
}

/// The variables for error messages; kept in step with
/// [`TemplateVariable::ALL`](crate::TemplateVariable::ALL) by a test.
const KNOWN_VARIABLES: &str = "$POD_NAME, $POD_NAMESPACE, $POD_UID, $SERVICE_ACCOUNT_NAME, $TRUST_DOMAIN (each also as ${NAME})";
