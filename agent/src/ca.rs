//! `credlet ca`: wiring only. Builds the Kubernetes client, starts the CA
//! service (key files watched, TLS, TokenReview) and drains on SIGTERM.

use std::future::Future;

use anyhow::Context;
use credlet_ca_service::CaServer;

use crate::config::CaConfig;

/// Runs the CA service until `shutdown` completes, then drains (bounded by
/// the configured drain timeout).
pub async fn run(config: CaConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = kube_client(&config).await?;
    let server =
        CaServer::start(config.settings.clone(), client).context("starting the CA service")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let bundle = server.keys().trust_bundle();
    tracing::info!(
        listen = %config.listen,
        trust_domain = %config.settings.policy.trust_domain,
        audience = %config.settings.tokens.audience,
        bundle_generation = bundle.generation,
        "credlet ca started"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = server.serve(listener, async move {
        let _ = stop_rx.await;
    });
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return result.context("serving the CA API"),
        () = shutdown => {}
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.drain_timeout, serve).await {
        Ok(result) => result.context("serving the CA API")?,
        Err(_) => tracing::warn!(
            timeout = ?config.drain_timeout,
            "drain timed out; closing remaining connections"
        ),
    }
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
