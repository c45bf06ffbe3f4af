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
