//! Fuzzes offline service account token verification (untrusted token text
//! from agents and pods, and the JWKS the API server publishes): must never
//! panic, and an error never repeats the token.
//!
//! Input: a mode byte, then two parts separated by 0xFF.
//! - mode even: a JWKS document and a token, verified as given;
//! - mode odd: a JWT header and claims (JSON), signed in the harness with a
//!   fixed ES256 key, so that the claim checks behind the signature are
//!   reached too.
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use credlet_ca_service::jwt::{Expectations, JwtKeySet};
use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

fn expect() -> Expectations<'static> {
    static ISSUERS: OnceLock<Vec<String>> = OnceLock::new();
    Expectations {
        issuers: ISSUERS.get_or_init(|| vec!["https://kubernetes.default.svc.cluster.local".into()]),
        audience: "credlet-ca",
    }
}
const NOW: i64 = 1_800_000_000;

/// A fixed signing key (kid `k`) and the key set holding it.
fn signer() -> &'static (EcdsaKeyPair, JwtKeySet) {
    static SIGNER: OnceLock<(EcdsaKeyPair, JwtKeySet)> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap();
        let point = key.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        let keys = JwtKeySet::from_json(jwks.to_string().as_bytes()).unwrap();
        (key, keys)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (first, second) = match rest.iter().position(|b| *b == 0xFF) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let (signing_key, fixed_keys) = signer();
    if mode % 2 == 0 {
        if let Ok(token) = std::str::from_utf8(second) {
            let keys = JwtKeySet::from_json(first).unwrap_or_else(|_| fixed_keys.clone());
            check(&keys, token);
        }
        return;
    }
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(first),
        URL_SAFE_NO_PAD.encode(second)
    );
    let signature = signing_key
        .sign(&SystemRandom::new(), input.as_bytes())
        .unwrap();
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
    check(fixed_keys, &token);
});

fn check(keys: &JwtKeySet, token: &str) {
    match keys.verify(token, &expect(), NOW) {
        Ok(claims) => {
            assert!(!claims.namespace.is_empty() && !claims.pod_uid.is_empty());
            let expires = claims.expires_at.expect("exp is required");
            let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOW as u64);
            assert!(expires > now);
            assert!(claims.audiences.iter().any(|a| a == "credlet-ca"));
        }
        Err(error) => {
            let text = error.to_string();
            if token.len() >= 16 {
                assert!(!text.contains(token), "the token is repeated in {text:?}");
            }
        }
    }
}
