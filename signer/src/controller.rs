//! The controller that answers PodCertificateRequests for credlet's signer
//! name(s).
//!
//! While this replica leads (see [`crate::leader`]) it watches the requests
//! of each signer name (field selector `spec.signerName`) and hands every
//! request without a terminal condition to a fixed number of workers
//! through a queue keyed by request, so one request is handled by one
//! worker at a time. A request that has a terminal condition (`Issued`,
//! `Denied` or `Failed` with status `True`) is never touched again.
//!
//! For each request a worker:
//!
//! 1. validates it ([`crate::request::validate`]: key type, proof of
//!    possession, annotations, lifetime bounds);
//! 2. GETs the pod, its service account and its node (concurrently, each
//!    with a timeout) and checks that they exist with the request's UIDs,
//!    that the pod runs on the request's node and under the request's
//!    service account. There is no cache, so there is nothing stale to
//!    accept and every "missing" is the API server's current answer;
//! 3. applies the CA's policy: SPIFFE ID from namespace and service
//!    account, DNS SANs from the `credlet.io/dns-names` annotation only
//!    where the CA's DNS templates allow them, lifetime = min(CA maximum,
//!    `maxExpirationSeconds`), never under one hour;
//! 4. signs with the CA's current authority and writes the status through
//!    the `status` subresource, replacing with the resourceVersion it read:
//!    `certificateChain` (leaf first), `notBefore`/`notAfter` of the leaf,
//!    `beginRefreshAt` at 50–70 % of the lifetime (the CA's renewal spread,
//!    kept inside [notBefore + 10 min, notAfter − 10 min]) and exactly one
//!    condition. A 409 means someone else wrote: the worker reads again and
//!    leaves the request alone if it now has a terminal condition.
//!
//! Denials (`Denied`, with the reason of [`crate::request::DenialReason`] or
//! of [`IdentityDenial`]) also post a `Warning` Event regarding the request,
//! rate-limited. `Failed` is kept for the signer's own faults (a CA that can
//! not sign). Transient API errors are retried with exponential backoff;
//! leadership is checked before every write, and losing it stops every
//! worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credlet_ca::{IssuanceRequest, IssueError, IssuedCertificate, PodIdentity, PolicyError};
use credlet_ca_service::{KeyStore, ServicePolicy};
use k8s_openapi::api::certificates::v1beta1::PodCertificateRequestStatus;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Resource};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use crate::error::{SignerError, call};
use crate::leader::Leadership;
use crate::metrics::{Outcome, SignerMetrics};
use crate::queue::WorkQueue;
use crate::request::{
    AcceptedKeyTypes, ApiVersion, Denial, PodCertificateRequest, ValidatedRequest, validate,
};

/// Condition types that end a request.
pub const TERMINAL_CONDITIONS: [&str; 3] = ["Issued", "Denied", "Failed"];
/// `reportingController` of the Events the signer posts.
pub const REPORTING_CONTROLLER: &str = "credlet.io/signer";
/// Shortest certificate the API server accepts.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// `beginRefreshAt` must be at least this far from both ends.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// Which PodCertificateRequest API version to serve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ApiVersionChoice {
    /// `certificates.k8s.io/v1` when discovery shows it serving
    /// `podcertificaterequests` (1.37+), else `v1beta1`.
    #[default]
    Auto,
    /// This version.
    Fixed(ApiVersion),
}

impl std::str::FromStr for ApiVersionChoice {
    type Err = SignerError;

    fn from_str(text: &str) -> Result<Self, SignerError> {
        match text {
            "auto" => Ok(Self::Auto),
            "v1beta1" => Ok(Self::Fixed(ApiVersion::V1beta1)),
            "v1" => Ok(Self::Fixed(ApiVersion::V1)),
            other => Err(SignerError::Config {
                reason: format!("API version {other:?} is not one of auto, v1beta1, v1"),
            }),
        }
    }
}

/// How the controller works.
#[derive(Clone, Debug)]
pub struct SignerSettings {
    /// The signer names answered (at least one).
    pub signer_names: Vec<String>,
    /// The request API version.
    pub api_version: ApiVersionChoice,
    /// Requests handled at once. Default 8.
    pub workers: usize,
    /// Timeout of one API call. Default 5 s.
    pub api_timeout: Duration,
    /// Attempts at a request whose API calls fail transiently before it is
    /// put back for later. Default 5.
    pub attempts: u32,
    /// First retry delay, doubled each attempt up to 2 s. Default 100 ms.
    pub backoff: Duration,
    /// Key types issued for. Default: every type of the API.
    pub accepted_key_types: AcceptedKeyTypes,
    /// Denial Events posted per second at most (burst: ten times that);
    /// 0 disables Events. Default 5.
    pub events_per_second: u32,
    /// `reportingInstance` of Events: this replica's identity.
    pub instance: String,
}

