//! The image guard's CRI face: it gathers what a decision needs (the
//! runtime's image and sandbox, the records, the pod index, the registry),
//! hands it to the pure decisions of [`crate::decide`], and acts on them.
//!
//! - `ImageStatus`: a protected image is reported absent while a pod on this
//!   node that uses it (in a container or as an image volume) holds no valid
//!   verification — the kubelet then calls `PullImage` with that pod's
//!   credentials (`IfNotPresent`) or reports `ErrImageNeverPull` (`Never`).
//! - `PullImage` of a cached image: the pod's credentials are checked with
//!   one manifest HEAD (or a cached positive result within the TTL) against
//!   the repositories the guard recorded for the image — never a name the
//!   caller brings — and the existing image is returned, nothing
//!   downloaded. A pull of an absent name goes to the runtime; if it brought
//!   a new image, credlet records how it was pulled (on disk before the pull
//!   is answered with success); if it yielded an image already on the node
//!   (containerd keeps content by digest: any name whose manifest is that
//!   image will do), the pull proves nothing and the pod's credentials are
//!   checked as for a cached image.
//! - `CreateContainer`: the last gate, for every image the container uses
//!   (`config.image` and every image volume, `mounts[].image`), for the pod
//!   the runtime ran the sandbox for — which must be a pod the API server
//!   placed on this node, by uid, namespace and name, before its
//!   verifications count.
//!
//! Anything credlet can not establish (runtime or registry unreachable,
//! undecodable requests or answers, a record it can not write, a pod it can
//! not confirm) denies what depends on it: the guard fails closed, and only
//! for the calls concerned.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use credlet_proto::cri::{
    CreateContainerRequest, Image, ImageSpec, ImageStatusRequest, ImageStatusResponse,
    PodSandboxConfig, PodSandboxStatusRequest, PodSandboxStatusResponse, PullImageRequest,
    PullImageResponse, StatusRequest, StatusResponse, VersionRequest, VersionResponse,
};
use http::Response;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;

use crate::credential::Credential;
use crate::decide::{
    self, Checked, CredentialCheck, Decision, Identity, Listing, Pod, PublicCheck, Restore,
    Unconfirmed,
};
use crate::events::{EventSink, PodRef};
use crate::failure::{Failure, code_name};
use crate::grpc::{self, Code, ProxyBody};
use crate::pods::{PodIndex, PullPolicy};
use crate::policy::{GuardPolicy, Mode, Provenance};
use crate::proxy::{
    BoxFuture, Buffered, CallFailure, IMAGE_STATUS, InspectedCall, Inspector, POD_SANDBOX_STATUS,
    Rpc, Upstream, UpstreamError,
};
use crate::records::{CredentialId, Grant, RecordError, RecordStore, Stored, unix};
use crate::reference::ImageRef;
use crate::registry::Verifier;
use crate::resolve::{names_of, refers_to, resolve};

/// How a decision ended, for metrics and logs.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Allowed: no verification needed, or the pod holds one.
    Allowed,
    /// Allowed after a registry check of the pod's credentials.
    Verified,
    /// Allowed from a positive check of the same credential within the TTL.
    VerifiedCached,
    /// An absent image pulled through the runtime.
    Pulled,
    /// Image reported absent to make the kubelet present credentials.
    Hidden,
    /// Refused.
    Denied,
    /// Would have been hidden or refused (audit mode).
    AuditDenied,
    /// Refused because something needed to decide was unavailable.
    Unavailable,
}

/// Labels of `credlet_imageguard_decisions`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The CRI call.
    pub rpc: RpcLabel,
    /// The outcome.
    pub outcome: Outcome,
}

/// Labels of `credlet_imageguard_failures`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The CRI call.
    pub rpc: RpcLabel,
    /// Why it failed (snake_case, see [`Failure::as_str`]).
    pub reason: Failure,
}

/// The RPC as a metric label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RpcLabel {
    /// ImageStatus.
    ImageStatus,
    /// PullImage.
    PullImage,
    /// CreateContainer.
    CreateContainer,
}

impl From<Rpc> for RpcLabel {
    fn from(rpc: Rpc) -> Self {
        match rpc {
            Rpc::ImageStatus => Self::ImageStatus,
            Rpc::PullImage => Self::PullImage,
            Rpc::CreateContainer => Self::CreateContainer,
        }
    }
}

/// The guard's metrics.
#[derive(Clone, Debug, Default)]
pub struct GuardMetrics {
    /// Decisions by RPC and outcome.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Registry checks made.
    pub registry_checks: Counter,
    /// Inspected calls that failed, by RPC and reason.
    pub failures: Family<FailureLabels, Counter>,
}

impl GuardMetrics {
    /// Registers under `credlet_imageguard_`. Every failure series is
    /// there from the start, at zero: an alert on its rate needs no series
    /// to appear first.
    pub fn register(&self, registry: &mut Registry) {
        for rpc in [Rpc::ImageStatus, Rpc::PullImage, Rpc::CreateContainer] {
            for reason in Failure::ALL {
                let _ = self.failures.get_or_create(&FailureLabels {
                    rpc: rpc.into(),
                    reason,
                });
            }
        }
        let sub = registry.sub_registry_with_prefix("credlet_imageguard");
        sub.register(
            "decisions",
            "Image guard decisions by CRI call and outcome",
            self.decisions.clone(),
        );
        sub.register(
            "registry_checks",
            "Manifest checks of pod credentials against registries",
            self.registry_checks.clone(),
        );
        sub.register(
            "failures",
            "Inspected CRI calls that failed (runtime error or unreachable, timeout, oversized, undecodable or invalid request, malformed runtime answer), by call and reason",
            self.failures.clone(),
        );
    }

    /// The count of one failure kind.
    pub fn failure_count(&self, rpc: Rpc, reason: Failure) -> u64 {
        self.failures
            .get_or_create(&FailureLabels {
                rpc: rpc.into(),
                reason,
            })
            .get()
    }

    /// The count of one decision kind.
    pub fn count(&self, rpc: Rpc, outcome: Outcome) -> u64 {
        self.decisions
            .get_or_create(&DecisionLabels {
                rpc: rpc.into(),
                outcome,
            })
            .get()
    }
}

/// Most sandboxes whose pod is remembered; past that the memory starts
/// over (a node runs far fewer, and a forgotten one is asked again).
const MAX_REMEMBERED_SANDBOXES: usize = 4096;

/// How long a `CreateContainer` whose pod relies on its verification waits
/// for the pod index to list a pod it does not know yet (the kubelet and
/// the guard watch the same API server; the guard may be a moment behind).
const IDENTITY_WAIT: Duration = Duration::from_secs(5);

/// After a public answer could not be asked again (registry unreachable),
/// the last answer stands without asking for this long.
const RECHECK_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Most images whose public re-check is tracked at once.
const MAX_PUBLIC_CHECKS: usize = 4096;

/// Calls of containerd's own API (on the CRI socket), to read an image's
/// manifest annotations.
const CONTAINERD_IMAGES_GET: &str = "/containerd.services.images.v1.Images/Get";
const CONTAINERD_CONTENT_READ: &str = "/containerd.services.content.v1.Content/Read";
/// The containerd namespace of CRI's images.
const CONTAINERD_CRI_NAMESPACE: &str = "k8s.io";

/// `RuntimeService/Version` and `RuntimeService/Status`, asked once to know
/// whether the runtime restores checkpoints through `CreateContainer`.
const VERSION: &str = "/runtime.v1.RuntimeService/Version";
const STATUS: &str = "/runtime.v1.RuntimeService/Status";

/// The last failed public re-check of one image, shared by the calls that
/// wait for it (one check at a time per image).
type PublicCheckSlot = Arc<tokio::sync::Mutex<Option<Instant>>>;

/// The image guard.
pub struct ImageGuard {
    policy: GuardPolicy,
    records: Arc<RecordStore>,
    verifier: Arc<dyn Verifier>,
    pods: Arc<dyn PodIndex>,
    events: Arc<dyn EventSink>,
    metrics: GuardMetrics,
    /// The pod each sandbox was run for, by full sandbox id, as the runtime
    /// reported it (fixed for a sandbox's life; ids are never reused).
    sandboxes: Mutex<HashMap<String, Option<PodRef>>>,
    /// Public re-checks under way or recently failed, by image id.
    public_checks: Mutex<HashMap<String, PublicCheckSlot>>,
    /// Whether the runtime restores checkpoints in `CreateContainer`, once
    /// it could be asked.
    restore: tokio::sync::OnceCell<(Restore, String)>,
}

impl std::fmt::Debug for ImageGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageGuard")
            .field("policy", &self.policy)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

/// A decision about to be reported.
struct Report<'a> {
    rpc: Rpc,
    pod: Option<&'a PodRef>,
    image: &'a str,
    image_id: &'a str,
    outcome: Outcome,
    reason: &'a str,
    /// Set when the decision comes from a failed call (the runtime could
    /// not be asked): counted as a failure too, in the same log line.
    failure: Option<Failure>,
}

