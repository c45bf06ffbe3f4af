//! The node's pod index: which pods on this node use which images, from a
//! pod watch on the API server (field selector `spec.nodeName=<node>`).
//!
//! The image guard asks it which pods use an image (`ImageStatus` carries no
//! pod), how a pod wants its images pulled, and whether the pod a sandbox
//! claims to be is one the API server placed here. [`KubePodIndex`] keeps
//! it current with `kube::runtime::watcher`; [`StaticPodIndex`] is set by
//! hand for tests.
//!
//! Pods are known by the uid the container runtime sees. For a static pod
//! (a manifest the kubelet reads from disk) that is the hash of its
//! manifest; the API server only has its *mirror pod*, under another uid,
//! naming the hash in the `kubernetes.io/config.mirror` annotation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

/// `imagePullPolicy` of one container, after Kubernetes defaulting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PullPolicy {
    /// Resolve the reference on every container start.
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl PullPolicy {
    /// The policy a container gets: the spec's `imagePullPolicy` if set
    /// (unknown values count as `Always`, the strictest), else the API
    /// server's defaulting: `Always` when the image's tag is `latest` or it
    /// has neither tag nor digest, `IfNotPresent` otherwise.
    pub fn effective(spec_policy: Option<&str>, image: &str) -> Self {
        match spec_policy {
            Some("Always") => Self::Always,
            Some("IfNotPresent") => Self::IfNotPresent,
            Some("Never") => Self::Never,
            Some(p) if !p.is_empty() => Self::Always,
            _ => Self::default_for(image),
        }
    }

    /// Kubernetes' default for an image as written in a pod spec (the
    /// tag is parsed as `ParseImageName` does: no tag and no digest means
    /// `latest`).
    pub fn default_for(image: &str) -> Self {
        let (name, has_digest) = match image.split_once('@') {
            Some((name, _digest)) => (name, true),
            None => (image, false),
        };
        let last = name.rsplit('/').next().unwrap_or(name);
        let tag = last.split_once(':').map(|(_, t)| t);
        match tag {
            Some("latest") => Self::Always,
            None if !has_digest => Self::Always,
            _ => Self::IfNotPresent,
        }
    }

    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

impl std::fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One image a pod uses, as written in the pod spec: a container's image,
/// or an image volume's reference (`spec.volumes[].image`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerImage {
    /// The image exactly as in the spec (e.g. `nginx`, `127.0.0.1:5000/app:v1`);
    /// not normalized.
    pub image: String,
    /// Effective pull policy (see [`PullPolicy::effective`]; image volumes
    /// are defaulted the same way).
    pub pull_policy: PullPolicy,
}

/// The annotation of a mirror pod naming its static pod's uid.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the guard needs to know about one pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The uid CRI's `PodSandboxMetadata.uid` carries: `metadata.uid`, or
    /// for a mirror pod its static pod's uid (the
    /// [`MIRROR_ANNOTATION`]).
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The images of all containers, init containers and ephemeral
    /// containers, then of the image volumes, in spec order (duplicates
    /// kept). An image volume uses its image as much as a container does.
    pub images: Vec<ContainerImage>,
}

impl PodInfo {
    /// Extracts the guard's view of a pod; `None` without a uid.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        pod.metadata.uid.as_ref().filter(|u| !u.is_empty())?;
        let uid = mirror_of(pod)
            .or(pod.metadata.uid.as_deref())
            .unwrap_or_default()
            .to_owned();
        let mut images = Vec::new();
        if let Some(spec) = &pod.spec {
            let mut push = |image: Option<&String>, policy: Option<&String>| {
                if let Some(image) = image.filter(|i| !i.is_empty()) {
                    images.push(ContainerImage {
                        image: image.clone(),
                        pull_policy: PullPolicy::effective(policy.map(String::as_str), image),
                    });
                }
            };
            for c in spec.init_containers.iter().flatten() {
                push(c.image.as_ref(), c.image_pull_policy.as_ref());
            }
            for c in &spec.containers {
                push(c.image.as_ref(), c.image_pull_policy.as_ref());
            }
            for c in spec.ephemeral_containers.iter().flatten() {
                push(c.image.as_ref(), c.image_pull_policy.as_ref());
            }
            for v in spec.volumes.iter().flatten() {
                if let Some(image) = &v.image {
                    push(image.reference.as_ref(), image.pull_policy.as_ref());
                }
            }
        }
        Some(Self {
            uid,
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            images,
        })
    }

    /// Whether any of the pod's containers uses an image for which
    /// `matches` is true.
    pub fn uses(&self, matches: &dyn Fn(&str) -> bool) -> bool {
        self.images.iter().any(|c| matches(&c.image))
    }
}

