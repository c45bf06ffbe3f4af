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
//!    even with empty access. 200 → [`Access::Granted`]; 401/403 after
//!    authenticating → [`Access::Denied`] with the registry's reason; 404
//!    → [`Access::NotFound`] (a denial too, for a credential check).
//!
//! The challenge (scheme, realm, service — never a credential or token) is
//! remembered per registry, so the next check with credentials
//! authenticates on its first request: Basic registries take 1 request per
//! check, token registries 2. Nothing credential-derived is cached across
//! checks; pooled connections carry no authentication state (HTTP/1.1,
//! `Authorization` per request).
//!
//! # Where requests go: as the runtime sends them
//!
//! A check asks what the pull it stands in for would have asked, so that a
//! node that pulls through a mirror or a proxy is not denied everything:
//!
//! - **Endpoints** come from containerd's registry configuration directory
//!   ([`RegistryVerifierConfig::registry_config_dirs`], read on every check
//!   by [`crate::hosts`]): the `hosts.toml` mirrors in file order, then the
//!   `server`, each with its own `ca`, `client` certificates, `skip_verify`,
//!   `header`s, `http://` scheme and `override_path`. Only hosts with the
//!   `resolve` capability are asked: containerd resolves a tag only through
//!   them, and a pull-only mirror (often a public cache) answering a digest
//!   says nothing about the pod's credentials. Mirrors get containerd's
//!   `?ns=<registry>` parameter.
//! - **Order and fallback** (containerd's resolver): the first endpoint
//!   that grants decides. Any other answer — unreachable, 5xx, and also
//!   401/403/404 — moves on to the next endpoint, because containerd moves
//!   on for every one of them and would pull from a later host that
//!   serves the image. With no grant, a denial from any endpoint that
//!   answered is the verdict ([`Access::Denied`] before
//!   [`Access::NotFound`], as containerd ranks its errors); only when no
//!   endpoint answered at all is the check an error.
//! - **Credentials**: the pod's credentials for registry `H` go to each of
//!   `H`'s endpoints, mirrors included. containerd's CRI plugin does the
//!   same: its authorizer asks the pull's credential callback for every
//!   host it talks to, and `ParseAuth` hands the kubelet's `AuthConfig` to
//!   any host when its `server_address` is empty — which it is for every
//!   credential the kubelet sends (image pull secrets and credential
//!   providers never set it).
//! - **Proxies**: `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY` as Go reads them
//!   ([`crate::egress`]; the runtime's environment should be the agent's).
//! - **Redirects** of manifest requests are followed (at most
//!   [`MAX_REDIRECTS`]); `Authorization` and `header`s from `hosts.toml`
//!   are only ever sent to the endpoint's own scheme, host and port. A
//!   redirect target that asks for authentication is a denial (containerd
//!   would send the credentials there).
//! - `405` to a manifest `HEAD` is asked again with `GET` (the body is not
//!   read), as containerd does for registries without `HEAD`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, PROXY_AUTHORIZATION, USER_AGENT,
    WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use zeroize::Zeroizing;

use crate::credential::{Credential, Secret};
use crate::egress::{EgressConnector, ProxyEnv};
use crate::hosts::{Capabilities, Endpoint, HostsDirs, HostsError, Scheme, TlsFiles};
use crate::proxy::BoxFuture;
use crate::reference::{ImageRef, is_digest};
use crate::www_authenticate::{self, Challenge};

/// The HTTP client every request goes through.
type HttpClient = Client<HttpsConnector<EgressConnector>, Full<Bytes>>;

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
pub const MAX_TOKEN_LEN: usize = 32 * 1024;
/// Longest registry-provided text quoted in a reason (before the `…` that
/// marks a cut).
pub const MAX_QUOTED: usize = 300;
/// Most registries whose challenge is remembered.
const MAX_CACHED_CHALLENGES: usize = 1024;
/// `client_id` sent with OAuth2 refresh-token grants.
const CLIENT_ID: &str = "credlet";
/// Most redirects followed for one manifest request (containerd allows
/// 10; registries redirect manifests once, to storage, if at all).
pub const MAX_REDIRECTS: usize = 5;
/// Most clients with per-host TLS settings kept.
const MAX_CACHED_CLIENTS: usize = 64;

/// Whether a credential may pull the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The registry answered the manifest request with 200.
    Granted,
    /// The registry (or its token endpoint) said no: 401/403 on the
    /// manifest with these credentials, or credentials rejected.
    Denied {
        /// What the registry said, for a person to act on; never contains
        /// the credential.
        reason: String,
    },
    /// The registry let the request in (after authenticating, if it asked)
    /// and has no manifest with this digest in the repository: 404. No
    /// access proven; but the repository answered these credentials (a
    /// manifest deleted after its tag moved on, or a registry that hides a
    /// repository these credentials may not see).
    NotFound {
        /// What the registry said; never contains the credential.
        reason: String,
    },
}

