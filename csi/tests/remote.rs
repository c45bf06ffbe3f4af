//! The remote CA client against an in-process CA service: a tonic
//! `CertificateAuthority` server over rustls mutual TLS on 127.0.0.1 that
//! checks what the agent sends and signs with a real `credlet_ca::Authority`.
//! Volumes are plain directories (no root).

mod support;

use support::{serial, wait_for};

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use credlet_ca::{
    Authority, IssuanceRequest, KeyType, PodIdentity, Policy, PrivateKey, TemplateVars,
    VerifiedCsr, expand_template,
};
use credlet_csi::attributes as attr;
use credlet_csi::fsops::PlainDirectories;
use credlet_csi::metrics::{Metrics, Operation, Outcome};
use credlet_csi::paths::{TargetPath, VolumeId};
use credlet_csi::remote::{RemoteConfig, RemoteIssuer};
use credlet_csi::volumes::PublishRequest;
use credlet_csi::{Issuer, VolumeConfig, VolumeManager, rotation};
use credlet_proto::ca::certificate_authority_server::{
    CertificateAuthority, CertificateAuthorityServer,
};
use credlet_proto::ca::{
    IssueAgentCertificateRequest, IssuePodCertificateRequest, IssuePodCertificatesRequest,
    IssuePodCertificatesResponse, IssuedCertificate, TrustBundle, WatchTrustBundleRequest,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

const AGENT_TOKEN: &str = "agent-token-for-the-ca";
const POD_TOKEN: &str = "pod-token-for-the-ca";
const NODE: &str = "node-a";

/// What the CA saw in one pod certificate call.
#[derive(Clone, Debug)]
struct SeenPod {
    pod: PodIdentity,
    dns_name_templates: Vec<String>,
    common_name_template: String,
    spiffe_id_template: String,
    renew_before_seconds: u64,
    /// Serial of the client certificate the call came with.
    client_serial: String,
}

/// The CA service of the tests.
struct TestCa {
    authority: Authority,
    agent_lifetime: Duration,
    /// Handlers never answer (a hung CA).
    stall: AtomicBool,
    agent_calls: AtomicUsize,
    pod_calls: AtomicUsize,
    /// `IssuePodCertificates` calls, answered `Unimplemented` as a CA
    /// release before that call would.
    batch_calls: AtomicUsize,
    seen: Mutex<Vec<SeenPod>>,
    bundle: watch::Sender<(u64, String)>,
    /// The renewal point sent with the last pod certificate.
    last_renew_at_ms: Mutex<i64>,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).expect("after epoch").as_secs() as i64
}

/// Expands a template as `credlet ca` does (without its DNS policy).
fn expand(template: &str, pod: &PodIdentity, trust_domain: &str) -> Result<String, Status> {
    expand_template(template, &TemplateVars::new(pod, trust_domain))
        .map_err(|e| Status::invalid_argument(format!("invalid template {template:?}: {e}")))
}

