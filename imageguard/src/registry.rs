//! Registry access checks: does a credential let its holder pull
//! `registry/repository@digest`? One manifest `HEAD`, nothing downloaded.
//!
//! [`RegistryVerifier`] speaks the distribution protocol itself (hyper +
//! tokio-rustls with ring) instead of going through oci-client 0.18, whose
//! API loses what a denial must explain and what the benchmark must count:
//!
//! - a 401 on the manifest becomes `UnauthorizedError { url }` — the
//!   registry's `WWW-Authenticate` challenge (`error="insufficient_scope"`)
//!   and error text are dropped;
//! - token-endpoint failures are swallowed (`get_auth_token` does
//!   `self._auth(..).await.ok()??`), so a wrong password at a token
//!   registry silently turns into an anonymous request and cannot be told
//!   apart from a user without a grant;
//! - every `HEAD` answered without `Docker-Content-Digest` (every 401/404)
//!   is retried as a manifest `GET`, and every auth starts with a
//!   `GET /v2/` probe: 3–4 requests where 1–3 suffice;
//! - the reqwest client is built inside oci-client, so requests cannot be
//!   counted, and `identity_token` (OAuth2 refresh token) is unsupported.
//!
//! # Flow
//!
//! 1. `HEAD /v2/<repository>/manifests/<digest>` with both OCI and Docker
//!    manifest `Accept` types (distribution 2.8 answers 404 to an OCI
//!    manifest asked for with Docker types only).
//! 2. On 401, read the challenge: `Basic` → retry with the pod's
//!    user/password; `Bearer realm,service` → get a token for
//!    `repository:<repository>:pull` from the realm (GET with Basic for a
//!    password, POST `grant_type=refresh_token` for an identity token,
//!    anonymous GET without credentials) and retry with it.
//! 3. Only the manifest answer proves access: a token endpoint answers 200
//!    even with empty access. 200 → [`Access::Granted`]; 401/403/404 after
//!    authenticating → [`Access::Denied`] with the registry's reason.
//!
//! The challenge (scheme, realm, service — never a credential or token) is
//! remembered per registry, so the next check with credentials
//! authenticates on its first request: Basic registries take 1 request per
//! check, token registries 2. Nothing credential-derived is cached across
//! checks; pooled connections carry no authentication state (HTTP/1.1,
//! `Authorization` per request).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use zeroize::Zeroizing;

use crate::credential::{Credential, Secret};
use crate::proxy::BoxFuture;
use crate::reference::{ImageRef, is_digest};
use crate::www_authenticate::{self, Challenge};

/// The manifest media types sent in `Accept` on every manifest request.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// Default time budget of one check, all requests included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response body read (token answers, error bodies).
const MAX_BODY: usize = 64 * 1024;
/// Longest token accepted from a token endpoint.
const MAX_TOKEN_LEN: usize = 32 * 1024;
/// Longest registry-provided text quoted in a reason.
const MAX_QUOTED: usize = 300;
/// Most registries whose challenge is remembered.
const MAX_CACHED_CHALLENGES: usize = 1024;
/// `client_id` sent with OAuth2 refresh-token grants.
const CLIENT_ID: &str = "credlet";

/// Whether a credential may pull the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The registry answered the manifest request with 200.
    Granted,
    /// The registry (or its token endpoint) said no: 401/403/404 on the
    /// manifest with these credentials, or credentials rejected.
    Denied {
        /// What the registry said, for a person to act on; never contains
        /// the credential.
        reason: String,
    },
}

/// The check could not be carried out; callers fail closed ("can't verify").
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The digest to check is malformed (nothing was sent).
    #[error(
        "cannot verify {image}: {digest:?} is not a valid digest (sha256/sha384/sha512, lowercase hex)"
    )]
    InvalidDigest {
        /// The image.
        image: String,
        /// The (shortened) digest.
        digest: String,
    },
    /// No connection could be made (DNS, refused, reset).
    #[error("registry {host} is unreachable: {reason}")]
    Unreachable {
        /// `host[:port]` contacted.
        host: String,
        /// The error chain.
        reason: String,
    },
    /// The TLS handshake failed (untrusted certificate, name mismatch …).
    #[error("TLS connection to {host} failed: {reason}")]
    Tls {
        /// `host[:port]` contacted.
        host: String,
        /// The error chain.
        reason: String,
    },
    /// The check did not finish in time.
    #[error("checking {image} against its registry timed out after {after:?}")]
    Timeout {
        /// The image.
        image: String,
        /// The budget.
        after: Duration,
    },
    /// An answer that is neither access nor denial (5xx, 429, redirects,
    /// unexpected 4xx of a token endpoint).
    #[error("{host} answered HTTP {status} to {what}{detail}")]
    UnexpectedStatus {
        /// `host[:port]` contacted.
        host: String,
        /// The HTTP status.
        status: u16,
        /// Which request (`the manifest HEAD`, `the token request`).
        what: &'static str,
        /// Registry text, prefixed with `: `, or empty.
        detail: String,
    },
    /// An answer that cannot be understood (bad challenge, bad token JSON,
    /// wrong `Docker-Content-Digest`, oversized body).
    #[error("{host} sent a malformed answer to {what}: {reason}")]
    Malformed {
        /// `host[:port]` contacted.
        host: String,
        /// Which request.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The registry wants something credlet does not speak (another auth
    /// scheme, a plain-HTTP token realm for an HTTPS registry …).
    #[error("cannot verify against {host}: {reason}")]
    Unsupported {
        /// `host[:port]` contacted.
        host: String,
        /// What is unsupported.
        reason: String,
    },
    /// Any other transport error.
    #[error("request to {host} failed: {reason}")]
    Transport {
        /// `host[:port]` contacted.
        host: String,
        /// The error chain.
        reason: String,
    },
}

/// Checks pull access of a credential to an image digest.
pub trait Verifier: Send + Sync + 'static {
    /// Whether `credential` (`None` = anonymous) may pull
    /// `image.registry()/image.repository()@digest`. The tag and digest of
    /// `image` are ignored; `digest` is the one checked.
    fn check<'a>(
        &'a self,
        image: &'a ImageRef,
        digest: &'a str,
        credential: Option<&'a Credential>,
    ) -> BoxFuture<'a, Result<Access, VerifyError>>;
}

