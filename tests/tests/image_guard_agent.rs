//! The image guard through the real `credlet agent` binary: the agent
//! serves its CRI socket (`--cri-listen`) in front of a real containerd
//! (`--cri-upstream`), checks pull credentials against a real CNCF
//! distribution registry (htpasswd, its CA via `--registry-ca`) and watches
//! the node's pods in the in-process fake API server (`--kubeconfig`). A CRI
//! client plays the kubelet through the binary's socket, in the kubelet's
//! order (`RunPodSandbox`, `ImageStatus`, `PullImage` with the pod's
//! credentials and sandbox config, `CreateContainer`, `StartContainer`).
//!
//! The library-level cases live in `imageguard/tests/guard_e2e.rs`; these
//! check what only the binary adds: flags, start-up, SIGTERM, records on
//! `--image-records-dir` across a restart of the process, and outages.
//!
//! Needs root and the packages of `test-util/install-deps.sh`.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use credlet_test_util::{
    AccessLogEntry, Containerd, FakeApiServer, PushedImage, Registry, build_and_push_image,
    unix_channel,
};
use credlet_tests::agent_bin;
use credlet_tests::harness::TestEnv;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, CreateContainerRequest, Image, ImageSpec,
    ImageStatusRequest, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    VersionRequest, VersionResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The node the pods are scheduled to (`--node-id`).
const NODE: &str = "node-a";
const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");
/// How long the agent may take to serve and load the pod list.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long anything asynchronous (Events) may take.
const WAIT: Duration = Duration::from_secs(30);
/// How long a SIGTERMed agent may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(10);
/// The agent logs this once the pod watch has listed the node's pods.
const SYNCED: &str = "pod index synced";

/// Runs blocking harness code (process start/stop, log reads) off the async
/// workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// --- the agent ---------------------------------------------------------------

/// The agent binary with the image guard on (no CSI), in a [`TestEnv`]
/// (temporary directories, log capture, kill and log dump on drop).
#[derive(Debug)]
struct GuardAgent {
    env: TestEnv,
    /// `--cri-listen`: the socket the kubelet talks to.
    socket: PathBuf,
    args: Vec<OsString>,
}

impl GuardAgent {
    /// An agent in front of the runtime at `upstream`, watching `api`'s pods
    /// of [`NODE`] and trusting `registry`'s CA; not started yet.
    fn new(api: &FakeApiServer, upstream: &Path, registry: Option<&Registry>) -> Self {
        let env = TestEnv::new(agent_bin!());
        let base = env.base().to_owned();
        let socket = base.join("cri.sock");
        let kubeconfig = base.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_yaml(&api.url())).expect("write kubeconfig");
        let mut args: Vec<OsString> = vec![
            "agent".into(),
            "--node-id".into(),
            NODE.into(),
            "--state-dir".into(),
            env.state_dir.clone().into(),
            // Unused without CSI, but validated: it must exist.
            "--kubelet-root".into(),
            env.root.clone().into(),
            "--cri-listen".into(),
            socket.clone().into(),
            "--cri-upstream".into(),
            upstream.into(),
            "--image-policy".into(),
            "NeverVerifyPreloadedImages".into(),
            "--image-guard-mode".into(),
            "enforce".into(),
            "--image-records-dir".into(),
            base.join("image-records").into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
        ];
        if let Some(registry) = registry {
            args.push("--registry-ca".into());
            args.push(registry.ca_pem_path().into());
        }
        Self { env, socket, args }
    }

    /// Starts the binary and waits until it serves its CRI socket with the
    /// pod list loaded; returns a kubelet connected to it.
    async fn start(&mut self) -> Kubelet {
        let offset = fs::metadata(&self.env.log_path).map_or(0, |m| m.len());
        let mut command = self.env.command();
        command.args(&self.args);
        self.env.spawn_command(command);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            assert!(
                self.env.agent_running(),
                "agent exited before serving its CRI socket"
            );
            let synced = self.env.log_from(offset).0.contains(SYNCED);
            if synced && self.socket.exists() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after {READY_TIMEOUT:?} (pod list loaded: {synced}, socket: {})",
                self.socket.exists()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Kubelet::connect(&self.socket).await
    }

    /// SIGTERM; asserts a clean exit within [`EXIT_WITHIN`] that removed the
    /// CRI socket.
    async fn stop_cleanly(&mut self) {
        let started = Instant::now();
        let status = self.env.stop().await;
        let took = started.elapsed();
        eprintln!("SIGTERM to exit: {took:?}");
        assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
        assert!(took < EXIT_WITHIN, "SIGTERM exit took {took:?}");
        assert!(
            !self.socket.exists(),
            "CRI socket {} left behind",
            self.socket.display()
        );
    }
}