/// The static pod a mirror pod stands for (its [`MIRROR_ANNOTATION`]).
fn mirror_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(MIRROR_ANNOTATION)
        .map(String::as_str)
        .filter(|u| !u.is_empty())
}

/// The pods on this node, by the uid the container runtime knows them by.
pub trait PodIndex: Send + Sync + 'static {
    /// The pod with this uid, if it is on this node: `None` too when two
    /// pods claim it (only mirror pods can: their annotation is theirs to
    /// write).
    fn pod(&self, uid: &str) -> Option<Arc<PodInfo>>;
    /// Pods on this node whose containers use an image for which
    /// `matches(image_string)` is true (`image_string` as written in the spec).
    fn pods_using(&self, matches: &dyn Fn(&str) -> bool) -> Vec<Arc<PodInfo>>;
    /// Whether the initial list is done (before that, the index knows nothing).
    fn is_synced(&self) -> bool;
}

/// Pods by `metadata.uid` (unique in the API), each with the uid the
/// runtime knows it by.
type PodMap = HashMap<String, Arc<PodInfo>>;

/// The pod the runtime knows by `uid`: a pod whose own uid it is, else the
/// one mirror pod that names it. Two mirror pods naming one uid: neither.
fn lookup(map: &RwLock<PodMap>, uid: &str) -> Option<Arc<PodInfo>> {
    let map = read(map);
    if let Some(pod) = map.get(uid).filter(|p| p.uid == uid) {
        return Some(Arc::clone(pod));
    }
    let mut mirrors = map.values().filter(|p| p.uid == uid);
    match (mirrors.next(), mirrors.next()) {
        (Some(pod), None) => Some(Arc::clone(pod)),
        _ => None,
    }
}

fn read(map: &RwLock<PodMap>) -> RwLockReadGuard<'_, PodMap> {
    map.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(map: &RwLock<PodMap>) -> RwLockWriteGuard<'_, PodMap> {
    map.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pods_using(map: &RwLock<PodMap>, matches: &dyn Fn(&str) -> bool) -> Vec<Arc<PodInfo>> {
    read(map)
        .values()
        .filter(|p| p.uses(matches))
        .cloned()
        .collect()
}

/// A pod index set by hand, for tests of the guard (and for running without
/// a cluster: synced and empty by default).
#[derive(Debug)]
pub struct StaticPodIndex {
    pods: RwLock<PodMap>,
    synced: AtomicBool,
}

impl Default for StaticPodIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl StaticPodIndex {
    /// An empty index that reports itself synced.
    pub fn new() -> Self {
        Self {
            pods: RwLock::new(HashMap::new()),
            synced: AtomicBool::new(true),
        }
    }

    /// An index holding `pods`, synced.
    pub fn with_pods(pods: impl IntoIterator<Item = PodInfo>) -> Self {
        let index = Self::new();
        for p in pods {
            index.insert(p);
        }
        index
    }

    /// Adds or replaces a pod (by uid).
    pub fn insert(&self, pod: PodInfo) {
        write(&self.pods).insert(pod.uid.clone(), Arc::new(pod));
    }

    /// Removes a pod; returns it if it was there.
    pub fn remove(&self, uid: &str) -> Option<Arc<PodInfo>> {
        write(&self.pods).remove(uid)
    }