/// Why a call is refused, and with which gRPC status code.
#[derive(Debug)]
struct Refusal {
    code: u32,
    outcome: Outcome,
    reason: String,
    /// Set when a call to the runtime failed.
    failure: Option<Failure>,
}

impl Refusal {
    fn new(code: Code, outcome: Outcome, reason: String) -> Self {
        Self {
            code: u32::from(code as u8),
            outcome,
            reason,
            failure: None,
        }
    }

    /// The same refusal, caused by a failed call.
    fn failed(self, failure: Failure) -> Self {
        Self {
            failure: Some(failure),
            ..self
        }
    }

    /// The runtime could not be asked (`Unavailable`), or answered a lookup
    /// of credlet's with an error (its own code: an ambiguous short id is
    /// no reason to retry).
    fn upstream(error: &UpstreamError) -> Self {
        let code = match error {
            UpstreamError::Status { status, .. } if *status != 0 => *status,
            _ => u32::from(Code::Unavailable as u8),
        };
        Self {
            code,
            outcome: Outcome::Unavailable,
            reason: error.to_string(),
            failure: Some(Failure::of_upstream(error)),
        }
    }

    /// A pod the policy holds to a verification it does not have (or can
    /// not be trusted with).
    fn judged(refusal: &decide::Refusal, reason: String) -> Self {
        match refusal {
            decide::Refusal::NoVerification => {
                Self::new(Code::FailedPrecondition, Outcome::Denied, reason)
            }
            decide::Refusal::Unconfirmed(Unconfirmed::Mismatch { .. }) => {
                Self::new(Code::PermissionDenied, Outcome::Denied, reason)
            }
            // The API server will say, once asked: try again.
            decide::Refusal::Unconfirmed(_) => {
                Self::new(Code::Unavailable, Outcome::Unavailable, reason)
            }
        }
    }
}

/// How a pull of a cached image (or of a name for one) was admitted.
enum Admitted {
    /// The pod may use the image as it is.
    NotRequired,
    /// The pod's credentials were verified.
    Verified(Outcome),
    /// The manifest is gone from every trusted repository: the runtime
    /// should resolve the reference again.
    AskRuntime,
}

/// One image a `CreateContainer` uses.
#[derive(Debug)]
pub struct ImageUse {
    /// What the caller asked for.
    pub spec: ImageSpec,
    /// Where: `None` for the container's own image, else the image
    /// volume's mount point.
    pub mount: Option<String>,
}

impl ImageUse {
    /// " (image volume at /v)", or nothing for the container's image.
    fn suffix(&self) -> String {
        self.mount
            .as_ref()
            .map(|path| format!(" (image volume at {path})"))
            .unwrap_or_default()
    }
}

/// Every image a container uses: its own and its image volumes'. Refuses
/// a request that names no image or an image volume without one.
///
/// Public for the `cri_messages` fuzz target; it is how the guard reads
/// every `CreateContainer` it decides on.
pub fn image_uses(request: &CreateContainerRequest) -> Result<Vec<ImageUse>, String> {
    let config = request
        .config
        .as_ref()
        .ok_or("CreateContainer carries no container config")?;
    let spec = config
        .image
        .clone()
        .filter(|s| !s.image.is_empty())
        .ok_or("CreateContainer names no image")?;
    let mut uses = vec![ImageUse { spec, mount: None }];
    for mount in &config.mounts {
        let Some(spec) = &mount.image else { continue };
        if spec.image.is_empty() {
            return Err(format!(
                "the image volume at {:?} names no image",
                mount.container_path
            ));
        }
        uses.push(ImageUse {
            spec: spec.clone(),
            mount: Some(mount.container_path.clone()),
        });
    }
    Ok(uses)
}

impl ImageGuard {
    /// Builds the guard.
    pub fn new(
        policy: GuardPolicy,
        records: Arc<RecordStore>,
        verifier: Arc<dyn Verifier>,
        pods: Arc<dyn PodIndex>,
        events: Arc<dyn EventSink>,
        metrics: GuardMetrics,
    ) -> Self {
        Self {
            policy,
            records,
            verifier,
            pods,
            events,
            metrics,
            sandboxes: Mutex::new(HashMap::new()),
            public_checks: Mutex::new(HashMap::new()),
            restore: tokio::sync::OnceCell::new(),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &GuardMetrics {
        &self.metrics
    }

    /// The records.
    pub fn records(&self) -> &RecordStore {
        &self.records
    }

    fn report(&self, d: &Report<'_>) {
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                rpc: d.rpc.into(),
                outcome: d.outcome,
            })
            .inc();
        if let Some(failure) = d.failure {
            self.count_failure(d.rpc, failure);
        }
        let pod = pod_label(d.pod);
        let policy = d.pod.map_or(self.policy.default, |p| {
            self.policy.for_namespace(&p.namespace)
        });
        let failure = d.failure.map(Failure::as_str);
        match d.outcome {
            Outcome::Denied | Outcome::AuditDenied | Outcome::Unavailable | Outcome::Hidden => {
                tracing::warn!(rpc = ?d.rpc, pod, image = d.image, image_id = d.image_id, %policy, outcome = ?d.outcome, reason = d.reason, failure, "image guard decision");
            }
            _ => {
                tracing::info!(rpc = ?d.rpc, pod, image = d.image, image_id = d.image_id, %policy, outcome = ?d.outcome, reason = d.reason, "image guard decision");
            }
        }
        // A sandbox without uid is no pod the API server knows.
        if let Some(pod) = d.pod.filter(|p| !p.uid.is_empty()) {
            match d.outcome {
                Outcome::Denied | Outcome::Unavailable => {
                    self.events.image_denied(pod, d.image, d.reason);
                }
                Outcome::AuditDenied => {
                    let reason = format!("audit mode, not enforced: {}", d.reason);
                    self.events.image_denied(pod, d.image, &reason);
                }
                _ => {}
            }
        }
    }

    fn audit(&self) -> bool {
        self.policy.mode == Mode::Audit
    }

    fn count_failure(&self, rpc: Rpc, failure: Failure) {
        self.metrics
            .failures
            .get_or_create(&FailureLabels {
                rpc: rpc.into(),
                reason: failure,
            })
            .inc();
    }

    /// Logs (once, at warn) and counts an inspected call that failed.
    fn note_failure(
        &self,
        rpc: Rpc,
        pod: Option<&PodRef>,
        image: &str,
        failure: Failure,
        detail: &str,
    ) {
        self.count_failure(rpc, failure);
        tracing::warn!(
            rpc = ?rpc,
            pod = pod_label(pod),
            image,
            reason = failure.as_str(),
            detail,
            "inspected CRI call failed"
        );
    }

    /// The runtime's answer to a forwarded call, passed on unchanged; an
    /// error answer is logged and counted first.
    fn runtime_answer(
        &self,
        rpc: Rpc,
        pod: Option<&PodRef>,
        image: &str,
        buffered: Buffered,
    ) -> Response<ProxyBody> {
        if let Some(code) = buffered.grpc_status().filter(|code| *code != 0) {
            let detail = format!(
                "the runtime answered with gRPC status {code} ({}): {}",
                code_name(code),
                buffered.grpc_message()
            );
            self.note_failure(rpc, pod, image, Failure::RuntimeError, &detail);
        } else if buffered.grpc_status().is_none() {
            self.note_failure(
                rpc,
                pod,
                image,
                Failure::MalformedAnswer,
                "the runtime's answer carries no gRPC status",
            );
        }
        buffered.into_response()
    }

    /// A call to the runtime that failed, logged and counted, and the
    /// kubelet's answer for it.
    fn upstream_failed(
        &self,
        rpc: Rpc,
        pod: Option<&PodRef>,
        image: &str,
        error: &UpstreamError,
    ) -> Response<ProxyBody> {
        self.note_failure(
            rpc,
            pod,
            image,
            Failure::of_upstream(error),
            &error.to_string(),
        );
        error.to_response()
    }

    /// A request refused before any decision: logged, counted, answered
    /// with `code`.
    fn bad_request(
        &self,
        rpc: Rpc,
        pod: Option<&PodRef>,
        image: &str,
        failure: Failure,
        code: Code,
        message: &str,
    ) -> Response<ProxyBody> {
        self.note_failure(rpc, pod, image, failure, message);
        grpc::error_response(code, message)
    }

    /// A request whose message does not decode.
    fn undecodable(&self, rpc: Rpc, error: &prost::DecodeError) -> Response<ProxyBody> {
        self.bad_request(
            rpc,
            None,
            "",
            Failure::Undecodable,
            Code::InvalidArgument,
            &format!("credlet could not decode the {rpc:?} request: {error}"),
        )
    }

