//! Service account token verification with `TokenReview`, cached by the
//! token's SHA-256 (never the token itself).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::error::Error;

/// A boxed, sendable future (what [`TokenVerifier::verify`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// `user.extra` key of a bound token's pod name.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `user.extra` key of a bound token's pod uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// `user.extra` key of a bound token's node name.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Facts the API server vouched for about a service account token bound to
/// a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The service account's (and pod's) namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod_name: String,
    /// That pod's uid.
    pub pod_uid: String,
    /// The node the pod was scheduled to when the token was issued, if the
    /// API server recorded it (Kubernetes 1.30+).
    pub node_name: Option<String>,
    /// The audiences the API server reported.
    pub audiences: Vec<String>,
    /// The token's `exp` claim, if readable (used for caching only).
    pub expires_at: Option<SystemTime>,
}

/// Verifies service account tokens.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies `token`, returning the identity it proves or why not.
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<VerifiedToken, Error>>;
}

/// First 16 hex digits of the token's SHA-256: safe to log, enough to
/// correlate.
pub fn token_hash_hex(token: &str) -> String {
    hex(&token_digest(token)[..8])
}

pub(crate) fn token_digest(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Longest JWT payload segment read, in bytes.
const MAX_PAYLOAD_LEN: usize = 16 * 1024;

/// Reads the `exp` claim (unix seconds) of a JWT's payload WITHOUT
/// verifying anything. Used only to bound how long a review result is
/// cached and to refuse an expired token early; never to accept one.
/// `None` for anything that is not a three-segment JWT with a numeric,
/// non-negative `exp`.
pub fn jwt_expiry(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_PAYLOAD_LEN {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.as_object()?.get("exp")?;
    if let Some(secs) = exp.as_u64() {
        return Some(secs);
    }
    let secs = exp.as_f64()?;
    (secs.is_finite() && secs >= 0.0 && secs < u64::MAX as f64).then_some(secs as u64)
}

/// Settings of a [`TokenReviewVerifier`].
#[derive(Clone, Debug)]
pub struct TokenReviewSettings {
    /// The audience tokens must carry (the CA's).
    pub audience: String,
    /// Timeout of one TokenReview call.
    pub timeout: Duration,
    /// Longest time a review result is reused (also bounded by the token's
    /// expiry).
    pub cache_ttl: Duration,
    /// Most cached results; the oldest is evicted first.
    pub cache_capacity: usize,
}

impl TokenReviewSettings {
    /// Defaults for `audience`: 5 s timeout, 5 min cache, 10,000 entries.
    pub fn new(audience: impl Into<String>) -> Self {
        Self {
            audience: audience.into(),
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(300),
            cache_capacity: 10_000,
        }
    }
}

/// Verifies tokens with `authentication.k8s.io/v1` TokenReview, caching
/// positive results by token hash until the token expires (at most
/// `cache_ttl`).
pub struct TokenReviewVerifier {
    api: Api<TokenReview>,
    settings: TokenReviewSettings,
    cache: Mutex<TokenCache>,
}

impl std::fmt::Debug for TokenReviewVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewVerifier")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TokenReviewVerifier {
    /// A verifier posting reviews with `client`.
    pub fn new(client: kube::Client, settings: TokenReviewSettings) -> Self {
        let capacity = settings.cache_capacity.max(1);
        Self {
            api: Api::all(client),
            settings,
            cache: Mutex::new(TokenCache::new(capacity)),
        }
    }

    /// Number of cached review results.
    pub fn cached(&self) -> usize {
        lock(&self.cache).map.len()
    }

    async fn review(&self, token: &str, token_hash: &str) -> Result<VerifiedToken, Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.settings.audience.clone()]),
            },
            ..Default::default()
        };
        let unavailable = |reason: String| Error::ApiUnavailable {
            what: "TokenReview".to_owned(),
            reason,
        };
        let answer = tokio::time::timeout(
            self.settings.timeout,
            self.api.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| unavailable(format!("no answer within {:?}", self.settings.timeout)))?
        .map_err(|e| unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        let audiences = status.audiences.clone().unwrap_or_default();
        if status.authenticated != Some(true) {
            let reason = status
                .error
                .unwrap_or_else(|| "authenticated: false".to_owned());
            if reason.contains("audience") {
                return Err(Error::TokenWrongAudience {
                    token_hash: token_hash.to_owned(),
                    expected: self.settings.audience.clone(),
                    got: audiences,
                });
            }
            if reason.contains("expired") {
                return Err(Error::TokenExpired {
                    token_hash: token_hash.to_owned(),
                    expired_at: jwt_expiry(token).unwrap_or(0),
                });
            }
            return Err(Error::TokenNotAuthenticated {
                token_hash: token_hash.to_owned(),
                reason,
            });
        }
        if !audiences.contains(&self.settings.audience) {
            return Err(Error::TokenWrongAudience {
                token_hash: token_hash.to_owned(),
                expected: self.settings.audience.clone(),
                got: audiences,
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = service_account_of(&username) else {
            return Err(Error::TokenNotServiceAccount { username });
        };
        let extra = user.extra.unwrap_or_default();
        let single = |key: &str| {
            extra.get(key).and_then(|values| match values.as_slice() {
                [one] if !one.is_empty() => Some(one.clone()),
                _ => None,
            })
        };
        let (Some(pod_name), Some(pod_uid)) = (single(EXTRA_POD_NAME), single(EXTRA_POD_UID))
        else {
            return Err(Error::TokenNotBoundToPod {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            });
        };
        Ok(VerifiedToken {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name,
            pod_uid,
            node_name: single(EXTRA_NODE_NAME),
            audiences,
            expires_at: jwt_expiry(token).map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        })
    }
}

impl TokenVerifier for TokenReviewVerifier {
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<VerifiedToken, Error>> {
        Box::pin(async move {
            // A cached result never outlives the token (see below), so a
            // hit needs no expiry check.
            let key = match look_up(&self.cache, token, &self.settings.audience)? {
                Lookup::Hit(verified) => return Ok(verified),
                Lookup::Miss(key) => key,
            };
            let token_hash = hex(&key[..8]);
            let now = SystemTime::now();
            let exp = jwt_expiry(token);
            if let Some(exp) = exp
                && UNIX_EPOCH + Duration::from_secs(exp) <= now
            {
                return Err(Error::TokenExpired {
                    token_hash,
                    expired_at: exp,
                });
            }
            let verified = self.review(token, &token_hash).await?;
            // Cache until the token expires, at most cache_ttl.
            let mut ttl = self.settings.cache_ttl;
            if let Some(left) = verified
                .expires_at
                .and_then(|at| at.duration_since(now).ok())
            {
                ttl = ttl.min(left);
            }
            if !ttl.is_zero() {
                lock(&self.cache).insert(key, verified.clone(), Instant::now() + ttl);
            }
            tracing::debug!(
                token_sha256 = %token_hash,
                namespace = %verified.namespace,
                pod = %verified.pod_name,
                "token reviewed"
            );
            Ok(verified)
        })
    }
}

/// `(namespace, name)` of a service account user name,
/// `system:serviceaccount:<namespace>:<name>` (both non-empty).
pub(crate) fn service_account_of(username: &str) -> Option<(&str, &str)> {
    username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
}

/// What a verifier's cache knows of a token.
pub(crate) enum Lookup {
    /// Verified before and still valid: a cached result never outlives
    /// its token.
    Hit(VerifiedToken),
    /// Not cached: its digest, to cache the result under.
    Miss([u8; 32]),
}

/// Refuses an empty token, then asks `cache` about it.
pub(crate) fn look_up(
    cache: &Mutex<TokenCache>,
    token: &str,
    audience: &str,
) -> Result<Lookup, Error> {
    if token.is_empty() {
        return Err(Error::MissingToken {
            audience: audience.to_owned(),
        });
    }
    let key = token_digest(token);
    Ok(match lock(cache).get(&key, Instant::now()) {
        Some(hit) => Lookup::Hit(hit),
        None => Lookup::Miss(key),
    })
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Review results by token SHA-256, bounded, oldest evicted first.
pub(crate) struct TokenCache {
    capacity: usize,
    next_gen: u64,
    map: HashMap<[u8; 32], (VerifiedToken, Instant, u64)>,
    /// Insertion order; entries whose generation no longer matches are stale.
    order: VecDeque<([u8; 32], u64)>,
}

impl TokenCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            next_gen: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<VerifiedToken> {
        match self.map.get(key) {
            Some((token, until, _)) if *until > now => Some(token.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn insert(&mut self, key: [u8; 32], token: VerifiedToken, until: Instant) {
        let generation = self.next_gen;
        self.next_gen += 1;
        self.map.insert(key, (token, until, generation));
        self.order.push_back((key, generation));
        while self.map.len() > self.capacity {
            let Some((old, old_gen)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|(_, _, g)| *g == old_gen) {
                self.map.remove(&old);
            }
        }
        if self.order.len() > 2 * self.capacity {
            let map = &self.map;
            self.order
                .retain(|(k, g)| map.get(k).is_some_and(|(_, _, mg)| mg == g));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn reads_exp_without_trusting_anything_else() {
        assert_eq!(
            jwt_expiry(&jwt(r#"{"exp":1700000000}"#)),
            Some(1_700_000_000)
        );
        assert_eq!(
            jwt_expiry(&jwt(r#"{"exp":1700000000.5}"#)),
            Some(1_700_000_000)
        );
        assert_eq!(jwt_expiry(&jwt(r#"{"exp":-1}"#)), None);
        assert_eq!(jwt_expiry(&jwt(r#"{"exp":"1"}"#)), None);
        assert_eq!(jwt_expiry(&jwt(r#"[1]"#)), None);
        assert_eq!(jwt_expiry("a.b"), None);
        assert_eq!(jwt_expiry("a.b.c.d"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(jwt_expiry(""), None);
    }

    fn token(n: usize) -> VerifiedToken {
        VerifiedToken {
            namespace: "ns".into(),
            service_account: "sa".into(),
            pod_name: format!("p{n}"),
            pod_uid: "u".into(),
            node_name: None,
            audiences: vec![],
            expires_at: None,
        }
    }

    #[test]
    fn cache_is_bounded_and_expires() {
        let mut cache = TokenCache::new(3);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        for i in 0..5u8 {
            cache.insert([i; 32], token(i.into()), later);
        }
        assert_eq!(cache.map.len(), 3);
        assert!(cache.get(&[0; 32], now).is_none(), "oldest evicted");
        assert!(cache.get(&[4; 32], now).is_some());
        assert!(cache.get(&[4; 32], later).is_none(), "expired");
        for i in 0..100u8 {
            cache.insert([i; 32], token(i.into()), later);
            cache.insert([i; 32], token(i.into()), later);
        }
        assert!(cache.order.len() <= 6 + 1);
        assert_eq!(cache.map.len(), 3);
    }
}