impl SignerSettings {
    /// Defaults for `signer_names`.
    pub fn new(signer_names: Vec<String>, instance: impl Into<String>) -> Self {
        Self {
            signer_names,
            api_version: ApiVersionChoice::Auto,
            workers: 8,
            api_timeout: Duration::from_secs(5),
            attempts: 5,
            backoff: Duration::from_millis(100),
            accepted_key_types: AcceptedKeyTypes::default(),
            events_per_second: 5,
            instance: instance.into(),
        }
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), SignerError> {
        let bad = |reason: String| Err(SignerError::Config { reason });
        if self.signer_names.is_empty() {
            return bad("no signer name".into());
        }
        for name in &self.signer_names {
            if !is_signer_name(name) {
                return bad(format!(
                    "signer name {name:?} must be <domain>/<path>, e.g. credlet.io/pods"
                ));
            }
        }
        if !(1..=256).contains(&self.workers) {
            return bad(format!("workers {} must be 1-256", self.workers));
        }
        if self.api_timeout.is_zero() || self.attempts == 0 {
            return bad("the API timeout and the attempts must be above 0".into());
        }
        if self.instance.is_empty() {
            return bad("the instance identity must not be empty".into());
        }
        // Events carry it as `reportingInstance`, which the API server
        // caps at 128 characters: a longer one would fail every Event.
        if self.instance.len() > MAX_REPORTING_INSTANCE_LEN {
            return bad(format!(
                "the instance identity is {} characters; Events allow at most {MAX_REPORTING_INSTANCE_LEN}",
                self.instance.len()
            ));
        }
        Ok(())
    }
}

/// Longest `reportingInstance` the API server accepts on an Event.
pub const MAX_REPORTING_INSTANCE_LEN: usize = 128;

/// A signer name: a DNS subdomain, `/`, then a path of at least one
/// character without `:` (the API's rule).
pub fn is_signer_name(name: &str) -> bool {
    let Some((domain, path)) = name.split_once('/') else {
        return false;
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    domain.len() <= 253
        && domain.split('.').all(label_ok)
        && !path.is_empty()
        && name.len() <= 571
        && !path.contains(':')
        && path.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether a request has a terminal condition (`Issued`, `Denied` or
/// `Failed` with status `True`).
pub fn is_terminal(request: &PodCertificateRequest) -> bool {
    request
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.status == "True" && TERMINAL_CONDITIONS.contains(&c.type_.as_str()))
        })
}

/// A denial from the identity checks against the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityDenial {
    /// The condition reason: `PodNotFound`, `PodUIDMismatch`,
    /// `PodNotOnNode`, `PodServiceAccountMismatch`, `ServiceAccountNotFound`,
    /// `ServiceAccountUIDMismatch`, `NodeNotFound` or `NodeUIDMismatch`.
    pub reason: &'static str,
    /// What did not match.
    pub message: String,
}

/// The answer to one request.
#[derive(Clone, Debug)]
enum Answer {
    Issued {
        status: Box<PodCertificateRequestStatus>,
        serial: String,
    },
    Denied {
        reason: &'static str,
        message: String,
    },
    Failed {
        reason: &'static str,
        message: String,
    },
}

/// Everything the workers share.
struct Shared {
    client: kube::Client,
    version: ApiVersion,
    keys: Arc<KeyStore>,
    policy: Arc<ServicePolicy>,
    leadership: Leadership,
    settings: SignerSettings,
    metrics: SignerMetrics,
    events: EventSink,
    /// UIDs of requests this replica answered whose answer the watch has
    /// not shown yet: a watch event older than the write (still without the
    /// condition) must not cause a second signing. An entry goes when the
    /// watch shows the answer or the deletion, else after [`RECENT_TTL`].
    recent: Mutex<HashMap<String, tokio::time::Instant>>,
}

/// How long answered request UIDs are remembered: past the API server's
/// garbage collection of requests (~15 min) nothing stale can arrive.
const RECENT_TTL: Duration = Duration::from_secs(20 * 60);
/// Answered request UIDs kept at most (about 100 bytes each) before older
/// ones are dropped.
const RECENT_MAX: usize = 16_384;

type Key = (String, String);

