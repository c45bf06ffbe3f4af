//! Fuzzes `credlet_signer::request::validate` and the request's serde:
//! no panics on any object the API server could send, a validated request
//! always holds a re-parseable key of an accepted type and a lifetime in
//! the API's bounds, every denial has a reason and a message, and what
//! deserializes serializes back to an equal object.
//!
//! Input format: the first byte selects the mode.
//! - even: the rest is JSON, deserialized as a `PodCertificateRequest`;
//! - odd: the rest is split at 0xFF into pkixPublicKey, proofOfPossession,
//!   stubPKCS10Request, podUID, the `credlet.io/dns-names` value and an
//!   annotation key, put into an otherwise well-formed request (so the
//!   fuzzer reaches the key and annotation parsers without writing JSON).
#![no_main]

use std::collections::BTreeMap;

use credlet_ca::UnverifiedPublicKey;
use credlet_signer::request::{
    AcceptedKeyTypes, MAX_MAX_EXPIRATION, MIN_MAX_EXPIRATION, PodCertificateRequest,
    PodCertificateRequestSpec, validate,
};
use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use libfuzzer_sys::fuzz_target;

fn structured(data: &[u8]) -> PodCertificateRequest {
    let mut fields = data.split(|b| *b == 0xFF);
    let mut next = || fields.next().unwrap_or_default().to_vec();
    let bytes = |b: Vec<u8>| (!b.is_empty()).then_some(ByteString(b));
    let (pkix, proof, stub) = (next(), next(), next());
    let pod_uid = String::from_utf8_lossy(&next()).into_owned();
    let dns_names = String::from_utf8_lossy(&next()).into_owned();
    let key = String::from_utf8_lossy(&next()).into_owned();
    let mut annotations = BTreeMap::new();
    if !dns_names.is_empty() {
        annotations.insert("credlet.io/dns-names".to_owned(), dns_names);
    }
    if !key.is_empty() {
        annotations.insert(key, "v".to_owned());
    }
    PodCertificateRequest {
        api_version: None,
        metadata: ObjectMeta {
            name: Some("req-1".into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: PodCertificateRequestSpec {
            signer_name: "credlet.io/pod".into(),
            pod_name: "web-0".into(),
            pod_uid,
            service_account_name: "web".into(),
            service_account_uid: "5a4c6f1e-93d2-4b8e-a1c7-0f2e3d4c5b6a".into(),
            node_name: "node-a".into(),
            node_uid: "8f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b".into(),
            max_expiration_seconds: None,
            pkix_public_key: bytes(pkix),
            proof_of_possession: bytes(proof),
            stub_pkcs10_request: bytes(stub),
            unverified_user_annotations: (!annotations.is_empty()).then_some(annotations),
        },
        status: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let request = if mode % 2 == 0 {
        let Ok(request) = serde_json::from_slice::<PodCertificateRequest>(rest) else {
            return;
        };
        let json = serde_json::to_vec(&request).expect("a parsed request serializes");
        let again: PodCertificateRequest =
            serde_json::from_slice(&json).expect("serialized request parses");
        assert_eq!(again, request);
        request
    } else {
        structured(rest)
    };
    let accepted = AcceptedKeyTypes::default();
    match validate(&request, &accepted) {
        Ok(v) => {
            assert!(accepted.accepts(v.public_key.key_type()));
            let reparsed = UnverifiedPublicKey::from_spki_der(v.public_key.public_key_der())
                .expect("a verified key re-parses");
            assert_eq!(reparsed.key_type(), v.public_key.key_type());
            assert!((MIN_MAX_EXPIRATION..=MAX_MAX_EXPIRATION).contains(&v.max_expiration));
            assert_eq!(v.pod_uid, request.spec.pod_uid);
        }
        Err(denial) => {
            assert!(!denial.reason.as_str().is_empty());
            assert!(!denial.message.is_empty());
        }
    }
});
