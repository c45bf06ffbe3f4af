//! Public keys certified without a CSR of credlet's own: the key of a
//! Kubernetes `PodCertificateRequest`, proven either by a signature over the
//! pod UID (Kubernetes 1.35, `pkixPublicKey` + `proofOfPossession`) or by a
//! stub PKCS#10 request (1.36 and later, `stubPKCS10Request`).
//!
//! The flow is parse, look at the key type, verify:
//!
//! ```text
//! UnverifiedPublicKey::from_spki_der ─► key_type() ─► verify_proof(pod uid, proof) ─┐
//! UnverifiedCsr::from_der ──────────► key_type() ─► verify() ──────────────────────┴─► VerifiedPublicKey
//! ```
//!
//! so that a caller can refuse a key type it does not accept before doing
//! any signature work, and [`VerifiedPublicKey`] exists only for keys whose
//! possession was proven.
//!
//! # Crypto providers
//!
//! ring verifies everything it can: ECDSA P-256 and P-384, Ed25519 and
//! RSA PKCS#1 v1.5 (CSR self-signatures). Two cases ring lacks are done
//! with RustCrypto crates, and only these:
//!
//! - **ECDSA P-521** (`p521`): ring has no P-521 at all.
//! - **RSA-PSS proofs** (`rsa`): Kubernetes' kubelet signs the pod UID with
//!   Go's `rsa.SignPSS(…, nil)`, whose salt is as long as the key allows
//!   (350 bytes for RSA 3072), and kube-apiserver verifies with any salt
//!   length. ring verifies PSS only with a salt as long as the digest
//!   (32 bytes). Both lengths are accepted here.
//!
//! # Upstream facts this follows
//!
//! - The proof of possession is a signature over the ASCII bytes of
//!   `spec.podUID`: ECDSA (every curve) as ASN.1 DER over the **SHA-256**
//!   digest of those bytes (the kubelet hashes with SHA-256 and calls
//!   `ecdsa.SignASN1`, also for P-384 and P-521); Ed25519 over the bytes
//!   themselves; RSASSA-PSS with SHA-256 and MGF1-SHA-256.
//! - The stub CSR is made by the kubelet with the subject private key and
//!   is otherwise empty; nothing in it binds the pod UID. The API server
//!   verifies its self-signature at admission; it is verified here again
//!   (cheap, and it keeps the proof local). Its subject, attributes and
//!   extensions are ignored: only the public key is used.
//! - Key types: RSA with a modulus of exactly 3072 or 4096 bits, ECDSA on
//!   P-256, P-384 or P-521, Ed25519.

use std::fmt;

use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1, ECDSA_P384_SHA256_ASN1, ECDSA_P384_SHA384_ASN1,
    ED25519, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512,
    UnparsedPublicKey, VerificationAlgorithm,
};
use x509_parser::asn1_rs::{FromDer, Oid};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
    OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    OID_SIG_ECDSA_WITH_SHA512, OID_SIG_ED25519,
};
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo, X509Version};

use crate::csr::VerifiedCsr;
use crate::error::PublicKeyError;
use crate::key::KeyType;

/// Every key type credlet certifies. Names follow the Kubernetes
/// `PodCertificateRequest` API. A superset of [`KeyType`], which lists the
/// types credlet can also generate keys of.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PublicKeyType {
    /// RSA with a modulus of exactly 3072 bits.
    Rsa3072,
    /// RSA with a modulus of exactly 4096 bits.
    Rsa4096,
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// ECDSA on NIST P-521.
    EcdsaP521,
    /// Ed25519.
    Ed25519,
}

impl PublicKeyType {
    /// Every key type, in the order the Kubernetes API lists them.
    pub const ALL: [PublicKeyType; 6] = [
        PublicKeyType::Rsa3072,
        PublicKeyType::Rsa4096,
        PublicKeyType::EcdsaP256,
        PublicKeyType::EcdsaP384,
        PublicKeyType::EcdsaP521,
        PublicKeyType::Ed25519,
    ];