    /// Sets what [`PodIndex::is_synced`] reports.
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::SeqCst);
    }
}

impl PodIndex for StaticPodIndex {
    fn pod(&self, uid: &str) -> Option<Arc<PodInfo>> {
        lookup(&self.pods, uid)
    }

    fn pods_using(&self, matches: &dyn Fn(&str) -> bool) -> Vec<Arc<PodInfo>> {
        pods_using(&self.pods, matches)
    }

    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
}

/// The pod index fed by a watch on the API server: pods with
/// `spec.nodeName=<node>`, kept as uid → [`PodInfo`]. Pods in a terminal
/// phase (`Succeeded`, `Failed`) are left out: the kubelet starts no more
/// containers for them.
///
/// The watch task re-lists on 410 Gone and restarts with kube's default
/// backoff after errors; during a re-list the previous contents keep
/// serving, and the list result replaces them atomically when complete
/// (pods deleted while the watch was down disappear then).
#[derive(Debug)]
pub struct KubePodIndex {
    node_name: String,
    pods: RwLock<PodMap>,
    synced: tokio::sync::watch::Sender<bool>,
    errors: AtomicU64,
}

impl KubePodIndex {
    /// Starts watching the pods of `node_name` and returns the index and
    /// the watch task (which runs until aborted). Must be called inside a
    /// Tokio runtime.
    pub fn start(client: Client, node_name: &str) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let index = Arc::new(Self {
            node_name: node_name.to_string(),
            pods: RwLock::new(HashMap::new()),
            synced: tokio::sync::watch::Sender::new(false),
            errors: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(index.clone(), client));
        (index, task)
    }

    /// The node whose pods this index holds.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The field selector used for the watch.
    pub fn field_selector(&self) -> String {
        format!("spec.nodeName={}", self.node_name)
    }

    /// Waits until the initial list is done; returns at once if it is.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail here.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Number of pods in the index.
    pub fn len(&self) -> usize {
        read(&self.pods).len()
    }

    /// Whether the index holds no pods.
    pub fn is_empty(&self) -> bool {
        read(&self.pods).is_empty()
    }

    /// Watch errors seen so far (each one followed by a backoff and retry).
    pub fn watch_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Whether a watched pod belongs in the index.
    fn keep(&self, pod: &Pod) -> bool {
        let on_node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| n == self.node_name);
        let terminal = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        on_node && !terminal
    }

    fn apply(&self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        if !self.keep(pod) {
            write(&self.pods).remove(uid);
            return;
        }
        if let Some(info) = PodInfo::from_pod(pod) {
            let info = Arc::new(info);
            let mut map = write(&self.pods);
            if map.get(uid) != Some(&info) {
                tracing::debug!(pod = %format_args!("{}/{}", info.namespace, info.name), uid, "pod index: pod added or changed");
                map.insert(uid.to_string(), info);
            }
        }
    }

    fn delete(&self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            write(&self.pods).remove(uid);
        }
    }
}

impl PodIndex for KubePodIndex {
    fn pod(&self, uid: &str) -> Option<Arc<PodInfo>> {
        lookup(&self.pods, uid)
    }

    fn pods_using(&self, matches: &dyn Fn(&str) -> bool) -> Vec<Arc<PodInfo>> {
        pods_using(&self.pods, matches)
    }

    fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }
}

/// `metadata.uid`, the key of the index's map.
fn api_uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

