//! An in-process fake Kubernetes API server for tests that need a real
//! `kube::Client` talking HTTP to something that answers like the
//! kube-apiserver (none can run on the test machines).
//!
//! It speaks the REST and watch protocol with real object JSON: objects are
//! stored as JSON exactly as clients send them, with server-set `uid`,
//! `resourceVersion` (one cluster-wide counter, like etcd) and
//! `creationTimestamp`. Resource types are generic: every registered
//! [`ResourceType`] gets
//!
//! - `GET` collection (list, cluster-wide or per namespace), with
//!   `fieldSelector` (only the field labels the real server accepts for that
//!   type, else 400), `labelSelector`, `limit` / `continue`;
//! - `GET …?watch=true` streaming watch (chunked, newline-delimited
//!   `{"type":…,"object":…}`), from `resourceVersion` (history replayed;
//!   unset or `0` first sends every current object as `ADDED`), honouring
//!   `allowWatchBookmarks`, `timeoutSeconds`, `sendInitialEvents` and the
//!   selectors (an object leaving a selector is sent as `DELETED`, entering
//!   it as `ADDED`, as the watch cache does). A `resourceVersion` older than
//!   the kept history gets what the real server sends: HTTP 200 and one
//!   `ERROR` event with a 410 `Expired` `Status`, so kube's watcher re-lists;
//! - `POST` create (201; `generateName`; name and namespace checks; Event
//!   validation as the real server does it), `GET`/`PUT`/`PATCH`
//!   (merge patch; strategic merge patch is treated as a merge patch)/`DELETE`
//!   on objects and `PUT`/`PATCH` on the `status` subresource;
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` answered by a closure
//!   the test sets ([`FakeApiServer::set_token_reviewer`]);
//! - `/version`, `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`
//!   discovery documents;
//! - anything else: 404 with a `Status` body.
//!
//! Deletion is immediate (no graceful deletion, no finalizers). There is no
//! authentication or authorization: every request is allowed.
//!
//! The server runs on its own thread and Tokio runtime, so it works from
//! plain `#[test]`s and from any `#[tokio::test]` flavour, and dropping it
//! closes every connection (open watches included).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use credlet_test_util::FakeApiServer;
//! use k8s_openapi::api::core::v1::Pod;
//! let server = FakeApiServer::start()?;
//! server.create_pod(&serde_json::json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "nginx"}]}
//! }))?;
//! let client = server.kube_client()?; // inside a Tokio runtime
//! let pods = kube::Api::<Pod>::all(client).list(&Default::default()).await?;
//! assert_eq!(pods.items.len(), 1);
//! assert!(server.requests().iter().any(|r| r.path == "/api/v1/pods"));
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, watch};

use crate::client::parse_query;

/// How many changes the server keeps for watches that resume from an older
/// `resourceVersion`; older ones get 410 Expired.
const HISTORY_LIMIT: usize = 10_000;
/// Largest request body accepted (the real server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// Default interval between `BOOKMARK` events on watches that asked for them.
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Version reported by `/version`.
const FAKE_MINOR: &str = "35";

/// Errors of the fake API server's test-facing API.
#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    /// Binding the listening socket failed.
    #[error("fake API server: bind 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
    /// Starting the server thread or its runtime failed.
    #[error("fake API server: start server thread: {0}")]
    Start(#[source] std::io::Error),
    /// An object could not be converted to or from JSON.
    #[error("fake API server: {what}: {source}")]
    Json {
        /// What was being converted.
        what: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The store refused the operation, exactly as the HTTP API would have.
    #[error("fake API server: {code} {reason}: {message}")]
    Status {
        /// HTTP status code (404, 409, 422, …).
        code: u16,
        /// Kubernetes `Status.reason` (`NotFound`, `AlreadyExists`, …).
        reason: String,
        /// Kubernetes `Status.message`.
        message: String,
    },
    /// Building the `kube::Client` failed.
    #[error("fake API server: kube client for {url}: {source}")]
    Kube {
        /// The server URL.
        url: String,
        /// The kube error.
        #[source]
        source: kube::Error,
    },
    /// The server URL did not parse as a URI (cannot happen for 127.0.0.1).
    #[error("fake API server: URL {url}: {source}")]
    Url {
        /// The URL.
        url: String,
        /// The parse error.
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
}

impl FakeApiError {
    fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        Self::Json {
            what: what.into(),
            source,
        }
    }

    /// The HTTP status code when the store refused the operation.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<ApiStatus> for FakeApiError {
    fn from(s: ApiStatus) -> Self {
        Self::Status {
            code: s.code,
            reason: s.reason.to_string(),
            message: s.message,
        }
    }
}

/// One resource type the server serves: group/version, plural, kind, scope
/// and the field selector labels the real server accepts for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group, `""` for the core group.
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Plural resource name (the URL segment), e.g. `pods`.
    pub plural: String,
    /// Kind, e.g. `Pod`.
    pub kind: String,
    /// Namespaced (`true`) or cluster-scoped.
    pub namespaced: bool,
    /// Field selector labels accepted besides `metadata.name` and
    /// `metadata.namespace` (dotted JSON paths, e.g. `spec.nodeName`).
    pub field_labels: Vec<String>,
    /// Whether the type has a `status` subresource (then `PUT`/`PATCH` on the
    /// object keep the stored `.status`, and `…/status` changes only it).
    pub status_subresource: bool,
}

impl ResourceType {
    /// A resource type with no extra field labels and no status subresource.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            kind: kind.to_string(),
            namespaced,
            field_labels: Vec::new(),
            status_subresource: false,
        }
    }

    /// The resource type of a `k8s-openapi` type, e.g. `ResourceType::of::<Pod>()`.
    pub fn of<K>() -> Self
    where
        K: k8s_openapi::Resource,
        K::Scope: 'static,
    {
        let namespaced = std::any::TypeId::of::<K::Scope>()
            == std::any::TypeId::of::<k8s_openapi::NamespaceResourceScope>();
        Self::new(
            K::GROUP,
            K::VERSION,
            K::URL_PATH_SEGMENT,
            K::KIND,
            namespaced,
        )
    }

    /// Adds accepted field selector labels.
    #[must_use]
    pub fn with_field_labels(mut self, labels: &[&str]) -> Self {
        self.field_labels
            .extend(labels.iter().map(|l| (*l).to_string()));
        self
    }

    /// Marks the type as having a `status` subresource.
    #[must_use]
    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    /// `v1` for the core group, else `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn accepts_field(&self, label: &str) -> bool {
        label == "metadata.name"
            || (label == "metadata.namespace" && self.namespaced)
            || self.field_labels.iter().any(|l| l == label)
    }
}

