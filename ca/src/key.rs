//! Key types and private keys.

use std::fmt;
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair as _,
};
use x509_parser::asn1_rs::{FromDer, Integer, Sequence};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};
use zeroize::Zeroizing;

use crate::error::{CaError, KeyTypeError};
use crate::pem;

/// The key algorithms credlet issues for. Names follow the Kubernetes
/// `PodCertificateRequest` API (`ECDSAP256`, `ECDSAP384`, `ED25519`).
#[non_exhaustive]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum KeyType {
    /// ECDSA on NIST P-256, signing with SHA-256. The default.
    #[default]
    EcdsaP256,
    /// ECDSA on NIST P-384, signing with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// Every supported key type.
    pub const ALL: [KeyType; 3] = [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519];

    /// The Kubernetes API name: `ECDSAP256`, `ECDSAP384` or `ED25519`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ECDSAP256",
            Self::EcdsaP384 => "ECDSAP384",
            Self::Ed25519 => "ED25519",
        }
    }

    /// The rcgen algorithm for keys (and signatures) of this type.
    pub(crate) fn rcgen_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    fn ecdsa_signing(self) -> Option<&'static EcdsaSigningAlgorithm> {
        match self {
            Self::EcdsaP256 => Some(&ECDSA_P256_SHA256_ASN1_SIGNING),
            Self::EcdsaP384 => Some(&ECDSA_P384_SHA384_ASN1_SIGNING),
            Self::Ed25519 => None,
        }
    }

    /// Length of the raw public key (the SubjectPublicKeyInfo BIT STRING).
    pub(crate) fn raw_public_key_len(self) -> usize {
        match self {
            Self::EcdsaP256 => 65,
            Self::EcdsaP384 => 97,
            Self::Ed25519 => 32,
        }
    }

    /// Identifies the key type of a SubjectPublicKeyInfo; the error describes
    /// the unsupported algorithm.
    pub(crate) fn of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, String> {
        Self::of_algorithm(&spki.algorithm)
    }

    /// Identifies the key type of a public key algorithm identifier (as found
    /// in SubjectPublicKeyInfo and PKCS#8).
    pub(crate) fn of_algorithm(alg: &AlgorithmIdentifier<'_>) -> Result<Self, String> {
        if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
            return match curve {
                Some(c) if c == OID_EC_P256 => Ok(Self::EcdsaP256),
                Some(c) if c == OID_NIST_EC_P384 => Ok(Self::EcdsaP384),
                Some(c) => Err(format!("EC key on curve {c}")),
                None => Err("EC key without a named curve".to_owned()),
            };
        }
        if alg.algorithm == OID_SIG_ED25519 {
            return if alg.parameters.is_none() {
                Ok(Self::Ed25519)
            } else {
                Err("Ed25519 key with algorithm parameters".to_owned())
            };
        }
        let oid = alg.algorithm.to_id_string();
        Err(match oid.as_str() {
            "1.2.840.113549.1.1.1" => "RSA key (rsaEncryption)".to_owned(),
            "1.3.101.113" => "Ed448 key".to_owned(),
            _ => format!("key algorithm {oid}"),
        })
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = KeyTypeError;

    /// Parses a Kubernetes key type name, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(key_type) = Self::ALL
            .into_iter()
            .find(|k| s.eq_ignore_ascii_case(k.name()))
        {
            return Ok(key_type);
        }
        if s.eq_ignore_ascii_case("RSA3072") || s.eq_ignore_ascii_case("RSA4096") {
            return Err(KeyTypeError::NotYetSupported { name: s.to_owned() });
        }
        Err(KeyTypeError::Unknown { name: s.to_owned() })
    }
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A parsed key pair usable by rcgen for signing. Holds no serialized key.
pub(crate) struct KeyMaterial {
    key_type: KeyType,
    pair: Pair,
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("key_type", &self.key_type)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl KeyMaterial {
    fn from_pkcs8(
        key_type: KeyType,
        pkcs8: &[u8],
        rng: &SystemRandom,
    ) -> Result<Self, ring::error::KeyRejected> {
        let pair = match key_type.ecdsa_signing() {
            Some(alg) => Pair::Ecdsa(EcdsaKeyPair::from_pkcs8(alg, pkcs8, rng)?),
            // Accepts PKCS#8 v1 (no embedded public key) as written by OpenSSL.
            None => Pair::Ed25519(Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)?),
        };
        Ok(Self { key_type, pair })
    }

    /// Parses an unencrypted PKCS#8 key of any supported type, reading the
    /// type from its algorithm identifier.
    fn detect(pkcs8: &[u8]) -> Result<Self, CaError> {
        let invalid = |reason: String| CaError::InvalidPrivateKey { reason };
        // PrivateKeyInfo ::= SEQUENCE { version INTEGER, privateKeyAlgorithm
        // AlgorithmIdentifier, privateKey OCTET STRING, ... }
        let (_, info) = Sequence::from_der(pkcs8)
            .map_err(|e| invalid(format!("not a DER PKCS#8 structure: {e}")))?;
        let (rest, _version) = Integer::from_der(&info.content)
            .map_err(|e| invalid(format!("not a DER PKCS#8 structure: {e}")))?;
        let (_, algorithm) = AlgorithmIdentifier::from_der(rest)
            .map_err(|e| invalid(format!("not a DER PKCS#8 structure: {e}")))?;
        let key_type = KeyType::of_algorithm(&algorithm).map_err(|found| {
            invalid(format!(
                "unsupported {found}; supported are ECDSA P-256, ECDSA P-384 and Ed25519"
            ))
        })?;
        Self::from_pkcs8(key_type, pkcs8, &SystemRandom::new())
            .map_err(|e| invalid(format!("rejected as a {key_type} PKCS#8 key: {e}")))
    }