/// Why a [`RegistryVerifier`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An extra root CA PEM holds no certificate or cannot be parsed.
    #[error("extra root CA #{index}: {reason}")]
    InvalidRootPem {
        /// Position in [`RegistryVerifierConfig::extra_root_pems`].
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// No trust anchors: system roots disabled or unreadable and no extra
    /// roots given.
    #[error("no trusted root certificates (system roots: {system_errors}; no extra roots)")]
    NoRoots {
        /// Why system roots could not be loaded, if they were asked for.
        system_errors: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Settings of a [`RegistryVerifier`].
#[derive(Debug, Clone)]
pub struct RegistryVerifierConfig {
    /// Extra trusted root CAs (PEM, one or more certificates each), e.g. a
    /// private registry's CA or a test registry's.
    pub extra_root_pems: Vec<String>,
    /// Trust the system's root store (`/etc/ssl/certs` …). Default `true`.
    pub use_system_roots: bool,
    /// Time budget of one check, all requests included. Default 10 s.
    pub timeout: Duration,
    /// Registries (`host[:port]` as in image references) reached over plain
    /// HTTP instead of HTTPS. A token realm may be plain HTTP only if its
    /// `host[:port]` is listed too.
    pub plain_http_registries: Vec<String>,
    /// Idle pooled connections kept per host. Default 4.
    pub max_idle_per_host: usize,
}

impl Default for RegistryVerifierConfig {
    fn default() -> Self {
        Self {
            extra_root_pems: Vec::new(),
            use_system_roots: true,
            timeout: DEFAULT_TIMEOUT,
            plain_http_registries: Vec::new(),
            max_idle_per_host: 4,
        }
    }
}

/// Counters of a [`RegistryVerifier`] since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifierStats {
    /// Checks started.
    pub checks: u64,
    /// Requests sent to registries (manifest HEADs).
    pub registry_requests: u64,
    /// Requests sent to token endpoints.
    pub token_requests: u64,
}

/// The outcome of one check with its cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The registry's verdict.
    pub access: Access,
    /// Manifest requests this check sent.
    pub registry_requests: u32,
    /// Token requests this check sent.
    pub token_requests: u32,
}

impl CheckReport {
    /// All HTTP requests this check sent.
    pub fn requests(&self) -> u32 {
        self.registry_requests + self.token_requests
    }
}

/// How a registry asked to be authenticated (no credential in here).
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthScheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Checks credentials against registries with manifest HEADs. One instance
/// serves any number of concurrent checks with any credentials.
pub struct RegistryVerifier {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    plain_http: HashSet<String>,
    challenges: Mutex<HashMap<String, AuthScheme>>,
    checks: AtomicU64,
    registry_requests: AtomicU64,
    token_requests: AtomicU64,
    user_agent: HeaderValue,
}

impl fmt::Debug for RegistryVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryVerifier")
            .field("timeout", &self.timeout)
            .field("plain_http", &self.plain_http)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RegistryVerifier {
    /// Builds a verifier: TLS with ring as the only crypto provider (set
    /// explicitly on this client, no process-wide default needed), system
    /// and extra roots, HTTP/1.1 with a small connection pool.
    pub fn new(config: RegistryVerifierConfig) -> Result<Self, ConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        let mut system_errors = String::from("not used");
        if config.use_system_roots {
            let loaded = rustls_native_certs::load_native_certs();
            system_errors = if loaded.errors.is_empty() {
                "none found".to_string()
            } else {
                loaded
                    .errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            // Unparsable system certificates are skipped, as every client does.
            let _ = roots.add_parsable_certificates(loaded.certs);
        }
        for (index, pem) in config.extra_root_pems.iter().enumerate() {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ConfigError::InvalidRootPem {
                    index,
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(ConfigError::InvalidRootPem {
                    index,
                    reason: "no CERTIFICATE block".to_string(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ConfigError::InvalidRootPem {
                    index,
                    reason: e.to_string(),
                })?;
            }
        }
        if roots.is_empty() {
            return Err(ConfigError::NoRoots { system_errors });
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(config.max_idle_per_host)
            .build(connector);
        let user_agent = HeaderValue::from_static(concat!("credlet/", env!("CARGO_PKG_VERSION")));
        Ok(Self {
            client,
            timeout: config.timeout,
            plain_http: config
                .plain_http_registries
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            challenges: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            registry_requests: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            user_agent,
        })
    }

    /// Counters since the verifier was built.
    pub fn stats(&self) -> VerifierStats {
        VerifierStats {
            checks: self.checks.load(Ordering::Relaxed),
            registry_requests: self.registry_requests.load(Ordering::Relaxed),
            token_requests: self.token_requests.load(Ordering::Relaxed),
        }
    }

    /// Forgets remembered challenges (the next check of each registry
    /// starts with an unauthenticated request again).
    pub fn forget_challenges(&self) {
        self.challenges_lock().clear();
    }

    /// Like [`Verifier::check`], with the number of requests made.
    pub async fn verify(
        &self,
        image: &ImageRef,
        digest: &str,
        credential: Option<&Credential>,
    ) -> Result<CheckReport, VerifyError> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        if !is_digest(digest) {
            let mut digest = digest.to_string();
            digest.truncate(140);
            return Err(VerifyError::InvalidDigest {
                image: image.name(),
                digest,
            });
        }
        let mut check = Check::new(self, image, digest, credential);
        let outcome = tokio::time::timeout(self.timeout, check.run()).await;
        let access = match outcome {
            Ok(result) => result?,
            Err(_) => {
                return Err(VerifyError::Timeout {
                    image: format!("{}@{digest}", image.name()),
                    after: self.timeout,
                });
            }
        };
        Ok(CheckReport {
            access,
            registry_requests: check.registry_requests,
            token_requests: check.token_requests,
        })
    }

    fn challenges_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AuthScheme>> {
        // The map holds plain data: a panic elsewhere cannot leave it
        // inconsistent, so a poisoned lock is still usable.
        self.challenges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached_challenge(&self, authority: &str) -> Option<AuthScheme> {
        self.challenges_lock().get(authority).cloned()
    }

    fn remember_challenge(&self, authority: &str, scheme: &AuthScheme) {
        let mut map = self.challenges_lock();
        if map.len() >= MAX_CACHED_CHALLENGES && !map.contains_key(authority) {
            map.clear();
        }
        map.insert(authority.to_string(), scheme.clone());
    }

    fn forget_challenge(&self, authority: &str) {
        self.challenges_lock().remove(authority);
    }

    fn is_plain_http(&self, authority: &str) -> bool {
        self.plain_http.contains(&authority.to_ascii_lowercase())
    }
}

impl Verifier for RegistryVerifier {
    fn check<'a>(
        &'a self,
        image: &'a ImageRef,
        digest: &'a str,
        credential: Option<&'a Credential>,
    ) -> BoxFuture<'a, Result<Access, VerifyError>> {
        Box::pin(async move {
            self.verify(image, digest, credential)
                .await
                .map(|report| report.access)
        })
    }
}

/// A response with what the check needs of it.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Zeroizing<Vec<u8>>,
}

/// Outcome of getting an `Authorization` value for a challenge.
enum Authorized {
    /// Send this `Authorization` header value.
    Header(Zeroizing<String>),
    /// The credential cannot satisfy the challenge: denied without asking
    /// the registry again.
    Denied(String),
}

/// State of one check.
struct Check<'a> {
    verifier: &'a RegistryVerifier,
    /// `host[:port]` requests go to (`registry-1.docker.io` for docker.io).
    authority: String,
    scheme: &'static str,
    /// `registry/repository`, for messages.
    name: String,
    repository: &'a str,
    digest: &'a str,
    credential: Option<&'a Credential>,
    registry_requests: u32,
    token_requests: u32,
}

