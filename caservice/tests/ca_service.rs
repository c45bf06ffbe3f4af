//! End-to-end tests of the CA service: a real tonic client over real rustls
//! mutual TLS on 127.0.0.1, the in-process fake Kubernetes API server
//! answering TokenReviews, pod GETs and the pod cache's list and watch over
//! HTTP, and CA key files on disk watched with notify.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use credlet_ca::{Authority, KeyType, Policy, PrivateKey, inspect_leaf, verify_chain};
use credlet_ca_service::{
    CaServer, JwksSettings, KeyFiles, PodCache, PodCacheSettings, ServerNames, ServicePolicy,
    Settings,
};
use credlet_proto::ca::certificate_authority_client::CertificateAuthorityClient;
use credlet_proto::ca::{
    IssueAgentCertificateRequest, IssuePodCertificateRequest, IssuedCertificate,
    WatchTrustBundleRequest,
};
use credlet_test_util::FakeApiServer;
use credlet_test_util::sa_token::{BoundClaims, IssuerKey, ServiceAccountIssuer};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const AUDIENCE: &str = "credlet-ca";
const TD: &str = "cluster.local";

/// What the fake API server's TokenReview answers for one token.
#[derive(Clone)]
struct TokenFacts {
    username: String,
    extra: BTreeMap<String, Vec<String>>,
    audiences: Vec<String>,
}

type Tokens = Arc<Mutex<HashMap<String, TokenFacts>>>;

struct Harness {
    api: FakeApiServer,
    tokens: Tokens,
    _dir: tempfile::TempDir,
    files: KeyFiles,
    addr: std::net::SocketAddr,
    server: Option<tokio::task::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    keys: Arc<credlet_ca_service::KeyStore>,
    pod_cache: Option<Arc<PodCache>>,
    metrics: credlet_ca_service::metrics::CaServiceMetrics,
    next_token: Mutex<u64>,
}

fn jwt(exp: u64, id: u64) -> String {
    let payload = URL_SAFE_NO_PAD.encode(json!({"exp": exp, "jti": id}).to_string());
    format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2lnbmF0dXJl{id}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn new_ca_pems() -> Result<(String, String)> {
    let (_, cert, key) = Authority::generate_self_signed_with_pems(Policy::new(TD))?;
    Ok((cert, key.to_string()))
}

impl Harness {
    async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    async fn start_with(customize: impl FnOnce(&mut ServicePolicy)) -> Result<Self> {
        Self::start_full(customize, |_| {}, None).await
    }

    /// Like [`Harness::start_with`], with the service's settings adjusted
    /// and, given `kube_url`, the CA's Kubernetes client pointed there
    /// instead of at the fake API server. With the fake API server, returns
    /// once the CA's pod cache is synced.
    async fn start_full(
        customize: impl FnOnce(&mut ServicePolicy),
        adjust: impl FnOnce(&mut Settings),
        kube_url: Option<String>,
    ) -> Result<Self> {
        let wait_synced = kube_url.is_none();
        Self::start_raw(customize, adjust, kube_url, |_| {}, wait_synced).await
    }

    /// Like [`Harness::start_full`]; `before_ca` runs on the fake API
    /// server before the CA starts, and the pod cache is waited for only
    /// if `wait_synced`.
    async fn start_raw(
        customize: impl FnOnce(&mut ServicePolicy),
        adjust: impl FnOnce(&mut Settings),
        kube_url: Option<String>,
        before_ca: impl FnOnce(&FakeApiServer),
        wait_synced: bool,
    ) -> Result<Self> {
        let api = FakeApiServer::start()?;
        before_ca(&api);
        let tokens: Tokens = Arc::default();
        let reviewer_tokens = Arc::clone(&tokens);
        api.set_token_reviewer(move |review: &TokenReview| review_token(&reviewer_tokens, review));
        let dir = tempfile::tempdir()?;
        let (cert, key) = new_ca_pems()?;
        let files = KeyFiles {
            cert: dir.path().join("ca.crt"),
            key: dir.path().join("ca.key"),
            chain: None,
        };
        std::fs::write(&files.cert, cert)?;
        std::fs::write(&files.key, key)?;
        let mut policy = ServicePolicy::new(TD);
        policy.add_dns_template("$POD_NAME.$POD_NAMESPACE.svc")?;
        policy.add_dns_template("*.$POD_NAMESPACE.example.com")?;
        customize(&mut policy);
        let mut settings = Settings::new(
            files.clone(),
            policy,
            AUDIENCE,
            ServerNames::parse(&["localhost", "127.0.0.1"]),
        );
        settings.reload_debounce = Duration::from_millis(100);
        adjust(&mut settings);
        let client = match kube_url {
            Some(url) => kube::Client::try_from(kube::Config::new(url.parse()?))?,
            None => api.kube_client()?,
        };
        let server = CaServer::start(settings, client)?;
        let keys = Arc::clone(server.keys());
        let pod_cache = server.pod_cache().cloned();
        let metrics = server.metrics().clone();
        if wait_synced && let Some(cache) = &pod_cache {
            tokio::time::timeout(Duration::from_secs(10), cache.wait_synced())
                .await
                .context("the pod cache did not sync")?;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        Ok(Self {
            api,
            tokens,
            _dir: dir,
            files,
            addr,
            server: Some(handle),
            stop: Some(stop),
            keys,
            pod_cache,
            metrics,
            next_token: Mutex::new(0),
        })
    }

    /// The CA's pod cache.
    fn pod_cache(&self) -> &PodCache {
        self.pod_cache.as_deref().expect("the pod cache is on")
    }

    /// Waits until the CA's pod cache holds `namespace/name` with `uid`
    /// (`None`: does not hold it). Call on a synced cache: an event seen
    /// there stays seen.
    async fn cached(&self, namespace: &str, name: &str, uid: Option<&str>) -> Result<()> {
        let cache = self.pod_cache();
        assert!(cache.is_synced(), "the pod cache is not synced");
        wait_for(&format!("pod cache: {namespace}/{name} = {uid:?}"), || {
            cache.get(namespace, name).map(|f| f.uid).as_deref() == uid
        })
        .await
    }

    /// GETs of pod `namespace/name` the fake API server has answered.
    fn pod_gets(&self, namespace: &str, name: &str) -> usize {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        self.api
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    }

    /// GETs of single pods the fake API server has answered (list and
    /// watch requests are not counted).
    fn all_pod_gets(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/pods/"))
            .count()
    }

    /// A pod on `node`, returning its uid.
    fn pod(&self, namespace: &str, name: &str, sa: &str, node: &str) -> Result<String> {
        let pod = self.api.create_pod(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "c", "image": "nginx"}]}
        }))?;
        pod.metadata.uid.context("pod without uid")
    }

    /// A bound token for the pod, valid for `audiences`, expiring at `exp`.
    #[allow(clippy::too_many_arguments)]
    fn token_with(
        &self,
        namespace: &str,
        sa: &str,
        pod: &str,
        uid: &str,
        node: &str,
        audiences: &[&str],
        exp: u64,
    ) -> String {
        let id = {
            let mut n = self.next_token.lock().unwrap();
            *n += 1;
            *n
        };
        let token = jwt(exp, id);
        let extra = BTreeMap::from([
            (
                "authentication.kubernetes.io/pod-name".to_owned(),
                vec![pod.to_owned()],
            ),
            (
                "authentication.kubernetes.io/pod-uid".to_owned(),
                vec![uid.to_owned()],
            ),
            (
                "authentication.kubernetes.io/node-name".to_owned(),
                vec![node.to_owned()],
            ),
        ]);
        self.tokens.lock().unwrap().insert(
            token.clone(),
            TokenFacts {
                username: format!("system:serviceaccount:{namespace}:{sa}"),
                extra,
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
            },
        );
        token
    }

    fn token(&self, namespace: &str, sa: &str, pod: &str, uid: &str, node: &str) -> String {
        self.token_with(
            namespace,
            sa,
            pod,
            uid,
            node,
            &[AUDIENCE],
            unix_now() + 3600,
        )
    }

    /// A token the TokenReview authenticates as `username` with `extra`,
    /// for the CA's audience.
    fn raw_token(&self, username: &str, extra: BTreeMap<String, Vec<String>>) -> String {
        let id = {
            let mut n = self.next_token.lock().unwrap();
            *n += 1;
            *n
        };
        let token = jwt(unix_now() + 3600, id);
        self.tokens.lock().unwrap().insert(
            token.clone(),
            TokenFacts {
                username: username.to_owned(),
                extra,
                audiences: vec![AUDIENCE.to_owned()],
            },
        );
        token
    }

    /// An agent client certificate for `node` signed straight from the CA
    /// files, without asking the service (and so without the API server).
    fn agent_certificate_from_files(&self, node: &str) -> Result<(String, PrivateKey)> {
        let cert = std::fs::read_to_string(&self.files.cert)?;
        let key_pem = std::fs::read_to_string(&self.files.key)?;
        let authority = Authority::from_pem(&cert, &key_pem, &cert, Policy::new(TD))?;
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let issued = authority.issue_component(
            &key.certificate_signing_request()?,
            &format!("spiffe://{TD}/credlet/node/{node}"),
            &[],
            &[],
            Duration::from_secs(3600),
            SystemTime::now(),
        )?;
        Ok((issued.chain_pem, key))
    }

    fn bundle_pem(&self) -> String {
        self.keys.trust_bundle().pem.clone()
    }

    /// A client trusting `roots_pem`, with an optional client certificate.
    async fn client(
        &self,
        roots_pem: &str,
        client_cert: Option<(&str, &str)>,
    ) -> Result<CertificateAuthorityClient<Channel>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let mut config = match client_cert {
            Some((chain_pem, key_pem)) => {
                let chain =
                    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                        .collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = self.addr;
        let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))?
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let tls = connector
                        .connect(ServerName::try_from("localhost").unwrap(), tcp)
                        .await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await?;
        Ok(CertificateAuthorityClient::new(channel))
    }

    /// Bootstraps an agent on `node`: its pod, token, key and client
    /// certificate; returns an mTLS client.
    async fn agent(
        &self,
        node: &str,
    ) -> Result<(
        CertificateAuthorityClient<Channel>,
        IssuedCertificate,
        PrivateKey,
    )> {
        self.agent_with(node, |pod, uid| {
            Ok(self.token("credlet-system", "credlet-agent", pod, uid, node))
        })
        .await
    }

    /// Like [`Harness::agent`], with the agent's token made by `token`
    /// from its pod's name and uid.
    async fn agent_with(
        &self,
        node: &str,
        token: impl FnOnce(&str, &str) -> Result<String>,
    ) -> Result<(
        CertificateAuthorityClient<Channel>,
        IssuedCertificate,
        PrivateKey,
    )> {
        let pod = format!("credlet-agent-{node}");
        let uid = self.pod("credlet-system", &pod, "credlet-agent", node)?;
        let token = token(&pod, &uid)?;
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let mut anonymous = self.client(&self.bundle_pem(), None).await?;
        let issued = anonymous
            .issue_agent_certificate(IssueAgentCertificateRequest {
                csr_der: key.certificate_signing_request()?,
                token,
                node_name: node.to_owned(),
            })
            .await?
            .into_inner();
        let client = self
            .client(&self.bundle_pem(), Some((&issued.chain_pem, key.pem())))
            .await?;
        Ok((client, issued, key))
    }

    fn token_reviews(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/tokenreviews"))
            .count()
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .context("drain took too long")??;
        }
        // The pod cache's watch ended with the server.
        if let Some(cache) = &self.pod_cache {
            assert!(!cache.is_fresh(), "the pod cache still answers");
        }
        wait_for("the pod watch to close", || self.api.open_watches() == 0).await
    }
}

