//! `validate` against requests made the way the kubelet makes them, with
//! real keys of every type, and every denial with its exact reason.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use credlet_ca::{Authority, IssuanceRequest, PodIdentity, Policy, PrivateKey, inspect_leaf};
use ring::rand::{SecureRandom as _, SystemRandom};
use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};

use super::*;

const POD_UID: &str = "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10";

/// A private key of any type, making proofs and CSRs as the kubelet does.
enum TestKey {
    /// P-256 or Ed25519, through credlet's own (ring) keys.
    Ring(PrivateKey),
    P384(p384::ecdsa::SigningKey),
    P521(p521::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>, &'static str),
}

/// The RSA keys are generated once (OpenSSL) and checked in: generating
/// 4096-bit keys in a debug build takes too long.
fn rsa_key(bits: usize) -> (rsa::RsaPrivateKey, &'static str) {
    static KEYS: OnceLock<Vec<(rsa::RsaPrivateKey, &'static str)>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        [
            include_str!("../../tests/data/pcr-rsa2048.pem"),
            include_str!("../../tests/data/pcr-rsa3072.pem"),
            include_str!("../../tests/data/pcr-rsa4096.pem"),
        ]
        .into_iter()
        .map(|pem| (rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap(), pem))
        .collect()
    });
    let (key, pem) = &keys[match bits {
        2048 => 0,
        3072 => 1,
        _ => 2,
    }];
    (key.clone(), pem)
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new().fill(&mut bytes).unwrap();
    bytes
}

impl TestKey {
    fn generate(key_type: PublicKeyType) -> Self {
        match key_type {
            PublicKeyType::EcdsaP256 | PublicKeyType::Ed25519 => {
                Self::Ring(PrivateKey::generate(key_type.as_key_type().unwrap()).unwrap())
            }
            PublicKeyType::EcdsaP384 => loop {
                if let Ok(k) = p384::ecdsa::SigningKey::from_slice(&random_bytes(48)) {
                    break Self::P384(k);
                }
            },
            PublicKeyType::EcdsaP521 => loop {
                let mut bytes = random_bytes(66);
                bytes[0] &= 1;
                if let Ok(k) = p521::ecdsa::SigningKey::from_slice(&bytes) {
                    break Self::P521(k);
                }
            },
            PublicKeyType::Rsa3072 => {
                let (k, pem) = rsa_key(3072);
                Self::Rsa(Box::new(k), pem)
            }
            _ => {
                let (k, pem) = rsa_key(4096);
                Self::Rsa(Box::new(k), pem)
            }
        }
    }

    fn rsa2048() -> Self {
        let (k, pem) = rsa_key(2048);
        Self::Rsa(Box::new(k), pem)
    }

    /// DER SubjectPublicKeyInfo, as Go's `x509.MarshalPKIXPublicKey`.
    fn spki(&self) -> Vec<u8> {
        match self {
            Self::Ring(k) => k.public_key_der(),
            Self::P384(k) => ec_spki(
                &[0x2b, 0x81, 0x04, 0x00, 0x22],
                p384::ecdsa::VerifyingKey::from(k)
                    .to_encoded_point(false)
                    .as_bytes(),
            ),
            Self::P521(k) => ec_spki(
                &[0x2b, 0x81, 0x04, 0x00, 0x23],
                p521::ecdsa::VerifyingKey::from(k)
                    .to_encoded_point(false)
                    .as_bytes(),
            ),
            Self::Rsa(k, _) => k
                .to_public_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec(),
        }
    }

