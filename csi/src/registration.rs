//! Kubelet plugin registration, built in: the agent serves the kubelet's
//! `pluginregistration` API on `<registry dir>/<driver>-reg.sock`, so a
//! cluster needs no node-driver-registrar sidecar.
//!
//! The kubelet's plugin watcher finds the socket (at kubelet start by
//! listing the directory, later by inotify), calls `GetInfo`, registers the
//! CSI driver with the endpoint it names, and reports the outcome with
//! `NotifyRegistrationStatus`. Nothing needs to happen on our side when the
//! kubelet restarts — it finds the socket again and repeats the calls — but
//! the socket must stay in place: if it disappears (the directory was
//! cleaned or recreated), the registrar binds it again within one check
//! interval, and the kubelet registers the driver again. A socket another
//! live process serves under the name is never taken. On shutdown the
//! socket is removed if it is still this process's, which unregisters the
//! driver.
//!
//! The kubelet's verdict is published on a `watch` channel
//! ([`KubeletRegistration`]) for readiness and metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use credlet_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use credlet_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use credlet_uds::socket::{BindError, OwnedSocket};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::error::Error;

/// The plugin type the kubelet routes to its CSI plugin handler.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";

/// The CSI versions credlet serves.
pub const SUPPORTED_CSI_VERSIONS: [&str; 1] = ["1.0.0"];

/// How often the registrar checks that its socket is still in place.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(2);

/// Where and what to register.
#[derive(Clone, Debug)]
pub struct RegistrationConfig {
    /// The kubelet's plugin registry directory
    /// (`<kubelet root>/plugins_registry`).
    pub registry_dir: PathBuf,
    /// The CSI driver name.
    pub driver_name: String,
    /// The CSI socket as the kubelet sees it on the node.
    pub csi_endpoint: PathBuf,
    /// How often to check that the registration socket still exists.
    pub recheck: Duration,
}

impl RegistrationConfig {
    /// A configuration with the default check interval.
    pub fn new(
        registry_dir: impl Into<PathBuf>,
        driver_name: impl Into<String>,
        csi_endpoint: impl Into<PathBuf>,
    ) -> Self {
        Self {
            registry_dir: registry_dir.into(),
            driver_name: driver_name.into(),
            csi_endpoint: csi_endpoint.into(),
            recheck: DEFAULT_RECHECK,
        }
    }

    /// The registration socket: `<registry dir>/<driver name>-reg.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.registry_dir
            .join(format!("{}-reg.sock", self.driver_name))
    }
}

/// What the kubelet last said about the registration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KubeletRegistration {
    /// The kubelet has not reported yet (since start or since the socket
    /// was bound again).
    #[default]
    Pending,
    /// The kubelet registered the driver.
    Registered,
    /// The kubelet refused the registration.
    Rejected {
        /// The kubelet's reason.
        error: String,
    },
}

/// The `pluginregistration.Registration` service.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    info: PluginInfo,
    status: Arc<watch::Sender<KubeletRegistration>>,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        tracing::debug!(driver = %self.info.name, "kubelet asked for plugin info");
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let next = if status.plugin_registered {
            tracing::info!(driver = %self.info.name, "the kubelet registered the CSI driver");
            KubeletRegistration::Registered
        } else {
            tracing::error!(
                driver = %self.info.name,
                error = %status.error,
                "the kubelet refused to register the CSI driver"
            );
            KubeletRegistration::Rejected {
                error: status.error,
            }
        };
        self.status.send_replace(next);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// Serves the registration socket for as long as the agent runs.
#[derive(Debug)]
pub struct PluginRegistrar {
    config: RegistrationConfig,
    service: RegistrationService,
}

impl PluginRegistrar {
    /// A registrar and the receiver of the kubelet's verdicts.
    pub fn new(config: RegistrationConfig) -> (Self, watch::Receiver<KubeletRegistration>) {
        let (tx, rx) = watch::channel(KubeletRegistration::Pending);
        let info = PluginInfo {
            r#type: CSI_PLUGIN_TYPE.to_owned(),
            name: config.driver_name.clone(),
            endpoint: config.csi_endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_CSI_VERSIONS
                .iter()
                .map(|v| (*v).to_owned())
                .collect(),
        };
        let service = RegistrationService {
            info,
            status: Arc::new(tx),
        };
        (Self { config, service }, rx)
    }

    /// The registration socket's path.
    pub fn socket_path(&self) -> PathBuf {
        self.config.socket_path()
    }

    /// Binds the socket now, so that start-up fails early on a bad
    /// directory or a socket another live process serves;
    /// [`BoundRegistrar::serve`] then serves it.
    pub fn bind(self) -> Result<BoundRegistrar, BindError> {
        let socket = self.config.socket_path();
        let (listener, owned) = crate::server::bind_owned_socket(&socket)?;
        tracing::info!(
            socket = %socket.display(),
            driver = %self.config.driver_name,
            endpoint = %self.config.csi_endpoint.display(),
            "serving kubelet plugin registration"
        );
        Ok(BoundRegistrar {
            registrar: self,
            listener,
            owned,
        })
    }
}

