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

use credlet_test_util::kubelet::{Kubelet, TestPod, Traffic, auth, traffic};
use credlet_test_util::{Containerd, FakeApiServer, PushedImage, Registry, build_and_push_image};
use credlet_tests::agent_bin;
use credlet_tests::cluster::kubeconfig_yaml;
use credlet_tests::harness::TestEnv;
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
        Self::with_api_url(&api.url(), upstream, registry)
    }

    /// [`GuardAgent::new`] with the API server at `api_url` (which need not
    /// be up).
    fn with_api_url(api_url: &str, upstream: &Path, registry: Option<&Registry>) -> Self {
        let env = TestEnv::new(agent_bin!());
        let base = env.base().to_owned();
        let socket = base.join("cri.sock");
        let kubeconfig = base.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_yaml(api_url)).expect("write kubeconfig");
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
        self.start_waiting(true).await
    }

    /// Starts the binary and waits until it serves its CRI socket (and,
    /// with `synced`, has loaded the pod list).
    async fn start_waiting(&mut self, synced: bool) -> Kubelet {
        let wait_for_index = synced;
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
            let synced = !wait_for_index || self.env.log_from(offset).0.contains(SYNCED);
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

// --- pods and the kubelet ------------------------------------------------------

/// Creates a pod of [`NODE`] (one container, `IfNotPresent`) in the API
/// server; `creds` is what its `imagePullSecrets` resolve to.
fn create_pod(
    api: &FakeApiServer,
    namespace: &str,
    name: &str,
    image: &str,
    creds: Option<(&str, &str)>,
) -> TestPod {
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
    TestPod {
        namespace: namespace.into(),
        name: name.into(),
        uid: pod.metadata.uid.expect("uid"),
        auth: creds.map(|(user, password)| auth(user, password)),
    }
}

/// `pod namespace/name`, as credlet's refusals name it.
fn named(pod: &TestPod) -> String {
    format!("pod {}", pod.key())
}

/// `CreateContainer` (the image by the ref `PullImage` returned) and
/// `StartContainer`, both expected to succeed.
async fn run_container(
    kubelet: &mut Kubelet,
    pod: &TestPod,
    sandbox_id: &str,
    name: &str,
    image: &PushedImage,
) {
    let id = kubelet
        .create_container(
            pod,
            sandbox_id,
            name,
            &image.config_digest,
            &image.reference,
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name} of {}: {e:?}", named(pod)));
    kubelet
        .start_container(&id)
        .await
        .unwrap_or_else(|e| panic!("StartContainer {name} of {}: {e:?}", named(pod)));
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

/// Registry traffic for `image`'s repository so far (waits for the
/// registry's access log to settle, off the async workers).
fn traffic_of(registry: &Registry, image: &PushedImage) -> Traffic {
    blocking(|| traffic(registry, &image.name))
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
            named(pod),
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
    let a = create_pod(&api, "team", "pod-a", image, Some(ALICE));
    let b = create_pod(&api, "team", "pod-b", image, Some(BOB));
    let c = create_pod(&api, "other", "pod-c", image, None);
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
    let before = traffic_of(&registry, &app);
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        app.config_digest
    );
    let pulled = traffic_of(&registry, &app) - before;
    assert!(
        pulled.blob_gets >= 2,
        "config and layer downloaded: {pulled:?}"
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &app).await;

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
    let before = traffic_of(&registry, &app);
    assert_eq!(
        kubelet.pull(image, &b).await.expect("pod B pulls"),
        app.config_digest
    );
    let checked = traffic_of(&registry, &app) - before;
    assert_eq!(
        (
            checked.manifest_heads_ok,
            checked.manifest_gets,
            checked.blob_gets
        ),
        (1, 0, 0),
        "one credential check, nothing downloaded: {checked:?}"
    );
    run_container(&mut kubelet, &b, &sandbox_b, "app", &app).await;

    // --- 2. Pod C, no credentials: the image stays hidden, the pull is
    // refused naming the pod, and so is a container of its sandbox.
    let sandbox_c = kubelet.run_sandbox(&c).await;
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "hidden while pod C is unverified"
    );
    let before = traffic_of(&registry, &app);
    let denied = assert_status(
        kubelet.pull(image, &c).await,
        Code::PermissionDenied,
        &[&named(&c), image, "not authorized"],
    );
    eprintln!("pod C's pull: {}", denied.message());
    let checked = traffic_of(&registry, &app) - before;
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
        &[&named(&c), "no verification"],
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
        &[&named(&c), "no verification"],
    );
    let before = traffic_of(&registry, &app);
    for (pod, sandbox) in [(&a, &sandbox_a), (&b, &sandbox_b)] {
        assert_eq!(
            kubelet.pull(image, pod).await.unwrap_or_else(|e| panic!(
                "{}'s verification lost in the restart: {e:?}",
                named(pod)
            )),
            app.config_digest
        );
        kubelet
            .create_container(pod, sandbox, "app-again", &app.config_digest, image)
            .await
            .unwrap_or_else(|e| panic!("{}'s grant lost in the restart: {e:?}", named(pod)));
    }
    let after_restart = traffic_of(&registry, &app) - before;
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