    /// Forwards a call the guard allowed and passes the runtime's answer on
    /// (logged and counted when it is an error).
    async fn forward(
        &self,
        call: InspectedCall,
        upstream: &Upstream,
        pod: Option<&PodRef>,
        image: &str,
    ) -> Response<ProxyBody> {
        let rpc = call.rpc;
        match upstream.forward_buffered(call.parts, call.body).await {
            Ok(buffered) => self.runtime_answer(rpc, pod, image, buffered),
            Err(error) => self.upstream_failed(rpc, pod, image, &error),
        }
    }

    /// Whether the pod holds a valid verification of the image.
    fn has_grant(&self, image_id: &str, pod_uid: &str, now: SystemTime) -> bool {
        !pod_uid.is_empty()
            && self.records.with(image_id, |r| {
                r.and_then(|r| r.valid_grant(pod_uid, self.policy.ttl, now))
                    .is_some()
            })
    }

    /// Changes (or creates) an image's record. A new record is on disk when
    /// this returns `Ok`, written off the async workers; other changes are
    /// written behind. An error means a new record is not on disk: the
    /// caller must not answer with success.
    async fn record(
        &self,
        image_id: &str,
        provenance: Provenance,
        change: impl FnOnce(&mut crate::records::ImageRecord) -> bool,
    ) -> Result<(), RecordError> {
        match self.records.change(image_id, provenance, change) {
            Stored::Created => self.persist(image_id).await,
            Stored::Deferred => {
                self.records.schedule_flush();
                // A record still unwritten from an earlier failure is
                // retried now, not left to the next flush.
                self.persist(image_id).await
            }
            Stored::Unchanged => self.persist(image_id).await,
        }
    }

    /// Makes sure an image's record is on disk, on the blocking pool.
    async fn persist(&self, image_id: &str) -> Result<(), RecordError> {
        if !self.records.is_unwritten(image_id) {
            return Ok(());
        }
        let records = Arc::clone(&self.records);
        let id = image_id.to_owned();
        blocking(move || records.persist(&id)).await
    }

    /// How the image came to the node, as far as it decides a call at
    /// `now`: `None` (preloaded: credlet never saw it pulled), private, or
    /// public while its last anonymous success is within the TTL.
    ///
    /// An image with no record that a pull of an earlier run produced
    /// (a stale pull intent) is private. A public answer past the TTL is
    /// asked again (see [`ImageGuard::check_still_public`]).
    async fn provenance(
        &self,
        image: &Image,
        names: &[ImageRef],
        now: SystemTime,
    ) -> Option<Provenance> {
        let ttl = self.policy.ttl;
        let known = self.records.with(&image.id, |r| {
            r.map(|r| {
                (
                    r.effective_provenance(ttl, now),
                    r.public_answer_expired(ttl, now),
                )
            })
        });
        match known {
            None if self.records.has_stale_intents() => {
                let records = Arc::clone(&self.records);
                let (id, names) = (image.id.clone(), names.to_vec());
                blocking(move || Ok(records.claim_stale_intent(&id, &names)))
                    .await
                    .unwrap_or(true)
                    .then_some(Provenance::Credentials)
            }
            None => None,
            Some((provenance, false)) => Some(provenance),
            Some((_, true)) => Some(self.check_still_public(image, names).await),
        }
    }