    /// The kubelet's proof of possession over `message` (the pod UID):
    /// ECDSA over SHA-256 on every curve, Ed25519 over the bytes, RSA-PSS
    /// SHA-256 with Go's default (longest) salt.
    fn prove(&self, message: &[u8]) -> Vec<u8> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        match self {
            Self::Ring(k) => sign_with_pkcs8(k, message),
            Self::P384(k) => {
                use p384::ecdsa::signature::hazmat::PrehashSigner as _;
                let sig: p384::ecdsa::Signature = k.sign_prehash(digest.as_ref()).unwrap();
                sig.to_der().as_bytes().to_vec()
            }
            Self::P521(k) => {
                use p521::ecdsa::signature::hazmat::RandomizedPrehashSigner as _;
                let mut padded = [0u8; 66];
                padded[34..].copy_from_slice(digest.as_ref());
                let sig: p521::ecdsa::Signature = k
                    .sign_prehash_with_rng(&mut rsa::rand_core::OsRng, &padded)
                    .unwrap();
                sig.to_der().as_bytes().to_vec()
            }
            Self::Rsa(k, _) => {
                use rsa::traits::PublicKeyParts as _;
                let salt = (k.n().bits() - 1).div_ceil(8) - 32 - 2;
                k.sign_with_rng(
                    &mut rsa::rand_core::OsRng,
                    rsa::Pss::new_with_salt::<rsa::sha2::Sha256>(salt),
                    digest.as_ref(),
                )
                .unwrap()
            }
        }
    }

    /// A stub CSR as the 1.36 kubelet makes it: empty, signed by the key.
    fn stub_csr(&self) -> Vec<u8> {
        match self {
            Self::Ring(k) => k.certificate_signing_request().unwrap(),
            Self::Rsa(_, pem) => {
                let pair =
                    rcgen::KeyPair::from_pem_and_sign_algo(pem, &rcgen::PKCS_RSA_SHA256).unwrap();
                rcgen::CertificateParams::default()
                    .serialize_request(&pair)
                    .unwrap()
                    .der()
                    .to_vec()
            }
            // rcgen on ring can not sign with these: build the request.
            Self::P384(_) => hand_csr(
                &self.spki(),
                &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
                |info| self.sign_digest(&ring::digest::SHA384, info),
            ),
            Self::P521(_) => hand_csr(
                &self.spki(),
                &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
                |info| self.sign_digest(&ring::digest::SHA512, info),
            ),
        }
    }

    fn sign_digest(&self, alg: &'static ring::digest::Algorithm, msg: &[u8]) -> Vec<u8> {
        use p521::ecdsa::signature::hazmat::RandomizedPrehashSigner as _;
        let digest = ring::digest::digest(alg, msg);
        match self {
            Self::P384(k) => {
                use p384::ecdsa::signature::hazmat::PrehashSigner as _;
                let sig: p384::ecdsa::Signature = k.sign_prehash(digest.as_ref()).unwrap();
                sig.to_der().as_bytes().to_vec()
            }
            Self::P521(k) => {
                let sig: p521::ecdsa::Signature = k
                    .sign_prehash_with_rng(&mut rsa::rand_core::OsRng, digest.as_ref())
                    .unwrap();
                sig.to_der().as_bytes().to_vec()
            }
            _ => unreachable!("only for P-384 and P-521"),
        }
    }
}

/// Signs with a credlet `PrivateKey` through ring, as the kubelet would
/// with the same key (ECDSA P-256 SHA-256 ASN.1, or Ed25519).
fn sign_with_pkcs8(key: &PrivateKey, message: &[u8]) -> Vec<u8> {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
    let der = pem_body(key.pem());
    match key.key_type() {
        credlet_ca::KeyType::Ed25519 => Ed25519KeyPair::from_pkcs8(&der)
            .unwrap()
            .sign(message)
            .as_ref()
            .to_vec(),
        _ => EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &SystemRandom::new())
            .unwrap()
            .sign(&SystemRandom::new(), message)
            .unwrap()
            .as_ref()
            .to_vec(),
    }
}