impl TestCa {
    async fn stall_if_asked(&self) {
        if self.stall.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    fn answer(
        &self,
        request: &IssuanceRequest,
        renew_at: impl Fn(SystemTime, SystemTime) -> SystemTime,
    ) -> Result<IssuedCertificate, Status> {
        let issued = self
            .authority
            .issue(request, SystemTime::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let renew_at = renew_at(issued.not_before, issued.not_after);
        let renew_at_ms = renew_at
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_millis() as i64;
        *self.last_renew_at_ms.lock().expect("lock") = renew_at_ms;
        Ok(IssuedCertificate {
            chain_pem: issued.chain_pem,
            trust_bundle_pem: self.bundle.borrow().1.clone(),
            not_before_unix: unix(issued.not_before),
            not_after_unix: unix(issued.not_after),
            renew_at_unix_ms: renew_at_ms,
            serial_hex: issued.serial_hex,
        })
    }
}

#[derive(Clone)]
struct Service(Arc<TestCa>);

#[tonic::async_trait]
impl CertificateAuthority for Service {
    async fn issue_agent_certificate(
        &self,
        request: Request<IssueAgentCertificateRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        self.0.stall_if_asked().await;
        self.0.agent_calls.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        if request.token != AGENT_TOKEN {
            return Err(Status::unauthenticated("agent token rejected"));
        }
        if request.node_name != NODE {
            return Err(Status::permission_denied("wrong node"));
        }
        VerifiedCsr::from_der(&request.csr_der)
            .map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        let issuance = IssuanceRequest {
            csr_der: request.csr_der,
            identity: PodIdentity {
                namespace: "credlet-system".into(),
                name: format!("credlet-{NODE}"),
                uid: "agent-uid".into(),
                service_account: "credlet-agent".into(),
            },
            spiffe_id: None,
            dns_names: vec![],
            ip_addresses: vec![],
            common_name: Some(NODE.into()),
            duration: self.0.agent_lifetime,
        };
        let lifetime_share = |nb: SystemTime, na: SystemTime| {
            nb + na.duration_since(nb).unwrap_or_default().mul_f64(0.6)
        };
        Ok(Response::new(self.0.answer(&issuance, lifetime_share)?))
    }

    async fn issue_pod_certificate(
        &self,
        request: Request<IssuePodCertificateRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        self.0.stall_if_asked().await;
        self.0.pod_calls.fetch_add(1, Ordering::SeqCst);
        let client_serial = request
            .extensions()
            .get::<Option<PeerCertificates>>()
            .and_then(|p| p.as_ref()?.0.first().cloned())
            .map(|der| {
                let pem = pem_certificate(&der);
                credlet_ca::inspect_leaf(&pem)
                    .expect("client leaf")
                    .serial_hex
            })
            .ok_or_else(|| Status::unauthenticated("no agent client certificate"))?;
        let request = request.into_inner();
        if request.token != POD_TOKEN {
            return Err(Status::unauthenticated("pod token rejected"));
        }
        // Proof of possession: the CSR's signature verifies.
        VerifiedCsr::from_der(&request.csr_der)
            .map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        let pod = PodIdentity {
            namespace: request.pod_namespace.clone(),
            name: request.pod_name.clone(),
            uid: request.pod_uid.clone(),
            service_account: request.service_account.clone(),
        };
        self.0.seen.lock().expect("lock").push(SeenPod {
            pod: pod.clone(),
            dns_name_templates: request.dns_name_templates.clone(),
            common_name_template: request.common_name_template.clone(),
            spiffe_id_template: request.spiffe_id_template.clone(),
            renew_before_seconds: request.renew_before_seconds,
            client_serial,
        });
        let ip_addresses = request
            .ip_addresses
            .iter()
            .map(|ip| ip.parse::<IpAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let trust_domain = &self.0.authority.policy().trust_domain;
        let issuance = IssuanceRequest {
            csr_der: request.csr_der,
            dns_names: request
                .dns_name_templates
                .iter()
                .map(|t| expand(t, &pod, trust_domain))
                .collect::<Result<_, _>>()?,
            common_name: Some(request.common_name_template)
                .filter(|c| !c.is_empty())
                .map(|c| expand(&c, &pod, trust_domain))
                .transpose()?,
            // `Authority::issue` applies the SPIFFE ID rule.
            spiffe_id: Some(request.spiffe_id_template)
                .filter(|t| !t.is_empty())
                .map(|t| expand(&t, &pod, trust_domain))
                .transpose()?,
            identity: pod,
            ip_addresses,
            duration: Duration::from_secs(request.duration_seconds),
        };
        // A renewal point of the CA's choosing: 55 % of the lifetime.
        let renew_at = |nb: SystemTime, na: SystemTime| {
            nb + na.duration_since(nb).unwrap_or_default().mul_f64(0.55)
        };
        Ok(Response::new(self.0.answer(&issuance, renew_at)?))
    }

    type WatchTrustBundleStream =
        tokio_stream::wrappers::ReceiverStream<Result<TrustBundle, Status>>;

    async fn issue_pod_certificates(
        &self,
        _request: Request<IssuePodCertificatesRequest>,
    ) -> Result<Response<IssuePodCertificatesResponse>, Status> {
        self.0.batch_calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unimplemented(
            "unknown method IssuePodCertificates for service credlet.ca.v1.CertificateAuthority",
        ))
    }

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        if request
            .extensions()
            .get::<Option<PeerCertificates>>()
            .and_then(Option::as_ref)
            .is_none()
        {
            return Err(Status::unauthenticated("no agent client certificate"));
        }
        let mut bundles = self.0.bundle.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let (generation, pem) = bundles.borrow_and_update().clone();
                if tx.send(Ok(TrustBundle { pem, generation })).await.is_err() {
                    return;
                }
                if bundles.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("ascii"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The client certificates a TLS connection came with.
#[derive(Clone, Debug)]
struct PeerCertificates(Vec<Vec<u8>>);

/// A server-side TLS stream that a test can cut (every read and write
/// fails), as a network outage would.
struct CuttableTls {
    inner: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    cut: Arc<AtomicBool>,
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "network cut by the test")
}

impl AsyncRead for CuttableTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.cut.load(Ordering::SeqCst) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut.load(Ordering::SeqCst) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for CuttableTls {
    type ConnectInfo = Option<PeerCertificates>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| PeerCertificates(certs.iter().map(|c| c.to_vec()).collect()))
    }
}

/// The running CA service.
struct CaServer {
    ca: Arc<TestCa>,
    addr: SocketAddr,
    /// Serving certificate's root (what the agent trusts).
    serving_root_pem: String,
    /// While set: connections fail and new ones are dropped.
    cut: Arc<AtomicBool>,
}

impl CaServer {
    async fn start(agent_lifetime: Duration) -> Self {
        let mut policy = Policy::new("cluster.local");
        policy.min_duration = Duration::from_secs(1);
        let authority = Authority::generate_self_signed(policy.clone()).expect("CA");
        let bundle = authority.trust_bundle_pem().to_owned();

        // The serving certificate, from a separate root, with the CA's
        // identity (the agent requires it).
        let serving_ca = Authority::generate_self_signed(policy).expect("serving CA");
        let serving_key = PrivateKey::generate(KeyType::EcdsaP256).expect("key");
        let serving = serving_ca
            .issue_component(
                &serving_key.certificate_signing_request().expect("csr"),
                &credlet_ca::ca_spiffe_id("cluster.local"),
                &["localhost".into()],
                &[IpAddr::from([127, 0, 0, 1])],
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .expect("serving certificate");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            client_roots.add(cert.expect("root")).expect("add root");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(client_roots),
            Arc::clone(&provider),
        )
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
        let chain = CertificateDer::pem_slice_iter(serving.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(serving_key.pem().as_bytes()).expect("key der");
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let (bundle_tx, _) = watch::channel((1, bundle));
        let ca = Arc::new(TestCa {
            authority,
            agent_lifetime,
            stall: AtomicBool::new(false),
            agent_calls: AtomicUsize::new(0),
            pod_calls: AtomicUsize::new(0),
            batch_calls: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            bundle: bundle_tx,
            last_renew_at_ms: Mutex::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let (conn_tx, conn_rx) = tokio::sync::mpsc::channel::<io::Result<CuttableTls>>(16);
        let accept_cut = Arc::clone(&cut);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if accept_cut.load(Ordering::SeqCst) {
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let conn_tx = conn_tx.clone();
                let cut = Arc::clone(&accept_cut);
                tokio::spawn(async move {
                    if let Ok(inner) = acceptor.accept(tcp).await {
                        let _ = conn_tx.send(Ok(CuttableTls { inner, cut })).await;
                    }
                });
            }
        });
        let service = Service(Arc::clone(&ca));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(CertificateAuthorityServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(conn_rx))
                .await
                .expect("CA server");
        });
        Self {
            ca,
            addr,
            serving_root_pem: serving_ca.trust_bundle_pem().to_owned(),
            cut,
        }
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    server: CaServer,
    issuer: Arc<RemoteIssuer>,
    metrics: Metrics,
    stop: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
}

impl Fixture {
    async fn new(agent_lifetime: Duration, timeout: Duration) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("kubelet");
        std::fs::create_dir_all(&root).expect("mkdir");
        let root = root.canonicalize().expect("canonical");
        let state = tmp.path().join("state");
        let token_file = tmp.path().join("token");
        std::fs::write(&token_file, format!("{AGENT_TOKEN}\n")).expect("token");
        let server = CaServer::start(agent_lifetime).await;
        let mut config = RemoteConfig::new(
            format!("https://127.0.0.1:{}", server.addr.port()),
            server.serving_root_pem.clone(),
            NODE,
        );
        config.token_file = token_file;
        config.timeout = timeout;
        config.retry_base = Duration::from_millis(50);
        config.retry_cap = Duration::from_millis(200);
        let issuer = Arc::new(RemoteIssuer::new(config).expect("remote issuer"));
        let (stop, stop_rx) = watch::channel(false);
        Self {
            _tmp: tmp,
            root,
            state,
            server,
            issuer,
            metrics: Metrics::default(),
            stop,
            stop_rx,
        }
    }

