//! Kubernetes Events for image guard denials.
//!
//! [`EventSink::image_denied`] is called on the CRI path, so it never
//! blocks: [`KubeEvents`] queues the denial in a bounded queue (dropping and
//! counting when full) and a background task posts a core/v1 `Event` on the
//! pod. Identical denials (same pod, image and reason) within the
//! aggregation window update the existing Event's `count` and
//! `lastTimestamp` with a merge `PATCH`, at most once per update interval,
//! instead of creating new Events.
//!
//! The API server may be down (the guard serves the CRI socket without
//! it): an Event that could not be created is kept and created again every
//! [`CREATE_RETRY`], with the count it has by then, once the API server
//! answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// `Event.reason` of a denial.
pub const DENIED_REASON: &str = "CachedImageAccessDenied";
/// `reportingComponent` and `source.component` of credlet's Events.
pub const REPORTING_COMPONENT: &str = "credlet";
/// Longest `Event.message`, in bytes (the API's limit for event notes).
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest object name the API accepts.
const MAX_NAME_BYTES: usize = 253;
/// How often Events that could not be created are tried again.
pub const CREATE_RETRY: Duration = Duration::from_secs(5);

/// The pod a decision concerns (from CRI's `PodSandboxMetadata`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod uid.
    pub uid: String,
}

/// Where the guard reports denials. Implementations must not block: the
/// caller is serving a CRI call.
pub trait EventSink: Send + Sync + 'static {
    /// Reports that `pod` was refused cached `image` for `reason` (a human
    /// readable sentence; never credentials).
    fn image_denied(&self, pod: &PodRef, image: &str, reason: &str);
}

/// An [`EventSink`] that reports nothing (tests, no cluster).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn image_denied(&self, _pod: &PodRef, _image: &str, _reason: &str) {}
}

/// Tuning of [`KubeEvents`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsConfig {
    /// Denials queued for the background task; more are dropped (counted).
    pub queue_capacity: usize,
    /// Identical denials within this time of the previous one update the
    /// existing Event instead of creating a new one.
    pub aggregation_window: Duration,
    /// Minimum time between two writes of the same Event (repeats in
    /// between are counted and written on the next tick).
    pub update_interval: Duration,
    /// Most distinct denials tracked for aggregation (oldest forgotten first).
    pub max_tracked: usize,
    /// Timeout of one API request.
    pub request_timeout: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            aggregation_window: Duration::from_secs(10 * 60),
            update_interval: Duration::from_secs(30),
            max_tracked: 4096,
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    dropped: AtomicU64,
    created: AtomicU64,
    updated: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug)]
struct Denial {
    pod: PodRef,
    image: String,
    reason: String,
}

/// An [`EventSink`] posting core/v1 Events through the API server (type
/// `Warning`, reason [`DENIED_REASON`], `involvedObject` = the pod with its
/// uid, `reportingComponent`/`source.component` [`REPORTING_COMPONENT`],
/// `reportingInstance`/`source.host` the node name, message at most
/// [`MAX_MESSAGE_BYTES`], `firstTimestamp`/`lastTimestamp`/`count`).
#[derive(Debug)]
pub struct KubeEvents {
    tx: mpsc::Sender<Denial>,
    node_name: String,
    stats: Arc<Stats>,
}

impl KubeEvents {
    /// Starts the background task with [`EventsConfig::default`]. Must be
    /// called inside a Tokio runtime. The task ends (after writing pending
    /// counts) when the returned sink is dropped.
    pub fn start(client: Client, node_name: &str) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        Self::start_with(client, node_name, EventsConfig::default())
    }

    /// [`KubeEvents::start`] with explicit tuning.
    pub fn start_with(
        client: Client,
        node_name: &str,
        config: EventsConfig,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(Stats::default());
        let worker = Worker {
            client,
            node_name: node_name.to_string(),
            config,
            stats: stats.clone(),
            series: HashMap::new(),
            last_name_nanos: 0,
        };
        let task = tokio::spawn(worker.run(rx));
        let sink = Arc::new(Self {
            tx,
            node_name: node_name.to_string(),
            stats,
        });
        (sink, task)
    }

    /// The node named as the reporting instance.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Denials dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Events created.
    pub fn created(&self) -> u64 {
        self.stats.created.load(Ordering::Relaxed)
    }

    /// Count updates written to existing Events.
    pub fn updated(&self) -> u64 {
        self.stats.updated.load(Ordering::Relaxed)
    }

    /// API requests that failed (the denial is then only in the logs).
    pub fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::Relaxed)
    }
}