/// The running controller; dropping it stops it.
#[derive(Debug)]
pub struct Signer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Signer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Signer {
    /// Starts the controller: it answers while `leadership` holds. Resolves
    /// the API version first (discovery for [`ApiVersionChoice::Auto`]).
    pub async fn start(
        client: kube::Client,
        keys: Arc<KeyStore>,
        policy: Arc<ServicePolicy>,
        leadership: Leadership,
        settings: SignerSettings,
        metrics: SignerMetrics,
    ) -> Result<Self, SignerError> {
        settings.validate()?;
        if policy.max_duration < MIN_LIFETIME {
            return Err(SignerError::Config {
                reason: format!(
                    "the CA's maximum lifetime {:?} is below the 1 h the PodCertificateRequest API requires",
                    policy.max_duration
                ),
            });
        }
        let version = match settings.api_version {
            ApiVersionChoice::Fixed(v) => v,
            ApiVersionChoice::Auto => discover(&client, settings.api_timeout).await?,
        };
        tracing::info!(
            signers = ?settings.signer_names,
            api_version = %version,
            workers = settings.workers,
            "PodCertificateRequest signer started"
        );
        let events = EventSink::start(
            client.clone(),
            settings.events_per_second,
            settings.api_timeout,
        );
        let shared = Arc::new(Shared {
            client,
            version,
            keys,
            policy,
            leadership,
            events,
            settings,
            metrics,
            recent: Mutex::new(HashMap::new()),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(supervise(shared, stop_rx));
        Ok(Self {
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Stops the workers (a request being written finishes its write) and
    /// waits for them.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// `certificates.k8s.io/v1` if it serves `podcertificaterequests`, else
/// `v1beta1`.
pub async fn discover(client: &kube::Client, timeout: Duration) -> Result<ApiVersion, SignerError> {
    match tokio::time::timeout(
        timeout,
        client.list_api_group_resources("certificates.k8s.io/v1"),
    )
    .await
    {
        Ok(Ok(list)) => Ok(
            if list
                .resources
                .iter()
                .any(|r| r.name == crate::request::PLURAL)
            {
                ApiVersion::V1
            } else {
                ApiVersion::V1beta1
            },
        ),
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => Ok(ApiVersion::V1beta1),
        Ok(Err(e)) => Err(SignerError::Discovery {
            reason: e.to_string(),
        }),
        Err(_) => Err(SignerError::Discovery {
            reason: format!("no answer within {timeout:?}"),
        }),
    }
}

/// Runs a session of watchers and workers whenever this replica leads.
async fn supervise(shared: Arc<Shared>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let mut leadership = shared.leadership.clone();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            leading = leadership.wait_leading() => if !leading { return },
        }
        tracing::info!("signer leading: answering PodCertificateRequests");
        let mut session = start_session(&shared);
        tokio::select! {
            _ = &mut stop => {
                session.shutdown().await;
                return;
            }
            () = leadership.wait_lost() => {
                tracing::warn!("signer no longer leading: workers stopped");
                session.shutdown().await;
            }
        }
    }
}

fn start_session(shared: &Arc<Shared>) -> JoinSet<()> {
    let queue: Arc<WorkQueue<Key, Arc<PodCertificateRequest>>> = Arc::new(WorkQueue::new());
    let mut tasks = JoinSet::new();
    for signer in &shared.settings.signer_names {
        let api: Api<PodCertificateRequest> = Api::all_with(shared.client.clone(), &shared.version);
        let config = watcher::Config::default().fields(&format!("spec.signerName={signer}"));
        let queue = Arc::clone(&queue);
        let shared = Arc::clone(shared);
        let signer = signer.clone();
        tasks.spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config).default_backoff());
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(request) | watcher::Event::InitApply(request)) => {
                        offer(&shared, &queue, request);
                    }
                    Ok(watcher::Event::Delete(request)) => {
                        shared.forget(&request);
                        if let Some(key) = key_of(&request) {
                            queue.remove(&key);
                        }
                    }
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                    Err(error) => tracing::warn!(
                        signer = %signer,
                        error = %error,
                        "PodCertificateRequest watch failed; retrying"
                    ),
                }
            }
        });
    }
    for _ in 0..shared.settings.workers {
        let queue = Arc::clone(&queue);
        let shared = Arc::clone(shared);
        tasks.spawn(async move {
            loop {
                let (key, request) = queue.next().await;
                let retry = handle(&shared, request).await;
                queue.done(&key);
                if let Some(request) = retry {
                    // Put back after a pause; a newer watch event for the
                    // key replaces this object.
                    let queue = Arc::clone(&queue);
                    let pause = shared.settings.backoff.max(Duration::from_millis(100)) * 20;
                    tokio::spawn(async move {
                        tokio::time::sleep(pause).await;
                        queue.add(key, request);
                    });
                }
            }
        });
    }
    tasks
}