// --- attacks on the guard through the binary ---------------------------------
//
// Each test below replays one finding of the adversarial review against the
// real binary, in front of a real containerd 1.6 and a real registry, as a
// direct CRI caller would.

/// A node with one private image alice pushed: the registry, containerd
/// trusting it, the fake API server.
struct Node {
    registry: Registry,
    app: PushedImage,
    containerd: Containerd,
    api: FakeApiServer,
}

impl Node {
    /// An htpasswd registry (alice, bob) with `repo:v1`.
    fn start(repo: &str) -> Self {
        let registry = blocking(|| Registry::start_basic_auth(&[ALICE, BOB])).expect("registry");
        Self::with_registry(registry, repo)
    }

    fn with_registry(registry: Registry, repo: &str) -> Self {
        let app = blocking(|| build_and_push_image(&registry, repo, "v1", ALICE)).expect("push");
        let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
        let api = FakeApiServer::start().expect("fake API server");
        Self {
            registry,
            app,
            containerd,
            api,
        }
    }

    /// The agent in front of this node's containerd, not started yet.
    fn agent(&self) -> GuardAgent {
        GuardAgent::new(
            &self.api,
            self.containerd.cri_socket(),
            Some(&self.registry),
        )
    }

    fn image(&self) -> &str {
        &self.app.reference
    }
}

impl GuardAgent {
    /// Sets `flag` to `value` (replacing the default the constructor gave).
    fn set(&mut self, flag: &str, value: &str) -> &mut Self {
        match self.args.iter().position(|a| a == flag) {
            Some(i) => self.args[i + 1] = value.into(),
            None => {
                self.args.push(flag.into());
                self.args.push(value.into());
            }
        }
        self
    }

    /// `--image-records-dir`.
    fn records_dir(&self) -> PathBuf {
        let i = self
            .args
            .iter()
            .position(|a| a == "--image-records-dir")
            .expect("records dir flag");
        PathBuf::from(&self.args[i + 1])
    }

    /// The image records' head files on disk (one per image; each record's
    /// grants are files of their own in a directory beside it).
    fn record_files(&self) -> Vec<PathBuf> {
        let dir = self.records_dir().join("imageguard/images");
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

/// A pod whose container runs the pause image and mounts `image` as a
/// Kubernetes image volume (`spec.volumes[].image`).
fn create_image_volume_pod(
    api: &FakeApiServer,
    namespace: &str,
    name: &str,
    image: &str,
    creds: Option<(&str, &str)>,
) -> TestPod {
    let pod = api
        .create_pod(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "nodeName": NODE,
                "containers": [{
                    "name": "app",
                    "image": credlet_test_util::PAUSE_IMAGE,
                    "imagePullPolicy": "Never",
                    "volumeMounts": [{"name": "v", "mountPath": "/v"}],
                }],
                "volumes": [{"name": "v", "image": {"reference": image, "pullPolicy": "IfNotPresent"}}],
            },
            "status": {"phase": "Pending"},
        }))
        .expect("create pod");
    TestPod {
        namespace: namespace.into(),
        name: name.into(),
        uid: pod.metadata.uid.expect("uid"),
        auth: creds.map(|(user, password)| auth(user, password)),
    }
}

/// `CreateContainer` of the pause image with `image_id` mounted as an image
/// volume (CRI `Mount.image`, as the kubelet sends it: the image by the ref
/// `PullImage` returned, the spec's reference as `user_specified_image`).
async fn create_with_image_volume(
    kubelet: &mut Kubelet,
    pod: &TestPod,
    sandbox_id: &str,
    image_id: &str,
    user_image: &str,
) -> Result<String, Status> {
    use credlet_test_util::cri::v1::{
        ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, Mount,
    };
    Ok(kubelet
        .rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "with-volume".into(),
                    attempt: 0,
                }),
                image: Some(credlet_test_util::kubelet::spec(
                    credlet_test_util::PAUSE_IMAGE,
                )),
                mounts: vec![Mount {
                    container_path: "/v".into(),
                    readonly: true,
                    image: Some(ImageSpec {
                        image: image_id.into(),
                        user_specified_image: user_image.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            sandbox_config: Some(pod.sandbox_config()),
        })
        .await?
        .into_inner()
        .container_id)
}

/// A `CreateContainerRequest` as raw protobuf: `mounts` (field 7 of
/// `ContainerConfig`) given as bytes, so a test can send what no CRI
/// library would encode.
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ContainerConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<credlet_test_util::cri::v1::ContainerMetadata>,
        #[prost(message, optional, tag = "2")]
        pub image: Option<credlet_test_util::cri::v1::ImageSpec>,
        #[prost(bytes = "vec", repeated, tag = "7")]
        pub mounts: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct CreateContainerRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "2")]
        pub config: Option<ContainerConfig>,
        #[prost(message, optional, tag = "3")]
        pub sandbox_config: Option<credlet_test_util::cri::v1::PodSandboxConfig>,
    }

    /// containerd's own version service (not CRI).
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
    }
}

/// One unary call with hand-made messages on `socket`.
async fn raw_call<Req, Resp>(
    socket: &Path,
    path: &'static str,
    request: Req,
) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let channel = credlet_test_util::unix_channel(socket)
        .await
        .expect("CRI channel");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    Ok(grpc
        .unary(tonic::Request::new(request), path, codec)
        .await?
        .into_inner())
}

