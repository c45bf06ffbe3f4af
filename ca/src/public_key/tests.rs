//! Proofs of possession and stub CSRs for every key type, made with real
//! keys the way the kubelet makes them, plus interoperability vectors made
//! with OpenSSL; issuance for the verified keys.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
use x509_parser::prelude::FromDer as _;

use super::*;
use crate::{
    Authority, IssuanceRequest, PodIdentity, Policy, PrivateKey, inspect_leaf, verify_chain,
};

const POD_UID: &str = "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10";

/// A private key of any type, able to make kubelet-style proofs.
enum TestKey {
    Ring(ring::signature::EcdsaKeyPair, Vec<u8>),
    Ed(Ed25519KeyPair, Vec<u8>),
    P384(p384::ecdsa::SigningKey),
    P521(p521::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

fn rsa_key(bits: usize) -> rsa::RsaPrivateKey {
    static KEYS: OnceLock<[rsa::RsaPrivateKey; 3]> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        [
            include_str!("../testdata/rsa2048.pem"),
            include_str!("../testdata/rsa3072.pem"),
            include_str!("../testdata/rsa4096.pem"),
        ]
        .map(|pem| rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("test RSA key"))
    });
    match bits {
        2048 => keys[0].clone(),
        3072 => keys[1].clone(),
        _ => keys[2].clone(),
    }
}

fn random_scalar_key<K>(len: usize, top_mask: u8, make: impl Fn(&[u8]) -> Option<K>) -> K {
    let rng = SystemRandom::new();
    loop {
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes).unwrap();
        bytes[0] &= top_mask;
        if let Some(key) = make(&bytes) {
            return key;
        }
    }
}

impl TestKey {
    fn generate(key_type: PublicKeyType) -> Self {
        let rng = SystemRandom::new();
        match key_type {
            PublicKeyType::EcdsaP256 => {
                let pkcs8 =
                    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
                let pair =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                        .unwrap();
                let spki = PrivateKey::from_pem(&pem_of(pkcs8.as_ref()))
                    .unwrap()
                    .public_key_der();
                Self::Ring(pair, spki)
            }
            PublicKeyType::Ed25519 => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
                let spki = PrivateKey::from_pem(&pem_of(pkcs8.as_ref()))
                    .unwrap()
                    .public_key_der();
                Self::Ed(pair, spki)
            }
            PublicKeyType::EcdsaP384 => Self::P384(random_scalar_key(48, 0xff, |b| {
                p384::ecdsa::SigningKey::from_slice(b).ok()
            })),
            PublicKeyType::EcdsaP521 => Self::P521(random_scalar_key(66, 0x01, |b| {
                p521::ecdsa::SigningKey::from_slice(b).ok()
            })),
            PublicKeyType::Rsa3072 => Self::Rsa(Box::new(rsa_key(3072))),
            PublicKeyType::Rsa4096 => Self::Rsa(Box::new(rsa_key(4096))),
        }
    }

    fn spki(&self) -> Vec<u8> {
        match self {
            Self::Ring(_, spki) | Self::Ed(_, spki) => spki.clone(),
            Self::P384(k) => ec_spki(
                &OID_NIST_EC_P384,
                p384::ecdsa::VerifyingKey::from(k)
                    .to_encoded_point(false)
                    .as_bytes(),
            ),
            Self::P521(k) => ec_spki(
                &OID_NIST_EC_P521,
                p521::ecdsa::VerifyingKey::from(k)
                    .to_encoded_point(false)
                    .as_bytes(),
            ),
            Self::Rsa(k) => k
                .to_public_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec(),
        }
    }

    /// A proof of possession over `message`, as the kubelet makes it.
    fn prove(&self, message: &[u8]) -> Vec<u8> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        match self {
            Self::Ring(k, _) => k
                .sign(&SystemRandom::new(), message)
                .unwrap()
                .as_ref()
                .to_vec(),
            Self::Ed(k, _) => k.sign(message).as_ref().to_vec(),
            Self::P384(k) => {
                use p384::ecdsa::signature::hazmat::PrehashSigner as _;
                let sig: p384::ecdsa::Signature = k.sign_prehash(digest.as_ref()).unwrap();
                sig.to_der().as_bytes().to_vec()
            }
            Self::P521(k) => {
                use p521::ecdsa::signature::hazmat::RandomizedPrehashSigner as _;
                // The digest as an integer, exactly as Go's ecdsa.SignASN1
                // uses a SHA-256 digest on P-521.
                let mut padded = [0u8; 66];
                padded[34..].copy_from_slice(digest.as_ref());
                let sig: p521::ecdsa::Signature = k
                    .sign_prehash_with_rng(&mut rsa::rand_core::OsRng, &padded)
                    .unwrap();
                sig.to_der().as_bytes().to_vec()
            }
            Self::Rsa(k) => rsa_pss(k, message, usize::MAX),
        }
    }
}