/// A kubeconfig for the fake API server (plain HTTP, no credentials).
fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: fake\n  cluster:\n    server: {server}\n\
         users:\n\
         - name: fake\n  user: {{}}\n\
         contexts:\n\
         - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\n"
    )
}

// --- pods and the kubelet ------------------------------------------------------

/// A pod of [`NODE`] as the kubelet knows it.
#[derive(Debug, Clone)]
struct TestPod {
    namespace: String,
    name: String,
    uid: String,
    /// What its `imagePullSecrets` resolve to.
    auth: Option<AuthConfig>,
}

impl TestPod {
    /// Creates the pod (one container, `IfNotPresent`) in the API server.
    fn create(
        api: &FakeApiServer,
        namespace: &str,
        name: &str,
        image: &str,
        creds: Option<(&str, &str)>,
    ) -> Self {
        let pod = api
            .create_pod(&serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "nodeName": NODE,
                    "containers": [{"name": "app", "image": image, "imagePullPolicy": "IfNotPresent"}],
                },
                "status": {"phase": "Pending"},
            }))
            .expect("create pod");
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: pod.metadata.uid.expect("uid"),
            // User name and password, `server_address` empty: what the
            // kubelet passes for a docker-config entry.
            auth: creds.map(|(username, password)| AuthConfig {
                username: username.into(),
                password: password.into(),
                ..Default::default()
            }),
        }
    }

    /// `pod namespace/name`, as credlet's refusals name it.
    fn named(&self) -> String {
        format!("pod {}/{}", self.namespace, self.name)
    }

    /// The sandbox config the kubelet builds (host network).
    fn sandbox_config(&self) -> PodSandboxConfig {
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

/// An `ImageSpec` as the kubelet sends it for a pod spec's image.
fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        user_specified_image: image.into(),
        ..Default::default()
    }
}

/// A CRI client calling what the kubelet calls.
#[derive(Debug, Clone)]
struct Kubelet {
    rt: RuntimeServiceClient<Channel>,
    im: ImageServiceClient<Channel>,
}

impl Kubelet {
    async fn connect(socket: &Path) -> Self {
        let channel = unix_channel(socket).await.expect("CRI channel");
        Self {
            rt: RuntimeServiceClient::new(channel.clone()),
            im: ImageServiceClient::new(channel),
        }
    }

    async fn version(&mut self) -> Result<VersionResponse, Status> {
        Ok(self
            .rt
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await?
            .into_inner())
    }

    /// `ImageStatus`: the image if reported present.
    async fn image_status(&mut self, image: &str) -> Result<Option<Image>, Status> {
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
    async fn image_id(&mut self, image: &str) -> Option<String> {
        self.image_status(image)
            .await
            .unwrap_or_else(|e| panic!("ImageStatus {image}: {e:?}"))
            .map(|i| i.id)
    }

    /// `PullImage` with the pod's credentials and sandbox config; the image
    /// ref.
    async fn pull(&mut self, image: &str, pod: &TestPod) -> Result<String, Status> {
        Ok(self
            .im
            .pull_image(PullImageRequest {
                image: Some(spec(image)),
                auth: pod.auth.clone(),
                sandbox_config: Some(pod.sandbox_config()),
            })
            .await?
            .into_inner()
            .image_ref)
    }

    async fn run_sandbox(&mut self, pod: &TestPod) -> String {
        self.rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.sandbox_config()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {}: {e:?}", pod.named()))
            .into_inner()
            .pod_sandbox_id
    }

    /// `CreateContainer`: the image by the ref `PullImage` returned, the
    /// spec's image as `user_specified_image`, the sandbox config alongside.
    async fn create_container(
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

    /// `CreateContainer` and `StartContainer`, both expected to succeed.
    async fn run_container(
        &mut self,
        pod: &TestPod,
        sandbox_id: &str,
        name: &str,
        image: &PushedImage,
    ) {
        let id = self
            .create_container(
                pod,
                sandbox_id,
                name,
                &image.config_digest,
                &image.reference,
            )
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name} of {}: {e:?}", pod.named()));
        self.rt
            .start_container(StartContainerRequest { container_id: id })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name} of {}: {e:?}", pod.named()));
    }

