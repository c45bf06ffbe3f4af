//! The pod check: the pod a token is bound to must still exist, be the same
//! pod (uid), and run on the caller's node.
//!
//! The facts come from [`PodCache`], a watch of every pod in the cluster
//! (kube's `watcher`: list, then watch from the list's `resourceVersion`,
//! re-list on 410 Gone) pruned to namespace, name, uid, `spec.nodeName` and
//! whether `deletionTimestamp` is set. Only those fields are parsed: the
//! rest of each pod's JSON is skipped, never stored.
//!
//! The cache answers a check only when it can be trusted, and only with a
//! "yes"; everything else is asked of the API server with one GET, as
//! before the cache existed:
//!
//! - before the first full list has arrived, after the watch task stopped
//!   (shutdown), or while the watch has been failing for longer than
//!   [`PodCacheSettings::max_watch_outage`]: GET;
//! - the pod is not in the cache, or the cached pod has another uid or
//!   another node: GET, and the GET decides. A cache a moment behind the
//!   API server (a pod just created, bound or recreated under the same
//!   name) never refuses a legitimate pod, and every denial (pod gone, uid
//!   mismatch, node mismatch) is the API server's answer;
//! - the cached pod has the token's uid and the caller's node: allowed
//!   without a request. A deleted pod stays allowed until its `DELETED`
//!   event arrives (normally milliseconds), the same window a GET has
//!   between its answer and the signature.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde::Deserialize;
use tokio_stream::StreamExt;

use crate::error::Error;
use crate::tokens::VerifiedToken;

/// What the pod check needs to know about one pod; all the cache keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`; empty while the pod is not scheduled.
    pub node_name: String,
    /// Whether `metadata.deletionTimestamp` is set (the pod is terminating).
    pub terminating: bool,
}

/// How the pod cache watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCacheSettings {
    /// How long the watch may keep failing (API server unreachable,
    /// refusing, or the watch re-listing after an error) before the cache
    /// stops answering and every check GETs its pod again until the watch
    /// delivers events again. Default 30 s.
    pub max_watch_outage: Duration,
    /// Server-side timeout of one watch request (`timeoutSeconds`, whole
    /// seconds, at least 1). The watch then resumes from its last
    /// `resourceVersion`; a connection that died silently is noticed after
    /// this plus 5 s and reported as an error if it can not be re-opened.
    /// Default 25 s.
    pub watch_timeout: Duration,
}

impl Default for PodCacheSettings {
    fn default() -> Self {
        Self {
            max_watch_outage: Duration::from_secs(30),
            watch_timeout: Duration::from_secs(25),
        }
    }
}

/// Namespace → name → facts: lookups by `&str` without allocating.
type PodMap = HashMap<String, HashMap<String, PodFacts>>;

/// The pods of the whole cluster as the pod check needs them, fed by a
/// watch (see the [module documentation](self) for when it is trusted).
///
/// Relists (the first list, and every one after a 410 Gone) are collected
/// aside and replace the contents atomically when complete: the previous
/// contents keep serving meanwhile, and pods deleted while the watch was
/// down disappear then.
#[derive(Debug)]
pub struct PodCache {
    pods: RwLock<PodMap>,
    settings: PodCacheSettings,
    /// Time base of `broken_since`.
    epoch: Instant,
    /// Nanoseconds after `epoch`, plus one, of the first watch error since
    /// the last event that proved the watch healthy; 0: no such error.
    broken_since: AtomicU64,
    /// Whether the outage bound was reported as exceeded (logged once).
    outage_reported: AtomicBool,
    /// Whether the first full list has arrived.
    synced: tokio::sync::watch::Sender<bool>,
    /// Whether the watch task has ended.
    stopped: AtomicBool,
    errors: AtomicU64,
}