    /// The Kubernetes API name: `RSA3072`, `RSA4096`, `ECDSAP256`,
    /// `ECDSAP384`, `ECDSAP521` or `ED25519`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Rsa3072 => "RSA3072",
            Self::Rsa4096 => "RSA4096",
            Self::EcdsaP256 => "ECDSAP256",
            Self::EcdsaP384 => "ECDSAP384",
            Self::EcdsaP521 => "ECDSAP521",
            Self::Ed25519 => "ED25519",
        }
    }

    /// Parses a Kubernetes key type name, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| name.eq_ignore_ascii_case(t.name()))
    }

    /// The [`KeyType`] of the same name, for the types credlet can also
    /// generate.
    pub fn as_key_type(&self) -> Option<KeyType> {
        match self {
            Self::EcdsaP256 => Some(KeyType::EcdsaP256),
            Self::EcdsaP384 => Some(KeyType::EcdsaP384),
            Self::Ed25519 => Some(KeyType::Ed25519),
            Self::Rsa3072 | Self::Rsa4096 | Self::EcdsaP521 => None,
        }
    }

    /// Length of an uncompressed EC point or Ed25519 key; `None` for RSA.
    fn raw_len(self) -> Option<usize> {
        match self {
            Self::EcdsaP256 => Some(65),
            Self::EcdsaP384 => Some(97),
            Self::EcdsaP521 => Some(133),
            Self::Ed25519 => Some(32),
            Self::Rsa3072 | Self::Rsa4096 => None,
        }
    }
}

impl fmt::Display for PublicKeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<KeyType> for PublicKeyType {
    fn from(key_type: KeyType) -> Self {
        match key_type {
            KeyType::EcdsaP256 => Self::EcdsaP256,
            KeyType::EcdsaP384 => Self::EcdsaP384,
            KeyType::Ed25519 => Self::Ed25519,
        }
    }
}

/// Largest SubjectPublicKeyInfo, proof or CSR accepted, in bytes.
pub const MAX_KEY_MATERIAL_LEN: usize = 16 * 1024;

/// A parsed public key of a supported type whose possession is not yet
/// proven. Holds the key in canonical DER, whatever encoding it came in.
#[derive(Clone, PartialEq, Eq)]
pub struct UnverifiedPublicKey {
    key_type: PublicKeyType,
    /// Canonical DER SubjectPublicKeyInfo.
    spki: Vec<u8>,
    /// The BIT STRING contents: the EC point, the Ed25519 key, or the DER
    /// RSAPublicKey.
    raw: Vec<u8>,
}

impl fmt::Debug for UnverifiedPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedPublicKey")
            .field("key_type", &self.key_type)
            .field("spki_len", &self.spki.len())
            .finish()
    }
}

