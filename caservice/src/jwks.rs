//! Service account tokens verified offline: the signature against the
//! cluster's service account issuer keys, the claims as [`crate::jwt`]
//! checks them. No TokenReview per new token, so a pod's first certificate
//! costs one signature check instead of an API round trip.
//!
//! The keys come from the API server (`GET /openid/v1/jwks`, readable by
//! every service account through the default
//! `system:service-account-issuer-discovery` binding), the accepted
//! issuers from `--token-issuer` or the discovery document
//! (`GET /.well-known/openid-configuration`). They are fetched at start,
//! refreshed every [`JwksSettings::refresh_interval`], and at once (at most
//! every [`JwksSettings::min_refetch_interval`]) when a token names a key
//! id the set does not hold, which is how a signing key rotation shows.
//! A failed refresh keeps the keys held.
//!
//! What offline verification cannot see, a deleted pod, the pod check
//! still does (the token's pod must exist with its uid on the caller's
//! node), as for reviewed tokens. A deleted service account it does not
//! see: its pods' tokens stay valid until they expire or the pods are
//! gone (TokenReview refuses them at once). Results are cached by the
//! token's SHA-256 until the token expires, at most
//! [`JwksSettings::cache_ttl`] — also after its key left the issuer's set,
//! so removing a signing key takes effect here within that time.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::jwt::{Expectations, JwtError, JwtKeySet};
use crate::tokens::{BoxFuture, Lookup, TokenCache, TokenVerifier, VerifiedToken, lock, look_up};

/// Path of the service account issuer's keys on the API server.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// Path of the service account issuer discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Settings of a [`JwksVerifier`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwksSettings {
    /// The audience tokens must carry (the CA's).
    pub audience: String,
    /// The issuers tokens may name (`iss`): all of the API server's
    /// `--service-account-issuer` values during an issuer migration. Empty:
    /// the `issuer` of the API server's discovery document.
    pub issuers: Vec<String>,
    /// How often the keys are fetched again.
    pub refresh_interval: Duration,
    /// Shortest time between fetches caused by an unknown key id, and
    /// between retries after a failed fetch.
    pub min_refetch_interval: Duration,
    /// Timeout of one fetch.
    pub timeout: Duration,
    /// Longest time a verified token is reused without checking it again
    /// (also bounded by its expiry).
    pub cache_ttl: Duration,
    /// Most cached results; the oldest is evicted first.
    pub cache_capacity: usize,
}

impl JwksSettings {
    /// Defaults for `audience`: issuer discovered, keys refreshed every
    /// 5 min and at most every 10 s on unknown key ids, 5 s timeout, 5 min
    /// cache of 10,000 tokens.
    pub fn new(audience: impl Into<String>) -> Self {
        Self {
            audience: audience.into(),
            issuers: Vec::new(),
            refresh_interval: Duration::from_secs(300),
            min_refetch_interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(300),
            cache_capacity: 10_000,
        }
    }
}

/// The issuer and its keys as last fetched.
#[derive(Debug)]
struct IssuerKeys {
    issuers: Vec<String>,
    keys: JwtKeySet,
}

#[derive(Debug, Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

/// Verifies service account tokens offline against the issuer's JWKS.
pub struct JwksVerifier {
    client: kube::Client,
    settings: JwksSettings,
    current: RwLock<Option<Arc<IssuerKeys>>>,
    /// Held while fetching: one fetch at a time.
    fetch: tokio::sync::Mutex<FetchState>,
    cache: Mutex<TokenCache>,
}

impl std::fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("settings", &self.settings)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl JwksVerifier {
    /// A verifier fetching keys with `client`, and its refresh task (which
    /// ends when the verifier is dropped). The first fetch runs in that
    /// task; requests arriving before it succeeded wait for a fetch of
    /// their own. Must run inside a Tokio runtime.
    pub fn start(client: kube::Client, settings: JwksSettings) -> Arc<Self> {
        let verifier = Arc::new(Self::new(client, settings));
        let weak = Arc::downgrade(&verifier);
        tokio::spawn(refresh_loop(weak));
        verifier
    }

    /// A verifier without a refresh task: keys are fetched when a request
    /// needs them.
    pub fn new(client: kube::Client, settings: JwksSettings) -> Self {
        let capacity = settings.cache_capacity.max(1);
        Self {
            client,
            settings,
            current: RwLock::new(None),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            cache: Mutex::new(TokenCache::new(capacity)),
        }
    }