    async fn remove_sandbox(&mut self, sandbox_id: &str) {
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

/// Asserts a gRPC error's code and that its message contains every needle.
#[track_caller]
fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needles: &[&str],
) -> Status {
    let status = result.expect_err("expected a gRPC error");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "message lacks {needle:?}: {}",
            status.message()
        );
    }
    status
}

// --- registry traffic --------------------------------------------------------

/// Registry requests for one repository, from the access log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Traffic {
    /// `HEAD …/manifests/…`.
    manifest_heads: usize,
    /// `HEAD …/manifests/…` answered 200.
    manifest_heads_ok: usize,
    /// `GET …/manifests/…`.
    manifest_gets: usize,
    /// `GET …/blobs/…` (config and layer downloads).
    blob_gets: usize,
    /// Every request naming the repository.
    total: usize,
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

/// The registry's access log once it stops growing (it writes a line as it
/// finishes a request, just after answering).
fn settled_log(registry: &Registry) -> Vec<AccessLogEntry> {
    let mut last = registry.access_log();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = registry.access_log();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

/// Registry traffic for `image`'s repository so far.
fn traffic(registry: &Registry, image: &PushedImage) -> Traffic {
    let prefix = format!("/v2/{}/", image.name);
    let mut t = Traffic::default();
    for e in blocking(|| settled_log(registry))
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

/// Waits for an Event on `pod` whose message contains `needle` (the agent
/// sends them in the background).
async fn denial_event(api: &FakeApiServer, pod: &TestPod, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = api.core_events().into_iter().find_map(|e| {
            let message = e.message.unwrap_or_default();
            (e.involved_object.uid.as_deref() == Some(pod.uid.as_str()) && message.contains(needle))
                .then_some(message)
        });
        if let Some(message) = found {
            return message;
        }
        assert!(
            Instant::now() < deadline,
            "no Event on {} containing {needle:?}; events: {:#?}",
            pod.named(),
            api.core_events()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- the tests -----------------------------------------------------------------

/// One node's story through the binary: who may use a cached private image,
/// pass-through, SIGTERM and a restart on the same records, a runtime that
/// goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_guards_a_cached_private_image_across_a_restart() {
    let t0 = Instant::now();
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE, BOB])).expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("push");
    let mut containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let image = app.reference.as_str();
    let api = FakeApiServer::start().expect("fake API server");
    // The pods exist before the agent starts, so its first pod list has them.
    let a = TestPod::create(&api, "team", "pod-a", image, Some(ALICE));
    let b = TestPod::create(&api, "team", "pod-b", image, Some(BOB));
    let c = TestPod::create(&api, "other", "pod-c", image, None);
    let mut agent = GuardAgent::new(&api, containerd.cri_socket(), Some(&registry));
    let mut kubelet = agent.start().await;
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    eprintln!("set-up and agent start: {:?}", t0.elapsed());

    // --- 3. A pass-through call answers as the runtime does.
    assert_eq!(
        kubelet.version().await.expect("Version through credlet"),
        direct.version().await.expect("Version from containerd"),
    );

    // --- 1. Pod A, right credentials, image absent: the pull goes to the
    // runtime, which downloads the image.
    let sandbox_a = kubelet.run_sandbox(&a).await;
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "absent before any pull"
    );
    let before = traffic(&registry, &app);
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        app.config_digest
    );
    let pulled = traffic(&registry, &app) - before;
    assert!(
        pulled.blob_gets >= 2,
        "config and layer downloaded: {pulled:?}"
    );
    kubelet.run_container(&a, &sandbox_a, "app", &app).await;

    // Pod B, other right credentials, image cached: hidden from ImageStatus
    // (pods B and C hold no verification yet), so the kubelet pulls; credlet
    // checks B's credentials with a manifest HEAD and answers with the cached
    // image. No manifest or layer is downloaded again.
    let sandbox_b = kubelet.run_sandbox(&b).await;
    assert_eq!(
        direct.image_id(image).await.as_deref(),
        Some(app.config_digest.as_str()),
        "cached in containerd"
    );
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "hidden from the kubelet"
    );
    let before = traffic(&registry, &app);
    assert_eq!(
        kubelet.pull(image, &b).await.expect("pod B pulls"),
        app.config_digest
    );
    let checked = traffic(&registry, &app) - before;
    assert_eq!(
        (
            checked.manifest_heads_ok,
            checked.manifest_gets,
            checked.blob_gets
        ),
        (1, 0, 0),
        "one credential check, nothing downloaded: {checked:?}"
    );
    kubelet.run_container(&b, &sandbox_b, "app", &app).await;

    // --- 2. Pod C, no credentials: the image stays hidden, the pull is
    // refused naming the pod, and so is a container of its sandbox.
    let sandbox_c = kubelet.run_sandbox(&c).await;
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "hidden while pod C is unverified"
    );
    let before = traffic(&registry, &app);
    let denied = assert_status(
        kubelet.pull(image, &c).await,
        Code::PermissionDenied,
        &[&c.named(), image, "not authorized"],
    );
    eprintln!("pod C's pull: {}", denied.message());
    let checked = traffic(&registry, &app) - before;
    assert_eq!(
        (
            checked.manifest_heads_ok,
            checked.manifest_gets,
            checked.blob_gets
        ),
        (0, 0, 0),
        "{checked:?}"
    );
    assert_status(
        kubelet
            .create_container(&c, &sandbox_c, "app", &app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &[&c.named(), "no verification"],
    );
    denial_event(&api, &c, "not authorized").await;

    // --- 4. SIGTERM (the kubelet's connection still open): a clean exit,
    // socket removed. A new process on the same --image-records-dir still
    // knows the image was pulled with credentials, so it stays protected
    // (hidden, pod C refused) -- without that record the image would pass
    // for preloaded and need no check at all. And it keeps the verifications
    // of pods A and B: their pulls and containers need no registry request.
    agent.stop_cleanly().await;
    drop(kubelet);
    let mut kubelet = agent.start().await;
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "still hidden for pod C"
    );
    assert_status(
        kubelet
            .create_container(&c, &sandbox_c, "app", &app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &[&c.named(), "no verification"],
    );
    let before = traffic(&registry, &app);
    for (pod, sandbox) in [(&a, &sandbox_a), (&b, &sandbox_b)] {
        assert_eq!(
            kubelet.pull(image, pod).await.unwrap_or_else(|e| panic!(
                "{}'s verification lost in the restart: {e:?}",
                pod.named()
            )),
            app.config_digest
        );
        kubelet
            .create_container(pod, sandbox, "app-again", &app.config_digest, image)
            .await
            .unwrap_or_else(|e| panic!("{}'s grant lost in the restart: {e:?}", pod.named()));
    }
    let after_restart = traffic(&registry, &app) - before;
    assert_eq!(
        (after_restart.manifest_heads, after_restart.total),
        (0, 0),
        "no registry check after the restart: {after_restart:?}"
    );

    // --- 5. The runtime goes away: calls fail with Unavailable, inspected
    // or passed through.
    for sandbox in [&sandbox_a, &sandbox_b, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    blocking(|| containerd.stop());
    assert_status(kubelet.version().await, Code::Unavailable, &["unavailable"]);
    assert_status(
        kubelet.image_status(image).await,
        Code::Unavailable,
        &["unavailable"],
    );
    agent.stop_cleanly().await;
    eprintln!("total: {:?}", t0.elapsed());
}

/// An agent whose `--cri-upstream` points nowhere (the runtime not up yet)
/// starts, answers calls with Unavailable and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_without_a_runtime_answers_unavailable() {
    let api = FakeApiServer::start().expect("fake API server");
    let nowhere = tempfile::tempdir().expect("temp dir");
    let upstream = nowhere.path().join("containerd.sock");
    let mut agent = GuardAgent::new(&api, &upstream, None);
    let mut kubelet = agent.start().await;
    let upstream_name = upstream.to_string_lossy();
    assert_status(
        kubelet.version().await,
        Code::Unavailable,
        &["unavailable", &upstream_name],
    );
    assert_status(
        kubelet.image_status("registry.example/app:v1").await,
        Code::Unavailable,
        &["unavailable", &upstream_name],
    );
    agent.stop_cleanly().await;
}