    /// Asks again, anonymously, whether an image whose public answer ran
    /// out is still public — against the repositories recorded for it, with
    /// the guard's own manifest HEAD. A repository that refuses anonymous
    /// requests makes it private from then on; one that lets them in but no
    /// longer has the manifest (deleted after its tag moved on) keeps it
    /// public. A registry that can not be asked changes nothing: the last
    /// answer stands, and is not asked again for [`RECHECK_AFTER_FAILURE`].
    /// One check per image at a time: concurrent calls wait for it.
    async fn check_still_public(&self, image: &Image, names: &[ImageRef]) -> Provenance {
        let slot = {
            let mut checks = lock(&self.public_checks);
            if checks.len() >= MAX_PUBLIC_CHECKS && !checks.contains_key(&image.id) {
                checks.clear();
            }
            Arc::clone(checks.entry(image.id.clone()).or_default())
        };
        let mut failed_at = slot.lock().await;
        let ttl = self.policy.ttl;
        let now = SystemTime::now();
        // Answered while this call waited for the check under way?
        let recorded = match self.records.with(&image.id, |r| {
            r.map(|r| {
                (
                    r.effective_provenance(ttl, now),
                    r.public_answer_expired(ttl, now),
                    r.repositories.clone(),
                )
            })
        }) {
            None => return Provenance::Credentials, // pruned meanwhile
            Some((provenance, false, _)) => return provenance,
            Some((_, true, repositories)) => repositories,
        };
        if failed_at.is_some_and(|at| at.elapsed() < RECHECK_AFTER_FAILURE) {
            return Provenance::Anonymous;
        }
        let trusted = decide::trusted_repositories(Some(&recorded), names);
        let targets = decide::check_targets(&trusted, image, None);
        if targets.is_empty() {
            tracing::warn!(image_id = image.id, repositories = ?trusted, "a public answer ran out for an image with no repository digest to ask about; private for this call");
            return Provenance::Credentials;
        }
        let results = self.checks(&targets, None).await;
        let (provenance, reason) = match decide::public_check(&results) {
            PublicCheck::Public(reason) => (Provenance::Anonymous, reason),
            PublicCheck::Private(reason) => (Provenance::Credentials, reason),
            PublicCheck::Unknown(error) => {
                *failed_at = Some(Instant::now());
                tracing::warn!(
                    image_id = image.id,
                    error,
                    "cannot ask again whether a public image still is; the last answer stands"
                );
                return Provenance::Anonymous;
            }
        };
        *failed_at = None;
        let anonymous = CredentialId::anonymous();
        let at = unix(now);
        let result = self
            .record(&image.id, provenance, |r| {
                r.provenance = provenance;
                if provenance == Provenance::Anonymous {
                    r.verified.insert(anonymous.clone(), at);
                } else {
                    r.verified.remove(&anonymous);
                }
                true
            })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "writing image record");
        }
        lock(&self.public_checks).remove(&image.id);
        tracing::info!(image_id = image.id, repositories = ?trusted, public = provenance == Provenance::Anonymous, reason, "public answer past its TTL asked again");
        provenance
    }

    /// Checks `credential` (`None`: anonymous) against each target in turn,
    /// up to the first grant.
    async fn checks(
        &self,
        targets: &[(ImageRef, String)],
        credential: Option<&Credential>,
    ) -> Vec<Checked> {
        let mut results = Vec::with_capacity(targets.len());
        for (repository, digest) in targets {
            self.metrics.registry_checks.inc();
            let result = match self.verifier.check(repository, digest, credential).await {
                Ok(access) => Checked::Answered(access),
                Err(error) => Checked::Failed(error.to_string()),
            };
            let granted = result == Checked::Answered(crate::registry::Access::Granted);
            results.push(result);
            if granted {
                break;
            }
        }
        results
    }

    /// Whether the pod a sandbox was run for is the one it claims to be.
    /// With `wait`, a pod the index does not list yet is waited for a
    /// moment (see [`IDENTITY_WAIT`]).
    async fn identity(&self, pod: &PodRef, wait: bool) -> Identity {
        let ask = || {
            if !self.pods.is_synced() {
                return decide::identity(&pod.namespace, &pod.name, &pod.uid, Listing::NotLoaded);
            }
            let listed = self.pods.pod(&pod.uid);
            let listing = listed
                .as_deref()
                .map_or(Listing::Missing, |p| Listing::Listed {
                    namespace: &p.namespace,
                    name: &p.name,
                });
            decide::identity(&pod.namespace, &pod.name, &pod.uid, listing)
        };
        let deadline = Instant::now() + IDENTITY_WAIT;
        loop {
            let identity = ask();
            let missing = matches!(identity, Identity::Unconfirmed(Unconfirmed::Missing { .. }));
            if !(wait && missing && !pod.uid.is_empty()) || Instant::now() >= deadline {
                return identity;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A pod on this node that uses the image the runtime resolved
    /// `requested` to but holds no verification, when the policy demands
    /// one.
    async fn unverified_user(
        &self,
        requested: &str,
        image: &Image,
        names: &[ImageRef],
        now: SystemTime,
    ) -> Option<Unverified> {
        if !self.pods.is_synced() {
            // Which pods use the image is unknown: hide anything that could
            // be protected until the pod list is in.
            let provenance = self.provenance(image, names, now).await;
            let any_policy_verifies = self.policy.requires_verification("", names, provenance)
                || self
                    .policy
                    .namespaces
                    .keys()
                    .any(|ns| self.policy.requires_verification(ns, names, provenance));
            return any_policy_verifies.then_some(Unverified::PodsUnknown);
        }
        let matches = |spec_image: &str| refers_to(spec_image, requested, image);
        let users = self.pods.pods_using(&matches);
        if users.is_empty() {
            return None;
        }
        let provenance = self.provenance(image, names, now).await;
        // The index's pods are the API server's: confirmed by definition.
        let confirmed = Identity::Confirmed;
        users
            .into_iter()
            .find(|pod| {
                let facts = Pod {
                    namespace: &pod.namespace,
                    identity: &confirmed,
                };
                let verified = self.has_grant(&image.id, &pod.uid, now);
                matches!(
                    decide::judge(&self.policy, Some(facts), names, provenance, verified),
                    Decision::Refused(_)
                )
            })
            .map(|pod| {
                Unverified::Pod(PodRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                })
            })
    }

    async fn image_status(&self, call: InspectedCall, upstream: &Upstream) -> Response<ProxyBody> {
        let rpc = call.rpc;
        let request = match ImageStatusRequest::decode(call.message.clone()) {
            Ok(r) => r,
            Err(e) => return self.undecodable(rpc, &e),
        };
        let requested = request.image.map(|i| i.image).unwrap_or_default();
        let buffered = match upstream.forward_buffered(call.parts, call.body).await {
            Ok(b) => b,
            Err(e) => return self.upstream_failed(rpc, None, &requested, &e),
        };
        if buffered.grpc_status() != Some(0) {
            return self.runtime_answer(rpc, None, &requested, buffered);
        }
        let status = match grpc::unary_message(&buffered.body)
            .map_err(|e| e.to_string())
            .and_then(|m| ImageStatusResponse::decode(m).map_err(|e| e.to_string()))
        {
            Ok(status) => status,
            Err(reason) => {
                return self.bad_request(
                    rpc,
                    None,
                    &requested,
                    Failure::MalformedAnswer,
                    Code::Internal,
                    &format!("credlet could not read the runtime's ImageStatus answer: {reason}"),
                );
            }
        };
        let Some(image) = status.image else {
            return buffered.into_response();
        };
        let names = names_of(&image);
        match self
            .unverified_user(&requested, &image, &names, SystemTime::now())
            .await
        {
            None => buffered.into_response(),
            Some(unverified) => {
                let (pod, reason) = match &unverified {
                    Unverified::Pod(pod) => (
                        Some(pod),
                        format!(
                            "pod {}/{} uses the cached image without a verification of its pull credentials",
                            pod.namespace, pod.name
                        ),
                    ),
                    Unverified::PodsUnknown => (
                        None,
                        "the node's pod list is not loaded yet; hiding the cached image".to_owned(),
                    ),
                };
                let outcome = if self.audit() {
                    Outcome::AuditDenied
                } else {
                    Outcome::Hidden
                };
                self.report(&Report {
                    rpc,
                    pod,
                    image: &requested,
                    image_id: &image.id,
                    outcome,
                    reason: &reason,
                    failure: None,
                });
                if self.audit() {
                    buffered.into_response()
                } else {
                    grpc::ok_response(&ImageStatusResponse::default())
                }
            }
        }
    }

    async fn pull_image(&self, call: InspectedCall, upstream: &Upstream) -> Response<ProxyBody> {
        let rpc = call.rpc;
        let request = match PullImageRequest::decode(call.message.clone()) {
            Ok(r) => r,
            Err(e) => return self.undecodable(rpc, &e),
        };
        let requested = request
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let pod = pod_ref(request.sandbox_config.as_ref());
        let asked_for = match ImageRef::parse(&requested) {
            Ok(r) => r,
            Err(e) => {
                return self.bad_request(
                    rpc,
                    pod.as_ref(),
                    &requested,
                    Failure::InvalidRequest,
                    Code::InvalidArgument,
                    &format!("credlet: image reference {requested:?} is invalid: {e}"),
                );
            }
        };
        let credential = match request.auth.as_ref().map(Credential::from_auth_config) {
            None => None,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return self.bad_request(
                    rpc,
                    pod.as_ref(),
                    &requested,
                    Failure::InvalidRequest,
                    Code::InvalidArgument,
                    &format!("credlet: the pull credentials are malformed: {e}"),
                );
            }
        };
        let status: ImageStatusResponse = match upstream
            .unary(
                IMAGE_STATUS,
                &ImageStatusRequest {
                    image: request.image.clone(),
                    verbose: false,
                },
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return self.upstream_failed(rpc, pod.as_ref(), &requested, &e),
        };
        let pull = Pull {
            reference: &asked_for,
            credential: credential.as_ref(),
            pod: pod.as_ref(),
        };
        let Some(image) = status.image else {
            return self.forward_pull(call, upstream, &pull, None).await;
        };
        let admitted = match self.admit(rpc, &image, &requested, &pull, true).await {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let report = Report {
                    rpc,
                    pod: pod.as_ref(),
                    image: &requested,
                    image_id: &image.id,
                    outcome: refusal.outcome,
                    reason: &refusal.reason,
                    failure: refusal.failure,
                };
                return self.deny(call, upstream, refusal.code, report).await;
            }
        };
        let fresh_tag = self.wants_fresh_tag(&asked_for, pod.as_ref());
        match admitted {
            // The manifest is gone: the runtime resolves the reference
            // again, and whatever it brings is judged like any pull.
            Admitted::AskRuntime => self.forward_pull(call, upstream, &pull, None).await,
            // This pod may use the cached image as it is. The kubelet asks
            // because ImageStatus hid the image for another pod (or its own
            // re-pull check): answer with the cached image, as a forwarded
            // pull would need credentials the pod need not have. Only a pod
            // that wants its tag resolved again (`Always`), or a pull naming
            // no pod, goes to the runtime.
            Admitted::NotRequired if pod.is_none() || fresh_tag => {
                self.forward_pull(call, upstream, &pull, Some(&image.id))
                    .await
            }
            Admitted::NotRequired => {
                self.report(&Report {
                    rpc,
                    pod: pod.as_ref(),
                    image: &requested,
                    image_id: &image.id,
                    outcome: Outcome::Allowed,
                    reason: "no verification required; the cached image is returned",
                    failure: None,
                });
                grpc::ok_response(&PullImageResponse {
                    image_ref: image.id.clone(),
                })
            }
            Admitted::Verified(outcome) => {
                self.report(&Report {
                    rpc,
                    pod: pod.as_ref(),
                    image: &requested,
                    image_id: &image.id,
                    outcome,
                    reason: "pull credentials verified for the cached image",
                    failure: None,
                });
                if fresh_tag {
                    // `imagePullPolicy: Always` on a tag: the runtime must
                    // resolve the tag again (access is already proven), and
                    // the image it may bring is judged like any pulled one.
                    return self
                        .forward_pull(call, upstream, &pull, Some(&image.id))
                        .await;
                }
                grpc::ok_response(&PullImageResponse {
                    image_ref: image.id.clone(),
                })
            }
        }
    }

    /// Decides a pull of an image on the node: whether the pod must prove
    /// access, and if so checks its credential (a positive answer for the
    /// same credential within the TTL counts) against the repositories the
    /// guard trusts for the image, and records the verification (on disk
    /// before it is relied on). With `ask_runtime`, an image whose manifest
    /// every trusted repository has lost is [`Admitted::AskRuntime`];
    /// without, that is a refusal.
    async fn admit(
        &self,
        rpc: Rpc,
        image: &Image,
        requested: &str,
        pull: &Pull<'_>,
        ask_runtime: bool,
    ) -> Result<Admitted, Refusal> {
        let names = names_of(image);
        let now = SystemTime::now();
        let provenance = self.provenance(image, &names, now).await;
        // PullImage names its pod only in its sandbox config, a claim: it
        // decides what the answer says, never what a container may use.
        let claimed = Identity::Confirmed;
        let pod = pull.pod.map(|p| Pod {
            namespace: &p.namespace,
            identity: &claimed,
        });
        if decide::judge(&self.policy, pod, &names, provenance, false) == Decision::NotRequired {
            return Ok(Admitted::NotRequired);
        }
        let credential_id = self.records.credential_id(pull.credential);
        let ttl = self.policy.ttl;
        // When the registry last proved this credential, if within the TTL.
        // A cached answer keeps that time: it must not extend the TTL.
        let (cached_at, recorded) = self.records.with(&image.id, |r| {
            let cached = r
                .filter(|r| r.credential_verified(&credential_id, ttl, now))
                .and_then(|r| r.verified.get(&credential_id).copied());
            (cached, r.map(|r| r.repositories.clone()))
        });
        let trusted = decide::trusted_repositories(recorded.as_ref(), &names);
        let outcome = match cached_at {
            Some(_) => Outcome::VerifiedCached,
            None => {
                let targets = decide::check_targets(&trusted, image, Some(pull.reference));
                if targets.is_empty() {
                    return Err(Refusal::new(
                        Code::FailedPrecondition,
                        Outcome::Denied,
                        format!(
                            "cached image {requested} has no repository digest in {} to check credentials against",
                            list(&trusted)
                        ),
                    ));
                }
                let results = self.checks(&targets, pull.credential).await;
                let checked = targets
                    .iter()
                    .map(|(r, _)| r.name())
                    .collect::<Vec<_>>()
                    .join(", ");
                match decide::credential_check(&results) {
                    CredentialCheck::Granted => Outcome::Verified,
                    CredentialCheck::NotFound(_) if ask_runtime => {
                        return Ok(Admitted::AskRuntime);
                    }
                    CredentialCheck::NotFound(reason) | CredentialCheck::Denied(reason) => {
                        return Err(Refusal::new(
                            Code::PermissionDenied,
                            Outcome::Denied,
                            format!(
                                "credentials of {} are not authorized for cached image {requested} (checked against {checked}): {reason}",
                                describe(pull.pod)
                            ),
                        ));
                    }
                    CredentialCheck::Unknown(error) => {
                        return Err(Refusal::new(
                            Code::Unavailable,
                            Outcome::Unavailable,
                            format!(
                                "cannot verify pull credentials for cached image {requested} (checked against {checked}): {error}; refusing until the registry can be checked"
                            ),
                        ));
                    }
                }
            }
        };
        let verified_at = cached_at.unwrap_or_else(|| unix(now));
        // Anonymous access to a repository the guard trusts: public.
        let public = pull.credential.is_none();
        let grant = pull.pod.filter(|p| !p.uid.is_empty()).map(|p| {
            (
                p.uid.clone(),
                Grant {
                    credential: credential_id.clone(),
                    verified_at,
                },
            )
        });
        let result = self
            .record(&image.id, Provenance::Credentials, |r| {
                let mut changed = false;
                if r.repositories.is_empty() {
                    r.repositories.clone_from(&trusted);
                    changed = true;
                }
                if public && r.provenance != Provenance::Anonymous {
                    r.provenance = Provenance::Anonymous;
                    changed = true;
                }
                if r.verified
                    .get(&credential_id)
                    .is_none_or(|at| *at < verified_at)
                {
                    r.verified.insert(credential_id.clone(), verified_at);
                    changed = true;
                }
                if let Some((uid, grant)) = grant {
                    changed |= r.grants.insert(uid, grant.clone()) != Some(grant);
                }
                changed
            })
            .await;
        // The verification must be on disk before it is relied on: a new
        // record lost in a crash would leave the image looking preloaded.
        if let Err(error) = result {
            let reason = format!(
                "the verification for {requested} could not be recorded ({error}); refusing until the record is on disk"
            );
            let outcome = if self.audit() {
                Outcome::AuditDenied
            } else {
                Outcome::Unavailable
            };
            if !self.audit() {
                return Err(Refusal::new(Code::Unavailable, outcome, reason));
            }
            self.report(&Report {
                rpc,
                pod: pull.pod,
                image: requested,
                image_id: &image.id,
                outcome,
                reason: &reason,
                failure: None,
            });
        }
        Ok(Admitted::Verified(outcome))
    }

    /// Reports a refusal of a call that was not forwarded: `Some` answer in
    /// enforce mode; `None` in audit mode, where the refusal is only
    /// reported (`AuditDenied`) and the caller carries on.
    fn refuse(&self, code: u32, report: Report<'_>) -> Option<Response<ProxyBody>> {
        let report = Report {
            outcome: if self.audit() {
                Outcome::AuditDenied
            } else {
                report.outcome
            },
            ..report
        };
        self.report(&report);
        (!self.audit()).then(|| grpc::status_response(code, &format!("credlet: {}", report.reason)))
    }

    fn wants_fresh_tag(&self, reference: &ImageRef, pod: Option<&PodRef>) -> bool {
        if reference.digest().is_some() {
            return false;
        }
        let Some(pod) = pod.and_then(|p| self.pods.pod(&p.uid)) else {
            return false;
        };
        pod.images.iter().any(|c| {
            c.pull_policy == PullPolicy::Always
                && ImageRef::parse(&c.image).is_ok_and(|r| r.to_string() == reference.to_string())
        })
    }

    /// Reports a refusal and answers it — or, in audit mode, reports it as
    /// `AuditDenied` and forwards the call.
    async fn deny(
        &self,
        call: InspectedCall,
        upstream: &Upstream,
        code: u32,
        report: Report<'_>,
    ) -> Response<ProxyBody> {
        let (pod, image) = (report.pod, report.image);
        match self.refuse(code, report) {
            Some(refusal) => refusal,
            None => self.forward(call, upstream, pod, image).await,
        }
    }

    /// Sends a pull to the runtime and judges what it brought.
    ///
    /// A pull with credentials is announced on disk first (a pull intent):
    /// if even that can not be written, nothing is pulled. If the pull
    /// brought a new image, its record (how it was pulled) is on disk
    /// before the pull is answered with success; otherwise the pull is
    /// refused (the record stays in memory, the intent on disk, and the
    /// image protected). If it yielded an image already on the node, the
    /// pull proves nothing: the pod is admitted as for a cached image, and
    /// the pulled name is not taken for one of the image's own.
    /// `admitted`: the image this call already admitted (a re-pull of a
    /// tag), which needs nothing more if the runtime answers with it.
    async fn forward_pull(
        &self,
        call: InspectedCall,
        upstream: &Upstream,
        pull: &Pull<'_>,
        admitted: Option<&str>,
    ) -> Response<ProxyBody> {
        let rpc = call.rpc;
        let reference = pull.reference;
        let image = reference.to_string();
        let intent = match pull.credential {
            None => None,
            Some(_) => {
                let records = Arc::clone(&self.records);
                let pulled = reference.clone();
                match blocking(move || records.begin_pull(&pulled)).await {
                    Ok(intent) => Some(intent),
                    Err(error) => {
                        let reason = format!(
                            "cannot record the pull of {reference} before it starts ({error}); refusing it, as the image would be on the node with no record and pass for preloaded"
                        );
                        let report = Report {
                            rpc,
                            pod: pull.pod,
                            image: &image,
                            image_id: "",
                            outcome: Outcome::Unavailable,
                            reason: &reason,
                            failure: None,
                        };
                        if let Some(refusal) =
                            self.refuse(u32::from(Code::Unavailable as u8), report)
                        {
                            return refusal;
                        }
                        None
                    }
                }
            }
        };
        // No deadline: a pull may take hours. If the caller goes away, the
        // intent is dropped unended and what the pull brings stays private.
        let buffered = match upstream.forward_buffered(call.parts, call.body).await {
            Ok(b) => b,
            Err(e) => {
                // The runtime may still finish the pull: whatever it
                // brings stays private.
                self.end_intent(intent, None, true).await;
                return self.upstream_failed(rpc, pull.pod, &image, &e);
            }
        };
        if buffered.grpc_status() != Some(0) {
            self.end_intent(intent, None, false).await;
            return self.runtime_answer(rpc, pull.pod, &image, buffered);
        }
        let image_ref = match grpc::unary_message(&buffered.body)
            .map_err(|e| e.to_string())
            .and_then(|m| PullImageResponse::decode(m).map_err(|e| e.to_string()))
        {
            Ok(answer) if !answer.image_ref.is_empty() => answer.image_ref,
            answer => {
                self.end_intent(intent, None, true).await;
                let reason = answer.map_or_else(|e| e, |_| "no image ref".to_owned());
                return self.bad_request(
                    rpc,
                    pull.pod,
                    &image,
                    Failure::MalformedAnswer,
                    Code::Internal,
                    &format!("credlet could not read the runtime's PullImage answer: {reason}"),
                );
            }
        };
        if admitted == Some(image_ref.as_str()) {
            self.end_intent(intent, Some(&image_ref), false).await;
            return buffered.into_response();
        }
        // Which image the runtime answered with, by its own names.
        let pulled: Result<ImageStatusResponse, UpstreamError> = upstream
            .unary(
                IMAGE_STATUS,
                &ImageStatusRequest {
                    image: Some(ImageSpec {
                        image: image_ref.clone(),
                        ..ImageSpec::default()
                    }),
                    verbose: false,
                },
            )
            .await;
        let pulled = match pulled.map(|s| s.image) {
            Ok(Some(pulled)) if pulled.id == image_ref => pulled,
            other => {
                self.end_intent(intent, None, true).await;
                let failure = other.as_ref().err().map(Failure::of_upstream);
                let reason = match other {
                    Err(error) => error.to_string(),
                    Ok(_) => "the runtime does not show it".to_owned(),
                };
                let reason = format!(
                    "{image} was pulled as {image_ref}, but credlet can not tell which image that is ({reason}); it stays protected"
                );
                let report = Report {
                    rpc,
                    pod: pull.pod,
                    image: &image,
                    image_id: &image_ref,
                    outcome: Outcome::Unavailable,
                    reason: &reason,
                    failure,
                };
                return self
                    .refuse(u32::from(Code::Unavailable as u8), report)
                    .unwrap_or_else(|| buffered.into_response());
            }
        };
        let names = names_of(&pulled);
        let recorded = self.records.get(&image_ref).is_some();
        let brought = decide::pull_brought_image(reference, &names, recorded);
        let result = if brought {
            self.record_pulled(&image_ref, pull).await
        } else {
            // An image already on the node (or arriving by another pull at
            // the same time): its names other than the one pulled are its
            // own. It stays private until its own repositories prove
            // otherwise.
            let own: BTreeSet<String> = names
                .iter()
                .map(ImageRef::name)
                .filter(|n| *n != reference.name())
                .collect();
            self.record(&image_ref, Provenance::Credentials, |r| {
                if r.repositories.is_empty() {
                    r.repositories = own;
                    return true;
                }
                false
            })
            .await
        };
        self.end_intent(intent, Some(&image_ref), false).await;
        if let Err(error) = result {
            let reason = format!(
                "{image} was pulled, but its record could not be written ({error}); the image stays protected and the pull is refused until the record is on disk"
            );
            let report = Report {
                rpc,
                pod: pull.pod,
                image: &image,
                image_id: &image_ref,
                outcome: Outcome::Unavailable,
                reason: &reason,
                failure: None,
            };
            if let Some(refusal) = self.refuse(u32::from(Code::Unavailable as u8), report) {
                return refusal;
            }
        }
        if brought {
            self.report(&Report {
                rpc,
                pod: pull.pod,
                image: &image,
                image_id: &image_ref,
                outcome: Outcome::Pulled,
                reason: if pull.credential.is_some() {
                    "pulled by the runtime with the pod's credentials"
                } else {
                    "pulled by the runtime without credentials: public"
                },
                failure: None,
            });
            return buffered.into_response();
        }
        match self.admit(rpc, &pulled, &image, pull, false).await {
            Ok(admitted) => {
                let (outcome, reason) = match admitted {
                    Admitted::Verified(outcome) => (
                        outcome,
                        "the pull yielded an image already on the node; pull credentials verified against its own repositories",
                    ),
                    _ => (
                        Outcome::Allowed,
                        "the pull yielded an image already on the node; no verification required",
                    ),
                };
                self.report(&Report {
                    rpc,
                    pod: pull.pod,
                    image: &image,
                    image_id: &image_ref,
                    outcome,
                    reason,
                    failure: None,
                });
                buffered.into_response()
            }
            Err(refusal) => {
                let reason = format!(
                    "{reference} is a name for cached image {image_ref}, which the runtime already held: the pull proves nothing. {}",
                    refusal.reason
                );
                let report = Report {
                    rpc,
                    pod: pull.pod,
                    image: &image,
                    image_id: &image_ref,
                    outcome: refusal.outcome,
                    reason: &reason,
                    failure: refusal.failure,
                };
                self.refuse(refusal.code, report)
                    .unwrap_or_else(|| buffered.into_response())
            }
        }
    }

    /// Ends a pull intent (see [`RecordStore::end_pull`]; `abandon`: see
    /// [`RecordStore::abandon_pull`]) on the blocking pool.
    async fn end_intent(
        &self,
        intent: Option<crate::records::PullIntent>,
        image_id: Option<&str>,
        abandon: bool,
    ) {
        let Some(intent) = intent else { return };
        let records = Arc::clone(&self.records);
        let image_id = image_id.map(str::to_owned);
        let _ = blocking(move || {
            if abandon {
                records.abandon_pull(intent);
            } else {
                records.end_pull(intent, image_id.as_deref());
            }
            Ok(())
        })
        .await;
    }

    /// Records how a pull brought a new image: with the pod's credentials
    /// (private) or without (public), from the repository pulled.
    async fn record_pulled(&self, image_id: &str, pull: &Pull<'_>) -> Result<(), RecordError> {
        let now = unix(SystemTime::now());
        let credential_id = self.records.credential_id(pull.credential);
        let provenance = if pull.credential.is_some() {
            Provenance::Credentials
        } else {
            Provenance::Anonymous
        };
        let repository = pull.reference.name();
        self.record(image_id, provenance, |r| {
            if provenance == Provenance::Anonymous {
                // Pulled without credentials: anyone may use it.
                r.provenance = Provenance::Anonymous;
            }
            r.repositories.insert(repository);
            r.verified.insert(credential_id.clone(), now);
            if let Some(pod) = pull.pod.filter(|p| !p.uid.is_empty()) {
                r.grants.insert(
                    pod.uid.clone(),
                    Grant {
                        credential: credential_id.clone(),
                        verified_at: now,
                    },
                );
            }
            true
        })
        .await
    }

    /// The pod the runtime ran `sandbox_id` for (`None`: a sandbox without
    /// pod metadata), remembered once asked. The request's own
    /// `sandbox_config` is only a claim: any CRI caller can write any pod
    /// there.
    async fn sandbox_pod(
        &self,
        upstream: &Upstream,
        sandbox_id: &str,
    ) -> Result<Option<PodRef>, Refusal> {
        if sandbox_id.is_empty() {
            return Err(Refusal::new(
                Code::InvalidArgument,
                Outcome::Denied,
                "CreateContainer names no pod sandbox".to_owned(),
            ));
        }
        if let Some(pod) = lock(&self.sandboxes).get(sandbox_id) {
            return Ok(pod.clone());
        }
        let answer: Result<PodSandboxStatusResponse, UpstreamError> = upstream
            .unary(
                POD_SANDBOX_STATUS,
                &PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox_id.to_owned(),
                    verbose: false,
                },
            )
            .await;
        let status = match answer {
            Ok(answer) => answer.status,
            Err(UpstreamError::Status { status: 5, .. }) => {
                return Err(Refusal::new(
                    Code::NotFound,
                    Outcome::Denied,
                    format!("pod sandbox {sandbox_id:?} is not known to the runtime"),
                ));
            }
            Err(error) => return Err(Refusal::upstream(&error)),
        };
        let Some(status) = status else {
            return Err(Refusal::new(
                Code::Internal,
                Outcome::Unavailable,
                format!("the runtime's PodSandboxStatus answer for {sandbox_id:?} has no status"),
            )
            .failed(Failure::MalformedAnswer));
        };
        // A prefix the runtime expands could name another sandbox by the
        // time it creates the container.
        if status.id != sandbox_id {
            return Err(Refusal::new(
                Code::InvalidArgument,
                Outcome::Denied,
                format!(
                    "pod sandbox {sandbox_id:?} must be named by its full id ({:?})",
                    status.id
                ),
            ));
        }
        let pod = pod_ref_of(status.metadata.as_ref());
        let mut sandboxes = lock(&self.sandboxes);
        if sandboxes.len() >= MAX_REMEMBERED_SANDBOXES {
            sandboxes.clear();
        }
        sandboxes.insert(sandbox_id.to_owned(), pod.clone());
        Ok(pod)
    }

    /// Whether the runtime may restore checkpoints through
    /// `CreateContainer`, from its `Version` and `Status{verbose}`: asked
    /// once; while it can not be asked, assumed possible.
    async fn restore_via_create(&self, upstream: &Upstream) -> (Restore, String) {
        let asked = self
            .restore
            .get_or_try_init(|| async {
                let version: VersionResponse =
                    upstream.unary(VERSION, &VersionRequest::default()).await?;
                let status: StatusResponse = upstream
                    .unary(STATUS, &StatusRequest { verbose: true })
                    .await?;
                let restore = decide::restore_via_create(&version, &status.info);
                tracing::info!(
                    runtime = version.runtime_name,
                    version = version.runtime_version,
                    ?restore,
                    "whether the runtime restores checkpoints through CreateContainer"
                );
                Ok::<_, UpstreamError>((restore, version.runtime_name))
            })
            .await;
        match asked {
            Ok(known) => known.clone(),
            Err(error) => (
                Restore::Possible(format!(
                    "the runtime's configuration could not be read ({error})"
                )),
                String::new(),
            ),
        }
    }

    async fn create_container(
        &self,
        call: InspectedCall,
        upstream: &Upstream,
    ) -> Response<ProxyBody> {
        let rpc = call.rpc;
        let request = match CreateContainerRequest::decode(call.message.clone()) {
            Ok(r) => r,
            Err(e) => return self.undecodable(rpc, &e),
        };
        let claimed_pod = pod_ref(request.sandbox_config.as_ref());
        let uses = match image_uses(&request) {
            Ok(uses) => uses,
            Err(reason) => {
                return self.bad_request(
                    rpc,
                    claimed_pod.as_ref(),
                    "",
                    Failure::InvalidRequest,
                    Code::InvalidArgument,
                    &format!("credlet: {reason}"),
                );
            }
        };
        let first = uses[0].spec.image.clone();
        // The kubelet always sends the sandbox's config (runtimes need it;
        // containerd 1.6 fails without it), and the pod it names must be
        // the one the runtime ran the sandbox for.
        let Some(claimed) = request
            .sandbox_config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
        else {
            return self.bad_request(
                rpc,
                None,
                &first,
                Failure::InvalidRequest,
                Code::InvalidArgument,
                "credlet: CreateContainer carries no sandbox_config with the pod's metadata",
            );
        };
        let pod = match self.sandbox_pod(upstream, &request.pod_sandbox_id).await {
            Ok(pod) => pod,
            Err(refusal) => {
                let report = Report {
                    rpc,
                    pod: claimed_pod.as_ref(),
                    image: &first,
                    image_id: "",
                    outcome: refusal.outcome,
                    reason: &refusal.reason,
                    failure: refusal.failure,
                };
                return self.deny(call, upstream, refusal.code, report).await;
            }
        };
        if pod != claimed_pod {
            let reason = format!(
                "the request's sandbox_config names pod {}/{} (uid {:?}), but the runtime ran sandbox {} for {}",
                claimed.namespace,
                claimed.name,
                claimed.uid,
                request.pod_sandbox_id,
                pod.as_ref().map_or_else(
                    || "no pod".to_owned(),
                    |p| format!("{} (uid {:?})", describe(Some(p)), p.uid)
                ),
            );
            let report = Report {
                rpc,
                pod: pod.as_ref(),
                image: &first,
                image_id: "",
                outcome: Outcome::Denied,
                reason: &reason,
                failure: None,
            };
            return self
                .deny(
                    call,
                    upstream,
                    u32::from(Code::InvalidArgument as u8),
                    report,
                )
                .await;
        }
        let (restore, runtime) = self.restore_via_create(upstream).await;
        let mut identity = match &pod {
            Some(pod) => Some(self.identity(pod, false).await),
            None => None,
        };
        let mut judged = self
            .judge_uses(
                upstream,
                &uses,
                pod.as_ref(),
                identity.as_ref(),
                &restore,
                &runtime,
            )
            .await;
        // A pod that relies on its verification and that the index does
        // not list yet: give the index a moment, then judge again.
        if let (Some(p), Err((_, _, refusal))) = (&pod, &judged)
            && refusal.waits_for_index
        {
            identity = Some(self.identity(p, true).await);
            judged = self
                .judge_uses(
                    upstream,
                    &uses,
                    pod.as_ref(),
                    identity.as_ref(),
                    &restore,
                    &runtime,
                )
                .await;
        }
        match judged {
            Ok(allowed) => {
                for (image_use, (image_id, reason)) in uses.iter().zip(&allowed) {
                    self.report(&Report {
                        rpc,
                        pod: pod.as_ref(),
                        image: &image_use.spec.image,
                        image_id,
                        outcome: Outcome::Allowed,
                        reason,
                        failure: None,
                    });
                }
                self.forward(call, upstream, pod.as_ref(), &first).await
            }
            Err((image, image_id, refusal)) => {
                let report = Report {
                    rpc,
                    pod: pod.as_ref(),
                    image: &image,
                    image_id: &image_id,
                    outcome: refusal.refusal.outcome,
                    reason: &refusal.refusal.reason,
                    failure: refusal.refusal.failure,
                };
                self.deny(call, upstream, refusal.refusal.code, report)
                    .await
            }
        }
    }

    /// Judges every image a container uses: each one's image id and why it
    /// is allowed, or the first refusal (image, image id when known, why).
    async fn judge_uses(
        &self,
        upstream: &Upstream,
        uses: &[ImageUse],
        pod: Option<&PodRef>,
        identity: Option<&Identity>,
        restore: &Restore,
        runtime: &str,
    ) -> Result<Vec<(String, &'static str)>, (String, String, UseRefusal)> {
        let mut allowed = Vec::with_capacity(uses.len());
        for image_use in uses {
            match self
                .judge_use(upstream, image_use, pod, identity, restore, runtime)
                .await
            {
                Ok(ok) => allowed.push(ok),
                Err((image_id, refusal)) => {
                    return Err((image_use.spec.image.clone(), image_id, refusal));
                }
            }
        }
        Ok(allowed)
    }

    /// Decides one image a container uses: `Ok((image id, why allowed))`,
    /// or the refusal (with the image id when known).
    async fn judge_use(
        &self,
        upstream: &Upstream,
        image_use: &ImageUse,
        pod: Option<&PodRef>,
        identity: Option<&Identity>,
        restore: &Restore,
        runtime: &str,
    ) -> Result<(String, &'static str), (String, UseRefusal)> {
        let requested = &image_use.spec.image;
        let refused = |image_id: &str, refusal: Refusal| {
            Err((
                image_id.to_owned(),
                UseRefusal {
                    refusal,
                    waits_for_index: false,
                },
            ))
        };
        let status: ImageStatusResponse = match upstream
            .unary(
                IMAGE_STATUS,
                &ImageStatusRequest {
                    image: Some(image_use.spec.clone()),
                    verbose: false,
                },
            )
            .await
        {
            Ok(status) => status,
            Err(error) => return refused("", Refusal::upstream(&error)),
        };
        let Some(image) = status.image else {
            // The runtime would not find it either, unless it arrives in
            // between: nothing unjudged reaches it.
            return refused(
                "",
                Refusal::new(
                    Code::NotFound,
                    Outcome::Denied,
                    format!(
                        "image {requested:?}{} is not on the node",
                        image_use.suffix()
                    ),
                ),
            );
        };
        // A restore runs the image its checkpoint names, not this one.
        if image_use.mount.is_none()
            && let Restore::Possible(why) = restore
        {
            let annotations = match self.manifest_annotations(upstream, &image, runtime).await {
                Ok(annotations) => annotations,
                Err(error) => {
                    return refused(
                        &image.id,
                        Refusal::new(
                            Code::Unavailable,
                            Outcome::Unavailable,
                            format!(
                                "cannot tell whether image {requested:?} is a checkpoint, which the runtime would restore ({why}): {error}"
                            ),
                        )
                        .failed(Failure::of_upstream(&error)),
                    );
                }
            };
            let spec = image.spec.as_ref().map(|s| &s.annotations);
            let shown: Vec<&HashMap<String, String>> =
                spec.into_iter().chain(annotations.as_ref()).collect();
            if let Some(checkpoint) = decide::checkpoint(requested, &shown) {
                return refused(
                    &image.id,
                    Refusal::new(
                        Code::FailedPrecondition,
                        Outcome::Denied,
                        format!(
                            "{checkpoint}; restoring checkpoints through CreateContainer is refused by the image guard ({why})"
                        ),
                    ),
                );
            }
        }
        let names = names_of(&image);
        let now = SystemTime::now();
        let provenance = self.provenance(&image, &names, now).await;
        let verified = pod.is_some_and(|p| self.has_grant(&image.id, &p.uid, now));
        let facts = pod.zip(identity).map(|(p, identity)| Pod {
            namespace: &p.namespace,
            identity,
        });
        match decide::judge(&self.policy, facts, &names, provenance, verified) {
            Decision::NotRequired => Ok((image.id, "no verification required")),
            Decision::Verified => Ok((image.id, "pod holds a verification")),
            Decision::Refused(refusal) => {
                let name = resolve(requested, &image)
                    .reference
                    .map_or_else(|| requested.clone(), |r| r.to_string());
                let suffix = image_use.suffix();
                let reason = match (&refusal, pod) {
                    (decide::Refusal::Unconfirmed(why), Some(p)) => format!(
                        "the sandbox claims pod {}/{} (uid {:?}), which holds a verification of cached image {name}{suffix} only if it is that pod, and {why}",
                        p.namespace, p.name, p.uid
                    ),
                    _ => format!(
                        "{} {refusal} for cached image {name}{suffix}",
                        describe(pod)
                    ),
                };
                let waits_for_index = matches!(
                    refusal,
                    decide::Refusal::Unconfirmed(Unconfirmed::Missing { .. })
                );
                Err((
                    image.id,
                    UseRefusal {
                        refusal: Refusal::judged(&refusal, reason),
                        waits_for_index,
                    },
                ))
            }
        }
    }

    /// The annotations of an image's index or manifest, where the runtime
    /// shows them outside CRI (containerd's own API on the same socket);
    /// `None` for runtimes that show them in CRI's `Image.spec`.
    async fn manifest_annotations(
        &self,
        upstream: &Upstream,
        image: &Image,
        runtime: &str,
    ) -> Result<Option<HashMap<String, String>>, UpstreamError> {
        if runtime != "containerd" {
            return Ok(None);
        }
        // CRI records each image under its id too; failing that, any of
        // its names. An image containerd knows by none of them is one it
        // could not restore either.
        for name in std::iter::once(&image.id)
            .chain(&image.repo_digests)
            .chain(&image.repo_tags)
        {
            match containerd_manifest_annotations(upstream, name).await {
                Err(UpstreamError::Status { status: 5, .. }) => continue,
                other => return other.map(Some),
            }
        }
        Ok(Some(HashMap::new()))
    }
}