fn builtin_resources() -> Vec<ResourceType> {
    use k8s_openapi::api::{
        certificates, coordination::v1::Lease, core::v1 as core, events::v1 as events,
        storage::v1::CSIDriver,
    };
    let event_fields = [
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ];
    vec![
        ResourceType::of::<Pod>()
            .with_field_labels(&[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ])
            .with_status(),
        ResourceType::of::<core::Event>().with_field_labels(&event_fields),
        ResourceType::of::<events::Event>().with_field_labels(&[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ]),
        ResourceType::of::<core::Node>()
            .with_field_labels(&["spec.unschedulable"])
            .with_status(),
        ResourceType::of::<core::Namespace>()
            .with_field_labels(&["status.phase"])
            .with_status(),
        ResourceType::of::<core::Secret>().with_field_labels(&["type"]),
        ResourceType::of::<core::ServiceAccount>(),
        ResourceType::of::<core::ConfigMap>(),
        ResourceType::of::<Lease>(),
        ResourceType::of::<CSIDriver>(),
        ResourceType::of::<certificates::v1beta1::PodCertificateRequest>()
            .with_field_labels(&["spec.signerName", "spec.podName", "spec.nodeName"])
            .with_status(),
        ResourceType::of::<certificates::v1beta1::ClusterTrustBundle>()
            .with_field_labels(&["spec.signerName"]),
        // GA after 1.35 (the upstream fixtures already show them).
        ResourceType::new(
            "certificates.k8s.io",
            "v1",
            "podcertificaterequests",
            "PodCertificateRequest",
            true,
        )
        .with_field_labels(&["spec.signerName", "spec.podName", "spec.nodeName"])
        .with_status(),
        ResourceType::new(
            "certificates.k8s.io",
            "v1",
            "clustertrustbundles",
            "ClusterTrustBundle",
            false,
        )
        .with_field_labels(&["spec.signerName"]),
        ResourceType::of::<certificates::v1::CertificateSigningRequest>()
            .with_field_labels(&["spec.signerName"])
            .with_status(),
    ]
}

/// One request the server answered, for assertions (e.g. which field
/// selector a client used).
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path, e.g. `/api/v1/pods`.
    pub path: String,
    /// Raw (still percent-encoded) query string, `""` if none.
    pub query: String,
    /// Status answered (200 for a watch that started streaming).
    pub status: u16,
    /// The request body, if it was JSON.
    pub body: Option<Value>,
}

impl RecordedRequest {
    /// The decoded value of query parameter `key`, if present.
    pub fn param(&self, key: &str) -> Option<String> {
        parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Whether this was a watch request (`watch=true` or `watch=1`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }
}

impl fmt::Display for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.query.is_empty() {
            write!(f, "{} {} -> {}", self.method, self.path, self.status)
        } else {
            write!(
                f,
                "{} {}?{} -> {}",
                self.method, self.path, self.query, self.status
            )
        }
    }
}

/// Answers `TokenReview`s; set with [`FakeApiServer::set_token_reviewer`].
pub type TokenReviewer = dyn Fn(&TokenReview) -> TokenReviewStatus + Send + Sync;

#[derive(Clone, Debug)]
struct Fault {
    method: String,
    path_contains: String,
    remaining: usize,
    action: FaultAction,
}

#[derive(Clone, Copy, Debug)]
enum FaultAction {
    Status(u16),
    Delay(Duration),
}

/// A Kubernetes API error as the server answers it.
#[derive(Clone, Debug)]
struct ApiStatus {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiStatus {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(rt)),
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn invalid(rt: &ResourceType, name: &str, causes: &[String]) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {}", rt.kind, causes.join(", ")),
        )
    }

    fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    fn to_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// `pods` or `events.events.k8s.io`, as the real server names resources in
