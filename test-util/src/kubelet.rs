//! A CRI client that calls what the kubelet calls (`ImageStatus`,
//! `PullImage` with a pod's credentials and sandbox config,
//! `RunPodSandbox`, `CreateContainer`, …), the pods it acts for, and the
//! registry traffic those calls cause. Shared by the image guard's library
//! tests and the agent-binary tests.

use std::path::Path;
use std::time::Duration;

use crate::cri::v1::image_service_client::ImageServiceClient;
use crate::cri::v1::runtime_service_client::RuntimeServiceClient;
use crate::cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, CreateContainerRequest, Image, ImageSpec,
    ImageStatusRequest, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use tonic::Status;
use tonic::transport::Channel;

use crate::cri::unix_channel;
use crate::registry::{AccessLogEntry, Registry};

/// A pod as the kubelet knows it: identity, and the credentials its
/// `imagePullSecrets` resolve to.
#[derive(Debug, Clone)]
pub struct TestPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid given by the API server.
    pub uid: String,
    /// The pull credentials the kubelet hands to PullImage.
    pub auth: Option<AuthConfig>,
}

impl TestPod {
    /// `namespace/name`, as denial messages name the pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The `PodSandboxConfig` the kubelet builds (host network, no
    /// hostname: see test-util's README).
    pub fn sandbox_config(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The credentials the kubelet passes for a docker-config entry: user name
/// and password, `server_address` left empty (containerd 1.6 rejects a
/// `host:port` there without a scheme: "parse server address").
pub fn auth(user: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    }
}

// --- the kubelet -----------------------------------------------------------

/// An `ImageSpec` as the kubelet sends it for an image of a pod spec.
pub fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        user_specified_image: image.into(),
        ..Default::default()
    }
}

/// Why the kubelet could not start a container.
#[derive(Debug)]
pub enum KubeletError {
    /// `imagePullPolicy: Never` and `ImageStatus` reports the image absent
    /// (the kubelet's ErrImageNeverPull).
    NeverPull,
    /// `ImageStatus` failed.
    ImageStatus(Status),
    /// `PullImage` failed (ErrImagePull).
    Pull(Status),
    /// `CreateContainer` failed.
    Create(Status),
    /// `StartContainer` failed.
    Start(Status),
}

impl KubeletError {
    /// The gRPC status, if the failure was a CRI error.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::NeverPull => None,
            Self::ImageStatus(s) | Self::Pull(s) | Self::Create(s) | Self::Start(s) => Some(s),
        }
    }
}

/// A CRI client calling what the kubelet calls.
#[derive(Debug, Clone)]
pub struct Kubelet {
    /// RuntimeService.
    pub rt: RuntimeServiceClient<Channel>,
    /// ImageService.
    pub im: ImageServiceClient<Channel>,
}

impl Kubelet {
    /// Connects to a CRI socket (the proxy's, or containerd's directly).
    pub async fn connect(socket: &Path) -> Self {
        let channel = unix_channel(socket).await.expect("CRI channel");
        Self {
            rt: RuntimeServiceClient::new(channel.clone()),
            im: ImageServiceClient::new(channel),
        }
    }

    /// `Version`, the simplest pass-through call.
    pub async fn version(&mut self) -> Result<crate::cri::v1::VersionResponse, Status> {
        Ok(self
            .rt
            .version(crate::cri::v1::VersionRequest {
                version: "v1".into(),
            })
            .await?
            .into_inner())
    }

    /// `ImageStatus`: the image if the runtime (or credlet) reports it
    /// present.
    pub async fn image_status(&mut self, image: &str) -> Result<Option<Image>, Status> {
        Ok(self
            .im
            .image_status(ImageStatusRequest {
                image: Some(spec(image)),
                verbose: false,
            })
            .await?
            .into_inner()
            .image)
    }

    /// `ImageStatus` expecting success: the image id if present.
    pub async fn image_id(&mut self, image: &str) -> Option<String> {
        self.image_status(image)
            .await
            .unwrap_or_else(|e| panic!("ImageStatus {image}: {e:?}"))
            .map(|i| i.id)
    }

    /// `PullImage` with the pod's credentials and sandbox config; returns
    /// the image ref.
    pub async fn pull(&mut self, image: &str, pod: &TestPod) -> Result<String, Status> {
        self.pull_with(image, Some(pod), pod.auth.clone()).await
    }

    /// `PullImage` with explicit credentials (and optionally no pod).
    pub async fn pull_with(
        &mut self,
        image: &str,
        pod: Option<&TestPod>,
        auth: Option<AuthConfig>,
    ) -> Result<String, Status> {
        Ok(self
            .im
            .pull_image(PullImageRequest {
                image: Some(spec(image)),
                auth,
                sandbox_config: pod.map(TestPod::sandbox_config),
            })
            .await?
            .into_inner()
            .image_ref)
    }

