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
use credlet_csi::server::{self, IdentityService, NodeService};
use credlet_csi::{EmbeddedIssuer, VolumeConfig, VolumeManager, rotation};
use tokio::sync::watch;

use crate::config::AgentConfig;

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
            tracing::warn!(
                "volumes are plain directories, not tmpfs mounts (--plain-directories): development only"
            );
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

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tracing::warn!(
        "DEVELOPMENT CA (--dev-ca): pod identities from the volume context are trusted WITHOUT a token check and the CA key is kept on this node; never use this in production"
    );
    let mut policy = Policy::new(config.trust_domain.clone());
    policy.min_duration = config.dev_ca_min_duration;
    let authority = load_or_create_dev_ca(&config.state_dir, policy)?;
    let issuer = Arc::new(EmbeddedIssuer::trusting_claimed_identity(authority));
    let agent = Agent::start(&config, issuer).await?;
    let listener = server::bind_unix_socket(&config.csi_socket)?;
    tracing::info!(
        socket = %config.csi_socket.display(),
        driver = %config.driver_name,
        node = %config.node_id,
        volumes = agent.manager.volume_count(),
        "serving CSI"
    );
    let identity = IdentityService::new(config.driver_name.clone(), Arc::clone(&agent.manager));
    let node = NodeService::new(config.node_id.clone(), Arc::clone(&agent.manager));
    let served = server::serve(listener, identity, node, shutdown).await;
    agent.stop().await;
    let _ = fs::remove_file(&config.csi_socket);
    served.context("CSI server")?;
    tracing::info!("stopped; volumes stay mounted and are recovered on the next start");
    Ok(())
}