impl EventSink for KubeEvents {
    fn image_denied(&self, pod: &PodRef, image: &str, reason: &str) {
        let denial = Denial {
            pod: pod.clone(),
            image: image.to_string(),
            reason: reason.to_string(),
        };
        if let Err(e) = self.tx.try_send(denial) {
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Log the 1st, 2nd, 4th, 8th … drop: visible, never a flood.
            if n.is_power_of_two() {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "queue full",
                    mpsc::error::TrySendError::Closed(_) => "event task stopped",
                };
                tracing::warn!(dropped = n, why, "image guard event dropped");
            }
        }
    }
}

/// The message of a denial Event, cut to [`MAX_MESSAGE_BYTES`] on a
/// character boundary.
pub fn denial_message(pod: &PodRef, image: &str, reason: &str) -> String {
    let full = format!(
        "Pod {}/{} may not use cached image {image}: {reason}",
        pod.namespace, pod.name
    );
    truncate(full, MAX_MESSAGE_BYTES)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let ellipsis = "…";
        let mut cut = max - ellipsis.len();
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(ellipsis);
    }
    s
}

/// A fresh Event name for `pod`: `<pod>.<unix nanos in hex>` like the
/// kubelet's, the pod part shortened to keep the name within limits.
fn event_name(pod_name: &str, nanos: u128) -> String {
    let suffix = format!(".{nanos:x}");
    let mut base = pod_name.to_string();
    let max = MAX_NAME_BYTES - suffix.len();
    if base.len() > max {
        base.truncate(max);
        // Names end alphanumeric (pod names are ASCII).
        while base.ends_with(['-', '.']) {
            base.pop();
        }
    }
    format!("{base}{suffix}")
}

/// Builds the core/v1 Event of a denial.
pub fn denial_event(
    pod: &PodRef,
    node_name: &str,
    name: &str,
    message: &str,
    count: i32,
    first: Timestamp,
    last: Timestamp,
) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        },
        reason: Some(DENIED_REASON.into()),
        message: Some(message.to_string()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(REPORTING_COMPONENT.into()),
            host: Some(node_name.to_string()),
        }),
        reporting_component: Some(REPORTING_COMPONENT.into()),
        reporting_instance: Some(node_name.to_string()),
        first_timestamp: Some(Time(first)),
        last_timestamp: Some(Time(last)),
        count: Some(count),
        ..Default::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    uid: String,
    image: String,
    reason: String,
}

/// One Event being aggregated.
#[derive(Debug)]
struct Series {
    pod: PodRef,
    message: String,
    name: String,
    count: i32,
    first: Timestamp,
    last: Timestamp,
    last_seen: Instant,
    last_written: Instant,
    /// Count not yet written.
    dirty: bool,
    /// Whether its Event exists (its creation may have failed: the API
    /// server down; it is created again on the next tick).
    created: bool,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{op} Event {namespace}/{name}: {source}")]
    Api {
        op: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{op} Event {namespace}/{name}: no answer within {timeout:?}")]
    Timeout {
        op: &'static str,
        namespace: String,
        name: String,
        timeout: Duration,
    },
}

impl WriteError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Created,
    Updated,
}

