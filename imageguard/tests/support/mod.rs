//! Shared set-up of the image guard's end-to-end tests (`guard_e2e.rs`) and
//! benchmark (`benches/credlet-cri-bench.rs`): an [`ImageGuard`] behind a
//! [`CriProxy`] on a Unix socket in front of a real containerd, a fake API
//! server with the node's pods, and a CRI client that calls what the kubelet
//! calls, in the kubelet's order.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credlet_imageguard::events::{EventSink, KubeEvents};
use credlet_imageguard::guard::{GuardMetrics, ImageGuard};
use credlet_imageguard::pods::{KubePodIndex, PodIndex};
use credlet_imageguard::policy::GuardPolicy;
use credlet_imageguard::proxy::{CriProxy, Inspector, Upstream};
use credlet_imageguard::records::RecordStore;
use credlet_imageguard::registry::{RegistryVerifier, RegistryVerifierConfig, Verifier};
use credlet_test_util::cri::v1::AuthConfig;
use credlet_test_util::{FakeApiServer, Registry};
// Each test crate that includes this module uses some of these.
#[allow(unused_imports)]
pub use credlet_test_util::kubelet::{
    Kubelet, KubeletError, TestPod, Traffic, auth, settled_log, spec, traffic,
};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

/// The node the tests' pods are scheduled to.
pub const NODE: &str = "node-a";
/// How long anything asynchronous (watch, Events) may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `f` until it holds or [`WAIT`] passes.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs blocking harness code (process start/stop) off the async workers.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// --- the proxy -------------------------------------------------------------

/// A [`CriProxy`] serving on a Unix socket in its own temp dir.
#[derive(Debug)]
pub struct Proxy {
    /// The socket the kubelet (the test) talks to.
    pub socket: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Serves `inspector` in front of the runtime at `upstream` (a pool of
    /// two connections, as the agent does).
    pub async fn start(upstream: &Path, inspector: Arc<dyn Inspector>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("credlet-e2e-")
            .tempdir()
            .expect("proxy dir");
        let socket = dir.path().join("cri.sock");
        let listener = UnixListener::bind(&socket).expect("bind proxy socket");
        let proxy = Arc::new(CriProxy::new(Upstream::new(upstream, 2), inspector));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(
            listener,
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(2),
        ));
        Self {
            socket,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops serving and waits for the server task (connections drained).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("proxy stops")
                .expect("proxy task");
        }
    }

