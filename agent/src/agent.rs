//! `credlet agent`: start-up, serving, graceful shutdown.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use credlet_ca::{Authority, Policy};
use credlet_csi::fsops::{LinuxSyscalls, NodeSyscalls, PlainDirectories};
use credlet_csi::metrics::Metrics;
use credlet_csi::metrics::{ExpiryCollector, VolumeExpiryCollector};
use credlet_csi::registration::{KubeletRegistration, PluginRegistrar};
use credlet_csi::remote::{RemoteConfig, RemoteIssuer};
use credlet_csi::server::{self, IdentityService, NodeService};
use credlet_csi::{EmbeddedIssuer, VolumeConfig, VolumeManager, rotation};
use credlet_uds::socket::OwnedSocket;
use tokio::sync::watch;

use credlet_imageguard::events::KubeEvents;
use credlet_imageguard::guard::{GuardMetrics, ImageGuard};
use credlet_imageguard::pods::KubePodIndex;
use credlet_imageguard::proxy::{CriProxy, LIST_IMAGES, Upstream};
use credlet_imageguard::records::RecordStore;
use credlet_imageguard::registry::{RegistryVerifier, RegistryVerifierConfig};
use credlet_proto::cri::{ListImagesRequest, ListImagesResponse};

use crate::config::{AgentConfig, ConfigError, ImageGuardConfig};

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM; only SIGINT will stop the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; draining"),
    }
}

