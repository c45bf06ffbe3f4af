use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use credlet_test_util::sa_token::{BoundClaims, IssuerKey};
use serde_json::{Value, json};

use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "credlet-ca";

fn issuers() -> &'static [String] {
    static ISSUERS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ISSUERS.get_or_init(|| vec!["https://old-issuer.example".into(), ISSUER.into()])
}

fn expect() -> Expectations<'static> {
    Expectations {
        issuers: issuers(),
        audience: AUDIENCE,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn bound() -> BoundClaims {
    BoundClaims {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        namespace: "shop".into(),
        service_account: "web".into(),
        pod: "web-0".into(),
        pod_uid: "uid-0".into(),
        node: "node-a".into(),
        lifetime_s: 3600,
    }
}

fn key_set(keys: &[&IssuerKey]) -> JwtKeySet {
    let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    JwtKeySet::from_json(jwks.to_string().as_bytes()).unwrap()
}

/// `claims` with `edit` applied, signed by `key`.
fn signed(key: &IssuerKey, edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = bound().to_json();
    edit(&mut claims);
    key.sign(&claims).unwrap()
}

#[test]
fn es256_and_rs256_tokens_verify_with_their_kubernetes_claims() {
    let es = IssuerKey::es256("es").unwrap();
    let rs = IssuerKey::rs256("rs").unwrap();
    let keys = key_set(&[&es, &rs]);
    assert_eq!(keys.key_ids(), ["es", "rs"]);
    for key in [&es, &rs] {
        let claims = keys
            .verify(&signed(key, |_| {}), &expect(), now())
            .unwrap_or_else(|e| panic!("{}: {e}", key.kid()));
        assert_eq!(
            claims,
            VerifiedToken {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod_name: "web-0".into(),
                pod_uid: "uid-0".into(),
                node_name: Some("node-a".into()),
                audiences: vec![AUDIENCE.into()],
                expires_at: claims.expires_at,
            }
        );
        let expires = claims.expires_at.expect("exp");
        assert!(expires > std::time::SystemTime::now() + std::time::Duration::from_secs(3500));
    }
    // `aud` may be a single string; a node claim is optional.
    let token = signed(&es, |c| {
        c["aud"] = json!(AUDIENCE);
        c["kubernetes.io"].as_object_mut().unwrap().remove("node");
    });
    let claims = keys.verify(&token, &expect(), now()).unwrap();
    assert_eq!(claims.audiences, [AUDIENCE]);
    assert_eq!(claims.node_name, None);
}

#[test]
fn claims_that_do_not_fit_are_refused() {
    let es = IssuerKey::es256("es").unwrap();
    let keys = key_set(&[&es]);
    let verify = |token: &str| keys.verify(token, &expect(), now());

    // Any accepted issuer (an API server migrating issuers accepts all).
    let old_issuer = signed(&es, |c| c["iss"] = json!("https://old-issuer.example"));
    assert!(verify(&old_issuer).is_ok());
    let other_issuer = signed(&es, |c| c["iss"] = json!("https://evil.example"));
    assert!(matches!(
        verify(&other_issuer),
        Err(JwtError::WrongIssuer { got, .. }) if got == "https://evil.example"
    ));
    let other_audience = signed(&es, |c| c["aud"] = json!(["kubernetes", "vault"]));
    assert!(matches!(
        verify(&other_audience),
        Err(JwtError::WrongAudience { got, .. }) if got == ["kubernetes", "vault"]
    ));
    let expired = signed(&es, |c| c["exp"] = json!(now() - 1));
    assert!(matches!(verify(&expired), Err(JwtError::Expired { .. })));
    let no_exp = signed(&es, |c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    assert!(matches!(verify(&no_exp), Err(JwtError::Malformed { .. })));
    let future = signed(&es, |c| c["nbf"] = json!(now() + 600));
    assert!(matches!(verify(&future), Err(JwtError::NotYetValid { .. })));
    let skewed = signed(&es, |c| c["nbf"] = json!(now() + 30));
    assert!(verify(&skewed).is_ok(), "30 s of clock skew is tolerated");

    let user = signed(&es, |c| c["sub"] = json!("alice"));
    assert!(matches!(
        verify(&user),
        Err(JwtError::NotServiceAccount { .. })
    ));
    let mismatch = signed(&es, |c| {
        c["sub"] = json!("system:serviceaccount:kube-system:admin");
    });
    assert!(matches!(
        verify(&mismatch),
        Err(JwtError::NotServiceAccount { reason }) if reason.contains("disagrees")
    ));
    let unbound = signed(&es, |c| {
        c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
    });
    assert_eq!(
        verify(&unbound),
        Err(JwtError::NotBoundToPod {
            namespace: "shop".into(),
            service_account: "web".into()
        })
    );
    let legacy = signed(&es, |c| {
        c.as_object_mut().unwrap().remove("kubernetes.io");
    });
    assert!(matches!(
        verify(&legacy),
        Err(JwtError::NotServiceAccount { .. })
    ));
}

#[test]
fn signatures_keys_and_algorithms_are_checked() {
    let es = IssuerKey::es256("es").unwrap();
    let rs = IssuerKey::rs256("rs").unwrap();
    let stranger = IssuerKey::es256("es").unwrap();
    let keys = key_set(&[&es, &rs]);
    let verify = |token: &str| keys.verify(token, &expect(), now());

    // Same kid, another key: the signature fails.
    let forged = signed(&stranger, |_| {});
    assert_eq!(
        verify(&forged),
        Err(JwtError::BadSignature { kid: "es".into() })
    );
    // Claims changed after signing.
    let good = signed(&es, |_| {});
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut claims = bound().to_json();
    claims["kubernetes.io"]["pod"]["name"] = json!("web-1");
    let swapped = URL_SAFE_NO_PAD.encode(claims.to_string());
    parts[1] = &swapped;
    assert_eq!(
        verify(&parts.join(".")),
        Err(JwtError::BadSignature { kid: "es".into() })
    );
    // A key the set does not hold.
    let unknown = IssuerKey::es256("rotated").unwrap();
    assert!(matches!(
        verify(&signed(&unknown, |_| {})),
        Err(JwtError::UnknownKey { kid, known }) if kid == "rotated" && known == ["es", "rs"]
    ));
    // The RSA key named under an ECDSA algorithm, and the reverse.
    let claims = bound().to_json();
    let confused = es.sign_with_header(json!({"kid": "rs"}), &claims).unwrap();
    assert!(matches!(
        verify(&confused),
        Err(JwtError::KeyAlgorithmMismatch { alg: "ES256", .. })
    ));
    // Untrusted header values are cut short in errors.
    let long_kid = es
        .sign_with_header(json!({"kid": "k".repeat(5000)}), &claims)
        .unwrap();
    assert!(matches!(
        verify(&long_kid),
        Err(JwtError::UnknownKey { kid, .. }) if kid.chars().count() == 65
    ));
    // Algorithms never accepted, whatever the signature.
    for alg in ["none", "HS256", "PS256", "ES512", "EdDSA"] {
        let token = es.sign_with_header(json!({"alg": alg}), &claims).unwrap();
        assert!(
            matches!(verify(&token), Err(JwtError::UnsupportedAlgorithm { .. })),
            "{alg}"
        );
    }
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"es"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    assert!(matches!(
        verify(&unsigned),
        Err(JwtError::UnsupportedAlgorithm { .. })
    ));
    let no_kid = es.sign_with_header(json!({"kid": ""}), &claims).unwrap();
    assert!(matches!(verify(&no_kid), Err(JwtError::Malformed { .. })));
    let critical = es
        .sign_with_header(json!({"crit": ["exp"]}), &claims)
        .unwrap();
    assert!(matches!(verify(&critical), Err(JwtError::Malformed { .. })));
}

#[test]
fn malformed_tokens_are_refused_without_echoing_them() {
    let es = IssuerKey::es256("es").unwrap();
    let keys = key_set(&[&es]);
    let good = signed(&es, |_| {});
    let padded = format!("{good}=");
    let too_long = format!("{good}{}", "A".repeat(MAX_TOKEN_LEN));
    for token in [
        "",
        "a.b",
        "a.b.c.d",
        "!!!.e30.sig",
        "e30.e30.sig",
        padded.as_str(),
        too_long.as_str(),
        "eyJhbGciOiJFUzI1NiIsImtpZCI6ImVzIn0.bm90IGpzb24.AAAA",
    ] {
        let error = keys.verify(token, &expect(), now()).unwrap_err();
        let text = error.to_string();
        assert!(
            token.len() < 8 || !text.contains(token),
            "{token:?} echoed in {text:?}"
        );
    }
    let bad_signature = good.rsplit_once('.').unwrap().0.to_owned() + ".AAAA";
    assert!(matches!(
        keys.verify(&bad_signature, &expect(), now()),
        Err(JwtError::BadSignature { .. })
    ));
}

#[test]
fn jwks_documents_keep_only_usable_signing_keys() {
    let es = IssuerKey::es256("es").unwrap();
    let rs = IssuerKey::rs256("rs").unwrap();
    let mut encryption = es.jwk();
    encryption["kid"] = json!("enc");
    encryption["use"] = json!("enc");
    let mut no_kid = es.jwk();
    no_kid.as_object_mut().unwrap().remove("kid");
    let mut short_rsa = rs.jwk();
    short_rsa["kid"] = json!("short");
    short_rsa["n"] = json!(URL_SAFE_NO_PAD.encode([0xc5u8; 128]));
    let mut p521 = es.jwk();
    p521["kid"] = json!("p521");
    p521["crv"] = json!("P-521");
    let mut wrong_alg = rs.jwk();
    wrong_alg["kid"] = json!("wrong-alg");
    wrong_alg["alg"] = json!("ES256");
    let oct = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"});
    let mut duplicate = rs.jwk();
    duplicate["kid"] = json!("es");
    let doc = json!({"keys": [
        es.jwk(), encryption, no_kid, short_rsa, p521, wrong_alg, oct, rs.jwk(), duplicate
    ]});
    let keys = JwtKeySet::from_json(doc.to_string().as_bytes()).unwrap();
    assert_eq!(keys.key_ids(), ["es", "rs"]);
    assert_eq!(keys.len(), 2);
    assert!(!format!("{keys:?}").contains(&es.jwk()["x"].as_str().unwrap()[..10]));

    let none_usable = json!({"keys": [oct_key()]});
    assert!(matches!(
        JwtKeySet::from_json(none_usable.to_string().as_bytes()),
        Err(JwksError::NoUsableKey { skipped }) if skipped.contains("hmac")
    ));
    assert!(matches!(
        JwtKeySet::from_json(br#"{"keys": []}"#),
        Err(JwksError::NoUsableKey { .. })
    ));
    for garbage in [&b"not json"[..], b"{}", b"[]", br#"{"keys": {}}"#] {
        assert!(matches!(
            JwtKeySet::from_json(garbage),
            Err(JwksError::Malformed { .. })
        ));
    }
    let huge = vec![b' '; MAX_JWKS_LEN + 1];
    assert!(matches!(
        JwtKeySet::from_json(&huge),
        Err(JwksError::TooLarge { .. })
    ));
    let many = json!({"keys": vec![es.jwk(); MAX_KEYS + 1]});
    assert!(matches!(
        JwtKeySet::from_json(many.to_string().as_bytes()),
        Err(JwksError::Malformed { .. })
    ));
}

fn oct_key() -> Value {
    json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"})
}