/// A registrar whose socket is bound.
#[derive(Debug)]
pub struct BoundRegistrar {
    registrar: PluginRegistrar,
    listener: tokio::net::UnixListener,
    owned: OwnedSocket,
}

impl BoundRegistrar {
    /// Serves until `shutdown` resolves, binding the socket again whenever
    /// it disappears; removes the socket (if it is still ours) at the end.
    /// A socket another live process now serves under the name (a newer
    /// agent) is left to it.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        let Self {
            registrar,
            mut listener,
            mut owned,
        } = self;
        let socket = registrar.config.socket_path();
        let mut check = tokio::time::interval(registrar.config.recheck);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(registrar.service.clone()))
                .serve_with_incoming_shutdown(credlet_uds::incoming(listener), async {
                    let _ = stop_rx.await;
                });
            tokio::pin!(server);
            check.reset();
            let rebind = loop {
                tokio::select! {
                    result = &mut server => {
                        // The server ended on its own (the listener failed):
                        // bind again after a pause.
                        if let Err(error) = result {
                            tracing::warn!(%error, socket = %socket.display(), "registration server stopped; binding again");
                        }
                        tokio::time::sleep(registrar.config.recheck).await;
                        break true;
                    }
                    _ = check.tick() => {
                        if !owned.is_current() {
                            tracing::warn!(
                                socket = %socket.display(),
                                "the registration socket was removed or replaced; binding it again"
                            );
                            let _ = stop_tx.send(());
                            let _ = (&mut server).await;
                            break true;
                        }
                    }
                    () = &mut shutdown => {
                        let _ = stop_tx.send(());
                        let _ = (&mut server).await;
                        break false;
                    }
                }
            };
            if !rebind {
                remove_if_ours(&owned);
                tracing::info!(socket = %socket.display(), "kubelet plugin registration stopped");
                return Ok(());
            }
            // A new socket means a new registration round with the kubelet.
            registrar
                .service
                .status
                .send_replace(KubeletRegistration::Pending);
            let mut reported = false;
            loop {
                match crate::server::bind_owned_socket(&socket) {
                    Ok((l, o)) => {
                        listener = l;
                        owned = o;
                        break;
                    }
                    // Said once: the other process may hold it for long.
                    Err(error @ BindError::InUse { .. }) if !reported => {
                        reported = true;
                        tracing::warn!(%error, "another process serves the registration socket now; not taking it, binding it again when it is gone");
                    }
                    Err(BindError::InUse { .. }) => {}
                    Err(error) => {
                        tracing::warn!(%error, "binding the registration socket failed; retrying");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(registrar.config.recheck) => {}
                    () = &mut shutdown => return Ok(()),
                }
            }
        }
    }
}

/// Removes the socket unless someone else's socket now has its name (a new
/// agent instance during a rolling update).
fn remove_if_ours(owned: &OwnedSocket) {
    if let Err(error) = owned.remove() {
        tracing::warn!(%error, socket = %owned.path().display(), "removing the registration socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn socket_is_named_after_the_driver() {
        let config = RegistrationConfig::new(
            "/var/lib/kubelet/plugins_registry",
            "csi.credlet.io",
            "/var/lib/kubelet/plugins/csi.credlet.io/csi.sock",
        );
        assert_eq!(
            config.socket_path(),
            Path::new("/var/lib/kubelet/plugins_registry/csi.credlet.io-reg.sock")
        );
    }

    #[tokio::test]
    async fn info_names_a_csi_plugin_and_status_is_published() {
        let (registrar, mut status) = PluginRegistrar::new(RegistrationConfig::new(
            "/nonexistent",
            "csi.credlet.io",
            "/plugins/csi.credlet.io/csi.sock",
        ));
        let info = registrar
            .service
            .get_info(Request::new(InfoRequest {}))
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.credlet.io");
        assert_eq!(info.endpoint, "/plugins/csi.credlet.io/csi.sock");
        assert_eq!(info.supported_versions, vec!["1.0.0".to_owned()]);
        assert_eq!(*status.borrow(), KubeletRegistration::Pending);

        registrar
            .service
            .notify_registration_status(Request::new(RegistrationStatus {
                plugin_registered: false,
                error: "driver name mismatch".into(),
            }))
            .await
            .expect("notify");
        status.changed().await.expect("changed");
        assert_eq!(
            *status.borrow_and_update(),
            KubeletRegistration::Rejected {
                error: "driver name mismatch".into()
            }
        );
        registrar
            .service
            .notify_registration_status(Request::new(RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            }))
            .await
            .expect("notify");
        assert_eq!(*status.borrow(), KubeletRegistration::Registered);
    }
}