impl Access {
    /// Why access is not proven (`None`: granted).
    pub fn denial(&self) -> Option<&str> {
        match self {
            Self::Granted => None,
            Self::Denied { reason } | Self::NotFound { reason } => Some(reason),
        }
    }
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
    /// The runtime's registry configuration for the registry cannot be
    /// used: a `hosts.toml` that does not parse, a `ca` or `client` file
    /// that cannot be read, no host that may resolve.
    #[error("registry configuration of {registry}: {reason}")]
    HostConfig {
        /// The registry (`host[:port]` of the image, or of the host whose
        /// settings failed).
        registry: String,
        /// What is wrong.
        reason: String,
    },
    /// A redirect that cannot be followed (too many, not http(s)).
    #[error("{host} redirected the manifest request: {reason}")]
    Redirect {
        /// `host[:port]` that redirected.
        host: String,
        /// What is wrong.
        reason: String,
    },
    /// Several endpoints were tried and none could be asked.
    #[error("no endpoint of {registry} could be asked about {image}: {detail}")]
    Endpoints {
        /// The registry of the image.
        registry: String,
        /// The image.
        image: String,
        /// Each endpoint with its error.
        detail: String,
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
    /// A registry configuration directory cannot be read.
    #[error("registry configuration: {0}")]
    Hosts(#[from] HostsError),
    /// A host's TLS files in the registry configuration cannot be used.
    #[error("registry configuration {dir}: {reason}")]
    HostTls {
        /// The host directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
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
    /// The container runtime's registry configuration directories
    /// (containerd's `config_path`, e.g. `/etc/containerd/certs.d`): mirrors,
    /// per-host TLS and plain-HTTP hosts from `hosts.toml` (see
    /// [`crate::hosts`]). Empty: every registry is asked directly.
    pub registry_config_dirs: Vec<PathBuf>,
    /// The proxies requests go through ([`ProxyEnv::from_env`] for the
    /// agent's environment). Default: none.
    pub proxy: ProxyEnv,
}

impl Default for RegistryVerifierConfig {
    fn default() -> Self {
        Self {
            extra_root_pems: Vec::new(),
            use_system_roots: true,
            timeout: DEFAULT_TIMEOUT,
            plain_http_registries: Vec::new(),
            max_idle_per_host: 4,
            registry_config_dirs: Vec::new(),
            proxy: ProxyEnv::none(),
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
    /// The endpoint whose answer decided (`mirror https://m:5000`,
    /// `server https://r.example`); `None` when none answered.
    pub answered_by: Option<String>,
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
    /// The client of endpoints without TLS settings of their own.
    client: HttpClient,
    /// System roots and [`RegistryVerifierConfig::extra_root_pems`].
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<CryptoProvider>,
    proxy: Arc<ProxyEnv>,
    hosts: HostsDirs,
    /// Clients of endpoints with their own TLS settings or dial timeout,
    /// keyed by a digest of those settings and the files' contents (a
    /// changed CA file gets a new client).
    tls_clients: Mutex<HashMap<[u8; 32], HttpClient>>,
    max_idle_per_host: usize,
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
            .field("hosts", &self.hosts)
            .field("proxy", &self.proxy)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RegistryVerifier {
    /// Builds a verifier: TLS with ring as the only crypto provider (set
    /// explicitly on this client, no process-wide default needed), system
    /// and extra roots, HTTP/1.1 with a small connection pool. Every host
    /// directory of [`RegistryVerifierConfig::registry_config_dirs`] is read
    /// once here, so that a broken one fails the start rather than every
    /// check (it is read again on every check, as containerd does).
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let proxy = Arc::new(config.proxy);
        let hosts = HostsDirs::new(config.registry_config_dirs);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(Arc::clone(&roots))
            .with_no_client_auth();
        let client = build_client(
            tls,
            Arc::clone(&proxy),
            config.timeout,
            config.max_idle_per_host,
        );
        let user_agent = HeaderValue::from_static(concat!("credlet/", env!("CARGO_PKG_VERSION")));
        let verifier = Self {
            client,
            roots,
            provider,
            proxy,
            hosts,
            tls_clients: Mutex::new(HashMap::new()),
            max_idle_per_host: config.max_idle_per_host,
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
        };
        check_registry_config(verifier.hosts.roots())?;
        Ok(verifier)
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
        let deadline = tokio::time::Instant::now() + self.timeout;
        let endpoints = self.endpoints(image)?;
        let mut tried = Vec::with_capacity(endpoints.len());
        let (mut registry_requests, mut token_requests) = (0, 0);
        for endpoint in &endpoints {
            let client = match self.client_for(endpoint) {
                Ok(client) => client,
                Err(error) => {
                    tried.push(Tried {
                        endpoint: endpoint.describe(),
                        outcome: Err(error),
                    });
                    continue;
                }
            };
            let mut check = Check::new(self, endpoint, client, image, digest, credential);
            let outcome = match tokio::time::timeout_at(deadline, check.run()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(VerifyError::Timeout {
                    image: format!("{}@{digest}", image.name()),
                    after: self.timeout,
                }),
            };
            registry_requests += check.registry_requests;
            token_requests += check.token_requests;
            // A grant decides; after a timeout no budget is left.
            let last = matches!(
                outcome,
                Ok(Access::Granted) | Err(VerifyError::Timeout { .. })
            );
            tried.push(Tried {
                endpoint: endpoint.describe(),
                outcome,
            });
            if last {
                break;
            }
        }
        let (outcome, answered_by) = combine(image.registry(), &image.name(), tried);
        Ok(CheckReport {
            access: outcome?,
            registry_requests,
            token_requests,
            answered_by,
        })
    }

    /// The endpoints a check of `image` asks, in order: the runtime's host
    /// configuration for its registry, only hosts that may resolve.
    fn endpoints(&self, image: &ImageRef) -> Result<Vec<Endpoint>, VerifyError> {
        let registry = image.registry();
        let config_error = |reason: String| VerifyError::HostConfig {
            registry: registry.to_string(),
            reason,
        };
        let entries = if self.hosts.is_empty() {
            None
        } else {
            // A few stat/read calls on small local files, like containerd's
            // on every pull: cheap next to the network round trips.
            self.hosts
                .load(registry)
                .map_err(|e| config_error(e.to_string()))?
        };
        let default_scheme = if self.is_plain_http(registry)
            || (registry == "docker.io" && self.is_plain_http("registry-1.docker.io"))
        {
            Scheme::Http
        } else {
            Scheme::Https
        };
        let all = crate::hosts::endpoints(registry, entries, default_scheme);
        let hosts: Vec<String> = all.iter().map(Endpoint::describe).collect();
        let usable: Vec<Endpoint> = all
            .into_iter()
            .filter(|e| e.capabilities.has(Capabilities::RESOLVE))
            .collect();
        if usable.is_empty() {
            return Err(config_error(format!(
                "none of its hosts ({}) has the \"resolve\" capability, so none may say what an \
                 image is; nothing to ask",
                hosts.join(", ")
            )));
        }
        Ok(usable)
    }

    /// The client for an endpoint: the shared one, or one with the
    /// endpoint's own TLS settings and dial timeout.
    fn client_for(&self, endpoint: &Endpoint) -> Result<HttpClient, VerifyError> {
        if !endpoint.tls.is_set() && endpoint.dial_timeout.is_none() {
            return Ok(self.client.clone());
        }
        let config_error = |reason: String| VerifyError::HostConfig {
            registry: endpoint.authority.clone(),
            reason,
        };
        let material =
            TlsMaterial::load(&endpoint.tls, endpoint.dial_timeout).map_err(config_error)?;
        if let Some(client) = lock(&self.tls_clients).get(&material.fingerprint) {
            return Ok(client.clone());
        }
        let tls = self.tls_config(&material).map_err(config_error)?;
        let client = build_client(
            tls,
            Arc::clone(&self.proxy),
            endpoint.dial_timeout.unwrap_or(self.timeout),
            self.max_idle_per_host,
        );
        let mut clients = lock(&self.tls_clients);
        if clients.len() >= MAX_CACHED_CLIENTS {
            clients.clear();
        }
        clients.insert(material.fingerprint, client.clone());
        Ok(client)
    }

    fn tls_config(&self, material: &TlsMaterial) -> Result<rustls::ClientConfig, String> {
        tls_config(&self.provider, &self.roots, material)
    }

    fn challenges_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AuthScheme>> {
        lock(&self.challenges)
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

    /// Sends a request and reads the (bounded) body; a plain-HTTP request
    /// through a forwarding proxy carries the proxy's credentials. The body
    /// of a successful `GET` is not read (a manifest; only its status
    /// matters).
    async fn send(
        &self,
        client: &HttpClient,
        mut request: Request<Full<Bytes>>,
        host: &str,
        what: &'static str,
    ) -> Result<Answer, SendError> {
        let uri = request.uri().clone();
        if uri.scheme_str() == Some("http")
            && let Some(target) = uri.host()
            && let Some(proxy) = self
                .proxy
                .proxy_for("http", target, uri.port_u16().unwrap_or(80))
            && let Some(value) = proxy.authorization()
            && let Ok(mut value) = HeaderValue::from_str(value)
        {
            value.set_sensitive(true);
            request.headers_mut().insert(PROXY_AUTHORIZATION, value);
        }
        let is_get = request.method() == Method::GET;
        let response = client.request(request).await.map_err(|e| SendError {
            not_tls: answered_in_plain_http(&e),
            connect: e.is_connect(),
            error: classify(&e, host),
        })?;
        let (parts, body) = response.into_parts();
        let body = if is_get && parts.status.is_success() && what == MANIFEST_REQUEST {
            Bytes::new()
        } else {
            Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    SendError::from(VerifyError::Malformed {
                        host: host.to_string(),
                        what,
                        reason: format!("reading the body: {}", error_chain(&*e)),
                    })
                })?
                .to_bytes()
        };
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: Zeroizing::new(body.to_vec()),
            elsewhere: None,
        })
    }
}

/// Locks a mutex over plain data: a panic elsewhere cannot leave it
/// inconsistent, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads every host directory below `dirs` (containerd's `config_path`)
/// and every file their `hosts.toml`s name, as a check would: for
/// validating the configuration at start. Returns how many host
/// directories there are.
pub fn check_registry_config(dirs: &[PathBuf]) -> Result<usize, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore::empty();
    let all = HostsDirs::new(dirs.to_vec()).load_all()?;
    for (dir, entries) in &all {
        for entry in entries.iter().filter(|e| e.tls.is_set()) {
            let host_tls = |reason| ConfigError::HostTls {
                dir: dir.clone(),
                reason,
            };
            let material = TlsMaterial::load(&entry.tls, entry.dial_timeout).map_err(host_tls)?;
            tls_config(&provider, &roots, &material).map_err(host_tls)?;
        }
    }
    Ok(all.len())
}

/// The rustls configuration of a host's TLS settings: `roots` plus its
/// `ca` (containerd adds them to the system pool), its client
/// certificates, or no verification at all with `skip_verify`.
fn tls_config(
    provider: &Arc<CryptoProvider>,
    roots: &rustls::RootCertStore,
    material: &TlsMaterial,
) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if material.skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipVerify(Arc::clone(provider))))
    } else {
        let mut roots = roots.clone();
        for cert in &material.roots {
            roots
                .add(cert.clone())
                .map_err(|e| format!("CA certificate: {e}"))?;
        }
        builder.with_root_certificates(roots)
    };
    if material.clients.is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let mut keys = Vec::with_capacity(material.clients.len());
    for (chain, key) in &material.clients {
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| format!("client key: {e}"))?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        certified
            .keys_match()
            .map_err(|e| format!("client certificate and key: {e}"))?;
        keys.push(Arc::new(certified));
    }
    Ok(builder.with_client_cert_resolver(Arc::new(ClientCerts(keys))))
}

