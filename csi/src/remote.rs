//! The remote CA client: [`RemoteIssuer`] asks credlet's CA service
//! (`credlet ca`, proto `credlet.ca.v1.CertificateAuthority`) for pod
//! certificates over mutual TLS.
//!
//! - One long-lived HTTP/2 connection per CA endpoint (TLS 1.3, ring),
//!   opened lazily and reused by every call; a deadline on every call.
//! - The agent's own client certificate comes from `IssueAgentCertificate`,
//!   proven by the agent pod's projected service account token (re-read from
//!   its file on every use: the kubelet rotates it). Its key lives in memory
//!   only. [`RemoteIssuer::run_agent_certificate`] obtains it and renews it
//!   at 50-70 % of its life; every new certificate gets a new connection.
//!   Until there is one, the issuer is not ready.
//! - [`RemoteIssuer::run_trust_bundle_watch`] follows `WatchTrustBundle` and
//!   writes every change into the published volumes without re-issuing.
//! - The CA is whoever presents a certificate that chains to the trust roots,
//!   matches the host name AND carries the CA's reserved SPIFFE ID
//!   `spiffe://<trust-domain>/credlet/ca` ([`check_ca_identity`]). The roots
//!   also sign every pod's certificate, and a pod may hold a DNS or IP SAN
//!   by which the CA is reached: chain and host name alone would let that
//!   pod pose as the CA and receive the agent's token. Roots learned from
//!   the CA are kept for the next start only with an HMAC under the node's
//!   key ([`NodeKey`]); a saved bundle without a valid one is ignored.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credlet_ca::{KeyType, PrivateKey};
use credlet_proto::ca::certificate_authority_client::CertificateAuthorityClient;
use credlet_proto::ca::{
    IssueAgentCertificateRequest, IssuePodCertificateRequest, IssuedCertificate,
    WatchTrustBundleRequest,
};
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};
use zeroize::{Zeroize, Zeroizing};

use crate::attributes::RenewBefore;
use crate::error::Error as CsiError;
use crate::issuer::{BoxFuture, IssueRequest, Issued, Issuer, IssuerError};
use crate::metrics::{CaClientMetrics, CaRpc, code_label};
use crate::node_key::{NodeKey, Purpose};
use crate::schedule::{backoff, renewal_time, until};
use crate::volumes::VolumeManager;

mod coalesce;

/// Default deadline of one CA call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default path of the agent's projected service account token.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/credlet/token";

/// Settings of the remote CA client.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `https://host:port` of the CA service.
    pub url: String,
    /// PEM roots that sign the CA service's serving certificate.
    pub trust_pem: String,
    /// The agent's projected service account token (audience: the CA's);
    /// read again on every use.
    pub token_file: PathBuf,
    /// This node's name, sent with the agent certificate request.
    pub node_name: String,
    /// The trust domain of issued SPIFFE IDs.
    pub trust_domain: String,
    /// Deadline of every unary call (and of opening the bundle stream).
    pub timeout: Duration,
    /// First retry delay of the agent certificate and the bundle watch.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
    /// The agent's state directory: the last trust bundle from the CA is
    /// kept there (public roots only, with an HMAC under the node's key),
    /// so that after a CA rollover a restarted agent still trusts the CA's
    /// new serving certificate. `None`: not kept.
    pub state_dir: Option<PathBuf>,
}

impl RemoteConfig {
    /// Defaults for a CA URL, its trust roots and a node name.
    pub fn new(url: impl Into<String>, trust_pem: impl Into<String>, node_name: &str) -> Self {
        Self {
            url: url.into(),
            trust_pem: trust_pem.into(),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            node_name: node_name.to_owned(),
            trust_domain: "cluster.local".into(),
            timeout: DEFAULT_TIMEOUT,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(60),
            state_dir: None,
        }
    }
}

/// Why the remote CA client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The CA URL is not an `https://host:port` URL.
    #[error("CA URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA trust bundle has no usable certificate.
    #[error("CA trust bundle: {reason}")]
    Trust {
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the TLS settings.
    #[error("TLS settings for the CA client: {source}")]
    Tls {
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The node key in the state directory is not usable.
    #[error("the agent's state directory: {source}")]
    State {
        /// What went wrong.
        #[source]
        source: CsiError,
    },
}

/// File name of the saved trust bundle in the state directory.
pub const SAVED_BUNDLE_FILE: &str = "ca-trust-bundle.pem";

/// Why a server's certificate is not the CA's, although it chains to the
/// trust roots and matches the host name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaIdentityError {
    /// It names the CA of another trust domain: a configuration mismatch.
    #[error(
        "the server's certificate is the CA's of trust domain {found:?} ({uri}), but this agent has --trust-domain {expected:?}; give the agent the CA's trust domain"
    )]
    OtherTrustDomain {
        /// The trust domain in the certificate.
        found: String,
        /// The URI SAN.
        uri: String,
        /// The agent's trust domain.
        expected: String,
    },
    /// It lacks the CA's identity: a pod's or a node's certificate, or
    /// another server's.
    #[error(
        "the server's certificate is not the CA's: it lacks the URI SAN {expected} (its URI SANs: {uris:?}); a certificate the CA issued to a pod or a node does not make its holder the CA"
    )]
    NotTheCa {
        /// The required URI SAN.
        expected: String,
        /// The URI SANs it has.
        uris: Vec<String>,
    },
    /// The certificate does not parse.
    #[error("the server's certificate does not parse: {reason}")]
    Unreadable {
        /// The parser's reason.
        reason: String,
    },
}

