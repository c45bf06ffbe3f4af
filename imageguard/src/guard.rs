//! The decisions: which inspected CRI calls pass, which are answered by
//! credlet, which are refused.
//!
//! - `ImageStatus`: a protected image is reported absent while a pod on this
//!   node that uses it holds no valid verification — the kubelet then calls
//!   `PullImage` with that pod's credentials (`IfNotPresent`) or reports
//!   `ErrImageNeverPull` (`Never`).
//! - `PullImage` of a cached image: the pod's credentials are checked with
//!   one manifest HEAD (or a cached positive result within the TTL) and the
//!   existing image is returned, nothing downloaded. A pull of an absent
//!   image goes to the runtime, and credlet records how it was pulled.
//! - `CreateContainer`: the last gate for a pod without a verification.
//!
//! Anything credlet can not establish (runtime or registry unreachable,
//! undecodable answers) denies: the guard fails closed.

use std::sync::Arc;
use std::time::SystemTime;

use credlet_proto::cri::{
    CreateContainerRequest, Image, ImageSpec, ImageStatusRequest, ImageStatusResponse,
    PodSandboxConfig, PullImageRequest, PullImageResponse,
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
use crate::proxy::{BoxFuture, IMAGE_STATUS, InspectedCall, Inspector, Rpc, Upstream};
use crate::records::{Grant, RecordStore, Stored, unix};
use crate::reference::ImageRef;
use crate::registry::{Access, Verifier};

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

/// The image guard.
pub struct ImageGuard {
    policy: GuardPolicy,
    records: Arc<RecordStore>,
    verifier: Arc<dyn Verifier>,
    pods: Arc<dyn PodIndex>,
    events: Arc<dyn EventSink>,
    metrics: GuardMetrics,
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

    /// Finishes a record update: pending changes get written behind. A
    /// failed write leaves the decision standing for this call; it is just
    /// not remembered.
    fn remember(&self, result: Result<Stored, crate::records::RecordError>) {
        match result {
            Ok(Stored::Deferred) => self.records.schedule_flush(),
            Ok(Stored::Created | Stored::Unchanged) => {}
            Err(error) => tracing::error!(%error, "writing image record"),
        }
    }

    fn provenance(&self, image_id: &str) -> Option<Provenance> {
        self.records.with(image_id, |r| r.map(|r| r.provenance))
    }

    /// A pod on this node that uses `image` but holds no verification,
    /// when the policy demands one.
    fn unverified_user(
        &self,
        requested: &str,
        reference: Option<&ImageRef>,
        image: &Image,
        now: SystemTime,
    ) -> Option<Unverified> {
        let provenance = self.provenance(&image.id);
        let reference = reference.cloned().or_else(|| reference_of(image))?;
        if !self.pods.is_synced() {
            // Which pods use the image is unknown: hide anything that could
            // be protected until the pod list is in.
            let any_policy_verifies = self
                .policy
                .requires_verification("", &reference, provenance)
                || self.policy.namespaces.keys().any(|ns| {
                    self.policy
                        .requires_verification(ns, &reference, provenance)
                });
            return any_policy_verifies.then_some(Unverified::PodsUnknown);
        }
        let matches = |spec_image: &str| refers_to(spec_image, requested, image);
        self.pods
            .pods_using(&matches)
            .into_iter()
            .find(|pod| {
                self.policy
                    .requires_verification(&pod.namespace, &reference, provenance)
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
        let reference = ImageRef::parse(&requested).ok();
        match self.unverified_user(&requested, reference.as_ref(), &image, SystemTime::now()) {
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
        let reference = match ImageRef::parse(&requested) {
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
                    &reference,
                    credential.as_ref(),
                    pod.as_ref(),
                )
                .await;
        };
        let now = SystemTime::now();
        let namespace = pod.as_ref().map_or("", |p| p.namespace.as_str());
        let provenance = self.provenance(&image.id);
        if !self
            .policy
            .requires_verification(namespace, &reference, provenance)
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
        self.remember(result);
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
            // the tag again; access is already proven.
            return forward(call, upstream).await;
        }
        grpc::ok_response(&PullImageResponse {
            image_ref: image.id.clone(),
        })
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
    async fn forward_pull(
        &self,
        call: InspectedCall,
        upstream: &Upstream,
        reference: &ImageRef,
        credential: Option<&Credential>,
        pod: Option<&PodRef>,
    ) -> Response<ProxyBody> {
        let rpc = call.rpc;
        let buffered = match upstream.forward_buffered(call.parts, call.body).await {
            Ok(b) => b,
            Err(e) => return e.to_response(),
        };
        if buffered.grpc_status() != Some(0) {
            return buffered.into_response();
        }
        let Some(image_ref) = grpc::unary_message(&buffered.body)
            .ok()
            .and_then(|m| PullImageResponse::decode(m).ok())
            .map(|r| r.image_ref)
        else {
            return buffered.into_response();
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
        self.remember(result);
        self.report(&Decision {
            rpc,
            pod,
            image: &reference.to_string(),
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
        let spec = request.config.as_ref().and_then(|c| c.image.clone());
        let requested = spec.as_ref().map(|s| s.image.clone()).unwrap_or_default();
        let pod = pod_ref(request.sandbox_config.as_ref());
        let status: ImageStatusResponse = match upstream
            .unary(
                IMAGE_STATUS,
                &ImageStatusRequest {
                    image: Some(spec.unwrap_or_else(|| ImageSpec {
                        image: requested.clone(),
                        ..ImageSpec::default()
                    })),
                    verbose: false,
                },
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return e.to_response(),
        };
        let Some(image) = status.image else {
            // The runtime will refuse a container without its image.
            return forward(call, upstream).await;
        };
        let reference = ImageRef::parse(&requested)
            .ok()
            .filter(|_| !is_image_id(&requested))
            .or_else(|| reference_of(&image));
        let Some(reference) = reference else {
            return forward(call, upstream).await;
        };
        let namespace = pod.as_ref().map_or("", |p| p.namespace.as_str());
        let provenance = self.provenance(&image.id);
        let required = self
            .policy
            .requires_verification(namespace, &reference, provenance);
        let granted = pod
            .as_ref()
            .is_some_and(|p| self.has_grant(&image.id, &p.uid, SystemTime::now()));
        if required && !granted {
            let reason = format!(
                "{} holds no verification of its pull credentials for cached image {reference}",
                describe(pod.as_ref())
            );
            let decision = Decision {
                rpc,
                pod: pod.as_ref(),
                image: &requested,
                image_id: &image.id,
                outcome: Outcome::Denied,
                reason: &reason,
            };
            return self
                .deny(call, upstream, Code::FailedPrecondition, decision)
                .await;
        }
        self.report(&Decision {
            rpc,
            pod: pod.as_ref(),
            image: &requested,
            image_id: &image.id,
            outcome: Outcome::Allowed,
            reason: if required {
                "pod holds a verification"
            } else {
                "no verification required"
            },
        });
        forward(call, upstream).await
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

/// "pod ns/name", or "the pod" when the call named none.
fn describe(pod: Option<&PodRef>) -> String {
    pod.map_or_else(
        || "the pod".to_owned(),
        |p| format!("pod {}/{}", p.namespace, p.name),
    )
}

fn invalid(rpc: Rpc, error: &prost::DecodeError) -> Response<ProxyBody> {
    grpc::error_response(
        Code::InvalidArgument,
        &format!("credlet could not decode the {rpc:?} request: {error}"),
    )
}

fn pod_ref(config: Option<&PodSandboxConfig>) -> Option<PodRef> {
    let m = config?.metadata.as_ref()?;
    (!m.uid.is_empty()).then(|| PodRef {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        uid: m.uid.clone(),
    })
}

/// `sha256:<64 hex>` alone: a runtime image id, not a reference.
fn is_image_id(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A reference naming the image, from its repo tags or digests.
fn reference_of(image: &Image) -> Option<ImageRef> {
    image
        .repo_tags
        .iter()
        .chain(image.repo_digests.iter())
        .find_map(|r| ImageRef::parse(r).ok())
}

/// The manifest digest to check: the repo digest of the requested
/// repository, else the requested digest, else any repo digest.
fn manifest_digest(reference: &ImageRef, image: &Image) -> Option<String> {
    let name = reference.name();
    let digest_of = |repo_digest: &String| {
        ImageRef::parse(repo_digest)
            .ok()
            .and_then(|r| Some((r.name(), r.digest()?.to_owned())))
    };
    image
        .repo_digests
        .iter()
        .filter_map(digest_of)
        .find(|(n, _)| *n == name)
        .map(|(_, d)| d)
        .or_else(|| reference.digest().map(str::to_owned))
        .or_else(|| {
            image
                .repo_digests
                .iter()
                .filter_map(digest_of)
                .map(|(_, d)| d)
                .next()
        })
}

/// Whether a pod's spec image refers to the image a CRI call is about.
fn refers_to(spec_image: &str, requested: &str, image: &Image) -> bool {
    if spec_image == requested || spec_image == image.id {
        return true;
    }
    let Ok(spec) = ImageRef::parse(spec_image) else {
        return false;
    };
    let spec_full = spec.to_string();
    if ImageRef::parse(requested).is_ok_and(|r| r.to_string() == spec_full) {
        return true;
    }
    image
        .repo_tags
        .iter()
        .chain(image.repo_digests.iter())
        .any(|r| ImageRef::parse(r).is_ok_and(|r| r.to_string() == spec_full))
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