    /// Key ids currently held (sorted); empty before the first fetch.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys().map(|k| k.keys.key_ids()).unwrap_or_default()
    }

    /// The issuers tokens may name, once known.
    pub fn issuers(&self) -> Vec<String> {
        self.keys().map(|k| k.issuers.clone()).unwrap_or_default()
    }

    fn keys(&self) -> Option<Arc<IssuerKeys>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Fetches the issuer and its keys now; on failure the keys held (if
    /// any) stay. Errors with `Unavailable` when no keys are held.
    pub async fn refresh_now(&self) -> Result<(), Error> {
        self.refresh(Duration::ZERO).await.map(|_| ())
    }

    /// Fetches issuer and keys unless a fetch finished less than
    /// `min_age` ago (then its outcome stands). Returns the keys held
    /// afterwards, or why there are none.
    async fn refresh(&self, min_age: Duration) -> Result<Arc<IssuerKeys>, Error> {
        let mut state = self.fetch.lock().await;
        let recent = state.last_attempt.is_some_and(|at| at.elapsed() < min_age);
        if !recent {
            state.last_attempt = Some(Instant::now());
            match tokio::time::timeout(self.settings.timeout, self.fetch_keys()).await {
                Ok(Ok(fresh)) => {
                    let changed = self
                        .keys()
                        .is_none_or(|old| old.keys != fresh.keys || old.issuers != fresh.issuers);
                    if changed {
                        tracing::info!(
                            issuers = ?fresh.issuers,
                            key_ids = ?fresh.keys.key_ids(),
                            "service account issuer keys loaded"
                        );
                    }
                    *self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(fresh));
                    state.last_error = None;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "service account issuer keys not refreshed; keeping the keys held");
                    state.last_error = Some(error.to_string());
                }
                Err(_) => {
                    let error = format!("no answer within {:?}", self.settings.timeout);
                    tracing::warn!(%error, "service account issuer keys not refreshed; keeping the keys held");
                    state.last_error = Some(error);
                }
            }
        }
        self.keys().ok_or_else(|| Error::ApiUnavailable {
            what: format!("the service account issuer keys (GET {JWKS_PATH})"),
            reason: state
                .last_error
                .clone()
                .unwrap_or_else(|| "not fetched yet".to_owned()),
        })
    }

    async fn fetch_keys(&self) -> Result<IssuerKeys, String> {
        let issuers = match self.settings.issuers.as_slice() {
            [_, ..] => self.settings.issuers.clone(),
            [] => {
                let text = self.get(DISCOVERY_PATH).await?;
                #[derive(serde::Deserialize)]
                struct Discovery {
                    issuer: String,
                }
                let discovery: Discovery = serde_json::from_str(&text)
                    .map_err(|e| format!("GET {DISCOVERY_PATH}: {e}"))?;
                if discovery.issuer.is_empty() {
                    return Err(format!("GET {DISCOVERY_PATH}: empty issuer"));
                }
                vec![discovery.issuer]
            }
        };
        let text = self.get(JWKS_PATH).await?;
        let keys =
            JwtKeySet::from_json(text.as_bytes()).map_err(|e| format!("GET {JWKS_PATH}: {e}"))?;
        Ok(IssuerKeys { issuers, keys })
    }

    async fn get(&self, path: &str) -> Result<String, String> {
        let request = http::Request::get(path)
            .header(
                http::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .body(Vec::new())
            .map_err(|e| format!("GET {path}: {e}"))?;
        self.client
            .request_text(request)
            .await
            .map_err(|e| format!("GET {path}: {e}"))
    }

    async fn verify_uncached(&self, token: &str, key: &[u8; 32]) -> Result<VerifiedToken, Error> {
        let token_hash = || crate::tokens::token_hash_hex(token);
        let mut keys = match self.keys() {
            Some(keys) => keys,
            None => self.refresh(self.settings.min_refetch_interval).await?,
        };
        let mut result = check(&keys, token, &self.settings.audience, unix_now());
        if let Err(JwtError::UnknownKey { .. }) = &result {
            // Maybe the issuer rotated its signing key since the last fetch.
            // The clock is read again: the fetch may have taken seconds.
            keys = self.refresh(self.settings.min_refetch_interval).await?;
            result = check(&keys, token, &self.settings.audience, unix_now());
        }
        let verified = result.map_err(|error| denial(error, token_hash()))?;
        let left = verified
            .expires_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO);
        let ttl = self.settings.cache_ttl.min(left);
        if !ttl.is_zero() {
            lock(&self.cache).insert(*key, verified.clone(), Instant::now() + ttl);
        }
        Ok(verified)
    }
}

fn check(
    keys: &IssuerKeys,
    token: &str,
    audience: &str,
    now: i64,
) -> Result<VerifiedToken, JwtError> {
    keys.keys.verify(
        token,
        &Expectations {
            issuers: &keys.issuers,
            audience,
        },
        now,
    )
}

/// The service's denial for a token that failed verification.
fn denial(error: JwtError, token_hash: String) -> Error {
    match error {
        JwtError::Expired { exp } => Error::TokenExpired {
            token_hash,
            expired_at: u64::try_from(exp).unwrap_or(0),
        },
        JwtError::WrongAudience { expected, got } => Error::TokenWrongAudience {
            token_hash,
            expected,
            got,
        },
        JwtError::NotBoundToPod {
            namespace,
            service_account,
        } => Error::TokenNotBoundToPod {
            namespace,
            service_account,
        },
        other => Error::TokenRejected {
            token_hash,
            reason: other.to_string(),
        },
    }
}

/// Unix seconds now; a clock before 1970 reads as the far future, so that
/// every token is expired (fail closed).
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(i64::MAX)
}

/// Fetches at once, then every `refresh_interval` (every
/// `min_refetch_interval` while there are no keys), until the verifier is
/// dropped.
async fn refresh_loop(verifier: Weak<JwksVerifier>) {
    loop {
        let wait = {
            let Some(verifier) = verifier.upgrade() else {
                return;
            };
            let settings = &verifier.settings;
            match verifier.refresh(Duration::ZERO).await {
                Ok(_) => settings.refresh_interval,
                Err(_) => settings.min_refetch_interval,
            }
        };
        tokio::time::sleep(wait).await;
    }
}

impl TokenVerifier for JwksVerifier {
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<VerifiedToken, Error>> {
        Box::pin(async move {
            match look_up(&self.cache, token, &self.settings.audience)? {
                Lookup::Hit(verified) => Ok(verified),
                Lookup::Miss(key) => self.verify_uncached(token, &key).await,
            }
        })
    }
}