    /// A manager with its rotation loop running (and recovered).
    async fn manager(&self) -> Arc<VolumeManager> {
        let mut config = VolumeConfig::new(self.root.clone(), self.state.clone());
        config.backoff_base = Duration::from_millis(50);
        config.backoff_cap = Duration::from_millis(200);
        let (handle, queue) = rotation::channel();
        let manager = Arc::new(
            VolumeManager::new(
                config,
                Arc::clone(&self.issuer) as Arc<dyn Issuer>,
                Arc::new(PlainDirectories),
                handle,
                self.metrics.clone(),
            )
            .expect("manager"),
        );
        tokio::spawn(queue.run(Arc::clone(&manager), 8, self.stop_rx.clone()));
        manager.recover().await.expect("recover");
        manager
    }

    /// Starts the agent certificate loop and waits for the first one.
    async fn bootstrap(&self) {
        tokio::spawn(Arc::clone(&self.issuer).run_agent_certificate(self.stop_rx.clone()));
        wait_for("the agent certificate", Duration::from_secs(10), || {
            self.issuer.is_ready()
        })
        .await;
    }

    fn target(&self, pod: &str) -> PathBuf {
        support::target(&self.root, pod)
    }

    fn request(
        &self,
        id: &str,
        target: &Path,
        token: Option<&str>,
        extra: &[(&str, &str)],
    ) -> PublishRequest {
        support::publish_request(&self.root, id, target, token, extra)
    }