/// Whether a server certificate's URI SANs make it the CA of
/// `trust_domain`: one of them must be [`credlet_ca::ca_spiffe_id`], which
/// the CA's issuance policy never gives to a pod or an agent.
pub fn check_ca_identity(uris: &[String], trust_domain: &str) -> Result<(), CaIdentityError> {
    let expected = credlet_ca::ca_spiffe_id(trust_domain);
    if uris.contains(&expected) {
        return Ok(());
    }
    let other_domain = uris.iter().find_map(|uri| {
        let (domain, path) = uri.strip_prefix("spiffe://")?.split_once('/')?;
        (path == "credlet/ca").then(|| (domain.to_owned(), uri.clone()))
    });
    match other_domain {
        Some((found, uri)) => Err(CaIdentityError::OtherTrustDomain {
            found,
            uri,
            expected: trust_domain.to_owned(),
        }),
        None => Err(CaIdentityError::NotTheCa {
            expected,
            uris: uris.to_vec(),
        }),
    }
}

/// Why a saved trust bundle is not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SavedBundleError {
    /// No HMAC header: not written by this agent (or by one before saved
    /// bundles were signed).
    #[error("it has no HMAC header")]
    Unsigned,
    /// The HMAC does not match: changed since, or another node's.
    #[error("its HMAC does not verify under this node's key")]
    BadMac,
}

const SAVED_BUNDLE_HEADER: &str = "# credlet HMAC-SHA256 ";

/// The saved form of a trust bundle: an HMAC header line, then the PEM.
pub fn seal_bundle(key: &NodeKey, bundle_pem: &str) -> String {
    format!(
        "{SAVED_BUNDLE_HEADER}{}\n{bundle_pem}",
        key.sign(Purpose::CaTrustBundle, bundle_pem.as_bytes())
    )
}

/// The PEM of a saved trust bundle, if its HMAC verifies under `key`.
pub fn open_bundle<'a>(key: &NodeKey, saved: &'a str) -> Result<&'a str, SavedBundleError> {
    let (header, pem) = saved
        .strip_prefix(SAVED_BUNDLE_HEADER)
        .and_then(|rest| rest.split_once('\n'))
        .ok_or(SavedBundleError::Unsigned)?;
    if key.verify(Purpose::CaTrustBundle, pem.as_bytes(), header.trim()) {
        Ok(pem)
    } else {
        Err(SavedBundleError::BadMac)
    }
}

/// Facts about the agent's current client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCertificateInfo {
    /// Serial, hex.
    pub serial_hex: String,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
}

struct Current {
    key: Arc<CertifiedKey>,
    info: AgentCertificateInfo,
}

/// The agent's client certificate for rustls, swapped in place when it is
/// renewed. Resolves nothing until the first certificate arrives.
#[derive(Default)]
pub struct AgentCertificate {
    current: RwLock<Option<Current>>,
}

impl fmt::Debug for AgentCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCertificate")
            .field("current", &self.info())
            .finish()
    }
}

impl AgentCertificate {
    /// The current certificate's facts.
    pub fn info(&self) -> Option<AgentCertificateInfo> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.info.clone())
    }

    /// Whether a certificate is there and not expired.
    pub fn is_valid(&self, now: SystemTime) -> bool {
        self.info().is_some_and(|i| i.not_after > now)
    }

    fn set(&self, key: Arc<CertifiedKey>, info: AgentCertificateInfo) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Current { key, info });
    }
}

impl ResolvesClientCert for AgentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| Arc::clone(&c.key))
    }

    fn has_certs(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// Opens TCP + TLS to the CA for tonic; counts handshakes.
#[derive(Clone)]
struct TlsConnector {
    tls: tokio_rustls::TlsConnector,
    handshakes: Arc<AtomicU64>,
}

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let handshakes = Arc::clone(&self.handshakes);
        Box::pin(async move {
            let (host, port) = host_port(&uri).map_err(std::io::Error::other)?;
            let name = server_name(&host).map_err(std::io::Error::other)?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            handshakes.fetch_add(1, Ordering::Relaxed);
            Ok(TokioIo::new(stream))
        })
    }
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector").finish_non_exhaustive()
    }
}

fn host_port(uri: &Uri) -> Result<(String, u16), String> {
    let host = uri.host().ok_or("no host")?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok((host.to_owned(), uri.port_u16().unwrap_or(443)))
}

fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_owned()).map_err(|e| format!("host {host:?}: {e}")),
    }
}

/// Issues pod certificates through credlet's CA service.
pub struct RemoteIssuer {
    config: RemoteConfig,
    /// Where the bundle is saved, and the key it is saved under.
    saved_bundle: Option<(PathBuf, NodeKey)>,
    /// Roots for the CA's serving certificate: `--ca-trust` plus the
    /// bundle the CA last sent.
    server_roots: Arc<ServerRoots>,
    endpoint: Endpoint,
    mtls: Arc<ClientConfig>,
    identity: Arc<AgentCertificate>,
    handshakes: Arc<AtomicU64>,
    /// The connection for pod certificates and the bundle watch: made anew
    /// for every agent certificate.
    pods: RwLock<Option<CertificateAuthorityClient<Channel>>>,
    /// The connection for the agent's own certificate (no client
    /// certificate).
    bootstrap: CertificateAuthorityClient<Channel>,
    metrics: CaClientMetrics,
    /// Pod certificate calls, coalesced under load.
    calls: coalesce::Coalescer,
    /// Whether the trust bundle stream to the CA is open, and why not.
    link: std::sync::Mutex<Result<(), String>>,
}

impl fmt::Debug for RemoteIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteIssuer")
            .field("url", &self.config.url)
            .field("trust_domain", &self.config.trust_domain)
            .field("agent_certificate", &self.identity.info())
            .finish_non_exhaustive()
    }
}

impl RemoteIssuer {
    /// The client's call metrics (register them with
    /// [`CaClientMetrics::register`]).
    pub fn metrics(&self) -> &CaClientMetrics {
        &self.metrics
    }

    /// Whether the CA is reachable now: the agent holds a valid client
    /// certificate and its trust bundle stream to the CA is open.
    pub fn reachability(&self) -> Result<(), String> {
        if !self.is_ready() {
            return Err("no valid agent certificate from the CA".into());
        }
        self.link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .map_err(|reason| format!("trust bundle stream to the CA is down: {reason}"))
    }

    fn set_link(&self, state: Result<(), String>) {
        *self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = state;
    }