/// RSA-PSS SHA-256 over `message`; `usize::MAX` means the longest salt
/// (Go's `rsa.SignPSS` with nil options).
fn rsa_pss(key: &rsa::RsaPrivateKey, message: &[u8], salt_len: usize) -> Vec<u8> {
    use rsa::traits::PublicKeyParts as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, message);
    let salt_len = if salt_len == usize::MAX {
        (key.n().bits() - 1).div_ceil(8) - 32 - 2
    } else {
        salt_len
    };
    key.sign_with_rng(
        &mut rsa::rand_core::OsRng,
        rsa::Pss::new_with_salt::<rsa::sha2::Sha256>(salt_len),
        digest.as_ref(),
    )
    .unwrap()
}

fn pem_of(pkcs8: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8);
    format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
}

fn ec_spki(curve: &Oid<'_>, point: &[u8]) -> Vec<u8> {
    let mut alg = der::tlv(der::OID, OID_KEY_TYPE_EC_PUBLIC_KEY.as_bytes());
    alg.extend(der::tlv(der::OID, curve.as_bytes()));
    let mut bits = vec![0];
    bits.extend_from_slice(point);
    let mut body = der::tlv(der::SEQUENCE, &alg);
    body.extend(der::tlv(der::BIT_STRING, &bits));
    der::tlv(der::SEQUENCE, &body)
}

fn verify(spki: &[u8], message: &[u8], proof: &[u8]) -> Result<VerifiedPublicKey, PublicKeyError> {
    UnverifiedPublicKey::from_spki_der(spki)?.verify_proof(message, proof)
}

#[test]
fn kubelet_proofs_verify_for_every_key_type() {
    for key_type in PublicKeyType::ALL {
        let key = TestKey::generate(key_type);
        let spki = key.spki();
        let proof = key.prove(POD_UID.as_bytes());
        let parsed = UnverifiedPublicKey::from_spki_der(&spki).unwrap();
        assert_eq!(parsed.key_type(), key_type);
        let verified = parsed.verify_proof(POD_UID.as_bytes(), &proof).unwrap();
        assert_eq!(verified.key_type(), key_type);
        // Well-formed input comes out byte for byte.
        assert_eq!(verified.public_key_der(), spki.as_slice(), "{key_type}");
    }
}

/// Proofs made by OpenSSL, not by the crates credlet verifies with: the
/// digest handling on P-384 and P-521 and the longest PSS salt agree with
/// an independent implementation.
#[test]
fn openssl_made_proofs_verify() {
    let text = include_str!("../testdata/openssl-proofs.txt");
    let mut uid = "";
    let mut checked = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields[0] == "uid" {
            uid = fields[1];
            continue;
        }
        let decode = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        let (spki, proof) = (decode(fields[1]), decode(fields[2]));
        let key =
            verify(&spki, uid.as_bytes(), &proof).unwrap_or_else(|e| panic!("{}: {e}", fields[0]));
        assert!(matches!(
            verify(&spki, POD_UID.as_bytes(), &proof),
            Err(PublicKeyError::BadSignature { .. })
        ));
        checked.push(key.key_type());
    }
    assert_eq!(
        checked,
        [
            PublicKeyType::EcdsaP521,
            PublicKeyType::EcdsaP384,
            PublicKeyType::Rsa3072
        ]
    );
}