    fn count(&self, operation: Operation, outcome: Outcome) -> u64 {
        support::count(&self.metrics, operation, outcome)
    }

    fn record_count(&self) -> usize {
        std::fs::read_dir(self.state.join("volumes"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[tokio::test]
async fn publish_issues_through_the_remote_ca() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_secs(5)).await;
    let manager = fx.manager().await;

    // No agent certificate yet: not ready, and publish is Unavailable
    // without touching the disk.
    assert!(!manager.is_ready());
    let target = fx.target("p1");
    let error = manager
        .publish(fx.request("csi-1", &target, Some(POD_TOKEN), &[]))
        .await
        .expect_err("no agent certificate yet");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert!(!target.exists());
    assert_eq!(fx.record_count(), 0);

    fx.bootstrap().await;
    assert!(manager.is_ready());
    assert_eq!(fx.server.ca.agent_calls.load(Ordering::SeqCst), 1);
    let agent = fx.issuer.agent_certificate().expect("agent certificate");

    manager
        .publish(fx.request(
            "csi-1",
            &target,
            Some(POD_TOKEN),
            &[
                (attr::DNS_NAMES, "$POD_NAME.$POD_NAMESPACE.svc,web.example"),
                (attr::COMMON_NAME, "$POD_NAME"),
                (attr::IP_ADDRESSES, "10.0.0.7"),
                (attr::DURATION, "1h"),
                (attr::RENEW_BEFORE, "20m"),
            ],
        ))
        .await
        .expect("publish");

    // The CA got the raw templates, the pod facts, and the agent's
    // client certificate.
    let seen = fx.server.ca.seen.lock().expect("lock")[0].clone();
    assert_eq!(
        seen.dns_name_templates,
        ["$POD_NAME.$POD_NAMESPACE.svc", "web.example"]
    );
    assert_eq!(seen.common_name_template, "$POD_NAME");
    assert_eq!(seen.spiffe_id_template, attr::DEFAULT_SPIFFE_ID);
    assert_eq!(seen.renew_before_seconds, 20 * 60);
    assert_eq!(seen.pod.name, "web-0");
    assert_eq!(seen.pod.namespace, "shop");
    assert_eq!(seen.pod.service_account, "web");
    assert_eq!(seen.client_serial, agent.serial_hex);

    // The volume holds a certificate for our key with the CA's names.
    let chain = std::fs::read_to_string(target.join("tls.crt")).expect("chain");
    let key = std::fs::read_to_string(target.join("tls.key")).expect("key");
    assert!(credlet_ca::key_matches_certificate(&key, &chain).expect("match"));
    let leaf = credlet_ca::inspect_leaf(&chain).expect("leaf");
    assert_eq!(leaf.dns_names, ["web-0.shop.svc", "web.example"]);
    assert_eq!(leaf.ip_addresses, [IpAddr::from([10, 0, 0, 7])]);
    assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/shop/sa/web"]);
    let bundle = std::fs::read_to_string(target.join("ca.crt")).expect("bundle");
    assert_eq!(bundle, fx.server.ca.authority.trust_bundle_pem());
    credlet_ca::verify_chain(&chain, &bundle, SystemTime::now()).expect("chain verifies");

    // The CA's renewal point is the one recorded.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.state.join("volumes/csi-1.json")).expect("record"),
    )
    .expect("json");
    assert_eq!(
        record["record"]["certificate"]["renew_at_ms"].as_i64(),
        Some(*fx.server.ca.last_renew_at_ms.lock().expect("lock"))
    );

    // More publishes reuse the one connection: no new handshake.
    let handshakes = fx.issuer.handshakes();
    for i in 2..5 {
        let target = fx.target(&format!("p{i}"));
        manager
            .publish(fx.request(&format!("csi-{i}"), &target, Some(POD_TOKEN), &[]))
            .await
            .expect("publish");
    }
    assert_eq!(fx.issuer.handshakes(), handshakes);

    // Without a token: InvalidArgument naming tokenRequests, nothing on
    // disk.
    let target = fx.target("p9");
    let error = manager
        .publish(fx.request("csi-9", &target, None, &[]))
        .await
        .expect_err("no token");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.to_string().contains("tokenRequests"), "{error}");
    assert!(!target.exists());