fn key_of(request: &PodCertificateRequest) -> Option<Key> {
    Some((
        request.metadata.namespace.clone()?,
        request.metadata.name.clone()?,
    ))
}

/// Queues a request unless it is answered (or known to be answered).
fn offer(
    shared: &Shared,
    queue: &WorkQueue<Key, Arc<PodCertificateRequest>>,
    request: PodCertificateRequest,
) {
    if is_terminal(&request) {
        // The watch has caught up with the answer: nothing stale can follow.
        shared.forget(&request);
        return;
    }
    if shared.answered_recently(&request) {
        return;
    }
    if !shared
        .settings
        .signer_names
        .contains(&request.spec.signer_name)
    {
        return;
    }
    if let Some(key) = key_of(&request) {
        queue.add(key, Arc::new(request));
    }
}

impl Shared {
    fn answered_recently(&self, request: &PodCertificateRequest) -> bool {
        let Some(uid) = request.metadata.uid.as_deref() else {
            return false;
        };
        lock(&self.recent).contains_key(uid)
    }

    fn forget(&self, request: &PodCertificateRequest) {
        if let Some(uid) = request.metadata.uid.as_deref() {
            lock(&self.recent).remove(uid);
        }
    }

    fn remember(&self, request: &PodCertificateRequest) {
        let Some(uid) = request.metadata.uid.clone() else {
            return;
        };
        let now = tokio::time::Instant::now();
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT_MAX {
            recent.retain(|_, at| now.duration_since(*at) < RECENT_TTL);
            if recent.len() >= RECENT_MAX {
                // Stale events arrive within moments of a write; entries
                // this old only save a wasted signature, and the status
                // write's resourceVersion precondition still refuses a
                // second answer.
                recent.retain(|_, at| now.duration_since(*at) < Duration::from_secs(10));
            }
        }
        recent.insert(uid, now);
    }

