//! Putting the pieces together: key store + watcher, TLS, token review, pod
//! checks and the gRPC service on one listener.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use credlet_proto::ca::certificate_authority_server::CertificateAuthorityServer;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::jwks::{JwksSettings, JwksVerifier};
use crate::keys::{KeyFiles, KeyStore, KeyWatch};
use crate::pods::{PodCache, PodCacheSettings, PodChecker, PodWatch};
use crate::policy::ServicePolicy;
use crate::service::CaService;
use crate::tls::{ServerNames, ServerTls};
use crate::tokens::{TokenReviewSettings, TokenReviewVerifier, TokenVerifier};

/// Everything `credlet ca` is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The CA's key material.
    pub files: KeyFiles,
    /// The issuance policy.
    pub policy: ServicePolicy,
    /// Token review settings (audience, timeout, cache).
    pub tokens: TokenReviewSettings,
    /// Verify tokens offline against the service account issuer's keys
    /// instead of with TokenReview (`--token-verification jwks`).
    pub jwks: Option<JwksSettings>,
    /// Names of the serving certificate.
    pub server_names: ServerNames,
    /// Timeout of one pod GET.
    pub api_timeout: Duration,
    /// The pod cache (a watch of every pod; needs `list` and `watch` on
    /// `pods`); `None`: one pod GET per check.
    pub pod_cache: Option<PodCacheSettings>,
    /// How long to wait after a key file change before reloading.
    pub reload_debounce: Duration,
}

impl Settings {
    /// Settings with defaults: 5 s API timeouts, 200 ms reload debounce,
    /// the pod cache with its defaults. The server names become the
    /// policy's [`ServicePolicy::ca_names`], so that no issuance path (the
    /// gRPC API or the PodCertificateRequest signer) hands them to a pod.
    pub fn new(
        files: KeyFiles,
        mut policy: ServicePolicy,
        audience: impl Into<String>,
        server_names: ServerNames,
    ) -> Self {
        policy.ca_names = server_names.clone();
        Self {
            files,
            policy,
            tokens: TokenReviewSettings::new(audience),
            jwks: None,
            server_names,
            api_timeout: Duration::from_secs(5),
            pod_cache: Some(PodCacheSettings::default()),
            reload_debounce: Duration::from_millis(200),
        }
    }
}

/// A started CA service, ready to serve.
pub struct CaServer {
    keys: Arc<KeyStore>,
    tls: Arc<ServerTls>,
    service: CaService,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    _watch: KeyWatch,
    reloader: tokio::task::JoinHandle<()>,
    pod_cache: Option<Arc<PodCache>>,
    _pod_watch: Option<PodWatch>,
}

impl std::fmt::Debug for CaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl CaServer {
    /// Loads the key material, starts watching it, issues the serving
    /// certificate, prepares token verification with `client` (TokenReview,
    /// or the issuer's keys fetched and refreshed in the background) and
    /// starts the pod cache's watch (stopped when serving ends). Must run
    /// inside a Tokio runtime.
    pub fn start(settings: Settings, client: kube::Client) -> Result<Self, Error> {
        let tokens: Arc<dyn TokenVerifier> = match &settings.jwks {
            Some(jwks) => JwksVerifier::start(client.clone(), jwks.clone()),
            None => Arc::new(TokenReviewVerifier::new(
                client.clone(),
                settings.tokens.clone(),
            )),
        };
        Self::with_verifier(settings, client, tokens)
    }

    /// Like [`CaServer::start`] with another token verifier.
    pub fn with_verifier(
        settings: Settings,
        client: kube::Client,
        tokens: Arc<dyn TokenVerifier>,
    ) -> Result<Self, Error> {
        settings.policy.validate()?;
        let mut policy = settings.policy.clone();
        // Whatever the settings were built with, the names this server
        // answers to are never a pod's.
        for name in &settings.server_names.dns_names {
            if !policy.ca_names.dns_names.contains(name) {
                policy.ca_names.dns_names.push(name.clone());
            }
        }
        for ip in &settings.server_names.ip_addresses {
            if !policy.ca_names.ip_addresses.contains(ip) {
                policy.ca_names.ip_addresses.push(*ip);
            }
        }
        let policy = Arc::new(policy);
        let keys = KeyStore::load(settings.files.clone(), policy.ca_policy())?;
        let watch = keys.watch(settings.reload_debounce)?;
        let tls = ServerTls::new(&keys, Arc::clone(&policy), settings.server_names.clone())?;
        let reloader = tls.spawn_reloader(Arc::clone(&keys));
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let mut pods = PodChecker::new(client.clone(), settings.api_timeout);
        let mut pod_watch = None;
        if let Some(cache_settings) = &settings.pod_cache {
            let (cache, watch) =
                PodCache::start(client, cache_settings.clone(), shutdown_rx.clone());
            pods = pods.with_cache(cache);
            pod_watch = Some(watch);
        }
        let pod_cache = pods.cache().cloned();
        let service = CaService::new(Arc::clone(&keys), tokens, pods, policy, shutdown_rx);
        Ok(Self {
            keys,
            tls,
            service,
            shutdown_tx,
            _watch: watch,
            reloader,
            pod_cache,
            _pod_watch: pod_watch,
        })
    }

    /// The API's metrics.
    pub fn metrics(&self) -> &crate::metrics::CaServiceMetrics {
        self.service.metrics()
    }

    /// The key store (trust bundle, reload status).
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// The pod cache, unless [`Settings::pod_cache`] is `None`.
    pub fn pod_cache(&self) -> Option<&Arc<PodCache>> {
        self.pod_cache.as_ref()
    }

    /// Serves gRPC over TLS on `listener` until `shutdown` completes, then
    /// stops accepting, ends trust bundle streams and waits for in-flight
    /// requests (bound the wait from outside if needed). The pod cache's
    /// watch stops when `shutdown` completes; checks still in flight GET
    /// their pods.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "CA service listening (TLS 1.3, gRPC)");
        let shutdown_tx = self.shutdown_tx.clone();
        let signal = async move {
            shutdown.await;
            let _ = shutdown_tx.send(true);
            tracing::info!("CA service draining");
        };
        let incoming = self.tls.incoming(listener);
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(CertificateAuthorityServer::new(self.service))
            .serve_with_incoming_shutdown(incoming, signal)
            .await
            .map_err(|e| Error::Serve {
                reason: e.to_string(),
            });
        self.reloader.abort();
        result
    }
}