impl<'a> Check<'a> {
    fn new(
        verifier: &'a RegistryVerifier,
        image: &'a ImageRef,
        digest: &'a str,
        credential: Option<&'a Credential>,
    ) -> Self {
        let authority = match image.registry() {
            "docker.io" => "registry-1.docker.io".to_string(),
            other => other.to_string(),
        };
        let scheme =
            if verifier.is_plain_http(image.registry()) || verifier.is_plain_http(&authority) {
                "http"
            } else {
                "https"
            };
        Self {
            verifier,
            authority,
            scheme,
            name: image.name(),
            repository: image.repository(),
            digest,
            credential,
            registry_requests: 0,
            token_requests: 0,
        }
    }

    /// Who is asking, for messages.
    fn who(&self) -> String {
        match self.credential {
            Some(c) => c.describe(),
            None => "an anonymous request (the pod has no pull credentials)".to_string(),
        }
    }

    /// Secrets that must never appear in quoted registry text.
    fn secrets(&self) -> Vec<&'a str> {
        match self.credential.map(Credential::secret) {
            Some(Secret::Password { password, .. }) => vec![password.as_str()],
            Some(Secret::IdentityToken { token, .. }) | Some(Secret::RegistryToken { token }) => {
                vec![token.as_str()]
            }
            None => Vec::new(),
        }
    }

    async fn run(&mut self) -> Result<Access, VerifyError> {
        let mut authorization: Option<Zeroizing<String>> = None;
        // The challenge `authorization` answers (None: anonymous or a
        // registry token sent as is).
        let mut answered: Option<AuthScheme> = None;
        let mut from_cache = false;
        match self.credential.map(Credential::secret) {
            Some(Secret::RegistryToken { token }) => {
                authorization = Some(Zeroizing::new(format!("Bearer {}", token.as_str())));
            }
            _ => {
                if let Some(cached) = self.verifier.cached_challenge(&self.authority) {
                    // Anonymous requests to a Basic registry go out bare.
                    if self.credential.is_some() || matches!(cached, AuthScheme::Bearer { .. }) {
                        match self.authorize(&cached).await {
                            Ok(Authorized::Header(h)) => {
                                authorization = Some(h);
                                answered = Some(cached);
                                from_cache = true;
                            }
                            Ok(Authorized::Denied(reason)) => {
                                return Ok(Access::Denied { reason });
                            }
                            // The remembered challenge no longer works:
                            // forget it and start over unauthenticated.
                            Err(_) => self.verifier.forget_challenge(&self.authority),
                        }
                    }
                }
            }
        }

        // At most: anonymous, then authenticated, then once more if the
        // registry changed its challenge in between.
        for attempt in 0..3 {
            let answer = self
                .head(authorization.as_deref().map(String::as_str))
                .await?;
            let status = answer.status;
            match status {
                StatusCode::OK => {
                    self.check_digest_header(&answer.headers)?;
                    return Ok(Access::Granted);
                }
                StatusCode::UNAUTHORIZED => {
                    let challenges = self.challenges(&answer.headers)?;
                    let scheme = self.pick(&challenges)?;
                    let registry_token = matches!(
                        self.credential.map(Credential::secret),
                        Some(Secret::RegistryToken { .. })
                    );
                    if registry_token || answered.as_ref() == Some(&scheme) || attempt == 2 {
                        let reason = self.denial_401(&challenges, &scheme, authorization.is_some());
                        return self.denied_unless_public(from_cache, &scheme, reason).await;
                    }
                    let authorized = self.authorize(&scheme).await?;
                    // Remembered only once it proved usable.
                    self.verifier.remember_challenge(&self.authority, &scheme);
                    match authorized {
                        Authorized::Header(h) => {
                            authorization = Some(h);
                            answered = Some(scheme);
                            from_cache = false;
                        }
                        Authorized::Denied(reason) => return Ok(Access::Denied { reason }),
                    }
                }
                StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
                    let reason = self.denial_other(status);
                    return match &answered {
                        Some(scheme) => self.denied_unless_public(from_cache, scheme, reason).await,
                        None => Ok(Access::Denied { reason }),
                    };
                }
                _ => return Err(self.unexpected(status, "the manifest HEAD", &answer)),
            }
        }
        // Unreachable in practice: attempt 2 always returns above.
        Err(VerifyError::Malformed {
            host: self.authority.clone(),
            what: "the manifest HEAD",
            reason: "authentication did not settle after 3 requests".to_string(),
        })
    }

    /// Credentials taken from a remembered Basic challenge were refused:
    /// containerd starts anonymously, so a public image would still pull.
    /// Ask once without credentials before denying. (Token registries
    /// refuse anonymous manifest requests, so there the answer stands.)
    async fn denied_unless_public(
        &mut self,
        from_cache: bool,
        scheme: &AuthScheme,
        reason: String,
    ) -> Result<Access, VerifyError> {
        if from_cache && *scheme == AuthScheme::Basic {
            let answer = self.head(None).await?;
            if answer.status == StatusCode::OK {
                self.check_digest_header(&answer.headers)?;
                return Ok(Access::Granted);
            }
        }
        Ok(Access::Denied { reason })
    }

    fn manifest_uri(&self) -> String {
        format!(
            "{}://{}/v2/{}/manifests/{}",
            self.scheme, self.authority, self.repository, self.digest
        )
    }

    async fn head(&mut self, authorization: Option<&str>) -> Result<Answer, VerifyError> {
        let mut builder = Request::builder()
            .method(Method::HEAD)
            .uri(self.manifest_uri())
            .header(ACCEPT, MANIFEST_ACCEPT)
            .header(USER_AGENT, self.verifier.user_agent.clone());
        if let Some(value) = authorization {
            builder = builder.header(AUTHORIZATION, sensitive(value, &self.authority)?);
        }
        let request =
            builder
                .body(Full::new(Bytes::new()))
                .map_err(|e| VerifyError::Transport {
                    host: self.authority.clone(),
                    reason: format!("building the manifest request: {e}"),
                })?;
        self.registry_requests += 1;
        self.verifier
            .registry_requests
            .fetch_add(1, Ordering::Relaxed);
        let authority = self.authority.clone();
        send(
            &self.verifier.client,
            request,
            &authority,
            "the manifest HEAD",
        )
        .await
    }

    fn check_digest_header(&self, headers: &HeaderMap) -> Result<(), VerifyError> {
        let Some(value) = headers.get("docker-content-digest") else {
            return Ok(());
        };
        match value.to_str() {
            Ok(d) if d.trim() == self.digest => Ok(()),
            _ => Err(VerifyError::Malformed {
                host: self.authority.clone(),
                what: "the manifest HEAD",
                reason: format!(
                    "Docker-Content-Digest {} does not match the requested {}",
                    quote(&String::from_utf8_lossy(value.as_bytes()), &[]),
                    self.digest
                ),
            }),
        }
    }

    fn challenges(&self, headers: &HeaderMap) -> Result<Vec<Challenge>, VerifyError> {
        let mut all = Vec::new();
        for value in headers.get_all(WWW_AUTHENTICATE) {
            let parsed = www_authenticate::parse_bytes(value.as_bytes()).map_err(|e| {
                VerifyError::Malformed {
                    host: self.authority.clone(),
                    what: "the manifest HEAD",
                    reason: e.to_string(),
                }
            })?;
            all.extend(parsed);
            if all.len() > www_authenticate::MAX_CHALLENGES {
                return Err(VerifyError::Malformed {
                    host: self.authority.clone(),
                    what: "the manifest HEAD",
                    reason: "too many WWW-Authenticate challenges".to_string(),
                });
            }
        }
        if all.is_empty() {
            return Err(VerifyError::Malformed {
                host: self.authority.clone(),
                what: "the manifest HEAD",
                reason: "401 without a WWW-Authenticate challenge".to_string(),
            });
        }
        Ok(all)
    }

    /// Prefers Bearer (with a realm), then Basic.
    fn pick(&self, challenges: &[Challenge]) -> Result<AuthScheme, VerifyError> {
        if let Some(c) = challenges.iter().find(|c| c.is_bearer()) {
            let realm =
                c.realm()
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| VerifyError::Malformed {
                        host: self.authority.clone(),
                        what: "the manifest HEAD",
                        reason: "Bearer challenge without a realm".to_string(),
                    })?;
            return Ok(AuthScheme::Bearer {
                realm: realm.to_string(),
                service: c.param("service").map(str::to_string),
            });
        }
        if challenges.iter().any(Challenge::is_basic) {
            return Ok(AuthScheme::Basic);
        }
        Err(VerifyError::Unsupported {
            host: self.authority.clone(),
            reason: format!(
                "the registry asks for {}; only Basic and Bearer are supported",
                www_authenticate::summarize(challenges, MAX_QUOTED)
            ),
        })
    }

    async fn authorize(&mut self, scheme: &AuthScheme) -> Result<Authorized, VerifyError> {
        match scheme {
            AuthScheme::Basic => Ok(match self.credential.map(Credential::secret) {
                Some(Secret::Password { username, password }) => {
                    let plain = Zeroizing::new(format!("{username}:{}", password.as_str()));
                    Authorized::Header(Zeroizing::new(format!(
                        "Basic {}",
                        STANDARD.encode(plain.as_bytes())
                    )))
                }
                Some(Secret::IdentityToken { .. }) => Authorized::Denied(format!(
                    "registry {} uses Basic authentication, which an identity token cannot answer; \
                     give the pod a username/password pull secret for {}",
                    self.authority, self.name
                )),
                Some(Secret::RegistryToken { .. }) | None => Authorized::Denied(format!(
                    "{} requires authentication (Basic) and the pod has no pull credentials for \
                     it: add an imagePullSecret for {}",
                    self.name, self.authority
                )),
            }),
            AuthScheme::Bearer { realm, service } => {
                self.bearer_token(realm, service.as_deref()).await
            }
        }
    }

    /// Gets a pull token for the repository from the token endpoint.
    async fn bearer_token(
        &mut self,
        realm: &str,
        service: Option<&str>,
    ) -> Result<Authorized, VerifyError> {
        let (realm_uri, realm_authority) = self.realm_uri(realm)?;
        let scope = format!("repository:{}:pull", self.repository);
        let mut params: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = service {
            params.push(("service", service));
        }
        params.push(("scope", &scope));

        let secret = self.credential.map(Credential::secret);
        let mut builder = Request::builder().header(USER_AGENT, self.verifier.user_agent.clone());
        let body;
        let is_post;
        match secret {
            Some(Secret::IdentityToken { token, .. }) => {
                // OAuth2 refresh-token grant (docker's identity token flow).
                let mut form = Zeroizing::new(String::new());
                for (k, v) in params
                    .iter()
                    .copied()
                    .chain([("grant_type", "refresh_token"), ("client_id", CLIENT_ID)])
                {
                    push_pair(&mut form, k, v);
                }
                push_pair(&mut form, "refresh_token", token.as_str());
                builder = builder
                    .method(Method::POST)
                    .uri(realm_uri.as_str())
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
                body = Full::new(Bytes::from(form.as_bytes().to_vec()));
                is_post = true;
            }
            other => {
                let mut query = String::new();
                for (k, v) in &params {
                    push_pair(&mut query, k, v);
                }
                let sep = if realm_uri.contains('?') { '&' } else { '?' };
                builder = builder
                    .method(Method::GET)
                    .uri(format!("{realm_uri}{sep}{query}"));
                if let Some(Secret::Password { username, password }) = other {
                    let plain = Zeroizing::new(format!("{username}:{}", password.as_str()));
                    let value =
                        Zeroizing::new(format!("Basic {}", STANDARD.encode(plain.as_bytes())));
                    builder = builder.header(AUTHORIZATION, sensitive(&value, &realm_authority)?);
                }
                body = Full::new(Bytes::new());
                is_post = false;
            }
        }
        let request = builder.body(body).map_err(|e| VerifyError::Transport {
            host: realm_authority.clone(),
            reason: format!("building the token request: {e}"),
        })?;
        self.token_requests += 1;
        self.verifier.token_requests.fetch_add(1, Ordering::Relaxed);
        let answer = send(
            &self.verifier.client,
            request,
            &realm_authority,
            "the token request",
        )
        .await?;
        let status = answer.status;
        let refused = status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN
            // OAuth2 reports a bad refresh token as 400 invalid_grant.
            || (is_post && status == StatusCode::BAD_REQUEST);
        if refused {
            let detail = error_text(&answer.body, &self.secrets());
            return Ok(Authorized::Denied(format!(
                "the token endpoint {realm_authority} of {} rejected {} (HTTP {}{}{})",
                self.authority,
                self.who(),
                status.as_u16(),
                status
                    .canonical_reason()
                    .map(|r| format!(" {r}"))
                    .unwrap_or_default(),
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                },
            )));
        }
        if status != StatusCode::OK {
            return Err(self.unexpected_at(&realm_authority, status, "the token request", &answer));
        }
        let token = parse_token(&answer.body).map_err(|reason| VerifyError::Malformed {
            host: realm_authority.clone(),
            what: "the token request",
            reason,
        })?;
        Ok(Authorized::Header(Zeroizing::new(format!(
            "Bearer {}",
            token.as_str()
        ))))
    }

    /// Validates the realm URL: absolute, HTTPS (HTTP only for a configured
    /// plain-HTTP host), no fragment. Returns it and its authority.
    fn realm_uri(&self, realm: &str) -> Result<(String, String), VerifyError> {
        let bad = |reason: &str| VerifyError::Unsupported {
            host: self.authority.clone(),
            reason: format!("token realm {}: {reason}", quote(realm, &[])),
        };
        if realm.contains('#') {
            return Err(bad("fragments are not allowed"));
        }
        let uri: Uri = realm.parse().map_err(|_| bad("not a valid URL"))?;
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| bad("not an absolute URL"))?;
        if authority.contains('@') {
            return Err(bad("user information in the URL is not allowed"));
        }
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if self.verifier.is_plain_http(&authority) => {}
            Some("http") => {
                return Err(bad(
                    "plain HTTP would expose the credentials (list the host in plain_http_registries to allow it)",
                ));
            }
            _ => return Err(bad("the scheme must be https")),
        }
        Ok((realm.to_string(), authority))
    }

    fn denial_401(
        &self,
        challenges: &[Challenge],
        scheme: &AuthScheme,
        authenticated: bool,
    ) -> String {
        let summary = www_authenticate::summarize(challenges, MAX_QUOTED);
        let summary = quote(&summary, &self.secrets());
        let error = challenges
            .iter()
            .find_map(|c| c.param("error"))
            .map(|e| quote(e, &[]));
        if let Some(c) = self.credential
            && c.kind() == crate::credential::CredentialKind::RegistryToken
        {
            return format!(
                "the registry token has no pull access to {}@{}: the registry answered 401{} \
                     (challenge: {summary})",
                self.name,
                self.digest,
                error.map(|e| format!(" {e}")).unwrap_or_default(),
            );
        }
        match (self.credential, scheme, authenticated) {
            (None, AuthScheme::Bearer { .. }, _) => format!(
                "{} cannot be pulled anonymously and the pod has no pull credentials for it \
                 (registry answered 401{}; challenge: {summary})",
                self.name,
                error.map(|e| format!(" {e}")).unwrap_or_default(),
            ),
            (None, AuthScheme::Basic, _) => format!(
                "{} requires authentication and the pod has no pull credentials for it \
                 (registry answered 401; challenge: {summary})",
                self.name
            ),
            (Some(_), AuthScheme::Bearer { .. }, _) => format!(
                "{} has no pull access to {}@{}: the registry answered 401{} to the token issued \
                 for scope repository:{}:pull (challenge: {summary})",
                self.who(),
                self.name,
                self.digest,
                error.map(|e| format!(" {e}")).unwrap_or_default(),
                self.repository,
            ),
            (Some(_), AuthScheme::Basic, _) => format!(
                "registry {} rejected the credentials of {} for {} (401 Unauthorized; challenge: {summary})",
                self.authority,
                self.who(),
                self.name
            ),
        }
    }

    fn denial_other(&self, status: StatusCode) -> String {
        match status {
            StatusCode::NOT_FOUND => format!(
                "{} has no manifest {} in {} visible to {} (HTTP 404 Not Found): the digest is \
                 unknown or these credentials cannot see the repository",
                self.authority,
                self.digest,
                self.name,
                self.who()
            ),
            _ => format!(
                "registry {} denied {} access to {}@{} (HTTP {} {})",
                self.authority,
                self.who(),
                self.name,
                self.digest,
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
            ),
        }
    }

    fn unexpected(&self, status: StatusCode, what: &'static str, answer: &Answer) -> VerifyError {
        self.unexpected_at(&self.authority, status, what, answer)
    }

    fn unexpected_at(
        &self,
        host: &str,
        status: StatusCode,
        what: &'static str,
        answer: &Answer,
    ) -> VerifyError {
        let mut detail = error_text(&answer.body, &self.secrets());
        if status.is_redirection()
            && let Some(location) = answer.headers.get(http::header::LOCATION)
        {
            detail = format!(
                "redirect to {} is not followed",
                quote(
                    &String::from_utf8_lossy(location.as_bytes()),
                    &self.secrets()
                )
            );
        }
        if status == StatusCode::TOO_MANY_REQUESTS && detail.is_empty() {
            detail = "rate limited".to_string();
        }
        VerifyError::UnexpectedStatus {
            host: host.to_string(),
            status: status.as_u16(),
            what,
            detail: if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            },
        }
    }
}

