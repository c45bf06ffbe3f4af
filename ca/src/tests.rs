//! End-to-end tests of the public API.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use crate::*;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn identity() -> PodIdentity {
    PodIdentity {
        namespace: "team-a".into(),
        name: "web-0".into(),
        uid: "5a4c6f1e-93d2-4b8e-a1c7-0f2e3d4c5b6a".into(),
        service_account: "web".into(),
    }
}

fn request_for(csr_der: Vec<u8>) -> IssuanceRequest {
    IssuanceRequest {
        csr_der,
        identity: identity(),
        spiffe_id: None,
        dns_names: vec![
            "web.team-a.svc".into(),
            "web.team-a.svc.cluster.local".into(),
        ],
        ip_addresses: vec![IpAddr::from([10, 1, 2, 3]), "fd00::7".parse().unwrap()],
        common_name: Some("web-0".into()),
        duration: Duration::from_secs(3600),
    }
}

fn dev_ca() -> Authority {
    Authority::generate_self_signed(Policy::new("cluster.local")).unwrap()
}

fn csr(key_type: KeyType) -> (PrivateKey, Vec<u8>) {
    let key = PrivateKey::generate(key_type).unwrap();
    let csr = key.certificate_signing_request().unwrap();
    (key, csr)
}

fn issue_err(authority: &Authority, request: &IssuanceRequest) -> IssueError {
    authority.issue(request, SystemTime::now()).unwrap_err()
}

fn policy_err(authority: &Authority, f: impl FnOnce(&mut IssuanceRequest)) -> PolicyError {
    let (_, der) = csr(KeyType::EcdsaP256);
    let mut request = request_for(der);
    f(&mut request);
    match issue_err(authority, &request) {
        IssueError::Policy(e) => e,
        other => panic!("expected a policy error, got {other:?}"),
    }
}

fn csr_err(der: &[u8]) -> CsrError {
    VerifiedCsr::from_der(der).unwrap_err()
}

/// The raw public key: the tail of the SubjectPublicKeyInfo.
fn raw_public_key(key: &PrivateKey) -> Vec<u8> {
    let spki = key.public_key_der();
    let len = match key.key_type() {
        KeyType::EcdsaP256 => 65,
        KeyType::EcdsaP384 => 97,
        _ => 32,
    };
    spki[spki.len() - len..].to_vec()
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    assert_eq!(needle.len(), with.len());
    let at = haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present");
    let mut out = haystack.to_vec();
    out[at..at + needle.len()].copy_from_slice(with);
    out
}

fn first_der(chain_pem: &str) -> Vec<u8> {
    crate::pem::first_certificate(chain_pem, "test").unwrap()
}