impl UnverifiedPublicKey {
    /// Parses a DER SubjectPublicKeyInfo (`pkixPublicKey`). Anything that is
    /// not a well-formed key of a [`PublicKeyType`] is
    /// [`PublicKeyError::UnsupportedKeyType`], with a description of what
    /// was found; trailing bytes are [`PublicKeyError::Malformed`].
    pub fn from_spki_der(der: &[u8]) -> Result<Self, PublicKeyError> {
        check_len("public key", der)?;
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der).map_err(|e| {
            PublicKeyError::UnsupportedKeyType {
                found: format!("bytes that are not a DER SubjectPublicKeyInfo ({e})"),
            }
        })?;
        if !rest.is_empty() {
            return Err(PublicKeyError::Malformed {
                what: "public key",
                reason: format!(
                    "{} trailing bytes after the SubjectPublicKeyInfo",
                    rest.len()
                ),
            });
        }
        Self::from_parsed(&spki)
    }

    fn from_parsed(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, PublicKeyError> {
        let unsupported = |found: String| PublicKeyError::UnsupportedKeyType { found };
        let key = &spki.subject_public_key;
        if key.unused_bits != 0 {
            return Err(unsupported(
                "a public key BIT STRING with unused bits".to_owned(),
            ));
        }
        let raw: &[u8] = key.data.as_ref();
        let alg = &spki.algorithm;
        let key_type = if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
            if !params_are_null(alg) {
                return Err(unsupported(
                    "an RSA key whose algorithm parameters are not NULL".to_owned(),
                ));
            }
            let rsa = RsaKey::parse(raw).map_err(|reason| {
                unsupported(format!("an RSA key that does not parse ({reason})"))
            })?;
            let raw = rsa.to_der();
            let key_type = match rsa.modulus_bits() {
                3072 => PublicKeyType::Rsa3072,
                4096 => PublicKeyType::Rsa4096,
                bits => return Err(unsupported(format!("an RSA key of {bits} bits"))),
            };
            return Ok(Self {
                key_type,
                spki: spki_der(key_type, &raw),
                raw,
            });
        } else if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => PublicKeyType::EcdsaP256,
                Some(c) if c == OID_NIST_EC_P384 => PublicKeyType::EcdsaP384,
                Some(c) if c == OID_NIST_EC_P521 => PublicKeyType::EcdsaP521,
                Some(c) => {
                    return Err(unsupported(format!(
                        "an EC key on curve {}",
                        curve_name(&c)
                    )));
                }
                None => return Err(unsupported("an EC key without a named curve".to_owned())),
            }
        } else if alg.algorithm == OID_SIG_ED25519 {
            if alg.parameters.is_some() {
                return Err(unsupported(
                    "an Ed25519 key with algorithm parameters".to_owned(),
                ));
            }
            PublicKeyType::Ed25519
        } else {
            return Err(unsupported(algorithm_name(&alg.algorithm)));
        };
        let expected = key_type.raw_len().unwrap_or_default();
        if raw.len() != expected {
            return Err(unsupported(format!(
                "a {key_type} key of {} bytes (expected {expected})",
                raw.len()
            )));
        }
        if key_type != PublicKeyType::Ed25519 && raw[0] != 0x04 {
            return Err(unsupported(format!(
                "a {key_type} key that is not an uncompressed point"
            )));
        }
        Ok(Self {
            key_type,
            spki: spki_der(key_type, raw),
            raw: raw.to_vec(),
        })
    }

    /// The key's type.
    pub fn key_type(&self) -> PublicKeyType {
        self.key_type
    }

    /// The key as a canonical DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    /// Verifies a Kubernetes 1.35 proof of possession: `signature` over
    /// `message` (the ASCII bytes of the pod UID) as the kubelet makes it,
    /// ECDSA ASN.1 DER over SHA-256 (every curve), Ed25519 over the
    /// message, RSASSA-PSS with SHA-256 (salt as long as the digest or as
    /// long as the key allows).
    pub fn verify_proof(
        self,
        message: &[u8],
        signature: &[u8],
    ) -> Result<VerifiedPublicKey, PublicKeyError> {
        check_len("proof of possession", signature)?;
        let bad = || PublicKeyError::BadSignature {
            key_type: self.key_type,
            what: "proof of possession",
        };
        let verified = match self.key_type {
            PublicKeyType::EcdsaP256 => {
                ring_verify(&ECDSA_P256_SHA256_ASN1, &self.raw, message, signature)
            }
            PublicKeyType::EcdsaP384 => {
                ring_verify(&ECDSA_P384_SHA256_ASN1, &self.raw, message, signature)
            }
            PublicKeyType::EcdsaP521 => p521_verify(
                &self.raw,
                &ring::digest::digest(&ring::digest::SHA256, message),
                signature,
            ),
            PublicKeyType::Ed25519 => ring_verify(&ED25519, &self.raw, message, signature),
            PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => {
                rsa_pss_sha256_verify(&self.raw, message, signature)
            }
        };
        if !verified {
            return Err(bad());
        }
        Ok(VerifiedPublicKey {
            key_type: self.key_type,
            spki: self.spki,
            raw: self.raw,
        })
    }
}

/// A parsed PKCS#10 request (`stubPKCS10Request`) whose self-signature is
/// not yet verified.
#[derive(Clone)]
pub struct UnverifiedCsr {
    key: UnverifiedPublicKey,
    signature_algorithm: SignatureAlgorithm,
    /// The DER CertificationRequestInfo, as signed.
    signed: Vec<u8>,
    signature: Vec<u8>,
}

impl fmt::Debug for UnverifiedCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedCsr")
            .field("key_type", &self.key.key_type)
            .field("signature_algorithm", &self.signature_algorithm)
            .finish_non_exhaustive()
    }
}

/// The signature algorithms accepted on a stub CSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SignatureAlgorithm {
    RsaPkcs1Sha256,
    RsaPkcs1Sha384,
    RsaPkcs1Sha512,
    EcdsaSha256,
    EcdsaSha384,
    EcdsaSha512,
    Ed25519,
}

