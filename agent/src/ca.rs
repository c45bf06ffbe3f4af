//! `credlet ca`: wiring only. Builds the Kubernetes client, starts the CA
//! service (key files watched, TLS, TokenReview), the PodCertificateRequest
//! signer when `--signer-name` is given (leader election, controller,
//! ClusterTrustBundle publishing, sharing the CA's keys, policy and client)
//! and the metrics/probe server, and drains on SIGTERM: the signer stops
//! writing and releases its Lease first, so another replica takes over at
//! once.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use credlet_ca_service::CaServer;
use credlet_ca_service::pods::PodCache;
use credlet_signer::{SignerError, SignerMetrics, SignerRuntime, SignerRuntimeSettings};
use prometheus_client::registry::Registry;

use crate::config::{CaConfig, ConfigError};
use crate::health::HealthState;

/// Longest wait for the signer to stop and release its Lease at shutdown.
const SIGNER_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the API server's reachability is checked for `/readyz`.
const API_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Bound of one reachability check.
const API_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between attempts to start the signer.
const SIGNER_RETRY_CAP: Duration = Duration::from_secs(60);

/// Runs the CA service until `shutdown` completes, then drains (bounded by
/// the configured drain timeout).
pub async fn run(config: CaConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Ports first: a busy one is a configuration error before anything
    // (the signer's leader election included) starts.
    let listener = crate::health::bind(config.listen)
        .await
        .map_err(|e| ConfigError::listen("--listen", config.listen, &e))?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some((
            addr,
            crate::health::bind(addr)
                .await
                .map_err(|e| ConfigError::listen("--metrics-listen", addr, &e))?,
        )),
        None => None,
    };
    let client = crate::kubeapi::client(
        config.kubeconfig.as_deref(),
        "the CA needs it for TokenReviews and pod lookups",
    )
    .await?;
    let server = CaServer::start(config.settings.clone(), client.clone()).map_err(|e| match e {
        // What the files hold, not just whether they open.
        credlet_ca_service::Error::KeyMaterial { .. }
        | credlet_ca_service::Error::Authority { .. } => {
            anyhow::Error::new(ConfigError::of(&["--ca-cert", "--ca-key"], e.to_string()))
        }
        other => anyhow::Error::new(other).context("starting the CA service"),
    })?;
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
    crate::metrics::register_common(&mut registry, "ca");
    metrics.register(&mut registry);
    server.metrics().register(&mut registry);
    server.keys().register_metrics(&mut registry);
    let api = ApiReachability::start(client.clone(), server.pod_cache().cloned());
    let signer = match &config.signer {
        Some(settings) => Some(
            SignerSlot::start(
                client.clone(),
                Arc::clone(&keys),
                Arc::new(config.settings.policy.clone()),
                settings.clone(),
                metrics.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let (health_stop_tx, health_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let health = match metrics_listener {
        Some((addr, listener)) => {
            let health_keys = Arc::clone(&keys);
            let mut state = HealthState::new(registry)
                .with_check("ca-keys", move || {
                    if let Some(error) = health_keys.status().last_error {
                        return Err(format!("CA key material does not load: {error}"));
                    }
                    ca_certificate_valid(
                        health_keys.authority().ca_not_after_unix(),
                        std::time::SystemTime::now(),
                    )
                })
                .with_check("api-server", move || api.check());
            if let Some(signer) = &signer {
                let signer = Arc::clone(&signer.state);
                state = state.with_degradation("signer", move || lock(&signer).clone());
            }
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            Some(tokio::spawn(crate::health::serve(
                listener,
                Arc::new(state),
                async move {
                    let _ = health_stop_rx.await;
                },
            )))
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
    if let Some(runtime) = signer.and_then(SignerSlot::stop) {
        match tokio::time::timeout(SIGNER_RELEASE_TIMEOUT, runtime.shutdown()).await {
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Readiness of the signing CA certificate: it must not have expired (a CA
/// past its notAfter signs nothing a client accepts).
fn ca_certificate_valid(not_after_unix: i64, now: SystemTime) -> Result<(), String> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if not_after_unix <= now {
        return Err(format!(
            "the CA certificate expired {}s ago; install a new one in the CA key Secret",
            now - not_after_unix
        ));
    }
    Ok(())
}

/// Whether the API server answers (TokenReviews, pod checks and the
/// issuer's keys all come from it) and the pod watch, when there is one,
/// is synced; checked in the background so probes never wait on the API.
struct ApiReachability {
    /// `None` when the last check succeeded, else why not.
    last: Arc<Mutex<Option<String>>>,
    pods: Option<Arc<PodCache>>,
}

impl ApiReachability {
    fn start(client: kube::Client, pods: Option<Arc<PodCache>>) -> Self {
        let last = Arc::new(Mutex::new(Some("not checked yet".to_owned())));
        let written = Arc::clone(&last);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(API_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let outcome =
                    match tokio::time::timeout(API_CHECK_TIMEOUT, client.apiserver_version()).await
                    {
                        Ok(Ok(_)) => None,
                        Ok(Err(error)) => Some(format!("the API server does not answer: {error}")),
                        Err(_) => Some(format!(
                            "the API server did not answer within {API_CHECK_TIMEOUT:?}"
                        )),
                    };
                let mut last = lock(&written);
                if outcome.is_some() && last.is_none() {
                    tracing::warn!(reason = ?outcome, "the API server is unreachable; TokenReviews and pod checks fail until it is back");
                }
                *last = outcome;
            }
        });
        Self { last, pods }
    }

    fn check(&self) -> Result<(), String> {
        if let Some(why) = lock(&self.last).clone() {
            return Err(why);
        }
        match &self.pods {
            Some(pods) if !pods.is_synced() => {
                Err("the pod watch has not synced with the API server yet".into())
            }
            _ => Ok(()),
        }
    }
}

/// The PodCertificateRequest signer, started beside the CA. A signer that
/// can not start for a reason the API server may fix (discovery, a Lease
/// call) is retried in the background with the reason in `/readyz`; the CA
/// keeps serving agents meanwhile. A configuration error stays fatal.
struct SignerSlot {
    runtime: Arc<Mutex<Option<SignerRuntime>>>,
    /// `None` once running, else why it is not.
    state: Arc<Mutex<Option<String>>>,
    retry: Option<tokio::task::JoinHandle<()>>,
}

impl SignerSlot {
    async fn start(
        client: kube::Client,
        keys: Arc<credlet_ca_service::KeyStore>,
        policy: Arc<credlet_ca_service::ServicePolicy>,
        settings: SignerRuntimeSettings,
        metrics: SignerMetrics,
    ) -> anyhow::Result<Self> {
        let attempt = move || {
            SignerRuntime::start(
                client.clone(),
                Arc::clone(&keys),
                Arc::clone(&policy),
                settings.clone(),
                metrics.clone(),
            )
        };
        let first = attempt().await;
        let runtime = Arc::new(Mutex::new(None));
        let state = Arc::new(Mutex::new(None));
        let error = match first {
            Ok(started) => {
                *lock(&runtime) = Some(started);
                return Ok(Self {
                    runtime,
                    state,
                    retry: None,
                });
            }
            Err(error @ SignerError::Config { .. }) => {
                return Err(
                    anyhow::Error::new(error).context("starting the PodCertificateRequest signer")
                );
            }
            Err(error) => error,
        };
        let why = |error: &SignerError| format!("not started, retrying: {error}");
        tracing::warn!(%error, "the PodCertificateRequest signer did not start; the CA serves agents and retries it");
        *lock(&state) = Some(why(&error));
        let (slot, reason) = (Arc::clone(&runtime), Arc::clone(&state));
        let retry = tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            loop {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(SIGNER_RETRY_CAP);
                match attempt().await {
                    Ok(started) => {
                        *lock(&slot) = Some(started);
                        *lock(&reason) = None;
                        tracing::info!("the PodCertificateRequest signer started");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?delay, "the PodCertificateRequest signer did not start");
                        *lock(&reason) = Some(why(&error));
                    }
                }
            }
        });
        Ok(Self {
            runtime,
            state,
            retry: Some(retry),
        })
    }

    /// Stops retrying; the runtime, if it started, for an orderly shutdown.
    fn stop(self) -> Option<SignerRuntime> {
        if let Some(retry) = self.retry {
            retry.abort();
        }
        lock(&self.runtime).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_ca_certificate_is_not_ready() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(ca_certificate_valid(1_000_001, now), Ok(()));
        for (not_after, ago) in [(1_000_000, 0), (999_990, 10)] {
            let why = ca_certificate_valid(not_after, now).expect_err("expired");
            assert!(
                why.starts_with(&format!("the CA certificate expired {ago}s ago")),
                "{why}"
            );
        }
    }
}