#[test]
fn every_key_type_round_trips() {
    let authority = dev_ca();
    let ca_der = first_der(authority.trust_bundle_pem());
    let (_, ca) = x509_parser::certificate::X509Certificate::from_der(&ca_der).unwrap();
    let ca_ski = ca
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .expect("CA has a subject key identifier");

    for key_type in KeyType::ALL {
        let (key, der) = csr(key_type);
        assert_eq!(key.key_type(), key_type);
        assert!(key.pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));

        let reloaded = PrivateKey::from_pem(key.pem()).unwrap();
        assert_eq!(reloaded.key_type(), key_type);
        assert_eq!(reloaded.public_key_der(), key.public_key_der());
        assert_eq!(reloaded.pem(), key.pem());

        let verified = VerifiedCsr::from_der(&der).unwrap();
        assert_eq!(verified.key_type(), key_type);
        assert_eq!(verified.public_key_der(), key.public_key_der().as_slice());

        let now = SystemTime::now();
        let request = request_for(der);
        let issued = authority.issue(&request, now).unwrap();
        assert_eq!(
            issued.chain_pem.matches("BEGIN CERTIFICATE").count(),
            1,
            "root is not in the chain"
        );
        assert_eq!(issued.trust_bundle_pem, authority.trust_bundle_pem());
        assert_eq!(issued.serial_hex.len(), 32);
        assert_eq!(
            issued.not_after.duration_since(issued.not_before).unwrap(),
            request.duration
        );
        assert!(issued.not_before <= now && now < issued.not_before + Duration::from_secs(1));

        let leaf = inspect_leaf(&issued.chain_pem).unwrap();
        assert_eq!(leaf.serial_hex, issued.serial_hex);
        assert_eq!(leaf.subject, "CN=web-0");
        assert_eq!(leaf.not_before, issued.not_before);
        assert_eq!(leaf.not_after, issued.not_after);
        assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/team-a/sa/web"]);
        assert_eq!(leaf.dns_names, request.dns_names);
        assert_eq!(leaf.ip_addresses, request.ip_addresses);
        assert_eq!(leaf.public_key_der, key.public_key_der());

        assert!(key_matches_certificate(key.pem(), &issued.chain_pem).unwrap());
        verify_chain(&issued.chain_pem, &issued.trust_bundle_pem, now).unwrap();

        // The extensions the leaf must carry.
        let leaf_der = first_der(&issued.chain_pem);
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf_der).unwrap();
        let bc = cert
            .basic_constraints()
            .unwrap()
            .expect("basic constraints");
        assert!(!bc.value.ca);
        let ku = cert.key_usage().unwrap().expect("key usage");
        assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
        let eku = cert
            .extended_key_usage()
            .unwrap()
            .expect("extended key usage");
        assert!(eku.value.server_auth && eku.value.client_auth && !eku.value.any);
        let mut aki = None;
        let mut has_ski = false;
        for ext in cert.iter_extensions() {
            match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                ParsedExtension::SubjectKeyIdentifier(_) => has_ski = true,
                _ => {}
            }
        }
        assert_eq!(
            aki.as_deref(),
            Some(ca_ski.as_slice()),
            "AKI names the CA's key"
        );
        assert!(has_ski);
        assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
    }
}

#[test]
fn empty_subject_makes_sans_critical() {
    let authority = dev_ca();
    let (_, der) = csr(KeyType::EcdsaP256);
    let mut request = request_for(der);
    request.common_name = None;
    let issued = authority.issue(&request, SystemTime::now()).unwrap();
    assert_eq!(inspect_leaf(&issued.chain_pem).unwrap().subject, "");
    let leaf_der = first_der(&issued.chain_pem);
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf_der).unwrap();
    assert!(cert.subject_alternative_name().unwrap().unwrap().critical);
}

#[test]
fn explicit_spiffe_id_below_the_identity_is_used() {
    let authority = dev_ca();
    let (_, der) = csr(KeyType::Ed25519);
    let mut request = request_for(der);
    request.spiffe_id = Some("spiffe://cluster.local/ns/team-a/sa/web/shard-2".into());
    let issued = authority.issue(&request, SystemTime::now()).unwrap();
    assert_eq!(
        inspect_leaf(&issued.chain_pem).unwrap().uris,
        ["spiffe://cluster.local/ns/team-a/sa/web/shard-2"]
    );
}

#[test]
fn tampered_signature_fails_proof_of_possession() {
    for key_type in KeyType::ALL {
        let (_, mut der) = csr(key_type);
        let last = der.len() - 1;
        der[last] ^= 0x01;
        assert_eq!(csr_err(&der), CsrError::BadSignature, "{key_type}");
    }
}

#[test]
fn swapped_public_key_fails_proof_of_possession() {
    for key_type in KeyType::ALL {
        let (key, der) = csr(key_type);
        let other = PrivateKey::generate(key_type).unwrap();
        let swapped = replace(&der, &raw_public_key(&key), &raw_public_key(&other));
        assert_eq!(csr_err(&swapped), CsrError::BadSignature, "{key_type}");
        // And issuing with it is a client error.
        let err = issue_err(&dev_ca(), &request_for(swapped));
        assert!(matches!(err, IssueError::Csr(CsrError::BadSignature)));
        assert!(err.is_client_error());
    }
}

