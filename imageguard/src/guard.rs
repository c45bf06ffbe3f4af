//! The decisions: which inspected CRI calls pass, which are answered by
//! credlet, which are refused.
//!
//! - `ImageStatus`: a protected image is reported absent while a pod on this
//!   node that uses it (in a container or as an image volume) holds no valid
//!   verification — the kubelet then calls `PullImage` with that pod's
//!   credentials (`IfNotPresent`) or reports `ErrImageNeverPull` (`Never`).
//! - `PullImage` of a cached image: the pod's credentials are checked with
//!   one manifest HEAD (or a cached positive result within the TTL) and the
//!   existing image is returned, nothing downloaded. A pull of an absent
//!   image goes to the runtime, and credlet records how it was pulled —
//!   on disk before the pull is answered with success.
//! - `CreateContainer`: the last gate, for every image the container uses
//!   (`config.image` and every image volume, `mounts[].image`), for the pod
//!   the runtime ran the sandbox for.
//!
//! Every decision is about the image the runtime resolved a request to, by
//! that image's own names (see [`crate::resolve`]). Anything credlet can
//! not establish (runtime or registry unreachable, undecodable requests or
//! answers, a record it can not write) denies: the guard fails closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use credlet_proto::cri::{
    CreateContainerRequest, Image, ImageSpec, ImageStatusRequest, ImageStatusResponse,
    PodSandboxConfig, PodSandboxStatusRequest, PodSandboxStatusResponse, PullImageRequest,
    PullImageResponse,
};
use http::Response;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;

use crate::credential::Credential;
use crate::events::{EventSink, PodRef};
use crate::grpc::{self, Code, ProxyBody};
use crate::pods::{PodIndex, PullPolicy};
use crate::policy::{GuardPolicy, Mode, Provenance};
use crate::proxy::{
    BoxFuture, IMAGE_STATUS, InspectedCall, Inspector, POD_SANDBOX_STATUS, Rpc, Upstream,
    UpstreamError,
};
use crate::records::{Grant, RecordError, RecordStore, Stored, unix};
use crate::reference::ImageRef;
use crate::registry::{Access, Verifier};
use crate::resolve::{Resolved, manifest_digest, refers_to, resolve};

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
}

impl GuardMetrics {
    /// Registers under `credlet_imageguard_`.
    pub fn register(&self, registry: &mut Registry) {
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
struct Decision<'a> {
    rpc: Rpc,
    pod: Option<&'a PodRef>,
    image: &'a str,
    image_id: &'a str,
    outcome: Outcome,
    reason: &'a str,
}

/// Why a call is refused, and with which gRPC code.
struct Refusal {
    code: Code,
    outcome: Outcome,
    reason: String,
}

impl Refusal {
    fn new(code: Code, outcome: Outcome, reason: String) -> Self {
        Self {
            code,
            outcome,
            reason,
        }
    }

    /// The runtime could not be asked: `Unavailable`.
    fn upstream(error: &UpstreamError) -> Self {
        Self::new(Code::Unavailable, Outcome::Unavailable, error.to_string())
    }
}

/// One image a `CreateContainer` uses.
struct ImageUse {
    /// What the caller asked for.
    spec: ImageSpec,
    /// Where: `None` for the container's own image, else the image
    /// volume's mount point.
    mount: Option<String>,
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
fn image_uses(request: &CreateContainerRequest) -> Result<Vec<ImageUse>, String> {
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

    fn report(&self, d: &Decision<'_>) {
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                rpc: d.rpc.into(),
                outcome: d.outcome,
            })
            .inc();
        let pod = d
            .pod
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_default();
        let policy = d.pod.map_or(self.policy.default, |p| {
            self.policy.for_namespace(&p.namespace)
        });
        match d.outcome {
            Outcome::Denied | Outcome::AuditDenied | Outcome::Unavailable | Outcome::Hidden => {
                tracing::warn!(rpc = ?d.rpc, pod, image = d.image, image_id = d.image_id, %policy, outcome = ?d.outcome, reason = d.reason, "image guard decision");
            }
            _ => {
                tracing::info!(rpc = ?d.rpc, pod, image = d.image, image_id = d.image_id, %policy, outcome = ?d.outcome, reason = d.reason, "image guard decision");
            }
        }
        if let Some(pod) = d.pod {
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

    /// Whether the pod holds a valid verification of the image.
    fn has_grant(&self, image_id: &str, pod_uid: &str, now: SystemTime) -> bool {
        self.records.with(image_id, |r| {
            r.and_then(|r| r.valid_grant(pod_uid, self.policy.ttl, now))
                .is_some()
        })
    }

    /// Finishes a record update: pending changes get written behind. An
    /// error means a new record is not on disk: the caller must not answer
    /// with success.
    fn remember(&self, result: Result<Stored, RecordError>) -> Result<(), RecordError> {
        match result? {
            Stored::Deferred => self.records.schedule_flush(),
            Stored::Created | Stored::Unchanged => {}
        }
        Ok(())
    }

    /// How the image came to the node, as far as it decides a call at
    /// `now`: `None` (preloaded: credlet never saw it pulled), private, or
    /// public while its last anonymous success is within the TTL.
    ///
    /// An image with no record that a pull of an earlier run produced
    /// (a stale pull intent) is private. A public answer past the TTL is
    /// checked again anonymously (one manifest HEAD): still public, or
    /// private from then on; if it can not be checked, private for this
    /// call.
    async fn provenance(
        &self,
        image: &Image,
        resolved: &Resolved,
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
            None => (self.records.has_stale_intents()
                && self.records.claim_stale_intent(&image.id, &resolved.names))
            .then_some(Provenance::Credentials),
            Some((provenance, false)) => Some(provenance),
            Some((_, true)) => Some(self.check_still_public(image, resolved).await),
        }
    }