    // A token the CA rejects: PermissionDenied, nothing left behind.
    let error = manager
        .publish(fx.request("csi-9", &target, Some("stolen"), &[]))
        .await
        .expect_err("bad token");
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error}");
    assert!(!target.exists());
    assert_eq!(fx.record_count(), 4);
}

/// The volume's templates reach the CA as written, `credlet.io/spiffe-id`
/// included: the CA, not the agent, expands them from the facts it
/// verified.
#[tokio::test]
async fn templates_and_the_spiffe_id_travel_unexpanded_to_the_ca() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_secs(5)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    let target = fx.target("p1");
    let spiffe_id = "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/${SERVICE_ACCOUNT_NAME}/$POD_NAME";
    manager
        .publish(fx.request(
            "csi-1",
            &target,
            Some(POD_TOKEN),
            &[
                (
                    attr::DNS_NAMES,
                    "${POD_NAME}.${POD_NAMESPACE}.svc, $POD_NAME.$TRUST_DOMAIN",
                ),
                (attr::COMMON_NAME, "${POD_NAME}"),
                (attr::SPIFFE_ID, spiffe_id),
            ],
        ))
        .await
        .expect("publish");
    let seen = fx.server.ca.seen.lock().expect("lock")[0].clone();
    assert_eq!(
        seen.dns_name_templates,
        [
            "${POD_NAME}.${POD_NAMESPACE}.svc",
            "$POD_NAME.$TRUST_DOMAIN"
        ]
    );
    assert_eq!(seen.common_name_template, "${POD_NAME}");
    assert_eq!(seen.spiffe_id_template, spiffe_id);
    let leaf =
        credlet_ca::inspect_leaf(&std::fs::read_to_string(target.join("tls.crt")).expect("chain"))
            .expect("leaf");
    assert_eq!(leaf.dns_names, ["web-0.shop.svc", "web-0.cluster.local"]);
    assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/shop/sa/web/web-0"]);
}