fn review_token(tokens: &Tokens, review: &TokenReview) -> TokenReviewStatus {
    let token = review.spec.token.clone().unwrap_or_default();
    let wanted = review.spec.audiences.clone().unwrap_or_default();
    let Some(facts) = tokens.lock().unwrap().get(&token).cloned() else {
        return TokenReviewStatus {
            authenticated: Some(false),
            error: Some(
                "[invalid bearer token, square/go-jose: error in cryptographic primitive]".into(),
            ),
            ..Default::default()
        };
    };
    let common: Vec<String> = facts
        .audiences
        .iter()
        .filter(|a| wanted.contains(a))
        .cloned()
        .collect();
    if common.is_empty() {
        return TokenReviewStatus {
            authenticated: Some(false),
            error: Some(format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                facts.audiences, wanted
            )),
            ..Default::default()
        };
    }
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(common),
        user: Some(UserInfo {
            username: Some(facts.username.clone()),
            uid: Some("sa-uid".into()),
            groups: Some(vec!["system:serviceaccounts".into()]),
            extra: Some(facts.extra.clone()),
        }),
        error: None,
    }
}

fn pod_request(token: String, templates: &[&str]) -> IssuePodCertificateRequest {
    IssuePodCertificateRequest {
        csr_der: PrivateKey::generate(KeyType::EcdsaP256)
            .unwrap()
            .certificate_signing_request()
            .unwrap(),
        token,
        dns_name_templates: templates.iter().map(|t| t.to_string()).collect(),
        duration_seconds: 3600,
        ..Default::default()
    }
}