    /// Asks the registry again whether an image once pulled or checked
    /// anonymously is still public, and records the answer.
    async fn check_still_public(&self, image: &Image, resolved: &Resolved) -> Provenance {
        let Some(reference) = resolved.reference.as_ref() else {
            return Provenance::Credentials;
        };
        let Some(digest) = manifest_digest(reference, image) else {
            return Provenance::Credentials;
        };
        self.metrics.registry_checks.inc();
        let anonymous = self.records.credential_id(None);
        let (provenance, reason) = match self.verifier.check(reference, &digest, None).await {
            Ok(Access::Granted) => (Provenance::Anonymous, "still public".to_owned()),
            Ok(Access::Denied { reason }) => (Provenance::Credentials, reason),
            // Not recorded: an outage must not make a public image private
            // for good, nor a private one public.
            Err(error) => {
                tracing::warn!(image = %reference, %error, "cannot check again whether a public image still is; private until it can be");
                return Provenance::Credentials;
            }
        };
        let now = unix(SystemTime::now());
        let result = self.records.update(&image.id, provenance, |r| {
            r.provenance = provenance;
            if provenance == Provenance::Anonymous {
                r.verified.insert(anonymous.clone(), now);
            } else {
                r.verified.remove(&anonymous);
            }
            true
        });
        if let Err(error) = self.remember(result) {
            tracing::error!(%error, "writing image record");
        }
        tracing::info!(image = %reference, image_id = image.id, public = provenance == Provenance::Anonymous, reason, "public answer past its TTL checked again");
        provenance
    }