/// The development CA: created on first start and kept in the state
/// directory (0600) so restarts keep one trust bundle. Local testing only:
/// a production CA key never lives on a node.
pub fn load_or_create_dev_ca(state_dir: &Path, policy: Policy) -> anyhow::Result<Authority> {
    let dir = state_dir.join("dev-ca");
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if cert_path.exists() && key_path.exists() {
        let cert = fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key = zeroize::Zeroizing::new(
            fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?,
        );
        return Authority::from_pem(&cert, &key, &cert, policy)
            .with_context(|| format!("loading the development CA from {}", dir.display()));
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    let (authority, cert, key) = Authority::generate_self_signed_with_pems(policy)?;
    write_private(&key_path, key.as_bytes())?;
    write_private(&cert_path, cert.as_bytes())?;
    Ok(authority)
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A running agent's parts, for the binary and the demo.
#[derive(Debug)]
pub struct Agent {
    /// The volume manager.
    pub manager: Arc<VolumeManager>,
    stop_rotation: watch::Sender<bool>,
    rotation: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Builds the agent around an issuer, starts the rotation loop and
    /// recovers recorded volumes.
    pub async fn start(
        config: &AgentConfig,
        issuer: Arc<dyn credlet_csi::Issuer>,
    ) -> anyhow::Result<Self> {
        let syscalls: Arc<dyn NodeSyscalls> = if config.plain_directories {
            Arc::new(PlainDirectories)
        } else {
            Arc::new(LinuxSyscalls)
        };
        let mut volume_config =
            VolumeConfig::new(config.kubelet_root.clone(), config.state_dir.clone());
        volume_config.token_audience = config.token_audience.clone();
        volume_config.tmpfs_size_bytes = config.tmpfs_size_bytes;
        volume_config.backoff_base = config.backoff_base;
        volume_config.backoff_cap = config.backoff_cap;
        let (handle, queue) = rotation::channel();
        let manager = Arc::new(
            VolumeManager::new(volume_config, issuer, syscalls, handle, Metrics::default())
                .context("starting the volume manager")?,
        );
        let (stop_rotation, stop_rx) = watch::channel(false);
        let rotation = tokio::spawn(queue.run(
            Arc::clone(&manager),
            config.max_concurrent_renewals,
            stop_rx,
        ));
        let report = manager.recover().await.context("recovering volumes")?;
        tracing::info!(
            resumed = report.resumed,
            reissue = report.reissue,
            gone = report.gone,
            failed = report.failed,
            "recovered volumes"
        );
        Ok(Self {
            manager,
            stop_rotation,
            rotation,
        })
    }

    /// Stops the rotation loop after the renewals in flight.
    pub async fn stop(self) {
        let _ = self.stop_rotation.send(true);
        let _ = self.rotation.await;
    }
}

/// Runs the agent until `shutdown` resolves: the CSI services and/or the
/// image guard's CRI proxy, whichever is configured.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut health = HealthParts {
        registry: prometheus_client::registry::Registry::default(),
        checks: Vec::new(),
    };
    crate::metrics::register_common(&mut health.registry, "agent");
    // Taken before anything starts: a busy port is a configuration error,
    // not a half-started agent.
    let health_listener = match config.health_listen {
        Some(addr) => Some((
            addr,
            crate::health::bind(addr)
                .await
                .map_err(|e| ConfigError::listen("--health-listen", addr, &e))?,
        )),
        None => None,
    };
    // Likewise the CRI socket: a guard already serving it keeps it, and a
    // path that cannot be a socket is a configuration error. (Should a later
    // step fail, the file left behind is stale and the next start replaces
    // it, as after a crash.)
    let cri_socket = match &config.image_guard {
        Some(guard) => Some(
            server::bind_owned_socket(&guard.listen)
                .map_err(|e| ConfigError::socket("--cri-listen", &e))?,
        ),
        None => None,
    };
    if let Some(socket) = config.csi_socket.clone() {
        let csi = start_csi(&config, &socket).await?;
        csi.observe(&mut health, config.per_volume_metrics);
        let stop = wait_stop(stop_rx.clone());
        tasks.spawn(async move { csi.serve(stop).await });
        // Registered only once the CSI socket is listening: the kubelet
        // calls it right after registration.
        if let Some(registration) = config.registration.clone() {
            let (registrar, status) = PluginRegistrar::new(registration);
            // Pending is fine (the kubelet may not have looked yet); a
            // refusal is not.
            health.checks.push((
                "kubelet-registration",
                Box::new(move || match &*status.borrow() {
                    KubeletRegistration::Rejected { error } => {
                        Err(format!("the kubelet refused the CSI driver: {error}"))
                    }
                    _ => Ok(()),
                }),
            ));
            let bound = match registrar.bind() {
                Ok(bound) => bound,
                Err(error) => {
                    // Stop the CSI server started above: it removes its
                    // socket.
                    let _ = stop_tx.send(true);
                    while tasks.join_next().await.is_some() {}
                    return Err(ConfigError::socket("--registration-dir", &error).into());
                }
            };
            let stop = wait_stop(stop_rx.clone());
            tasks.spawn(async move {
                bound
                    .serve(stop)
                    .await
                    .context("kubelet plugin registration")
            });
        }
    }
    if let (Some(guard), Some((listener, socket))) = (config.image_guard.clone(), cri_socket) {
        let started = start_image_guard(&config, &guard, &mut health).await;
        let (proxy, records) = match started {
            Ok(started) => started,
            Err(error) => {
                drop(listener);
                let _ = socket.remove();
                let _ = stop_tx.send(true);
                while tasks.join_next().await.is_some() {}
                return Err(error);
            }
        };
        let stop = wait_stop(stop_rx.clone());
        tasks.spawn(async move {
            tracing::info!(
                listen = %guard.listen.display(),
                upstream = %guard.upstream.display(),
                policy = %guard.policy.default,
                mode = ?guard.policy.mode,
                "serving the CRI proxy (image guard)"
            );
            proxy
                .serve(listener, stop, std::time::Duration::from_secs(30))
                .await;
            if let Err(error) = socket.remove() {
                tracing::warn!(%error, socket = %guard.listen.display(), "removing the CRI socket");
            }
            // Verifications written behind the answers go to disk now.
            if let Err(error) = records.flush() {
                tracing::warn!(%error, "writing pending image records at shutdown");
            }
            Ok(())
        });
    }
    if let Some((addr, listener)) = health_listener {
        let mut state = crate::health::HealthState::new(health.registry);
        for (name, check) in health.checks {
            state = state.with_check(name, check);
        }
        let state = Arc::new(state);
        let stop = wait_stop(stop_rx.clone());
        tracing::info!(listen = %addr, "serving /healthz, /readyz and /metrics");
        tasks.spawn(async move {
            crate::health::serve(listener, state, stop).await;
            Ok(())
        });
    }
    tokio::select! {
        () = shutdown => {}
        Some(done) = tasks.join_next() => {
            // A server stopped on its own: stop the rest and report.
            let _ = stop_tx.send(true);
            while tasks.join_next().await.is_some() {}
            return done.context("server task")?;
        }
    }
    let _ = stop_tx.send(true);
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(error) = done.context("server task").and_then(|r| r) {
            result = Err(error);
        }
    }
    tracing::info!("stopped; volumes stay mounted and are recovered on the next start");
    result
}