#[test]
fn rsa_pss_salt_lengths() {
    let key = TestKey::generate(PublicKeyType::Rsa3072);
    let TestKey::Rsa(private) = &key else {
        unreachable!()
    };
    let spki = key.spki();
    let msg = POD_UID.as_bytes();
    assert!(verify(&spki, msg, &rsa_pss(private, msg, 32)).is_ok());
    assert!(verify(&spki, msg, &rsa_pss(private, msg, usize::MAX)).is_ok());
    assert!(matches!(
        verify(&spki, msg, &rsa_pss(private, msg, 20)),
        Err(PublicKeyError::BadSignature { .. })
    ));
    // PKCS#1 v1.5 is not a PSS proof.
    let v15 = private
        .sign(
            rsa::Pkcs1v15Sign::new::<rsa::sha2::Sha256>(),
            ring::digest::digest(&ring::digest::SHA256, msg).as_ref(),
        )
        .unwrap();
    assert!(matches!(
        verify(&spki, msg, &v15),
        Err(PublicKeyError::BadSignature { .. })
    ));
}

#[test]
fn wrong_proofs_fail_for_every_key_type() {
    for key_type in PublicKeyType::ALL {
        let key = TestKey::generate(key_type);
        let spki = key.spki();
        let msg = POD_UID.as_bytes();
        let bad = |r: Result<VerifiedPublicKey, PublicKeyError>, what: &str| {
            assert_eq!(
                r.unwrap_err(),
                PublicKeyError::BadSignature {
                    key_type,
                    what: "proof of possession"
                },
                "{key_type}: {what}"
            );
        };
        // Over another pod's UID.
        bad(
            verify(
                &spki,
                msg,
                &key.prove(b"11111111-2222-3333-4444-555555555555"),
            ),
            "other uid",
        );
        // Tampered.
        let mut proof = key.prove(msg);
        let last = proof.len() - 1;
        proof[last] ^= 1;
        bad(verify(&spki, msg, &proof), "tampered");
        // Made by another key of the same type.
        let other = match key_type {
            // The RSA test keys are fixed: take the other size's… no, a
            // different key of the same size does not exist; use PSS from
            // the 2048-bit key, which has the wrong length for this key.
            PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => {
                rsa_pss(&rsa_key(2048), msg, usize::MAX)
            }
            _ => TestKey::generate(key_type).prove(msg),
        };
        bad(verify(&spki, msg, &other), "other key");
    }
}

#[test]
fn unsupported_keys_are_named() {
    let rsa2048 = TestKey::Rsa(Box::new(rsa_key(2048))).spki();
    let p192 = ec_spki(&Oid::from(&[1, 2, 840, 10045, 3, 1, 1]).unwrap(), &[4; 49]);
    let k256 = ec_spki(&Oid::from(&[1, 3, 132, 0, 10]).unwrap(), &[4; 65]);
    let mut ed448 = der::tlv(der::SEQUENCE, &der::tlv(der::OID, &[0x2b, 0x65, 0x71]));
    ed448.extend(der::tlv(der::BIT_STRING, &[0; 58]));
    let ed448 = der::tlv(der::SEQUENCE, &ed448);
    let p256 = TestKey::generate(PublicKeyType::EcdsaP256).spki();
    let mut compressed = p256.clone();
    let at = compressed.len() - 65;
    compressed[at] = 0x02;
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("RSA 2048", rsa2048, "an RSA key of 2048 bits"),
        ("P-192", p192, "an EC key on curve P-192 (secp192r1)"),
        ("secp256k1", k256, "an EC key on curve secp256k1"),
        ("Ed448", ed448, "an Ed448 key"),
        (
            "compressed",
            compressed,
            "a ECDSAP256 key that is not an uncompressed point",
        ),
        (
            "short P-256",
            ec_spki(&OID_EC_P256, &[4; 33]),
            "a ECDSAP256 key of 33 bytes (expected 65)",
        ),
    ];
    for (name, spki, found) in cases {
        assert_eq!(
            UnverifiedPublicKey::from_spki_der(&spki).unwrap_err(),
            PublicKeyError::UnsupportedKeyType {
                found: found.to_owned()
            },
            "{name}"
        );
    }
    let garbage = UnverifiedPublicKey::from_spki_der(b"not a key").unwrap_err();
    assert!(
        matches!(&garbage, PublicKeyError::UnsupportedKeyType { found } if found.contains("not a DER SubjectPublicKeyInfo")),
        "{garbage:?}"
    );
    assert_eq!(
        UnverifiedPublicKey::from_spki_der(&[]).unwrap_err(),
        PublicKeyError::Empty { what: "public key" }
    );
    assert_eq!(
        UnverifiedPublicKey::from_spki_der(&vec![0x30; MAX_KEY_MATERIAL_LEN + 1]).unwrap_err(),
        PublicKeyError::TooLarge {
            what: "public key",
            len: MAX_KEY_MATERIAL_LEN + 1,
            max: MAX_KEY_MATERIAL_LEN
        }
    );
    let mut trailing = TestKey::generate(PublicKeyType::Ed25519).spki();
    trailing.push(0);
    assert!(matches!(
        UnverifiedPublicKey::from_spki_der(&trailing).unwrap_err(),
        PublicKeyError::Malformed {
            what: "public key",
            ..
        }
    ));
    let key = UnverifiedPublicKey::from_spki_der(&p256).unwrap();
    assert_eq!(
        key.verify_proof(b"x", &[]).unwrap_err(),
        PublicKeyError::Empty {
            what: "proof of possession"
        }
    );
}