/// A refused image use, and whether the pod index may yet confirm the pod.
#[derive(Debug)]
struct UseRefusal {
    refusal: Refusal,
    waits_for_index: bool,
}

/// A pull: what, with which credential, for which pod (as the request's
/// sandbox config names it).
struct Pull<'a> {
    reference: &'a ImageRef,
    credential: Option<&'a Credential>,
    pod: Option<&'a PodRef>,
}

enum Unverified {
    Pod(PodRef),
    PodsUnknown,
}

/// containerd's images and content API, as far as the guard reads it (the
/// messages of `containerd/api/services/{images,content}/v1`, fields the
/// guard needs only).
mod containerd_api {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct GetImageRequest {
        #[prost(string, tag = "1")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct GetImageResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Image {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "3")]
        pub target: Option<Descriptor>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Descriptor {
        #[prost(string, tag = "1")]
        pub media_type: String,
        #[prost(string, tag = "2")]
        pub digest: String,
        #[prost(int64, tag = "3")]
        pub size: i64,
        #[prost(map = "string, string", tag = "5")]
        pub annotations: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ReadContentRequest {
        #[prost(string, tag = "1")]
        pub digest: String,
        #[prost(int64, tag = "2")]
        pub offset: i64,
        #[prost(int64, tag = "3")]
        pub size: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ReadContentResponse {
        #[prost(int64, tag = "1")]
        pub offset: i64,
        #[prost(bytes = "vec", tag = "2")]
        pub data: Vec<u8>,
    }
}

/// Largest index or manifest read to find its annotations.
const MAX_MANIFEST: i64 = 4 << 20;

/// The annotations of the index or manifest a containerd image (by its
/// CRI id, which CRI also records as an image name) points at, read as
/// containerd does when it decides to restore: top-level `annotations`.
/// Through `upstream`, containerd's socket (its own API beside CRI).
pub async fn containerd_manifest_annotations(
    upstream: &Upstream,
    image_id: &str,
) -> Result<HashMap<String, String>, UpstreamError> {
    let namespace = [("containerd-namespace", CONTAINERD_CRI_NAMESPACE)];
    let answer: containerd_api::GetImageResponse = upstream
        .unary_with(
            CONTAINERD_IMAGES_GET,
            &containerd_api::GetImageRequest {
                name: image_id.to_owned(),
            },
            &namespace,
        )
        .await?;
    let Some(target) = answer.image.and_then(|i| i.target) else {
        return Ok(HashMap::new());
    };
    if target.size > MAX_MANIFEST {
        return Err(UpstreamError::Malformed {
            path: CONTAINERD_CONTENT_READ,
            reason: format!(
                "{} is {} bytes, more than a manifest",
                target.digest, target.size
            ),
        });
    }
    let chunks: Vec<containerd_api::ReadContentResponse> = upstream
        .server_stream(
            CONTAINERD_CONTENT_READ,
            &containerd_api::ReadContentRequest {
                digest: target.digest.clone(),
                offset: 0,
                size: 0,
            },
            &namespace,
        )
        .await?;
    let mut body = Vec::new();
    for chunk in chunks {
        body.extend_from_slice(&chunk.data);
    }
    Ok(decide::manifest_annotations(&body))
}

/// Runs blocking file I/O of the records on the blocking pool, off the
/// async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RecordError> + Send + 'static,
) -> Result<T, RecordError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|error| {
            Err(RecordError::Io {
                op: "write (the writer task failed)",
                path: std::path::PathBuf::new(),
                source: std::io::Error::other(error.to_string()),
            })
        })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// "pod ns/name", or "the pod" when the call named none.
fn describe(pod: Option<&PodRef>) -> String {
    pod.map_or_else(
        || "the pod".to_owned(),
        |p| format!("pod {}/{}", p.namespace, p.name),
    )
}

/// Repositories for a message.
fn list(repositories: &BTreeSet<String>) -> String {
    if repositories.is_empty() {
        return "no repository".to_owned();
    }
    repositories
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `namespace/name` of a pod for a log line, or nothing.
fn pod_label(pod: Option<&PodRef>) -> String {
    pod.map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_default()
}

/// The pod and image an inspected request names, as far as it decodes: for
/// the log line of a call that failed before the guard read it.
fn subject_of(rpc: Rpc, message: &[u8]) -> (Option<PodRef>, String) {
    match rpc {
        Rpc::ImageStatus => (
            None,
            ImageStatusRequest::decode(message)
                .ok()
                .and_then(|r| r.image)
                .map(|i| i.image)
                .unwrap_or_default(),
        ),
        Rpc::PullImage => PullImageRequest::decode(message)
            .map(|r| {
                (
                    pod_ref(r.sandbox_config.as_ref()),
                    r.image.map(|i| i.image).unwrap_or_default(),
                )
            })
            .unwrap_or_default(),
        Rpc::CreateContainer => CreateContainerRequest::decode(message)
            .map(|r| {
                (
                    pod_ref(r.sandbox_config.as_ref()),
                    r.config
                        .and_then(|c| c.image)
                        .map(|i| i.image)
                        .unwrap_or_default(),
                )
            })
            .unwrap_or_default(),
    }
}

fn pod_ref(config: Option<&PodSandboxConfig>) -> Option<PodRef> {
    pod_ref_of(config?.metadata.as_ref())
}

/// The pod sandbox metadata names (a uid may be empty: such a sandbox is
/// still of its namespace, and holds no verification).
fn pod_ref_of(metadata: Option<&credlet_proto::cri::PodSandboxMetadata>) -> Option<PodRef> {
    let m = metadata?;
    Some(PodRef {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        uid: m.uid.clone(),
    })
}

impl Inspector for ImageGuard {
    fn inspect<'a>(
        &'a self,
        call: InspectedCall,
        upstream: &'a Upstream,
    ) -> BoxFuture<'a, Response<ProxyBody>> {
        Box::pin(async move {
            match call.rpc {
                Rpc::ImageStatus => self.image_status(call, upstream).await,
                Rpc::PullImage => self.pull_image(call, upstream).await,
                Rpc::CreateContainer => self.create_container(call, upstream).await,
            }
        })
    }