struct Worker {
    client: Client,
    node_name: String,
    config: EventsConfig,
    stats: Arc<Stats>,
    series: HashMap<Key, Series>,
    last_name_nanos: u128,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Denial>) {
        // Often enough to retry creations; counts are still written at most
        // once per update interval.
        let mut tick = tokio::time::interval(
            self.config
                .update_interval
                .min(CREATE_RETRY)
                .max(Duration::from_millis(10)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                denial = rx.recv() => match denial {
                    Some(d) => self.handle(d).await,
                    None => {
                        self.flush(true).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    self.flush(false).await;
                    self.forget_expired();
                }
            }
        }
    }

    async fn handle(&mut self, d: Denial) {
        let now = Instant::now();
        let key = Key {
            namespace: d.pod.namespace.clone(),
            uid: d.pod.uid.clone(),
            image: d.image.clone(),
            reason: d.reason.clone(),
        };
        let window = self.config.aggregation_window;
        let interval = self.config.update_interval;
        if let Some(s) = self.series.get_mut(&key)
            && now.duration_since(s.last_seen) <= window
        {
            s.count = s.count.saturating_add(1);
            s.last = Timestamp::now();
            s.last_seen = now;
            s.dirty = true;
            // An Event still to be created goes with the next retry.
            if s.created && now.duration_since(s.last_written) >= interval {
                self.write_update(&key).await;
            }
            return;
        }
        let stamp = Timestamp::now();
        let series = Series {
            message: denial_message(&d.pod, &d.image, &d.reason),
            name: self.fresh_name(&d.pod.name, stamp),
            pod: d.pod,
            count: 1,
            first: stamp,
            last: stamp,
            last_seen: now,
            last_written: now,
            dirty: false,
            created: false,
        };
        if self.series.len() >= self.config.max_tracked.max(1) {
            self.forget_oldest();
        }
        let mut series = series;
        let result = self.create(&series).await;
        series.created = result.is_ok();
        // Kept until it is created (see `forget_expired`).
        series.dirty = !series.created;
        self.record(result, Op::Created);
        self.series.insert(key, series);
    }

    /// Creates the Events whose creation failed, oldest first, each with
    /// its count by now. The first failure ends the round: the API server
    /// is most likely still unreachable, and is tried again on the next
    /// tick (failures are counted, not logged again).
    async fn create_unsent(&mut self) {
        let mut unsent: Vec<(Timestamp, Key)> = self
            .series
            .iter()
            .filter(|(_, s)| !s.created)
            .map(|(k, s)| (s.first, k.clone()))
            .collect();
        unsent.sort_by_key(|(first, _)| *first);
        for (_, key) in unsent {
            let Some(s) = self.series.get(&key) else {
                continue;
            };
            match self.create(s).await {
                Ok(()) => {
                    self.stats.created.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = self.series.get_mut(&key) {
                        tracing::info!(pod = %format_args!("{}/{}", s.pod.namespace, s.pod.name), count = s.count, "image guard event created after the API server came back");
                        s.created = true;
                        s.dirty = false;
                        s.last_written = Instant::now();
                    }
                }
                Err(error) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%error, "image guard event still not written");
                    return;
                }
            }
        }
    }

    fn fresh_name(&mut self, pod_name: &str, stamp: Timestamp) -> String {
        let nanos = u128::try_from(stamp.as_nanosecond()).unwrap_or_default();
        // Strictly increasing, so two denials in one nanosecond differ.
        self.last_name_nanos = nanos.max(self.last_name_nanos + 1);
        event_name(pod_name, self.last_name_nanos)
    }

    fn record(&self, result: Result<(), WriteError>, op: Op) {
        match result {
            Ok(()) => {
                let counter = match op {
                    Op::Created => &self.stats.created,
                    Op::Updated => &self.stats.updated,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "image guard event not written");
            }
        }
    }

    async fn create(&self, s: &Series) -> Result<(), WriteError> {
        let event = denial_event(
            &s.pod,
            &self.node_name,
            &s.name,
            &s.message,
            s.count,
            s.first,
            s.last,
        );
        let api: Api<Event> = Api::namespaced(self.client.clone(), &s.pod.namespace);
        let op = "create";
        let (namespace, name) = (s.pod.namespace.clone(), s.name.clone());
        match tokio::time::timeout(
            self.config.request_timeout,
            api.create(&PostParams::default(), &event),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(WriteError::Api {
                op,
                namespace,
                name,
                source,
            }),
            Err(_) => Err(WriteError::Timeout {
                op,
                namespace,
                name,
                timeout: self.config.request_timeout,
            }),
        }
    }

    async fn patch(&self, s: &Series) -> Result<(), WriteError> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &s.pod.namespace);
        let patch = serde_json::json!({
            "count": s.count,
            "lastTimestamp": Time(s.last),
        });
        let op = "update";
        let (namespace, name) = (s.pod.namespace.clone(), s.name.clone());
        match tokio::time::timeout(
            self.config.request_timeout,
            api.patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(WriteError::Api {
                op,
                namespace,
                name,
                source,
            }),
            Err(_) => Err(WriteError::Timeout {
                op,
                namespace,
                name,
                timeout: self.config.request_timeout,
            }),
        }
    }

    /// Writes the count of one series; re-creates its Event if it is gone
    /// (the API server expires Events after an hour by default).
    async fn write_update(&mut self, key: &Key) {
        let Some(s) = self.series.get(key) else {
            return;
        };
        let pod_name = s.pod.name.clone();
        match self.patch(s).await {
            Err(e) if e.is_not_found() => {
                let name = self.fresh_name(&pod_name, Timestamp::now());
                if let Some(s) = self.series.get_mut(key) {
                    s.name = name;
                }
                if let Some(s) = self.series.get(key) {
                    let created = self.create(s).await;
                    self.record(created, Op::Created);
                }
            }
            other => self.record(other, Op::Updated),
        }
        if let Some(s) = self.series.get_mut(key) {
            s.last_written = Instant::now();
            // A failed write is not retried: the next repeat writes the
            // then-current count anyway.
            s.dirty = false;
        }
    }

    /// Writes pending counts whose Events were last written at least one
    /// update interval ago (all of them when `all`).
    async fn flush(&mut self, all: bool) {
        self.create_unsent().await;
        let now = Instant::now();
        let interval = self.config.update_interval;
        let due: Vec<Key> = self
            .series
            .iter()
            .filter(|(_, s)| {
                s.created && s.dirty && (all || now.duration_since(s.last_written) >= interval)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.write_update(&key).await;
        }
    }

    fn forget_expired(&mut self) {
        let now = Instant::now();
        let window = self.config.aggregation_window;
        self.series
            .retain(|_, s| s.dirty || now.duration_since(s.last_seen) <= window);
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self
            .series
            .iter()
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(k, _)| k.clone())
        {
            self.series.remove(&oldest);
        }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("node_name", &self.node_name)
            .field("tracked", &self.series.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRef {
        PodRef {
            namespace: "ns1".into(),
            name: "web".into(),
            uid: "u1".into(),
        }
    }

    #[test]
    fn message_is_bounded_on_a_char_boundary() {
        let m = denial_message(
            &pod(),
            "reg/app:v1",
            "credentials of pod ns1/web are not authorized",
        );
        assert_eq!(
            m,
            "Pod ns1/web may not use cached image reg/app:v1: credentials of pod ns1/web are not authorized"
        );
        let long = "é".repeat(2000);
        let m = denial_message(&pod(), "reg/app:v1", &long);
        assert!(m.len() <= MAX_MESSAGE_BYTES, "{}", m.len());
        assert!(m.ends_with('…'));
    }

    #[test]
    fn event_names_are_valid_and_bounded() {
        assert_eq!(event_name("web", 0xabc), "web.abc");
        let long = "a".repeat(250);
        let n = event_name(&long, u128::from(u64::MAX));
        assert!(n.len() <= MAX_NAME_BYTES);
        assert!(n.ends_with(".ffffffffffffffff"));
        let dashy = format!("{}-{}", "a".repeat(235), "b".repeat(20));
        let n = event_name(&dashy, 1);
        assert!(!n.contains("-."), "{n}");
    }

    #[test]
    fn denial_event_fields() {
        let t = Timestamp::from_second(1_700_000_000).unwrap();
        let e = denial_event(&pod(), "node-a", "web.1", "msg", 3, t, t);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "Warning");
        assert_eq!(v["reason"], DENIED_REASON);
        assert_eq!(v["involvedObject"]["kind"], "Pod");
        assert_eq!(v["involvedObject"]["uid"], "u1");
        assert_eq!(v["involvedObject"]["namespace"], "ns1");
        assert_eq!(v["source"]["host"], "node-a");
        assert_eq!(v["reportingComponent"], "credlet");
        assert_eq!(v["reportingInstance"], "node-a");
        assert_eq!(v["count"], 3);
        assert_eq!(v["firstTimestamp"], "2023-11-14T22:13:20Z");
        assert!(v.get("eventTime").is_none());
    }

    #[test]
    fn no_events_is_a_no_op() {
        NoEvents.image_denied(&pod(), "x", "y");
    }
}