/// The pod cache's watch task; dropping it stops the watch, and the cache
/// answers nothing after that.
#[derive(Debug)]
pub struct PodWatch {
    cache: Arc<PodCache>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.cache.stopped.store(true, Ordering::Release);
        self.task.abort();
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

impl PodCache {
    /// An empty, not yet synced cache that no task feeds.
    fn new(settings: PodCacheSettings) -> Self {
        Self {
            pods: RwLock::new(HashMap::new()),
            settings,
            epoch: Instant::now(),
            broken_since: AtomicU64::new(0),
            outage_reported: AtomicBool::new(false),
            synced: tokio::sync::watch::Sender::new(false),
            stopped: AtomicBool::new(false),
            errors: AtomicU64::new(0),
        }
    }

    /// Starts watching every pod of the cluster with `client` (it needs
    /// `list` and `watch` on `pods` cluster-wide). The watch runs until
    /// `shutdown` turns `true` (or its sender is dropped) or the returned
    /// [`PodWatch`] is dropped; after that the cache answers nothing and
    /// every check GETs its pod. Must be called inside a Tokio runtime.
    pub fn start(
        client: kube::Client,
        settings: PodCacheSettings,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> (Arc<Self>, PodWatch) {
        let cache = Arc::new(Self::new(settings));
        let task = tokio::spawn(run(Arc::clone(&cache), client, shutdown));
        let watch = PodWatch {
            cache: Arc::clone(&cache),
            task,
        };
        (cache, watch)
    }

    /// Whether the first full list has arrived. Before that the cache
    /// answers nothing.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first full list has arrived; at once if it has.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        // The sender lives in `self`, so `wait_for` can not fail here.
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Whether checks are answered from the cache now: synced, the watch
    /// task running, and no watch failure older than
    /// [`PodCacheSettings::max_watch_outage`] without a healthy event
    /// since.
    pub fn is_fresh(&self) -> bool {
        if self.stopped.load(Ordering::Acquire) || !self.is_synced() {
            return false;
        }
        let since = self.broken_since.load(Ordering::Acquire);
        if since == 0 {
            return true;
        }
        let broken_for = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_nanos(since - 1));
        if broken_for < self.settings.max_watch_outage {
            return true;
        }
        if !self.outage_reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                broken_for = ?broken_for,
                bound = ?self.settings.max_watch_outage,
                "pod watch failing for longer than the bound; checking every pod with a GET until it recovers"
            );
        }
        false
    }

    /// The cached facts of pod `namespace/name`, fresh or not.
    pub fn get(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        read(&self.pods)
            .get(namespace)
            .and_then(|pods| pods.get(name))
            .cloned()
    }

    /// How many pods the cache holds.
    pub fn len(&self) -> usize {
        read(&self.pods).values().map(HashMap::len).sum()
    }

    /// Whether the cache holds no pods.
    pub fn is_empty(&self) -> bool {
        read(&self.pods).is_empty()
    }

    /// Watch errors seen so far (each followed by a backoff and a retry).
    pub fn watch_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// `f` applied to the cached facts of `namespace/name` (`None`: not
    /// cached), or `None` if the cache is not fresh.
    fn with_pod<R>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce(Option<&PodFacts>) -> R,
    ) -> Option<R> {
        if !self.is_fresh() {
            return None;
        }
        let pods = read(&self.pods);
        Some(f(pods.get(namespace).and_then(|pods| pods.get(name))))
    }

    /// The watch works: forget an earlier failure.
    fn healthy(&self) {
        if self.broken_since.swap(0, Ordering::AcqRel) != 0
            && self.outage_reported.swap(false, Ordering::Relaxed)
        {
            tracing::info!("pod watch recovered; checks use the pod cache again");
        }
    }

    /// The watch failed: remember since when, if not already failing.
    fn broken(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        let _ = self
            .broken_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Applies one item of the watch stream. `relist` collects a list in
    /// progress (between `Init` and `InitDone`).
    fn apply(&self, event: watcher::Result<watcher::Event<SlimPod>>, relist: &mut Option<PodMap>) {
        match event {
            Ok(watcher::Event::Init) => *relist = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                insert(relist.get_or_insert_with(HashMap::new), pod);
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = relist.take().unwrap_or_default();
                let count: usize = fresh.values().map(HashMap::len).sum();
                // The old contents are freed after the lock is released.
                let old = std::mem::replace(&mut *write(&self.pods), fresh);
                drop(old);
                self.healthy();
                if self.synced.send_replace(true) {
                    tracing::debug!(pods = count, "pod cache re-listed");
                } else {
                    tracing::info!(pods = count, "pod cache synced");
                }
            }
            Ok(watcher::Event::Apply(pod)) => {
                insert(&mut write(&self.pods), pod);
                self.healthy();
            }
            Ok(watcher::Event::Delete(pod)) => {
                remove(&mut write(&self.pods), &pod);
                self.healthy();
            }
            Err(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.broken();
                match &error {
                    // Routine: the history moved on; the watcher re-lists.
                    watcher::Error::WatchError(status) if status.code == 410 => {
                        tracing::debug!(%error, "pod watch expired; re-listing");
                    }
                    _ => tracing::warn!(%error, "pod watch error; retrying with backoff"),
                }
            }
        }
    }
}