async fn run(index: Arc<KubePodIndex>, client: Client) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&index.field_selector());
    let mut stream = watcher(api, config).default_backoff().boxed();
    // Objects of the list in progress (between Init and InitDone).
    let mut relist: Option<PodMap> = None;
    // Errors in a row: while the API server is down the watcher retries
    // every second or so, and the log gets the 1st, 2nd, 4th, 8th … only.
    let mut failing: u64 = 0;
    while let Some(event) = stream.next().await {
        if event.is_ok() && failing > 0 {
            tracing::info!(node = %index.node_name, failed_attempts = failing, "pod watch reaches the API server again");
            failing = 0;
        }
        match event {
            Ok(watcher::Event::Init) => relist = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                if index.keep(&pod)
                    && let Some(info) = PodInfo::from_pod(&pod)
                {
                    relist
                        .get_or_insert_with(HashMap::new)
                        .insert(api_uid(&pod), Arc::new(info));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = relist.take().unwrap_or_default();
                let count = fresh.len();
                *write(&index.pods) = fresh;
                let first = !index.is_synced();
                index.synced.send_replace(true);
                if first {
                    tracing::info!(node = %index.node_name, pods = count, "pod index synced");
                } else {
                    tracing::debug!(node = %index.node_name, pods = count, "pod index re-listed");
                }
            }
            Ok(watcher::Event::Apply(pod)) => index.apply(&pod),
            Ok(watcher::Event::Delete(pod)) => index.delete(&pod),
            Err(e) => {
                index.errors.fetch_add(1, Ordering::Relaxed);
                failing += 1;
                // A 410 is routine (the watcher re-lists); anything else
                // means the API server is unreachable or refusing us.
                if failing.is_power_of_two() {
                    tracing::warn!(node = %index.node_name, error = %e, failed_attempts = failing, synced = index.is_synced(), "pod watch error; retrying with backoff (the CRI socket keeps serving)");
                } else {
                    tracing::debug!(node = %index.node_name, error = %e, failed_attempts = failing, "pod watch error; retrying with backoff");
                }
            }
        }
    }
    // The watcher stream never ends by itself; if it did, say so.
    tracing::error!(node = %index.node_name, "pod watch ended");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pull_policy_defaulting() {
        use PullPolicy::*;
        for (image, want) in [
            ("nginx", Always),
            ("nginx:latest", Always),
            ("nginx:1.27", IfNotPresent),
            ("127.0.0.1:5000/app", Always),
            ("127.0.0.1:5000/app:v1", IfNotPresent),
            ("localhost:5000/team/app:latest", Always),
            ("app@sha256:0123", IfNotPresent),
            ("app:latest@sha256:0123", Always),
            ("app:v1@sha256:0123", IfNotPresent),
        ] {
            assert_eq!(PullPolicy::default_for(image), want, "{image}");
            assert_eq!(PullPolicy::effective(None, image), want, "{image}");
            assert_eq!(PullPolicy::effective(Some(""), image), want, "{image}");
        }
        assert_eq!(PullPolicy::effective(Some("Never"), "nginx"), Never);
        assert_eq!(
            PullPolicy::effective(Some("IfNotPresent"), "nginx"),
            IfNotPresent
        );
        assert_eq!(PullPolicy::effective(Some("Always"), "nginx:1"), Always);
        assert_eq!(PullPolicy::effective(Some("Bogus"), "nginx:1"), Always);
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns1", "uid": "u1"},
            "spec": {
                "nodeName": "node-a",
                "initContainers": [{"name": "i", "image": "busybox:1.36"}],
                "containers": [
                    {"name": "a", "image": "127.0.0.1:5000/app:v1", "imagePullPolicy": "Never"},
                    {"name": "b", "image": "nginx"}
                ],
                "ephemeralContainers": [{"name": "dbg", "image": "debug:latest", "imagePullPolicy": "IfNotPresent"}],
                "volumes": [
                    {"name": "tls", "csi": {"driver": "csi.credlet.io"}},
                    {"name": "data", "image": {"reference": "127.0.0.1:5000/data:v2"}},
                    {"name": "tools", "image": {"reference": "tools", "pullPolicy": "Never"}},
                    {"name": "empty", "image": {}}
                ]
            }
        }))
        .unwrap()
    }

    #[test]
    fn pod_info_covers_every_container_kind() {
        let info = PodInfo::from_pod(&pod()).unwrap();
        assert_eq!(
            (
                info.uid.as_str(),
                info.namespace.as_str(),
                info.name.as_str()
            ),
            ("u1", "ns1", "web")
        );
        let images: Vec<(&str, PullPolicy)> = info
            .images
            .iter()
            .map(|c| (c.image.as_str(), c.pull_policy))
            .collect();
        assert_eq!(
            images,
            [
                ("busybox:1.36", PullPolicy::IfNotPresent),
                ("127.0.0.1:5000/app:v1", PullPolicy::Never),
                ("nginx", PullPolicy::Always),
                ("debug:latest", PullPolicy::IfNotPresent),
                ("127.0.0.1:5000/data:v2", PullPolicy::IfNotPresent),
                ("tools", PullPolicy::Never),
            ]
        );
        assert!(
            info.uses(&|i| i == "127.0.0.1:5000/data:v2"),
            "image volumes are uses"
        );
        assert!(info.uses(&|i| i == "nginx"));
        assert!(!info.uses(&|i| i == "nginx:latest"));
        let mut no_uid = pod();
        no_uid.metadata.uid = None;
        assert!(PodInfo::from_pod(&no_uid).is_none());
    }

    #[test]
    fn static_index() {
        let index = StaticPodIndex::with_pods([PodInfo::from_pod(&pod()).unwrap()]);
        assert!(index.is_synced());
        assert_eq!(index.pod("u1").unwrap().name, "web");
        assert_eq!(
            index
                .pods_using(&|i| i.starts_with("127.0.0.1:5000/"))
                .len(),
            1
        );
        assert!(index.pods_using(&|i| i == "redis").is_empty());
        index.set_synced(false);
        assert!(!index.is_synced());
        assert!(index.remove("u1").is_some());
        assert!(index.pod("u1").is_none());
    }

    #[test]
    fn static_pods_are_known_by_their_mirror_pods() {
        let index = KubePodIndex {
            node_name: "node-a".into(),
            pods: RwLock::new(HashMap::new()),
            synced: tokio::sync::watch::Sender::new(true),
            errors: AtomicU64::new(0),
        };
        let hash = "9a1b2c3d4e5f60718293a4b5c6d7e8f9";
        let mirror = |uid: &str, name: &str, of: &str| {
            let mut p = pod();
            p.metadata.uid = Some(uid.into());
            p.metadata.name = Some(name.into());
            p.metadata.annotations = Some([(MIRROR_ANNOTATION.to_owned(), of.to_owned())].into());
            p
        };
        index.apply(&pod());
        index.apply(&mirror("m1", "etcd-node-a", hash));
        let found = index.pod(hash).expect("by the static pod's uid");
        assert_eq!(
            (found.uid.as_str(), found.name.as_str()),
            (hash, "etcd-node-a")
        );
        assert!(
            index.pod("m1").is_none(),
            "the mirror pod's own uid is no runtime's"
        );
        assert_eq!(index.pod("u1").expect("a plain pod").name, "web");
        assert!(
            index
                .pods_using(&|i| i == "nginx")
                .iter()
                .any(|p| p.uid == hash),
            "pods_using gives runtime uids"
        );
        // A second pod claiming the hash: neither is taken for it.
        index.apply(&mirror("m2", "impostor", hash));
        assert!(index.pod(hash).is_none());
        // Claiming a plain pod's uid changes nothing for it.
        index.apply(&mirror("m3", "impostor-2", "u1"));
        assert_eq!(index.pod("u1").expect("the plain pod").name, "web");
    }

    #[test]
    fn terminal_and_foreign_pods_are_not_kept() {
        let index = KubePodIndex {
            node_name: "node-a".into(),
            pods: RwLock::new(HashMap::new()),
            synced: tokio::sync::watch::Sender::new(true),
            errors: AtomicU64::new(0),
        };
        let mut p = pod();
        index.apply(&p);
        assert!(index.pod("u1").is_some());
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        index.apply(&p);
        assert!(index.pod("u1").is_none(), "terminal pods leave the index");
        let mut other = pod();
        other.spec.as_mut().unwrap().node_name = Some("node-b".into());
        index.apply(&other);
        assert!(index.is_empty());
    }
}
