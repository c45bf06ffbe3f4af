//! Public keys certified without a CSR: the key of a Kubernetes
//! `PodCertificateRequest`, proven by a signature over the pod UID or by a
//! stub PKCS#10 request.

use std::fmt;

use crate::csr::VerifiedCsr;
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

/// A public key whose holder proved possession of the private key. Only
/// this crate constructs one, and only after the proof verified.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedPublicKey {
    key_type: PublicKeyType,
    spki: Vec<u8>,
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

    /// The key as a DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }
}

impl From<&VerifiedCsr> for VerifiedPublicKey {
    fn from(csr: &VerifiedCsr) -> Self {
        Self {
            key_type: csr.key_type().into(),
            spki: csr.public_key_der().to_vec(),
        }
    }
}