impl UnverifiedCsr {
    /// Parses a DER PKCS#10 request: version 1, no trailing bytes, a
    /// public key of a [`PublicKeyType`], and a signature algorithm that
    /// fits the key (RSA: sha256/384/512WithRSAEncryption; ECDSA:
    /// ecdsa-with-SHA256/384/512 as far as the curve takes them; Ed25519).
    pub fn from_der(der: &[u8]) -> Result<Self, PublicKeyError> {
        check_len("certificate signing request", der)?;
        let malformed = |reason: String| PublicKeyError::Malformed {
            what: "certificate signing request",
            reason,
        };
        let (rest, csr) =
            X509CertificationRequest::from_der(der).map_err(|e| malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(malformed(format!(
                "{} trailing bytes after the request",
                rest.len()
            )));
        }
        let info = &csr.certification_request_info;
        if info.version != X509Version::V1 {
            return Err(malformed(format!("unsupported version {}", info.version.0)));
        }
        let key = UnverifiedPublicKey::from_parsed(&info.subject_pki)?;
        let sig_alg = &csr.signature_algorithm;
        let oid = &sig_alg.algorithm;
        let signature_algorithm = match key.key_type {
            PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => {
                if !params_are_null(sig_alg) {
                    None
                } else if *oid == OID_PKCS1_SHA256WITHRSA {
                    Some(SignatureAlgorithm::RsaPkcs1Sha256)
                } else if *oid == OID_PKCS1_SHA384WITHRSA {
                    Some(SignatureAlgorithm::RsaPkcs1Sha384)
                } else if *oid == OID_PKCS1_SHA512WITHRSA {
                    Some(SignatureAlgorithm::RsaPkcs1Sha512)
                } else {
                    None
                }
            }
            PublicKeyType::EcdsaP256 | PublicKeyType::EcdsaP384 | PublicKeyType::EcdsaP521 => {
                if sig_alg.parameters.is_some() {
                    None
                } else if *oid == OID_SIG_ECDSA_WITH_SHA256 {
                    Some(SignatureAlgorithm::EcdsaSha256)
                } else if *oid == OID_SIG_ECDSA_WITH_SHA384 {
                    Some(SignatureAlgorithm::EcdsaSha384)
                } else if *oid == OID_SIG_ECDSA_WITH_SHA512
                    && key.key_type == PublicKeyType::EcdsaP521
                {
                    Some(SignatureAlgorithm::EcdsaSha512)
                } else {
                    None
                }
            }
            PublicKeyType::Ed25519 => (*oid == OID_SIG_ED25519 && sig_alg.parameters.is_none())
                .then_some(SignatureAlgorithm::Ed25519),
        };
        let signature_algorithm =
            signature_algorithm.ok_or_else(|| PublicKeyError::UnsupportedSignatureAlgorithm {
                key_type: key.key_type,
                algorithm: format!(
                    "{}{}",
                    algorithm_name(oid),
                    if sig_alg.parameters.is_some() && *oid != OID_PKCS1_RSASSAPSS {
                        " (with parameters)"
                    } else {
                        ""
                    }
                ),
                supported: supported_csr_signatures(key.key_type),
            })?;
        if csr.signature_value.unused_bits != 0 {
            return Err(malformed("signature BIT STRING has unused bits".to_owned()));
        }
        Ok(Self {
            signed: info.raw.to_vec(),
            signature: csr.signature_value.data.to_vec(),
            key,
            signature_algorithm,
        })
    }

    /// The requested key's type.
    pub fn key_type(&self) -> PublicKeyType {
        self.key.key_type
    }