#[test]
fn truncated_garbage_and_oversized_input_is_rejected_without_panicking() {
    let (_, der) = csr(KeyType::EcdsaP384);
    assert_eq!(csr_err(&[]), CsrError::Empty);
    for len in 1..der.len() {
        assert!(
            matches!(csr_err(&der[..len]), CsrError::Malformed { .. }),
            "prefix of {len} bytes"
        );
    }
    let mut trailing = der.clone();
    trailing.push(0);
    assert!(matches!(csr_err(&trailing), CsrError::Malformed { .. }));

    // Deterministic pseudo-random garbage, some of it starting like a SEQUENCE.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..2000 {
        let len = 1 + round % 300;
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        if round % 2 == 0 {
            bytes[0] = 0x30;
        }
        assert!(VerifiedCsr::from_der(&bytes).is_err());
    }
    // Random bytes inside a valid CSR: any outcome but a panic or a pass.
    for i in (0..der.len()).step_by(3) {
        let mut flipped = der.clone();
        flipped[i] ^= 0x5a;
        assert!(VerifiedCsr::from_der(&flipped).is_err(), "flip at {i}");
    }

    let oversized = vec![0x30; VerifiedCsr::MAX_DER_LEN + 1];
    assert_eq!(
        csr_err(&oversized),
        CsrError::TooLarge {
            len: VerifiedCsr::MAX_DER_LEN + 1,
            max: VerifiedCsr::MAX_DER_LEN
        }
    );
}