#[test]
fn rsa_key_rules() {
    let n = rsa_key(3072);
    use rsa::traits::PublicKeyParts as _;
    let modulus = n.n().to_bytes_be();
    let rsa_spki = |modulus: &[u8], exponent: &[u8]| {
        let mut body = der::unsigned_integer(modulus);
        body.extend(der::unsigned_integer(exponent));
        let key = der::tlv(der::SEQUENCE, &body);
        spki_der(PublicKeyType::Rsa3072, &key)
    };
    let ok = rsa_spki(&modulus, &[1, 0, 1]);
    assert_eq!(
        UnverifiedPublicKey::from_spki_der(&ok).unwrap().key_type(),
        PublicKeyType::Rsa3072
    );
    for (name, exponent) in [
        ("even", &[1, 0, 0][..]),
        ("one", &[1]),
        ("huge", &[1, 0, 0, 0, 1]),
    ] {
        let err = UnverifiedPublicKey::from_spki_der(&rsa_spki(&modulus, exponent)).unwrap_err();
        assert!(
            matches!(&err, PublicKeyError::UnsupportedKeyType { found } if found.contains("exponent")),
            "{name}: {err:?}"
        );
    }
    // A 3071-bit modulus is not RSA3072.
    let mut short = modulus.clone();
    short[0] = 0x7f;
    assert_eq!(
        UnverifiedPublicKey::from_spki_der(&rsa_spki(&short, &[1, 0, 1])).unwrap_err(),
        PublicKeyError::UnsupportedKeyType {
            found: "an RSA key of 3071 bits".to_owned()
        }
    );
}

/// A PKCS#10 request built by hand, for key types rcgen can not sign with
/// (P-521), and for tampering.
fn hand_csr(spki: &[u8], sig_alg: &Oid<'_>, sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let mut info = der::tlv(der::INTEGER, &[0]);
    info.extend(der::tlv(der::SEQUENCE, &[]));
    info.extend_from_slice(spki);
    info.extend([0xa0, 0x00]);
    let info = der::tlv(der::SEQUENCE, &info);
    let signature = sign(&info);
    let mut bits = vec![0];
    bits.extend(signature);
    let mut body = info;
    body.extend(der::tlv(
        der::SEQUENCE,
        &der::tlv(der::OID, sig_alg.as_bytes()),
    ));
    body.extend(der::tlv(der::BIT_STRING, &bits));
    der::tlv(der::SEQUENCE, &body)
}