    /// Verifies the request's self-signature with its own key.
    pub fn verify(self) -> Result<VerifiedPublicKey, PublicKeyError> {
        let key = &self.key;
        let (msg, sig) = (self.signed.as_slice(), self.signature.as_slice());
        use SignatureAlgorithm as A;
        let verified = match (key.key_type, self.signature_algorithm) {
            (_, A::RsaPkcs1Sha256) => ring_verify(&RSA_PKCS1_2048_8192_SHA256, &key.raw, msg, sig),
            (_, A::RsaPkcs1Sha384) => ring_verify(&RSA_PKCS1_2048_8192_SHA384, &key.raw, msg, sig),
            (_, A::RsaPkcs1Sha512) => ring_verify(&RSA_PKCS1_2048_8192_SHA512, &key.raw, msg, sig),
            (PublicKeyType::EcdsaP256, A::EcdsaSha256) => {
                ring_verify(&ECDSA_P256_SHA256_ASN1, &key.raw, msg, sig)
            }
            (PublicKeyType::EcdsaP256, A::EcdsaSha384) => {
                ring_verify(&ECDSA_P256_SHA384_ASN1, &key.raw, msg, sig)
            }
            (PublicKeyType::EcdsaP384, A::EcdsaSha256) => {
                ring_verify(&ECDSA_P384_SHA256_ASN1, &key.raw, msg, sig)
            }
            (PublicKeyType::EcdsaP384, A::EcdsaSha384) => {
                ring_verify(&ECDSA_P384_SHA384_ASN1, &key.raw, msg, sig)
            }
            (PublicKeyType::EcdsaP521, alg) => {
                let digest_alg = match alg {
                    A::EcdsaSha256 => &ring::digest::SHA256,
                    A::EcdsaSha384 => &ring::digest::SHA384,
                    _ => &ring::digest::SHA512,
                };
                p521_verify(&key.raw, &ring::digest::digest(digest_alg, msg), sig)
            }
            (_, A::Ed25519) => ring_verify(&ED25519, &key.raw, msg, sig),
            // `from_der` pairs every algorithm with a key type it fits.
            _ => false,
        };
        if !verified {
            return Err(PublicKeyError::BadSignature {
                key_type: key.key_type,
                what: "certificate signing request",
            });
        }
        Ok(VerifiedPublicKey {
            key_type: self.key.key_type,
            spki: self.key.spki,
            raw: self.key.raw,
        })
    }
}

/// A public key whose holder proved possession of the private key. Only
/// this crate constructs one, and only after the proof verified: from
/// [`UnverifiedPublicKey::verify_proof`], [`UnverifiedCsr::verify`] or a
/// [`VerifiedCsr`].
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedPublicKey {
    key_type: PublicKeyType,
    spki: Vec<u8>,
    /// The SubjectPublicKeyInfo's BIT STRING contents.
    raw: Vec<u8>,
}

impl fmt::Debug for VerifiedPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedPublicKey")
            .field("key_type", &self.key_type)
            .field("spki_len", &self.spki.len())
            .finish()
    }
}

impl VerifiedPublicKey {
    /// The key's type.
    pub fn key_type(&self) -> PublicKeyType {
        self.key_type
    }

    /// The key as a DER SubjectPublicKeyInfo (canonical DER for keys that
    /// came from a PodCertificateRequest).
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }
}

impl From<&VerifiedCsr> for VerifiedPublicKey {
    fn from(csr: &VerifiedCsr) -> Self {
        let key_type = csr.key_type();
        let spki = csr.public_key_der();
        // The BIT STRING is the SubjectPublicKeyInfo's last element; its
        // length was checked when the CSR was verified.
        let raw = &spki[spki.len() - key_type.raw_public_key_len()..];
        Self {
            key_type: key_type.into(),
            spki: spki.to_vec(),
            raw: raw.to_vec(),
        }
    }
}

impl VerifiedPublicKey {
    /// The SubjectPublicKeyInfo rcgen writes for this key, when it differs
    /// from the real one: ring-backed rcgen can not name the P-521 curve, so
    /// a P-521 key goes into the certificate under the P-256 algorithm
    /// identifier and [`replace_spki_and_resign`] swaps in the real one.
    pub(crate) fn stand_in_spki(&self) -> Option<Vec<u8>> {
        (self.key_type == PublicKeyType::EcdsaP521)
            .then(|| spki_der(PublicKeyType::EcdsaP256, &self.raw))
    }

    /// The key as rcgen certifies it.
    pub(crate) fn rcgen_view(&self) -> impl rcgen::PublicKeyData + '_ {
        RcgenView(self)
    }
}

/// rcgen writes a subject key as its algorithm's identifier plus the BIT
/// STRING `der_bytes`; it hashes `subject_public_key_info` for the subject
/// key identifier.
struct RcgenView<'a>(&'a VerifiedPublicKey);