    fn failed(&self, failure: &CallFailure<'_>) {
        let (pod, image) = failure
            .message
            .map(|m| subject_of(failure.rpc, m))
            .unwrap_or_default();
        self.note_failure(
            failure.rpc,
            pod.as_ref(),
            &image,
            failure.failure,
            failure.detail,
        );
    }
}

#[cfg(test)]
mod tests {
    use credlet_proto::cri::{ContainerConfig, Mount};

    use super::*;

    fn spec(image: &str) -> Option<ImageSpec> {
        Some(ImageSpec {
            image: image.into(),
            ..ImageSpec::default()
        })
    }

    fn mount(path: &str, image: Option<ImageSpec>) -> Mount {
        Mount {
            container_path: path.into(),
            image,
        }
    }

    #[test]
    fn every_image_a_container_uses_is_judged() {
        let request = |image: Option<ImageSpec>, mounts: Vec<Mount>| CreateContainerRequest {
            config: Some(ContainerConfig {
                image,
                mounts,
                ..ContainerConfig::default()
            }),
            ..CreateContainerRequest::default()
        };
        // The images judged (image, mount point), or the refusal's words.
        type Judged<'a> = Result<Vec<(&'a str, Option<&'a str>)>, &'a str>;
        let table: Vec<(CreateContainerRequest, Judged<'_>)> = vec![
            (request(spec("app"), vec![]), Ok(vec![("app", None)])),
            (
                request(
                    spec("app"),
                    vec![
                        mount("/data", None),
                        mount("/v", spec("sha256:abc")),
                        mount("/w", spec("private:v1")),
                    ],
                ),
                Ok(vec![
                    ("app", None),
                    ("sha256:abc", Some("/v")),
                    ("private:v1", Some("/w")),
                ]),
            ),
            (request(None, vec![]), Err("names no image")),
            (request(spec(""), vec![]), Err("names no image")),
            (
                request(spec("app"), vec![mount("/v", spec(""))]),
                Err("image volume at \"/v\" names no image"),
            ),
            (
                CreateContainerRequest::default(),
                Err("no container config"),
            ),
        ];
        for (request, want) in table {
            let got = image_uses(&request).map(|uses| {
                uses.into_iter()
                    .map(|u| (u.spec.image, u.mount))
                    .collect::<Vec<_>>()
            });
            match (got, want) {
                (Ok(got), Ok(want)) => {
                    let got: Vec<(&str, Option<&str>)> = got
                        .iter()
                        .map(|(i, m)| (i.as_str(), m.as_deref()))
                        .collect();
                    assert_eq!(got, want);
                }
                (Err(got), Err(want)) => assert!(got.contains(want), "{got:?} lacks {want:?}"),
                (got, want) => panic!("{got:?} but wanted {want:?}"),
            }
        }
    }

    #[test]
    fn pods_come_from_sandbox_metadata() {
        use credlet_proto::cri::PodSandboxMetadata;
        let meta = |uid: &str| PodSandboxMetadata {
            name: "p".into(),
            namespace: "ns".into(),
            uid: uid.into(),
            attempt: 0,
        };
        assert_eq!(
            pod_ref_of(Some(&meta("u1"))).map(|p| p.uid),
            Some("u1".into())
        );
        // Without a uid still of its namespace (its policy applies).
        assert_eq!(
            pod_ref_of(Some(&meta(""))).map(|p| (p.namespace, p.uid)),
            Some(("ns".into(), String::new()))
        );
        assert_eq!(pod_ref_of(None), None);
    }
}