    pub(crate) fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The raw public key: the uncompressed EC point, or the 32 Ed25519 bytes.
    pub(crate) fn public_key_raw(&self) -> &[u8] {
        match &self.pair {
            Pair::Ecdsa(k) => k.public_key().as_ref(),
            Pair::Ed25519(k) => k.public_key().as_ref(),
        }
    }

    /// True when `spki` holds this key's public half.
    pub(crate) fn matches_spki(&self, spki: &SubjectPublicKeyInfo<'_>) -> bool {
        KeyType::of_spki(spki) == Ok(self.key_type)
            && spki.subject_public_key.unused_bits == 0
            && spki.subject_public_key.data.as_ref() == self.public_key_raw()
    }
}

impl rcgen::PublicKeyData for KeyMaterial {
    fn der_bytes(&self) -> &[u8] {
        self.public_key_raw()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_type.rcgen_algorithm()
    }
}

impl rcgen::SigningKey for KeyMaterial {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match &self.pair {
            Pair::Ecdsa(k) => k
                .sign(&SystemRandom::new(), msg)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| rcgen::Error::RingUnspecified),
            Pair::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
        }
    }
}

/// A private key generated on (or loaded by) the node. The PKCS#8 PEM lives
/// in a buffer that is wiped on drop; `Debug` shows only the key type.
pub struct PrivateKey {
    material: KeyMaterial,
    pem: Zeroizing<String>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("key_type", &self.material.key_type)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PrivateKey {
    /// Generates a fresh key pair of the given type from the system CSPRNG.
    pub fn generate(key_type: KeyType) -> Result<Self, CaError> {
        let rng = SystemRandom::new();
        let generated = match key_type.ecdsa_signing() {
            Some(alg) => EcdsaKeyPair::generate_pkcs8(alg, &rng),
            None => Ed25519KeyPair::generate_pkcs8(&rng),
        };
        let pkcs8 = generated.map_err(|_| CaError::KeyGeneration {
            key_type,
            reason: "the system random number generator failed".to_owned(),
        })?;
        let material = KeyMaterial::from_pkcs8(key_type, pkcs8.as_ref(), &rng).map_err(|e| {
            CaError::KeyGeneration {
                key_type,
                reason: format!("the generated key was rejected: {e}"),
            }
        })?;
        let pem = pem::encode_secret(pem::PRIVATE_KEY, pkcs8.as_ref());
        Ok(Self { material, pem })
    }

    /// Loads an unencrypted PKCS#8 PEM key (`-----BEGIN PRIVATE KEY-----`),
    /// detecting its type. Text around the block is ignored; the first block
    /// must be the key.
    pub fn from_pem(pem_text: &str) -> Result<Self, CaError> {
        let what = "private key";
        let blocks = pem::blocks(pem_text).map_err(|reason| CaError::Pem { what, reason })?;
        let block = blocks.first().ok_or_else(|| CaError::Pem {
            what,
            reason: "no PEM block found".to_owned(),
        })?;
        if block.label != pem::PRIVATE_KEY {
            let hint = match block.label {
                "EC PRIVATE KEY" | "RSA PRIVATE KEY" => {
                    " (convert it with `openssl pkcs8 -topk8 -nocrypt`)"
                }
                "ENCRYPTED PRIVATE KEY" => " (encrypted keys are not supported)",
                _ => "",
            };
            return Err(CaError::Pem {
                what,
                reason: format!(
                    "block is labelled {:?}, expected \"{}\"{hint}",
                    block.label,
                    pem::PRIVATE_KEY
                ),
            });
        }
        let der = block
            .decode_secret()
            .map_err(|reason| CaError::Pem { what, reason })?;
        let material = KeyMaterial::detect(&der)?;
        // Re-encode so `pem()` is canonical and holds only the key.
        let pem = pem::encode_secret(pem::PRIVATE_KEY, &der);
        Ok(Self { material, pem })
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.material.key_type
    }

    /// The key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The public half as a DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.material)
    }

    /// Builds a PKCS#10 CSR (DER) signed by this key: the signature is the
    /// proof of possession. The subject is empty and no extensions are
    /// requested; the CA decides the identity.
    pub fn certificate_signing_request(&self) -> Result<Vec<u8>, CaError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&self.material)
            .map_err(|e| CaError::Encoding {
                what: "certificate signing request",
                reason: e.to_string(),
            })?;
        Ok(csr.der().to_vec())
    }

    pub(crate) fn material(&self) -> &KeyMaterial {
        &self.material
    }

    pub(crate) fn into_parts(self) -> (KeyMaterial, Zeroizing<String>) {
        (self.material, self.pem)
    }
}
