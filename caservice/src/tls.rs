//! TLS for the CA service: TLS 1.3 only, ring, a serving certificate issued
//! by the CA itself (re-issued when the CA reloads and before it expires),
//! and optional client certificates verified against the CA's trust bundle.
//! A verified agent certificate's node name (URI SAN
//! `spiffe://<td>/credlet/node/<node>`) reaches handlers as [`PeerInfo`].

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use credlet_ca::{KeyType, PrivateKey};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::Error;
use crate::keys::KeyStore;
use crate::policy::ServicePolicy;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Names of the serving certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerNames {
    /// DNS names (e.g. `credlet-ca.credlet.svc`).
    pub dns_names: Vec<String>,
    /// IP addresses.
    pub ip_addresses: Vec<IpAddr>,
}

impl ServerNames {
    /// Sorts `--server-name` values into DNS names and IP addresses.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Self {
        let mut out = Self::default();
        for name in names {
            let name = name.as_ref();
            match name.parse::<IpAddr>() {
                Ok(ip) => out.ip_addresses.push(ip),
                Err(_) => out.dns_names.push(name.to_ascii_lowercase()),
            }
        }
        out
    }
}

/// What a handler knows about the connection it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// The node named by a verified agent client certificate; `None` without
    /// one (or with a certificate that names no node).
    pub node: Option<String>,
}

/// The CA service's TLS configuration, rebuilt when the CA changes.
pub struct ServerTls {
    config: RwLock<Arc<rustls::ServerConfig>>,
    names: ServerNames,
    policy: Arc<ServicePolicy>,
    /// When the current serving certificate should be replaced.
    renew_at: RwLock<SystemTime>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Issues a serving certificate from the current CA and builds the TLS
    /// configuration.
    pub fn new(
        keys: &KeyStore,
        policy: Arc<ServicePolicy>,
        names: ServerNames,
    ) -> Result<Arc<Self>, Error> {
        let (config, renew_at) = build(keys, &policy, &names)?;
        Ok(Arc::new(Self {
            config: RwLock::new(Arc::new(config)),
            names,
            policy,
            renew_at: RwLock::new(renew_at),
        }))
    }

    /// The configuration new connections use.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the configuration (new serving certificate, new client
    /// roots) from the current CA.
    pub fn rebuild(&self, keys: &KeyStore) -> Result<(), Error> {
        let (config, renew_at) = build(keys, &self.policy, &self.names)?;
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        *self
            .renew_at
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = renew_at;
        Ok(())
    }

    /// Rebuilds on every CA or trust bundle change and before the serving
    /// certificate expires. Runs until aborted.
    pub fn spawn_reloader(self: &Arc<Self>, keys: Arc<KeyStore>) -> tokio::task::JoinHandle<()> {
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            let mut authority = keys.subscribe_authority();
            let mut bundle = keys.subscribe_bundle();
            loop {
                let renew_at = *tls
                    .renew_at
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::from_secs(1));
                tokio::select! {
                    changed = authority.changed() => if changed.is_err() { break },
                    changed = bundle.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(wait) => {}
                }
                match tls.rebuild(&keys) {
                    Ok(()) => tracing::info!("TLS serving certificate and client roots refreshed"),
                    Err(error) => {
                        tracing::error!(%error, "refreshing the TLS configuration failed; keeping the current one");
                        let mut at = tls
                            .renew_at
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        *at = SystemTime::now() + Duration::from_secs(30);
                    }
                }
            }
        })
    }

    /// Accepts TCP connections and performs TLS handshakes concurrently
    /// (a slow client does not hold up others), yielding established
    /// connections for `Server::serve_with_incoming_shutdown`. Stops
    /// accepting when the stream is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = tx.closed() => break,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.config());
                let tx = tx.clone();
                let policy = Arc::clone(&tls.policy);
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let node = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(|leaf| node_of_certificate(leaf.as_ref(), &policy));
                            let info = PeerInfo {
                                remote_addr: Some(remote),
                                node,
                            };
                            let _ = tx.send(Ok(TlsConnection { stream, info })).await;
                        }
                        Ok(Err(error)) => {
                            tracing::info!(%remote, %error, "TLS handshake failed");
                        }
                        Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// The node a client certificate (DER, as the TLS peer presented it and
/// rustls verified it) names: the first URI SAN that is a node SPIFFE ID of
/// the policy's trust domain ([`ServicePolicy::node_of_spiffe_id`]), if any.
///
/// Public for the `client_certificate` fuzz target; it is how the CA reads
/// every connection's [`PeerInfo::node`].
pub fn node_of_certificate(der: &[u8], policy: &ServicePolicy) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => policy.node_of_spiffe_id(uri).map(str::to_owned),
        _ => None,
    })
}

fn build(
    keys: &KeyStore,
    policy: &ServicePolicy,
    names: &ServerNames,
) -> Result<(rustls::ServerConfig, SystemTime), Error> {
    let tls = |reason: String| Error::Tls { reason };
    let authority = keys.authority();
    let key = PrivateKey::generate(KeyType::EcdsaP256).map_err(|e| tls(e.to_string()))?;
    let csr = key
        .certificate_signing_request()
        .map_err(|e| tls(e.to_string()))?;
    let lifetime = policy
        .agent_duration
        .clamp(policy.min_duration, policy.max_duration);
    let now = SystemTime::now();
    let issued = authority
        .issue_component(
            &csr,
            &policy.ca_spiffe_id(),
            &names.dns_names,
            &names.ip_addresses,
            lifetime,
            now,
        )
        .map_err(|e| tls(format!("issuing the serving certificate: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key.pem().as_bytes()).map_err(|e| tls(e.to_string()))?;

    let mut roots = RootCertStore::empty();
    for der in &keys.trust_bundle().roots_der {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| tls(format!("trust bundle root: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Renew the serving certificate at two thirds of its life.
    let life = issued
        .not_after
        .duration_since(issued.not_before)
        .unwrap_or_default();
    let renew_at = issued.not_before + life * 2 / 3;
    Ok((config, renew_at))
}

/// An accepted, handshaken TLS connection with what it proved.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl std::fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnection")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