#[test]
fn unsupported_csr_algorithms_are_named() {
    // A P-256 key signing with SHA-384 is not an accepted combination.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let der = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let sha256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    let sha384 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    let relabelled = replace(&der, &sha256, &sha384);
    assert!(matches!(
        csr_err(&relabelled),
        CsrError::UnsupportedKeyType { .. }
    ));

    // An Ed448 public key (the key algorithm OID relabelled).
    let (_, der) = csr(KeyType::Ed25519);
    let ed25519 = [0x06, 0x03, 0x2b, 0x65, 0x70];
    let ed448 = [0x06, 0x03, 0x2b, 0x65, 0x71];
    match csr_err(&replace(&der, &ed25519, &ed448)) {
        CsrError::UnsupportedKeyType { algorithm } => {
            assert!(algorithm.contains("Ed448"), "{algorithm}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn policy_refusals_are_client_errors() {
    let authority = dev_ca();
    type Expect = fn(&PolicyError) -> bool;
    let cases: Vec<(PolicyError, Expect)> = vec![
        (
            policy_err(&authority, |r| {
                r.spiffe_id = Some("spiffe://other.example/ns/team-a/sa/web".into())
            }),
            |e| matches!(e, PolicyError::ForeignTrustDomain { .. }),
        ),
        (
            policy_err(&authority, |r| {
                r.spiffe_id = Some("spiffe://cluster.local/ns/kube-system/sa/web".into())
            }),
            |e| matches!(e, PolicyError::SpiffeIdOutsideIdentity { .. }),
        ),
        (
            policy_err(&authority, |r| r.duration = Duration::from_secs(60)),
            |e| matches!(e, PolicyError::DurationTooShort { .. }),
        ),
        (policy_err(&authority, |r| r.duration = 365 * DAY), |e| {
            matches!(e, PolicyError::DurationTooLong { .. })
        }),
        (
            policy_err(&authority, |r| {
                r.dns_names = (0..40).map(|i| format!("n{i}.example")).collect()
            }),
            |e| matches!(e, PolicyError::TooManyDnsNames { count: 40, max: 32 }),
        ),
        (
            policy_err(&authority, |r| {
                r.dns_names = vec!["bad_name.example".into()]
            }),
            |e| matches!(e, PolicyError::InvalidDnsName { .. }),
        ),
        (
            policy_err(&authority, |r| r.dns_names = vec!["*.team-a.svc".into()]),
            |e| matches!(e, PolicyError::WildcardDnsName { .. }),
        ),
        (
            policy_err(&authority, |r| r.identity.service_account.clear()),
            |e| {
                matches!(
                    e,
                    PolicyError::EmptyIdentityField {
                        field: "service_account"
                    }
                )
            },
        ),
    ];
    for (err, expected) in &cases {
        assert!(expected(err), "{err:?}");
        assert!(IssueError::Policy(err.clone()).is_client_error());
    }
    // Messages carry the offending value.
    assert!(cases[0].0.to_string().contains("other.example"));
    assert!(cases[5].0.to_string().contains("bad_name.example"));
}

#[test]
fn disallowed_key_type_is_refused() {
    let mut policy = Policy::new("cluster.local");
    policy.allowed_key_types = vec![KeyType::EcdsaP256];
    let authority = Authority::generate_self_signed(policy).unwrap();
    let (_, der) = csr(KeyType::Ed25519);
    match issue_err(&authority, &request_for(der)) {
        IssueError::Policy(PolicyError::KeyTypeNotAllowed { key_type, allowed }) => {
            assert_eq!(key_type, KeyType::Ed25519);
            assert_eq!(allowed, "ECDSAP256");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn csr_subject_and_sans_are_ignored() {
    let authority = dev_ca();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "evil");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let der = params.serialize_request(&key).unwrap().der().to_vec();

    let mut request = request_for(der);
    request.common_name = None;
    request.dns_names.clear();
    let issued = authority.issue(&request, SystemTime::now()).unwrap();
    let leaf = inspect_leaf(&issued.chain_pem).unwrap();
    assert_eq!(leaf.subject, "");
    assert!(leaf.dns_names.is_empty(), "{:?}", leaf.dns_names);
    assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/team-a/sa/web"]);
    assert!(!issued.chain_pem.contains("evil"));
    let leaf_der = first_der(&issued.chain_pem);
    assert!(!leaf_der.windows(12).any(|w| w == b"evil.example"));
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf_der).unwrap();
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(
        leaf.public_key_der,
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
}

#[test]
fn key_matching_detects_other_keys() {
    let authority = dev_ca();
    let (key, der) = csr(KeyType::EcdsaP256);
    let issued = authority
        .issue(&request_for(der), SystemTime::now())
        .unwrap();
    assert!(key_matches_certificate(key.pem(), &issued.chain_pem).unwrap());
    for key_type in KeyType::ALL {
        let other = PrivateKey::generate(key_type).unwrap();
        assert!(!key_matches_certificate(other.pem(), &issued.chain_pem).unwrap());
    }
    assert!(key_matches_certificate("not a key", &issued.chain_pem).is_err());
    assert!(key_matches_certificate(key.pem(), "not a certificate").is_err());
}

#[test]
fn chain_verification_failures() {
    let authority = dev_ca();
    let (_, der) = csr(KeyType::EcdsaP256);
    let now = SystemTime::now();
    let issued = authority.issue(&request_for(der), now).unwrap();

    let stranger = dev_ca();
    let err = verify_chain(&issued.chain_pem, stranger.trust_bundle_pem(), now).unwrap_err();
    assert!(
        matches!(err, CaError::BadCertificateSignature { .. }),
        "{err}"
    );

    // A bundle holding both CAs still verifies.
    let both = format!(
        "{}{}",
        stranger.trust_bundle_pem(),
        authority.trust_bundle_pem()
    );
    verify_chain(&issued.chain_pem, &both, now).unwrap();

    let err = verify_chain(
        &issued.chain_pem,
        authority.trust_bundle_pem(),
        now + 2 * 3600 * Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::NotValidAt { .. }), "{err}");
    let err = verify_chain(
        &issued.chain_pem,
        authority.trust_bundle_pem(),
        now + 3650 * DAY,
    )
    .unwrap_err();
    assert!(matches!(err, CaError::NotValidAt { .. }), "{err}");
    let err = verify_chain(&issued.chain_pem, authority.trust_bundle_pem(), now - DAY).unwrap_err();
    assert!(matches!(err, CaError::NotValidAt { .. }), "{err}");

    // A leaf is not a CA: it can not vouch for another leaf.
    let (_, der2) = csr(KeyType::EcdsaP256);
    let issued2 = authority.issue(&request_for(der2), now).unwrap();
    let err = verify_chain(&issued.chain_pem, &issued2.chain_pem, now).unwrap_err();
    assert!(
        matches!(err, CaError::UnknownIssuer { .. } | CaError::NotACa { .. }),
        "{err}"
    );
}

#[test]
fn leaf_may_not_outlive_the_ca() {
    let authority = dev_ca();
    let (_, der) = csr(KeyType::EcdsaP256);
    let request = request_for(der);
    let err = authority
        .issue(
            &request,
            SystemTime::now() + 365 * DAY - Duration::from_secs(1800),
        )
        .unwrap_err();
    assert!(matches!(err, IssueError::Signing { .. }), "{err}");
    assert!(!err.is_client_error());
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let (authority, _cert_pem, ca_key_pem) =
        Authority::generate_self_signed_with_pems(Policy::new("cluster.local")).unwrap();
    for key_type in KeyType::ALL {
        let key = PrivateKey::generate(key_type).unwrap();
        for debug in [format!("{key:?}"), format!("{key:#?}")] {
            assert!(!debug.contains("PRIVATE KEY"), "{debug}");
            assert!(debug.contains("redacted"));
            for line in key.pem().lines().filter(|l| !l.starts_with("-----")) {
                assert!(!debug.contains(line), "{debug}");
            }
        }
    }
    for debug in [format!("{authority:?}"), format!("{authority:#?}")] {
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        for line in ca_key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!debug.contains(line), "{debug}");
        }
    }
}

#[test]
fn key_type_names() {
    for key_type in KeyType::ALL {
        assert_eq!(KeyType::from_str(key_type.name()).unwrap(), key_type);
        assert_eq!(key_type.to_string(), key_type.name());
        assert_eq!(
            KeyType::from_str(&key_type.name().to_ascii_lowercase()).unwrap(),
            key_type
        );
    }
    assert_eq!(KeyType::default(), KeyType::EcdsaP256);
    assert_eq!("Ed25519".parse::<KeyType>().unwrap(), KeyType::Ed25519);
    assert_eq!("EcdsaP384".parse::<KeyType>().unwrap(), KeyType::EcdsaP384);
    for name in ["RSA3072", "rsa4096"] {
        assert_eq!(
            name.parse::<KeyType>().unwrap_err(),
            KeyTypeError::NotYetSupported { name: name.into() }
        );
    }
    for name in ["", "RSA2048", "ECDSA-P256", " ECDSAP256"] {
        let err = name.parse::<KeyType>().unwrap_err();
        assert_eq!(err, KeyTypeError::Unknown { name: name.into() });
        let message = err.to_string();
        assert!(
            message.contains("ECDSAP256")
                && message.contains("ECDSAP384")
                && message.contains("ED25519")
        );
    }
}

#[test]
fn private_key_pem_errors() {
    assert!(matches!(PrivateKey::from_pem(""), Err(CaError::Pem { .. })));
    let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
    let err = PrivateKey::from_pem(sec1).unwrap_err();
    assert!(err.to_string().contains("pkcs8"), "{err}");
    // A PKCS#8 structure for an RSA key (contents elided).
    let rsa = [
        0x30, 0x16, 0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d,
        0x01, 0x01, 0x01, 0x05, 0x00, 0x04, 0x02, 0x30, 0x00,
    ];
    let mut text = String::new();
    crate::pem::encode_into(&mut text, "PRIVATE KEY", &rsa);
    let err = PrivateKey::from_pem(&text).unwrap_err();
    assert!(
        matches!(err, CaError::InvalidPrivateKey { .. }) && err.to_string().contains("RSA"),
        "{err}"
    );
    // A P-256 key whose private scalar was damaged.
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let mut der = crate::pem::blocks(key.pem()).unwrap()[0].decode().unwrap();
    der[50] ^= 0xff;
    let mut text = String::new();
    crate::pem::encode_into(&mut text, "PRIVATE KEY", &der);
    let err = PrivateKey::from_pem(&text).unwrap_err();
    assert!(matches!(err, CaError::InvalidPrivateKey { .. }), "{err}");
}

#[test]
fn authority_round_trips_through_pem() {
    let policy = Policy::new("cluster.local");
    let (generated, cert_pem, key_pem) =
        Authority::generate_self_signed_with_pems(policy.clone()).unwrap();
    assert_eq!(generated.trust_bundle_pem(), cert_pem);
    let ca = inspect_leaf(&cert_pem).unwrap();
    assert_eq!(ca.subject, "CN=credlet dev CA");
    let lifetime = ca.not_after.duration_since(ca.not_before).unwrap();
    assert_eq!(lifetime, 365 * DAY);

    let loaded = Authority::from_pem(&cert_pem, &key_pem, &cert_pem, policy.clone()).unwrap();
    assert_eq!(loaded.policy().trust_domain, "cluster.local");
    let (key, der) = csr(KeyType::EcdsaP384);
    let issued = loaded.issue(&request_for(der), SystemTime::now()).unwrap();
    assert_eq!(issued.chain_pem.matches("BEGIN CERTIFICATE").count(), 1);
    verify_chain(&issued.chain_pem, &cert_pem, SystemTime::now()).unwrap();
    assert!(key_matches_certificate(key.pem(), &issued.chain_pem).unwrap());

    // Someone else's key.
    let other = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let err = Authority::from_pem(&cert_pem, other.pem(), &cert_pem, policy.clone()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

    // A leaf with its own key is not a CA.
    let err =
        Authority::from_pem(&issued.chain_pem, key.pem(), &cert_pem, policy.clone()).unwrap_err();
    assert!(matches!(err, CaError::NotACa { .. }), "{err}");

    // A chain that does not lead to the bundle.
    let (_, stranger_pem, _) = Authority::generate_self_signed_with_pems(policy.clone()).unwrap();
    let err = Authority::from_pem(&cert_pem, &key_pem, &stranger_pem, policy.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::BadCertificateSignature { .. } | CaError::UnknownIssuer { .. }
        ),
        "{err}"
    );

    // A bad policy.
    let err = Authority::from_pem(&cert_pem, &key_pem, &cert_pem, Policy::new("Not A Domain"))
        .unwrap_err();
    assert!(matches!(err, CaError::InvalidPolicy { .. }), "{err}");
}

#[test]
fn intermediate_authority_hands_out_its_chain() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name = rcgen::DistinguishedName::new();
    root_params
        .distinguished_name
        .push(DnType::OrganizationName, "Example Org");
    root_params
        .distinguished_name
        .push(DnType::CommonName, "Example Root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, &root_key);

    let int_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut int_params = CertificateParams::default();
    int_params.distinguished_name = rcgen::DistinguishedName::new();
    int_params
        .distinguished_name
        .push(DnType::CommonName, "Example Intermediate");
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    int_params.use_authority_key_identifier_extension = true;
    let int_cert = int_params.signed_by(&int_key, &root_issuer).unwrap();

    let policy = Policy::new("example.org");
    let authority = Authority::from_pem(
        &int_cert.pem(),
        &int_key.serialize_pem(),
        &root_cert.pem(),
        policy,
    )
    .unwrap();
    let (key, der) = csr(KeyType::EcdsaP256);
    let mut request = request_for(der);
    request.spiffe_id = Some("spiffe://example.org/ns/team-a/sa/web".into());
    let now = SystemTime::now();
    let issued = authority.issue(&request, now).unwrap();
    assert_eq!(
        issued.chain_pem.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf + intermediate"
    );
    assert!(issued.chain_pem.ends_with(&int_cert.pem()));
    assert_eq!(issued.trust_bundle_pem, root_cert.pem());
    verify_chain(&issued.chain_pem, &issued.trust_bundle_pem, now).unwrap();
    assert!(key_matches_certificate(key.pem(), &issued.chain_pem).unwrap());

    // Without the intermediate the leaf does not chain.
    let leaf_only = issued
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    let err = verify_chain(leaf_only, &issued.trust_bundle_pem, now).unwrap_err();
    assert!(matches!(err, CaError::UnknownIssuer { .. }), "{err}");

    // The intermediate's path length 0 forbids a CA below it.
    let sub_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut sub_params = CertificateParams::default();
    sub_params.distinguished_name = rcgen::DistinguishedName::new();
    sub_params
        .distinguished_name
        .push(DnType::CommonName, "Too Deep");
    sub_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let int_issuer = Issuer::new(int_params, &int_key);
    let sub_cert = sub_params.signed_by(&sub_key, &int_issuer).unwrap();
    let chain = format!("{}{}", sub_cert.pem(), int_cert.pem());
    verify_chain(&chain, &root_cert.pem(), now).unwrap();
    let err = Authority::from_pem(
        &chain,
        &sub_key.serialize_pem(),
        &root_cert.pem(),
        Policy::new("example.org"),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::NotACa { .. }), "{err}");
}

#[test]
fn authority_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Authority>();
    assert_send_sync::<PrivateKey>();
    assert_send_sync::<VerifiedCsr>();
}