    /// Builds the client; connects on first use.
    pub fn new(config: RemoteConfig) -> Result<Self, RemoteError> {
        let url_error = |reason: &str| RemoteError::Url {
            url: config.url.clone(),
            reason: reason.to_owned(),
        };
        let uri: Uri = config
            .url
            .parse()
            .map_err(|e: tonic::codegen::http::uri::InvalidUri| url_error(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(url_error("must start with https://"));
        }
        let (host, _) = host_port(&uri).map_err(|e| url_error(&e))?;
        server_name(&host).map_err(|e| url_error(&e))?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(url_error("must not have a path"));
        }

        let saved_bundle = match &config.state_dir {
            Some(dir) => Some((
                dir.join(SAVED_BUNDLE_FILE),
                NodeKey::load_or_create(dir).map_err(|source| RemoteError::State { source })?,
            )),
            None => None,
        };
        let learned = saved_bundle
            .as_ref()
            .map(|(path, key)| load_saved_bundle(path, key))
            .unwrap_or_default();
        let server_roots = Arc::new(ServerRoots::new(
            &config.trust_pem,
            &learned,
            &config.trust_domain,
            &config.url,
        )?);
        let identity = Arc::new(AgentCertificate::default());
        let tls_config = |resolver: Option<Arc<AgentCertificate>>| {
            let builder = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| RemoteError::Tls { source })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&server_roots) as _);
            let mut tls = match resolver {
                Some(resolver) => builder.with_client_cert_resolver(resolver),
                None => builder.with_no_client_auth(),
            };
            tls.alpn_protocols = vec![b"h2".to_vec()];
            // A resumed session carries the client certificate of the
            // session it resumes: a renewed agent certificate must be
            // presented in a full handshake. Connections are long-lived, so
            // resumption saves little.
            tls.resumption = rustls::client::Resumption::disabled();
            Ok::<_, RemoteError>(Arc::new(tls))
        };
        let mtls = tls_config(Some(Arc::clone(&identity)))?;
        let plain = tls_config(None)?;

        let endpoint = Endpoint::from(uri)
            .connect_timeout(config.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let handshakes = Arc::new(AtomicU64::new(0));
        let bootstrap =
            CertificateAuthorityClient::new(endpoint.connect_with_connector_lazy(TlsConnector {
                tls: tokio_rustls::TlsConnector::from(plain),
                handshakes: Arc::clone(&handshakes),
            }));
        let metrics = CaClientMetrics::default();
        let config_timeout = config.timeout;
        Ok(Self {
            config,
            saved_bundle,
            server_roots,
            endpoint,
            mtls,
            identity,
            handshakes,
            pods: RwLock::new(None),
            calls: coalesce::Coalescer::new(config_timeout, metrics.clone()),
            metrics,
            link: std::sync::Mutex::new(Err("not connected yet".into())),
            bootstrap,
        })
    }

    /// The settings.
    pub fn config(&self) -> &RemoteConfig {
        &self.config
    }

    /// The agent's current client certificate.
    pub fn agent_certificate(&self) -> Option<AgentCertificateInfo> {
        self.identity.info()
    }

    /// TLS handshakes made so far (both connections, reconnects included).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    fn pod_client(&self) -> Option<CertificateAuthorityClient<Channel>> {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn not_ready() -> IssuerError {
        IssuerError::Unavailable {
            reason: "the agent has no client certificate from the CA yet".into(),
        }
    }

    /// Obtains a new client certificate for the agent (fresh key and CSR,
    /// the token read from its file now) and puts it in place; later
    /// connections present it.
    pub async fn refresh_agent_certificate(&self) -> Result<AgentCertificateInfo, IssuerError> {
        let path = &self.config.token_file;
        let token = Zeroizing::new(tokio::fs::read_to_string(path).await.map_err(|e| {
            self.metrics.token_read_errors.inc();
            IssuerError::Unavailable {
                reason: format!("reading the agent token {}: {e}", path.display()),
            }
        })?);
        let token = token.trim();
        if token.is_empty() {
            self.metrics.token_read_errors.inc();
            return Err(IssuerError::Unavailable {
                reason: format!("the agent token file {} is empty", path.display()),
            });
        }
        let internal = |reason: String| IssuerError::Internal { reason };
        let key = PrivateKey::generate(KeyType::EcdsaP256)
            .map_err(|e| internal(format!("agent key: {e}")))?;
        let csr_der = key
            .certificate_signing_request()
            .map_err(|e| internal(format!("agent CSR: {e}")))?;
        let mut request = tonic::Request::new(IssueAgentCertificateRequest {
            csr_der,
            token: token.to_owned(),
            node_name: self.config.node_name.clone(),
        });
        request.set_timeout(self.config.timeout);
        let mut client = self.bootstrap.clone();
        let answer = call(
            &self.metrics,
            CaRpc::IssueAgentCertificate,
            self.config.timeout,
            client.issue_agent_certificate(request),
        )
        .await?;
        let issued = convert(answer)?;
        let leaf = credlet_ca::inspect_leaf(&issued.chain_pem)
            .map_err(|e| internal(format!("agent certificate: {e}")))?;
        if leaf.public_key_der != key.public_key_der() {
            return Err(internal(
                "the CA's agent certificate does not match the agent's key".into(),
            ));
        }
        let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| internal(format!("agent certificate chain: {e}")))?;
        let mut der = PrivateKeyDer::from_pem_slice(key.pem().as_bytes())
            .map_err(|e| internal(format!("agent key: {e}")))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&der);
        der.zeroize();
        let signing = signing.map_err(|e| internal(format!("agent key: {e}")))?;
        let info = AgentCertificateInfo {
            serial_hex: issued.serial_hex,
            not_before: issued.not_before,
            not_after: issued.not_after,
        };
        self.identity
            .set(Arc::new(CertifiedKey::new(chain, signing)), info.clone());
        // A new connection, so the new certificate is what the CA sees;
        // calls in flight finish on the old one.
        let channel = self.endpoint.connect_with_connector_lazy(TlsConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::clone(&self.mtls)),
            handshakes: Arc::clone(&self.handshakes),
        });
        *self.pods.write().unwrap_or_else(|e| e.into_inner()) =
            Some(CertificateAuthorityClient::new(channel));
        Ok(info)
    }

    /// Obtains the agent's client certificate (retrying with backoff until
    /// it succeeds) and renews it at 50-70 % of its life, until `stop`.
    pub async fn run_agent_certificate(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        let mut delay = Duration::ZERO;
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.refresh_agent_certificate().await {
                Ok(info) => {
                    failures = 0;
                    let at = renewal_time(
                        info.not_before,
                        info.not_after,
                        RenewBefore::Default,
                        fastrand::f64(),
                    );
                    delay = until(at, SystemTime::now()).max(Duration::from_millis(50));
                    tracing::info!(
                        serial = %info.serial_hex,
                        renew_in_s = delay.as_secs(),
                        "agent client certificate from the CA"
                    );
                }
                Err(error) => {
                    delay = backoff(
                        failures,
                        self.config.retry_base,
                        self.config.retry_cap,
                        fastrand::f64(),
                    );
                    failures = failures.saturating_add(1);
                    let expires_in = self
                        .identity
                        .info()
                        .map(|i| until(i.not_after, SystemTime::now()).as_secs());
                    tracing::warn!(
                        %error,
                        attempt = failures,
                        retry_in_ms = delay.as_millis() as u64,
                        current_certificate_expires_in_s = expires_in,
                        "could not get the agent client certificate from the CA"
                    );
                }
            }
        }
    }

    /// Follows the CA's trust bundle, reconnecting with backoff, and writes
    /// every change into the manager's volumes (at most `concurrency` at
    /// once), until `stop`.
    pub async fn run_trust_bundle_watch(
        self: Arc<Self>,
        manager: Arc<VolumeManager>,
        concurrency: usize,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut watch = BundleWatch {
            failures: 0,
            applied: None,
        };
        loop {
            let Some(reason) = self
                .watch_once(&mut watch, &manager, concurrency, &mut stop)
                .await
            else {
                return;
            };
            self.set_link(Err(reason.clone()));
            let delay = backoff(
                watch.failures,
                self.config.retry_base,
                self.config.retry_cap,
                fastrand::f64(),
            );
            watch.failures = watch.failures.saturating_add(1);
            if self.pod_client().is_some() {
                tracing::warn!(
                    %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    "trust bundle watch interrupted; reconnecting"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One stream: `None` when stopped, else why it ended.
    async fn watch_once(
        &self,
        watch: &mut BundleWatch,
        manager: &Arc<VolumeManager>,
        concurrency: usize,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<String> {
        if *stop.borrow() {
            return None;
        }
        let Some(mut client) = self.pod_client() else {
            return Some("no agent client certificate yet".into());
        };
        let opening = std::time::Instant::now();
        let opened = tokio::select! {
            opened = tokio::time::timeout(
                self.config.timeout,
                client.watch_trust_bundle(tonic::Request::new(WatchTrustBundleRequest {})),
            ) => opened,
            _ = stop.wait_for(|s| *s) => return None,
        };
        let outcome = match &opened {
            Err(_) => "Timeout",
            Ok(Err(status)) => code_label(status.code()),
            Ok(Ok(_)) => "Ok",
        };
        self.metrics
            .observe(CaRpc::WatchTrustBundle, outcome, opening.elapsed());
        let mut stream = match opened {
            Err(_) => return Some("the CA did not answer in time".into()),
            Ok(Err(status)) => return Some(format!("{}: {}", status.code(), status.message())),
            Ok(Ok(stream)) => stream.into_inner(),
        };
        self.set_link(Ok(()));
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                _ = stop.wait_for(|s| *s) => return None,
            };
            let bundle = match next {
                Ok(Some(bundle)) => bundle,
                Ok(None) => return Some("the CA ended the stream".into()),
                Err(status) => return Some(format!("{}: {}", status.code(), status.message())),
            };
            watch.failures = 0;
            if watch.applied.as_deref() == Some(bundle.pem.as_str()) {
                continue;
            }
            if !has_certificate(&bundle.pem) {
                tracing::warn!(
                    generation = bundle.generation,
                    "the CA sent a trust bundle without certificates; ignored"
                );
                continue;
            }
            tracing::info!(generation = bundle.generation, "trust bundle from the CA");
            self.learn_roots(&bundle.pem);
            let report = manager
                .update_trust_bundle(Arc::from(bundle.pem.as_str()), concurrency)
                .await;
            // Failed volumes get the bundle with the next change or the
            // next reconnect.
            if report.failed == 0 {
                watch.applied = Some(bundle.pem);
            }
        }
    }
}

struct BundleWatch {
    failures: u32,
    applied: Option<String>,
}

impl RemoteIssuer {
    /// Trusts the roots of a bundle received over the authenticated CA
    /// connection for later connections to the CA too (a rollover
    /// re-issues the CA's serving certificate from the new root), and
    /// keeps them for the next start.
    fn learn_roots(&self, bundle_pem: &str) {
        if let Err(error) = self.server_roots.learn(bundle_pem) {
            tracing::warn!(%error, "trust bundle from the CA not usable for the CA connection");
            return;
        }
        if let Some((path, key)) = &self.saved_bundle
            && let Err(error) = write_file_atomically(path, seal_bundle(key, bundle_pem).as_bytes())
        {
            tracing::warn!(path = %path.display(), %error, "keeping the CA's trust bundle");
        }
    }
}

/// The roots of the saved bundle, or none when it is missing or not
/// authentic (the configured roots still hold; the CA's next bundle is
/// saved anew).
fn load_saved_bundle(path: &std::path::Path, key: &NodeKey) -> String {
    let saved = match std::fs::read_to_string(path) {
        Ok(saved) => saved,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return String::new(),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "saved trust bundle unreadable; ignored");
            return String::new();
        }
    };
    match open_bundle(key, &saved) {
        Ok(pem) => pem.to_owned(),
        Err(error) => {
            tracing::warn!(
                path = %path.display(),
                %error,
                "saved trust bundle is not authentic (not written by this node's agent, or changed since); ignored: only --ca-trust is trusted until the CA sends its bundle"
            );
            String::new()
        }
    }
}