/// Finding 1: a pod without credentials mounts another pod's cached private
/// image as an image volume (`Mount.image`). The guard must gate every image
/// a container uses, count image volumes as uses of the image in its pod
/// index, and refuse a CreateContainer whose mounts it cannot decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_volume_of_a_pod_without_credentials_is_refused() {
    let node = Node::start("team/volume");
    let image = node.image();
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let c = create_image_volume_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    let mut kubelet = agent.start().await;

    let sandbox_a = kubelet.run_sandbox(&a).await;
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        node.app.config_digest
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &node.app).await;

    let sandbox_c = kubelet.run_sandbox(&c).await;
    let created =
        create_with_image_volume(&mut kubelet, &c, &sandbox_c, &node.app.config_digest, image)
            .await;
    assert!(
        created.is_err(),
        "pod C (no credentials) created a container mounting the cached private image: {created:?}"
    );
    assert_status(
        created,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "hidden while pod C, which mounts it as a volume, holds no verification"
    );
    denial_event(&node.api, &c, "no verification").await;

    // A mount credlet cannot decode: field 9 (`image`) as a varint.
    let garbled = raw::CreateContainerRequest {
        pod_sandbox_id: sandbox_c.clone(),
        config: Some(raw::ContainerConfig {
            metadata: Some(credlet_test_util::cri::v1::ContainerMetadata {
                name: "garbled".into(),
                attempt: 0,
            }),
            image: Some(credlet_test_util::kubelet::spec(
                credlet_test_util::PAUSE_IMAGE,
            )),
            mounts: vec![vec![0x48, 0x01]],
        }),
        sandbox_config: Some(c.sandbox_config()),
    };
    assert_status(
        raw_call::<_, credlet_test_util::cri::v1::CreateContainerResponse>(
            &agent.socket,
            "/runtime.v1.RuntimeService/CreateContainer",
            garbled,
        )
        .await,
        Code::InvalidArgument,
        &["credlet", "CreateContainer"],
    );

    // Pod A, verified, mounts the image it runs.
    let mounted =
        create_with_image_volume(&mut kubelet, &a, &sandbox_a, &node.app.config_digest, image)
            .await;
    if let Err(status) = &mounted {
        // containerd 1.6 predates image volumes: whatever it answers, the
        // guard let the call through.
        assert!(
            !status.message().contains("credlet"),
            "pod A's image volume refused by credlet: {status:?}"
        );
    }
    for sandbox in [&sandbox_a, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    agent.stop_cleanly().await;
}