#[test]
fn component_certificates_carry_only_credlet_uris() {
    let authority = dev_ca();
    let (key, der) = csr(KeyType::EcdsaP256);
    let now = SystemTime::now();
    let issued = authority
        .issue_component(
            &der,
            "spiffe://cluster.local/credlet/node/node-a",
            &["ca.credlet.svc".to_owned()],
            &["127.0.0.1".parse().unwrap()],
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
    verify_chain(&issued.chain_pem, &issued.trust_bundle_pem, now).unwrap();
    assert!(key_matches_certificate(key.pem(), &issued.chain_pem).unwrap());
    let leaf = inspect_leaf(&issued.chain_pem).unwrap();
    assert_eq!(leaf.uris, ["spiffe://cluster.local/credlet/node/node-a"]);
    assert_eq!(leaf.dns_names, ["ca.credlet.svc"]);
    for uri in [
        "spiffe://cluster.local/ns/team-a/sa/web",
        "spiffe://other.example/credlet/node/a",
        "spiffe://cluster.local/credlet/../ns/x",
        "spiffe://cluster.local/credlet/",
    ] {
        let err = authority
            .issue_component(&der, uri, &[], &[], Duration::from_secs(3600), now)
            .unwrap_err();
        assert!(err.is_client_error(), "{uri}: {err}");
    }
}

/// The CA's serving identity is reserved: no pod identity, however named,
/// gets it or anything under `credlet/`, whether it asks for it literally,
/// through a template the CA expands, or through path tricks; the issued
/// pod certificate never carries it.
#[test]
fn no_pod_gets_the_cas_identity() {
    let authority = dev_ca();
    let policy = authority.policy().clone();
    let ca_id = ca_spiffe_id("cluster.local");
    assert_eq!(ca_id, "spiffe://cluster.local/credlet/ca");
    fn vars(identity: &PodIdentity) -> TemplateVars<'_> {
        TemplateVars {
            pod_name: &identity.name,
            pod_namespace: &identity.namespace,
            pod_uid: &identity.uid,
            service_account_name: &identity.service_account,
            trust_domain: "cluster.local",
        }
    }
    // Pods whose names resemble the reserved path.
    let identities = [
        identity(),
        PodIdentity {
            namespace: "credlet".into(),
            name: "ca".into(),
            uid: "uid".into(),
            service_account: "ca".into(),
        },
        PodIdentity {
            namespace: "ns".into(),
            name: "credlet".into(),
            uid: "uid".into(),
            service_account: "credlet".into(),
        },
    ];
    let requested = [
        "spiffe://cluster.local/credlet/ca",
        "spiffe://$TRUST_DOMAIN/credlet/ca",
        "spiffe://${TRUST_DOMAIN}/credlet/${POD_NAME}",
        "spiffe://$TRUST_DOMAIN/$POD_NAMESPACE/$SERVICE_ACCOUNT_NAME",
        "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME/../../../../credlet/ca",
        "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME/%2e%2e/credlet/ca",
        "spiffe://$TRUST_DOMAIN//credlet/ca",
        "spiffe://$TRUST_DOMAIN/./credlet/ca",
        "spiffe://$TRUST_DOMAIN/credlet/ca/",
        "spiffe://$TRUST_DOMAIN/credlet/node/$POD_NAME",
    ];
    for pod in &identities {
        for template in requested {
            let id = Template::parse(template)
                .map(|t| t.expand(&vars(pod)))
                .unwrap_or_else(|_| template.to_owned());
            assert!(
                policy.check_spiffe_id(&id, pod).is_err(),
                "{}/{} may ask for {id:?}",
                pod.namespace,
                pod.name
            );
            let (_, der) = csr(KeyType::EcdsaP256);
            let mut request = request_for(der);
            request.identity = pod.clone();
            request.spiffe_id = Some(id.clone());
            assert!(
                authority.issue(&request, SystemTime::now()).is_err(),
                "{id:?} issued"
            );
        }
        // The default ID is the pod's own.
        let (_, der) = csr(KeyType::EcdsaP256);
        let mut request = request_for(der);
        request.identity = pod.clone();
        let issued = authority.issue(&request, SystemTime::now()).unwrap();
        let uris = inspect_leaf(&issued.chain_pem).unwrap().uris;
        assert_eq!(
            uris,
            [format!(
                "spiffe://cluster.local/ns/{}/sa/{}",
                pod.namespace, pod.service_account
            )]
        );
        assert!(
            !uris
                .iter()
                .any(|u| u.starts_with("spiffe://cluster.local/credlet/"))
        );
    }
}