fn write_file_atomically(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Verifies the CA's serving certificate against the configured roots plus
/// the roots the CA itself published (swapped atomically on change), and
/// requires the CA's identity of the agent's trust domain.
///
/// Public for the `ca_answer` and `client_certificate` fuzz targets: it is
/// the agent's only reader of trust bundles (configured, saved, and sent by
/// the CA) and of the CA's serving certificate.
#[derive(Debug)]
pub struct ServerRoots {
    configured: Vec<CertificateDer<'static>>,
    verifier: RwLock<Arc<rustls::client::WebPkiServerVerifier>>,
    trust_domain: String,
    /// For log lines.
    url: String,
}

impl ServerRoots {
    /// Trusts the roots of `configured_pem` (at least one, all parsable)
    /// and those of `learned_pem` that parse (a saved bundle).
    pub fn new(
        configured_pem: &str,
        learned_pem: &str,
        trust_domain: &str,
        url: &str,
    ) -> Result<Self, RemoteError> {
        let configured = parse_roots(configured_pem)?;
        if configured.is_empty() {
            return Err(RemoteError::Trust {
                reason: "no certificate in the PEM bundle".into(),
            });
        }
        // A damaged cache is ignored: the configured roots still hold.
        let learned = parse_roots(learned_pem).unwrap_or_default();
        let verifier = Self::build(&configured, &learned)?;
        Ok(Self {
            configured,
            verifier: RwLock::new(verifier),
            trust_domain: trust_domain.to_owned(),
            url: url.to_owned(),
        })
    }

    /// The identity check after chain and host name verified: the DER
    /// certificate must carry the CA's reserved SPIFFE ID.
    pub fn check_identity(&self, end_entity: &[u8]) -> Result<(), CaIdentityError> {
        let info = credlet_ca::inspect_certificate(end_entity).map_err(|e| {
            CaIdentityError::Unreadable {
                reason: e.to_string(),
            }
        })?;
        check_ca_identity(&info.uris, &self.trust_domain)
    }

    fn build(
        configured: &[CertificateDer<'static>],
        learned: &[CertificateDer<'static>],
    ) -> Result<Arc<rustls::client::WebPkiServerVerifier>, RemoteError> {
        let mut roots = RootCertStore::empty();
        for cert in configured {
            roots.add(cert.clone()).map_err(|e| RemoteError::Trust {
                reason: e.to_string(),
            })?;
        }
        // Learned roots that do not parse as trust anchors are skipped.
        roots.add_parsable_certificates(learned.iter().cloned());
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| RemoteError::Trust {
            reason: e.to_string(),
        })
    }

    /// Trusts the configured roots plus those of a bundle the CA sent
    /// (replacing the ones learned before); an unparsable bundle changes
    /// nothing.
    pub fn learn(&self, bundle_pem: &str) -> Result<(), RemoteError> {
        let learned = parse_roots(bundle_pem)?;
        let verifier = Self::build(&self.configured, &learned)?;
        *self
            .verifier
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = verifier;
        Ok(())
    }

    fn current(&self) -> Arc<rustls::client::WebPkiServerVerifier> {
        Arc::clone(
            &self
                .verifier
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

fn parse_roots(pem: &str) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|cert| {
            cert.map_err(|e| RemoteError::Trust {
                reason: e.to_string(),
            })
        })
        .collect()
}

impl rustls::client::danger::ServerCertVerifier for ServerRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        // Only after the chain verified: the identity of a certificate
        // nobody vouched for means nothing.
        if let Err(error) = self.check_identity(end_entity.as_ref()) {
            tracing::error!(
                url = %self.url,
                %error,
                "refusing the TLS connection to the CA URL; no token is sent to it"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(error))),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// Whether a trust bundle the CA sent holds a certificate at all (else it
/// is ignored). Public for the `ca_answer` fuzz target.
pub fn has_certificate(pem: &str) -> bool {
    CertificateDer::pem_slice_iter(pem.as_bytes()).any(|c| c.is_ok())
}

/// Runs one call under the deadline, mapping every failure.
async fn call<T>(
    metrics: &CaClientMetrics,
    rpc: CaRpc,
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, IssuerError> {
    call_raw(metrics, rpc, deadline, call)
        .await
        .map_err(|error| error.into_issuer_error(deadline))
}

/// How a call failed, before it is mapped to an [`IssuerError`].
enum CallError {
    /// No answer before the deadline.
    Timeout,
    /// The CA's (or the connection's) status.
    Status(tonic::Status),
}

impl CallError {
    fn into_issuer_error(self, deadline: Duration) -> IssuerError {
        match self {
            Self::Timeout => IssuerError::Unavailable {
                reason: format!("the CA did not answer within {deadline:?} (--ca-timeout)"),
            },
            Self::Status(status) => status_error(&status),
        }
    }
}

/// [`call`] with the failure unmapped.
async fn call_raw<T>(
    metrics: &CaClientMetrics,
    rpc: CaRpc,
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallError> {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(deadline, call).await;
    let outcome = match &result {
        Err(_) => "Timeout",
        Ok(Err(status)) => code_label(status.code()),
        Ok(Ok(_)) => "Ok",
    };
    metrics.observe(rpc, outcome, started.elapsed());
    match result {
        Err(_) => Err(CallError::Timeout),
        Ok(Err(status)) => Err(CallError::Status(status)),
        Ok(Ok(answer)) => Ok(answer.into_inner()),
    }
}

/// Maps a CA status to an issuer error.
pub fn status_error(status: &tonic::Status) -> IssuerError {
    use tonic::Code;
    let reason = format!("CA: {}: {}", status.code(), status.message());
    // A status with a source was made on this side from a broken
    // connection (reset, refused, TLS failure), not sent by the CA.
    let local = std::error::Error::source(status).is_some();
    match status.code() {
        Code::Unknown | Code::Cancelled if local => IssuerError::Unavailable { reason },
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            IssuerError::Unavailable { reason }
        }
        Code::PermissionDenied | Code::Unauthenticated => IssuerError::Denied { reason },
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            IssuerError::Refused { reason }
        }
        _ => IssuerError::Internal { reason },
    }
}

fn unix_time(seconds: i64, what: &str) -> Result<SystemTime, IssuerError> {
    u64::try_from(seconds)
        .ok()
        .filter(|s| *s > 0)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .ok_or_else(|| IssuerError::Internal {
            reason: format!("the CA sent an invalid {what}: {seconds}"),
        })
}

/// Reads the CA's answer to an issuance (pod or agent certificate): times
/// in range and in order, a renewal point only if positive. The chain is
/// read by the callers (`credlet_ca::inspect_leaf`).
///
/// Public for the `ca_answer` fuzz target; it is the conversion the agent
/// applies to every `IssuedCertificate`.
pub fn convert(answer: IssuedCertificate) -> Result<Issued, IssuerError> {
    let not_before = unix_time(answer.not_before_unix, "notBefore")?;
    let not_after = unix_time(answer.not_after_unix, "notAfter")?;
    if not_after <= not_before {
        return Err(IssuerError::Internal {
            reason: "the CA sent a certificate with notAfter before notBefore".into(),
        });
    }
    let renew_at = u64::try_from(answer.renew_at_unix_ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    Ok(Issued {
        chain_pem: answer.chain_pem,
        trust_bundle_pem: Arc::from(answer.trust_bundle_pem),
        serial_hex: answer.serial_hex,
        not_before,
        not_after,
        renew_at,
    })
}

fn renew_before_fields(renew_before: RenewBefore) -> (u64, u32) {
    match renew_before {
        RenewBefore::Default => (0, 0),
        RenewBefore::Duration(d) => (d.as_secs().max(1), 0),
        RenewBefore::Fraction(f) => (0, ((f * 100.0).round() as u32).clamp(1, 99)),
    }
}

impl Issuer for RemoteIssuer {
    fn issue<'a>(
        &'a self,
        key: &'a PrivateKey,
        request: IssueRequest,
    ) -> BoxFuture<'a, Result<Issued, IssuerError>> {
        Box::pin(async move {
            let Some(client) = self.pod_client().filter(|_| self.is_ready()) else {
                return Err(Self::not_ready());
            };
            let Some(token) = request.token else {
                return Err(IssuerError::Refused {
                    reason: "no service account token for the CA; set tokenRequests with the CA's audience on the CSIDriver".into(),
                });
            };
            let (renew_before_seconds, renew_before_percent) =
                renew_before_fields(request.renew_before);
            // The proof of possession.
            let csr_der =
                key.certificate_signing_request()
                    .map_err(|error| IssuerError::Internal {
                        reason: format!("building the certificate signing request: {error}"),
                    })?;
            let identity = request.request.identity;
            let call_request = IssuePodCertificateRequest {
                csr_der,
                token: token.token.as_str().to_owned(),
                pod_namespace: identity.namespace,
                pod_name: identity.name,
                pod_uid: identity.uid,
                service_account: identity.service_account,
                dns_name_templates: request.templates.dns_names,
                ip_addresses: request
                    .request
                    .ip_addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                common_name_template: request.templates.common_name.unwrap_or_default(),
                // As the volume gives it: the CA expands it from the facts it
                // verified and applies its SPIFFE ID rule.
                spiffe_id_template: request.templates.spiffe_id,
                duration_seconds: request.request.duration.as_secs(),
                renew_before_seconds,
                renew_before_percent,
            };
            // The deadline covers the wait for a call slot too.
            let deadline = self.config.timeout;
            let answer = tokio::time::timeout(deadline, self.calls.issue(client, call_request))
                .await
                .map_err(|_| IssuerError::Unavailable {
                    reason: format!("the CA did not answer within {deadline:?} (--ca-timeout)"),
                })??;
            convert(answer)
        })
    }

    fn is_ready(&self) -> bool {
        self.identity.is_valid(SystemTime::now())
    }

    fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    fn requires_token(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_issuer_errors() {
        use tonic::{Code, Status};
        let unavailable = status_error(&Status::new(Code::Unavailable, "down"));
        assert!(matches!(unavailable, IssuerError::Unavailable { .. }));
        assert!(unavailable.is_retryable());
        assert!(matches!(
            status_error(&Status::new(Code::DeadlineExceeded, "slow")),
            IssuerError::Unavailable { .. }
        ));
        for code in [Code::PermissionDenied, Code::Unauthenticated] {
            assert!(matches!(
                status_error(&Status::new(code, "no")),
                IssuerError::Denied { .. }
            ));
        }
        for code in [Code::InvalidArgument, Code::FailedPrecondition] {
            let error = status_error(&Status::new(code, "bad"));
            assert!(matches!(error, IssuerError::Refused { .. }));
            assert_eq!(error.code(), Code::InvalidArgument);
        }
        assert!(matches!(
            status_error(&Status::new(Code::Internal, "bug")),
            IssuerError::Internal { .. }
        ));
    }

    #[test]
    fn only_the_cas_reserved_identity_is_the_ca() {
        let uris = |list: &[&str]| list.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        let ok = |r: &Result<(), CaIdentityError>| r.is_ok();
        let other_domain = |r: &Result<(), CaIdentityError>| {
            matches!(r, Err(CaIdentityError::OtherTrustDomain { .. }))
        };
        let not_ca =
            |r: &Result<(), CaIdentityError>| matches!(r, Err(CaIdentityError::NotTheCa { .. }));
        type Check = fn(&Result<(), CaIdentityError>) -> bool;
        let cases: &[(&[&str], &str, Check)] = &[
            (&["spiffe://cluster.local/credlet/ca"], "cluster.local", ok),
            (
                &[
                    "spiffe://cluster.local/ns/a/sa/b",
                    "spiffe://cluster.local/credlet/ca",
                ],
                "cluster.local",
                ok,
            ),
            // A pod's certificate, whatever else it has.
            (
                &["spiffe://cluster.local/ns/credlet/sa/ca"],
                "cluster.local",
                not_ca,
            ),
            (
                &["spiffe://cluster.local/ns/a/sa/b/credlet/ca"],
                "cluster.local",
                not_ca,
            ),
            // An agent's certificate.
            (
                &["spiffe://cluster.local/credlet/node/n"],
                "cluster.local",
                not_ca,
            ),
            (&[], "cluster.local", not_ca),
            (
                &["spiffe://cluster.local/credlet/ca/"],
                "cluster.local",
                not_ca,
            ),
            (
                &["spiffe://cluster.local/credlet/CA"],
                "cluster.local",
                not_ca,
            ),
            (
                &["https://cluster.local/credlet/ca"],
                "cluster.local",
                not_ca,
            ),
            // The CA of another trust domain.
            (
                &["spiffe://cluster.local/credlet/ca"],
                "example.org",
                other_domain,
            ),
            (
                &["spiffe://example.org/credlet/ca"],
                "cluster.local",
                other_domain,
            ),
        ];
        for (list, domain, check) in cases {
            let result = check_ca_identity(&uris(list), domain);
            assert!(check(&result), "{list:?} in {domain}: {result:?}");
        }
        let message =
            check_ca_identity(&uris(&["spiffe://cluster.local/credlet/ca"]), "example.org")
                .unwrap_err()
                .to_string();
        for part in ["\"cluster.local\"", "--trust-domain \"example.org\""] {
            assert!(message.contains(part), "{message}");
        }
    }

    #[test]
    fn saved_bundles_are_used_only_as_written() {
        let key = NodeKey::from_secret(&[3; 32]);
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let sealed = seal_bundle(&key, pem);
        let planted =
            format!("{sealed}-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n");
        let cases: &[(&NodeKey, &str, Result<&str, SavedBundleError>)] = &[
            (&key, &sealed, Ok(pem)),
            (&key, &planted, Err(SavedBundleError::BadMac)),
            (&key, pem, Err(SavedBundleError::Unsigned)),
            (&key, "", Err(SavedBundleError::Unsigned)),
            (
                &NodeKey::from_secret(&[4; 32]),
                &sealed,
                Err(SavedBundleError::BadMac),
            ),
        ];
        for (i, (key, saved, expected)) in cases.iter().enumerate() {
            assert_eq!(open_bundle(key, saved), *expected, "case {i}");
        }
    }

    #[test]
    fn renew_before_is_sent_as_seconds_or_percent() {
        assert_eq!(renew_before_fields(RenewBefore::Default), (0, 0));
        assert_eq!(
            renew_before_fields(RenewBefore::Duration(Duration::from_secs(600))),
            (600, 0)
        );
        assert_eq!(renew_before_fields(RenewBefore::Fraction(0.25)), (0, 25));
    }

    #[test]
    fn urls_must_be_https_host_port() {
        let pem = "";
        for url in ["http://ca:443", "ca:443", "https://ca:443/path"] {
            assert!(
                matches!(
                    RemoteIssuer::new(RemoteConfig::new(url, pem, "node")),
                    Err(RemoteError::Url { .. })
                ),
                "{url}"
            );
        }
        assert!(matches!(
            RemoteIssuer::new(RemoteConfig::new("https://ca:443", pem, "node")),
            Err(RemoteError::Trust { .. })
        ));
    }
}