    fn api(&self, namespace: &str) -> Api<PodCertificateRequest> {
        Api::namespaced_with(self.client.clone(), namespace, &self.version)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Handles one request. Returns the request when it should be tried again
/// later (transient errors outlasted the attempts).
async fn handle(
    shared: &Arc<Shared>,
    request: Arc<PodCertificateRequest>,
) -> Option<Arc<PodCertificateRequest>> {
    let namespace = request.metadata.namespace.clone().unwrap_or_default();
    let name = request.metadata.name.clone().unwrap_or_default();
    let mut current = request;
    let mut delay = shared.settings.backoff;
    let mut attempt = 0;
    loop {
        if is_terminal(&current) || shared.answered_recently(&current) {
            return None;
        }
        if !shared.leadership.is_leading() {
            // Put back: a lapse that ends in a renewal keeps this session
            // running, and no watch event would bring the request again.
            return Some(current);
        }
        attempt += 1;
        let result = match answer(shared, &current).await {
            Ok(answer) => write(shared, &current, answer).await,
            Err(error) => Err(error),
        };
        match result {
            Ok(Written::Done) => return None,
            Ok(Written::NotLeading) => return Some(current),
            Ok(Written::Conflict(fresh)) => {
                // Someone else wrote: the fresh object decides.
                current = Arc::new(*fresh);
            }
            Err(error) if error.is_transient() && attempt < shared.settings.attempts => {
                shared.metrics.api_retries.inc();
                tracing::debug!(
                    namespace, name, attempt, error = %error,
                    "transient error answering a PodCertificateRequest; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) if error.is_transient() => {
                shared.metrics.api_retries.inc();
                tracing::warn!(
                    namespace, name, error = %error,
                    "PodCertificateRequest not answered yet; will retry"
                );
                return Some(current);
            }
            Err(error) => {
                tracing::error!(
                    namespace, name, error = %error,
                    "PodCertificateRequest not answered"
                );
                return None;
            }
        }
        if attempt >= shared.settings.attempts + 3 {
            return Some(current);
        }
    }
}

/// Decides the answer (validation, identity checks, signing). API errors
/// are returned; every other outcome is an [`Answer`].
async fn answer(shared: &Shared, request: &PodCertificateRequest) -> Result<Answer, SignerError> {
    let validated = match validate(request, &shared.settings.accepted_key_types) {
        Ok(v) => v,
        Err(Denial { reason, message }) => {
            return Ok(Answer::Denied {
                reason: reason.as_str(),
                message,
            });
        }
    };
    if let Some(denial) = check_identity(shared, &validated).await? {
        return Ok(Answer::Denied {
            reason: denial.reason,
            message: denial.message,
        });
    }
    Ok(sign(shared, request, &validated))
}

/// The pod, service account and node must exist with the request's UIDs,
/// the pod on the request's node under the request's service account.
async fn check_identity(
    shared: &Shared,
    v: &ValidatedRequest,
) -> Result<Option<IdentityDenial>, SignerError> {
    let timeout = shared.settings.api_timeout;
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &v.namespace);
    let accounts: Api<ServiceAccount> = Api::namespaced(shared.client.clone(), &v.namespace);
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let (pod, account, node) = tokio::join!(
        call(
            || format!("GET pod {}/{}", v.namespace, v.pod_name),
            timeout,
            pods.get_opt(&v.pod_name)
        ),
        call(
            || format!(
                "GET serviceaccount {}/{}",
                v.namespace, v.service_account_name
            ),
            timeout,
            accounts.get_metadata_opt(&v.service_account_name)
        ),
        call(
            || format!("GET node {}", v.node_name),
            timeout,
            nodes.get_metadata_opt(&v.node_name)
        ),
    );
    let (pod, account, node) = (pod?, account?, node?);
    let deny = |reason: &'static str, message: String| Ok(Some(IdentityDenial { reason, message }));
    let pod_ref = format!("{}/{}", v.namespace, v.pod_name);
    let Some(pod) = pod else {
        return deny("PodNotFound", format!("pod {pod_ref} does not exist"));
    };
    let pod_uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if pod_uid != v.pod_uid {
        return deny(
            "PodUIDMismatch",
            format!(
                "pod {pod_ref} has UID {pod_uid}, the request names {}",
                v.pod_uid
            ),
        );
    }
    let spec = pod.spec.unwrap_or_default();
    let pod_node = spec.node_name.unwrap_or_default();
    if pod_node != v.node_name {
        return deny(
            "PodNotOnNode",
            format!(
                "pod {pod_ref} is scheduled to node {pod_node:?}, the request comes for node {:?}",
                v.node_name
            ),
        );
    }
    let pod_account = spec
        .service_account_name
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    if pod_account != v.service_account_name {
        return deny(
            "PodServiceAccountMismatch",
            format!(
                "pod {pod_ref} runs as service account {pod_account:?}, the request names {:?}",
                v.service_account_name
            ),
        );
    }
    let Some(account) = account else {
        return deny(
            "ServiceAccountNotFound",
            format!(
                "service account {}/{} does not exist",
                v.namespace, v.service_account_name
            ),
        );
    };
    let account_uid = account.metadata.uid.as_deref().unwrap_or_default();
    if account_uid != v.service_account_uid {
        return deny(
            "ServiceAccountUIDMismatch",
            format!(
                "service account {}/{} has UID {account_uid}, the request names {}",
                v.namespace, v.service_account_name, v.service_account_uid
            ),
        );
    }
    let Some(node) = node else {
        return deny(
            "NodeNotFound",
            format!("node {} does not exist", v.node_name),
        );
    };
    let node_uid = node.metadata.uid.as_deref().unwrap_or_default();
    if node_uid != v.node_uid {
        return deny(
            "NodeUIDMismatch",
            format!(
                "node {} has UID {node_uid}, the request names {}",
                v.node_name, v.node_uid
            ),
        );
    }
    Ok(None)
}

/// Applies the CA policy and signs.
fn sign(shared: &Shared, request: &PodCertificateRequest, v: &ValidatedRequest) -> Answer {
    let policy = &shared.policy;
    let facts = credlet_ca_service::policy::Facts {
        namespace: v.namespace.clone(),
        pod_name: v.pod_name.clone(),
        pod_uid: v.pod_uid.clone(),
        service_account: v.service_account_name.clone(),
    };
    let dns_names = match policy.dns_names(&facts, &v.options.dns_names) {
        Ok(names) => names,
        Err(error) => {
            return Answer::Denied {
                reason: "DNSNameNotAllowed",
                message: error.to_string(),
            };
        }
    };
    let lifetime = lifetime(policy, v.max_expiration);
    let issuance = IssuanceRequest {
        csr_der: Vec::new(),
        identity: PodIdentity {
            namespace: v.namespace.clone(),
            name: v.pod_name.clone(),
            uid: v.pod_uid.clone(),
            service_account: v.service_account_name.clone(),
        },
        spiffe_id: Some(policy.pod_spiffe_id(&v.namespace, &v.service_account_name)),
        dns_names,
        ip_addresses: Vec::new(),
        common_name: None,
        duration: lifetime,
    };
    let authority = shared.keys.authority();
    let issued = match authority.issue_for_public_key(&v.public_key, &issuance, SystemTime::now()) {
        Ok(issued) => issued,
        Err(error) => return refusal(&error),
    };
    let status = issued_status(request, &issued, policy.default_renew_before_percent);
    Answer::Issued {
        status: Box::new(status),
        serial: issued.serial_hex,
    }
}

/// The lifetime to issue: min(CA maximum, request maximum), at least 1 h.
pub fn lifetime(policy: &ServicePolicy, max_expiration: Duration) -> Duration {
    policy.max_duration.min(max_expiration).max(MIN_LIFETIME)
}

/// A signing error as an answer: the requester's fault is a denial, the
/// signer's a failure.
fn refusal(error: &IssueError) -> Answer {
    let message = error.to_string();
    match error {
        IssueError::Policy(PolicyError::KeyTypeNotAllowed { .. }) => Answer::Denied {
            reason: "UnsupportedKeyType",
            message,
        },
        IssueError::Policy(
            PolicyError::InvalidDnsName { .. }
            | PolicyError::WildcardDnsName { .. }
            | PolicyError::TooManyDnsNames { .. },
        ) => Answer::Denied {
            reason: "DNSNameNotAllowed",
            message,
        },
        IssueError::Policy(
            PolicyError::EmptyIdentityField { .. } | PolicyError::InvalidIdentityField { .. },
        ) => Answer::Denied {
            reason: "InvalidRequest",
            message,
        },
        _ => Answer::Failed {
            reason: "SigningFailed",
            message,
        },
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn timestamp_s(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// `beginRefreshAt` (whole seconds): the CA's renewal spread, inside
/// [notBefore + 10 min, notAfter − 10 min].
pub fn begin_refresh_at(not_before: SystemTime, not_after: SystemTime, percent: u32) -> i64 {
    let at = credlet_ca_service::policy::renew_at_unix_ms(not_before, not_after, 0, 0, percent);
    let margin = i64::try_from(REFRESH_MARGIN.as_millis()).unwrap_or(0);
    let low = unix_ms(not_before) + margin;
    let high = (unix_ms(not_after) - margin).max(low);
    // Round up to the second so that truncation keeps it inside.
    let secs = (at.clamp(low, high) + 999).div_euclid(1000);
    secs.min(high.div_euclid(1000))
        .max((low + 999).div_euclid(1000))
}

fn issued_status(
    request: &PodCertificateRequest,
    issued: &IssuedCertificate,
    renew_percent: u32,
) -> PodCertificateRequestStatus {
    let secs = |t: SystemTime| unix_ms(t).div_euclid(1000);
    let refresh = begin_refresh_at(issued.not_before, issued.not_after, renew_percent);
    PodCertificateRequestStatus {
        certificate_chain: Some(issued.chain_pem.clone()),
        not_before: Some(timestamp_s(secs(issued.not_before))),
        not_after: Some(timestamp_s(secs(issued.not_after))),
        begin_refresh_at: Some(timestamp_s(refresh)),
        conditions: Some(vec![condition(
            request,
            "Issued",
            "Issued",
            format!("certificate issued, serial {}", issued.serial_hex),
        )]),
    }
}

fn condition(
    request: &PodCertificateRequest,
    type_: &str,
    reason: &str,
    message: String,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: "True".to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: Time(Timestamp::now()),
        observed_generation: request.metadata.generation,
    }
}

enum Written {
    Done,
    /// Not written: this replica did not lead at the write.
    NotLeading,
    /// 409: the object as it is now.
    Conflict(Box<PodCertificateRequest>),
}

/// Writes the answer through `/status`, guarded by the resourceVersion the
/// request was read at.
async fn write(
    shared: &Arc<Shared>,
    request: &PodCertificateRequest,
    answer: Answer,
) -> Result<Written, SignerError> {
    let namespace = request.metadata.namespace.clone().unwrap_or_default();
    let name = request.metadata.name.clone().unwrap_or_default();
    let signer = request.spec.signer_name.as_str();
    let (status, outcome, reason, message) = match &answer {
        Answer::Issued { status, .. } => {
            ((**status).clone(), Outcome::Issued, "Issued", String::new())
        }
        Answer::Denied { reason, message } => (
            PodCertificateRequestStatus {
                conditions: Some(vec![condition(request, "Denied", reason, message.clone())]),
                ..PodCertificateRequestStatus::default()
            },
            Outcome::Denied,
            *reason,
            message.clone(),
        ),
        Answer::Failed { reason, message } => (
            PodCertificateRequestStatus {
                conditions: Some(vec![condition(request, "Failed", reason, message.clone())]),
                ..PodCertificateRequestStatus::default()
            },
            Outcome::Failed,
            *reason,
            message.clone(),
        ),
    };
    let mut updated = request.clone();
    updated.status = Some(status);
    let api = shared.api(&namespace);
    // The fence: a replica past its renew deadline writes nothing.
    if !shared.leadership.is_leading() {
        return Ok(Written::NotLeading);
    }
    let written = call(
        || format!("update podcertificaterequest {namespace}/{name} status"),
        shared.settings.api_timeout,
        api.replace_status(&name, &PostParams::default(), &updated),
    )
    .await;
    match written {
        Ok(_) => {}
        Err(e) if e.status_code() == Some(409) => {
            let fresh = call(
                || format!("GET podcertificaterequest {namespace}/{name}"),
                shared.settings.api_timeout,
                api.get_opt(&name),
            )
            .await?;
            return Ok(match fresh {
                Some(fresh) if !is_terminal(&fresh) => Written::Conflict(Box::new(fresh)),
                _ => Written::Done,
            });
        }
        Err(e) if e.status_code() == Some(404) => return Ok(Written::Done),
        Err(e) => return Err(e),
    }
    shared.remember(request);
    shared.metrics.answered(signer, outcome, reason);
    match answer {
        Answer::Issued { serial, .. } => {
            if let Some(created) = &request.metadata.creation_timestamp {
                let waited = Timestamp::now().duration_since(created.0);
                shared
                    .metrics
                    .issue_latency
                    .observe(waited.as_secs_f64().max(0.0));
            }
            tracing::info!(
                namespace, name, signer, serial,
                pod = %request.spec.pod_name,
                "pod certificate issued"
            );
        }
        Answer::Denied { .. } => {
            tracing::warn!(
                namespace, name, signer, reason, message,
                pod = %request.spec.pod_name,
                "PodCertificateRequest denied"
            );
            post_event(shared, request, reason, &message);
        }
        Answer::Failed { .. } => {
            tracing::error!(
                namespace,
                name,
                signer,
                reason,
                message,
                "PodCertificateRequest failed"
            );
            post_event(shared, request, reason, &message);
        }
    }
    Ok(Written::Done)
}

/// Denial Events waiting to be posted, at most; more are dropped.
const EVENT_QUEUE: usize = 256;

/// Denial Events: a token bucket bounds their rate (a flood of bad
/// requests must not become a flood of Events) and one task posts them from
/// a bounded queue, so workers never wait for them.
struct EventSink {
    per_second: f64,
    burst: f64,
    bucket: Mutex<(f64, tokio::time::Instant)>,
    queue: tokio::sync::mpsc::Sender<Event>,
}

impl EventSink {
    /// Starts the posting task (it ends when the sink is dropped).
    fn start(client: kube::Client, per_second: u32, timeout: Duration) -> Self {
        let (queue, mut events) = tokio::sync::mpsc::channel::<Event>(EVENT_QUEUE);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let namespace = event.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
                if let Err(error) = call(
                    || format!("create event in {namespace}"),
                    timeout,
                    api.create(&PostParams::default(), &event),
                )
                .await
                {
                    tracing::debug!(error = %error, "posting a denial Event failed");
                }
            }
        });
        let per_second = f64::from(per_second);
        Self {
            per_second,
            burst: per_second * 10.0,
            bucket: Mutex::new((per_second * 10.0, tokio::time::Instant::now())),
            queue,
        }
    }

    /// Whether the rate allows one more Event now.
    fn allow(&self) -> bool {
        if self.per_second <= 0.0 {
            return false;
        }
        let mut bucket = lock(&self.bucket);
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(bucket.1).as_secs_f64() * self.per_second;
        bucket.0 = (bucket.0 + refill).min(self.burst);
        bucket.1 = now;
        if bucket.0 < 1.0 {
            return false;
        }
        bucket.0 -= 1.0;
        true
    }
}

fn post_event(shared: &Arc<Shared>, request: &PodCertificateRequest, reason: &str, note: &str) {
    if !shared.events.allow() {
        tracing::debug!(reason, "denial Event dropped by the rate limit");
        return;
    }
    let namespace = request.metadata.namespace.clone().unwrap_or_default();
    let name = request.metadata.name.clone().unwrap_or_default();
    let mut note = note.to_owned();
    if note.len() > 1024 {
        let mut cut = 1021;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some("Warning".to_owned()),
        reason: Some(reason.to_owned()),
        action: Some("Sign".to_owned()),
        note: Some(note),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(shared.settings.instance.clone()),
        regarding: Some(k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(PodCertificateRequest::api_version(&shared.version).into_owned()),
            kind: Some(crate::request::KIND.to_owned()),
            namespace: Some(namespace.clone()),
            name: Some(name),
            uid: request.metadata.uid.clone(),
            resource_version: request.metadata.resource_version.clone(),
            ..Default::default()
        }),
        ..Event::default()
    };
    if shared.events.queue.try_send(event).is_err() {
        tracing::debug!(reason, "denial Event dropped: too many waiting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signer_names() {
        assert!(is_signer_name("credlet.io/pods"));
        assert!(is_signer_name("example.com/a/b"));
        assert!(!is_signer_name("credlet.io"));
        assert!(!is_signer_name("credlet.io/"));
        assert!(!is_signer_name("Credlet.io/pods"));
        assert!(!is_signer_name("credlet.io/a:b"));
    }

    #[test]
    fn refresh_is_inside_the_window() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for lifetime in [3600u64, 86_400, 7_862_400] {
            let na = nb + Duration::from_secs(lifetime);
            for _ in 0..1000 {
                let at = begin_refresh_at(nb, na, 40);
                assert!(at >= 1_800_000_000 + 600, "{lifetime}: {at}");
                assert!(
                    at <= 1_800_000_000 + lifetime as i64 - 600,
                    "{lifetime}: {at}"
                );
                // 50-70 % of the lifetime (the CA's spread).
                let share = (at - 1_800_000_000) as f64 / lifetime as f64;
                assert!((0.49..=0.71).contains(&share), "{lifetime}: {share}");
            }
        }
    }