fn insert(map: &mut PodMap, pod: SlimPod) {
    let SlimPod {
        metadata,
        node_name,
        terminating,
    } = pod;
    let (Some(namespace), Some(name)) = (metadata.namespace, metadata.name) else {
        return;
    };
    let facts = PodFacts {
        uid: metadata.uid.unwrap_or_default(),
        node_name: node_name.unwrap_or_default(),
        terminating,
    };
    map.entry(namespace).or_default().insert(name, facts);
}

/// Removes a deleted pod, unless the cache already holds a newer pod of
/// the same name (another uid).
fn remove(map: &mut PodMap, pod: &SlimPod) {
    let meta = &pod.metadata;
    let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
        return;
    };
    let Some(pods) = map.get_mut(namespace) else {
        return;
    };
    let uid = meta.uid.as_deref().unwrap_or("");
    if pods
        .get(name)
        .is_some_and(|cached| uid.is_empty() || cached.uid == uid)
    {
        pods.remove(name);
        if pods.is_empty() {
            map.remove(namespace);
        }
    }
}

async fn run(
    cache: Arc<PodCache>,
    client: kube::Client,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let api: Api<SlimPod> = Api::all(client);
    let timeout = u32::try_from(cache.settings.watch_timeout.as_secs())
        .unwrap_or(u32::MAX)
        .max(1);
    let stream = watcher(api, watcher::Config::default().timeout(timeout)).default_backoff();
    tokio::pin!(stream);
    let mut relist = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            event = stream.next() => event,
        };
        let Some(event) = event else {
            // The watcher stream never ends by itself; if it did, say so.
            tracing::error!("pod watch ended; checking every pod with a GET");
            break;
        };
        cache.apply(event, &mut relist);
    }
    cache.stopped.store(true, Ordering::Release);
    tracing::debug!("pod watch stopped");
}

/// A pod as the cache and the GET read it: only the fields the check
/// needs are parsed, the rest of the JSON is skipped.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "WirePod")]
struct SlimPod {
    /// Namespace, name, uid and `resourceVersion` (the watcher resumes
    /// from it); nothing else.
    metadata: ObjectMeta,
    node_name: Option<String>,
    terminating: bool,
}

