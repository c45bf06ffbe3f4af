//! Offline verification of Kubernetes service account tokens: JWTs signed
//! by the cluster's service account issuer, checked against the issuer's
//! published keys (JWKS, `GET /openid/v1/jwks` on the API server).
//!
//! Written here rather than taken from `jsonwebtoken`: its current majors
//! (10 and 11) verify only with aws-lc-rs or the RustCrypto crates, a second
//! crypto provider beside ring, and the ring-based 9.x line is superseded.
//! What credlet needs is narrow: verification (never signing) of the three
//! algorithms Kubernetes signs service account tokens with (RS256, ES256,
//! ES384), and Kubernetes' own claims, which ring and serde do directly.
//!
//! Everything here is pure: no I/O, no clock (`now` is a parameter), so the
//! parsers can be fuzzed (`fuzz/fuzz_targets/jwt.rs`). Errors never carry
//! any part of a token.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, RSA_PKCS1_2048_8192_SHA256,
    RsaPublicKeyComponents, UnparsedPublicKey,
};
use serde::Deserialize;

use crate::tokens::{VerifiedToken, service_account_of};

/// Longest token accepted, in bytes (Kubernetes' are about 1 KB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest JWKS document accepted, in bytes.
pub const MAX_JWKS_LEN: usize = 256 * 1024;
/// Most keys one JWKS may hold.
pub const MAX_KEYS: usize = 64;
/// Clock skew tolerated on `nbf`, in seconds. `exp` gets none: an expired
/// token is refused.
pub const NOT_BEFORE_LEEWAY_S: i64 = 60;

/// Why a token failed offline verification. No variant holds any part of
/// the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not a well-formed compact JWS with JSON header and claims.
    #[error("not a well-formed JWT: {reason}")]
    Malformed {
        /// What is wrong (never the token's bytes).
        reason: String,
    },
    /// The header names an algorithm credlet does not accept.
    #[error("signing algorithm {alg:?} is not accepted (RS256, ES256 and ES384 are)")]
    UnsupportedAlgorithm {
        /// The header's `alg`.
        alg: String,
    },
    /// The header names a key the issuer's JWKS does not hold.
    #[error(
        "signed with key id {kid:?}, which the service account issuer's keys do not hold (keys: {known:?})"
    )]
    UnknownKey {
        /// The header's `kid`.
        kid: String,
        /// The key ids the JWKS holds.
        known: Vec<String>,
    },
    /// The key named by `kid` is of another type than `alg` needs.
    #[error("key {kid:?} is {key}, which cannot verify {alg}")]
    KeyAlgorithmMismatch {
        /// The header's `kid`.
        kid: String,
        /// The key's type.
        key: &'static str,
        /// The header's `alg`.
        alg: &'static str,
    },
    /// The signature does not verify with the named key.
    #[error("the signature does not verify with key {kid:?}")]
    BadSignature {
        /// The header's `kid`.
        kid: String,
    },
    /// Issued by another issuer.
    #[error("issued by {got:?}, not by the cluster's service account issuer {expected:?}")]
    WrongIssuer {
        /// The accepted issuers.
        expected: Vec<String>,
        /// The token's `iss`.
        got: String,
    },
    /// Not meant for this audience.
    #[error("audiences {got:?} do not include {expected:?}")]
    WrongAudience {
        /// The CA's audience.
        expected: String,
        /// The token's `aud`.
        got: Vec<String>,
    },
    /// `exp` has passed.
    #[error("expired at {exp} (unix seconds)")]
    Expired {
        /// The token's `exp`.
        exp: i64,
    },
    /// `nbf` lies ahead (beyond the tolerated skew).
    #[error("not valid before {nbf} (unix seconds)")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
    },
    /// The claims do not describe a service account.
    #[error("not a service account token: {reason}")]
    NotServiceAccount {
        /// The token's `sub`, or what is missing.
        reason: String,
    },
    /// A service account token not bound to a pod.
    #[error("the token of service account {namespace}/{service_account} is not bound to a pod")]
    NotBoundToPod {
        /// The service account's namespace.
        namespace: String,
        /// The service account.
        service_account: String,
    },
}

/// Why a JWKS document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// Larger than [`MAX_JWKS_LEN`].
    #[error("the JWKS is {len} bytes; at most {max} are read")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a JWKS document.
    #[error("not a JWKS document: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// It holds no key credlet can verify with.
    #[error("the JWKS holds no usable signing key ({skipped})")]
    NoUsableKey {
        /// Why each key was skipped.
        skipped: String,
    },
}

/// A public key of the issuer.
#[derive(Clone, PartialEq, Eq)]
enum JwtKey {
    /// RSA modulus and exponent, big-endian, no leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed P-256 point.
    P256(Vec<u8>),
    /// Uncompressed P-384 point.
    P384(Vec<u8>),
}

impl JwtKey {
    fn kind(&self) -> &'static str {
        match self {
            Self::Rsa { .. } => "an RSA key",
            Self::P256(_) => "a P-256 key",
            Self::P384(_) => "a P-384 key",
        }
    }
}