    #[test]
    fn lifetimes_are_capped_and_floored() {
        let mut policy = ServicePolicy::new("cluster.local");
        policy.max_duration = Duration::from_secs(48 * 3600);
        assert_eq!(
            lifetime(&policy, Duration::from_secs(86_400)),
            Duration::from_secs(86_400)
        );
        assert_eq!(
            lifetime(&policy, Duration::from_secs(7_862_400)),
            Duration::from_secs(48 * 3600)
        );
        assert_eq!(lifetime(&policy, Duration::from_secs(60)), MIN_LIFETIME);
    }

    /// A request met while leadership has lapsed is put back, not dropped:
    /// if the lapse ends in a renewal the session goes on and no watch event
    /// would bring the request again.
    #[tokio::test]
    async fn requests_met_while_not_leading_are_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let (_, cert, key) = credlet_ca::Authority::generate_self_signed_with_pems(
            credlet_ca::Policy::new("cluster.local"),
        )
        .unwrap();
        let files = credlet_ca_service::KeyFiles {
            cert: dir.path().join("ca.crt"),
            key: dir.path().join("ca.key"),
            chain: None,
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key.as_bytes()).unwrap();
        let policy = ServicePolicy::new("cluster.local");
        let keys = KeyStore::load(files, policy.ca_policy()).unwrap();
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let settings = SignerSettings::new(vec!["credlet.io/pods".into()], "ca-0");
        let shared = Arc::new(Shared {
            events: EventSink::start(client.clone(), 0, settings.api_timeout),
            client,
            version: ApiVersion::V1beta1,
            keys,
            policy: Arc::new(policy),
            leadership: Leadership::lapsed(),
            settings,
            metrics: SignerMetrics::default(),
            recent: Mutex::new(HashMap::new()),
        });
        let mut request = PodCertificateRequest::default();
        request.metadata.namespace = Some("team-a".into());
        request.metadata.name = Some("req-1".into());
        request.metadata.uid = Some("uid-1".into());
        request.spec.signer_name = "credlet.io/pods".into();
        let request = Arc::new(request);

        assert!(handle(&shared, Arc::clone(&request)).await.is_some());
        let answer = Answer::Denied {
            reason: "InvalidRequest",
            message: "test".into(),
        };
        assert!(matches!(
            write(&shared, &request, answer).await,
            Ok(Written::NotLeading)
        ));
        assert!(!shared.answered_recently(&request));
    }

    #[test]
    fn api_versions_parse() {
        assert_eq!(
            "auto".parse::<ApiVersionChoice>().unwrap(),
            ApiVersionChoice::Auto
        );
        assert_eq!(
            "v1".parse::<ApiVersionChoice>().unwrap(),
            ApiVersionChoice::Fixed(ApiVersion::V1)
        );
        assert!("v2".parse::<ApiVersionChoice>().is_err());
    }
}