/// A client: TLS (HTTP/1.1) over [`EgressConnector`].
fn build_client(
    tls: rustls::ClientConfig,
    proxy: Arc<ProxyEnv>,
    connect_timeout: Duration,
    max_idle_per_host: usize,
) -> HttpClient {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(EgressConnector::new(tcp, proxy));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

/// A host's TLS files, read and parsed.
struct TlsMaterial {
    roots: Vec<CertificateDer<'static>>,
    clients: Vec<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    skip_verify: bool,
    /// SHA-256 over everything that shapes the client built from this.
    fingerprint: [u8; 32],
}

impl TlsMaterial {
    /// Reads the files a host names (containerd reads them per pull too).
    fn load(files: &TlsFiles, dial_timeout: Option<Duration>) -> Result<Self, String> {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let skip_verify = files.skip_verify == Some(true);
        digest.update(&[u8::from(skip_verify)]);
        digest.update(
            &dial_timeout
                .map_or(u128::MAX, |d| d.as_nanos())
                .to_be_bytes(),
        );
        let mut read = |path: &PathBuf| -> Result<Zeroizing<Vec<u8>>, String> {
            let bytes = Zeroizing::new(
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            );
            digest.update(&(bytes.len() as u64).to_be_bytes());
            digest.update(&bytes);
            Ok(bytes)
        };
        let mut roots = Vec::new();
        for path in files.ca.iter().flatten() {
            let pem = read(path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("CA file {} holds no CERTIFICATE", path.display()));
            }
            roots.extend(certs);
        }
        let mut clients = Vec::new();
        for (cert_path, key_path) in &files.client {
            let cert_pem = read(cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate {}: {e}", cert_path.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "client certificate file {} holds no CERTIFICATE",
                    cert_path.display()
                ));
            }
            let (key_pem, key_file) = match key_path {
                Some(path) => (read(path)?, path),
                None => (cert_pem.clone(), cert_path),
            };
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("client key {}: {e}", key_file.display()))?;
            clients.push((chain, key));
        }
        Ok(Self {
            roots,
            clients,
            skip_verify,
            fingerprint: digest
                .finish()
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes"),
        })
    }
}

/// `skip_verify = true`: any server certificate is accepted, as the
/// operator asked for that host (handshake signatures are still checked).
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A host's client certificates: like Go's TLS client, the first whose key
/// can sign with a scheme the server accepts, else the first.
#[derive(Debug)]
struct ClientCerts(Vec<Arc<CertifiedKey>>);

