//! The CSI Identity and Node gRPC services over a Unix socket.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use credlet_proto::csi::identity_server::{Identity, IdentityServer};
use credlet_proto::csi::node_server::{Node, NodeServer};
use credlet_proto::csi::{
    self, GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse,
    NodeGetInfoRequest, NodeGetInfoResponse, NodePublishVolumeRequest, NodePublishVolumeResponse,
    NodeServiceCapability, NodeStageVolumeRequest, NodeStageVolumeResponse,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest,
    NodeUnstageVolumeResponse, ProbeRequest, ProbeResponse,
};
use credlet_uds::socket::{BindError, OwnedSocket};
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};

use crate::attributes::{
    self, PREFIX, VolumeAttributes, check_context_size, parse_pod_identity, parse_token,
    parse_volume_mount_group,
};
use crate::error::{Error, InputError};
use crate::paths::{TargetPath, VolumeId};
use crate::volumes::{PublishRequest, VolumeManager};

/// Most CSI calls served at once per connection.
pub const MAX_CONCURRENT_CALLS: usize = 256;

/// Default CSI driver name.
pub const DEFAULT_DRIVER_NAME: &str = "csi.credlet.io";

/// Checks a CSI driver name: at most 63 characters, alphanumerics with `-`
/// and `.` inside, domain style.
pub fn validate_driver_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "driver name {name:?} must be 1-63 characters, alphanumerics with '-' and '.' inside"
        ))
    }
}

/// The CSI Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    driver_name: String,
    manager: Arc<VolumeManager>,
}

impl IdentityService {
    /// Serves `driver_name`; `Probe` reports the manager's readiness.
    pub fn new(driver_name: String, manager: Arc<VolumeManager>) -> Self {
        Self {
            driver_name,
            manager,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // A node-only plugin for ephemeral volumes: no controller service,
        // no topology constraints.
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {
            ready: Some(self.manager.is_ready()),
        }))
    }
}

/// The CSI Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    node_id: String,
    manager: Arc<VolumeManager>,
}

impl NodeService {
    /// Serves volumes for node `node_id`.
    pub fn new(node_id: String, manager: Arc<VolumeManager>) -> Self {
        Self { node_id, manager }
    }
}

/// Validates a `NodePublishVolume` request completely, before any effect.
pub fn parse_publish_request(
    request: &NodePublishVolumeRequest,
    kubelet_root: &Path,
    token_audience: &str,
) -> Result<PublishRequest, InputError> {
    let volume_id = VolumeId::parse(&request.volume_id)?;
    let target = TargetPath::parse(&request.target_path, kubelet_root)?;
    let capability = request
        .volume_capability
        .as_ref()
        .ok_or(InputError::Missing {
            field: "volume_capability",
        })?;
    let mount = match &capability.access_type {
        Some(csi::volume_capability::AccessType::Mount(mount)) => mount,
        Some(csi::volume_capability::AccessType::Block(_)) => {
            return Err(InputError::Capability {
                reason: "block volumes are not supported; use a filesystem (mount) volume",
            });
        }
        None => {
            return Err(InputError::Capability {
                reason: "access type (mount) is required",
            });
        }
    };
    let volume_mount_group = parse_volume_mount_group(&mount.volume_mount_group)?;
    let context = &request.volume_context;
    check_context_size(context)?;
    let attributes = VolumeAttributes::parse(context)?;
    let pod = parse_pod_identity(context)?;
    let token = parse_token(context, token_audience)?;
    let raw_attributes: BTreeMap<String, String> = context
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(PublishRequest {
        volume_id,
        target,
        raw_attributes,
        attributes,
        pod,
        token,
        volume_mount_group,
    })
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "credlet serves ephemeral volumes only; it does not advertise STAGE_UNSTAGE_VOLUME",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "credlet serves ephemeral volumes only; it does not advertise STAGE_UNSTAGE_VOLUME",
        ))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let config = self.manager.config();
        let parsed = parse_publish_request(
            request.get_ref(),
            &config.kubelet_root,
            &config.token_audience,
        )
        .map_err(|error| {
            tracing::warn!(volume_id = %attributes_id(request.get_ref()), %error, "rejected NodePublishVolume");
            Error::from(error)
        })?;
        self.manager.publish(parsed).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let volume_id = VolumeId::parse(&request.volume_id).map_err(Error::from)?;
        let target = TargetPath::parse(&request.target_path, &self.manager.config().kubelet_root)
            .map_err(Error::from)?;
        self.manager.unpublish(&volume_id, &target).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type, rpc};
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::VolumeMountGroup as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

fn attributes_id(request: &NodePublishVolumeRequest) -> String {
    crate::paths::printable(&request.volume_id)
}

/// Binds a gRPC socket of the agent (CSI, registration, CRI) at `path`,
/// creating the parent directory and restricting it to its owner (the
/// kubelet runs as root). A stale socket file is replaced; a socket a live
/// process serves is not taken ([`BindError::InUse`]). The [`OwnedSocket`]
/// removes the path at exit only while it is still this socket.
pub fn bind_owned_socket(path: &Path) -> Result<(UnixListener, OwnedSocket), BindError> {
    credlet_uds::socket::bind(path, 0o600)
}

/// [`bind_owned_socket`] for a caller that removes the path itself.
pub fn bind_unix_socket(path: &Path) -> Result<UnixListener, BindError> {
    bind_owned_socket(path).map(|(listener, _)| listener)
}

/// Serves Identity + Node on `listener` until `shutdown` resolves; calls in
/// flight finish first.
pub async fn serve(
    listener: UnixListener,
    identity: IdentityService,
    node: NodeService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        // The kubelet multiplexes every call over one connection; bound the
        // work it can have in flight at once.
        .concurrency_limit_per_connection(MAX_CONCURRENT_CALLS)
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        // The kubelet's client may send the socket path as `:authority`.
        .serve_with_incoming_shutdown(credlet_uds::incoming(listener), shutdown)
        .await
}

/// The attribute prefix, re-exported for documentation.
pub use attributes::PREFIX as ATTRIBUTE_PREFIX;