impl rcgen::PublicKeyData for RcgenView<'_> {
    fn subject_public_key_info(&self) -> Vec<u8> {
        self.0.spki.clone()
    }

    fn der_bytes(&self) -> &[u8] {
        &self.0.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.0.key_type {
            PublicKeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            PublicKeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            PublicKeyType::Ed25519 => &rcgen::PKCS_ED25519,
            // rsaEncryption with NULL parameters.
            PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
            // Stand-in, replaced after signing (see `stand_in_spki`).
            PublicKeyType::EcdsaP521 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

/// Replaces the SubjectPublicKeyInfo `written` in certificate `cert_der` by
/// `real` and signs the new TBSCertificate with `sign`, keeping the
/// signature algorithm. Fails when the certificate does not have `written`
/// where a v3 certificate's subject key is.
pub(crate) fn replace_spki_and_resign(
    cert_der: &[u8],
    written: &[u8],
    real: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    let (cert, rest) = der::read(cert_der, der::SEQUENCE)?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".to_owned());
    }
    let (tbs, after_tbs) = der::read(cert, der::SEQUENCE)?;
    let (sig_alg, _) = der::read_any(after_tbs)?;
    // version [0], serial, signature, issuer, validity, subject, spki, …
    let mut fields = Vec::with_capacity(8);
    let mut rest = tbs;
    while !rest.is_empty() {
        let (field, after) = der::read_any(rest)?;
        fields.push(field);
        rest = after;
    }
    if fields.len() < 7 || fields[0].first() != Some(&0xa0) || fields[6] != written {
        return Err("the certificate's subject key is not where it was written".to_owned());
    }
    fields[6] = real;
    let new_tbs = der::tlv(der::SEQUENCE, &fields.concat());
    let signature = sign(&new_tbs)?;
    let mut bits = Vec::with_capacity(signature.len() + 1);
    bits.push(0);
    bits.extend(signature);
    let mut body = new_tbs;
    body.extend_from_slice(sig_alg);
    body.extend(der::tlv(der::BIT_STRING, &bits));
    Ok(der::tlv(der::SEQUENCE, &body))
}

fn check_len(what: &'static str, der: &[u8]) -> Result<(), PublicKeyError> {
    if der.is_empty() {
        return Err(PublicKeyError::Empty { what });
    }
    if der.len() > MAX_KEY_MATERIAL_LEN {
        return Err(PublicKeyError::TooLarge {
            what,
            len: der.len(),
            max: MAX_KEY_MATERIAL_LEN,
        });
    }
    Ok(())
}

fn params_are_null(alg: &AlgorithmIdentifier<'_>) -> bool {
    matches!(&alg.parameters, Some(p) if p.header.tag().0 == 5 && p.data.is_empty())
}

fn ring_verify(
    algorithm: &'static dyn VerificationAlgorithm,
    key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    UnparsedPublicKey::new(algorithm, key)
        .verify(message, signature)
        .is_ok()
}

/// ECDSA P-521 over a precomputed digest, signature in ASN.1 DER.
fn p521_verify(point: &[u8], digest: &ring::digest::Digest, signature: &[u8]) -> bool {
    use p521::ecdsa::signature::hazmat::PrehashVerifier as _;
    let Ok(key) = p521::ecdsa::VerifyingKey::from_sec1_bytes(point) else {
        return false;
    };
    let Ok(signature) = p521::ecdsa::Signature::from_der(signature) else {
        return false;
    };
    // The digest as an integer, left-padded to the field size: Go (and
    // FIPS 186) use a digest shorter than the curve order as it is, while
    // the `ecdsa` crate refuses digests shorter than half the field.
    let digest = digest.as_ref();
    let mut padded = [0u8; 66];
    padded[66 - digest.len()..].copy_from_slice(digest);
    key.verify_prehash(&padded, &signature).is_ok()
}

/// RSASSA-PSS with SHA-256 and MGF1-SHA-256, over `message`. Accepts a salt
/// as long as the digest (most signers) or the longest the key allows (Go's
/// `rsa.SignPSS` with nil options, which the kubelet uses).
fn rsa_pss_sha256_verify(rsa_public_key_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    use rsa::traits::PublicKeyParts as _;
    let Ok(parsed) = RsaKey::parse(rsa_public_key_der) else {
        return false;
    };
    let Ok(key) = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(parsed.modulus),
        rsa::BigUint::from_bytes_be(parsed.exponent),
    ) else {
        return false;
    };
    if signature.len() != key.size() {
        return false;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, message);
    let em_len = (key.n().bits() - 1).div_ceil(8);
    let max_salt = em_len.saturating_sub(32 + 2);
    [32, max_salt].into_iter().any(|salt_len| {
        key.verify(
            rsa::Pss::new_with_salt::<rsa::sha2::Sha256>(salt_len),
            digest.as_ref(),
            signature,
        )
        .is_ok()
    })
}