    /// A pod on this node that uses the image the runtime resolved
    /// `requested` to but holds no verification, when the policy demands
    /// one.
    async fn unverified_user(
        &self,
        requested: &str,
        image: &Image,
        resolved: &Resolved,
        now: SystemTime,
    ) -> Option<Unverified> {
        if !self.pods.is_synced() {
            // Which pods use the image is unknown: hide anything that could
            // be protected until the pod list is in.
            let provenance = self.provenance(image, resolved, now).await;
            let names = &resolved.names;
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
        let provenance = self.provenance(image, resolved, now).await;
        users
            .into_iter()
            .find(|pod| {
                self.policy
                    .requires_verification(&pod.namespace, &resolved.names, provenance)
                    && !self.has_grant(&image.id, &pod.uid, now)
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
            Err(e) => return invalid(rpc, &e),
        };
        let requested = request.image.map(|i| i.image).unwrap_or_default();
        let buffered = match upstream.forward_buffered(call.parts, call.body).await {
            Ok(b) => b,
            Err(e) => return e.to_response(),
        };
        if buffered.grpc_status() != Some(0) {
            return buffered.into_response();
        }
        let status = match grpc::unary_message(&buffered.body)
            .map_err(|e| e.to_string())
            .and_then(|m| ImageStatusResponse::decode(m).map_err(|e| e.to_string()))
        {
            Ok(status) => status,
            Err(reason) => {
                return grpc::error_response(
                    Code::Internal,
                    &format!("credlet could not read the runtime's ImageStatus answer: {reason}"),
                );
            }
        };
        let Some(image) = status.image else {
            return buffered.into_response();
        };
        let resolved = resolve(&requested, &image);
        match self
            .unverified_user(&requested, &image, &resolved, SystemTime::now())
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
                self.report(&Decision {
                    rpc,
                    pod,
                    image: &requested,
                    image_id: &image.id,
                    outcome,
                    reason: &reason,
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
            Err(e) => return invalid(rpc, &e),
        };
        let requested = request
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let asked_for = match ImageRef::parse(&requested) {
            Ok(r) => r,
            Err(e) => {
                return grpc::error_response(
                    Code::InvalidArgument,
                    &format!("credlet: image reference {requested:?} is invalid: {e}"),
                );
            }
        };
        let pod = pod_ref(request.sandbox_config.as_ref());
        let credential = match request.auth.as_ref().map(Credential::from_auth_config) {
            None => None,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return grpc::error_response(
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
            Err(e) => return e.to_response(),
        };
        let Some(image) = status.image else {
            return self
                .forward_pull(
                    call,
                    upstream,
                    &asked_for,
                    credential.as_ref(),
                    pod.as_ref(),
                )
                .await;
        };
        // The image the runtime resolved the request to, by its own names:
        // a short image id is not a tag of `docker.io/library/sha256`.
        let resolved = resolve(&requested, &image);
        let reference = resolved.reference.clone().unwrap_or(asked_for);
        let now = SystemTime::now();
        let namespace = pod.as_ref().map_or("", |p| p.namespace.as_str());
        let provenance = self.provenance(&image, &resolved, now).await;
        if !self
            .policy
            .requires_verification(namespace, &resolved.names, provenance)
        {
            // This pod may use the cached image as it is. The kubelet asks
            // because ImageStatus hid the image for another pod (or its own
            // re-pull check): answer with the cached image, as a forwarded
            // pull would need credentials the pod need not have. Only a pod
            // that wants its tag resolved again (`Always`), or a pull naming
            // no pod, goes to the runtime.
            if pod.is_none() || self.wants_fresh_tag(&reference, pod.as_ref()) {
                return self
                    .forward_pull(
                        call,
                        upstream,
                        &reference,
                        credential.as_ref(),
                        pod.as_ref(),
                    )
                    .await;
            }
            self.report(&Decision {
                rpc,
                pod: pod.as_ref(),
                image: &requested,
                image_id: &image.id,
                outcome: Outcome::Allowed,
                reason: "no verification required; the cached image is returned",
            });
            return grpc::ok_response(&PullImageResponse {
                image_ref: image.id.clone(),
            });
        }
        let credential_id = self.records.credential_id(credential.as_ref());
        // When the registry last proved this credential, if within the TTL.
        // A cached answer keeps that time: it must not extend the TTL.
        let cached_at = self.records.with(&image.id, |r| {
            r.filter(|r| r.credential_verified(&credential_id, self.policy.ttl, now))
                .and_then(|r| r.verified.get(&credential_id).copied())
        });
        let verified_at = cached_at.unwrap_or_else(|| unix(now));
        let outcome = if cached_at.is_some() {
            Outcome::VerifiedCached
        } else {
            match self
                .check_access(&reference, &image, credential.as_ref(), pod.as_ref())
                .await
            {
                Ok(outcome) => outcome,
                Err(refusal) => {
                    let decision = Decision {
                        rpc,
                        pod: pod.as_ref(),
                        image: &requested,
                        image_id: &image.id,
                        outcome: refusal.outcome,
                        reason: &refusal.reason,
                    };
                    return self.deny(call, upstream, refusal.code, decision).await;
                }
            }
        };
        let public = credential.is_none();
        let result = self
            .records
            .update(&image.id, Provenance::Credentials, |r| {
                let mut changed = false;
                if public && r.provenance != Provenance::Anonymous {
                    r.provenance = Provenance::Anonymous;
                    changed = true;
                }
                changed |= r.repositories.insert(reference.name());
                let at = r.verified.entry(credential_id.clone()).or_insert(0);
                if *at < verified_at {
                    *at = verified_at;
                    changed = true;
                }
                if let Some(pod) = &pod {
                    let grant = Grant {
                        credential: credential_id.clone(),
                        verified_at,
                    };
                    changed |= r.grants.insert(pod.uid.clone(), grant.clone()) != Some(grant);
                }
                changed
            });
        // The verification must be on disk before it is relied on: a new
        // record lost in a crash would leave the image looking preloaded.
        if let Err(error) = self
            .remember(result)
            .and_then(|()| self.records.persist(&image.id))
        {
            let reason = unrecorded(&reference, &error);
            if let Some(refusal) =
                self.refuse_unrecorded(rpc, pod.as_ref(), &requested, &image.id, &reason)
            {
                return refusal;
            }
        }
        self.report(&Decision {
            rpc,
            pod: pod.as_ref(),
            image: &requested,
            image_id: &image.id,
            outcome,
            reason: "pull credentials verified for the cached image",
        });
        if self.wants_fresh_tag(&reference, pod.as_ref()) {
            // `imagePullPolicy: Always` on a tag: the runtime must resolve
            // the tag again (access is already proven), and the image it
            // may bring is recorded like any pulled one.
            return self
                .forward_pull(
                    call,
                    upstream,
                    &reference,
                    credential.as_ref(),
                    pod.as_ref(),
                )
                .await;
        }
        grpc::ok_response(&PullImageResponse {
            image_ref: image.id.clone(),
        })
    }

    /// Refuses a call whose record could not be written: `Unavailable`, so
    /// the kubelet retries once the disk is back. In audit mode the refusal
    /// is only reported (`None`: carry on).
    fn refuse_unrecorded(
        &self,
        rpc: Rpc,
        pod: Option<&PodRef>,
        image: &str,
        image_id: &str,
        reason: &str,
    ) -> Option<Response<ProxyBody>> {
        let outcome = if self.audit() {
            Outcome::AuditDenied
        } else {
            Outcome::Unavailable
        };
        self.report(&Decision {
            rpc,
            pod,
            image,
            image_id,
            outcome,
            reason,
        });
        (!self.audit())
            .then(|| grpc::error_response(Code::Unavailable, &format!("credlet: {reason}")))
    }

    /// Checks the pod's credential against the registry with one manifest
    /// HEAD on the cached image's digest.
    async fn check_access(
        &self,
        reference: &ImageRef,
        image: &Image,
        credential: Option<&Credential>,
        pod: Option<&PodRef>,
    ) -> Result<Outcome, Refusal> {
        let Some(digest) = manifest_digest(reference, image) else {
            return Err(Refusal {
                code: Code::FailedPrecondition,
                outcome: Outcome::Denied,
                reason: format!(
                    "cached image {reference} has no repository digest to check credentials against"
                ),
            });
        };
        self.metrics.registry_checks.inc();
        match self.verifier.check(reference, &digest, credential).await {
            Ok(Access::Granted) => Ok(Outcome::Verified),
            Ok(Access::Denied { reason }) => Err(Refusal {
                code: Code::PermissionDenied,
                outcome: Outcome::Denied,
                reason: format!(
                    "credentials of {} are not authorized for cached image {reference}: {reason}",
                    describe(pod)
                ),
            }),
            Err(error) => Err(Refusal {
                code: Code::Unavailable,
                outcome: Outcome::Unavailable,
                reason: format!(
                    "cannot verify pull credentials for cached image {reference}: {error}; refusing until the registry can be checked"
                ),
            }),
        }
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
        code: Code,
        decision: Decision<'_>,
    ) -> Response<ProxyBody> {
        let decision = Decision {
            outcome: if self.audit() {
                Outcome::AuditDenied
            } else {
                decision.outcome
            },
            ..decision
        };
        self.report(&decision);
        if self.audit() {
            return forward(call, upstream).await;
        }
        grpc::error_response(code, &format!("credlet: {}", decision.reason))
    }

    /// Sends a pull to the runtime and records how the image was pulled.
    ///
    /// A pull with credentials is announced on disk first (a pull intent):
    /// if even that can not be written, nothing is pulled. The image's
    /// record is on disk before the pull is answered with success;
    /// otherwise the pull is refused (the record stays in memory, the
    /// intent on disk, and the image protected).
    async fn forward_pull(
        &self,
        call: InspectedCall,
        upstream: &Upstream,
        reference: &ImageRef,
        credential: Option<&Credential>,
        pod: Option<&PodRef>,
    ) -> Response<ProxyBody> {
        let rpc = call.rpc;
        let intent = match credential.map(|_| self.records.begin_pull(reference)) {
            None => None,
            Some(Ok(intent)) => Some(intent),
            Some(Err(error)) => {
                let reason = format!(
                    "cannot record the pull of {reference} before it starts ({error}); refusing it, as the image would be on the node with no record and pass for preloaded"
                );
                if let Some(refusal) =
                    self.refuse_unrecorded(rpc, pod, &reference.to_string(), "", &reason)
                {
                    return refusal;
                }
                None
            }
        };
        let buffered = match upstream.forward_buffered(call.parts, call.body).await {
            Ok(b) => b,
            Err(e) => {
                // The runtime may still finish the pull: whatever it
                // brings stays private.
                if let Some(intent) = intent {
                    self.records.abandon_pull(intent);
                }
                return e.to_response();
            }
        };
        if buffered.grpc_status() != Some(0) {
            if let Some(intent) = intent {
                self.records.end_pull(intent, None);
            }
            return buffered.into_response();
        }
        let image_ref = match grpc::unary_message(&buffered.body)
            .map_err(|e| e.to_string())
            .and_then(|m| PullImageResponse::decode(m).map_err(|e| e.to_string()))
        {
            Ok(answer) if !answer.image_ref.is_empty() => answer.image_ref,
            answer => {
                if let Some(intent) = intent {
                    self.records.abandon_pull(intent);
                }
                let reason = answer.map_or_else(|e| e, |_| "no image ref".to_owned());
                return grpc::error_response(
                    Code::Internal,
                    &format!("credlet could not read the runtime's PullImage answer: {reason}"),
                );
            }
        };
        let now = unix(SystemTime::now());
        let credential_id = self.records.credential_id(credential);
        let provenance = if credential.is_some() {
            Provenance::Credentials
        } else {
            Provenance::Anonymous
        };
        let result = self.records.update(&image_ref, provenance, |r| {
            if provenance == Provenance::Anonymous {
                // Pulled without credentials: anyone may use it.
                r.provenance = Provenance::Anonymous;
            }
            r.repositories.insert(reference.name());
            r.verified.insert(credential_id.clone(), now);
            if let Some(pod) = pod {
                r.grants.insert(
                    pod.uid.clone(),
                    Grant {
                        credential: credential_id.clone(),
                        verified_at: now,
                    },
                );
            }
            true
        });
        let result = self
            .remember(result)
            .and_then(|()| self.records.persist(&image_ref));
        if let Some(intent) = intent {
            self.records.end_pull(intent, Some(&image_ref));
        }
        let image = reference.to_string();
        if let Err(error) = result {
            let reason = format!(
                "{image} was pulled, but its record could not be written ({error}); the image stays protected and the pull is refused until the record is on disk"
            );
            if let Some(refusal) = self.refuse_unrecorded(rpc, pod, &image, &image_ref, &reason) {
                return refusal;
            }
        }
        self.report(&Decision {
            rpc,
            pod,
            image: &image,
            image_id: &image_ref,
            outcome: Outcome::Pulled,
            reason: if credential.is_some() {
                "pulled by the runtime with the pod's credentials"
            } else {
                "pulled by the runtime without credentials: public"
            },
        });
        buffered.into_response()
    }

    /// The pod the runtime ran `sandbox_id` for (`None`: a sandbox without
    /// a pod uid), remembered once asked. The request's own
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
            ));
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

    async fn create_container(
        &self,
        call: InspectedCall,
        upstream: &Upstream,
    ) -> Response<ProxyBody> {
        let rpc = call.rpc;
        let request = match CreateContainerRequest::decode(call.message.clone()) {
            Ok(r) => r,
            Err(e) => return invalid(rpc, &e),
        };
        let uses = match image_uses(&request) {
            Ok(uses) => uses,
            Err(reason) => {
                return grpc::error_response(Code::InvalidArgument, &format!("credlet: {reason}"));
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
            return grpc::error_response(
                Code::InvalidArgument,
                "credlet: CreateContainer carries no sandbox_config with the pod's metadata",
            );
        };
        let claimed_pod = pod_ref_of(Some(claimed));
        let pod = match self.sandbox_pod(upstream, &request.pod_sandbox_id).await {
            Ok(pod) => pod,
            Err(refusal) => {
                let decision = Decision {
                    rpc,
                    pod: claimed_pod.as_ref(),
                    image: &first,
                    image_id: "",
                    outcome: refusal.outcome,
                    reason: &refusal.reason,
                };
                return self.deny(call, upstream, refusal.code, decision).await;
            }
        };
        if pod.as_ref().map_or("", |p| p.uid.as_str()) != claimed.uid {
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
            let decision = Decision {
                rpc,
                pod: pod.as_ref(),
                image: &first,
                image_id: "",
                outcome: Outcome::Denied,
                reason: &reason,
            };
            return self
                .deny(call, upstream, Code::InvalidArgument, decision)
                .await;
        }
        let mut allowed = Vec::with_capacity(uses.len());
        for image_use in &uses {
            match self.judge_use(upstream, image_use, pod.as_ref()).await {
                Ok(ok) => allowed.push(ok),
                Err((image_id, refusal)) => {
                    let decision = Decision {
                        rpc,
                        pod: pod.as_ref(),
                        image: &image_use.spec.image,
                        image_id: &image_id,
                        outcome: refusal.outcome,
                        reason: &refusal.reason,
                    };
                    return self.deny(call, upstream, refusal.code, decision).await;
                }
            }
        }
        for (image_use, (image_id, reason)) in uses.iter().zip(&allowed) {
            self.report(&Decision {
                rpc,
                pod: pod.as_ref(),
                image: &image_use.spec.image,
                image_id,
                outcome: Outcome::Allowed,
                reason,
            });
        }
        forward(call, upstream).await
    }

    /// Decides one image a container uses: `Ok((image id, why allowed))`,
    /// or the refusal (with the image id when known).
    async fn judge_use(
        &self,
        upstream: &Upstream,
        image_use: &ImageUse,
        pod: Option<&PodRef>,
    ) -> Result<(String, &'static str), (String, Refusal)> {
        let requested = &image_use.spec.image;
        let status: ImageStatusResponse = upstream
            .unary(
                IMAGE_STATUS,
                &ImageStatusRequest {
                    image: Some(image_use.spec.clone()),
                    verbose: false,
                },
            )
            .await
            .map_err(|e| (String::new(), Refusal::upstream(&e)))?;
        let Some(image) = status.image else {
            // The runtime would not find it either, unless it arrives in
            // between: nothing unjudged reaches it.
            return Err((
                String::new(),
                Refusal::new(
                    Code::NotFound,
                    Outcome::Denied,
                    format!(
                        "image {requested:?}{} is not on the node",
                        image_use.suffix()
                    ),
                ),
            ));
        };
        let resolved = resolve(requested, &image);
        let now = SystemTime::now();
        let namespace = pod.map_or("", |p| p.namespace.as_str());
        let provenance = self.provenance(&image, &resolved, now).await;
        let required = self
            .policy
            .requires_verification(namespace, &resolved.names, provenance);
        let granted = pod.is_some_and(|p| self.has_grant(&image.id, &p.uid, now));
        if required && !granted {
            let name = resolved
                .reference
                .as_ref()
                .map_or_else(|| requested.clone(), ToString::to_string);
            return Err((
                image.id.clone(),
                Refusal::new(
                    Code::FailedPrecondition,
                    Outcome::Denied,
                    format!(
                        "{} holds no verification of its pull credentials for cached image {name}{}",
                        describe(pod),
                        image_use.suffix()
                    ),
                ),
            ));
        }
        let why = if required {
            "pod holds a verification"
        } else {
            "no verification required"
        };
        Ok((image.id, why))
    }
}

enum Unverified {
    Pod(PodRef),
    PodsUnknown,
}

async fn forward(call: InspectedCall, upstream: &Upstream) -> Response<ProxyBody> {
    match upstream.forward_buffered(call.parts, call.body).await {
        Ok(b) => b.into_response(),
        Err(e) => e.to_response(),
    }
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

/// Why a verification could not be relied on: its record is not on disk.
fn unrecorded(reference: &ImageRef, error: &RecordError) -> String {
    format!(
        "the verification for {reference} could not be recorded ({error}); refusing until the record is on disk"
    )
}

fn invalid(rpc: Rpc, error: &prost::DecodeError) -> Response<ProxyBody> {
    grpc::error_response(
        Code::InvalidArgument,
        &format!("credlet could not decode the {rpc:?} request: {error}"),
    )
}

fn pod_ref(config: Option<&PodSandboxConfig>) -> Option<PodRef> {
    pod_ref_of(config?.metadata.as_ref())
}

fn pod_ref_of(metadata: Option<&credlet_proto::cri::PodSandboxMetadata>) -> Option<PodRef> {
    let m = metadata?;
    (!m.uid.is_empty()).then(|| PodRef {
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
    fn pods_come_from_sandbox_metadata_with_a_uid() {
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
        assert_eq!(pod_ref_of(Some(&meta(""))), None);
        assert_eq!(pod_ref_of(None), None);
    }
}