impl rustls::client::ResolvesClientCert for ClientCerts {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0
            .iter()
            .find(|k| k.key.choose_scheme(sigschemes).is_some())
            .or_else(|| self.0.first())
            .cloned()
    }

    fn has_certs(&self) -> bool {
        !self.0.is_empty()
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

/// What asking one endpoint gave.
struct Tried {
    /// [`Endpoint::describe`].
    endpoint: String,
    outcome: Result<Access, VerifyError>,
}

/// Longest summary of another endpoint's outcome in a combined reason.
const MAX_OTHER: usize = 200;

/// The verdict over the endpoints asked, in order, and the endpoint it
/// comes from. One endpoint: its outcome as it is. Several: the first
/// grant; else the first denial, else the first "not found" (containerd
/// ranks a registry's refusal above a missing manifest, and both above
/// errors), naming what the other endpoints said; else, when none
/// answered, an error listing each.
fn combine(
    registry: &str,
    image: &str,
    mut tried: Vec<Tried>,
) -> (Result<Access, VerifyError>, Option<String>) {
    if tried.len() <= 1 {
        return match tried.pop() {
            Some(Tried { endpoint, outcome }) => {
                let by = outcome.is_ok().then_some(endpoint);
                (outcome, by)
            }
            None => (
                Err(VerifyError::HostConfig {
                    registry: registry.to_string(),
                    reason: "no endpoint to ask".to_string(),
                }),
                None,
            ),
        };
    }
    let position = |want: fn(&Access) -> bool| {
        tried
            .iter()
            .position(|t| t.outcome.as_ref().is_ok_and(want))
    };
    if let Some(i) = position(|a| *a == Access::Granted) {
        return (Ok(Access::Granted), Some(tried.swap_remove(i).endpoint));
    }
    let decided = position(|a| matches!(a, Access::Denied { .. }))
        .or_else(|| position(|a| matches!(a, Access::NotFound { .. })));
    let summary = |t: &Tried| {
        let text = match &t.outcome {
            Ok(access) => access.denial().unwrap_or("granted").to_string(),
            Err(e) => e.to_string(),
        };
        let mut text = format!("{}: {text}", t.endpoint);
        if text.len() > MAX_OTHER {
            let mut end = MAX_OTHER;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        text
    };
    match decided {
        Some(i) => {
            let others: Vec<String> = tried
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, t)| summary(t))
                .collect();
            let chosen = tried.swap_remove(i);
            let note = format!("[{}; also asked: {}]", chosen.endpoint, others.join("; "));
            let access = match chosen.outcome {
                Ok(Access::Denied { reason }) => Access::Denied {
                    reason: format!("{reason} {note}"),
                },
                Ok(Access::NotFound { reason }) => Access::NotFound {
                    reason: format!("{reason} {note}"),
                },
                _ => unreachable!("the chosen outcome is a denial"),
            };
            (Ok(access), Some(chosen.endpoint))
        }
        None => (
            Err(VerifyError::Endpoints {
                registry: registry.to_string(),
                image: image.to_string(),
                detail: tried.iter().map(summary).collect::<Vec<_>>().join("; "),
            }),
            None,
        ),
    }
}

/// A response with what the check needs of it.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Zeroizing<Vec<u8>>,
    /// `scheme://host:port` of the server that answered, when a redirect
    /// led away from the endpoint.
    elsewhere: Option<String>,
}

/// The `what` of manifest requests in messages.
const MANIFEST_REQUEST: &str = "the manifest HEAD";

/// A request that failed, with what the HTTP fallback needs to know.
struct SendError {
    error: VerifyError,
    /// The server answered the TLS handshake in plain HTTP.
    not_tls: bool,
    /// No connection could be made.
    connect: bool,
}

impl From<VerifyError> for SendError {
    fn from(error: VerifyError) -> Self {
        Self {
            error,
            not_tls: false,
            connect: false,
        }
    }
}

