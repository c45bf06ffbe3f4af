//! Putting the pieces together: key store + watcher, TLS, token review, pod
//! checks and the gRPC service on one listener.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use credlet_proto::ca::certificate_authority_server::CertificateAuthorityServer;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::keys::{KeyFiles, KeyStore, KeyWatch};
use crate::pods::PodChecker;
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
    /// Names of the serving certificate.
    pub server_names: ServerNames,
    /// Timeout of one pod GET.
    pub api_timeout: Duration,
    /// How long to wait after a key file change before reloading.
    pub reload_debounce: Duration,
}

impl Settings {
    /// Settings with defaults: 5 s API timeouts, 200 ms reload debounce.
    pub fn new(
        files: KeyFiles,
        policy: ServicePolicy,
        audience: impl Into<String>,
        server_names: ServerNames,
    ) -> Self {
        Self {
            files,
            policy,
            tokens: TokenReviewSettings::new(audience),
            server_names,
            api_timeout: Duration::from_secs(5),
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
    /// certificate and prepares TokenReview verification with `client`.
    /// Must run inside a Tokio runtime.
    pub fn start(settings: Settings, client: kube::Client) -> Result<Self, Error> {
        let tokens = Arc::new(TokenReviewVerifier::new(
            client.clone(),
            settings.tokens.clone(),
        ));
        Self::with_verifier(settings, client, tokens)
    }

    /// Like [`CaServer::start`] with another token verifier.
    pub fn with_verifier(
        settings: Settings,
        client: kube::Client,
        tokens: Arc<dyn TokenVerifier>,
    ) -> Result<Self, Error> {
        settings.policy.validate()?;
        let policy = Arc::new(settings.policy.clone());
        let keys = KeyStore::load(settings.files.clone(), policy.ca_policy())?;
        let watch = keys.watch(settings.reload_debounce)?;
        let tls = ServerTls::new(&keys, Arc::clone(&policy), settings.server_names.clone())?;
        let reloader = tls.spawn_reloader(Arc::clone(&keys));
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let service = CaService::new(
            Arc::clone(&keys),
            tokens,
            PodChecker::new(client, settings.api_timeout),
            policy,
            shutdown_rx,
        );
        Ok(Self {
            keys,
            tls,
            service,
            shutdown_tx,
            _watch: watch,
            reloader,
        })
    }

    /// The key store (trust bundle, reload status).
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Serves gRPC over TLS on `listener` until `shutdown` completes, then
    /// stops accepting, ends trust bundle streams and waits for in-flight
    /// requests (bound the wait from outside if needed).
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