    /// A kubelet-like client of this proxy.
    pub async fn kubelet(&self) -> Kubelet {
        Kubelet::connect(&self.socket).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A registry verifier trusting the registries' test CA only.
pub fn verifier(registries: &[&Registry]) -> Arc<RegistryVerifier> {
    Arc::new(
        RegistryVerifier::new(RegistryVerifierConfig {
            extra_root_pems: registries.iter().map(|r| r.ca_pem().to_string()).collect(),
            use_system_roots: false,
            timeout: Duration::from_secs(5),
            ..RegistryVerifierConfig::default()
        })
        .expect("verifier"),
    )
}

/// Opens (or reopens) the record store under `state_dir`; returns it with
/// the number of records dropped as unreadable.
pub fn open_records(state_dir: &Path) -> (Arc<RecordStore>, usize) {
    let (store, dropped) = RecordStore::open(state_dir).expect("record store");
    (Arc::new(store), dropped)
}

/// Builds an [`ImageGuard`]; returns it as the proxy's inspector with its
/// metrics (clones share the counters).
pub fn guard(
    policy: GuardPolicy,
    records: &Arc<RecordStore>,
    verifier: &Arc<RegistryVerifier>,
    pods: Arc<dyn PodIndex>,
    events: Arc<dyn EventSink>,
) -> (Arc<dyn Inspector>, GuardMetrics) {
    let metrics = GuardMetrics::default();
    let guard = ImageGuard::new(
        policy,
        Arc::clone(records),
        Arc::clone(verifier) as Arc<dyn Verifier>,
        pods,
        events,
        metrics.clone(),
    );
    (Arc::new(guard), metrics)
}

// --- the cluster -----------------------------------------------------------

/// The fake API server with the node's pod index and Event sink.
#[derive(Debug)]
pub struct Cluster {
    /// The API server.
    pub api: FakeApiServer,
    /// Pods of [`NODE`] (watch).
    pub pods: Arc<KubePodIndex>,
    /// Denial Events.
    pub events: Arc<KubeEvents>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// Starts the API server, the pod index (synced) and the Event sink.
    pub async fn start() -> Self {
        let api = FakeApiServer::start().expect("fake API server");
        let client = api.kube_client().expect("kube client");
        let (pods, pods_task) = KubePodIndex::start(client.clone(), NODE);
        tokio::time::timeout(WAIT, pods.wait_synced())
            .await
            .expect("pod index synced");
        let (events, events_task) = KubeEvents::start(client, NODE);
        Self {
            api,
            pods,
            events,
            tasks: vec![pods_task, events_task],
        }
    }

    /// The pod index as the guard takes it.
    pub fn pod_index(&self) -> Arc<dyn PodIndex> {
        Arc::clone(&self.pods) as Arc<dyn PodIndex>
    }

    /// The Event sink as the guard takes it.
    pub fn event_sink(&self) -> Arc<dyn EventSink> {
        Arc::clone(&self.events) as Arc<dyn EventSink>
    }

    /// Creates a pod on [`NODE`] with one container per `(image,
    /// imagePullPolicy)` and waits until the guard's index has it.
    pub async fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        containers: &[(&str, &str)],
        auth: Option<AuthConfig>,
    ) -> TestPod {
        let containers: Vec<serde_json::Value> = containers
            .iter()
            .enumerate()
            .map(|(i, (image, policy))| {
                serde_json::json!({"name": format!("c{i}"), "image": image, "imagePullPolicy": policy})
            })
            .collect();
        let pod = self
            .api
            .create_pod(&serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": NODE, "containers": containers},
                "status": {"phase": "Pending"},
            }))
            .expect("create pod");
        let uid = pod.metadata.uid.expect("uid");
        eventually(&format!("pod {namespace}/{name} in the index"), || {
            self.pods.pod(&uid).is_some()
        })
        .await;
        TestPod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            auth,
        }
    }

    /// Deletes a pod and waits until the index has dropped it.
    pub async fn delete_pod(&self, pod: &TestPod) {
        self.api
            .delete_pod(&pod.namespace, &pod.name)
            .expect("delete pod");
        eventually(&format!("pod {} gone from the index", pod.key()), || {
            self.pods.pod(&pod.uid).is_none()
        })
        .await;
    }

    /// Waits for a denial Event on `pod` whose message contains `needle`.
    pub async fn denial_event(
        &self,
        pod: &TestPod,
        needle: &str,
    ) -> k8s_openapi::api::core::v1::Event {
        let start = Instant::now();
        loop {
            let found = self.api.core_events().into_iter().find(|e| {
                e.involved_object.uid.as_deref() == Some(pod.uid.as_str())
                    && e.message.as_deref().unwrap_or("").contains(needle)
            });
            if let Some(event) = found {
                return event;
            }
            assert!(
                start.elapsed() < WAIT,
                "no Event on {} containing {needle:?}; events: {:#?}",
                pod.key(),
                self.api.core_events()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Asserts a gRPC error's code and that its message contains every needle.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needles: &[&str],
) -> tonic::Status {
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

/// The CRI error that stopped the kubelet.
#[track_caller]
pub fn kubelet_status(result: Result<String, KubeletError>) -> tonic::Status {
    match result {
        Ok(id) => panic!("expected the kubelet to fail, got container {id}"),
        Err(e) => e
            .status()
            .cloned()
            .unwrap_or_else(|| panic!("expected a CRI error, got {e:?}")),
    }
}