#[derive(Deserialize)]
struct WirePod {
    #[serde(default)]
    metadata: Option<WireMeta>,
    #[serde(default)]
    spec: Option<WireSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    deletion_timestamp: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSpec {
    node_name: Option<String>,
}

impl From<WirePod> for SlimPod {
    fn from(wire: WirePod) -> Self {
        let (metadata, terminating) = match wire.metadata {
            Some(m) => (
                ObjectMeta {
                    name: m.name,
                    namespace: m.namespace,
                    uid: m.uid,
                    resource_version: m.resource_version,
                    ..ObjectMeta::default()
                },
                m.deletion_timestamp.is_some(),
            ),
            None => (ObjectMeta::default(), false),
        };
        Self {
            metadata,
            node_name: wire.spec.and_then(|s| s.node_name),
            terminating,
        }
    }
}

impl k8s_openapi::Resource for SlimPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for SlimPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Checks pods against tokens: from a [`PodCache`] when one is attached
/// and fresh, else with one GET per check (with a timeout).
#[derive(Clone)]
pub struct PodChecker {
    client: kube::Client,
    timeout: Duration,
    cache: Option<Arc<PodCache>>,
}

impl std::fmt::Debug for PodChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodChecker")
            .field("timeout", &self.timeout)
            .field("cache", &self.cache.as_ref().map(|c| c.len()))
            .finish_non_exhaustive()
    }
}

impl PodChecker {
    /// A checker using `client`, giving up on one GET after `timeout`;
    /// without a cache every check is a GET.
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            cache: None,
        }
    }

    /// The same checker answering from `cache` when it is fresh.
    pub fn with_cache(mut self, cache: Arc<PodCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The attached cache, if any.
    pub fn cache(&self) -> Option<&Arc<PodCache>> {
        self.cache.as_ref()
    }

    /// Checks that the token's pod exists with the token's uid and is
    /// scheduled to `node`. Returns the pod's node name.
    pub async fn check(&self, token: &VerifiedToken, node: &str) -> Result<String, Error> {
        if let Some(cache) = &self.cache {
            let cached = cache.with_pod(&token.namespace, &token.pod_name, |facts| {
                facts.map(|facts| verify(token, node, facts))
            });
            match cached {
                Some(Some(Ok(pod_node))) => return Ok(pod_node),
                Some(Some(Err(denial))) => tracing::debug!(
                    namespace = %token.namespace,
                    pod = %token.pod_name,
                    reason = denial.reason(),
                    "pod cache denies; confirming with a GET"
                ),
                Some(None) => tracing::debug!(
                    namespace = %token.namespace,
                    pod = %token.pod_name,
                    "pod not in the pod cache; confirming with a GET"
                ),
                None => {}
            }
        }
        let facts = self.get(token).await?;
        verify(token, node, &facts)
    }

    /// GETs the token's pod: its facts, or [`Error::PodGone`].
    async fn get(&self, token: &VerifiedToken) -> Result<PodFacts, Error> {
        let what = format!("GET pod {}/{}", token.namespace, token.pod_name);
        let api: Api<SlimPod> = Api::namespaced(self.client.clone(), &token.namespace);
        let pod = tokio::time::timeout(self.timeout, api.get_opt(&token.pod_name))
            .await
            .map_err(|_| Error::ApiUnavailable {
                what: what.clone(),
                reason: format!("no answer within {:?}", self.timeout),
            })?
            .map_err(|e| Error::ApiUnavailable {
                what,
                reason: e.to_string(),
            })?;
        let Some(pod) = pod else {
            return Err(Error::PodGone {
                namespace: token.namespace.clone(),
                name: token.pod_name.clone(),
            });
        };
        Ok(PodFacts {
            uid: pod.metadata.uid.unwrap_or_default(),
            node_name: pod.node_name.unwrap_or_default(),
            terminating: pod.terminating,
        })
    }
}