/// An `Authorization` value marked sensitive (hyper then keeps it out of
/// its debug output). The `HeaderValue` copy is not zeroized on drop: the
/// `http` crate offers no way to.
fn sensitive(value: &str, host: &str) -> Result<HeaderValue, VerifyError> {
    let mut header = HeaderValue::from_str(value).map_err(|_| VerifyError::Transport {
        host: host.to_string(),
        reason: "the credential cannot be sent in an HTTP header".to_string(),
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// Sends a request and reads the (bounded) body.
async fn send(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request: Request<Full<Bytes>>,
    host: &str,
    what: &'static str,
) -> Result<Answer, VerifyError> {
    let response = client
        .request(request)
        .await
        .map_err(|e| classify(&e, host))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| VerifyError::Malformed {
            host: host.to_string(),
            what,
            reason: format!("reading the body: {}", error_chain(&*e)),
        })?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: Zeroizing::new(body.to_vec()),
    })
}

/// Maps a client error to Unreachable / Tls / Transport by its cause.
fn classify(error: &hyper_util::client::legacy::Error, host: &str) -> VerifyError {
    let reason = error_chain(error);
    let tls = std::error::Error::source(error).is_some_and(|e| is_tls_error(e, 0));
    if tls {
        VerifyError::Tls {
            host: host.to_string(),
            reason,
        }
    } else if error.is_connect() {
        VerifyError::Unreachable {
            host: host.to_string(),
            reason,
        }
    } else {
        VerifyError::Transport {
            host: host.to_string(),
            reason,
        }
    }
}