#[tokio::test]
async fn publish_fails_unavailable_after_the_deadline_and_leaves_nothing() {
    let timeout = Duration::from_millis(700);
    let fx = Fixture::new(Duration::from_secs(3600), timeout).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;

    // A CA that accepts the call and never answers.
    fx.server.ca.stall.store(true, Ordering::SeqCst);
    let target = fx.target("p1");
    let started = Instant::now();
    let error = manager
        .publish(fx.request("csi-1", &target, Some(POD_TOKEN), &[]))
        .await
        .expect_err("hung CA");
    let took = started.elapsed();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
    assert!(took < timeout * 3, "{took:?}");
    assert!(!target.exists(), "no mount point left");
    assert_eq!(fx.record_count(), 0, "no record left");
    assert_eq!(manager.volume_count(), 0);

    // A CA that is not reachable at all.
    fx.server.ca.stall.store(false, Ordering::SeqCst);
    fx.server.cut.store(true, Ordering::SeqCst);
    let error = manager
        .publish(fx.request("csi-1", &target, Some(POD_TOKEN), &[]))
        .await
        .expect_err("CA down");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert!(!target.exists());
    assert_eq!(fx.record_count(), 0);

    // Back up: the kubelet's retry succeeds.
    fx.server.cut.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match manager
            .publish(fx.request("csi-1", &target, Some(POD_TOKEN), &[]))
            .await
        {
            Ok(()) => break,
            Err(error) => {
                assert!(Instant::now() < deadline, "CA never came back: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    serial(&target);
}

#[tokio::test]
async fn renewal_keeps_the_certificate_while_the_ca_is_down() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_millis(500)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    let target = fx.target("p1");
    manager
        .publish(fx.request("csi-1", &target, Some(POD_TOKEN), &[(attr::DURATION, "4s")]))
        .await
        .expect("publish");
    let first = serial(&target);

    // The CA goes away before the renewal point (55 % of 4 s).
    fx.server.cut.store(true, Ordering::SeqCst);
    wait_for("failed renewals", Duration::from_secs(10), || {
        fx.count(Operation::Renew, Outcome::Error) >= 2
    })
    .await;
    // Still the old, still-valid certificate, complete on disk.
    assert_eq!(serial(&target), first);
    assert!(target.join("ca.crt").exists());

    // The CA is back: the retry renews.
    fx.server.cut.store(false, Ordering::SeqCst);
    wait_for("the renewal", Duration::from_secs(10), || {
        serial(&target) != first
    })
    .await;
    assert!(fx.count(Operation::Renew, Outcome::Success) >= 1);
}

#[tokio::test]
async fn trust_bundle_changes_reach_every_volume_without_reissue() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_secs(5)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    tokio::spawn(Arc::clone(&fx.issuer).run_trust_bundle_watch(
        Arc::clone(&manager),
        2,
        fx.stop_rx.clone(),
    ));
    let mut targets = Vec::new();
    for i in 0..5 {
        let target = fx.target(&format!("p{i}"));
        manager
            .publish(fx.request(
                &format!("csi-{i}"),
                &target,
                Some(POD_TOKEN),
                &[(attr::CREDENTIAL_BUNDLE_FILE, "creds.pem")],
            ))
            .await
            .expect("publish");
        targets.push(target);
    }
    let read = |t: &Path, name: &str| std::fs::read(t.join(name)).expect("read");
    let before: Vec<_> = targets
        .iter()
        .map(|t| (read(t, "tls.key"), read(t, "tls.crt"), read(t, "creds.pem")))
        .collect();
    let pod_calls = fx.server.ca.pod_calls.load(Ordering::SeqCst);

    // CA rollover: old and new roots.
    let next = Authority::generate_self_signed(Policy::new("cluster.local")).expect("next CA");
    let rolled = format!(
        "{}{}",
        fx.server.ca.authority.trust_bundle_pem(),
        next.trust_bundle_pem()
    );
    fx.server.ca.bundle.send_replace((2, rolled.clone()));

    wait_for(
        "the new bundle in every volume",
        Duration::from_secs(10),
        || {
            targets
                .iter()
                .all(|t| std::fs::read_to_string(t.join("ca.crt")).is_ok_and(|b| b == rolled))
        },
    )
    .await;
    for (target, (key, cert, creds)) in targets.iter().zip(before) {
        assert_eq!(read(target, "tls.key"), key, "key unchanged");
        assert_eq!(read(target, "tls.crt"), cert, "certificate unchanged");
        assert_eq!(read(target, "creds.pem"), creds, "bundle file unchanged");
    }
    assert_eq!(
        fx.server.ca.pod_calls.load(Ordering::SeqCst),
        pod_calls,
        "nothing re-issued"
    );
    // Direct call: already up to date, nothing written.
    let report = manager
        .update_trust_bundle(Arc::from(rolled.as_str()), 2)
        .await;
    assert_eq!(report.updated, 0);
    assert_eq!(report.unchanged, 5);
}

#[tokio::test]
async fn the_agent_certificate_is_renewed_and_used_for_new_connections() {
    let fx = Fixture::new(Duration::from_secs(3), Duration::from_secs(5)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    let first = fx.issuer.agent_certificate().expect("first");
    let target = fx.target("p1");
    manager
        .publish(fx.request("csi-1", &target, Some(POD_TOKEN), &[]))
        .await
        .expect("publish");
    assert_eq!(
        fx.server.ca.seen.lock().expect("lock")[0].client_serial,
        first.serial_hex
    );

    // Renewed at 50-70 % of its 3 s life; the token file is read again.
    wait_for("the agent renewal", Duration::from_secs(10), || {
        fx.issuer
            .agent_certificate()
            .is_some_and(|c| c.serial_hex != first.serial_hex)
    })
    .await;
    assert!(fx.server.ca.agent_calls.load(Ordering::SeqCst) >= 2);
    let second = fx.issuer.agent_certificate().expect("second");
    let handshakes = fx.issuer.handshakes();
    let target = fx.target("p2");
    manager
        .publish(fx.request("csi-2", &target, Some(POD_TOKEN), &[]))
        .await
        .expect("publish after renewal");
    let seen = fx.server.ca.seen.lock().expect("lock").clone();
    let last = seen.last().expect("call").client_serial.clone();
    // Either the second or an even later renewal, never the first.
    assert_ne!(last, first.serial_hex);
    let current = fx.issuer.agent_certificate().expect("current");
    assert!(last == second.serial_hex || last == current.serial_hex);
    // A new certificate means a new connection.
    assert!(fx.issuer.handshakes() > handshakes);
}

/// Publishes that queue up while calls are in flight go out as one
/// `IssuePodCertificates`; a CA that does not know it (an older release)
/// gets them again one by one, and the agent stops batching.
#[tokio::test]
async fn a_ca_without_batches_gets_single_calls() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_secs(5)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    let publish_all = |round: usize| {
        let manager = Arc::clone(&manager);
        let requests: Vec<_> = (0..12)
            .map(|i| {
                let target = fx.target(&format!("r{round}-{i}"));
                (
                    target.clone(),
                    fx.request(&format!("csi-{round}-{i}"), &target, Some(POD_TOKEN), &[]),
                )
            })
            .collect();
        async move {
            let calls = requests.into_iter().map(|(target, request)| {
                let manager = Arc::clone(&manager);
                async move {
                    manager.publish(request).await.expect("publish");
                    target
                }
            });
            futures_util::future::join_all(calls).await
        }
    };
    let targets = publish_all(0).await;
    assert_eq!(
        fx.server.ca.batch_calls.load(Ordering::SeqCst),
        1,
        "twelve publishes at once: one batch attempt"
    );
    assert_eq!(fx.server.ca.pod_calls.load(Ordering::SeqCst), 12);
    for target in &targets {
        let key = std::fs::read_to_string(target.join("tls.key")).expect("key");
        let chain = std::fs::read_to_string(target.join("tls.crt")).expect("chain");
        assert!(credlet_ca::key_matches_certificate(&key, &chain).expect("parse"));
    }
    // Known now: no more batch attempts.
    publish_all(1).await;
    assert_eq!(fx.server.ca.batch_calls.load(Ordering::SeqCst), 1);
    assert_eq!(fx.server.ca.pod_calls.load(Ordering::SeqCst), 24);
}

/// The kubelet's token map with a token for the CA's audience that expires
/// `expires_in` from now.
fn tokens_expiring_in(expires_in: Duration) -> String {
    let expires = time::OffsetDateTime::from(SystemTime::now() + expires_in)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    serde_json::json!({
        support::AUDIENCE: {"token": POD_TOKEN, "expirationTimestamp": expires}
    })
    .to_string()
}

/// Volume `id` at `target` for `duration`, with the kubelet's token map
/// `tokens`.
fn publish_with_tokens(
    fx: &Fixture,
    id: &str,
    target: &Path,
    duration: &str,
    tokens: &str,
) -> PublishRequest {
    fx.request(
        id,
        target,
        None,
        &[
            (attr::DURATION, duration),
            (attr::SERVICE_ACCOUNT_TOKENS, tokens),
        ],
    )
}

/// A token that expires before the volume's renewal point is not kept: the
/// renewal waits, without calling the CA and without counting a failure,
/// for the kubelet's republish with a fresh token, and then renews at once.
#[tokio::test]
async fn renewal_waits_for_a_fresh_token_when_the_held_one_would_have_expired() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_secs(2)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    let target = fx.target("p1");
    let publish = |tokens: String| publish_with_tokens(&fx, "csi-1", &target, "4s", &tokens);
    // Renewal at about 55 % of 4 s; the token expires after 1 s.
    manager
        .publish(publish(tokens_expiring_in(Duration::from_secs(1))))
        .await
        .expect("publish");
    let first = serial(&target);
    let calls_after_publish = fx.server.ca.pod_calls.load(Ordering::SeqCst);

    wait_for(
        "the renewal to wait for a token",
        Duration::from_secs(6),
        || fx.metrics.awaiting_token.get() >= 1,
    )
    .await;
    assert_eq!(
        fx.server.ca.pod_calls.load(Ordering::SeqCst),
        calls_after_publish,
        "no CA call without a token"
    );
    assert_eq!(fx.count(Operation::Renew, Outcome::Error), 0);
    assert_eq!(serial(&target), first, "the current certificate stays");

    // The kubelet republishes with a fresh token: the renewal runs now.
    let republished = Instant::now();
    manager
        .publish(publish(tokens_expiring_in(Duration::from_secs(3600))))
        .await
        .expect("republish");
    wait_for("the renewal", Duration::from_secs(2), || {
        serial(&target) != first
    })
    .await;
    assert!(republished.elapsed() < Duration::from_secs(2));
    assert!(fx.count(Operation::Renew, Outcome::Success) >= 1);
    assert_eq!(fx.count(Operation::Renew, Outcome::Error), 0);
    assert_eq!(fx.metrics.awaiting_token.get(), 1);
}