/// The check itself, on facts from the cache or a GET.
fn verify(token: &VerifiedToken, node: &str, pod: &PodFacts) -> Result<String, Error> {
    if pod.uid != token.pod_uid {
        return Err(Error::PodUidMismatch {
            namespace: token.namespace.clone(),
            name: token.pod_name.clone(),
            token_uid: token.pod_uid.clone(),
            pod_uid: pod.uid.clone(),
        });
    }
    if pod.terminating {
        tracing::debug!(
            namespace = %token.namespace,
            pod = %token.pod_name,
            "pod is terminating; issuing anyway (volumes are still mounted)"
        );
    }
    if pod.node_name != node {
        return Err(Error::NodeMismatch {
            namespace: token.namespace.clone(),
            name: token.pod_name.clone(),
            pod_node: pod.node_name.clone(),
            caller_node: node.to_owned(),
        });
    }
    Ok(pod.node_name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(namespace: &str, name: &str, uid: &str, node: &str) -> SlimPod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                         "resourceVersion": "7", "labels": {"app": "web"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn facts(uid: &str, node: &str) -> PodFacts {
        PodFacts {
            uid: uid.into(),
            node_name: node.into(),
            terminating: false,
        }
    }

    fn token(uid: &str) -> VerifiedToken {
        VerifiedToken {
            namespace: "ns".into(),
            service_account: "web".into(),
            pod_name: "web-0".into(),
            pod_uid: uid.into(),
            node_name: Some("node-a".into()),
            audiences: vec!["credlet-ca".into()],
            expires_at: None,
        }
    }

    fn settings(max_watch_outage: Duration) -> PodCacheSettings {
        PodCacheSettings {
            max_watch_outage,
            ..PodCacheSettings::default()
        }
    }

    /// A cache synced with `pods` by an Init/InitApply/InitDone sequence.
    fn synced(max_watch_outage: Duration, pods: Vec<SlimPod>) -> PodCache {
        let cache = PodCache::new(settings(max_watch_outage));
        let mut relist = None;
        cache.apply(Ok(watcher::Event::Init), &mut relist);
        for p in pods {
            cache.apply(Ok(watcher::Event::InitApply(p)), &mut relist);
        }
        cache.apply(Ok(watcher::Event::InitDone), &mut relist);
        cache
    }

    #[test]
    fn slim_pod_keeps_only_what_the_check_needs() {
        let p = pod("ns", "web-0", "u1", "node-a");
        assert_eq!(p.metadata.name.as_deref(), Some("web-0"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(p.metadata.uid.as_deref(), Some("u1"));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("7"));
        assert!(p.metadata.labels.is_none() && p.metadata.managed_fields.is_none());
        assert_eq!(p.node_name.as_deref(), Some("node-a"));
        assert!(!p.terminating);

        let terminating: SlimPod = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": "u",
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": null
        }))
        .unwrap();
        assert!(terminating.terminating);
        assert_eq!(terminating.node_name, None);
        let explicit_null: SlimPod =
            serde_json::from_value(json!({"metadata": {"deletionTimestamp": null}})).unwrap();
        assert!(!explicit_null.terminating);
    }

    #[test]
    fn verify_uid_node_and_terminating() {
        let token = token("u1");
        assert_eq!(
            verify(&token, "node-a", &facts("u1", "node-a")).unwrap(),
            "node-a"
        );
        let terminating = PodFacts {
            terminating: true,
            ..facts("u1", "node-a")
        };
        assert!(verify(&token, "node-a", &terminating).is_ok());
        assert!(matches!(
            verify(&token, "node-a", &facts("u2", "node-a")),
            Err(Error::PodUidMismatch { .. })
        ));
        assert!(matches!(
            verify(&token, "node-b", &facts("u1", "node-a")),
            Err(Error::NodeMismatch { .. })
        ));
        assert!(matches!(
            verify(&token, "node-a", &facts("u1", "")),
            Err(Error::NodeMismatch { .. })
        ));
    }

    #[test]
    fn events_update_the_cache() {
        let cache = PodCache::new(PodCacheSettings::default());
        let mut relist = None;
        assert!(!cache.is_synced() && !cache.is_fresh());
        cache.apply(Ok(watcher::Event::Init), &mut relist);
        cache.apply(
            Ok(watcher::Event::InitApply(pod(
                "ns", "web-0", "u1", "node-a",
            ))),
            &mut relist,
        );
        // Not synced until the list is complete; nothing visible yet.
        assert!(!cache.is_synced());
        assert_eq!(cache.get("ns", "web-0"), None);
        cache.apply(Ok(watcher::Event::InitDone), &mut relist);
        assert!(cache.is_synced() && cache.is_fresh());
        assert_eq!(cache.get("ns", "web-0"), Some(facts("u1", "node-a")));

        // Recreated under the same name: the new uid replaces the old one;
        // a late delete of the old uid does not remove the new pod.
        cache.apply(
            Ok(watcher::Event::Apply(pod("ns", "web-0", "u2", "node-b"))),
            &mut relist,
        );
        cache.apply(
            Ok(watcher::Event::Delete(pod("ns", "web-0", "u1", "node-a"))),
            &mut relist,
        );
        assert_eq!(cache.get("ns", "web-0"), Some(facts("u2", "node-b")));
        cache.apply(
            Ok(watcher::Event::Delete(pod("ns", "web-0", "u2", "node-b"))),
            &mut relist,
        );
        assert_eq!(cache.get("ns", "web-0"), None);
        assert!(cache.is_empty());

        // A relist replaces the contents when done, not before.
        cache.apply(
            Ok(watcher::Event::Apply(pod("ns", "old", "u3", "node-a"))),
            &mut relist,
        );
        cache.apply(Ok(watcher::Event::Init), &mut relist);
        cache.apply(
            Ok(watcher::Event::InitApply(pod(
                "other", "new", "u4", "node-a",
            ))),
            &mut relist,
        );
        assert!(cache.get("ns", "old").is_some());
        assert!(cache.get("other", "new").is_none());
        cache.apply(Ok(watcher::Event::InitDone), &mut relist);
        assert!(cache.get("ns", "old").is_none());
        assert_eq!(cache.get("other", "new"), Some(facts("u4", "node-a")));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_watch_outage_longer_than_the_bound_stops_answers() {
        // Bound 0: stale at the first error.
        let cache = synced(Duration::ZERO, vec![pod("ns", "web-0", "u1", "node-a")]);
        let mut relist = None;
        assert!(cache.with_pod("ns", "web-0", |f| f.cloned()).is_some());
        cache.apply(Err(watcher::Error::NoResourceVersion), &mut relist);
        assert_eq!(cache.watch_errors(), 1);
        assert!(cache.is_synced() && !cache.is_fresh());
        assert!(cache.with_pod("ns", "web-0", |f| f.cloned()).is_none());
        // A re-list in progress does not count as healthy...
        cache.apply(Ok(watcher::Event::Init), &mut relist);
        assert!(!cache.is_fresh());
        // ...a completed one does, and so does any live event.
        cache.apply(Ok(watcher::Event::InitDone), &mut relist);
        assert!(cache.is_fresh());
        cache.apply(Err(watcher::Error::NoResourceVersion), &mut relist);
        assert!(!cache.is_fresh());
        cache.apply(
            Ok(watcher::Event::Apply(pod("ns", "web-1", "u2", "node-a"))),
            &mut relist,
        );
        assert!(cache.is_fresh());

        // Within the bound the cache keeps answering.
        let cache = synced(
            Duration::from_secs(3600),
            vec![pod("ns", "web-0", "u1", "node-a")],
        );
        cache.apply(Err(watcher::Error::NoResourceVersion), &mut relist);
        assert!(cache.is_fresh());
        assert_eq!(
            cache.with_pod("ns", "web-0", |f| f.cloned()),
            Some(Some(facts("u1", "node-a")))
        );
        // A stopped watch answers nothing.
        cache.stopped.store(true, Ordering::Release);
        assert!(!cache.is_fresh());
    }
}