/// Whether a rustls error is somewhere in the chain. `io::Error` hides its
/// payload from `source()` (it returns the payload's source), and
/// hyper-rustls wraps tokio-rustls' `io::Error` in another one, so look
/// inside each `io::Error` too.
fn is_tls_error(error: &(dyn std::error::Error + 'static), depth: usize) -> bool {
    if depth > 16 {
        return false;
    }
    if error.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        && is_tls_error(inner, depth + 1)
    {
        return true;
    }
    error.source().is_some_and(|e| is_tls_error(e, depth + 1))
}

/// `error: cause: cause …`, deduplicating repeated messages.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// Appends `k=v` form/query-encoded.
fn push_pair(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push('&');
    }
    percent_encode(out, key);
    out.push('=');
    percent_encode(out, value);
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// A token endpoint's JSON answer.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<Zeroizing<String>>,
    #[serde(default)]
    access_token: Option<Zeroizing<String>>,
}

/// Extracts `token` (or `access_token`) from a token answer.
fn parse_token(body: &[u8]) -> Result<Zeroizing<String>, String> {
    let answer: TokenAnswer = serde_json::from_slice(body)
        .map_err(|e| format!("not a token JSON object ({})", e.classify_name()))?;
    let token = answer
        .token
        .filter(|t| !t.is_empty())
        .or(answer.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| "no token or access_token in the answer".to_string())?;
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("token longer than {MAX_TOKEN_LEN} bytes"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("token holds characters not allowed in an HTTP header".to_string());
    }
    Ok(token)
}