fn csr_for(key_type: PublicKeyType) -> Vec<u8> {
    match key_type {
        PublicKeyType::EcdsaP256 | PublicKeyType::EcdsaP384 | PublicKeyType::Ed25519 => {
            PrivateKey::generate(key_type.as_key_type().unwrap())
                .unwrap()
                .certificate_signing_request()
                .unwrap()
        }
        PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => {
            let bits = if key_type == PublicKeyType::Rsa3072 {
                3072
            } else {
                4096
            };
            let pem = include_str!("../testdata/rsa3072.pem");
            let pem = if bits == 3072 {
                pem
            } else {
                include_str!("../testdata/rsa4096.pem")
            };
            let pair =
                rcgen::KeyPair::from_pem_and_sign_algo(pem, &rcgen::PKCS_RSA_SHA256).unwrap();
            rcgen::CertificateParams::default()
                .serialize_request(&pair)
                .unwrap()
                .der()
                .to_vec()
        }
        PublicKeyType::EcdsaP521 => {
            let TestKey::P521(key) = TestKey::generate(key_type) else {
                unreachable!()
            };
            let spki = TestKey::P521(key.clone()).spki();
            hand_csr(&spki, &OID_SIG_ECDSA_WITH_SHA512, |info| {
                use p521::ecdsa::signature::hazmat::RandomizedPrehashSigner as _;
                let digest = ring::digest::digest(&ring::digest::SHA512, info);
                let sig: p521::ecdsa::Signature = key
                    .sign_prehash_with_rng(&mut rsa::rand_core::OsRng, digest.as_ref())
                    .unwrap();
                sig.to_der().as_bytes().to_vec()
            })
        }
    }
}

#[test]
fn stub_csrs_verify_for_every_key_type() {
    for key_type in PublicKeyType::ALL {
        let der = csr_for(key_type);
        let csr = UnverifiedCsr::from_der(&der).unwrap();
        assert_eq!(csr.key_type(), key_type);
        let key = csr.verify().unwrap();
        assert_eq!(key.key_type(), key_type);
        let (_, parsed) = X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(
            key.public_key_der(),
            parsed.certification_request_info.subject_pki.raw
        );
    }
}