fn supported_csr_signatures(key_type: PublicKeyType) -> &'static str {
    match key_type {
        PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => {
            "sha256WithRSAEncryption, sha384WithRSAEncryption, sha512WithRSAEncryption"
        }
        PublicKeyType::EcdsaP256 | PublicKeyType::EcdsaP384 => {
            "ecdsa-with-SHA256, ecdsa-with-SHA384"
        }
        PublicKeyType::EcdsaP521 => "ecdsa-with-SHA256, ecdsa-with-SHA384, ecdsa-with-SHA512",
        PublicKeyType::Ed25519 => "Ed25519",
    }
}

/// A readable name for a key or signature algorithm OID.
fn algorithm_name(oid: &Oid<'_>) -> String {
    let id = oid.to_id_string();
    let name = match id.as_str() {
        "1.3.101.113" => "an Ed448 key",
        "1.3.101.110" => "an X25519 key",
        "1.2.840.10040.4.1" => "a DSA key",
        "1.2.840.113549.1.1.10" => "RSASSA-PSS",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.2.840.10045.4.1" => "ecdsa-with-SHA1",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        "1.3.101.112" => "Ed25519",
        _ => return format!("algorithm {id}"),
    };
    name.to_owned()
}

fn curve_name(oid: &Oid<'_>) -> String {
    let id = oid.to_id_string();
    match id.as_str() {
        "1.2.840.10045.3.1.1" => "P-192 (secp192r1)".to_owned(),
        "1.3.132.0.33" => "P-224 (secp224r1)".to_owned(),
        "1.3.132.0.10" => "secp256k1".to_owned(),
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1".to_owned(),
        _ => id,
    }
}

/// An RSAPublicKey (RFC 8017): modulus and exponent, big-endian, without
/// leading zero bytes.
struct RsaKey<'a> {
    modulus: &'a [u8],
    exponent: &'a [u8],
}

impl<'a> RsaKey<'a> {
    /// Parses `SEQUENCE { modulus INTEGER, publicExponent INTEGER }` in
    /// DER. Both must be positive; the exponent odd and at least 3.
    fn parse(der: &'a [u8]) -> Result<Self, String> {
        let (seq, rest) = der::read(der, der::SEQUENCE)?;
        if !rest.is_empty() {
            return Err("trailing bytes after RSAPublicKey".to_owned());
        }
        let (modulus, seq) = der::read(seq, der::INTEGER)?;
        let (exponent, seq) = der::read(seq, der::INTEGER)?;
        if !seq.is_empty() {
            return Err("extra fields in RSAPublicKey".to_owned());
        }
        let modulus = der::unsigned(modulus).ok_or("negative or zero modulus")?;
        let exponent = der::unsigned(exponent).ok_or("negative or zero exponent")?;
        if exponent.len() > 4 || exponent.last().is_none_or(|b| b & 1 == 0) || exponent == [1] {
            return Err("the public exponent must be odd, at least 3 and below 2^32".to_owned());
        }
        if modulus.last().is_none_or(|b| b & 1 == 0) {
            return Err("even modulus".to_owned());
        }
        Ok(Self { modulus, exponent })
    }

    fn modulus_bits(&self) -> usize {
        // `unsigned` strips leading zero bytes, so the first byte is non-zero.
        self.modulus.len() * 8 - self.modulus[0].leading_zeros() as usize
    }

    /// Canonical DER.
    fn to_der(&self) -> Vec<u8> {
        let mut body = der::unsigned_integer(self.modulus);
        body.extend(der::unsigned_integer(self.exponent));
        der::tlv(der::SEQUENCE, &body)
    }
}