    /// `RunPodSandbox`; returns the sandbox id.
    pub async fn run_sandbox(&mut self, pod: &TestPod) -> String {
        self.rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.sandbox_config()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {}: {e:?}", pod.key()))
            .into_inner()
            .pod_sandbox_id
    }

    /// The kubelet's `EnsureImageExists`: `ImageStatus`, then `PullImage`
    /// unless the image is present (and the policy is not `Always`) or the
    /// policy is `Never`. Returns the image ref.
    pub async fn ensure_image(
        &mut self,
        pod: &TestPod,
        image: &str,
        policy: &str,
    ) -> Result<String, KubeletError> {
        let present = self
            .image_status(image)
            .await
            .map_err(KubeletError::ImageStatus)?;
        match (present, policy) {
            (Some(i), "IfNotPresent" | "Never") => Ok(i.id),
            (None, "Never") => Err(KubeletError::NeverPull),
            _ => self.pull(image, pod).await.map_err(KubeletError::Pull),
        }
    }

    /// `CreateContainer` as the kubelet sends it: the image by the ref
    /// `EnsureImageExists` returned, the spec's image as
    /// `user_specified_image`, the sandbox config alongside.
    pub async fn create_container(
        &mut self,
        pod: &TestPod,
        sandbox_id: &str,
        name: &str,
        image_ref: &str,
        user_image: &str,
    ) -> Result<String, Status> {
        Ok(self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.into(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image_ref.into(),
                        user_specified_image: user_image.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                sandbox_config: Some(pod.sandbox_config()),
            })
            .await?
            .into_inner()
            .container_id)
    }

    /// `StartContainer`.
    pub async fn start_container(&mut self, id: &str) -> Result<(), Status> {
        self.rt
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&mut self, id: &str) {
        self.rt
            .remove_container(RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .expect("RemoveContainer");
    }

    /// What the kubelet does for one container of a pod whose sandbox runs:
    /// `EnsureImageExists`, `CreateContainer`, `StartContainer`. Returns the
    /// container id.
    pub async fn start_container_of(
        &mut self,
        pod: &TestPod,
        sandbox_id: &str,
        name: &str,
        image: &str,
        policy: &str,
    ) -> Result<String, KubeletError> {
        let image_ref = self.ensure_image(pod, image, policy).await?;
        let id = self
            .create_container(pod, sandbox_id, name, &image_ref, image)
            .await
            .map_err(KubeletError::Create)?;
        self.start_container(&id)
            .await
            .map_err(KubeletError::Start)?;
        Ok(id)
    }

    /// Stops and removes a sandbox (and its containers).
    pub async fn remove_sandbox(&mut self, sandbox_id: &str) {
        self.rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox_id.into(),
            })
            .await
            .expect("StopPodSandbox");
        self.rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox_id.into(),
            })
            .await
            .expect("RemovePodSandbox");
    }
}

// --- registry traffic ------------------------------------------------------

/// Registry requests for one repository, from the access log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// `HEAD …/manifests/…`.
    pub manifest_heads: usize,
    /// `HEAD …/manifests/…` answered 200.
    pub manifest_heads_ok: usize,
    /// `GET …/manifests/…`.
    pub manifest_gets: usize,
    /// `GET …/blobs/…` (config and layer downloads).
    pub blob_gets: usize,
    /// Every request naming the repository.
    pub total: usize,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, before: Traffic) -> Traffic {
        Traffic {
            manifest_heads: self.manifest_heads - before.manifest_heads,
            manifest_heads_ok: self.manifest_heads_ok - before.manifest_heads_ok,
            manifest_gets: self.manifest_gets - before.manifest_gets,
            blob_gets: self.blob_gets - before.blob_gets,
            total: self.total - before.total,
        }
    }
}

/// The registry's access log once it stops growing (the registry writes a
/// line as it finishes a request).
pub fn settled_log(registry: &Registry) -> Vec<AccessLogEntry> {
    let mut last = registry.access_log();
    loop {
        std::thread::sleep(Duration::from_millis(25));
        let now = registry.access_log();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

/// Registry traffic for repository `name` (without host) so far.
pub fn traffic(registry: &Registry, name: &str) -> Traffic {
    let prefix = format!("/v2/{name}/");
    let mut t = Traffic::default();
    for e in settled_log(registry)
        .iter()
        .filter(|e| e.path.starts_with(&prefix))
    {
        t.total += 1;
        let manifest = e.path.contains("/manifests/");
        match (e.method.as_str(), manifest) {
            ("HEAD", true) => {
                t.manifest_heads += 1;
                if e.status == 200 {
                    t.manifest_heads_ok += 1;
                }
            }
            ("GET", true) => t.manifest_gets += 1,
            ("GET", false) if e.path.contains("/blobs/") => t.blob_gets += 1,
            _ => {}
        }
    }
    t
}
