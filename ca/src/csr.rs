//! CSR parsing and proof-of-possession checks.

use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ED25519, UnparsedPublicKey,
    VerificationAlgorithm,
};
use x509_parser::asn1_rs::FromDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::x509::X509Version;

use crate::error::CsrError;
use crate::key::KeyType;

/// A CSR that parsed and whose self-signature verified (proof of
/// possession). Only its public key is kept: the subject, extensions and
/// other attributes of a CSR never reach a certificate.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    key_type: KeyType,
    spki: Vec<u8>,
}

impl VerifiedCsr {
    /// Largest CSR accepted, in bytes.
    pub const MAX_DER_LEN: usize = 16 * 1024;

    /// Parses a DER PKCS#10 request and verifies its signature with its own
    /// public key. Only ECDSA P-256 with SHA-256, ECDSA P-384 with SHA-384
    /// and Ed25519 are accepted; trailing bytes are rejected.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.is_empty() {
            return Err(CsrError::Empty);
        }
        if der.len() > Self::MAX_DER_LEN {
            return Err(CsrError::TooLarge {
                len: der.len(),
                max: Self::MAX_DER_LEN,
            });
        }
        let malformed = |reason: String| CsrError::Malformed { reason };
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

        let spki = &info.subject_pki;
        let key_type = KeyType::of_spki(spki)
            .map_err(|algorithm| CsrError::UnsupportedKeyType { algorithm })?;
        let key = &spki.subject_public_key;
        if key.unused_bits != 0 || key.data.len() != key_type.raw_public_key_len() {
            return Err(malformed(format!(
                "{key_type} public key has the wrong length ({} bytes)",
                key.data.len()
            )));
        }
        if !spki.raw.ends_with(&key.data) {
            return Err(malformed("public key is not DER encoded".to_owned()));
        }
        if key_type != KeyType::Ed25519 && key.data[0] != 0x04 {
            return Err(malformed(format!(
                "{key_type} public key is not an uncompressed point"
            )));
        }

        let sig_alg = &csr.signature_algorithm;
        let (expected_oid, verifier): (_, &'static dyn VerificationAlgorithm) = match key_type {
            KeyType::EcdsaP256 => (&OID_SIG_ECDSA_WITH_SHA256, &ECDSA_P256_SHA256_ASN1),
            KeyType::EcdsaP384 => (&OID_SIG_ECDSA_WITH_SHA384, &ECDSA_P384_SHA384_ASN1),
            KeyType::Ed25519 => (&OID_SIG_ED25519, &ED25519),
        };
        if sig_alg.algorithm != *expected_oid || sig_alg.parameters.is_some() {
            return Err(CsrError::UnsupportedKeyType {
                algorithm: format!(
                    "{key_type} key with signature algorithm {}{}",
                    sig_alg.algorithm.to_id_string(),
                    if sig_alg.parameters.is_some() {
                        " (with parameters)"
                    } else {
                        ""
                    }
                ),
            });
        }
        let signature = &csr.signature_value;
        if signature.unused_bits != 0 {
            return Err(CsrError::BadSignature);
        }
        UnparsedPublicKey::new(verifier, key.data.as_ref())
            .verify(info.raw, signature.data.as_ref())
            .map_err(|_| CsrError::BadSignature)?;

        Ok(Self {
            key_type,
            spki: spki.raw.to_vec(),
        })
    }

    /// The requester's key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The requester's public key as a DER SubjectPublicKeyInfo, exactly as
    /// it appeared in the CSR.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    /// The public key in the form rcgen signs over.
    pub(crate) fn rcgen_public_key(&self) -> CsrPublicKey<'_> {
        // In DER the BIT STRING holding the key is the last element of the
        // SubjectPublicKeyInfo SEQUENCE, so the raw key is its tail; the
        // length was checked in `from_der`.
        let len = self.key_type.raw_public_key_len();
        CsrPublicKey {
            key_type: self.key_type,
            raw: &self.spki[self.spki.len() - len..],
        }
    }
}

/// A CSR's public key as rcgen wants it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CsrPublicKey<'a> {
    key_type: KeyType,
    raw: &'a [u8],
}

impl rcgen::PublicKeyData for CsrPublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_type.rcgen_algorithm()
    }
}
