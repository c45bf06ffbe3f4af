//! A Kubernetes service account token issuer for tests: real signed JWTs
//! with the API server's claims, and the JWKS that verifies them (what
//! `GET /openid/v1/jwks` serves).
//!
//! Keys: a fresh ES256 key per issuer, or the committed 2048-bit RSA test
//! key (`testdata/service-account-rsa-2048.pk8`, for RS256, the API
//! server's default; ring can sign with RSA but not generate RSA keys).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
    RsaPublicKeyComponents,
};
use serde_json::{Value, json};

/// The committed RSA test key (PKCS#8 DER). Test data only.
const RSA_TEST_KEY: &[u8] = include_bytes!("../testdata/service-account-rsa-2048.pk8");

enum SigningKey {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

/// One signing key of a [`ServiceAccountIssuer`].
pub struct IssuerKey {
    kid: String,
    key: SigningKey,
}

impl std::fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl IssuerKey {
    /// A fresh P-256 key (ES256) with key id `kid`.
    pub fn es256(kid: &str) -> Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("P-256 key generation failed"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow::anyhow!("P-256 key: {e}"))?;
        Ok(Self {
            kid: kid.to_owned(),
            key: SigningKey::Es256(key),
        })
    }

    /// The committed RSA test key (RS256) with key id `kid`.
    pub fn rs256(kid: &str) -> Result<Self> {
        let key = RsaKeyPair::from_pkcs8(RSA_TEST_KEY)
            .map_err(|e| anyhow::anyhow!("RSA test key: {e}"))?;
        Ok(Self {
            kid: kid.to_owned(),
            key: SigningKey::Rs256(key),
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWK of the public key, as the API server publishes it.
    pub fn jwk(&self) -> Value {
        match &self.key {
            SigningKey::Es256(key) => {
                let point = key.public_key().as_ref();
                json!({
                    "use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                })
            }
            SigningKey::Rs256(key) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
                json!({
                    "use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256",
                    "n": URL_SAFE_NO_PAD.encode(&public.n),
                    "e": URL_SAFE_NO_PAD.encode(&public.e),
                })
            }
        }
    }

    /// A compact JWS of `claims` under `header` (its `alg` and `kid` are
    /// set here unless `header` sets them).
    pub fn sign_with_header(&self, mut header: Value, claims: &Value) -> Result<String> {
        let alg = match self.key {
            SigningKey::Es256(_) => "ES256",
            SigningKey::Rs256(_) => "RS256",
        };
        let object = header.as_object_mut().context("header must be an object")?;
        object.entry("alg").or_insert_with(|| json!(alg));
        object.entry("kid").or_insert_with(|| json!(self.kid));
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let signature = match &self.key {
            SigningKey::Es256(key) => key
                .sign(&rng, signing_input.as_bytes())
                .map_err(|_| anyhow::anyhow!("ES256 signing failed"))?
                .as_ref()
                .to_vec(),
            SigningKey::Rs256(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(
                    &RSA_PKCS1_SHA256,
                    &rng,
                    signing_input.as_bytes(),
                    &mut signature,
                )
                .map_err(|_| anyhow::anyhow!("RS256 signing failed"))?;
                signature
            }
        };
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }

    /// A compact JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String> {
        self.sign_with_header(json!({"typ": "JWT"}), claims)
    }
}

/// What a projected, pod-bound service account token says.
#[derive(Clone, Debug)]
pub struct BoundClaims {
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod.
    pub pod: String,
    /// The pod's uid.
    pub pod_uid: String,
    /// The pod's node.
    pub node: String,
    /// Lifetime from now, seconds (negative: already expired).
    pub lifetime_s: i64,
}

impl BoundClaims {
    /// The JWT claims the API server writes for such a token.
    pub fn to_json(&self) -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let exp = now + self.lifetime_s;
        json!({
            "aud": self.audiences,
            "exp": exp,
            "iat": now.min(exp),
            "nbf": now.min(exp),
            "iss": self.issuer,
            "jti": format!("{:032x}", fastrand_u128()),
            "sub": format!("system:serviceaccount:{}:{}", self.namespace, self.service_account),
            "kubernetes.io": {
                "namespace": self.namespace,
                "node": {"name": self.node, "uid": format!("node-uid-{}", self.node)},
                "pod": {"name": self.pod, "uid": self.pod_uid},
                "serviceaccount": {"name": self.service_account, "uid": format!("sa-uid-{}", self.service_account)},
            },
        })
    }
}

fn fastrand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut bytes).unwrap_or(());
    u128::from_le_bytes(bytes)
}

/// The cluster's service account issuer: its URL and signing keys.
#[derive(Debug)]
pub struct ServiceAccountIssuer {
    /// `iss` of every token and of the discovery document.
    pub issuer: String,
    /// Signing keys; the first signs.
    pub keys: Vec<IssuerKey>,
}

impl ServiceAccountIssuer {
    /// An issuer with one fresh ES256 key.
    pub fn es256(issuer: &str) -> Result<Self> {
        Ok(Self {
            issuer: issuer.to_owned(),
            keys: vec![IssuerKey::es256("es256-key-1")?],
        })
    }

    /// The JWKS of all keys.
    pub fn jwks(&self) -> Value {
        json!({"keys": self.keys.iter().map(IssuerKey::jwk).collect::<Vec<_>>()})
    }

    /// A signed token with `claims` (issuer set to this issuer's).
    pub fn mint(&self, claims: &BoundClaims) -> Result<String> {
        let mut claims = claims.clone();
        claims.issuer.clone_from(&self.issuer);
        self.keys
            .first()
            .context("the issuer has no key")?
            .sign(&claims.to_json())
    }
}