/// The CSI side, started and ready to serve.
struct CsiServer {
    agent: Agent,
    socket: OwnedSocket,
    listener: tokio::net::UnixListener,
    identity: IdentityService,
    node: NodeService,
    remote: Option<RemoteTasks>,
}

impl CsiServer {
    /// Registers the CSI (and CA client) metrics and readiness checks.
    fn observe(&self, health: &mut HealthParts, per_volume_metrics: bool) {
        let manager = &self.agent.manager;
        manager.metrics().register(&mut health.registry);
        health
            .registry
            .register_collector(Box::new(ExpiryCollector::new(manager)));
        if per_volume_metrics {
            health
                .registry
                .register_collector(Box::new(VolumeExpiryCollector::new(manager)));
        }
        let ready = Arc::clone(manager);
        health.checks.push((
            "csi",
            Box::new(move || {
                if ready.is_ready() {
                    Ok(())
                } else {
                    Err("volumes not recovered yet, or no usable issuer".into())
                }
            }),
        ));
        if let Some(remote) = &self.remote {
            remote.issuer.metrics().register(&mut health.registry);
            let issuer = Arc::clone(&remote.issuer);
            health
                .checks
                .push(("ca", Box::new(move || issuer.reachability())));
        }
    }
}

/// What the health server is built from, gathered while starting.
struct HealthParts {
    registry: prometheus_client::registry::Registry,
    checks: Vec<(&'static str, crate::health::ReadinessCheck)>,
}

/// The remote CA client's background work: the agent's own certificate and
/// the trust bundle watch.
struct RemoteTasks {
    issuer: Arc<RemoteIssuer>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CsiServer {
    async fn serve(self, stop: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let served = server::serve(self.listener, self.identity, self.node, stop).await;
        if let Some(remote) = self.remote {
            let _ = remote.stop.send(true);
            for task in remote.tasks {
                let _ = task.await;
            }
        }
        self.agent.stop().await;
        // Not a newer agent's socket under the same name.
        if let Err(error) = self.socket.remove() {
            tracing::warn!(%error, socket = %self.socket.path().display(), "removing the CSI socket");
        }
        served.context("CSI server")
    }
}

async fn start_csi(config: &AgentConfig, path: &Path) -> anyhow::Result<CsiServer> {
    // Taken first: an agent already serving the socket keeps it, and this
    // one stops before touching the volumes that agent manages.
    let (listener, socket) =
        server::bind_owned_socket(path).map_err(|e| ConfigError::socket("--csi-endpoint", &e))?;
    let started = start_csi_on(config, listener, socket.clone()).await;
    if started.is_err() {
        let _ = socket.remove();
    }
    started
}

async fn start_csi_on(
    config: &AgentConfig,
    listener: tokio::net::UnixListener,
    socket: OwnedSocket,
) -> anyhow::Result<CsiServer> {
    if config.plain_directories {
        tracing::warn!(
            "volumes are plain directories, not tmpfs mounts (--plain-directories): keys land on the state filesystem; development only"
        );
    }
    let (agent, remote) = match &config.remote_ca {
        None => {
            tracing::warn!(
                "DEVELOPMENT CA (--dev-ca): pod identities from the volume context are trusted WITHOUT a token check and the CA key is kept on this node; never use this in production"
            );
            let mut policy = Policy::new(config.trust_domain.clone());
            policy.min_duration = config.dev_ca_min_duration;
            let authority = load_or_create_dev_ca(&config.state_dir, policy)?;
            let issuer = Arc::new(EmbeddedIssuer::trusting_claimed_identity(authority));
            (Agent::start(config, issuer).await?, None)
        }
        Some(ca) => {
            let mut remote =
                RemoteConfig::new(ca.url.clone(), ca.trust_pem.clone(), &config.node_id);
            remote.token_file = ca.token_file.clone();
            remote.trust_domain = config.trust_domain.clone();
            remote.timeout = ca.timeout;
            // Roots the CA publishes (a rollover's new root) stay trusted
            // for the CA connection across restarts, signed with the node's
            // key so that no root planted there is ever trusted.
            fs::create_dir_all(&config.state_dir)
                .with_context(|| format!("creating {}", config.state_dir.display()))?;
            remote.state_dir = Some(config.state_dir.clone());
            let issuer = Arc::new(RemoteIssuer::new(remote).context("the CA client")?);
            tracing::info!(
                url = %ca.url,
                token_file = %ca.token_file.display(),
                timeout_ms = ca.timeout.as_millis() as u64,
                "pod certificates from the CA service; not ready until the agent has its client certificate"
            );
            let agent =
                Agent::start(config, Arc::clone(&issuer) as Arc<dyn credlet_csi::Issuer>).await?;
            let (stop, stop_rx) = watch::channel(false);
            let tasks = vec![
                tokio::spawn(Arc::clone(&issuer).run_agent_certificate(stop_rx.clone())),
                tokio::spawn(Arc::clone(&issuer).run_trust_bundle_watch(
                    Arc::clone(&agent.manager),
                    config.max_concurrent_renewals,
                    stop_rx,
                )),
            ];
            (
                agent,
                Some(RemoteTasks {
                    issuer,
                    stop,
                    tasks,
                }),
            )
        }
    };
    tracing::info!(
        socket = %socket.path().display(),
        driver = %config.driver_name,
        node = %config.node_id,
        volumes = agent.manager.volume_count(),
        "serving CSI"
    );
    let identity = IdentityService::new(config.driver_name.clone(), Arc::clone(&agent.manager));
    let node = NodeService::new(config.node_id.clone(), Arc::clone(&agent.manager));
    Ok(CsiServer {
        agent,
        socket,
        listener,
        identity,
        node,
        remote,
    })
}

async fn kube_client(guard: &ImageGuardConfig) -> anyhow::Result<kube::Client> {
    Ok(crate::kubeapi::client(
        guard.kubeconfig.as_deref(),
        "the image guard needs the node's pod list",
    )
    .await?)
}

/// Builds the image guard: records, registry verifier, pod watch, events,
/// and a task pruning records of images and pods that are gone.
async fn start_image_guard(
    config: &AgentConfig,
    guard: &ImageGuardConfig,
    health: &mut HealthParts,
) -> anyhow::Result<(Arc<CriProxy>, Arc<RecordStore>)> {
    let (records, opened) = RecordStore::open_report(&guard.records_dir)
        .context("opening the image guard's records")?;
    if opened.dropped + opened.missing > 0 {
        tracing::warn!(
            dropped = opened.dropped,
            missing = opened.missing,
            "unreadable, tampered or missing image records; those images are kept private and verified again"
        );
    }
    if opened.stale_intents > 0 {
        tracing::warn!(
            intents = opened.stale_intents,
            "pulls of an earlier run have no record; the images they produced are kept private"
        );
    }
    let records = Arc::new(records);
    let verifier = RegistryVerifier::new(RegistryVerifierConfig {
        extra_root_pems: guard.registry_roots.clone(),
        registry_config_dirs: guard.registry_config_dirs.clone(),
        proxy: guard.registry_proxy.clone(),
        ..RegistryVerifierConfig::default()
    })
    .context("building the registry verifier")?;
    let client = kube_client(guard).await?;
    let (pods, _pod_watch) = KubePodIndex::start(client.clone(), &config.node_id);
    let (events, _event_sender) = KubeEvents::start(client, &config.node_id);
    let upstream = Upstream::new(guard.upstream.clone(), 2);
    let metrics = GuardMetrics::default();
    metrics.register(&mut health.registry);
    let runtime = guard.upstream.clone();
    let synced = Arc::clone(&pods);
    // Not ready says what is missing; the CRI socket serves regardless
    // (static pods, preloaded and public images start without the API).
    health.checks.push((
        "cri-proxy",
        Box::new(move || {
            use credlet_imageguard::pods::PodIndex;
            let mut missing = Vec::new();
            if let Err(error) = std::os::unix::net::UnixStream::connect(&runtime) {
                missing.push(format!(
                    "the container runtime at {} is not reachable: {error}",
                    runtime.display()
                ));
            }
            if !synced.is_synced() {
                missing.push(
                    "the pod index is not synced with the API server yet (the CRI socket serves; pods relying on a verification of a protected image are refused until it is)"
                        .to_owned(),
                );
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing.join("; "))
            }
        }),
    ));
    let image_guard = Arc::new(ImageGuard::new(
        guard.policy.clone(),
        Arc::clone(&records),
        Arc::new(verifier),
        Arc::clone(&pods) as Arc<dyn credlet_imageguard::pods::PodIndex>,
        events,
        metrics,
    ));
    let proxy = Arc::new(CriProxy::new(upstream, image_guard));
    let pruner = Arc::clone(&proxy);
    let pruned = Arc::clone(&records);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            prune_records(&pruner, &pruned, pods.as_ref()).await;
        }
    });
    Ok((proxy, records))
}