/// messages.
fn qualified(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.plural.clone()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One stored change, for watch history and live watches.
#[derive(Debug)]
struct Change {
    resource: usize,
    rv: u64,
    kind: ChangeType,
    object: Value,
    previous: Option<Value>,
}

#[derive(Debug)]
struct Entry {
    object: Value,
    /// Creation order, for [`FakeApiServer::events`].
    seq: u64,
}

type Key = (usize, String, String);

#[derive(Debug)]
struct Store {
    rv: u64,
    seq: u64,
    resources: Vec<ResourceType>,
    objects: BTreeMap<Key, Entry>,
    history: VecDeque<Arc<Change>>,
    /// Watches and continue tokens from a resourceVersion below this get 410.
    oldest_rv: u64,
    changes: broadcast::Sender<Arc<Change>>,
    rng: SystemRandom,
}

struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<RecordedRequest>>,
    faults: Mutex<Vec<Fault>>,
    reviewer: Mutex<Option<Arc<TokenReviewer>>>,
    /// The service account issuer and its JWKS, when set.
    issuer: Mutex<Option<(String, Value)>>,
    bookmark_interval: Mutex<Duration>,
    close_watches: watch::Sender<u64>,
    open_watches: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not wedge the server for the others.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running fake API server; stops (closing every connection) on drop.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FakeApiServer {
    /// Starts the server on `127.0.0.1:<free port>` (plain HTTP/1.1) with the
    /// built-in resource types (pods, core and `events.k8s.io` events, nodes,
    /// namespaces, secrets, service accounts, config maps, leases, CSI
    /// drivers, pod certificate requests, cluster trust bundles, CSRs).
    pub fn start() -> Result<Self, FakeApiError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(FakeApiError::Bind)?;
        listener.set_nonblocking(true).map_err(FakeApiError::Bind)?;
        let addr = listener.local_addr().map_err(FakeApiError::Bind)?;
        let (changes, _) = broadcast::channel(4096);
        let (close_watches, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                seq: 0,
                resources: builtin_resources(),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest_rv: 1,
                changes,
                rng: SystemRandom::new(),
            }),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            reviewer: Mutex::new(None),
            issuer: Mutex::new(None),
            bookmark_interval: Mutex::new(DEFAULT_BOOKMARK_INTERVAL),
            close_watches,
            open_watches: std::sync::atomic::AtomicUsize::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(FakeApiError::Start)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = shared.clone();
        let thread = std::thread::Builder::new()
            .name("credlet-fake-apiserver".into())
            .spawn(move || {
                runtime.block_on(serve(listener, st, rx));
                // Dropping the runtime here cancels every connection task.
            })
            .map_err(FakeApiError::Start)?;
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `kube::Config` for this server: no TLS, no authentication,
    /// default namespace `default`.
    pub fn kube_config(&self) -> Result<kube::Config, FakeApiError> {
        let url = self.url();
        let uri = url.parse().map_err(|source| FakeApiError::Url {
            url: url.clone(),
            source,
        })?;
        Ok(kube::Config::new(uri))
    }

    /// A `kube::Client` for this server. Must be called inside a Tokio
    /// runtime (the client spawns its request buffer there).
    pub fn kube_client(&self) -> Result<kube::Client, FakeApiError> {
        kube::Client::try_from(self.kube_config()?).map_err(|source| FakeApiError::Kube {
            url: self.url(),
            source,
        })
    }

    /// Serves one more resource type (replacing one with the same
    /// group/version/plural).
    pub fn register(&self, rt: ResourceType) {
        let mut store = lock(&self.shared.store);
        if let Some(existing) = store
            .resources
            .iter_mut()
            .find(|r| r.group == rt.group && r.version == rt.version && r.plural == rt.plural)
        {
            *existing = rt;
        } else {
            store.resources.push(rt);
        }
    }

    // ----- generic store API -------------------------------------------------

    /// Creates an object (any serializable value whose JSON has `apiVersion`,
    /// `kind` and `metadata.name` or `generateName`; namespaced types need
    /// `metadata.namespace`). Returns the stored object. Watches see it.
    pub fn create<T: Serialize>(&self, obj: &T) -> Result<Value, FakeApiError> {
        let obj = to_json(obj)?;
        let mut store = lock(&self.shared.store);
        let rt = store.resource_of(&obj)?;
        let ns = obj_namespace(&obj);
        Ok(store.create(rt, ns.as_deref(), obj, false)?)
    }

    /// Replaces an object (matched by `apiVersion`, `kind`, namespace and
    /// name), status included, without a `resourceVersion` precondition.
    pub fn update<T: Serialize>(&self, obj: &T) -> Result<Value, FakeApiError> {
        let mut obj = to_json(obj)?;
        let mut store = lock(&self.shared.store);
        let rt = store.resource_of(&obj)?;
        let ns = obj_namespace(&obj);
        let name = obj_name(&obj);
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        Ok(store.update(rt, ns.as_deref(), &name, obj, UpdateMode::Force)?)
    }

    /// Deletes an object; returns it as last stored (with the deletion's
    /// `resourceVersion`).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, FakeApiError> {
        let mut store = lock(&self.shared.store);
        let rt = store.resource_of_kind(api_version, kind)?;
        Ok(store.delete(rt, namespace, name)?)
    }

    /// One stored object.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let store = lock(&self.shared.store);
        let rt = store.resource_of_kind(api_version, kind).ok()?;
        store.get(rt, namespace, name).ok()
    }

    /// Every stored object of a type, in creation order.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let store = lock(&self.shared.store);
        let Ok(rt) = store.resource_of_kind(api_version, kind) else {
            return Vec::new();
        };
        store.in_creation_order(&[rt])
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    // ----- pods ----------------------------------------------------------------

    /// Creates a pod from a `k8s_openapi` `Pod` or its JSON.
    pub fn create_pod<T: Serialize>(&self, pod: &T) -> Result<Pod, FakeApiError> {
        from_json(self.create(&with_type(to_json(pod)?, "v1", "Pod"))?)
    }

    /// Replaces a pod (status included), like a controller or the kubelet
    /// updating it.
    pub fn update_pod<T: Serialize>(&self, pod: &T) -> Result<Pod, FakeApiError> {
        from_json(self.update(&with_type(to_json(pod)?, "v1", "Pod"))?)
    }

    /// Deletes a pod at once (as after graceful termination).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<Pod, FakeApiError> {
        from_json(self.delete("v1", "Pod", Some(namespace), name)?)
    }

    /// One pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.get("v1", "Pod", Some(namespace), name)
            .and_then(|v| serde_json::from_value(v).ok())
    }

    /// Every pod, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.list("v1", "Pod")
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// Every stored Event, core/v1 and `events.k8s.io/v1`, in creation order.
    pub fn events(&self) -> Vec<Value> {
        let store = lock(&self.shared.store);
        let types: Vec<usize> = store
            .resources
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == "Event")
            .map(|(i, _)| i)
            .collect();
        store.in_creation_order(&types)
    }

    /// Every stored core/v1 Event, typed, in creation order.
    pub fn core_events(&self) -> Vec<k8s_openapi::api::core::v1::Event> {
        self.list("v1", "Event")
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    // ----- watches -----------------------------------------------------------

    /// Forgets the watch history: a watch (or `continue` token) from any
    /// resourceVersion older than the current one now gets 410 Expired, as
    /// after an etcd compaction.
    pub fn expire_watch_history(&self) {
        let mut store = lock(&self.shared.store);
        store.history.clear();
        store.oldest_rv = store.rv;
    }

    /// Ends every open watch stream (the client sees a clean end of stream,
    /// as when the server's watch timeout fires or it restarts).
    pub fn close_watches(&self) {
        self.shared.close_watches.send_modify(|g| *g += 1);
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        self.shared
            .open_watches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Interval between `BOOKMARK` events on watches that allow them (for
    /// watches started after the call). Default 1 s.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *lock(&self.shared.bookmark_interval) = interval;
    }

    // ----- token reviews -------------------------------------------------------

    /// Sets how `POST …/tokenreviews` is answered: the closure gets the
    /// review as posted and returns its status. Without one, every token is
    /// unauthenticated.
    pub fn set_token_reviewer<F>(&self, reviewer: F)
    where
        F: Fn(&TokenReview) -> TokenReviewStatus + Send + Sync + 'static,
    {
        *lock(&self.shared.reviewer) = Some(Arc::new(reviewer));
    }

    /// Serves the service account issuer's discovery document
    /// (`GET /.well-known/openid-configuration`, naming `issuer`) and its
    /// keys (`GET /openid/v1/jwks`, `jwks` as given). Until set, both are
    /// 404, as with service account issuer discovery turned off.
    pub fn set_service_account_issuer(&self, issuer: &str, jwks: Value) {
        *lock(&self.shared.issuer) = Some((issuer.to_owned(), jwks));
    }

    // ----- faults and the request log -------------------------------------------

    /// Answers the next `times` requests whose method is `method` (`"*"`: any)
    /// and whose `path?query` contains `path_contains` with HTTP `code` and a
    /// `Status` body, without touching the store.
    pub fn fail_requests(&self, method: &str, path_contains: &str, times: usize, code: u16) {
        self.add_fault(method, path_contains, times, FaultAction::Status(code));
    }

    /// Delays the next `times` matching requests by `delay` before handling
    /// them normally.
    pub fn delay_requests(&self, method: &str, path_contains: &str, times: usize, delay: Duration) {
        self.add_fault(method, path_contains, times, FaultAction::Delay(delay));
    }

    /// Drops every injected fault not used up yet: the server answers
    /// normally again.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    fn add_fault(&self, method: &str, path_contains: &str, times: usize, action: FaultAction) {
        lock(&self.shared.faults).push(Fault {
            method: method.to_ascii_uppercase(),
            path_contains: path_contains.to_string(),
            remaining: times,
            action,
        });
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }
}

fn to_json<T: Serialize>(obj: &T) -> Result<Value, FakeApiError> {
    serde_json::to_value(obj).map_err(|e| FakeApiError::json("serialize object", e))
}

fn from_json<T: DeserializeOwned>(v: Value) -> Result<T, FakeApiError> {
    serde_json::from_value(v).map_err(|e| FakeApiError::json("deserialize stored object", e))
}

/// Fills in `apiVersion`/`kind` when missing (JSON written by hand).
fn with_type(mut v: Value, api_version: &str, kind: &str) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.entry("apiVersion").or_insert_with(|| json!(api_version));
        o.entry("kind").or_insert_with(|| json!(kind));
    }
    v
}