fn expect_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, contains: &str) {
    match result {
        Ok(ok) => panic!("expected {code:?}, got {ok:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(contains),
                "{:?} does not contain {contains:?}",
                status.message()
            );
        }
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    // 15 s: longer than the 5 s the relist test holds the re-watch back.
    for _ in 0..300 {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("timed out waiting for {what}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_bootstraps_and_issues_a_pod_certificate_from_verified_facts() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent, agent_cert, _) = h.agent("node-a").await?;
    let agent_leaf = inspect_leaf(&agent_cert.chain_pem)?;
    assert_eq!(
        agent_leaf.uris,
        ["spiffe://cluster.local/credlet/node/node-a"]
    );
    verify_chain(
        &agent_cert.chain_pem,
        &agent_cert.trust_bundle_pem,
        SystemTime::now(),
    )?;

    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");
    let key = PrivateKey::generate(KeyType::EcdsaP256)?;
    let request = IssuePodCertificateRequest {
        csr_der: key.certificate_signing_request()?,
        token: token.clone(),
        pod_namespace: "team-a".into(),
        pod_name: "web-0".into(),
        pod_uid: uid.clone(),
        service_account: "web".into(),
        dns_name_templates: vec![
            "$POD_NAME.$POD_NAMESPACE.svc".into(),
            "api.$POD_NAMESPACE.example.com".into(),
        ],
        common_name_template: "$POD_NAME".into(),
        // 10 years: shortened to the 90-day cap, not refused.
        duration_seconds: 10 * 365 * 86400,
        ..Default::default()
    };
    let reviews_before = h.token_reviews();
    let issued = agent
        .issue_pod_certificate(request.clone())
        .await?
        .into_inner();
    assert_eq!(h.token_reviews(), reviews_before + 1);
    verify_chain(
        &issued.chain_pem,
        &issued.trust_bundle_pem,
        SystemTime::now(),
    )?;
    assert!(credlet_ca::key_matches_certificate(
        key.pem(),
        &issued.chain_pem
    )?);
    let leaf = inspect_leaf(&issued.chain_pem)?;
    assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/team-a/sa/web"]);
    assert_eq!(
        leaf.dns_names,
        ["web-0.team-a.svc", "api.team-a.example.com"]
    );
    assert_eq!(leaf.subject, "CN=web-0");
    let lifetime = issued.not_after_unix - issued.not_before_unix;
    assert_eq!(lifetime, 90 * 86400);
    let renew_s = issued.renew_at_unix_ms / 1000;
    assert!(
        renew_s >= issued.not_before_unix + lifetime / 2
            && renew_s <= issued.not_before_unix + lifetime * 7 / 10,
        "renew_at outside 50-70 % of the lifetime"
    );

    // The same token again: the review is cached (no API request).
    let again = agent.issue_pod_certificate(request).await?.into_inner();
    assert_ne!(again.serial_hex, issued.serial_hex);
    assert_eq!(
        h.token_reviews(),
        reviews_before + 1,
        "second call hit the API server"
    );

    // The trust bundle stream starts with the current bundle.
    let mut stream = agent
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await?
        .into_inner();
    let first = stream.message().await?.context("no bundle")?;
    assert_eq!(first.generation, 1);
    assert_eq!(first.pem, h.bundle_pem());
    drop(stream);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_denials() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;

    let wrong_audience = h.token_with(
        "team-a",
        "web",
        "web-0",
        &uid,
        "node-a",
        &["vault"],
        unix_now() + 3600,
    );
    expect_code(
        agent
            .issue_pod_certificate(pod_request(wrong_audience, &[]))
            .await,
        Code::Unauthenticated,
        "audience",
    );

    let reviews = h.token_reviews();
    let expired = h.token_with(
        "team-a",
        "web",
        "web-0",
        &uid,
        "node-a",
        &[AUDIENCE],
        unix_now() - 10,
    );
    expect_code(
        agent.issue_pod_certificate(pod_request(expired, &[])).await,
        Code::Unauthenticated,
        "expired",
    );
    assert_eq!(
        h.token_reviews(),
        reviews,
        "an expired token needs no review"
    );

    expect_code(
        agent
            .issue_pod_certificate(pod_request("not-a-token".into(), &[]))
            .await,
        Code::Unauthenticated,
        "not authenticated",
    );

    // A pod's token can not get an agent certificate.
    let pod_token = h.token("team-a", "web", "web-0", &uid, "node-a");
    let mut anonymous = h.client(&h.bundle_pem(), None).await?;
    expect_code(
        anonymous
            .issue_agent_certificate(IssueAgentCertificateRequest {
                csr_der: pod_request(String::new(), &[]).csr_der,
                token: pod_token.clone(),
                node_name: "node-a".into(),
            })
            .await,
        Code::PermissionDenied,
        "credlet-system/credlet-agent",
    );

    // Request fields that contradict the token.
    let mut request = pod_request(pod_token, &[]);
    request.pod_name = "db-0".into();
    expect_code(
        agent.issue_pod_certificate(request).await,
        Code::PermissionDenied,
        "pod_name",
    );

    // Every answer is counted by RPC and outcome.
    use credlet_ca_service::metrics::Rpc;
    let count = |rpc, outcome| h.metrics.count(rpc, outcome);
    assert_eq!(count(Rpc::IssueAgentCertificate, "Issued"), 1);
    assert_eq!(
        count(Rpc::IssueAgentCertificate, "NotAgentServiceAccount"),
        1
    );
    assert_eq!(count(Rpc::IssuePodCertificate, "TokenWrongAudience"), 1);
    assert_eq!(count(Rpc::IssuePodCertificate, "TokenExpired"), 1);
    assert_eq!(count(Rpc::IssuePodCertificate, "TokenNotAuthenticated"), 1);
    assert_eq!(count(Rpc::IssuePodCertificate, "TokenForAnotherPod"), 1);
    assert_eq!(count(Rpc::IssuePodCertificate, "Issued"), 0);
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    h.metrics.register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    assert!(
        text.contains(
            r#"credlet_ca_requests_total{rpc="IssuePodCertificate",outcome="TokenExpired"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"credlet_ca_request_duration_seconds_count{rpc="IssuePodCertificate"} 4"#),
        "{text}"
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_users_and_unbound_service_accounts_are_denied() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let mut anonymous = h.client(&h.bundle_pem(), None).await?;
    let agent_request = |token: String| IssueAgentCertificateRequest {
        csr_der: pod_request(String::new(), &[]).csr_der,
        token,
        node_name: "node-a".into(),
    };

    // Authenticated, but a user or a node, not a service account; even with
    // pod extras the API server would never set for them.
    let pod_extras = BTreeMap::from([
        (
            "authentication.kubernetes.io/pod-name".to_owned(),
            vec!["web-0".to_owned()],
        ),
        (
            "authentication.kubernetes.io/pod-uid".to_owned(),
            vec![uid.clone()],
        ),
    ]);
    for username in [
        "alice@example.com",
        "system:node:node-a",
        "system:serviceaccount:team-a",
        "system:serviceaccount::web",
        "system:serviceaccount:team-a:web:extra",
    ] {
        let token = h.raw_token(username, pod_extras.clone());
        expect_code(
            agent
                .issue_pod_certificate(pod_request(token.clone(), &[]))
                .await,
            Code::PermissionDenied,
            "not a service account",
        );
        expect_code(
            anonymous
                .issue_agent_certificate(agent_request(token))
                .await,
            Code::PermissionDenied,
            "not a service account",
        );
    }

    // A service account token not bound to a pod (a legacy Secret token,
    // or a TokenRequest without a pod binding): no pod name or uid.
    let mut only_name = pod_extras.clone();
    only_name.remove("authentication.kubernetes.io/pod-uid");
    let mut two_pods = pod_extras.clone();
    two_pods.insert(
        "authentication.kubernetes.io/pod-name".to_owned(),
        vec!["web-0".to_owned(), "web-1".to_owned()],
    );
    for extra in [BTreeMap::new(), only_name, two_pods] {
        let token = h.raw_token("system:serviceaccount:team-a:web", extra);
        expect_code(
            agent.issue_pod_certificate(pod_request(token, &[])).await,
            Code::PermissionDenied,
            "team-a/web is not bound to a pod",
        );
    }
    let unbound_agent = h.raw_token(
        "system:serviceaccount:credlet-system:credlet-agent",
        BTreeMap::new(),
    );
    expect_code(
        anonymous
            .issue_agent_certificate(agent_request(unbound_agent))
            .await,
        Code::PermissionDenied,
        "credlet-system/credlet-agent is not bound to a pod",
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_unreachable_is_unavailable_within_the_timeout() -> Result<()> {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    // Nothing listens on a port that was bound and released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    // Something accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_addr = silent.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    for (case, addr) in [("closed port", closed), ("silent server", silent_addr)] {
        let h = Harness::start_full(
            |_| {},
            |settings| {
                settings.tokens.timeout = TIMEOUT;
                settings.api_timeout = TIMEOUT;
            },
            Some(format!("http://{addr}")),
        )
        .await?;
        let uid = h.pod("team-a", "web-0", "web", "node-a")?;
        let token = h.token("team-a", "web", "web-0", &uid, "node-a");

        // The agent's bootstrap: its TokenReview can not be made.
        let mut anonymous = h.client(&h.bundle_pem(), None).await?;
        let started = std::time::Instant::now();
        let result = anonymous
            .issue_agent_certificate(IssueAgentCertificateRequest {
                csr_der: pod_request(String::new(), &[]).csr_der,
                token: token.clone(),
                node_name: "node-a".into(),
            })
            .await;
        let took = started.elapsed();
        expect_code(result, Code::Unavailable, "Kubernetes API server");
        assert!(
            took < TIMEOUT + Duration::from_secs(1),
            "{case}: IssueAgentCertificate took {took:?}"
        );

        // A pod certificate through an agent whose certificate the CA made
        // earlier: denied as unavailable, not as an identity problem.
        let (chain, key) = h.agent_certificate_from_files("node-a")?;
        let mut agent = h.client(&h.bundle_pem(), Some((&chain, key.pem()))).await?;
        let started = std::time::Instant::now();
        let result = agent.issue_pod_certificate(pod_request(token, &[])).await;
        let took = started.elapsed();
        eprintln!("{case}: {took:?}: {result:?}");
        expect_code(
            result.map(|_| ()),
            Code::Unavailable,
            "the Kubernetes API server is unavailable for TokenReview",
        );
        assert!(
            took < TIMEOUT + Duration::from_secs(1),
            "{case}: IssuePodCertificate took {took:?}"
        );
        h.stop().await?;
    }
    holder.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_and_node_denials() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent_a, _, _) = h.agent("node-a").await?;
    let (mut agent_b, _, _) = h.agent("node-b").await?;

    // Pod gone: the CA's pod cache saw it come and go.
    let uid = h.pod("team-a", "gone-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "gone-0", &uid, "node-a");
    h.cached("team-a", "gone-0", Some(&uid)).await?;
    h.api.delete_pod("team-a", "gone-0")?;
    h.cached("team-a", "gone-0", None).await?;
    expect_code(
        agent_a.issue_pod_certificate(pod_request(token, &[])).await,
        Code::FailedPrecondition,
        "team-a/gone-0",
    );

    // Token replayed for another pod of the same name (uid mismatch).
    let old_uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let old_token = h.token("team-a", "web", "web-0", &old_uid, "node-a");
    h.cached("team-a", "web-0", Some(&old_uid)).await?;
    h.api.delete_pod("team-a", "web-0")?;
    let new_uid = h.pod("team-a", "web-0", "web", "node-a")?;
    assert_ne!(old_uid, new_uid);
    h.cached("team-a", "web-0", Some(&new_uid)).await?;
    expect_code(
        agent_a
            .issue_pod_certificate(pod_request(old_token, &[]))
            .await,
        Code::PermissionDenied,
        "uid",
    );

    // The agent of node B asks for a pod on node A.
    let token = h.token("team-a", "web", "web-0", &new_uid, "node-a");
    expect_code(
        agent_b
            .issue_pod_certificate(pod_request(token.clone(), &[]))
            .await,
        Code::PermissionDenied,
        "node-b",
    );
    // ... even with a token that does not name a node (older clusters):
    // the pod's spec.nodeName decides.
    let unbound_node = h.token("team-a", "web", "web-0", &new_uid, "");
    h.tokens
        .lock()
        .unwrap()
        .get_mut(&unbound_node)
        .unwrap()
        .extra
        .remove("authentication.kubernetes.io/node-name");
    expect_code(
        agent_b
            .issue_pod_certificate(pod_request(unbound_node, &[]))
            .await,
        Code::PermissionDenied,
        "node-b",
    );

    // SAN templates outside the policy.
    expect_code(
        agent_a
            .issue_pod_certificate(pod_request(token.clone(), &["admin.example.com"]))
            .await,
        Code::PermissionDenied,
        "not allowed",
    );
    expect_code(
        agent_a
            .issue_pod_certificate(pod_request(token.clone(), &["a.b.team-a.example.com"]))
            .await,
        Code::PermissionDenied,
        "not allowed",
    );
    let mut request = pod_request(token.clone(), &[]);
    request.ip_addresses = vec!["10.0.0.1".into()];
    expect_code(
        agent_a.issue_pod_certificate(request).await,
        Code::PermissionDenied,
        "IP SAN",
    );
    // The same token is fine for what the policy allows.
    agent_a
        .issue_pod_certificate(pod_request(token, &["$POD_NAME.$POD_NAMESPACE.svc"]))
        .await?;
    h.stop().await
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = haystack.to_vec();
    out[at..at + from.len()].copy_from_slice(to);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_and_client_certificate_denials() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");

    // Unsupported key type: an Ed448 key (the OID of an Ed25519 CSR
    // relabelled).
    let ed = PrivateKey::generate(KeyType::Ed25519)?.certificate_signing_request()?;
    let mut request = pod_request(token.clone(), &[]);
    request.csr_der = replace(
        &ed,
        &[0x06, 0x03, 0x2b, 0x65, 0x70],
        &[0x06, 0x03, 0x2b, 0x65, 0x71],
    );
    expect_code(
        agent.issue_pod_certificate(request).await,
        Code::InvalidArgument,
        "supported are ECDSA P-256",
    );

    // Proof of possession does not verify (signature altered).
    let mut request = pod_request(token.clone(), &[]);
    request.csr_der = ed.clone();
    let last = request.csr_der.len() - 1;
    request.csr_der[last] ^= 0x01;
    expect_code(
        agent.issue_pod_certificate(request).await,
        Code::InvalidArgument,
        "proof of possession",
    );

    // Malformed CSR.
    let mut request = pod_request(token.clone(), &[]);
    request.csr_der = b"not a csr".to_vec();
    expect_code(
        agent.issue_pod_certificate(request).await,
        Code::InvalidArgument,
        "malformed",
    );

    // No client certificate.
    let mut anonymous = h.client(&h.bundle_pem(), None).await?;
    expect_code(
        anonymous
            .issue_pod_certificate(pod_request(token.clone(), &[]))
            .await,
        Code::Unauthenticated,
        "client certificate",
    );

    // A client certificate from another CA naming node-a: the handshake is
    // refused, nothing is issued.
    let other = Authority::generate_self_signed(Policy::new(TD))?;
    let key = PrivateKey::generate(KeyType::EcdsaP256)?;
    let forged = other.issue_component(
        &key.certificate_signing_request()?,
        "spiffe://cluster.local/credlet/node/node-a",
        &[],
        &[],
        Duration::from_secs(3600),
        SystemTime::now(),
    )?;
    let result = async {
        let mut client = h
            .client(&h.bundle_pem(), Some((&forged.chain_pem, key.pem())))
            .await?;
        Ok::<_, anyhow::Error>(
            client
                .issue_pod_certificate(pod_request(token.clone(), &[]))
                .await?,
        )
    }
    .await;
    assert!(result.is_err(), "a foreign client certificate was accepted");

    // A pod certificate (not an agent certificate) does not name a node.
    let pod_key = PrivateKey::generate(KeyType::EcdsaP256)?;
    let mut request = pod_request(token.clone(), &[]);
    request.csr_der = pod_key.certificate_signing_request()?;
    let pod_cert = agent.issue_pod_certificate(request).await?.into_inner();
    let mut as_pod = h
        .client(&h.bundle_pem(), Some((&pod_cert.chain_pem, pod_key.pem())))
        .await?;
    expect_code(
        as_pod.issue_pod_certificate(pod_request(token, &[])).await,
        Code::Unauthenticated,
        "client certificate",
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_key_file_keeps_the_old_ca_serving() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let root_before = h.bundle_pem();
    assert_eq!(h.keys.status().reload_errors, 0);

    write_atomically(
        &h.files.key,
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )?;
    wait_for("the reload error", || h.keys.status().reload_errors > 0).await?;
    let status = h.keys.status();
    assert!(!status.healthy());
    assert!(status.last_error.unwrap().contains("ca.key"));
    // What the alert (deploy/helm PrometheusRule) watches.
    let mut registry = prometheus_client::registry::Registry::default();
    h.keys.register_metrics(&mut registry);
    let mut exposition = String::new();
    prometheus_client::encoding::text::encode(&mut exposition, &registry)?;
    assert!(
        exposition.contains(&format!(
            "credlet_ca_key_reload_errors_total {}",
            status.reload_errors
        )),
        "{exposition}"
    );
    // The CA certificate still signing is the one whose expiry is exported.
    let not_after = h.keys.authority().ca_not_after_unix();
    assert!(
        exposition.contains(&format!(
            "credlet_ca_certificate_expiration_timestamp_seconds {not_after}"
        )),
        "{exposition}"
    );

    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");
    let issued = agent
        .issue_pod_certificate(pod_request(token, &[]))
        .await?
        .into_inner();
    verify_chain(&issued.chain_pem, &root_before, SystemTime::now())?;
    assert_eq!(h.bundle_pem(), root_before);
    assert_eq!(h.keys.trust_bundle().generation, 1);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rollover_publishes_old_and_new_roots() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent, agent_cert, agent_key) = h.agent("node-a").await?;
    let old_root = h.bundle_pem();
    let mut stream = agent
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await?
        .into_inner();
    let first = stream.message().await?.context("no bundle")?;
    assert_eq!(
        (first.generation, first.pem.as_str()),
        (1, old_root.as_str())
    );

    let (new_cert, new_key) = new_ca_pems()?;
    write_atomically(&h.files.key, new_key.as_bytes())?;
    write_atomically(&h.files.cert, new_cert.as_bytes())?;

    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .context("no bundle update")??
        .context("stream ended")?;
    assert!(next.generation > 1);
    let roots: Vec<_> =
        CertificateDer::pem_slice_iter(next.pem.as_bytes()).collect::<Result<_, _>>()?;
    assert_eq!(roots.len(), 2, "old and new roots during the rollover");
    assert!(next.pem.contains(new_cert.trim()));
    assert!(next.pem.contains(old_root.trim()));
    wait_for("a healthy reload", || h.keys.status().healthy()).await?;

    // New leaves chain to the new root (and not to the old one); the
    // agent's existing connection and certificate keep working.
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");
    let issued = agent
        .issue_pod_certificate(pod_request(token.clone(), &[]))
        .await?
        .into_inner();
    verify_chain(&issued.chain_pem, &new_cert, SystemTime::now())?;
    assert!(verify_chain(&issued.chain_pem, &old_root, SystemTime::now()).is_err());
    assert_eq!(issued.trust_bundle_pem, next.pem);

    // A new connection with the agent's old-CA certificate is still
    // accepted (the old root stays trusted for client certificates).
    let mut reconnected = h
        .client(&next.pem, Some((&agent_cert.chain_pem, agent_key.pem())))
        .await?;
    reconnected
        .issue_pod_certificate(pod_request(token, &[]))
        .await?;
    // The serving certificate is re-issued by the new CA.
    let mut served_by_new = false;
    for _ in 0..40 {
        if let Ok(mut client) = h.client(&new_cert, None).await
            && client
                .watch_trust_bundle(WatchTrustBundleRequest {})
                .await
                .is_ok()
        {
            served_by_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served_by_new,
        "the serving certificate was not re-issued by the new CA"
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_with_open_trust_bundle_streams() -> Result<()> {
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let mut stream = agent
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await?
        .into_inner();
    stream.message().await?;
    h.stop().await?;
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await?;
    assert!(matches!(end, Ok(None) | Err(_)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_cache_follows_creates_deletes_recreations_and_relists() -> Result<()> {
    let h = Harness::start().await?;
    let cache = h.pod_cache();
    assert!(cache.is_synced() && cache.is_fresh());

    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    h.cached("team-a", "web-0", Some(&uid)).await?;
    let facts = cache.get("team-a", "web-0").context("cached")?;
    assert_eq!(
        (facts.node_name.as_str(), facts.terminating),
        ("node-a", false)
    );
    h.api.delete_pod("team-a", "web-0")?;
    h.cached("team-a", "web-0", None).await?;
    let new_uid = h.pod("team-a", "web-0", "web", "node-b")?;
    assert_ne!(uid, new_uid);
    h.cached("team-a", "web-0", Some(&new_uid)).await?;
    assert_eq!(cache.get("team-a", "web-0").unwrap().node_name, "node-b");

    // A watch gap the history no longer covers: the re-watch gets 410
    // Expired and the watcher re-lists. A pod deleted and one created
    // during the gap are only learnt from the list.
    let errors_before = cache.watch_errors();
    // The re-watch must reach the server only after the gap below is made
    // and the history expired: a loaded CI machine took over 1.5 s for it.
    h.api
        .delay_requests("GET", "watch=true", 1, Duration::from_secs(5));
    h.api.close_watches();
    h.api.delete_pod("team-a", "web-0")?;
    let gap_uid = h.pod("team-a", "gap-0", "web", "node-a")?;
    h.api.expire_watch_history();
    h.cached("team-a", "gap-0", Some(&gap_uid)).await?;
    h.cached("team-a", "web-0", None).await?;
    assert!(cache.watch_errors() > errors_before, "no 410 was seen");
    assert!(cache.is_synced() && cache.is_fresh());
    assert_eq!(cache.len(), 1);
    let relists = h
        .api
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.is_watch())
        .count();
    assert_eq!(relists, 2, "the first list and one re-list");

    // The watch carries on after the re-list.
    h.api.delete_pod("team-a", "gap-0")?;
    h.cached("team-a", "gap-0", None).await?;
    assert!(cache.is_empty());
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_pod_cache_issues_without_pod_gets() -> Result<()> {
    const PODS: usize = 4;
    const PER_POD: usize = 5;
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let mut tokens = Vec::new();
    for i in 0..PODS {
        let name = format!("web-{i}");
        let uid = h.pod("team-a", &name, "web", "node-a")?;
        h.cached("team-a", &name, Some(&uid)).await?;
        tokens.push(h.token("team-a", "web", &name, &uid, "node-a"));
    }
    h.api.clear_requests();
    for token in &tokens {
        for _ in 0..PER_POD {
            agent
                .issue_pod_certificate(pod_request(token.clone(), &[]))
                .await?;
        }
    }
    assert_eq!(h.all_pod_gets(), 0, "{:?}", h.api.requests());
    // One TokenReview per token, none for the repeats.
    assert_eq!(h.token_reviews(), PODS);

    // A denial by the cache is confirmed with the API server: one GET.
    let stale = h.token(
        "team-a",
        "web",
        "web-0",
        "uid-of-an-earlier-web-0",
        "node-a",
    );
    expect_code(
        agent.issue_pod_certificate(pod_request(stale, &[])).await,
        Code::PermissionDenied,
        "uid",
    );
    assert_eq!(h.pod_gets("team-a", "web-0"), 1);
    assert_eq!(h.all_pod_gets(), 1);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_checks_get_the_pod_until_the_cache_is_synced() -> Result<()> {
    const CALLS: usize = 3;
    // The pod cache's first list hangs: the cache stays unsynced for the
    // whole test.
    let h = Harness::start_raw(
        |_| {},
        |_| {},
        None,
        |api| api.delay_requests("GET", "/api/v1/pods?", 1, Duration::from_secs(60)),
        false,
    )
    .await?;
    let cache = h.pod_cache();
    assert!(!cache.is_synced() && !cache.is_fresh());
    let (mut agent, _, _) = h.agent("node-a").await?;
    assert_eq!(h.pod_gets("credlet-system", "credlet-agent-node-a"), 1);
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");
    for _ in 0..CALLS {
        agent
            .issue_pod_certificate(pod_request(token.clone(), &[]))
            .await?;
    }
    assert_eq!(h.pod_gets("team-a", "web-0"), CALLS);
    // The GET decides denials as before.
    h.api.delete_pod("team-a", "web-0")?;
    expect_code(
        agent.issue_pod_certificate(pod_request(token, &[])).await,
        Code::FailedPrecondition,
        "team-a/web-0",
    );
    assert!(!cache.is_synced(), "the list was not held back");
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_checks_get_the_pod_when_the_watch_is_down_too_long() -> Result<()> {
    let h = Harness::start_full(
        |_| {},
        |settings| {
            settings.pod_cache = Some(PodCacheSettings {
                max_watch_outage: Duration::from_millis(200),
                ..PodCacheSettings::default()
            })
        },
        None,
    )
    .await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    h.cached("team-a", "web-0", Some(&uid)).await?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");
    agent
        .issue_pod_certificate(pod_request(token.clone(), &[]))
        .await?;
    assert_eq!(h.pod_gets("team-a", "web-0"), 0);

    // Every list and watch of pods fails from now on (with 500: kube's
    // client retries 503s by itself).
    h.api.fail_requests("GET", "/api/v1/pods?", 10_000, 500);
    h.api.close_watches();
    let cache = h.pod_cache();
    wait_for("the pod cache to go stale", || !cache.is_fresh()).await?;
    assert!(cache.is_synced() && cache.watch_errors() > 0);
    agent
        .issue_pod_certificate(pod_request(token.clone(), &[]))
        .await?;
    assert_eq!(h.pod_gets("team-a", "web-0"), 1);
    // A pod deleted while the watch is down is refused (by the GET).
    h.api.delete_pod("team-a", "web-0")?;
    expect_code(
        agent.issue_pod_certificate(pod_request(token, &[])).await,
        Code::FailedPrecondition,
        "team-a/web-0",
    );
    assert_eq!(h.pod_gets("team-a", "web-0"), 2);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pod_cache_every_check_gets_the_pod() -> Result<()> {
    let h = Harness::start_full(|_| {}, |settings| settings.pod_cache = None, None).await?;
    assert!(h.pod_cache.is_none());
    let (mut agent, _, _) = h.agent("node-a").await?;
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");
    for _ in 0..2 {
        agent
            .issue_pod_certificate(pod_request(token.clone(), &[]))
            .await?;
    }
    assert_eq!(h.pod_gets("team-a", "web-0"), 2);
    assert!(
        !h.api.requests().iter().any(|r| r.path == "/api/v1/pods"),
        "no list or watch of pods"
    );
    h.stop().await
}

/// `IssuePodCertificates`: every entry is answered as the single call
/// would answer it, a denial fails only its own entry, the trust bundle
/// comes once, and the batch size is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_are_answered_entry_by_entry() -> Result<()> {
    use credlet_proto::ca::{
        IssuePodCertificatesRequest, issue_pod_certificate_result::Result as Entry,
    };
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let mut requests = Vec::new();
    let mut keys = Vec::new();
    for i in 0..5 {
        let name = format!("web-{i}");
        let uid = h.pod("team-a", &name, "web", "node-a")?;
        let token = h.token("team-a", "web", &name, &uid, "node-a");
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let mut request = pod_request(token, &["$POD_NAME.$POD_NAMESPACE.svc"]);
        request.csr_der = key.certificate_signing_request()?;
        request.pod_name = name;
        requests.push(request);
        keys.push(key);
    }
    // Entry 2 names another pod than its token; entry 4 asks for a name the
    // policy does not allow.
    requests[2].pod_name = "db-0".into();
    requests[4].dns_name_templates = vec!["evil.example.com".into()];

    let answer = agent
        .issue_pod_certificates(IssuePodCertificatesRequest { requests })
        .await?
        .into_inner();
    assert_eq!(answer.results.len(), 5);
    assert_eq!(answer.trust_bundle_pem, h.bundle_pem());
    for (i, entry) in answer.results.iter().enumerate() {
        match (i, entry.result.as_ref().context("empty entry")?) {
            (2, Entry::Refused(refusal)) => {
                assert_eq!(refusal.code, Code::PermissionDenied as i32);
                assert!(refusal.message.contains("pod_name"), "{}", refusal.message);
            }
            (4, Entry::Refused(refusal)) => {
                assert_eq!(refusal.code, Code::PermissionDenied as i32);
                assert!(
                    refusal.message.contains("evil.example.com"),
                    "{}",
                    refusal.message
                );
            }
            (0 | 1 | 3, Entry::Issued(issued)) => {
                assert!(issued.trust_bundle_pem.is_empty(), "bundle repeated");
                verify_chain(
                    &issued.chain_pem,
                    &answer.trust_bundle_pem,
                    SystemTime::now(),
                )?;
                assert!(credlet_ca::key_matches_certificate(
                    keys[i].pem(),
                    &issued.chain_pem
                )?);
                let leaf = inspect_leaf(&issued.chain_pem)?;
                assert_eq!(leaf.dns_names, [format!("web-{i}.team-a.svc")]);
            }
            (i, other) => bail!("entry {i}: unexpected {other:?}"),
        }
    }

    use credlet_ca_service::metrics::Rpc;
    assert_eq!(h.metrics.count(Rpc::IssuePodCertificates, "Issued"), 3);
    assert_eq!(
        h.metrics
            .count(Rpc::IssuePodCertificates, "TokenForAnotherPod"),
        1
    );
    assert_eq!(h.metrics.count(Rpc::IssuePodCertificate, "Issued"), 0);

    // Empty and oversized batches are refused as a whole.
    expect_code(
        agent
            .issue_pod_certificates(IssuePodCertificatesRequest { requests: vec![] })
            .await,
        Code::InvalidArgument,
        "1 to 256",
    );
    let one = pod_request(String::new(), &[]);
    expect_code(
        agent
            .issue_pod_certificates(IssuePodCertificatesRequest {
                requests: vec![one; 257],
            })
            .await,
        Code::InvalidArgument,
        "257 entries",
    );
    // Without a client certificate every entry is refused.
    let mut anonymous = h.client(&h.bundle_pem(), None).await?;
    let answer = anonymous
        .issue_pod_certificates(IssuePodCertificatesRequest {
            requests: vec![pod_request(String::new(), &[])],
        })
        .await?
        .into_inner();
    assert!(matches!(
        answer.results[0].result,
        Some(Entry::Refused(ref r)) if r.code == Code::Unauthenticated as i32
    ));
    h.stop().await
}

/// Requested names in the agent's template grammar (`${NAME}` and
/// `$TRUST_DOMAIN` included) and a requested SPIFFE ID, expanded from the
/// verified token; an ID outside the pod's path is refused with the code
/// of a refused DNS name, alone and in a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_and_spiffe_ids_expand_from_verified_facts() -> Result<()> {
    use credlet_proto::ca::{
        IssuePodCertificatesRequest, issue_pod_certificate_result::Result as Entry,
    };
    let h = Harness::start().await?;
    let (mut agent, _, _) = h.agent("node-a").await?;
    let uid = h.pod("team-a", "web-0", "web", "node-a")?;
    let token = h.token("team-a", "web", "web-0", &uid, "node-a");
    let request = |spiffe_id: &str| {
        let mut request = pod_request(
            token.clone(),
            &[
                "${POD_NAME}.${POD_NAMESPACE}.svc",
                "api.$POD_NAMESPACE.example.com",
            ],
        );
        request.common_name_template = "${POD_NAME}".into();
        request.spiffe_id_template = spiffe_id.into();
        request
    };
    let below = "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/${SERVICE_ACCOUNT_NAME}/$POD_NAME";
    let outside = "spiffe://$TRUST_DOMAIN/ns/kube-system/sa/$SERVICE_ACCOUNT_NAME";

    let issued = agent
        .issue_pod_certificate(request(below))
        .await?
        .into_inner();
    let leaf = inspect_leaf(&issued.chain_pem)?;
    assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/team-a/sa/web/web-0"]);
    assert_eq!(
        leaf.dns_names,
        ["web-0.team-a.svc", "api.team-a.example.com"]
    );
    assert_eq!(leaf.subject, "CN=web-0");
    expect_code(
        agent.issue_pod_certificate(request(outside)).await,
        Code::PermissionDenied,
        "URI SAN \"spiffe://cluster.local/ns/kube-system/sa/web\"",
    );
    expect_code(
        agent
            .issue_pod_certificate(request("spiffe://cluster.local/ns/team-a/sa/web-admin"))
            .await,
        Code::PermissionDenied,
        "spiffe://cluster.local/ns/team-a/sa/web or a path below it",
    );
    expect_code(
        agent
            .issue_pod_certificate(request("spiffe://$TRUST_DOMAIN/ns/$NAMESPACE/sa/web"))
            .await,
        Code::InvalidArgument,
        "unknown variable $NAMESPACE",
    );

    // The batch call carries the template too.
    let answer = agent
        .issue_pod_certificates(IssuePodCertificatesRequest {
            requests: vec![request(""), request(below), request(outside)],
        })
        .await?
        .into_inner();
    let uris = |entry: &credlet_proto::ca::IssuePodCertificateResult| -> Result<Vec<String>> {
        match entry.result.as_ref().context("empty entry")? {
            Entry::Issued(issued) => Ok(inspect_leaf(&issued.chain_pem)?.uris),
            Entry::Refused(refusal) => bail!("refused: {}", refusal.message),
        }
    };
    assert_eq!(
        uris(&answer.results[0])?,
        ["spiffe://cluster.local/ns/team-a/sa/web"]
    );
    assert_eq!(
        uris(&answer.results[1])?,
        ["spiffe://cluster.local/ns/team-a/sa/web/web-0"]
    );
    match answer.results[2].result.as_ref().context("empty entry")? {
        Entry::Refused(refusal) => {
            assert_eq!(refusal.code, Code::PermissionDenied as i32);
            assert!(
                refusal.message.contains("ns/kube-system"),
                "{}",
                refusal.message
            );
        }
        other => bail!("an ID outside the pod's path was issued: {other:?}"),
    }
    use credlet_ca_service::metrics::Rpc;
    assert_eq!(
        h.metrics.count(Rpc::IssuePodCertificate, "SanNotAllowed"),
        2
    );
    assert_eq!(
        h.metrics.count(Rpc::IssuePodCertificates, "SanNotAllowed"),
        1
    );
    h.stop().await
}

// ----- offline verification against the service account issuer's keys -----

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Claims of a token for `pod` (`uid`) of `namespace/sa` on `node`.
fn claims(namespace: &str, sa: &str, pod: &str, uid: &str, node: &str) -> BoundClaims {
    BoundClaims {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        namespace: namespace.into(),
        service_account: sa.into(),
        pod: pod.into(),
        pod_uid: uid.into(),
        node: node.into(),
        lifetime_s: 3600,
    }
}

/// JWKS verification with the issuer discovered and unknown key ids
/// fetched at once.
fn jwks_settings(settings: &mut Settings) {
    let mut jwks = JwksSettings::new(AUDIENCE);
    jwks.min_refetch_interval = Duration::ZERO;
    settings.jwks = Some(jwks);
}

fn jwks_fetches(h: &Harness) -> usize {
    h.api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/openid/v1/jwks")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_verified_offline_against_the_issuer_keys() -> Result<()> {
    let mut issuer = ServiceAccountIssuer::es256(ISSUER)?;
    issuer.keys.push(IssuerKey::rs256("rs256-key")?);
    let jwks = issuer.jwks();
    let h = Harness::start_raw(
        |_| {},
        jwks_settings,
        None,
        |api| api.set_service_account_issuer(ISSUER, jwks),
        true,
    )
    .await?;
    let (mut agent, _, _) = h
        .agent_with("node-a", |pod, uid| {
            issuer.mint(&claims(
                "credlet-system",
                "credlet-agent",
                pod,
                uid,
                "node-a",
            ))
        })
        .await?;

    // Pod certificates from ES256 and RS256 tokens, without a TokenReview.
    let uid0 = h.pod("team-a", "web-0", "web", "node-a")?;
    let uid1 = h.pod("team-a", "web-1", "web", "node-a")?;
    let es_token = issuer.mint(&claims("team-a", "web", "web-0", &uid0, "node-a"))?;
    let rs_token =
        issuer.keys[1].sign(&claims("team-a", "web", "web-1", &uid1, "node-a").to_json())?;
    for (token, pod) in [(es_token.clone(), "web-0"), (rs_token, "web-1")] {
        let issued = agent
            .issue_pod_certificate(pod_request(token, &["$POD_NAME.$POD_NAMESPACE.svc"]))
            .await?
            .into_inner();
        let leaf = inspect_leaf(&issued.chain_pem)?;
        assert_eq!(leaf.uris, [format!("spiffe://{TD}/ns/team-a/sa/web")]);
        assert_eq!(leaf.dns_names, [format!("{pod}.team-a.svc")]);
    }
    assert_eq!(h.token_reviews(), 0, "no TokenReview in jwks mode");
    let fetches = jwks_fetches(&h);
    assert!(fetches >= 1, "the keys were fetched");
    // A verified token is cached: no second signature check is visible,
    // but neither is another fetch.
    agent
        .issue_pod_certificate(pod_request(es_token.clone(), &[]))
        .await?;
    assert_eq!(jwks_fetches(&h), fetches);

    // Denials, each with the reason and without the token.
    let deny = |token: String, code: Code, mention: &'static str| {
        let mut agent = agent.clone();
        async move {
            let result = agent
                .issue_pod_certificate(pod_request(token.clone(), &[]))
                .await;
            if let Err(status) = &result
                && token.len() > 20
            {
                assert!(
                    !status.message().contains(&token[token.len() - 20..]),
                    "the token leaked into {:?}",
                    status.message()
                );
            }
            expect_code(result, code, mention);
        }
    };
    let mut wrong_audience = claims("team-a", "web", "web-0", &uid0, "node-a");
    wrong_audience.audiences = vec!["vault".into()];
    deny(
        issuer.mint(&wrong_audience)?,
        Code::Unauthenticated,
        "audience",
    )
    .await;
    let mut expired = claims("team-a", "web", "web-0", &uid0, "node-a");
    expired.lifetime_s = -5;
    deny(issuer.mint(&expired)?, Code::Unauthenticated, "expired").await;
    // Another issuer's key under the same key id.
    let impostor = ServiceAccountIssuer::es256(ISSUER)?;
    deny(
        impostor.mint(&claims("team-a", "web", "web-0", &uid0, "node-a"))?,
        Code::Unauthenticated,
        "signature does not verify",
    )
    .await;
    // Signed by the cluster's key, but naming another issuer.
    let other_iss = issuer.keys[0].sign(&{
        let mut c = claims("team-a", "web", "web-0", &uid0, "node-a").to_json();
        c["iss"] = json!("https://other-cluster.example");
        c
    })?;
    deny(other_iss, Code::Unauthenticated, "issued by").await;
    deny("not.a.jwt".into(), Code::Unauthenticated, "well-formed").await;
    // Bound to a pod on another node than the calling agent's.
    let uid_b = h.pod("team-a", "web-b", "web", "node-b")?;
    deny(
        issuer.mint(&claims("team-a", "web", "web-b", &uid_b, "node-b"))?,
        Code::PermissionDenied,
        "node-b",
    )
    .await;
    // A token of a pod that is gone.
    let gone = issuer.mint(&claims(
        "team-a",
        "web",
        "web-9",
        "uid-of-a-deleted-pod",
        "node-a",
    ))?;
    deny(gone, Code::FailedPrecondition, "does not exist").await;
    // web-0's token replayed for web-1.
    let mut replay = pod_request(es_token, &[]);
    replay.pod_name = "web-1".into();
    expect_code(
        agent.issue_pod_certificate(replay).await,
        Code::PermissionDenied,
        "can only be used for its own pod",
    );

    // The issuer rotates its signing key: a token with the new key id
    // fetches the keys again and is accepted.
    issuer.keys.insert(0, IssuerKey::es256("es256-key-2")?);
    h.api.set_service_account_issuer(ISSUER, issuer.jwks());
    let uid2 = h.pod("team-a", "web-2", "web", "node-a")?;
    let rotated = issuer.mint(&claims("team-a", "web", "web-2", &uid2, "node-a"))?;
    agent
        .issue_pod_certificate(pod_request(rotated, &[]))
        .await
        .context("a token signed with the rotated key")?;
    assert!(
        jwks_fetches(&h) > fetches,
        "the unknown key id fetched the keys"
    );
    assert_eq!(h.token_reviews(), 0);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_issuer_keys_tokens_are_refused_as_unavailable_until_they_load() -> Result<()> {
    // Service account issuer discovery answers 404 at first.
    let h = Harness::start_raw(|_| {}, jwks_settings, None, |_| {}, true).await?;
    let issuer = ServiceAccountIssuer::es256(ISSUER)?;
    let mut anonymous = h.client(&h.bundle_pem(), None).await?;
    let uid = h.pod(
        "credlet-system",
        "credlet-agent-node-a",
        "credlet-agent",
        "node-a",
    )?;
    let token = issuer.mint(&claims(
        "credlet-system",
        "credlet-agent",
        "credlet-agent-node-a",
        &uid,
        "node-a",
    ))?;
    let key = PrivateKey::generate(KeyType::EcdsaP256)?;
    let request = IssueAgentCertificateRequest {
        csr_der: key.certificate_signing_request()?,
        token,
        node_name: "node-a".into(),
    };
    expect_code(
        anonymous.issue_agent_certificate(request.clone()).await,
        Code::Unavailable,
        "service account issuer keys",
    );
    // Discovery turned on: the next request fetches and passes.
    h.api.set_service_account_issuer(ISSUER, issuer.jwks());
    let issued = anonymous
        .issue_agent_certificate(request)
        .await?
        .into_inner();
    assert_eq!(
        inspect_leaf(&issued.chain_pem)?.uris,
        [format!("spiffe://{TD}/credlet/node/node-a")]
    );
    assert_eq!(h.token_reviews(), 0);
    h.stop().await
}