/// The issuer's keys by key id.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JwtKeySet {
    keys: HashMap<String, JwtKey>,
}

impl fmt::Debug for JwtKeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKeySet")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

/// What a token must show besides a good signature.
#[derive(Clone, Copy, Debug)]
pub struct Expectations<'a> {
    /// The accepted `iss` values (the API server accepts tokens of every
    /// `--service-account-issuer` it is given, and signs with the first).
    pub issuers: &'a [String],
    /// An audience `aud` must include.
    pub audience: &'a str,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn b64(field: &str, value: Option<&str>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("no {field:?}"))?;
    URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|e| format!("{field:?} is not unpadded base64url: {e}"))
}

impl RawJwk {
    fn key(&self) -> Result<JwtKey, String> {
        if let Some(use_) = &self.use_
            && use_ != "sig"
        {
            return Err(format!("use {use_:?}"));
        }
        let key = match self.kty.as_str() {
            "RSA" => {
                let strip = |v: Vec<u8>| {
                    let zeros = v.iter().take_while(|b| **b == 0).count();
                    v[zeros..].to_vec()
                };
                let n = strip(b64("n", self.n.as_deref())?);
                let e = strip(b64("e", self.e.as_deref())?);
                if !(256..=1024).contains(&n.len()) || e.is_empty() || e.len() > 4 {
                    return Err(format!("RSA key of {} bits", n.len() * 8));
                }
                JwtKey::Rsa { n, e }
            }
            "EC" => {
                let (len, crv) = match self.crv.as_deref() {
                    Some("P-256") => (32, "P-256"),
                    Some("P-384") => (48, "P-384"),
                    other => return Err(format!("curve {other:?}")),
                };
                let x = b64("x", self.x.as_deref())?;
                let y = b64("y", self.y.as_deref())?;
                if x.len() != len || y.len() != len {
                    return Err(format!("{crv} coordinates of the wrong length"));
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                if len == 32 {
                    JwtKey::P256(point)
                } else {
                    JwtKey::P384(point)
                }
            }
            other => return Err(format!("key type {other:?}")),
        };
        if let Some(alg) = &self.alg {
            let fits = matches!(
                (alg.as_str(), &key),
                ("RS256", JwtKey::Rsa { .. })
                    | ("ES256", JwtKey::P256(_))
                    | ("ES384", JwtKey::P384(_))
            );
            if !fits {
                return Err(format!("alg {alg:?} for {}", key.kind()));
            }
        }
        Ok(key)
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawAudience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<RawAudience>,
    exp: Option<f64>,
    nbf: Option<f64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize)]
struct RawKubernetes {
    namespace: Option<String>,
    serviceaccount: Option<RawRef>,
    pod: Option<RawRef>,
    node: Option<RawRef>,
}

#[derive(Deserialize)]
struct RawRef {
    name: Option<String>,
    uid: Option<String>,
}

/// A JSON number of seconds as whole unix seconds (rounded down).
fn seconds(field: &str, value: f64) -> Result<i64, JwtError> {
    if !value.is_finite() || value.abs() >= 1e15 {
        return Err(JwtError::Malformed {
            reason: format!("{field:?} is not a time"),
        });
    }
    Ok(value.floor() as i64)
}

/// An untrusted header value as it may appear in an error: at most 64
/// characters.
fn shortened(mut value: String) -> String {
    if let Some((at, _)) = value.char_indices().nth(64) {
        value.truncate(at);
        value.push('…');
    }
    value
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

impl JwtKeySet {
    /// Parses a JWKS document (`{"keys": [...]}`). Keys credlet cannot use
    /// (encryption keys, other curves, RSA under 2048 bits, keys without a
    /// `kid`) are skipped; a document with none left is an error.
    pub fn from_json(json: &[u8]) -> Result<Self, JwksError> {
        if json.len() > MAX_JWKS_LEN {
            return Err(JwksError::TooLarge {
                len: json.len(),
                max: MAX_JWKS_LEN,
            });
        }
        let raw: RawJwks = serde_json::from_slice(json).map_err(|e| JwksError::Malformed {
            reason: e.to_string(),
        })?;
        if raw.keys.len() > MAX_KEYS {
            return Err(JwksError::Malformed {
                reason: format!("{} keys; at most {MAX_KEYS} are read", raw.keys.len()),
            });
        }
        let mut keys = HashMap::with_capacity(raw.keys.len());
        let mut skipped = Vec::new();
        for (i, jwk) in raw.keys.iter().enumerate() {
            let Some(kid) = jwk.kid.clone().filter(|k| !k.is_empty()) else {
                skipped.push(format!("key {i}: no kid"));
                continue;
            };
            if keys.contains_key(&kid) {
                skipped.push(format!("key {kid:?}: a second key with this kid"));
                continue;
            }
            match jwk.key() {
                Ok(key) => {
                    keys.insert(kid, key);
                }
                Err(why) => skipped.push(format!("key {kid:?}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey {
                skipped: if skipped.is_empty() {
                    "the document lists no keys".to_owned()
                } else {
                    skipped.join("; ")
                },
            });
        }
        Ok(Self { keys })
    }

    /// The key ids held, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `token`'s signature with the key its header names, then its
    /// claims, and returns the identity they prove: `iss`, `aud`, `exp` (required), `nbf`, a `sub` of
    /// `system:serviceaccount:<ns>:<sa>` agreeing with the `kubernetes.io`
    /// claim, and a bound pod. `now` is unix seconds.
    pub fn verify(
        &self,
        token: &str,
        expect: &Expectations<'_>,
        now: i64,
    ) -> Result<VerifiedToken, JwtError> {
        let malformed = |reason: &str| JwtError::Malformed {
            reason: reason.to_owned(),
        };
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed("longer than 16 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated parts"));
        };
        let decode = |what: &str, part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| malformed(&format!("the {what} is not unpadded base64url")))
        };
        let header: RawHeader = serde_json::from_slice(&decode("header", header_b64)?)
            .map_err(|e| malformed(&format!("header: {e}")))?;
        if header.crit.is_some() {
            return Err(malformed("the header has critical extensions"));
        }
        let alg: &'static str = match header.alg.as_str() {
            "RS256" => "RS256",
            "ES256" => "ES256",
            "ES384" => "ES384",
            _ => {
                return Err(JwtError::UnsupportedAlgorithm {
                    alg: shortened(header.alg),
                });
            }
        };
        let kid = header
            .kid
            .filter(|k| !k.is_empty())
            .ok_or_else(|| malformed("the header names no key (kid)"))?;
        let Some(key) = self.keys.get(&kid) else {
            return Err(JwtError::UnknownKey {
                kid: shortened(kid),
                known: self.key_ids(),
            });
        };
        let signature = decode("signature", signature_b64)?;
        let signed = &token.as_bytes()[..header_b64.len() + 1 + claims_b64.len()];
        let verified = match (alg, key) {
            ("RS256", JwtKey::Rsa { n, e }) => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, signed, &signature)
                .is_ok(),
            ("ES256", JwtKey::P256(point)) => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, &signature)
                    .is_ok()
            }
            ("ES384", JwtKey::P384(point)) => {
                UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, point)
                    .verify(signed, &signature)
                    .is_ok()
            }
            _ => {
                return Err(JwtError::KeyAlgorithmMismatch {
                    kid,
                    key: key.kind(),
                    alg,
                });
            }
        };
        if !verified {
            return Err(JwtError::BadSignature { kid });
        }

        // Signed by the issuer; now what it says.
        let claims: RawClaims = serde_json::from_slice(&decode("claims", claims_b64)?)
            .map_err(|e| malformed(&format!("claims: {e}")))?;
        let iss = claims.iss.unwrap_or_default();
        if !expect.issuers.contains(&iss) {
            return Err(JwtError::WrongIssuer {
                expected: expect.issuers.to_vec(),
                got: iss,
            });
        }
        let audiences = match claims.aud {
            Some(RawAudience::One(one)) => vec![one],
            Some(RawAudience::Many(many)) => many,
            None => Vec::new(),
        };
        if !audiences.iter().any(|a| a == expect.audience) {
            return Err(JwtError::WrongAudience {
                expected: expect.audience.to_owned(),
                got: audiences,
            });
        }
        let exp = seconds(
            "exp",
            claims.exp.ok_or_else(|| malformed("no expiry (exp)"))?,
        )?;
        if now >= exp {
            return Err(JwtError::Expired { exp });
        }
        if let Some(nbf) = claims.nbf {
            let nbf = seconds("nbf", nbf)?;
            if now.saturating_add(NOT_BEFORE_LEEWAY_S) < nbf {
                return Err(JwtError::NotYetValid { nbf });
            }
        }
        let sub = claims.sub.unwrap_or_default();
        let not_service_account = || JwtError::NotServiceAccount {
            reason: format!("subject {sub:?}"),
        };
        let (namespace, service_account) =
            service_account_of(&sub).ok_or_else(not_service_account)?;
        let kubernetes = claims.kubernetes.ok_or_else(not_service_account)?;
        let claimed_sa = kubernetes.serviceaccount.and_then(|r| non_empty(r.name));
        if kubernetes.namespace.as_deref() != Some(namespace)
            || claimed_sa.as_deref() != Some(service_account)
        {
            return Err(JwtError::NotServiceAccount {
                reason: format!(
                    "subject {sub:?} disagrees with its kubernetes.io claim ({:?}/{:?})",
                    kubernetes.namespace.unwrap_or_default(),
                    claimed_sa.unwrap_or_default()
                ),
            });
        }
        let pod = kubernetes
            .pod
            .and_then(|p| Some((non_empty(p.name)?, non_empty(p.uid)?)));
        let Some((pod_name, pod_uid)) = pod else {
            return Err(JwtError::NotBoundToPod {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            });
        };
        Ok(VerifiedToken {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name,
            pod_uid,
            node_name: kubernetes.node.and_then(|n| non_empty(n.name)),
            audiences,
            // `exp` is positive here: it lies after `now`.
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(exp.unsigned_abs())),
        })
    }
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