fn meta_str(obj: &Value, field: &str) -> Option<String> {
    obj.get("metadata")?
        .get(field)?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn obj_namespace(obj: &Value) -> Option<String> {
    meta_str(obj, "namespace")
}

fn obj_name(obj: &Value) -> String {
    meta_str(obj, "name").unwrap_or_default()
}

fn metadata_mut(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    let o = obj.as_object_mut()?;
    o.entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
}

fn now_json() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// DNS-1123 subdomain: lowercase alphanumerics, `-`, `.`; ≤ 253; starts and
/// ends alphanumeric.
fn is_dns_subdomain(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// The real server's ClusterTrustBundle name rule: with `spec.signerName`
/// the name is the signer name with `/` turned into `:`, then `:` and a
/// DNS subdomain; without one it is a DNS subdomain without `:`.
fn cluster_trust_bundle_name_error(obj: &Value, name: &str) -> Option<String> {
    let signer = obj
        .pointer("/spec/signerName")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let rest = if signer.is_empty() {
        name
    } else {
        let prefix = format!("{}:", signer.replace('/', ":"));
        match name.strip_prefix(&prefix) {
            Some(rest) => rest,
            None => {
                return Some(format!(
                    "metadata.name: Invalid value: \"{name}\": ClusterTrustBundle for signerName {signer} must be named with prefix {prefix}"
                ));
            }
        }
    };
    (!is_dns_subdomain(rest)).then(|| {
        format!("metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must follow the signer prefix")
    })
}

/// The checks the real server makes on Events (`ValidateEventCreate`):
/// legacy ones for core/v1, strict ones for `events.k8s.io/v1`.
fn validate_event(rt: &ResourceType, obj: &Value, namespace: &str) -> Vec<String> {
    let s = |path: &[&str]| -> String {
        let mut v = obj;
        for p in path {
            match v.get(p) {
                Some(x) => v = x,
                None => return String::new(),
            }
        }
        v.as_str().unwrap_or_default().to_string()
    };
    let mut errs = Vec::new();
    if rt.group.is_empty() {
        let involved_ns = s(&["involvedObject", "namespace"]);
        if s(&["eventTime"]).is_empty() {
            let ok = if involved_ns.is_empty() {
                namespace.is_empty() || namespace == "default"
            } else {
                involved_ns == namespace
            };
            if !ok {
                errs.push(format!(
                    "involvedObject.namespace: Invalid value: \"{involved_ns}\": does not match event.namespace"
                ));
            }
        } else {
            if involved_ns.is_empty() && namespace != "default" && namespace != "kube-system" {
                errs.push(format!(
                    "involvedObject.namespace: Invalid value: \"{involved_ns}\": does not match event.namespace"
                ));
            }
            for (field, name) in [
                ("reportingComponent", "reportingComponent"),
                ("reportingInstance", "reportingInstance"),
                ("action", "action"),
            ] {
                if s(&[field]).is_empty() {
                    errs.push(format!("{name}: Required value"));
                }
            }
        }
    } else {
        if s(&["eventTime"]).is_empty() {
            errs.push("eventTime: Required value".into());
        }
        let ty = s(&["type"]);
        if ty != "Normal" && ty != "Warning" {
            errs.push(format!(
                "type: Invalid value: \"\": has invalid value: {ty}"
            ));
        }
        for f in ["deprecatedFirstTimestamp", "deprecatedLastTimestamp"] {
            if !s(&[f]).is_empty() {
                errs.push(format!("{f}: Invalid value: \"\": needs to be unset"));
            }
        }
        for f in [
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
        ] {
            let v = s(&[f]);
            if v.is_empty() {
                errs.push(format!("{f}: Required value"));
            } else if v.len() > 128 {
                errs.push(format!("{f}: Too long: may not be more than 128 bytes"));
            }
        }
        if s(&["note"]).len() > 1024 {
            errs.push("note: Too long: may not be more than 1024 bytes".into());
        }
    }
    errs
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpdateMode {
    /// HTTP `PUT`/`PATCH` on the object: stored status kept (if the type has a
    /// status subresource); `resourceVersion` precondition honoured.
    Main,
    /// HTTP on `…/status`: only `.status` changes.
    Status,
    /// Test API: replace everything, no precondition.
    Force,
}

impl Store {
    fn resource_of_kind(&self, api_version: &str, kind: &str) -> Result<usize, ApiStatus> {
        self.resources
            .iter()
            .position(|r| r.kind == kind && r.api_version() == api_version)
            .ok_or_else(|| {
                ApiStatus::new(
                    404,
                    "NotFound",
                    format!("no resource registered for apiVersion {api_version} kind {kind}"),
                )
            })
    }

    fn resource_of(&self, obj: &Value) -> Result<usize, ApiStatus> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        self.resource_of_kind(api_version, kind)
    }

    fn find(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.resources
            .iter()
            .position(|r| r.group == group && r.version == version && r.plural == plural)
    }

    fn key(&self, rt: usize, namespace: Option<&str>, name: &str) -> Key {
        let ns = if self.resources[rt].namespaced {
            namespace.unwrap_or("").to_string()
        } else {
            String::new()
        };
        (rt, ns, name.to_string())
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn random_bytes<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        if self.rng.fill(&mut b).is_err() {
            // Not expected; fall back to the counter so names stay unique.
            let seq = self.seq.to_le_bytes();
            for (i, x) in b.iter_mut().enumerate() {
                *x = seq[i % seq.len()] ^ (i as u8);
            }
        }
        b
    }

    fn uid(&self) -> String {
        let mut b: [u8; 16] = self.random_bytes();
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    fn name_suffix(&self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let b: [u8; 5] = self.random_bytes();
        b.iter()
            .map(|x| ALPHABET[usize::from(*x) % ALPHABET.len()] as char)
            .collect()
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.oldest_rv = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.changes.send(change);
    }

    fn in_creation_order(&self, types: &[usize]) -> Vec<Value> {
        let mut entries: Vec<&Entry> = self
            .objects
            .iter()
            .filter(|((rt, _, _), _)| types.contains(rt))
            .map(|(_, e)| e)
            .collect();
        entries.sort_by_key(|e| e.seq);
        entries.into_iter().map(|e| e.object.clone()).collect()
    }

    fn get(&self, rt: usize, namespace: Option<&str>, name: &str) -> Result<Value, ApiStatus> {
        let key = self.key(rt, namespace, name);
        self.objects
            .get(&key)
            .map(|e| e.object.clone())
            .ok_or_else(|| ApiStatus::not_found(&self.resources[rt], name))
    }

    /// Checks and fills in kind, apiVersion and namespace of an incoming
    /// object.
    fn normalize(
        &self,
        rt: usize,
        namespace: Option<&str>,
        obj: &mut Value,
    ) -> Result<(), ApiStatus> {
        let r = &self.resources[rt];
        let Some(o) = obj.as_object_mut() else {
            return Err(ApiStatus::bad_request("the body is not a JSON object"));
        };
        let api_version = r.api_version();
        if let Some(k) = o.get("kind").and_then(Value::as_str)
            && k != r.kind
        {
            return Err(ApiStatus::bad_request(format!(
                "the body kind {k:?} does not match the resource kind {:?}",
                r.kind
            )));
        }
        if let Some(v) = o.get("apiVersion").and_then(Value::as_str)
            && v != api_version
        {
            return Err(ApiStatus::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
        o.insert("kind".into(), json!(r.kind));
        o.insert("apiVersion".into(), json!(api_version));
        let namespaced = r.namespaced;
        let Some(meta) = metadata_mut(obj) else {
            return Err(ApiStatus::bad_request("metadata is not a JSON object"));
        };
        if namespaced {
            let path_ns = namespace.unwrap_or("");
            match meta.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != path_ns => {
                    return Err(ApiStatus::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
            if path_ns.is_empty() {
                return Err(ApiStatus::bad_request(
                    "the namespace of the object is required",
                ));
            }
            meta.insert("namespace".into(), json!(path_ns));
        } else {
            meta.remove("namespace");
        }
        Ok(())
    }

    fn create(
        &mut self,
        rt: usize,
        namespace: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiStatus> {
        self.normalize(rt, namespace, &mut obj)?;
        let r = self.resources[rt].clone();
        let mut name = obj_name(&obj);
        if name.is_empty() {
            match meta_str(&obj, "generateName") {
                Some(prefix) => name = format!("{prefix}{}", self.name_suffix()),
                None => {
                    return Err(ApiStatus::invalid(
                        &r,
                        "",
                        &[
                            "metadata.name: Required value: name or generateName is required"
                                .into(),
                        ],
                    ));
                }
            }
        }
        if r.kind == "ClusterTrustBundle" {
            if let Some(cause) = cluster_trust_bundle_name_error(&obj, &name) {
                return Err(ApiStatus::invalid(&r, &name, &[cause]));
            }
        } else if !is_dns_subdomain(&name) {
            return Err(ApiStatus::invalid(
                &r,
                &name,
                &[format!(
                    "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                )],
            ));
        }
        let ns = obj_namespace(&obj).unwrap_or_default();
        if r.kind == "Event" {
            let errs = validate_event(&r, &obj, &ns);
            if !errs.is_empty() {
                return Err(ApiStatus::invalid(&r, &name, &errs));
            }
        }
        let key = self.key(rt, Some(&ns), &name);
        if self.objects.contains_key(&key) {
            return Err(ApiStatus::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", qualified(&r)),
            ));
        }
        let uid = self.uid();
        let rv = if dry_run { self.rv } else { self.next_rv() };
        if let Some(meta) = metadata_mut(&mut obj) {
            meta.insert("name".into(), json!(name));
            meta.insert("uid".into(), json!(uid));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.insert("creationTimestamp".into(), now_json());
            meta.remove("deletionTimestamp");
            meta.remove("deletionGracePeriodSeconds");
            meta.remove("selfLink");
        }
        if dry_run {
            return Ok(obj);
        }
        self.seq += 1;
        self.objects.insert(
            key,
            Entry {
                object: obj.clone(),
                seq: self.seq,
            },
        );
        self.record(Change {
            resource: rt,
            rv,
            kind: ChangeType::Added,
            object: obj.clone(),
            previous: None,
        });
        Ok(obj)
    }

    fn update(
        &mut self,
        rt: usize,
        namespace: Option<&str>,
        name: &str,
        mut obj: Value,
        mode: UpdateMode,
    ) -> Result<Value, ApiStatus> {
        let r = self.resources[rt].clone();
        let key = self.key(rt, namespace, name);
        let Some(old) = self.objects.get(&key).map(|e| e.object.clone()) else {
            return Err(ApiStatus::not_found(&r, name));
        };
        let ns = obj_namespace(&old);
        self.normalize(rt, ns.as_deref(), &mut obj)?;
        let body_name = obj_name(&obj);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiStatus::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        if mode != UpdateMode::Force
            && let Some(rv) = meta_str(&obj, "resourceVersion")
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion").as_deref()
        {
            return Err(ApiStatus::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    qualified(&r)
                ),
            ));
        }
        let mut new = match mode {
            UpdateMode::Status => {
                let mut n = old.clone();
                if let Some(o) = n.as_object_mut() {
                    match obj.get("status") {
                        Some(s) => o.insert("status".into(), s.clone()),
                        None => o.remove("status"),
                    };
                }
                n
            }
            UpdateMode::Main if r.status_subresource => {
                if let Some(o) = obj.as_object_mut() {
                    match old.get("status") {
                        Some(s) => o.insert("status".into(), s.clone()),
                        None => o.remove("status"),
                    };
                }
                obj
            }
            UpdateMode::Main | UpdateMode::Force => obj,
        };
        // Server-owned metadata survives.
        if let Some(meta) = metadata_mut(&mut new) {
            meta.insert("name".into(), json!(name));
            for f in [
                "uid",
                "creationTimestamp",
                "resourceVersion",
                "deletionTimestamp",
            ] {
                match old.get("metadata").and_then(|m| m.get(f)) {
                    Some(v) => meta.insert(f.into(), v.clone()),
                    None => meta.remove(f),
                };
            }
        }
        if new == old {
            // No-op updates do not bump the resourceVersion or notify watches.
            return Ok(old);
        }
        let rv = self.next_rv();
        if let Some(meta) = metadata_mut(&mut new) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        if let Some(e) = self.objects.get_mut(&key) {
            e.object = new.clone();
        }
        self.record(Change {
            resource: rt,
            rv,
            kind: ChangeType::Modified,
            object: new.clone(),
            previous: Some(old),
        });
        Ok(new)
    }

    fn patch(
        &mut self,
        rt: usize,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        mode: UpdateMode,
    ) -> Result<Value, ApiStatus> {
        let mut obj = self.get(rt, namespace, name)?;
        // The patch's own resourceVersion (if any) is a precondition; the
        // stored one is not.
        let patched_rv = patch
            .get("metadata")
            .and_then(|m| m.get("resourceVersion"))
            .cloned();
        merge_patch(&mut obj, patch);
        if let Some(meta) = metadata_mut(&mut obj) {
            match patched_rv {
                Some(v) if !v.is_null() => meta.insert("resourceVersion".into(), v),
                _ => meta.remove("resourceVersion"),
            };
        }
        self.update(rt, namespace, name, obj, mode)
    }

    fn delete(
        &mut self,
        rt: usize,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiStatus> {
        let key = self.key(rt, namespace, name);
        let Some(entry) = self.objects.remove(&key) else {
            return Err(ApiStatus::not_found(&self.resources[rt], name));
        };
        let rv = self.next_rv();
        let mut obj = entry.object;
        if let Some(meta) = metadata_mut(&mut obj) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        self.record(Change {
            resource: rt,
            rv,
            kind: ChangeType::Deleted,
            object: obj.clone(),
            previous: None,
        });
        Ok(obj)
    }

    fn list(&self, rt: usize, sel: &Selector, q: &ListQuery) -> Result<Value, ApiStatus> {
        let r = &self.resources[rt];
        let (list_rv, after) = match &q.continue_token {
            Some(tok) => {
                let (rv, rest) = tok
                    .split_once('|')
                    .and_then(|(rv, rest)| Some((rv.parse::<u64>().ok()?, rest)))
                    .ok_or_else(|| ApiStatus::bad_request("invalid continue token"))?;
                if rv < self.oldest_rv {
                    return Err(ApiStatus::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                let (ns, name) = rest.split_once('|').unwrap_or(("", rest));
                (rv, Some((ns.to_string(), name.to_string())))
            }
            None => (self.rv, None),
        };
        let mut items = Vec::new();
        let mut remaining = 0usize;
        for ((t, ns, name), e) in &self.objects {
            if *t != rt || !sel.matches(&e.object) {
                continue;
            }
            if let Some((ans, aname)) = &after
                && (ns, name) <= (ans, aname)
            {
                continue;
            }
            if let Some(limit) = q.limit
                && items.len() >= limit
            {
                remaining += 1;
                continue;
            }
            let mut item = e.object.clone();
            if let Some(o) = item.as_object_mut() {
                // The real server leaves kind/apiVersion out of list items.
                o.remove("kind");
                o.remove("apiVersion");
            }
            items.push((ns.clone(), name.clone(), item));
        }
        let mut metadata = Map::new();
        metadata.insert("resourceVersion".into(), json!(list_rv.to_string()));
        if remaining > 0
            && let Some((ns, name, _)) = items.last()
        {
            metadata.insert("continue".into(), json!(format!("{list_rv}|{ns}|{name}")));
            metadata.insert("remainingItemCount".into(), json!(remaining));
        }
        Ok(json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version(),
            "metadata": metadata,
            "items": items.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
        }))
    }
}

// ----- selectors ------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Selector {
    namespace: Option<String>,
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

#[derive(Clone, Debug)]
enum LabelReq {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

fn json_path_str(obj: &Value, path: &str) -> String {
    let mut v = obj;
    for p in path.split('.') {
        match v.get(p) {
            Some(x) => v = x,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl Selector {
    fn parse(
        rt: &ResourceType,
        namespace: Option<&str>,
        fields: Option<&str>,
        labels: Option<&str>,
    ) -> Result<Self, ApiStatus> {
        let mut sel = Selector {
            namespace: namespace.map(str::to_string),
            ..Default::default()
        };
        for req in fields.unwrap_or("").split(',').map(str::trim) {
            if req.is_empty() {
                continue;
            }
            let (k, eq, v) = if let Some((k, v)) = req.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = req.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = req.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiStatus::bad_request(format!(
                    "invalid field selector: {req:?}: no operator"
                )));
            };
            let k = k.trim();
            if !rt.accepts_field(k) {
                return Err(ApiStatus::bad_request(format!(
                    "field label not supported: {k}"
                )));
            }
            sel.fields.push((k.to_string(), eq, v.trim().to_string()));
        }
        for req in split_top_level(labels.unwrap_or("")) {
            let req = req.trim();
            if req.is_empty() {
                continue;
            }
            let bad = || ApiStatus::bad_request(format!("unable to parse requirement: {req:?}"));
            let parsed = if let Some(k) = req.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = req.split_once("!=") {
                LabelReq::NotIn(k.trim().to_string(), vec![v.trim().to_string()])
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                LabelReq::In(k.trim().to_string(), vec![v.trim().to_string()])
            } else if let Some(open) = req.find('(') {
                let head: Vec<&str> = req[..open].split_whitespace().collect();
                let values: Vec<String> = req[open + 1..]
                    .strip_suffix(')')
                    .ok_or_else(bad)?
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect();
                match head.as_slice() {
                    [k, "in"] => LabelReq::In((*k).to_string(), values),
                    [k, "notin"] => LabelReq::NotIn((*k).to_string(), values),
                    _ => return Err(bad()),
                }
            } else {
                LabelReq::Exists(req.to_string())
            };
            sel.labels.push(parsed);
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj_namespace(obj).as_deref() != Some(ns.as_str())
        {
            return false;
        }
        let fields_ok = self
            .fields
            .iter()
            .all(|(k, eq, v)| (json_path_str(obj, k) == *v) == *eq);
        let labels = obj.get("metadata").and_then(|m| m.get("labels"));
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        fields_ok
            && self.labels.iter().all(|r| match r {
                LabelReq::In(k, vs) => label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
                LabelReq::NotIn(k, vs) => !label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
                LabelReq::Exists(k) => label(k).is_some(),
                LabelReq::NotExists(k) => label(k).is_none(),
            })
    }
}

/// Splits a label selector on commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[derive(Debug, Default)]
struct ListQuery {
    limit: Option<usize>,
    continue_token: Option<String>,
}

// ----- HTTP -----------------------------------------------------------------------

type RespBody = BoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed()
}

fn json_response(status: u16, body: &Value) -> Response<RespBody> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status_response(s: &ApiStatus) -> Response<RespBody> {
    json_response(s.code, &s.to_json())
}

/// A response body fed by a channel: one chunk per watch event.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// What a request addresses.
#[derive(Debug)]
struct Target {
    rt: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Resource(Target),
    TokenReview,
    OpenIdConfiguration,
    Jwks,
    Version,
    CoreVersions,
    Groups,
    GroupVersion(String, String),
    NotFound,
}

fn route(store: &Store, path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        [".well-known", "openid-configuration"] => return Route::OpenIdConfiguration,
        ["openid", "v1", "jwks"] => return Route::Jwks,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["api", v] => return Route::GroupVersion(String::new(), (*v).to_string()),
        ["apis", g, v] => return Route::GroupVersion((*g).to_string(), (*v).to_string()),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => return Route::TokenReview,
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::NotFound,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] => (Some((*ns).to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(tail);
            v
        }),
        other => (None, other.to_vec()),
    };
    let Some((plural, tail)) = rest.split_first() else {
        return Route::NotFound;
    };
    let Some(rt) = store.find(group, version, plural) else {
        return Route::NotFound;
    };
    let namespaced = store.resources[rt].namespaced;
    if namespace.is_some() && !namespaced {
        return Route::NotFound;
    }
    let (name, subresource) = match tail {
        [] => (None, None),
        [name] => (Some((*name).to_string()), None),
        [name, "status"] => (Some((*name).to_string()), Some("status".to_string())),
        _ => return Route::NotFound,
    };
    if namespaced && namespace.is_none() && name.is_some() {
        return Route::NotFound;
    }
    Route::Resource(Target {
        rt,
        namespace,
        name,
        subresource,
    })
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<RespBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match collect_body(req.into_body()).await {
        Ok(b) => b,
        Err(msg) => {
            let s = ApiStatus::new(413, "RequestEntityTooLarge", msg);
            return record(&shared, &method, &path, &query, None, status_response(&s));
        }
    };
    let body_json: Option<Value> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
    };

    // Injected faults.
    let target = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let fault = {
        let mut faults = lock(&shared.faults);
        let hit = faults.iter_mut().find(|f| {
            f.remaining > 0
                && (f.method == "*" || f.method == method.as_str())
                && target.contains(&f.path_contains)
        });
        let action = hit.map(|f| {
            f.remaining -= 1;
            f.action
        });
        faults.retain(|f| f.remaining > 0);
        action
    };
    match fault {
        Some(FaultAction::Status(code)) => {
            let reason = match code {
                400 => "BadRequest",
                401 => "Unauthorized",
                403 => "Forbidden",
                404 => "NotFound",
                409 => "Conflict",
                410 => "Expired",
                429 => "TooManyRequests",
                503 => "ServiceUnavailable",
                504 => "Timeout",
                _ => "InternalError",
            };
            let s = ApiStatus::new(code, reason, format!("injected failure ({code})"));
            return record(
                &shared,
                &method,
                &path,
                &query,
                body_json,
                status_response(&s),
            );
        }
        Some(FaultAction::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }

    let params = Params(parse_query(&query));
    let resp = dispatch(
        &shared,
        &method,
        &path,
        &params,
        &content_type,
        body_json.as_ref(),
        &body,
    )
    .await;
    record(&shared, &method, &path, &query, body_json, resp)
}

fn record(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &str,
    body: Option<Value>,
    resp: Response<RespBody>,
) -> Response<RespBody> {
    lock(&shared.requests).push(RecordedRequest {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        status: resp.status().as_u16(),
        body,
    });
    resp
}

/// Decoded query parameters.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a request body up to [`MAX_BODY`].
async fn collect_body(body: Incoming) -> Result<Bytes, String> {
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(format!("request body: {e}")),
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    params: &Params,
    content_type: &str,
    body: Option<&Value>,
    raw_body: &Bytes,
) -> Response<RespBody> {
    let param = |k| params.get(k);
    let routed = route(&lock(&shared.store), path);
    let routed_is_jwks = matches!(routed, Route::Jwks);
    let t = match routed {
        Route::Resource(t) => t,
        Route::TokenReview => return token_review(shared, method, body),
        Route::OpenIdConfiguration | Route::Jwks => {
            let issuer = lock(&shared.issuer).clone();
            return match (issuer, routed_is_jwks) {
                _ if *method != Method::GET => status_response(&ApiStatus::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )),
                (None, _) => status_response(&not_found_path()),
                (Some((issuer, _)), false) => json_response(200, &openid_configuration(&issuer)),
                (Some((_, jwks)), true) => json_response(200, &jwks),
            };
        }
        Route::Version => return json_response(200, &version_json()),
        Route::CoreVersions => {
            return json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        Route::Groups => return json_response(200, &groups_json(&lock(&shared.store))),
        Route::GroupVersion(g, v) => {
            return match resources_json(&lock(&shared.store), &g, &v) {
                Some(doc) => json_response(200, &doc),
                None => status_response(&not_found_path()),
            };
        }
        Route::NotFound => return status_response(&not_found_path()),
    };
    let dry_run = param("dryRun").is_some();
    let need_body = || {
        body.cloned().ok_or_else(|| {
            if raw_body.is_empty() {
                ApiStatus::bad_request("the request body is empty")
            } else {
                ApiStatus::bad_request("the request body is not valid JSON")
            }
        })
    };
    let ns = t.namespace.as_deref();
    let result: Result<(u16, Value), ApiStatus> = match (method, &t.name, &t.subresource) {
        (&Method::GET, None, None) => {
            let rt = lock(&shared.store).resources[t.rt].clone();
            let sel = match Selector::parse(&rt, ns, param("fieldSelector"), param("labelSelector"))
            {
                Ok(s) => s,
                Err(e) => return status_response(&e),
            };
            if matches!(param("watch"), Some("true" | "1")) {
                return start_watch(shared, t.rt, sel, params).await;
            }
            let q = ListQuery {
                limit: param("limit")
                    .and_then(|l| l.parse().ok())
                    .filter(|l| *l > 0),
                continue_token: param("continue")
                    .filter(|c| !c.is_empty())
                    .map(str::to_string),
            };
            lock(&shared.store).list(t.rt, &sel, &q).map(|v| (200, v))
        }
        (&Method::POST, None, None) => need_body().and_then(|obj| {
            lock(&shared.store)
                .create(t.rt, ns, obj, dry_run)
                .map(|v| (201, v))
        }),
        (&Method::GET, Some(name), _) => lock(&shared.store).get(t.rt, ns, name).map(|v| (200, v)),
        (&Method::PUT, Some(name), sub) => need_body().and_then(|obj| {
            let mode = if sub.is_some() {
                UpdateMode::Status
            } else {
                UpdateMode::Main
            };
            lock(&shared.store)
                .update(t.rt, ns, name, obj, mode)
                .map(|v| (200, v))
        }),
        (&Method::PATCH, Some(name), sub) => {
            let ct = content_type.split(';').next().unwrap_or("").trim();
            match ct {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    need_body().and_then(|patch| {
                        let mode = if sub.is_some() {
                            UpdateMode::Status
                        } else {
                            UpdateMode::Main
                        };
                        lock(&shared.store)
                            .patch(t.rt, ns, name, &patch, mode)
                            .map(|v| (200, v))
                    })
                }
                other => Err(ApiStatus::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the fake API server does not support patch content type {other:?}"),
                )),
            }
        }
        (&Method::DELETE, Some(name), None) => {
            lock(&shared.store).delete(t.rt, ns, name).map(|v| (200, v))
        }
        _ => Err(ApiStatus::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => status_response(&e),
    }
}

/// The service account issuer discovery document the API server serves.
fn openid_configuration(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
    })
}

fn not_found_path() -> ApiStatus {
    ApiStatus::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn version_json() -> Value {
    json!({
        "major": "1",
        "minor": FAKE_MINOR,
        "gitVersion": format!("v1.{FAKE_MINOR}.0-credlet-fake"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn groups_json(store: &Store) -> Value {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in store.resources.iter().filter(|r| !r.group.is_empty()) {
        let versions = groups.entry(&r.group).or_default();
        if !versions.contains(&r.version.as_str()) {
            versions.push(&r.version);
        }
    }
    groups
        .entry("authentication.k8s.io")
        .or_default()
        .push("v1");
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            let preferred = versions.first().cloned().unwrap_or(Value::Null);
            json!({"name": g, "versions": versions, "preferredVersion": preferred})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resources_json(store: &Store, group: &str, version: &str) -> Option<Value> {
    let mut resources: Vec<Value> = Vec::new();
    for r in store
        .resources
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(json!({
            "name": r.plural,
            "singularName": r.kind.to_ascii_lowercase(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }));
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if group == "authentication.k8s.io" && version == "v1" {
        resources.push(json!({
            "name": "tokenreviews", "singularName": "tokenreview", "namespaced": false,
            "kind": "TokenReview", "verbs": ["create"],
        }));
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

fn token_review(shared: &Shared, method: &Method, body: Option<&Value>) -> Response<RespBody> {
    if method != Method::POST {
        return status_response(&ApiStatus::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let Some(body) = body else {
        return status_response(&ApiStatus::bad_request(
            "the request body is not valid JSON",
        ));
    };
    let review: TokenReview = match serde_json::from_value(body.clone()) {
        Ok(r) => r,
        Err(e) => return status_response(&ApiStatus::bad_request(format!("TokenReview: {e}"))),
    };
    let reviewer = lock(&shared.reviewer).clone();
    let status = match reviewer {
        Some(f) => f(&review),
        None => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("fake API server: no token reviewer configured".into()),
            ..Default::default()
        },
    };
    let answer = TokenReview {
        status: Some(status),
        ..review
    };
    match serde_json::to_value(&answer) {
        Ok(mut v) => {
            if let Some(meta) = metadata_mut(&mut v) {
                meta.insert("creationTimestamp".into(), Value::Null);
            }
            json_response(201, &v)
        }
        Err(e) => status_response(&ApiStatus::new(500, "InternalError", e.to_string())),
    }
}

// ----- watch ------------------------------------------------------------------------

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
    )
}

/// What a watch sends for one change, given its selector (as the watch
/// cache: leaving the selector is `DELETED` with the previous content,
/// entering it is `ADDED`).
fn watch_event_for(change: &Change, sel: &Selector) -> Option<Bytes> {
    let now = sel.matches(&change.object);
    match change.kind {
        ChangeType::Added => now.then(|| watch_line("ADDED", &change.object)),
        ChangeType::Deleted => now.then(|| watch_line("DELETED", &change.object)),
        ChangeType::Modified => {
            let before = change.previous.as_ref().is_some_and(|p| sel.matches(p));
            match (before, now) {
                (true, true) => Some(watch_line("MODIFIED", &change.object)),
                (false, true) => Some(watch_line("ADDED", &change.object)),
                (true, false) => {
                    let mut old = change.previous.clone().unwrap_or(Value::Null);
                    if let Some(meta) = metadata_mut(&mut old) {
                        meta.insert("resourceVersion".into(), json!(change.rv.to_string()));
                    }
                    Some(watch_line("DELETED", &old))
                }
                (false, false) => None,
            }
        }
    }
}

struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0
            .open_watches
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn start_watch(
    shared: &Arc<Shared>,
    rt: usize,
    sel: Selector,
    params: &Params,
) -> Response<RespBody> {
    let param = |k| params.get(k);
    let bookmarks = matches!(param("allowWatchBookmarks"), Some("true" | "1"));
    let initial_events = matches!(param("sendInitialEvents"), Some("true" | "1"));
    let timeout = param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let from = param("resourceVersion").unwrap_or("").to_string();
    let interval = *lock(&shared.bookmark_interval);

    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut backlog: Vec<Bytes> = Vec::new();
    let (changes, rtype, start_rv) = {
        let store = lock(&shared.store);
        let rtype = store.resources[rt].clone();
        if initial_events || from.is_empty() || from == "0" {
            // Synthetic ADDED for the current state, then live changes.
            for ((t, _, _), e) in &store.objects {
                if *t == rt && sel.matches(&e.object) {
                    backlog.push(watch_line("ADDED", &e.object));
                }
            }
            if initial_events && bookmarks {
                backlog.push(bookmark(&rtype, store.rv, true));
            }
        } else {
            let Ok(rv) = from.parse::<u64>() else {
                return status_response(&ApiStatus::bad_request(format!(
                    "invalid resource version {from:?}"
                )));
            };
            if rv < store.oldest_rv {
                // What the real server does: 200, one ERROR event, end.
                let status = ApiStatus::expired(format!(
                    "too old resource version: {rv} ({})",
                    store.oldest_rv
                ));
                let line = watch_line("ERROR", &status.to_json());
                let mut resp = Response::new(full(line));
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                return resp;
            }
            for c in store
                .history
                .iter()
                .filter(|c| c.resource == rt && c.rv > rv)
            {
                if let Some(line) = watch_event_for(c, &sel) {
                    backlog.push(line);
                }
            }
        }
        (store.changes.subscribe(), rtype, store.rv)
    };
    shared
        .open_watches
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let guard = OpenWatch(shared.clone());
    let mut close = shared.close_watches.subscribe();
    tokio::spawn(watch_task(WatchTask {
        tx,
        backlog,
        changes,
        rt,
        rtype,
        sel,
        bookmarks: bookmarks.then_some(interval),
        timeout,
        last_rv: start_rv,
        _guard: guard,
        close: {
            close.borrow_and_update();
            close
        },
    }));
    let mut resp = Response::new(ChannelBody { rx }.boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

struct WatchTask {
    tx: mpsc::Sender<Bytes>,
    backlog: Vec<Bytes>,
    changes: broadcast::Receiver<Arc<Change>>,
    rt: usize,
    rtype: ResourceType,
    sel: Selector,
    bookmarks: Option<Duration>,
    timeout: Option<Duration>,
    last_rv: u64,
    _guard: OpenWatch,
    close: watch::Receiver<u64>,
}

async fn watch_task(mut w: WatchTask) {
    for line in std::mem::take(&mut w.backlog) {
        if w.tx.send(line).await.is_err() {
            return;
        }
    }
    let deadline = w.timeout.map(|t| tokio::time::Instant::now() + t);
    let far = Duration::from_secs(365 * 24 * 3600);
    let mut tick = tokio::time::interval(w.bookmarks.unwrap_or(far));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = w.tx.closed() => return,
            _ = until_deadline => return,
            _ = w.close.changed() => return,
            _ = tick.tick(), if w.bookmarks.is_some() => {
                if w.tx.send(bookmark(&w.rtype, w.last_rv, false)).await.is_err() {
                    return;
                }
            }
            change = w.changes.recv() => match change {
                Ok(c) => {
                    if c.resource != w.rt {
                        continue;
                    }
                    w.last_rv = c.rv;
                    if let Some(line) = watch_event_for(&c, &w.sel)
                        && w.tx.send(line).await.is_err()
                    {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let status = ApiStatus::expired("watch consumer too slow: events were dropped");
                    let _ = w.tx.send(watch_line("ERROR", &status.to_json())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name, "tier": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]},
        })
    }

    #[test]
    fn field_and_label_selectors() {
        let rt = builtin_resources().remove(0);
        let p = pod("ns1", "a", "node-1");
        let sel = |f: Option<&str>, l: Option<&str>| Selector::parse(&rt, None, f, l).unwrap();
        assert!(sel(Some("spec.nodeName=node-1"), None).matches(&p));
        assert!(sel(Some("spec.nodeName==node-1,metadata.namespace=ns1"), None).matches(&p));
        assert!(!sel(Some("spec.nodeName!=node-1"), None).matches(&p));
        assert!(!sel(Some("spec.nodeName=node-2"), None).matches(&p));
        assert!(
            sel(Some("status.phase="), None).matches(&p),
            "missing field is \"\""
        );
        assert!(sel(None, Some("app=a,tier in (web, db)")).matches(&p));
        assert!(sel(None, Some("app,!missing")).matches(&p));
        assert!(!sel(None, Some("tier notin (web)")).matches(&p));
        assert!(!sel(None, Some("app!=a")).matches(&p));
        let err = Selector::parse(&rt, None, Some("spec.nodename=x"), None).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .contains("field label not supported: spec.nodename")
        );
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn store_create_update_delete_and_history() {
        let server = FakeApiServer::start().unwrap();
        let created = server.create_pod(&pod("ns1", "a", "n")).unwrap();
        let rv1: u64 = created.metadata.resource_version.unwrap().parse().unwrap();
        assert!(created.metadata.uid.is_some());
        assert!(created.metadata.creation_timestamp.is_some());
        let err = server.create_pod(&pod("ns1", "a", "n")).unwrap_err();
        assert_eq!(err.code(), Some(409));
        // No-op update: same resourceVersion.
        let same = server.update_pod(&pod("ns1", "a", "n")).unwrap();
        assert_eq!(
            same.metadata.resource_version.as_deref(),
            Some(rv1.to_string().as_str())
        );
        let changed = server.update_pod(&pod("ns1", "a", "other")).unwrap();
        let rv2: u64 = changed.metadata.resource_version.unwrap().parse().unwrap();
        assert!(rv2 > rv1);
        assert_eq!(changed.metadata.uid, created.metadata.uid);
        let gone = server.delete_pod("ns1", "a").unwrap();
        assert!(
            gone.metadata
                .resource_version
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > rv2
        );
        assert!(server.pod("ns1", "a").is_none());
        assert_eq!(server.delete_pod("ns1", "a").unwrap_err().code(), Some(404));
        let bad = server.create_pod(&pod("ns1", "Not_DNS", "n")).unwrap_err();
        assert_eq!(bad.code(), Some(422));
    }

    #[test]
    fn generate_name_and_uid_format() {
        let server = FakeApiServer::start().unwrap();
        let mut p = pod("ns1", "", "n");
        p["metadata"]["generateName"] = json!("web-");
        let created = server.create_pod(&p).unwrap();
        let name = created.metadata.name.unwrap();
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        let uid = created.metadata.uid.unwrap();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
    }

    #[test]
    fn event_validation_like_the_real_server() {
        let store_rt = builtin_resources();
        let core = store_rt
            .iter()
            .find(|r| r.kind == "Event" && r.group.is_empty())
            .unwrap();
        let new = store_rt
            .iter()
            .find(|r| r.kind == "Event" && !r.group.is_empty())
            .unwrap();
        let legacy = json!({"involvedObject": {"namespace": "other"}});
        assert_eq!(validate_event(core, &legacy, "ns1").len(), 1);
        assert!(
            validate_event(
                core,
                &json!({"involvedObject": {"namespace": "ns1"}}),
                "ns1"
            )
            .is_empty()
        );
        let errs = validate_event(new, &json!({"type": "Warning"}), "ns1");
        assert!(errs.iter().any(|e| e.starts_with("eventTime")));
        assert!(errs.iter().any(|e| e.starts_with("reportingController")));
    }
}