/// The canonical SubjectPublicKeyInfo of a key of `key_type` with BIT
/// STRING contents `raw`.
fn spki_der(key_type: PublicKeyType, raw: &[u8]) -> Vec<u8> {
    let oid = |oid: &Oid<'_>| der::tlv(der::OID, oid.as_bytes());
    let mut alg = Vec::new();
    match key_type {
        PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => {
            alg.extend(oid(&OID_PKCS1_RSAENCRYPTION));
            alg.extend(der::tlv(der::NULL, &[]));
        }
        PublicKeyType::EcdsaP256 | PublicKeyType::EcdsaP384 | PublicKeyType::EcdsaP521 => {
            let curve = match key_type {
                PublicKeyType::EcdsaP256 => OID_EC_P256,
                PublicKeyType::EcdsaP384 => OID_NIST_EC_P384,
                _ => OID_NIST_EC_P521,
            };
            alg.extend(oid(&OID_KEY_TYPE_EC_PUBLIC_KEY));
            alg.extend(oid(&curve));
        }
        PublicKeyType::Ed25519 => alg.extend(oid(&OID_SIG_ED25519)),
    }
    let mut bits = Vec::with_capacity(raw.len() + 1);
    bits.push(0);
    bits.extend_from_slice(raw);
    let mut body = der::tlv(der::SEQUENCE, &alg);
    body.extend(der::tlv(der::BIT_STRING, &bits));
    der::tlv(der::SEQUENCE, &body)
}

/// Just enough strict DER for RSAPublicKey and SubjectPublicKeyInfo.
mod der {
    pub(super) const INTEGER: u8 = 0x02;
    pub(super) const BIT_STRING: u8 = 0x03;
    pub(super) const NULL: u8 = 0x05;
    pub(super) const OID: u8 = 0x06;
    pub(super) const SEQUENCE: u8 = 0x30;

    /// Reads one element with tag `tag` and a minimally encoded definite
    /// length: its contents and what follows it.
    pub(super) fn read(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), String> {
        let (&found, rest) = input.split_first().ok_or("truncated")?;
        if found != tag {
            return Err(format!("expected tag {tag:#04x}, found {found:#04x}"));
        }
        read_body(rest)
    }

    /// Reads one element of any single-byte tag: the whole element (tag,
    /// length and contents) and what follows it.
    pub(super) fn read_any(input: &[u8]) -> Result<(&[u8], &[u8]), String> {
        let (_, rest) = input.split_first().ok_or("truncated")?;
        let (content, after) = read_body(rest)?;
        let end = input.len() - after.len();
        debug_assert!(end >= content.len());
        Ok((&input[..end], after))
    }

    fn read_body(rest: &[u8]) -> Result<(&[u8], &[u8]), String> {
        let (&first, mut rest) = rest.split_first().ok_or("truncated")?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 3 {
                return Err("unsupported length encoding".to_owned());
            }
            let (bytes, after) = rest.split_at_checked(n).ok_or("truncated")?;
            rest = after;
            let len = bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            if bytes[0] == 0 || len < 0x80 {
                return Err("length not minimally encoded".to_owned());
            }
            len
        };
        rest.split_at_checked(len)
            .ok_or_else(|| "truncated".to_owned())
    }

    /// The magnitude of a positive DER INTEGER without leading zero bytes;
    /// `None` for zero, negative or non-minimal encodings.
    pub(super) fn unsigned(content: &[u8]) -> Option<&[u8]> {
        match content {
            [] | [0] => None,
            [first, ..] if first & 0x80 != 0 => None,
            [0, second, ..] if second & 0x80 == 0 => None,
            [0, rest @ ..] => Some(rest),
            bytes => Some(bytes),
        }
    }

    /// A DER INTEGER for the unsigned big-endian `magnitude` (no leading
    /// zero bytes).
    pub(super) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
        let mut content = Vec::with_capacity(magnitude.len() + 1);
        if magnitude.first().is_some_and(|b| b & 0x80 != 0) {
            content.push(0);
        }
        content.extend_from_slice(magnitude);
        tlv(INTEGER, &content)
    }

    /// One element: tag, minimal definite length, contents.
    pub(super) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let len = content.len();
        let mut out = Vec::with_capacity(len + 4);
        out.push(tag);
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }
}

#[cfg(test)]
mod tests;