/// A volume holds its pod's token only when its renewal is near or can not
/// wait for a republish: hour-long certificates renewing in half an hour
/// hold none, a 15-minute one (renewal in 8 min, 7 min to spare) holds
/// one, a certificate renewing in seconds holds one and renews with it;
/// unpublishing lets them go.
#[tokio::test]
async fn tokens_are_held_only_for_renewals_that_are_near_or_can_not_wait() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_secs(2)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    let token_for_an_hour = tokens_expiring_in(Duration::from_secs(3600));
    let publish = |id: &str, target: &Path, duration: &str| {
        publish_with_tokens(&fx, id, target, duration, &token_for_an_hour)
    };
    let (far, tight, near) = (fx.target("far"), fx.target("tight"), fx.target("near"));
    for (id, target, lifetime, held, why) in [
        (
            "csi-far",
            &far,
            "1h",
            0,
            "renewal in about 30 min, 30 min to spare",
        ),
        (
            "csi-far",
            &far,
            "1h",
            0,
            "a republish's fresh token is not held either",
        ),
        // Renewal in about 8 min, but the certificate would be valid less
        // than 7 min past it: too little to wait for a republish.
        ("csi-tight", &tight, "15m", 1, "a renewal that can not wait"),
        ("csi-near", &near, "4s", 2, "renewal in about 2 s"),
    ] {
        manager
            .publish(publish(id, target, lifetime))
            .await
            .expect("publish");
        assert_eq!(fx.metrics.tokens_held.get(), held, "{why}");
    }
    let first = serial(&near);
    wait_for("the renewal", Duration::from_secs(6), || {
        serial(&near) != first
    })
    .await;
    assert_eq!(
        fx.metrics.awaiting_token.get(),
        0,
        "renewed with the held token"
    );
    assert_eq!(fx.count(Operation::Renew, Outcome::Error), 0);

    for (id, path, held_after) in [("csi-near", &near, 1), ("csi-tight", &tight, 0)] {
        let id = VolumeId::parse(id).expect("id");
        let target = TargetPath::parse(path.to_str().expect("utf8"), &fx.root).expect("target");
        manager.unpublish(&id, &target).await.expect("unpublish");
        assert_eq!(fx.metrics.tokens_held.get(), held_after);
    }
}

/// A republish that finds the volume's files broken repairs them with the
/// token it brings, even when that token would not be kept until the
/// renewal.
#[tokio::test]
async fn a_republish_repairs_a_broken_volume_with_the_token_it_brings() {
    let fx = Fixture::new(Duration::from_secs(3600), Duration::from_secs(2)).await;
    let manager = fx.manager().await;
    fx.bootstrap().await;
    let target = fx.target("p1");
    let publish = |tokens: String| publish_with_tokens(&fx, "csi-1", &target, "1h", &tokens);
    // Renewal at about half an hour; the token expires in ten minutes.
    manager
        .publish(publish(tokens_expiring_in(Duration::from_secs(600))))
        .await
        .expect("publish");
    let first = serial(&target);
    std::fs::remove_file(target.join("..data")).expect("break the volume");
    for _ in 0..2 {
        manager
            .publish(publish(tokens_expiring_in(Duration::from_secs(600))))
            .await
            .expect("the republish repairs");
    }
    assert_ne!(serial(&target), first, "re-issued into the repaired volume");
    assert_eq!(fx.count(Operation::Repair, Outcome::Success), 1);
    assert_eq!(fx.count(Operation::Repair, Outcome::Error), 0);
}