impl From<SendError> for VerifyError {
    fn from(e: SendError) -> Self {
        e.error
    }
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
    endpoint: &'a Endpoint,
    client: HttpClient,
    /// `host[:port]` requests go to (`registry-1.docker.io` for docker.io,
    /// or a mirror).
    authority: String,
    /// The endpoint's scheme, until an HTTP fallback.
    scheme: Scheme,
    /// `HEAD`, or `GET` once the endpoint answered `HEAD` with 405.
    method: Method,
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
        endpoint: &'a Endpoint,
        client: HttpClient,
        image: &'a ImageRef,
        digest: &'a str,
        credential: Option<&'a Credential>,
    ) -> Self {
        Self {
            verifier,
            endpoint,
            client,
            authority: endpoint.authority.clone(),
            scheme: endpoint.scheme,
            method: Method::HEAD,
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
                StatusCode::UNAUTHORIZED if answer.elsewhere.is_some() => {
                    return Ok(Access::Denied {
                        reason: format!(
                            "{} redirected the manifest request for {}@{} to {}, which asks for \
                             authentication; credentials are only ever sent to {} itself",
                            self.authority,
                            self.name,
                            self.digest,
                            answer.elsewhere.as_deref().unwrap_or("another host"),
                            self.authority,
                        ),
                    });
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
                    let access = match &answered {
                        Some(scheme) => {
                            self.denied_unless_public(from_cache, scheme, reason)
                                .await?
                        }
                        None => Access::Denied { reason },
                    };
                    return Ok(match access {
                        Access::Denied { reason } if status == StatusCode::NOT_FOUND => {
                            Access::NotFound { reason }
                        }
                        access => access,
                    });
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
        let mut uri = format!(
            "{}://{}{}/{}/manifests/{}",
            self.scheme.as_str(),
            self.authority,
            self.endpoint.path,
            self.repository,
            self.digest
        );
        if let Some(ns) = &self.endpoint.namespace {
            uri.push_str("?ns=");
            percent_encode(&mut uri, ns);
        }
        uri
    }

    /// The manifest request, as containerd makes it: redirects followed,
    /// `GET` after a 405 to `HEAD`, plain HTTP after an HTTPS attempt that
    /// the endpoint answered in plain HTTP (see [`Endpoint::http_fallback`]).
    async fn head(&mut self, authorization: Option<&str>) -> Result<Answer, VerifyError> {
        loop {
            match self.follow(authorization).await {
                Err(e)
                    if self.endpoint.http_fallback
                        && self.scheme == Scheme::Https
                        && (e.not_tls || (e.connect && !has_port(&self.authority))) =>
                {
                    self.scheme = Scheme::Http;
                }
                Ok(answer)
                    if answer.status == StatusCode::METHOD_NOT_ALLOWED
                        && self.method == Method::HEAD =>
                {
                    self.method = Method::GET;
                }
                other => return other.map_err(VerifyError::from),
            }
        }
    }

    /// Sends the manifest request and follows redirects. `Authorization`
    /// and the endpoint's headers go only to the endpoint's own origin.
    async fn follow(&mut self, authorization: Option<&str>) -> Result<Answer, SendError> {
        let mut uri = self.manifest_uri();
        let home = origin(&uri);
        let mut hops = 0;
        loop {
            let here = origin(&uri);
            let at_home = here.is_some() && here == home;
            let mut answer = self
                .send_manifest(&uri, authorization.filter(|_| at_home), at_home)
                .await?;
            if !at_home {
                answer.elsewhere =
                    here.map(|(scheme, host, port)| format!("{scheme}://{host}:{port}"));
            }
            if !matches!(answer.status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok(answer);
            }
            let Some(location) = answer.headers.get(LOCATION) else {
                return Ok(answer);
            };
            let from = authority_of(&uri);
            if hops == MAX_REDIRECTS {
                return Err(VerifyError::Redirect {
                    host: from,
                    reason: format!("more than {MAX_REDIRECTS} redirects"),
                }
                .into());
            }
            let location = String::from_utf8_lossy(location.as_bytes()).into_owned();
            uri = resolve_location(&uri, &location).map_err(|reason| VerifyError::Redirect {
                host: from.clone(),
                reason: format!("to {}: {reason}", quote(&location, &self.secrets())),
            })?;
            hops += 1;
        }
    }

    async fn send_manifest(
        &mut self,
        uri: &str,
        authorization: Option<&str>,
        with_headers: bool,
    ) -> Result<Answer, SendError> {
        let host = authority_of(uri);
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .header(ACCEPT, MANIFEST_ACCEPT)
            .header(USER_AGENT, self.verifier.user_agent.clone());
        if with_headers {
            // Validated when the hosts.toml was parsed.
            for (name, value) in &self.endpoint.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        let mut request =
            builder
                .body(Full::new(Bytes::new()))
                .map_err(|e| VerifyError::Transport {
                    host: host.clone(),
                    reason: format!("building the manifest request: {e}"),
                })?;
        if let Some(value) = authorization {
            // Replaces a static `Authorization` of the hosts.toml, as
            // containerd's authorizer does once it has credentials.
            request
                .headers_mut()
                .insert(AUTHORIZATION, sensitive(value, &self.authority)?);
        }
        self.registry_requests += 1;
        self.verifier
            .registry_requests
            .fetch_add(1, Ordering::Relaxed);
        self.verifier
            .send(&self.client, request, &host, MANIFEST_REQUEST)
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
        if origin(&realm_uri) == origin(&self.manifest_uri()) {
            for (name, value) in &self.endpoint.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        let request = builder.body(body).map_err(|e| VerifyError::Transport {
            host: realm_authority.clone(),
            reason: format!("building the token request: {e}"),
        })?;
        self.token_requests += 1;
        self.verifier.token_requests.fetch_add(1, Ordering::Relaxed);
        let answer = self
            .verifier
            .send(&self.client, request, &realm_authority, "the token request")
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
            Some("http")
                if self.verifier.is_plain_http(&authority)
                    || (self.scheme == Scheme::Http
                        && authority.eq_ignore_ascii_case(&self.authority)) => {}
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
        let host = answer.elsewhere.as_deref().unwrap_or(&self.authority);
        self.unexpected_at(host, status, what, answer)
    }

    fn unexpected_at(
        &self,
        host: &str,
        status: StatusCode,
        what: &'static str,
        answer: &Answer,
    ) -> VerifyError {
        let mut detail = error_text(&answer.body, &self.secrets());
        if status.is_redirection() && !answer.headers.contains_key(LOCATION) {
            detail = "a redirect without a Location header".to_string();
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

/// Whether `authority` names a port (Go's `SplitHostPort` finds one).
fn has_port(authority: &str) -> bool {
    authority
        .parse::<http::uri::Authority>()
        .is_ok_and(|a| a.port_u16().is_some())
}

/// `host[:port]` of a URL, for messages.
fn authority_of(uri: &str) -> String {
    uri.parse::<Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default()
}

/// A URL's origin: scheme, host (lower case) and port (with the scheme's
/// default). `Authorization` never crosses origins.
fn origin(uri: &str) -> Option<(String, String, u16)> {
    let uri: Uri = uri.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(match scheme.as_str() {
        "https" => 443,
        _ => 80,
    });
    Some((scheme, host, port))
}

/// Where a redirect's `Location` leads from `base`: absolute `http(s)`
/// URLs, scheme-relative `//host/path`, absolute paths and relative paths
/// (dot segments resolved); the fragment dropped. User information in the
/// URL is refused (it would be a credential of the redirect's choosing).
fn resolve_location(base: &str, location: &str) -> Result<String, String> {
    let location = location.split('#').next().unwrap_or("").trim();
    if location.is_empty() {
        return Err("an empty Location".to_string());
    }
    let base_uri: Uri = base.parse().map_err(|_| "a bad base URL".to_string())?;
    let scheme = base_uri.scheme_str().unwrap_or("https");
    let authority = base_uri.authority().map_or("", |a| a.as_str());
    let lower = location.to_ascii_lowercase();
    let absolute = if lower.starts_with("http://") || lower.starts_with("https://") {
        location.to_string()
    } else if location.starts_with("//") {
        format!("{scheme}:{location}")
    } else if let Some((s, _)) = location.split_once(':')
        && !s.contains(['/', '?'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return Err(format!("the scheme {s:?} is not http or https"));
    } else {
        let (path, query) = match location.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (location, None),
        };
        let joined = if path.starts_with('/') {
            path.to_string()
        } else {
            let base_path = base_uri.path();
            let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{path}")
        };
        let mut out = format!("{scheme}://{authority}{}", remove_dot_segments(&joined));
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    };
    let uri: Uri = absolute
        .parse()
        .map_err(|_| "not a valid URL".to_string())?;
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => {
            Err("user information in the URL is not allowed".to_string())
        }
        Some(a) if !a.host().is_empty() => Ok(absolute),
        _ => Err("no host".to_string()),
    }
}

/// RFC 3986 section 5.2.4 for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Whether the server answered a TLS handshake in plain HTTP (rustls sees
/// a record of no TLS content type).
fn answered_in_plain_http(error: &hyper_util::client::legacy::Error) -> bool {
    fn walk(error: &(dyn std::error::Error + 'static), depth: usize) -> bool {
        if depth > 16 {
            return false;
        }
        if let Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) =
            error.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && walk(inner, depth + 1)
        {
            return true;
        }
        error.source().is_some_and(|e| walk(e, depth + 1))
    }
    std::error::Error::source(error).is_some_and(|e| walk(e, 0))
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

/// Extracts `token` (or `access_token`) from a token endpoint's 200
/// answer: at most [`MAX_TOKEN_LEN`] bytes, all of them usable in a header.
/// Errors never quote the answer (it may hold a token).
///
/// Public for the `registry_token` fuzz target; it is the parser the
/// verifier uses on every token answer.
pub fn parse_token(body: &[u8]) -> Result<Zeroizing<String>, String> {
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
/// `{"error","error_description"}`, Docker Hub's `{"details"}`, or the text;
/// secrets redacted, control characters escaped, at most [`MAX_QUOTED`]
/// bytes (and a `…`).
///
/// Public for the `registry_token` fuzz target; it is what the verifier
/// reads from every refusal and unexpected answer.
pub fn error_text(body: &[u8], secrets: &[&str]) -> String {
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
        headers: HeaderMap,
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
                                    headers: parts.headers.clone(),
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
        access.denial().expect("expected a denial")
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
                    "moved" => respond(307, &[("location", &format!("/v2/ok/manifests/{D}"))], ""),
                    "nolocation" => respond(307, &[], ""),
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
            matches!(&r.access, Access::NotFound { reason } if reason.contains("404 Not Found")),
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
        // A redirect on the same host is followed (with the credentials).
        let r = check("moved").await.unwrap();
        assert_eq!((r.access, r.registry_requests), (Access::Granted, 2));
        let e = check("nolocation").await.unwrap_err();
        assert!(
            e.to_string().contains("307") && e.to_string().contains("without a Location"),
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

    fn grant(reason: &str) -> Result<Access, VerifyError> {
        match reason {
            "granted" => Ok(Access::Granted),
            r if r.starts_with("404") => Ok(Access::NotFound { reason: r.into() }),
            r if r.starts_with("down") => Err(VerifyError::Unreachable {
                host: "h".into(),
                reason: r.into(),
            }),
            r => Ok(Access::Denied { reason: r.into() }),
        }
    }

    #[test]
    fn combining_endpoints() {
        // (outcomes per endpoint, verdict: "granted", "denied:<reason
        // prefix>", "notfound:<prefix>", "error:<text>"; the deciding
        // endpoint)
        let cases: &[(&[&str], &str, Option<&str>)] = &[
            (&["granted"], "granted", Some("e0")),
            (&["no"], "denied:no", Some("e0")),
            // One endpoint: its error unchanged.
            (&["down x"], "error:registry h is unreachable: down x", None),
            // The first grant decides, wherever it is.
            (&["down", "no", "granted"], "granted", Some("e2")),
            (&["404", "granted"], "granted", Some("e1")),
            // A denial outranks a missing manifest and errors.
            (
                &["404 a", "no", "down"],
                "denied:no [e1; also asked: e0: 404 a; e2: ",
                Some("e1"),
            ),
            (
                &["down", "404 b"],
                "notfound:404 b [e1; also asked: e0: registry h",
                Some("e1"),
            ),
            (
                &["no", "nope"],
                "denied:no [e0; also asked: e1: nope]",
                Some("e0"),
            ),
            // Nothing answered: every error listed.
            (
                &["down 1", "down 2"],
                "error:no endpoint of r.example could be asked about r.example/app: e0: registry h \
                 is unreachable: down 1; e1: registry h is unreachable: down 2",
                None,
            ),
        ];
        for (outcomes, want, by) in cases {
            let tried = outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| Tried {
                    endpoint: format!("e{i}"),
                    outcome: grant(o),
                })
                .collect();
            let (outcome, answered_by) = combine("r.example", "r.example/app", tried);
            let got = match &outcome {
                Ok(Access::Granted) => "granted".to_string(),
                Ok(Access::Denied { reason }) => format!("denied:{reason}"),
                Ok(Access::NotFound { reason }) => format!("notfound:{reason}"),
                Err(e) => format!("error:{e}"),
            };
            assert!(got.starts_with(want), "{outcomes:?}: {got:?} vs {want:?}");
            assert_eq!(answered_by.as_deref(), *by, "{outcomes:?}");
        }
        let (outcome, by) = combine("r", "r/a", Vec::new());
        assert!(matches!(outcome, Err(VerifyError::HostConfig { .. })));
        assert_eq!(by, None);
        // Long reasons of other endpoints are cut.
        let long = "x".repeat(1000);
        let (outcome, _) = combine(
            "r",
            "r/a",
            vec![
                Tried {
                    endpoint: "e0".into(),
                    outcome: grant(&long),
                },
                Tried {
                    endpoint: "e1".into(),
                    outcome: grant("no"),
                },
            ],
        );
        let reason = outcome.unwrap().denial().unwrap().to_string();
        assert!(reason.len() < 1000 + MAX_OTHER + 50, "{}", reason.len());
    }

    #[test]
    fn redirect_locations() {
        let base = "https://r.example:5000/v2/a/manifests/sha256:1?ns=x";
        for (location, want) in [
            (
                "https://cdn.example/blob?sig=1",
                Ok("https://cdn.example/blob?sig=1"),
            ),
            ("HTTP://cdn.example/b", Ok("HTTP://cdn.example/b")),
            ("//cdn.example/b", Ok("https://cdn.example/b")),
            (
                "/v2/b/manifests/x",
                Ok("https://r.example:5000/v2/b/manifests/x"),
            ),
            ("other", Ok("https://r.example:5000/v2/a/manifests/other")),
            (
                "../../c/manifests/y?q=1",
                Ok("https://r.example:5000/v2/c/manifests/y?q=1"),
            ),
            ("/a/./b/../c#frag", Ok("https://r.example:5000/a/c")),
            ("ftp://x/y", Err("not http or https")),
            ("javascript:alert(1)", Err("not http or https")),
            ("https://user:pw@cdn.example/b", Err("user information")),
            ("", Err("empty")),
            ("https:///nohost", Err("not a valid URL")),
        ] {
            let got = resolve_location(base, location);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{location}"),
                (Err(e), Err(want)) => assert!(e.contains(want), "{location}: {e}"),
                (got, want) => panic!("{location}: {got:?} vs {want:?}"),
            }
        }
        assert_eq!(
            origin("https://R.example/x"),
            Some(("https".into(), "r.example".into(), 443))
        );
        assert_eq!(
            origin("http://r.example:80/x"),
            origin("http://r.example/y")
        );
        assert_ne!(origin("http://r.example/"), origin("https://r.example/"));
        assert!(has_port("h:1") && !has_port("h") && has_port("[::1]:5"));
    }

    #[tokio::test]
    async fn redirects() {
        // `other` records what reaches it: 200 for /blob, 401 for /auth.
        let other = Mock::start(|_| {
            Arc::new(|s: &Seen| {
                if s.path.starts_with("/auth") {
                    respond(401, &[("www-authenticate", "Basic realm=\"other\"")], "")
                } else {
                    respond(200, &[("docker-content-digest", D)], "")
                }
            })
        })
        .await;
        let elsewhere = other.host();
        let home = Mock::start(move |addr| {
            let inner = basic_registry(addr);
            Arc::new(move |s: &Seen| {
                if s.authorization.as_deref() != Some(basic("alice", "pw").as_str()) {
                    return inner(s);
                }
                let repo = s.path.split('/').nth(2).unwrap_or("");
                match repo {
                    "same" => respond(
                        302,
                        &[("location", &format!("/v2/final/manifests/{D}"))],
                        "",
                    ),
                    "away" => respond(
                        307,
                        &[("location", &format!("http://{elsewhere}/blob"))],
                        "",
                    ),
                    "away401" => respond(
                        307,
                        &[("location", &format!("http://{elsewhere}/auth"))],
                        "",
                    ),
                    "loop" => respond(302, &[("location", s.path.as_str())], ""),
                    "ftp" => respond(302, &[("location", "ftp://x/y")], ""),
                    _ => inner(s),
                }
            })
        })
        .await;
        let v = home.verifier();
        let alice = cred("alice", "pw");
        let img = |repo: &str| ImageRef::parse(&format!("{}/{repo}", home.host())).unwrap();

        // Same origin: followed with the credentials.
        let r = v.verify(&img("same"), D, Some(&alice)).await.unwrap();
        assert_eq!(r.access, Access::Granted, "{r:?}");
        let last = home.seen().pop().unwrap();
        assert_eq!(last.path, format!("/v2/final/manifests/{D}"));
        assert_eq!(last.authorization, Some(basic("alice", "pw")));

        // Another origin: followed without them.
        let r = v.verify(&img("away"), D, Some(&alice)).await.unwrap();
        assert_eq!(r.access, Access::Granted, "{r:?}");
        let seen = other.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].authorization, None);
        assert_eq!(seen[0].method, Method::HEAD);

        // Another origin that wants credentials: denied, none sent.
        let r = v.verify(&img("away401"), D, Some(&alice)).await.unwrap();
        let reason = denied(&r.access);
        assert!(
            reason.contains("credentials are only ever sent to"),
            "{reason}"
        );
        assert!(other.seen().iter().all(|s| s.authorization.is_none()));

        let e = v.verify(&img("loop"), D, Some(&alice)).await.unwrap_err();
        assert!(
            matches!(&e, VerifyError::Redirect { .. }) && e.to_string().contains("more than 5"),
            "{e}"
        );
        let e = v.verify(&img("ftp"), D, Some(&alice)).await.unwrap_err();
        assert!(e.to_string().contains("not http or https"), "{e}");
    }

    #[tokio::test]
    async fn head_refused_is_asked_with_get() {
        let mock = Mock::start(|_| {
            Arc::new(|s: &Seen| {
                if s.method == Method::HEAD {
                    respond(405, &[], "")
                } else {
                    respond(
                        200,
                        &[("docker-content-digest", D)],
                        "{\"big\":\"manifest\"}",
                    )
                }
            })
        })
        .await;
        let r = mock
            .verifier()
            .verify(&mock.image(), D, None)
            .await
            .unwrap();
        assert_eq!((r.access, r.registry_requests), (Access::Granted, 2));
        let seen = mock.seen();
        assert_eq!(
            (seen[0].method.clone(), seen[1].method.clone()),
            (Method::HEAD, Method::GET)
        );
    }

    /// A verifier reading `dir` as the runtime's registry configuration.
    fn verifier_with_hosts(dir: &std::path::Path) -> RegistryVerifier {
        let ca = credlet_test_util::TestCa::new("credlet unit test CA").unwrap();
        RegistryVerifier::new(RegistryVerifierConfig {
            extra_root_pems: vec![ca.cert_pem().to_string()],
            use_system_roots: false,
            timeout: Duration::from_secs(5),
            registry_config_dirs: vec![dir.to_path_buf()],
            ..RegistryVerifierConfig::default()
        })
        .unwrap()
    }

    fn write_hosts(root: &std::path::Path, registry: &str, text: &str) {
        let dir = root.join(registry);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), text).unwrap();
    }

    fn closed_port() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn mirrors_from_hosts_toml() {
        // Names that never resolve: every request goes to a configured host.
        const REGISTRY: &str = "registry.invalid:5000";
        let mirror = Mock::start(basic_registry).await;
        let pull_only = Mock::start(|_| Arc::new(|_: &Seen| respond(200, &[], ""))).await;
        let api_root = Mock::start(|_| Arc::new(|_: &Seen| respond(404, &[], ""))).await;
        // The server lets anyone pull `public`, nothing else.
        let server = Mock::start(|_| {
            Arc::new(|s: &Seen| {
                if s.path.contains("/public/") {
                    respond(200, &[], "")
                } else {
                    respond(404, &[], "")
                }
            })
        })
        .await;
        let root = tempfile::tempdir().unwrap();
        write_hosts(
            root.path(),
            "registry.invalid_5000_",
            &format!(
                r#"server = "http://{server}"

[host."http://{down}"]
  capabilities = ["pull", "resolve"]
[host."http://{pull_only}"]
  capabilities = ["pull"]
[host."http://{api_root}/custom/api"]
  override_path = true
[host."http://{mirror}"]
  capabilities = ["pull", "resolve"]
  [host."http://{mirror}".header]
    x-mirror-token = "m"
"#,
                server = server.host(),
                down = closed_port(),
                pull_only = pull_only.host(),
                api_root = api_root.host(),
                mirror = mirror.host(),
            ),
        );
        let v = verifier_with_hosts(root.path());
        let image = ImageRef::parse(&format!("{REGISTRY}/team/app:v1")).unwrap();

        // The first mirror is down, the pull-only one is never asked, the
        // next answers 404 at its own API root, the last grants.
        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted, "{r:?}");
        assert_eq!(
            r.answered_by.as_deref(),
            Some(format!("mirror http://{}", mirror.host()).as_str())
        );
        assert!(pull_only.seen().is_empty());
        assert!(server.seen().is_empty());
        let seen = api_root.seen();
        assert_eq!(
            seen[0].path,
            format!("/custom/api/team/app/manifests/{D}?ns=registry.invalid%3A5000")
        );
        let seen = mirror.seen();
        assert_eq!(
            seen[0].path,
            format!("/v2/team/app/manifests/{D}?ns=registry.invalid%3A5000")
        );
        assert!(
            seen.iter()
                .all(|s| s.headers.get("x-mirror-token").is_some())
        );

        // Wrong password: the mirror refuses, the server has no such
        // manifest: the refusal is the verdict, naming both.
        let r = v
            .verify(&image, D, Some(&cred("alice", "nope")))
            .await
            .unwrap();
        let reason = denied(&r.access);
        assert!(reason.contains("rejected the credentials"), "{reason}");
        assert!(reason.contains("also asked: mirror http://"), "{reason}");
        assert!(matches!(r.access, Access::Denied { .. }));
        // The server is asked without ns (it is the registry's own server
        // entry, but on another host: containerd adds ns there too).
        assert!(
            server.seen()[0]
                .path
                .ends_with("?ns=registry.invalid%3A5000")
        );

        // A later endpoint grants what an earlier one refused.
        let public = ImageRef::parse(&format!("{REGISTRY}/public/app")).unwrap();
        let r = v.verify(&public, D, None).await.unwrap();
        assert_eq!(r.access, Access::Granted);
        assert_eq!(
            r.answered_by.as_deref(),
            Some(format!("server http://{}", server.host()).as_str())
        );

        // Changes apply to the next check: nothing can be asked any more.
        write_hosts(
            root.path(),
            "registry.invalid_5000_",
            &format!(
                "server = \"http://{}\"\n[host.\"http://{}\"]\n",
                closed_port(),
                closed_port()
            ),
        );
        let e = v.verify(&image, D, None).await.unwrap_err();
        assert!(
            matches!(&e, VerifyError::Endpoints { .. })
                && e.to_string().contains("mirror http://")
                && e.to_string().contains("server http://"),
            "{e}"
        );
        // Only pull hosts: nothing may resolve.
        write_hosts(
            root.path(),
            "registry.invalid_5000_",
            "server = \"http://127.0.0.1:1\"\ncapabilities = [\"pull\"]\n",
        );
        let e = v.verify(&image, D, None).await.unwrap_err();
        assert!(e.to_string().contains("\"resolve\" capability"), "{e}");
        // A file broken after start: the check fails, closed.
        write_hosts(root.path(), "registry.invalid_5000_", "server = ");
        let e = v.verify(&image, D, None).await.unwrap_err();
        assert!(
            matches!(&e, VerifyError::HostConfig { .. })
                && e.to_string().contains("not valid TOML"),
            "{e}"
        );
        // ... and at start, the verifier is not built.
        let err = RegistryVerifier::new(RegistryVerifierConfig {
            registry_config_dirs: vec![root.path().to_path_buf()],
            ..RegistryVerifierConfig::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Hosts(_)), "{err}");
        // A CA file that is not there fails the start too.
        write_hosts(
            root.path(),
            "registry.invalid_5000_",
            "server = \"https://r\"\nca = \"missing.pem\"\n",
        );
        let err = RegistryVerifier::new(RegistryVerifierConfig {
            registry_config_dirs: vec![root.path().to_path_buf()],
            ..RegistryVerifierConfig::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::HostTls { .. }) && err.to_string().contains("missing.pem"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn http_host_with_tls_settings_tries_https_first() {
        // containerd's NewHTTPFallback: an http:// host with skip_verify is
        // asked over HTTPS, and over plain HTTP when it answers in HTTP.
        let mock = Mock::start(basic_registry).await;
        let root = tempfile::tempdir().unwrap();
        write_hosts(
            root.path(),
            "registry.invalid",
            &format!(
                "[host.\"http://{}\"]\n  skip_verify = true\n  dial_timeout = \"2s\"\n",
                mock.host()
            ),
        );
        let v = verifier_with_hosts(root.path());
        let image = ImageRef::parse("registry.invalid/team/app").unwrap();
        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted, "{r:?}");
        // The client with the host's settings is built once.
        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted);
        assert_eq!(lock(&v.tls_clients).len(), 1);
    }

    #[tokio::test]
    async fn plain_http_through_a_forwarding_proxy() {
        // The "proxy" is a mock registry: it gets absolute-form requests.
        let proxy = Mock::start(basic_registry).await;
        let env = ProxyEnv::from_lookup(|name| {
            (name == "HTTP_PROXY").then(|| format!("http://pu:pp@{}", proxy.host()))
        })
        .unwrap();
        let ca = credlet_test_util::TestCa::new("credlet unit test CA").unwrap();
        let v = RegistryVerifier::new(RegistryVerifierConfig {
            extra_root_pems: vec![ca.cert_pem().to_string()],
            use_system_roots: false,
            plain_http_registries: vec!["registry.invalid:5000".into()],
            proxy: env,
            ..RegistryVerifierConfig::default()
        })
        .unwrap();
        let image = ImageRef::parse("registry.invalid:5000/team/app").unwrap();
        let r = v
            .verify(&image, D, Some(&cred("alice", "pw")))
            .await
            .unwrap();
        assert_eq!(r.access, Access::Granted, "{r:?}");
        let seen = proxy.seen();
        assert_eq!(
            seen[0].path,
            format!("http://registry.invalid:5000/v2/team/app/manifests/{D}")
        );
        let proxy_auth = format!("Basic {}", STANDARD.encode("pu:pp"));
        assert!(seen.iter().all(|s| {
            s.headers
                .get(PROXY_AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                == Some(proxy_auth.as_str())
        }));
    }
}