/// A key held in this process is certified without a CSR, with the same
/// leaf as the CSR path and the same policy (names and key types).
#[test]
fn own_key_issuance_matches_csr_issuance() {
    let authority = dev_ca();
    let roots = [first_der(authority.trust_bundle_pem())];
    for key_type in KeyType::ALL {
        let (key, der) = csr(key_type);
        let now = SystemTime::now();
        let request = request_for(der);
        let by_csr = authority.issue(&request, now).unwrap();
        let without_csr = request_for(Vec::new());
        let by_key = authority
            .issue_for_own_key(&key, &without_csr, now)
            .unwrap();

        let leaf_by_key = inspect_leaf(&by_key.chain_pem).unwrap();
        let leaf_by_csr = inspect_leaf(&by_csr.chain_pem).unwrap();
        assert_eq!(leaf_by_key.public_key_der, key.public_key_der());
        assert_eq!(leaf_by_key.uris, leaf_by_csr.uris);
        assert_eq!(leaf_by_key.dns_names, leaf_by_csr.dns_names);
        assert_eq!(leaf_by_key.not_after, leaf_by_csr.not_after);
        let chain = [first_der(&by_key.chain_pem)];
        crate::inspect::verify_ders(&chain, &roots, now, false).unwrap();

        // A leaf with the same TBS fields except key and serial: the
        // extensions are identical in count and order.
        let (_, a) = x509_parser::certificate::X509Certificate::from_der(&chain[0]).unwrap();
        let csr_der = first_der(&by_csr.chain_pem);
        let (_, b) = x509_parser::certificate::X509Certificate::from_der(&csr_der).unwrap();
        let oids = |c: &x509_parser::certificate::X509Certificate<'_>| {
            c.extensions()
                .iter()
                .map(|e| (e.oid.to_id_string(), e.critical))
                .collect::<Vec<_>>()
        };
        assert_eq!(oids(&a), oids(&b));
    }

    let mut policy = Policy::new("cluster.local");
    policy.allowed_key_types = vec![KeyType::EcdsaP256];
    let narrow = Authority::generate_self_signed(policy).unwrap();
    let ed = PrivateKey::generate(KeyType::Ed25519).unwrap();
    let request = request_for(Vec::new());
    assert!(matches!(
        narrow.issue_for_own_key(&ed, &request, SystemTime::now()),
        Err(IssueError::Policy(PolicyError::KeyTypeNotAllowed { .. }))
    ));
    let p256 = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let mut outside = request_for(Vec::new());
    outside.dns_names = vec!["*.evil.example".into()];
    assert!(matches!(
        narrow.issue_for_own_key(&p256, &outside, SystemTime::now()),
        Err(IssueError::Policy(_))
    ));
}
