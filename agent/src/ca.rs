//! `credlet ca`: wiring only. Builds the Kubernetes client, starts the CA
//! service (key files watched, TLS, TokenReview), the PodCertificateRequest
//! signer when `--signer-name` is given (leader election, controller,
//! ClusterTrustBundle publishing, sharing the CA's keys, policy and client)
//! and the metrics/probe server, and drains on SIGTERM: the signer stops
//! writing and releases its Lease first, so another replica takes over at
//! once.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use credlet_ca_service::CaServer;
use credlet_signer::{SignerMetrics, SignerRuntime};
use prometheus_client::registry::Registry;

use crate::config::CaConfig;
use crate::health::HealthState;

/// Longest wait for the signer to stop and release its Lease at shutdown.
const SIGNER_RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the CA service until `shutdown` completes, then drains (bounded by
/// the configured drain timeout).
pub async fn run(config: CaConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = kube_client(&config).await?;
    let server = CaServer::start(config.settings.clone(), client.clone())
        .context("starting the CA service")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let keys = Arc::clone(server.keys());
    let bundle = keys.trust_bundle();
    tracing::info!(
        listen = %config.listen,
        trust_domain = %config.settings.policy.trust_domain,
        audience = %config.settings.tokens.audience,
        bundle_generation = bundle.generation,
        "credlet ca started"
    );

    let metrics = SignerMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    server.metrics().register(&mut registry);
    server.keys().register_metrics(&mut registry);
    let signer = match &config.signer {
        Some(settings) => Some(
            SignerRuntime::start(
                client,
                Arc::clone(&keys),
                Arc::new(config.settings.policy.clone()),
                settings.clone(),
                metrics.clone(),
            )
            .await
            .context("starting the PodCertificateRequest signer")?,
        ),
        None => None,
    };

    let (health_stop_tx, health_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let health = match config.metrics_listen {
        Some(addr) => {
            let health_keys = Arc::clone(&keys);
            let state = HealthState::new(registry).with_check("ca-keys", move || {
                let status = health_keys.status();
                match status.last_error {
                    None => Ok(()),
                    Some(error) => Err(format!("CA key material does not load: {error}")),
                }
            });
            // Certificates matter more than probes: a busy port is logged
            // (and shows as a failing probe), not fatal.
            match crate::health::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
                    Some(tokio::spawn(crate::health::serve(
                        listener,
                        Arc::new(state),
                        async move {
                            let _ = health_stop_rx.await;
                        },
                    )))
                }
                Err(error) => {
                    tracing::error!(%addr, error = %error, "cannot serve metrics and probes (--metrics-listen)");
                    None
                }
            }
        }
        None => None,
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = server.serve(listener, async move {
        let _ = stop_rx.await;
    });
    tokio::pin!(serve);
    let served = tokio::select! {
        result = &mut serve => Some(result),
        () = shutdown => None,
    };
    // Bounded: a slow API server must not eat the pod's termination grace
    // period; an unreleased Lease just expires.
    if let Some(signer) = signer {
        match tokio::time::timeout(SIGNER_RELEASE_TIMEOUT, signer.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                error = %error,
                "releasing the signer Lease failed; another replica takes over after it expires"
            ),
            Err(_) => tracing::warn!(
                timeout = ?SIGNER_RELEASE_TIMEOUT,
                "releasing the signer Lease timed out; another replica takes over after it expires"
            ),
        }
    }
    let result = match served {
        Some(result) => result.context("serving the CA API"),
        None => {
            let _ = stop_tx.send(());
            match tokio::time::timeout(config.drain_timeout, serve).await {
                Ok(result) => result.context("serving the CA API"),
                Err(_) => {
                    tracing::warn!(
                        timeout = ?config.drain_timeout,
                        "drain timed out; closing remaining connections"
                    );
                    Ok(())
                }
            }
        }
    };
    let _ = health_stop_tx.send(());
    if let Some(health) = health {
        let _ = health.await;
    }
    result?;
    tracing::info!("credlet ca stopped");
    Ok(())
}

async fn kube_client(config: &CaConfig) -> anyhow::Result<kube::Client> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API configuration (in-cluster or $KUBECONFIG); the CA needs it for TokenReviews and pod lookups",
        )?,
    };
    kube::Client::try_from(kube_config).context("building the Kubernetes client")
}