#[test]
fn bad_stub_csrs_are_refused() {
    for key_type in PublicKeyType::ALL {
        let mut der = csr_for(key_type);
        let last = der.len() - 1;
        der[last] ^= 1;
        assert_eq!(
            UnverifiedCsr::from_der(&der).unwrap().verify().unwrap_err(),
            PublicKeyError::BadSignature {
                key_type,
                what: "certificate signing request"
            },
            "{key_type}"
        );
    }
    // Another key's signature over this key's request info.
    let victim = TestKey::generate(PublicKeyType::EcdsaP256).spki();
    let attacker = TestKey::generate(PublicKeyType::EcdsaP256);
    let forged = hand_csr(&victim, &OID_SIG_ECDSA_WITH_SHA256, |info| {
        attacker.prove(info)
    });
    assert!(matches!(
        UnverifiedCsr::from_der(&forged).unwrap().verify(),
        Err(PublicKeyError::BadSignature { .. })
    ));
    // A signature algorithm that does not fit the key.
    let key = TestKey::generate(PublicKeyType::EcdsaP256);
    let mismatched = hand_csr(&key.spki(), &OID_SIG_ECDSA_WITH_SHA512, |info| {
        key.prove(info)
    });
    assert_eq!(
        UnverifiedCsr::from_der(&mismatched).unwrap_err(),
        PublicKeyError::UnsupportedSignatureAlgorithm {
            key_type: PublicKeyType::EcdsaP256,
            algorithm: "ecdsa-with-SHA512".to_owned(),
            supported: "ecdsa-with-SHA256, ecdsa-with-SHA384"
        }
    );
    // Unsupported key in a CSR.
    let pair = rcgen::KeyPair::from_pem_and_sign_algo(
        include_str!("../testdata/rsa2048.pem"),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let rsa2048 = rcgen::CertificateParams::default()
        .serialize_request(&pair)
        .unwrap();
    assert_eq!(
        UnverifiedCsr::from_der(rsa2048.der()).unwrap_err(),
        PublicKeyError::UnsupportedKeyType {
            found: "an RSA key of 2048 bits".to_owned()
        }
    );
    // Trailing bytes and garbage.
    let mut trailing = csr_for(PublicKeyType::Ed25519);
    trailing.push(0);
    for der in [trailing, b"garbage".to_vec()] {
        assert!(matches!(
            UnverifiedCsr::from_der(&der).unwrap_err(),
            PublicKeyError::Malformed {
                what: "certificate signing request",
                ..
            }
        ));
    }
    assert_eq!(
        UnverifiedCsr::from_der(&[]).unwrap_err(),
        PublicKeyError::Empty {
            what: "certificate signing request"
        }
    );
}

fn identity() -> PodIdentity {
    PodIdentity {
        namespace: "team-a".into(),
        name: "web-0".into(),
        uid: POD_UID.into(),
        service_account: "web".into(),
    }
}

fn request(duration: Duration) -> IssuanceRequest {
    IssuanceRequest {
        csr_der: Vec::new(),
        identity: identity(),
        spiffe_id: None,
        dns_names: vec!["web.team-a.svc".into()],
        ip_addresses: vec![],
        common_name: None,
        duration,
    }
}

#[test]
fn issues_for_every_verified_key_type() {
    let authority = Authority::generate_self_signed(Policy::new("cluster.local")).unwrap();
    let now = SystemTime::now();
    for key_type in PublicKeyType::ALL {
        let key = TestKey::generate(key_type);
        let verified = verify(
            &key.spki(),
            POD_UID.as_bytes(),
            &key.prove(POD_UID.as_bytes()),
        )
        .unwrap();
        let issued = authority
            .issue_for_public_key(&verified, &request(Duration::from_secs(3600)), now)
            .unwrap();
        verify_chain(&issued.chain_pem, &issued.trust_bundle_pem, now).unwrap();
        let leaf = inspect_leaf(&issued.chain_pem).unwrap();
        assert_eq!(leaf.public_key_der, key.spki(), "{key_type}");
        assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/team-a/sa/web"]);
        assert_eq!(leaf.dns_names, ["web.team-a.svc"]);
        assert_eq!(leaf.not_before, issued.not_before);
        assert_eq!(leaf.not_after, issued.not_after);
        assert_eq!(
            issued.not_after.duration_since(issued.not_before).unwrap(),
            Duration::from_secs(3600)
        );
        assert!(now.duration_since(issued.not_before).unwrap() < Duration::from_secs(1));
    }
}

#[test]
fn issuance_applies_the_policy() {
    let authority = Authority::generate_self_signed(Policy::new("cluster.local")).unwrap();
    let key = csr_for(PublicKeyType::Ed25519);
    let verified = UnverifiedCsr::from_der(&key).unwrap().verify().unwrap();
    let err = authority
        .issue_for_public_key(
            &verified,
            &request(Duration::from_secs(60)),
            SystemTime::now(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            crate::IssueError::Policy(crate::PolicyError::DurationTooShort { .. })
        ),
        "{err:?}"
    );
    let mut wildcard = request(Duration::from_secs(3600));
    wildcard.dns_names = vec!["*.team-a.svc".into()];
    assert!(matches!(
        authority.issue_for_public_key(&verified, &wildcard, SystemTime::now()),
        Err(crate::IssueError::Policy(
            crate::PolicyError::WildcardDnsName { .. }
        ))
    ));
}

#[test]
fn a_verified_csr_converts() {
    let key = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
    let csr = VerifiedCsr::from_der(&key.certificate_signing_request().unwrap()).unwrap();
    let public = VerifiedPublicKey::from(&csr);
    assert_eq!(public.key_type(), PublicKeyType::EcdsaP384);
    assert_eq!(public.public_key_der(), key.public_key_der().as_slice());
    let authority = Authority::generate_self_signed(Policy::new("cluster.local")).unwrap();
    let issued = authority
        .issue_for_public_key(
            &public,
            &request(Duration::from_secs(3600)),
            SystemTime::now(),
        )
        .unwrap();
    assert!(crate::key_matches_certificate(key.pem(), &issued.chain_pem).unwrap());
    assert!(format!("{public:?}").contains("EcdsaP384"));
}

#[test]
fn names_round_trip() {
    for t in PublicKeyType::ALL {
        assert_eq!(PublicKeyType::from_name(t.name()), Some(t));
        assert_eq!(PublicKeyType::from_name(&t.name().to_lowercase()), Some(t));
    }
    assert_eq!(PublicKeyType::from_name("RSA2048"), None);
    for k in KeyType::ALL {
        assert_eq!(PublicKeyType::from(k).as_key_type(), Some(k));
        assert_eq!(PublicKeyType::from(k).name(), k.name());
    }
}