fn pem_body(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn ec_spki(curve_oid: &[u8], point: &[u8]) -> Vec<u8> {
    let mut alg = tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
    alg.extend(tlv(0x06, curve_oid));
    let mut bits = vec![0];
    bits.extend_from_slice(point);
    let mut body = tlv(0x30, &alg);
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// An empty PKCS#10 request for `spki`, signed by `sign` with `sig_oid`.
fn hand_csr(spki: &[u8], sig_oid: &[u8], sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let mut info = tlv(0x02, &[0]);
    info.extend(tlv(0x30, &[]));
    info.extend_from_slice(spki);
    info.extend([0xa0, 0x00]);
    let info = tlv(0x30, &info);
    let mut bits = vec![0];
    bits.extend(sign(&info));
    let mut body = info;
    body.extend(tlv(0x30, &tlv(0x06, sig_oid)));
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

fn base_request() -> PodCertificateRequest {
    PodCertificateRequest {
        api_version: Some(ApiVersion::V1beta1),
        metadata: ObjectMeta {
            name: Some("req-7x2kq".into()),
            namespace: Some("team-a".into()),
            uid: Some("9d8c7b6a-5f4e-4d3c-2b1a-0f9e8d7c6b5a".into()),
            ..ObjectMeta::default()
        },
        spec: PodCertificateRequestSpec {
            signer_name: "credlet.io/pod".into(),
            pod_name: "web-0".into(),
            pod_uid: POD_UID.into(),
            service_account_name: "web".into(),
            service_account_uid: "5a4c6f1e-93d2-4b8e-a1c7-0f2e3d4c5b6a".into(),
            node_name: "node-a".into(),
            node_uid: "8f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b".into(),
            ..PodCertificateRequestSpec::default()
        },
        status: None,
    }
}

/// A 1.35-shape request for `key`: public key plus proof over the pod UID.
fn with_proof(key: &TestKey) -> PodCertificateRequest {
    let mut request = base_request();
    request.spec.pkix_public_key = Some(ByteString(key.spki()));
    request.spec.proof_of_possession = Some(ByteString(key.prove(POD_UID.as_bytes())));
    request
}

/// A 1.36-shape request for `key`.
fn with_stub(key: &TestKey) -> PodCertificateRequest {
    let mut request = base_request();
    request.spec.stub_pkcs10_request = Some(ByteString(key.stub_csr()));
    request
}

fn denial(request: &PodCertificateRequest) -> Denial {
    validate(request, &AcceptedKeyTypes::default()).expect_err("expected a denial")
}

fn assert_denied(request: &PodCertificateRequest, reason: DenialReason, needle: &str) {
    let d = denial(request);
    assert_eq!(d.reason, reason, "{d}");
    assert!(
        d.message.contains(needle),
        "{needle:?} not in {:?}",
        d.message
    );
}

#[test]
fn accepts_proofs_for_every_key_type() {
    for key_type in PublicKeyType::ALL {
        let key = TestKey::generate(key_type);
        let v = validate(&with_proof(&key), &AcceptedKeyTypes::default())
            .unwrap_or_else(|d| panic!("{key_type}: {d}"));
        assert_eq!(v.public_key.key_type(), key_type);
        assert_eq!(v.public_key.public_key_der(), key.spki().as_slice());
        assert_eq!(v.shape, RequestShape::PublicKeyAndProof);
        assert_eq!(v.pod_uid, POD_UID);
        assert_eq!(v.namespace, "team-a");
        assert_eq!(v.name, "req-7x2kq");
        assert_eq!(v.service_account_name, "web");
        assert_eq!(v.node_name, "node-a");
        assert_eq!(v.max_expiration, DEFAULT_MAX_EXPIRATION);
        assert_eq!(v.options, RequestedOptions::default());
    }
}

#[test]
fn accepts_stub_csrs_for_every_key_type() {
    for key_type in PublicKeyType::ALL {
        let key = TestKey::generate(key_type);
        let mut request = with_stub(&key);
        request.api_version = Some(ApiVersion::V1);
        let v = validate(&request, &AcceptedKeyTypes::default())
            .unwrap_or_else(|d| panic!("{key_type}: {d}"));
        assert_eq!(v.public_key.key_type(), key_type);
        assert_eq!(v.public_key.public_key_der(), key.spki().as_slice());
        assert_eq!(v.shape, RequestShape::StubCsr);
    }
}

#[test]
fn wrong_proofs_are_denied_for_every_key_type() {
    for key_type in PublicKeyType::ALL {
        let key = TestKey::generate(key_type);
        // Over another pod's UID.
        let mut request = with_proof(&key);
        request.spec.proof_of_possession = Some(ByteString(
            key.prove(b"11111111-2222-3333-4444-555555555555"),
        ));
        assert_denied(&request, DenialReason::InvalidProofOfPossession, POD_UID);
        // Tampered.
        let mut request = with_proof(&key);
        let proof = request.spec.proof_of_possession.as_mut().unwrap();
        let last = proof.0.len() - 1;
        proof.0[last] ^= 0x01;
        assert_denied(
            &request,
            DenialReason::InvalidProofOfPossession,
            key_type.name(),
        );
        // The key of one request with the proof of another key.
        let other = match key_type {
            PublicKeyType::Rsa3072 | PublicKeyType::Rsa4096 => TestKey::rsa2048(),
            _ => TestKey::generate(key_type),
        };
        let mut request = with_proof(&key);
        request.spec.proof_of_possession = Some(ByteString(other.prove(POD_UID.as_bytes())));
        assert_denied(
            &request,
            DenialReason::InvalidProofOfPossession,
            "spec.pkixPublicKey",
        );
        // A stub CSR whose signature was tampered with.
        let mut request = with_stub(&key);
        let csr = request.spec.stub_pkcs10_request.as_mut().unwrap();
        let last = csr.0.len() - 1;
        csr.0[last] ^= 0x01;
        assert_denied(
            &request,
            DenialReason::InvalidProofOfPossession,
            "stubPKCS10Request",
        );
    }
}

#[test]
fn a_stub_csr_for_someone_elses_key_is_denied() {
    let victim = TestKey::generate(PublicKeyType::EcdsaP384);
    let attacker = TestKey::generate(PublicKeyType::EcdsaP384);
    let mut request = base_request();
    request.spec.stub_pkcs10_request = Some(ByteString(hand_csr(
        &victim.spki(),
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
        |info| attacker.sign_digest(&ring::digest::SHA384, info),
    )));
    assert_denied(
        &request,
        DenialReason::InvalidProofOfPossession,
        "ECDSAP384",
    );
}

#[test]
fn unsupported_key_types_are_denied_with_a_suggestion() {
    let rsa2048 = TestKey::rsa2048();
    assert_denied(
        &with_proof(&rsa2048),
        DenialReason::UnsupportedKeyType,
        "an RSA key of 2048 bits; use ECDSAP256",
    );
    assert_denied(
        &with_stub(&rsa2048),
        DenialReason::UnsupportedKeyType,
        "an RSA key of 2048 bits",
    );
    let p192 = ec_spki(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x01], &[4; 49]);
    let k256 = ec_spki(&[0x2b, 0x81, 0x04, 0x00, 0x0a], &[4; 65]);
    for (spki, needle) in [
        (p192, "P-192"),
        (k256, "secp256k1"),
        (b"garbage".to_vec(), "not a DER SubjectPublicKeyInfo"),
    ] {
        let mut request = base_request();
        request.spec.pkix_public_key = Some(ByteString(spki));
        request.spec.proof_of_possession = Some(ByteString(vec![1, 2, 3]));
        assert_denied(&request, DenialReason::UnsupportedKeyType, needle);
        assert_denied(&request, DenialReason::UnsupportedKeyType, "use ECDSAP256");
    }
    // A signer that accepts only some types names them and suggests one.
    let accepted =
        AcceptedKeyTypes::new([PublicKeyType::Ed25519, PublicKeyType::EcdsaP384]).unwrap();
    let p256 = TestKey::generate(PublicKeyType::EcdsaP256);
    let d = validate(&with_proof(&p256), &accepted).unwrap_err();
    assert_eq!(d.reason, DenialReason::UnsupportedKeyType);
    assert_eq!(
        d.message,
        "this signer does not issue for ECDSAP256 keys; use ED25519 (accepted: ED25519, ECDSAP384)"
    );
    // Refused before the (here bogus) proof is looked at.
    let mut request = with_stub(&p256);
    request.spec.stub_pkcs10_request.as_mut().unwrap().0.push(0);
    assert_eq!(
        validate(&request, &accepted).unwrap_err().reason,
        DenialReason::InvalidRequest
    );
    assert!(AcceptedKeyTypes::new([]).is_none());
}

#[test]
fn both_or_neither_shape_is_denied() {
    let key = TestKey::generate(PublicKeyType::EcdsaP256);
    let mut both = with_proof(&key);
    both.spec.stub_pkcs10_request = Some(ByteString(key.stub_csr()));
    assert_denied(&both, DenialReason::InvalidKeyMaterial, "both");
    assert_denied(&base_request(), DenialReason::InvalidKeyMaterial, "no key");
    // Empty fields count as absent (Go sends nil slices as null, empty as "").
    let mut empty = base_request();
    empty.spec.pkix_public_key = Some(ByteString(Vec::new()));
    empty.spec.stub_pkcs10_request = Some(ByteString(Vec::new()));
    assert_denied(&empty, DenialReason::InvalidKeyMaterial, "no key");
    let mut key_only = with_proof(&key);
    key_only.spec.proof_of_possession = None;
    assert_denied(
        &key_only,
        DenialReason::InvalidKeyMaterial,
        "without spec.proofOfPossession",
    );
    let mut proof_only = with_proof(&key);
    proof_only.spec.pkix_public_key = None;
    assert_denied(
        &proof_only,
        DenialReason::InvalidKeyMaterial,
        "without spec.pkixPublicKey",
    );
}

#[test]
fn oversized_and_malformed_fields_are_denied() {
    let key = TestKey::generate(PublicKeyType::Ed25519);
    let huge = ByteString(vec![0x30; MAX_KEY_MATERIAL_LEN + 1]);
    let mut request = with_proof(&key);
    request.spec.pkix_public_key = Some(huge.clone());
    assert_denied(
        &request,
        DenialReason::InvalidRequest,
        "spec.pkixPublicKey is 10241 bytes",
    );
    let mut request = with_proof(&key);
    request.spec.proof_of_possession = Some(huge.clone());
    assert_denied(
        &request,
        DenialReason::InvalidRequest,
        "spec.proofOfPossession is 10241 bytes",
    );
    let mut request = base_request();
    request.spec.stub_pkcs10_request = Some(huge);
    assert_denied(
        &request,
        DenialReason::InvalidRequest,
        "spec.stubPKCS10Request is 10241 bytes",
    );
    let mut request = base_request();
    request.spec.stub_pkcs10_request = Some(ByteString(b"not a csr".to_vec()));
    assert_denied(
        &request,
        DenialReason::InvalidRequest,
        "malformed certificate signing request",
    );

    type Edit = fn(&mut PodCertificateRequest);
    let cases: [(Edit, &str); 10] = [
        (
            |r| r.metadata.namespace = None,
            "metadata.namespace is missing",
        ),
        (
            |r| r.metadata.name = Some(String::new()),
            "metadata.name is missing",
        ),
        (|r| r.spec.pod_uid.clear(), "spec.podUID is missing"),
        (
            |r| r.spec.pod_uid = "a/b".into(),
            "spec.podUID \"a/b\" is not well formed",
        ),
        (|r| r.spec.pod_uid = "u".repeat(129), "spec.podUID"),
        (|r| r.spec.pod_name = "Web_0".into(), "spec.podName"),
        (
            |r| r.spec.service_account_name.clear(),
            "spec.serviceAccountName is missing",
        ),
        (|r| r.spec.node_uid = "x y".into(), "spec.nodeUID"),
        (
            |r| r.spec.signer_name = "nosigner".into(),
            "spec.signerName",
        ),
        (
            |r| r.metadata.namespace = Some("Team-A".into()),
            "metadata.namespace",
        ),
    ];
    for (edit, needle) in cases {
        let mut request = with_proof(&key);
        edit(&mut request);
        assert_denied(&request, DenialReason::InvalidRequest, needle);
    }
}

#[test]
fn max_expiration_is_defaulted_and_clamped() {
    let key = TestKey::generate(PublicKeyType::EcdsaP256);
    let lifetime = |seconds: Option<i32>| {
        let mut request = with_proof(&key);
        request.spec.max_expiration_seconds = seconds;
        validate(&request, &AcceptedKeyTypes::default()).map(|v| v.max_expiration)
    };
    assert_eq!(lifetime(None).unwrap(), Duration::from_secs(86_400));
    assert_eq!(lifetime(Some(3600)).unwrap(), Duration::from_secs(3600));
    assert_eq!(
        lifetime(Some(7_862_400)).unwrap(),
        Duration::from_secs(7_862_400)
    );
    assert_eq!(lifetime(Some(i32::MAX)).unwrap(), MAX_MAX_EXPIRATION);
    for short in [3599, 0, -5] {
        let d = lifetime(Some(short)).unwrap_err();
        assert_eq!(d.reason, DenialReason::InvalidRequest);
        assert!(d.message.contains("maxExpirationSeconds"), "{d}");
    }
}

fn with_annotations(pairs: &[(&str, &str)]) -> PodCertificateRequest {
    let key = TestKey::generate(PublicKeyType::Ed25519);
    let mut request = with_proof(&key);
    request.spec.unverified_user_annotations = Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    request
}

#[test]
fn dns_name_annotation_is_parsed() {
    let v = validate(
        &with_annotations(&[(
            "credlet.io/dns-names",
            "$POD_NAME.$POD_NAMESPACE.svc, web.team-a.svc.cluster.local,WEB.team-a.svc.cluster.local, ${POD_NAME}.API.${TRUST_DOMAIN}",
        )]),
        &AcceptedKeyTypes::default(),
    )
    .unwrap();
    assert_eq!(
        v.options.dns_names,
        [
            "$POD_NAME.$POD_NAMESPACE.svc",
            "web.team-a.svc.cluster.local",
            "${POD_NAME}.api.${TRUST_DOMAIN}"
        ]
        .map(String::from)
    );
    // The templates expand with the CA's own expansion.
    let facts = credlet_ca_service::policy::Facts {
        namespace: "team-a".into(),
        pod_name: "web-0".into(),
        pod_uid: POD_UID.into(),
        service_account: "web".into(),
    };
    assert_eq!(
        credlet_ca::expand_template(&v.options.dns_names[0], &facts.vars("cluster.local")).unwrap(),
        "web-0.team-a.svc"
    );
    assert_eq!(
        credlet_ca::expand_template(&v.options.dns_names[2], &facts.vars("cluster.local")).unwrap(),
        "web-0.api.cluster.local"
    );
}

#[test]
fn bad_annotations_are_denied() {
    let reason = DenialReason::InvalidUnverifiedUserAnnotations;
    assert_denied(
        &with_annotations(&[("example.com/color", "blue")]),
        reason,
        "\"example.com/color\" is not one this signer reads",
    );
    assert_denied(
        &with_annotations(&[("credlet.io/duration", "1h")]),
        reason,
        "accepted keys: credlet.io/dns-names",
    );
    let many = (0..=MAX_DNS_NAMES)
        .map(|i| format!("h{i}.svc"))
        .collect::<Vec<_>>()
        .join(",");
    let long_label = format!("{}.svc", "a".repeat(64));
    let long_entry = vec!["a"; 130].join(".");
    let huge_value = "a".repeat(MAX_ANNOTATIONS_LEN);
    for (value, needle) in [
        ("*.team-a.svc", "wildcards are not issued"),
        ("10.0.0.1", "IP address"),
        (
            "$HOSTNAME.svc",
            "unknown variable $HOSTNAME; known: $POD_NAME",
        ),
        ("${POD_NAME.svc", "has no closing"),
        ("web..svc", "every label"),
        ("-web.svc", "every label"),
        ("web_0.svc", "every label"),
        ("a.svc,,b.svc", "empty entry"),
        (&many, "more than 32 DNS names"),
        (&long_label, "every label"),
        (&long_entry, "longer than 253"),
        (&huge_value, "more than credlet's limit"),
    ] {
        assert_denied(
            &with_annotations(&[("credlet.io/dns-names", value)]),
            reason,
            needle,
        );
    }
}

#[test]
fn reasons_are_the_api_strings() {
    assert_eq!(
        DenialReason::UnsupportedKeyType.as_str(),
        "UnsupportedKeyType"
    );
    assert_eq!(
        DenialReason::InvalidUnverifiedUserAnnotations.as_str(),
        "InvalidUnverifiedUserAnnotations"
    );
    assert_eq!(
        DenialReason::InvalidProofOfPossession.as_str(),
        "InvalidProofOfPossession"
    );
    assert_eq!(
        DenialReason::InvalidKeyMaterial.to_string(),
        "InvalidKeyMaterial"
    );
    assert_eq!(DenialReason::InvalidRequest.as_str(), "InvalidRequest");
}

/// The validated key goes through the CA: the leaf carries it, chains to
/// the CA, names the pod's SPIFFE ID and lives exactly as long as asked.
#[test]
fn validated_keys_are_issued() {
    let authority = Authority::generate_self_signed(Policy::new("cluster.local")).unwrap();
    let now = SystemTime::now();
    for key_type in [
        PublicKeyType::Rsa3072,
        PublicKeyType::EcdsaP521,
        PublicKeyType::Ed25519,
    ] {
        let key = TestKey::generate(key_type);
        for request in [with_proof(&key), with_stub(&key)] {
            let v = validate(&request, &AcceptedKeyTypes::default()).unwrap();
            let issued = authority
                .issue_for_public_key(
                    &v.public_key,
                    &IssuanceRequest {
                        csr_der: Vec::new(),
                        identity: PodIdentity {
                            namespace: v.namespace.clone(),
                            name: v.pod_name.clone(),
                            uid: v.pod_uid.clone(),
                            service_account: v.service_account_name.clone(),
                        },
                        spiffe_id: None,
                        dns_names: vec![],
                        ip_addresses: vec![],
                        common_name: None,
                        duration: Duration::from_secs(3600),
                    },
                    now,
                )
                .unwrap();
            credlet_ca::verify_chain(&issued.chain_pem, &issued.trust_bundle_pem, now).unwrap();
            let leaf = inspect_leaf(&issued.chain_pem).unwrap();
            assert_eq!(leaf.public_key_der, key.spki(), "{key_type}");
            assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/team-a/sa/web"]);
            assert_eq!(
                (leaf.not_before, leaf.not_after),
                (issued.not_before, issued.not_after)
            );
        }
    }
}