/// Drops records of images the runtime no longer has and grants of pods no
/// longer on the node; settles pull intents an earlier run left (the first
/// run is at start). The file work runs on the blocking pool.
async fn prune_records(proxy: &CriProxy, records: &Arc<RecordStore>, pods: &KubePodIndex) {
    use credlet_imageguard::pods::PodIndex;
    // Read before the lists: a record that changes after (a pull ending
    // meanwhile) is not pruned on their strength.
    let listed_at = records.generation();
    let listed: Result<ListImagesResponse, _> = proxy
        .upstream()
        .unary(LIST_IMAGES, &ListImagesRequest::default())
        .await;
    let listed = match listed {
        Ok(list) => list.images,
        Err(error) => {
            tracing::warn!(%error, "listing images to prune records");
            return;
        }
    };
    let named: Vec<(String, Vec<_>)> = listed
        .iter()
        .map(|i| (i.id.clone(), credlet_imageguard::resolve::names_of(i)))
        .collect();
    let images = listed.into_iter().map(|i| i.id).collect();
    // Pods by the uid the runtime knows them by (a static pod's: the hash
    // its mirror pod names).
    let live: Option<std::collections::HashSet<String>> = pods.is_synced().then(|| {
        pods.pods_using(&|_: &str| true)
            .iter()
            .map(|p| p.uid.clone())
            .collect()
    });
    let records = Arc::clone(records);
    let pruned = tokio::task::spawn_blocking(move || {
        records.settle_stale_intents(&named);
        let pruned = records.prune(&images, live.as_ref(), listed_at);
        // Records that could not be written (full or read-only disk) are
        // retried here too, not only with the next change.
        let flushed = if records.pending() > 0 {
            records.flush().map(|_| records.pending())
        } else {
            Ok(0)
        };
        (pruned, flushed)
    })
    .await;
    let Ok((pruned, flushed)) = pruned else {
        tracing::error!("the image record pruner failed");
        return;
    };
    match pruned {
        Ok((images, grants)) if images + grants > 0 => {
            tracing::info!(images, grants, "pruned image guard records");
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "pruning image guard records"),
    }
    if let Err(error) = flushed {
        tracing::error!(%error, "image records still not written");
    }
}