/// Bind-mounts a directory read-only over itself; undone on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let status = std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .expect("mount");
            assert!(status.success(), "mount {args:?} {}", dir.display());
        };
        run(&["--bind"]);
        let guard = Self(dir.to_owned());
        let status = std::process::Command::new("mount")
            .args(["-o", "remount,ro,bind"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(status.success(), "remount read-only {}", dir.display());
        assert!(
            fs::write(dir.join("probe"), b"x").is_err(),
            "{} is still writable",
            dir.display()
        );
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Finding 3a: the records directory cannot be written. A credentialed pull
/// of an absent image must not end with the image on the node and no record
/// of it (it would look preloaded: any pod could use it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_whose_record_cannot_be_written_does_not_leave_the_image_unprotected() {
    let node = Node::start("team/unrecorded");
    let image = node.image();
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let c = create_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    let mut kubelet = agent.start().await;
    let mut direct = Kubelet::connect(node.containerd.cri_socket()).await;
    let sandbox_a = kubelet.run_sandbox(&a).await;
    let sandbox_c = kubelet.run_sandbox(&c).await;

    let read_only = ReadOnly::new(&agent.records_dir());
    let pulled = kubelet.pull(image, &a).await;
    eprintln!("pod A's pull with the records read-only: {pulled:?}");
    if direct.image_id(image).await.is_some() {
        // The runtime has the image: the guard must know it is private.
        let created = kubelet
            .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
            .await;
        assert!(
            created.is_err(),
            "pod C (no credentials) created a container from the private image whose record could not be written: {created:?}"
        );
    }
    assert_status(pulled, Code::Unavailable, &["credlet", "record"]);

    // The disk recovers: pod A pulls, pod C is refused, also after a restart.
    drop(read_only);
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        node.app.config_digest
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &node.app).await;
    assert_status(
        kubelet
            .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    agent.stop_cleanly().await;
    let mut kubelet = agent.start().await;
    assert_status(
        kubelet
            .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    for sandbox in [&sandbox_a, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    agent.stop_cleanly().await;
}

/// Finding 3a, second case: the pull reaches the runtime, but the image's
/// record file can not be written (only the records' `images/` directory is
/// read-only). The pull is refused, the image stays private in memory, and
/// after a restart on the still unwritable disk what did reach the disk
/// (the inventory, written before the record; the pull's intent) keeps it
/// private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_image_whose_record_is_not_written_stays_private_across_a_restart() {
    let node = Node::start("team/half-recorded");
    let image = node.image();
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let c = create_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    let mut kubelet = agent.start().await;
    let mut direct = Kubelet::connect(node.containerd.cri_socket()).await;
    let sandbox_a = kubelet.run_sandbox(&a).await;
    let sandbox_c = kubelet.run_sandbox(&c).await;

    let images_dir = agent.records_dir().join("imageguard/images");
    let read_only = ReadOnly::new(&images_dir);
    let pulled = kubelet.pull(image, &a).await;
    eprintln!("pod A's pull with the record files read-only: {pulled:?}");
    assert_eq!(
        direct.image_id(image).await.as_deref(),
        Some(node.app.config_digest.as_str()),
        "the runtime pulled the image"
    );
    let created = kubelet
        .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
        .await;
    assert!(
        created.is_err(),
        "pod C (no credentials) created a container from the private image whose record could not be written: {created:?}"
    );
    assert_status(
        created,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    assert_status(pulled, Code::Unavailable, &["credlet", "record"]);

    // A restart while the disk is still unwritable.
    agent.stop_cleanly().await;
    drop(kubelet);
    let mut kubelet = agent.start().await;
    let created = kubelet
        .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
        .await;
    assert!(
        created.is_err(),
        "pod C (no credentials) created a container from the private image after a restart: {created:?}"
    );
    assert_status(
        created,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );

    // The disk is back: pod A's pull is recorded and answered.
    drop(read_only);
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        node.app.config_digest
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &node.app).await;
    assert_eq!(agent.record_files().len(), 1, "{:?}", agent.record_files());
    for sandbox in [&sandbox_a, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    agent.stop_cleanly().await;
}

/// Finding 3b: a record file deleted while the agent is down. The image the
/// guard saw pulled with credentials must stay protected, not turn into a
/// preloaded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_record_file_keeps_the_image_protected() {
    let node = Node::start("team/forgotten");
    let image = node.image();
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let c = create_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    let mut kubelet = agent.start().await;
    let sandbox_a = kubelet.run_sandbox(&a).await;
    let sandbox_c = kubelet.run_sandbox(&c).await;
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        node.app.config_digest
    );
    agent.stop_cleanly().await;
    drop(kubelet);

    let files = agent.record_files();
    assert_eq!(files.len(), 1, "one image record: {files:?}");
    fs::remove_file(&files[0]).expect("delete the record");

    let mut kubelet = agent.start().await;
    let created = kubelet
        .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
        .await;
    assert!(
        created.is_err(),
        "pod C (no credentials) created a container from the private image after its record was deleted: {created:?}"
    );
    assert_status(
        created,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    assert_eq!(kubelet.image_id(image).await, None, "still hidden");
    // Pod A proves access again and runs it.
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls again"),
        node.app.config_digest
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &node.app).await;
    for sandbox in [&sandbox_a, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    agent.stop_cleanly().await;
}

/// Finding 4a: containerd 1.6 also serves `runtime.v1alpha2`, and its own
/// API on the same socket. Through the guard, only CRI v1 is served (the
/// kubelet speaks nothing else since 1.26): anything else is refused with
/// `Unimplemented`, so nothing reaches the runtime uninspected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_api_versions_than_cri_v1_are_refused() {
    // v1alpha2's messages are v1's on the wire: the same types, its paths.
    use credlet_test_util::cri::v1 as alpha;
    let node = Node::start("team/alpha");
    let image = node.image();
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let c = create_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    let mut kubelet = agent.start().await;
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        node.app.config_digest
    );
    let sandbox_c = kubelet.run_sandbox(&c).await;

    let created: Result<alpha::CreateContainerResponse, Status> = raw_call(
        &agent.socket,
        "/runtime.v1alpha2.RuntimeService/CreateContainer",
        alpha::CreateContainerRequest {
            pod_sandbox_id: sandbox_c.clone(),
            config: Some(alpha::ContainerConfig {
                metadata: Some(alpha::ContainerMetadata {
                    name: "alpha".into(),
                    attempt: 0,
                }),
                image: Some(alpha::ImageSpec {
                    image: node.app.config_digest.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(alpha::PodSandboxConfig {
                metadata: Some(alpha::PodSandboxMetadata {
                    name: c.name.clone(),
                    uid: c.uid.clone(),
                    namespace: c.namespace.clone(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
        },
    )
    .await;
    assert!(
        created.is_err(),
        "pod C (no credentials) created a container from the private image through runtime.v1alpha2: {created:?}"
    );
    assert_status(
        created,
        Code::Unimplemented,
        &["credlet", "runtime.v1alpha2"],
    );
    assert_status(
        raw_call::<_, alpha::ImageStatusResponse>(
            &agent.socket,
            "/runtime.v1alpha2.ImageService/ImageStatus",
            alpha::ImageStatusRequest {
                image: Some(alpha::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            },
        )
        .await,
        Code::Unimplemented,
        &["credlet", "runtime.v1alpha2"],
    );
    assert_status(
        raw_call::<_, alpha::VersionResponse>(
            &agent.socket,
            "/runtime.v1alpha2.RuntimeService/Version",
            alpha::VersionRequest {
                version: "v1alpha2".into(),
            },
        )
        .await,
        Code::Unimplemented,
        &["credlet"],
    );
    // containerd's own API shares the socket; the guard is no way into it.
    let direct: Result<raw::VersionResponse, Status> = raw_call(
        node.containerd.cri_socket(),
        "/containerd.services.version.v1.Version/Version",
        raw::Empty {},
    )
    .await;
    assert!(direct.is_ok(), "containerd serves its API: {direct:?}");
    assert_status(
        raw_call::<_, raw::VersionResponse>(
            &agent.socket,
            "/containerd.services.version.v1.Version/Version",
            raw::Empty {},
        )
        .await,
        Code::Unimplemented,
        &["credlet"],
    );
    // CRI v1 still passes.
    kubelet.version().await.expect("Version v1");
    kubelet.remove_sandbox(&sandbox_c).await;
    agent.stop_cleanly().await;
}

/// Finding 4b: CreateContainer names its pod twice, by `pod_sandbox_id` and
/// in `sandbox_config`. The pod is the one the runtime ran the sandbox for:
/// a caller cannot borrow another pod's verification by naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_container_takes_the_pod_from_the_runtimes_sandbox() {
    let node = Node::start("team/borrowed");
    let image = node.image();
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let c = create_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    let mut kubelet = agent.start().await;
    let sandbox_a = kubelet.run_sandbox(&a).await;
    let sandbox_c = kubelet.run_sandbox(&c).await;
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        node.app.config_digest
    );

    // Pod C's sandbox, pod A's name on the request.
    let borrowed = kubelet
        .create_container(&a, &sandbox_c, "app", &node.app.config_digest, image)
        .await;
    assert!(
        borrowed.is_err(),
        "a container from the private image was created in pod C's sandbox on pod A's verification: {borrowed:?}"
    );
    assert_status(
        borrowed,
        Code::InvalidArgument,
        &[&c.key(), &a.key(), &sandbox_c],
    );

    // Without a sandbox_config (containerd 1.6 fails on it): refused.
    let unnamed = credlet_test_util::cri::v1::CreateContainerRequest {
        pod_sandbox_id: sandbox_a.clone(),
        config: Some(credlet_test_util::cri::v1::ContainerConfig {
            metadata: Some(credlet_test_util::cri::v1::ContainerMetadata {
                name: "unnamed".into(),
                attempt: 0,
            }),
            image: Some(credlet_test_util::kubelet::spec(&node.app.config_digest)),
            ..Default::default()
        }),
        sandbox_config: None,
    };
    assert_status(
        kubelet.rt.create_container(unnamed).await,
        Code::InvalidArgument,
        &["credlet", "sandbox_config"],
    );
    // Pod C's own sandbox and name: no verification of its own.
    assert_status(
        kubelet
            .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    // Pod A's sandbox by a prefix of its id: refused, a prefix could name
    // another sandbox by the time the runtime creates the container.
    assert_status(
        kubelet
            .create_container(&a, &sandbox_a[..12], "app", &node.app.config_digest, image)
            .await,
        Code::InvalidArgument,
        &["credlet", "full id"],
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &node.app).await;
    // A sandbox the runtime does not know.
    assert_status(
        kubelet
            .create_container(&a, &"0".repeat(64), "app", &node.app.config_digest, image)
            .await,
        Code::NotFound,
        &["credlet", "sandbox"],
    );
    for sandbox in [&sandbox_a, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    agent.stop_cleanly().await;
}

/// Finding 4c: a short image id (`sha256:<12 hex>`) parses as a tag of
/// `docker.io/library/sha256`, which an allowlist of `docker.io/library/*`
/// covers, while containerd resolves it to the private image. The guard
/// must decide on the image the runtime will use, by that image's names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_image_id_is_judged_by_the_image_it_names() {
    let node = Node::start("team/short");
    let image = node.image();
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let c = create_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    agent
        .set("--image-policy", "NeverVerifyAllowlistedImages")
        .set("--image-allowlist", "docker.io/library/*");
    let mut kubelet = agent.start().await;
    let mut direct = Kubelet::connect(node.containerd.cri_socket()).await;
    let sandbox_a = kubelet.run_sandbox(&a).await;
    let sandbox_c = kubelet.run_sandbox(&c).await;
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A pulls"),
        node.app.config_digest
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &node.app).await;

    let hex = node
        .app
        .config_digest
        .strip_prefix("sha256:")
        .expect("sha256 id");
    let short = format!("sha256:{}", &hex[..12]);
    assert_eq!(
        direct.image_id(&short).await.as_deref(),
        Some(node.app.config_digest.as_str()),
        "containerd resolves {short} to the private image"
    );
    let created = kubelet
        .create_container(&c, &sandbox_c, "short", &short, &short)
        .await;
    assert!(
        created.is_err(),
        "pod C (no credentials) created a container from the private image by its short id {short}: {created:?}"
    );
    assert_status(
        created,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    let pulled = kubelet.pull(&short, &c).await;
    assert!(
        pulled.is_err(),
        "pod C's pull of {short} answered with the private image: {pulled:?}"
    );
    assert_status(
        pulled,
        Code::PermissionDenied,
        &[&named(&c), "not authorized"],
    );
    for by in [&node.app.config_digest, &hex[..12].to_owned()] {
        if direct.image_id(by).await.is_some() {
            assert_status(
                kubelet
                    .create_container(&c, &sandbox_c, "by-id", by, by)
                    .await,
                Code::FailedPrecondition,
                &[&named(&c), "no verification"],
            );
        }
    }
    for sandbox in [&sandbox_a, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    agent.stop_cleanly().await;
}

/// Finding 6a: an image once pulled anonymously counted as public for every
/// pod and policy forever. When the positive TTL runs out, the anonymous
/// answer is checked again: a repository that turned private is then
/// protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_answer_is_checked_again_when_the_ttl_runs_out() {
    use credlet_test_util::{ANYONE, Grant};
    let registry = blocking(|| {
        Registry::start_token_auth(
            &[ALICE],
            &[
                Grant::new(ALICE.0, "pub/app", &["pull", "push"]),
                Grant::new(ANYONE, "pub/app", &["pull"]),
            ],
        )
    })
    .expect("registry");
    let node = Node::with_registry(registry, "pub/app");
    let image = node.image();
    let p = create_pod(&node.api, "team", "pod-p", image, None);
    let c = create_pod(&node.api, "other", "pod-c", image, None);
    let mut agent = node.agent();
    agent
        .set("--image-policy", "AlwaysVerify")
        .set("--image-verification-ttl", "3s");
    let mut kubelet = agent.start().await;
    let sandbox_p = kubelet.run_sandbox(&p).await;
    let sandbox_c = kubelet.run_sandbox(&c).await;
    assert_eq!(
        kubelet
            .pull(image, &p)
            .await
            .expect("anonymous pull of a public image"),
        node.app.config_digest
    );
    run_container(&mut kubelet, &p, &sandbox_p, "app", &node.app).await;

    // The repository turns private; the TTL of the anonymous answer runs out.
    node.registry
        .set_grants(&[Grant::new(ALICE.0, "pub/app", &["pull", "push"])]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let created = kubelet
        .create_container(&c, &sandbox_c, "app", &node.app.config_digest, image)
        .await;
    assert!(
        created.is_err(),
        "pod C (no credentials) created a container from an image that turned private, long after the TTL of its anonymous check: {created:?}"
    );
    assert_status(
        created,
        Code::FailedPrecondition,
        &[&named(&c), "no verification"],
    );
    assert_eq!(kubelet.image_id(image).await, None, "hidden again");
    assert_status(
        kubelet.pull(image, &c).await,
        Code::PermissionDenied,
        &[&named(&c), "not authorized"],
    );
    for sandbox in [&sandbox_p, &sandbox_c] {
        kubelet.remove_sandbox(sandbox).await;
    }
    agent.stop_cleanly().await;
}

// --- the second review -------------------------------------------------------

/// Issue 15 item 1 (review finding 5): the kubelet sets no deadline on
/// PullImage, and neither may the guard. A pull that takes longer than the
/// 30 s the guard used to impose (a registry served at 32 KiB/s through a
/// throttling relay, about 33 s) completes, through the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_slower_than_thirty_seconds_completes() {
    use credlet_test_util::{ImageFile, ImageSpec, ThrottledRelay, push_image};
    const RATE: usize = 32 * 1024;
    const LAYER: usize = 1_080_000;
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let mut spec = ImageSpec::runnable("slow").expect("spec");
    let mut noise = vec![0u8; LAYER];
    // Random bytes: gzip can not shrink the layer.
    fastrand::fill(&mut noise);
    spec.files.push(ImageFile {
        path: "/noise".into(),
        data: noise,
        mode: 0o644,
    });
    blocking(|| push_image(&registry, "team/slow", "v1", ALICE, &spec)).expect("push");
    let relay = ThrottledRelay::start(registry.addr(), RATE).expect("relay");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    containerd
        .trust_host(&relay.host(), registry.ca_pem())
        .expect("hosts.toml for the relay");
    let image = format!("{}/team/slow:v1", relay.host());
    let api = FakeApiServer::start().expect("fake API server");
    let a = create_pod(&api, "team", "pod-a", &image, Some(ALICE));
    let mut agent = GuardAgent::new(&api, containerd.cri_socket(), Some(&registry));
    let mut kubelet = agent.start().await;
    let sandbox = kubelet.run_sandbox(&a).await;

    let started = Instant::now();
    let pulled = kubelet.pull(&image, &a).await;
    let took = started.elapsed();
    eprintln!("pull through a {RATE} B/s relay: {took:?}: {pulled:?}");
    let id = pulled.expect("a slow pull completes");
    assert!(
        took > Duration::from_secs(30),
        "the pull was not slow enough to test anything: {took:?}"
    );
    kubelet
        .create_container(&a, &sandbox, "app", &id, &image)
        .await
        .expect("created");
    kubelet.remove_sandbox(&sandbox).await;
    agent.stop_cleanly().await;
}

// --- limits, failures and an API server that is down ------------------------

/// The agent's `/metrics` now.
fn metrics(addr: std::net::SocketAddr) -> String {
    let (code, body) = blocking(|| credlet_tests::http_get(addr, "/metrics")).expect("metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// `--health-listen` on a free loopback port; returns its address.
fn with_health_port(agent: &mut GuardAgent) -> std::net::SocketAddr {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], credlet_tests::free_port()).into();
    agent.set("--health-listen", &addr.to_string());
    addr
}

/// A `CreateContainerRequest` of the pause image carrying `size` bytes of
/// annotation (a container with large environment or annotations, as the
/// kubelet may send up to its 16 MiB limit).
fn big_create_container(
    pod: &TestPod,
    sandbox_id: &str,
    name: &str,
    size: usize,
) -> credlet_test_util::cri::v1::CreateContainerRequest {
    use credlet_test_util::cri::v1::{ContainerConfig, ContainerMetadata, CreateContainerRequest};
    CreateContainerRequest {
        pod_sandbox_id: sandbox_id.into(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(credlet_test_util::kubelet::spec(
                credlet_test_util::PAUSE_IMAGE,
            )),
            annotations: [("example.com/big".to_owned(), "x".repeat(size))].into(),
            ..Default::default()
        }),
        sandbox_config: Some(pod.sandbox_config()),
    }
}

/// A `CreateContainer` of 5 MB — over the 4 MiB the guard once buffered,
/// within the kubelet's 16 MiB — reaches containerd through the binary,
/// with the caller's deadline: whatever containerd answers, the kubelet gets
/// containerd's answer, not a refusal of the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_megabyte_create_container_reaches_the_runtime() {
    let containerd = blocking(Containerd::start).expect("containerd");
    let api = FakeApiServer::start().expect("fake API server");
    let pod = create_pod(
        &api,
        "team",
        "pod-big",
        credlet_test_util::PAUSE_IMAGE,
        None,
    );
    let mut agent = GuardAgent::new(&api, containerd.cri_socket(), None);
    let mut kubelet = agent.start().await;
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    let sandbox = kubelet.run_sandbox(&pod).await;
    let size = 5_000_000;

    let mut request = tonic::Request::new(big_create_container(&pod, &sandbox, "big", size));
    request.set_timeout(Duration::from_secs(60));
    let through = kubelet.rt.create_container(request).await;
    let mut request = tonic::Request::new(big_create_container(&pod, &sandbox, "big-direct", size));
    request.set_timeout(Duration::from_secs(60));
    let from_containerd = direct.rt.create_container(request).await;
    eprintln!(
        "5 MB CreateContainer through credlet: {:?}; to containerd directly: {:?}",
        through.as_ref().map(|r| r.get_ref().container_id.clone()),
        from_containerd
            .as_ref()
            .map(|r| r.get_ref().container_id.clone()),
    );
    match (&through, &from_containerd) {
        (Ok(_), Ok(_)) => {}
        (Err(status), Err(runtime)) => {
            assert_eq!(status.code(), runtime.code(), "{status:?} vs {runtime:?}");
            assert!(
                !status.message().starts_with("credlet"),
                "refused by the proxy: {status:?}"
            );
        }
        _ => panic!("through credlet {through:?}, containerd directly {from_containerd:?}"),
    }
    let log = agent.env.log();
    assert!(
        !log.contains("length limit") && !log.contains("larger than"),
        "{log}"
    );
    agent.stop_cleanly().await;
}

/// A pull the runtime fails (a tag the loopback registry does not have;
/// containerd 1.6 answers `Unknown`) passes containerd's own status to the
/// kubelet unchanged, and the agent
/// logs it once, with pod, image and call, and counts it in
/// `credlet_imageguard_failures_total{rpc,reason}`, a family whose series
/// are there from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_error_passes_unchanged_and_is_logged_and_counted() {
    let node = Node::start("team/app");
    let (registry, containerd, api) = (&node.registry, &node.containerd, &node.api);
    // A tag the registry does not have, of a repository alice may pull.
    let missing = registry.image_ref("team/app", "missing");
    let pod = create_pod(api, "team", "pod-m", &missing, Some(ALICE));
    let mut agent = node.agent();
    let health = with_health_port(&mut agent);
    let mut kubelet = agent.start().await;
    let counted = r#"credlet_imageguard_failures_total{rpc="PullImage",reason="RuntimeError"}"#;
    let before = metrics(health);
    assert_eq!(
        credlet_tests::metric_value(&before, counted),
        Some(0.0),
        "{before}"
    );
    for series in [
        r#"credlet_imageguard_failures_total{rpc="CreateContainer",reason="Timeout"}"#,
        r#"credlet_imageguard_failures_total{rpc="ImageStatus",reason="Oversized"}"#,
        r#"credlet_imageguard_failures_total{rpc="PullImage",reason="Undecodable"}"#,
    ] {
        assert_eq!(
            credlet_tests::metric_value(&before, series),
            Some(0.0),
            "{series}"
        );
    }

    let offset = fs::metadata(&agent.env.log_path).map_or(0, |m| m.len());
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    let runtime = direct
        .pull(&missing, &pod)
        .await
        .expect_err("containerd cannot pull it");
    let through = kubelet
        .pull(&missing, &pod)
        .await
        .expect_err("nor through credlet");
    eprintln!("containerd: {runtime:?}\nthrough credlet: {through:?}");
    assert_eq!(through.code(), runtime.code(), "{through:?}");
    assert!(
        matches!(through.code(), Code::NotFound | Code::Unknown),
        "{through:?}"
    );
    assert!(
        !through.message().starts_with("credlet"),
        "the runtime's own message: {through:?}"
    );

    let deadline = Instant::now() + WAIT;
    let line = loop {
        let (log, _) = agent.env.log_from(offset);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("inspected CRI call failed"))
            .collect();
        if let [line] = lines[..] {
            break line.to_owned();
        }
        assert!(lines.len() < 2, "logged more than once: {lines:#?}");
        assert!(Instant::now() < deadline, "no failure logged: {log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for needle in [
        "WARN",
        "PullImage",
        "team/pod-m",
        missing.as_str(),
        "RuntimeError",
        code_name_of(&through),
    ] {
        assert!(line.contains(needle), "{needle:?} missing in {line}");
    }
    assert_eq!(
        credlet_tests::metric_value(&metrics(health), counted),
        Some(1.0)
    );
    agent.stop_cleanly().await;
}

/// `NotFound` for `Code::NotFound`: how the agent's log names a code.
fn code_name_of(status: &Status) -> &'static str {
    match status.code() {
        Code::NotFound => "NotFound",
        Code::Unknown => "Unknown",
        _ => "",
    }
}

/// A TCP relay from `127.0.0.1:port` to `target`: the API server "comes
/// up" on the port the agent's kubeconfig names, with the pods it had
/// before it went away (same uids, as after a real outage).
async fn relay(port: u16, target: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the API server's port");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

/// The agent with its kubeconfig naming a closed loopback port serves the
/// CRI socket at once: `Version`, a pod of a preloaded image and a static
/// pod of a private image start; a pod that relies on a verification of a
/// private image is refused, saying why; readiness says the pod index is
/// not synced. Once the API server answers on that port, the index and the
/// Event of that refusal catch up, and the pod starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cri_socket_serves_while_the_api_server_is_down() {
    let node = Node::start("team/outage");
    let image = node.image();
    // The pods the API server had before it went away.
    let web = create_pod(
        &node.api,
        "team",
        "web",
        credlet_test_util::PAUSE_IMAGE,
        None,
    );
    let a = create_pod(&node.api, "team", "pod-a", image, Some(ALICE));
    let port = credlet_tests::free_port();
    let mut agent = GuardAgent::with_api_url(
        &format!("http://127.0.0.1:{port}"),
        node.containerd.cri_socket(),
        Some(&node.registry),
    );
    let health = with_health_port(&mut agent);

    let started = Instant::now();
    let mut kubelet = agent.start_waiting(false).await;
    kubelet
        .version()
        .await
        .expect("Version without the API server");
    let sandbox = kubelet.run_sandbox(&web).await;
    kubelet
        .create_container(
            &web,
            &sandbox,
            "app",
            credlet_test_util::PAUSE_IMAGE,
            credlet_test_util::PAUSE_IMAGE,
        )
        .await
        .expect("a preloaded image starts without the API server");
    let took = started.elapsed();
    eprintln!("start to a preloaded pod's container, API server down: {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    // A static pod (uid: its manifest's hash) pulls the private image with
    // its credentials and starts it.
    let static_pod = TestPod {
        namespace: "kube-system".into(),
        name: format!("etcd-{NODE}"),
        uid: "0123456789abcdef0123456789abcdef".into(),
        auth: Some(auth(ALICE.0, ALICE.1)),
    };
    let sandbox_static = kubelet.run_sandbox(&static_pod).await;
    assert_eq!(
        kubelet
            .pull(image, &static_pod)
            .await
            .expect("the static pod pulls"),
        node.app.config_digest
    );
    run_container(
        &mut kubelet,
        &static_pod,
        &sandbox_static,
        "etcd",
        &node.app,
    )
    .await;

    // Pod A's credentials are verified, but that the sandbox is pod A only
    // the API server can say: refused, for this pod only, with the reason.
    let sandbox_a = kubelet.run_sandbox(&a).await;
    assert_eq!(
        kubelet.pull(image, &a).await.expect("pod A's credentials"),
        node.app.config_digest
    );
    let refused = assert_status(
        kubelet
            .create_container(&a, &sandbox_a, "app", &node.app.config_digest, image)
            .await,
        Code::Unavailable,
        &[&named(&a), "pod list is not loaded yet"],
    );
    eprintln!("pod A while the API server is down: {}", refused.message());
    let (code, body) = blocking(|| credlet_tests::http_get(health, "/readyz")).expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("pod index is not synced"), "{body}");

    // The API server comes back on its port.
    let offset = fs::metadata(&agent.env.log_path).map_or(0, |m| m.len());
    let _relay = relay(port, node.api.addr()).await;
    let back = Instant::now();
    let deadline = back + READY_TIMEOUT;
    while !agent.env.log_from(offset).0.contains(SYNCED) {
        assert!(Instant::now() < deadline, "the pod index did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "pod index synced {:?} after the API server came back",
        back.elapsed()
    );
    run_container(&mut kubelet, &a, &sandbox_a, "app", &node.app).await;
    let (code, body) = blocking(|| credlet_tests::http_get(health, "/readyz")).expect("readyz");
    assert_eq!(code, 200, "{body}");
    // The refusal's Event, which could not be written then, is written now.
    denial_event(&node.api, &a, "pod list is not loaded yet").await;
    agent.stop_cleanly().await;
}