/// A short name for a serde_json error class (its message could quote
/// the body, i.e. a token).
trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected field types",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// The human part of a registry or token-endpoint error body:
/// distribution's `{"errors":[{"code","message"}]}`, OAuth2's
/// `{"error","error_description"}`, Docker Hub's `{"details"}`, or the text.
fn error_text(body: &[u8], secrets: &[&str]) -> String {
    if body.is_empty() {
        return String::new();
    }
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => {
            let mut parts = Vec::new();
            if let Some(errors) = json.get("errors").and_then(|e| e.as_array()) {
                for e in errors.iter().take(4) {
                    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                    let message = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
                    parts.push(format!("{code} {message}").trim().to_string());
                }
            }
            for key in ["error", "error_description", "details", "message"] {
                if let Some(v) = json.get(key).and_then(|v| v.as_str()) {
                    parts.push(v.to_string());
                }
            }
            if parts.is_empty() {
                String::from_utf8_lossy(body).into_owned()
            } else {
                parts.join("; ")
            }
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    quote(text.trim(), secrets)
}

/// Registry-provided text made safe to quote: secrets redacted, control
/// characters escaped, at most [`MAX_QUOTED`] bytes.
fn quote(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_string();
    for secret in secrets {
        // Very short secrets would redact ordinary words; they are also
        // unlikely to be echoed meaningfully.
        if secret.len() >= 4 {
            text = text.replace(secret, "[redacted]");
        }
    }
    let mut out = String::with_capacity(text.len().min(MAX_QUOTED));
    for c in text.chars() {
        if out.len() >= MAX_QUOTED {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use http::Response;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use credlet_proto::cri::AuthConfig;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    /// One request the mock saw.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        authorization: Option<String>,
        accept: Option<String>,
        body: String,
    }

    type Handler = Arc<dyn Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync>;

    /// A plain-HTTP mock registry + token endpoint.
    struct Mock {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Mock {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Mock {
        async fn start(make: impl FnOnce(SocketAddr) -> Handler) -> Mock {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let handler = make(addr);
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let handler = handler.clone();
                    let log = log.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let handler = handler.clone();
                            let log = log.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let header = |name| {
                                    parts
                                        .headers
                                        .get(name)
                                        .map(|v: &HeaderValue| v.to_str().unwrap().to_string())
                                };
                                let seen = Seen {
                                    method: parts.method.clone(),
                                    path: parts.uri.to_string(),
                                    authorization: header(AUTHORIZATION),
                                    accept: header(ACCEPT),
                                    body: String::from_utf8_lossy(&body).into_owned(),
                                };
                                log.lock().unwrap().push(seen.clone());
                                Ok::<_, Infallible>(handler(&seen))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Mock { addr, seen, task }
        }

        fn host(&self) -> String {
            self.addr.to_string()
        }

        fn image(&self) -> ImageRef {
            ImageRef::parse(&format!("{}/team/app:v1", self.addr)).unwrap()
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        fn verifier(&self) -> RegistryVerifier {
            verifier_with(vec![self.host()], Duration::from_secs(5))
        }
    }

    fn verifier_with(plain: Vec<String>, timeout: Duration) -> RegistryVerifier {
        let ca = credlet_test_util::TestCa::new("credlet unit test CA").unwrap();
        RegistryVerifier::new(RegistryVerifierConfig {
            extra_root_pems: vec![ca.cert_pem().to_string()],
            use_system_roots: false,
            timeout,
            plain_http_registries: plain,
            ..RegistryVerifierConfig::default()
        })
        .unwrap()
    }

    fn respond(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
        let mut r = Response::builder().status(status);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(Full::new(Bytes::from(body.to_string()))).unwrap()
    }

    fn basic(user: &str, pass: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
    }

    fn cred(user: &str, pass: &str) -> Credential {
        Credential::basic(user, pass).unwrap()
    }

    fn denied(access: &Access) -> &str {
        match access {
            Access::Denied { reason } => reason,
            Access::Granted => panic!("expected a denial"),
        }
    }

    /// htpasswd-style registry: alice:pw may pull.
    fn basic_registry(_: SocketAddr) -> Handler {
        Arc::new(|s: &Seen| {
            if s.authorization.as_deref() == Some(basic("alice", "pw").as_str()) {
                respond(200, &[("docker-content-digest", D)], "")
            } else {
                respond(401, &[("www-authenticate", "Basic realm=\"mock\"")], "")
            }
        })
    }

    /// Token registry: alice:pw (or refresh token `good-refresh`) gets a
    /// token with access, bob:pw and anonymous get empty-access tokens.
    fn token_registry(addr: SocketAddr) -> Handler {
        Arc::new(move |s: &Seen| {
            if s.path.starts_with("/token") {
                if s.method == Method::POST {
                    return if s.body.contains("grant_type=refresh_token")
                        && s.body.contains("refresh_token=good-refresh")
                        && s.body.contains("scope=repository%3Ateam%2Fapp%3Apull")
                        && s.body.contains("service=mock-svc")
                    {
                        respond(200, &[], r#"{"access_token":"tok-alice"}"#)
                    } else {
                        respond(
                            400,
                            &[],
                            r#"{"error":"invalid_grant","error_description":"refresh token expired"}"#,
                        )
                    };
                }
                assert!(
                    s.path.contains("scope=repository%3Ateam%2Fapp%3Apull"),
                    "{}",
                    s.path
                );
                assert!(s.path.contains("service=mock-svc"), "{}", s.path);
                return match s.authorization.as_deref() {
                    None => respond(200, &[], r#"{"token":"tok-anon"}"#),
                    Some(a) if a == basic("alice", "pw") => {
                        respond(200, &[], r#"{"token":"tok-alice"}"#)
                    }
                    Some(a) if a == basic("bob", "pw") => {
                        respond(200, &[], r#"{"token":"tok-bob"}"#)
                    }
                    Some(_) => respond(
                        401,
                        &[],
                        r#"{"details":"incorrect username or password: wrong-secret"}"#,
                    ),
                };
            }
            let realm = format!("http://{addr}/token");
            match s.authorization.as_deref() {
                Some("Bearer tok-alice") => respond(200, &[("docker-content-digest", D)], ""),
                Some(_) => respond(
                    401,
                    &[(
                        "www-authenticate",
                        &format!(
                            r#"Bearer realm="{realm}",service="mock-svc",scope="repository:team/app:pull",error="insufficient_scope""#
                        ),
                    )],
                    "",
                ),
                None => respond(
                    401,
                    &[(
                        "www-authenticate",
                        &format!(
                            r#"Bearer realm="{realm}",service="mock-svc",scope="repository:team/app:pull""#
                        ),
                    )],
                    "",
                ),
            }
        })
    }

    #[tokio::test]
    async fn basic_flow_and_challenge_cache() {
        let mock = Mock::start(basic_registry).await;
        let v = mock.verifier();
        let image = mock.image();

        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted);
        assert_eq!((r.registry_requests, r.token_requests), (2, 0));
        let seen = mock.seen();
        assert_eq!(seen[0].method, Method::HEAD);
        assert_eq!(seen[0].path, format!("/v2/team/app/manifests/{D}"));
        assert_eq!(seen[0].authorization, None);
        let accept = seen[0].accept.clone().unwrap();
        for t in [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ] {
            assert!(accept.contains(t), "{accept}");
        }

        // The challenge is remembered: one request.
        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(
            (r.access.clone(), r.registry_requests),
            (Access::Granted, 1)
        );

        // Wrong password with the remembered challenge: refused, then one
        // anonymous probe (a public image would pull), still denied.
        let r = v
            .verify(&image, D, Some(&cred("alice", "nope")))
            .await
            .unwrap();
        let reason = denied(&r.access);
        assert!(
            reason.contains("rejected the credentials of user \"alice\""),
            "{reason}"
        );
        assert!(
            reason.contains("Basic realm=\\\"mock\\\"") || reason.contains("Basic realm=\"mock\""),
            "{reason}"
        );
        assert!(!reason.contains("nope"), "{reason}");
        assert_eq!(r.registry_requests, 2);

        // Without the cache: anonymous, then the wrong password.
        v.forget_challenges();
        let r = v
            .verify(&image, D, Some(&cred("alice", "nope")))
            .await
            .unwrap();
        assert!(denied(&r.access).contains("rejected"));
        assert_eq!(r.registry_requests, 2);

        // Anonymous: one request, denied with a hint.
        let r = v.verify(&image, D, None).await.unwrap();
        let reason = denied(&r.access);
        assert!(
            reason.contains("requires authentication (Basic) and the pod has no pull credentials"),
            "{reason}"
        );
        assert_eq!(r.registry_requests, 1);

        // An identity token cannot answer Basic.
        let id = Credential::from_auth_config(&AuthConfig {
            identity_token: "good-refresh".into(),
            ..AuthConfig::default()
        })
        .unwrap()
        .unwrap();
        let r = v.verify(&image, D, Some(&id)).await.unwrap();
        assert!(
            denied(&r.access).contains("identity token"),
            "{:?}",
            r.access
        );

        let stats = v.stats();
        assert_eq!(stats.checks, 6);
        assert_eq!(stats.registry_requests, 2 + 1 + 2 + 2 + 1);
        assert_eq!(stats.token_requests, 0);
        assert_eq!(mock.seen().len() as u64, stats.registry_requests);
    }

    #[tokio::test]
    async fn public_image_on_basic_registry_with_wrong_credentials() {
        // Anonymous pulls work; wrong credentials are refused.
        let mock = Mock::start(|_| {
            Arc::new(|s: &Seen| match s.authorization.as_deref() {
                None => respond(200, &[], ""),
                Some(_) => respond(401, &[("www-authenticate", "Basic realm=\"m\"")], ""),
            })
        })
        .await;
        let v = mock.verifier();
        v.remember_challenge(&mock.host(), &AuthScheme::Basic);
        let r = v
            .verify(&mock.image(), D, Some(&cred("x", "y")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted);
        assert_eq!(r.registry_requests, 2);
    }

    #[tokio::test]
    async fn token_flow() {
        let mock = Mock::start(token_registry).await;
        let v = mock.verifier();
        let image = mock.image();

        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted);
        assert_eq!((r.registry_requests, r.token_requests), (2, 1));
        // Remembered challenge: token + one HEAD.
        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(
            (r.access.clone(), r.registry_requests, r.token_requests),
            (Access::Granted, 1, 1)
        );

        // Valid user without a grant: token 200, manifest 401.
        let r = v.verify(&image, D, Some(&cred("bob", "pw"))).await.unwrap();
        let reason = denied(&r.access);
        assert!(
            reason.contains("user \"bob\" has no pull access"),
            "{reason}"
        );
        assert!(reason.contains("insufficient_scope"), "{reason}");
        assert_eq!((r.registry_requests, r.token_requests), (1, 1));

        // Wrong password: the token endpoint refuses; its text is quoted
        // with the secret redacted.
        let r = v
            .verify(&image, D, Some(&cred("alice", "wrong-secret")))
            .await
            .unwrap();
        let reason = denied(&r.access);
        assert!(reason.contains("token endpoint"), "{reason}");
        assert!(
            reason.contains("rejected user \"alice\" (HTTP 401 Unauthorized"),
            "{reason}"
        );
        assert!(
            reason.contains("incorrect username or password: [redacted]"),
            "{reason}"
        );
        assert!(!reason.contains("wrong-secret"), "{reason}");
        assert_eq!((r.registry_requests, r.token_requests), (0, 1));

        // Anonymous: anonymous token, manifest 401.
        let r = v.verify(&image, D, None).await.unwrap();
        let reason = denied(&r.access);
        assert!(reason.contains("cannot be pulled anonymously"), "{reason}");
        assert_eq!((r.registry_requests, r.token_requests), (1, 1));

        // Identity token: OAuth2 refresh-token grant.
        let id = |t: &str| {
            Credential::from_auth_config(&AuthConfig {
                identity_token: t.into(),
                ..AuthConfig::default()
            })
            .unwrap()
            .unwrap()
        };
        let r = v
            .verify(&image, D, Some(&id("good-refresh")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted);
        let posted = mock
            .seen()
            .into_iter()
            .rev()
            .find(|s| s.method == Method::POST)
            .unwrap();
        assert!(posted.body.contains("client_id=credlet"), "{}", posted.body);
        let r = v.verify(&image, D, Some(&id("bad-refresh"))).await.unwrap();
        let reason = denied(&r.access);
        assert!(
            reason.contains("HTTP 400") && reason.contains("invalid_grant"),
            "{reason}"
        );
        assert!(!reason.contains("bad-refresh"), "{reason}");

        // Registry token: sent as is.
        let rt = |t: &str| {
            Credential::from_auth_config(&AuthConfig {
                registry_token: t.into(),
                ..AuthConfig::default()
            })
            .unwrap()
            .unwrap()
        };
        let r = v.verify(&image, D, Some(&rt("tok-alice"))).await.unwrap();
        assert_eq!(
            (r.access.clone(), r.registry_requests, r.token_requests),
            (Access::Granted, 1, 0)
        );
        let r = v.verify(&image, D, Some(&rt("tok-other"))).await.unwrap();
        assert!(
            denied(&r.access).contains("the registry token has no pull access"),
            "{:?}",
            r.access
        );
        assert_eq!((r.registry_requests, r.token_requests), (1, 0));

        let stats = v.stats();
        let seen = mock.seen();
        assert_eq!(
            stats.registry_requests + stats.token_requests,
            seen.len() as u64
        );
        assert_eq!(
            stats.token_requests,
            seen.iter().filter(|s| s.path.starts_with("/token")).count() as u64
        );
    }

    #[tokio::test]
    async fn status_mapping() {
        let mock = Mock::start(|_| {
            Arc::new(|s: &Seen| {
                let repo = s.path.split('/').nth(2).unwrap_or("");
                match repo {
                    "notfound" => respond(404, &[], ""),
                    "forbidden" => respond(403, &[], ""),
                    "broken" => respond(500, &[], ""),
                    "limited" => respond(429, &[], ""),
                    "moved" => respond(307, &[("location", "https://elsewhere/x")], ""),
                    "mismatch" => respond(200, &[("docker-content-digest", "sha256:00")], ""),
                    "nochallenge" => respond(401, &[], ""),
                    "negotiate" => respond(401, &[("www-authenticate", "Negotiate")], ""),
                    "garbage" => respond(401, &[("www-authenticate", "Basic realm=\"x")], ""),
                    "plainrealm" => respond(
                        401,
                        &[(
                            "www-authenticate",
                            "Bearer realm=\"http://elsewhere:1/token\"",
                        )],
                        "",
                    ),
                    "norealm" => respond(401, &[("www-authenticate", "Bearer service=x")], ""),
                    _ => respond(200, &[], ""),
                }
            })
        })
        .await;
        let v = mock.verifier();
        let img = |repo: &str| ImageRef::parse(&format!("{}/{repo}", mock.host())).unwrap();
        let alice = cred("alice", "pw");
        let check = |repo: &'static str| {
            let v = &v;
            let alice = &alice;
            let image = img(repo);
            async move { v.verify(&image, D, Some(alice)).await }
        };

        let r = check("notfound").await.unwrap();
        assert!(
            denied(&r.access).contains("404 Not Found"),
            "{:?}",
            r.access
        );
        let r = check("forbidden").await.unwrap();
        assert!(
            denied(&r.access).contains("HTTP 403 Forbidden"),
            "{:?}",
            r.access
        );
        assert_eq!(check("ok").await.unwrap().access, Access::Granted);

        let e = check("broken").await.unwrap_err();
        assert!(
            matches!(e, VerifyError::UnexpectedStatus { status: 500, .. }),
            "{e}"
        );
        let e = check("limited").await.unwrap_err();
        assert!(
            e.to_string().contains("429") && e.to_string().contains("rate limited"),
            "{e}"
        );
        let e = check("moved").await.unwrap_err();
        assert!(
            e.to_string()
                .contains("redirect to https://elsewhere/x is not followed"),
            "{e}"
        );
        let e = check("mismatch").await.unwrap_err();
        assert!(
            matches!(e, VerifyError::Malformed { .. }) && e.to_string().contains("does not match"),
            "{e}"
        );
        let e = check("nochallenge").await.unwrap_err();
        assert!(e.to_string().contains("without a WWW-Authenticate"), "{e}");
        let e = check("negotiate").await.unwrap_err();
        assert!(
            matches!(e, VerifyError::Unsupported { .. }) && e.to_string().contains("Negotiate"),
            "{e}"
        );
        let e = check("garbage").await.unwrap_err();
        assert!(e.to_string().contains("unterminated"), "{e}");
        let e = check("plainrealm").await.unwrap_err();
        assert!(
            e.to_string()
                .contains("plain HTTP would expose the credentials"),
            "{e}"
        );
        let e = check("norealm").await.unwrap_err();
        assert!(e.to_string().contains("without a realm"), "{e}");

        // Nothing is sent for a malformed digest.
        let before = mock.seen().len();
        let e = v
            .verify(&img("ok"), "sha256:xyz", Some(&alice))
            .await
            .unwrap_err();
        assert!(matches!(e, VerifyError::InvalidDigest { .. }), "{e}");
        assert_eq!(mock.seen().len(), before);
        // The trait maps the report to Access.
        let access = Verifier::check(&v, &img("ok"), D, None).await.unwrap();
        assert_eq!(access, Access::Granted);
    }

    #[tokio::test]
    async fn timeout_and_unreachable() {
        // A server that accepts and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let v = verifier_with(vec![addr.to_string()], Duration::from_millis(300));
        let image = ImageRef::parse(&format!("{addr}/team/app")).unwrap();
        let e = v.verify(&image, D, None).await.unwrap_err();
        assert!(matches!(e, VerifyError::Timeout { .. }), "{e}");
        hold.abort();

        // Nothing listens: refused.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let v = verifier_with(vec![addr.to_string()], Duration::from_secs(5));
        let image = ImageRef::parse(&format!("{addr}/team/app")).unwrap();
        let e = v.verify(&image, D, None).await.unwrap_err();
        assert!(matches!(e, VerifyError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");

        // TLS to a plain-HTTP server fails as a TLS (or transport) error.
        let mock = Mock::start(basic_registry).await;
        let v = verifier_with(vec![], Duration::from_secs(5));
        let e = v.verify(&mock.image(), D, None).await.unwrap_err();
        assert!(
            matches!(
                e,
                VerifyError::Tls { .. }
                    | VerifyError::Transport { .. }
                    | VerifyError::Unreachable { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn config_errors() {
        let e = RegistryVerifier::new(RegistryVerifierConfig {
            use_system_roots: false,
            ..RegistryVerifierConfig::default()
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::NoRoots { .. }), "{e}");
        let e = RegistryVerifier::new(RegistryVerifierConfig {
            extra_root_pems: vec!["not a pem".into()],
            use_system_roots: false,
            ..RegistryVerifierConfig::default()
        })
        .unwrap_err();
        assert!(
            matches!(e, ConfigError::InvalidRootPem { index: 0, .. }),
            "{e}"
        );
        let v = verifier_with(vec!["A.example:80".into()], DEFAULT_TIMEOUT);
        assert!(v.is_plain_http("a.example:80"));
        assert!(format!("{v:?}").contains("RegistryVerifier"));
    }

    #[test]
    fn helpers() {
        let mut s = String::new();
        push_pair(&mut s, "scope", "repository:a/b:pull");
        push_pair(&mut s, "x y", "ü&=");
        assert_eq!(s, "scope=repository%3Aa%2Fb%3Apull&x%20y=%C3%BC%26%3D");

        assert_eq!(parse_token(br#"{"token":"abc"}"#).unwrap().as_str(), "abc");
        assert_eq!(
            parse_token(br#"{"token":"","access_token":"xyz"}"#)
                .unwrap()
                .as_str(),
            "xyz"
        );
        assert!(
            parse_token(br#"{"expires_in":3}"#)
                .unwrap_err()
                .contains("no token")
        );
        assert!(parse_token(br#"{"token":"a b"}"#).is_err());
        let e = parse_token(br#"{"token": "secret-tok"#).unwrap_err();
        assert!(!e.contains("secret-tok"), "{e}");

        assert_eq!(
            error_text(
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                &[]
            ),
            "UNAUTHORIZED authentication required"
        );
        assert_eq!(error_text(b"plain\ntext", &[]), "plain\\ntext");
        assert_eq!(error_text(b"", &[]), "");
        assert_eq!(error_text(b"echo hunter2", &["hunter2"]), "echo [redacted]");
        let long = "x".repeat(1000);
        assert!(quote(&long, &[]).len() <= MAX_QUOTED + 4);
    }
}
