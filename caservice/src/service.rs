//! The gRPC service: `credlet.ca.v1.CertificateAuthority`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use credlet_ca::{IssuanceRequest, IssuedCertificate, PodIdentity, VerifiedCsr};
use credlet_proto::ca::certificate_authority_server::CertificateAuthority;
use credlet_proto::ca::{
    IssueAgentCertificateRequest, IssuePodCertificateRequest, IssuePodCertificateResult,
    IssuePodCertificatesRequest, IssuePodCertificatesResponse, IssueRefusal,
    IssuedCertificate as IssuedProto, TrustBundle as TrustBundleProto, WatchTrustBundleRequest,
    issue_pod_certificate_result,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::keys::KeyStore;
use crate::metrics::{CaServiceMetrics, Rpc};
use crate::pods::PodChecker;
use crate::policy::{Facts, ServicePolicy, is_node_name, renew_at_spread_unix_ms};
use crate::tls::PeerInfo;
use crate::tokens::{TokenVerifier, VerifiedToken};

/// Most entries one `IssuePodCertificates` call may carry.
pub const MAX_BATCH_ENTRIES: usize = 256;

/// The CA service's handlers.
pub struct CaService {
    keys: Arc<KeyStore>,
    tokens: Arc<dyn TokenVerifier>,
    pods: PodChecker,
    policy: Arc<ServicePolicy>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    metrics: CaServiceMetrics,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("keys", &self.keys)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl CaService {
    /// Assembles the service. `shutdown` turning `true` ends open
    /// `WatchTrustBundle` streams so that a drain can finish.
    pub fn new(
        keys: Arc<KeyStore>,
        tokens: Arc<dyn TokenVerifier>,
        pods: PodChecker,
        policy: Arc<ServicePolicy>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            keys,
            tokens,
            pods,
            policy,
            shutdown,
            metrics: CaServiceMetrics::default(),
        }
    }

    /// The API's metrics (register them with
    /// [`CaServiceMetrics::register`]).
    pub fn metrics(&self) -> &CaServiceMetrics {
        &self.metrics
    }

    /// IssueAgentCertificate without the gRPC wrapping.
    pub async fn issue_agent(
        &self,
        request: &IssueAgentCertificateRequest,
    ) -> Result<IssuedProto, Error> {
        let csr = VerifiedCsr::from_der(&request.csr_der)?;
        let token = self.tokens.verify(&request.token).await?;
        let agent = &self.policy.agent_service_account;
        if token.namespace != agent.namespace || token.service_account != agent.name {
            return Err(Error::NotAgentServiceAccount {
                namespace: token.namespace,
                pod: token.pod_name,
                service_account: token.service_account,
                expected: agent.to_string(),
            });
        }
        let node = request.node_name.as_str();
        if !is_node_name(node) {
            return Err(Error::InvalidField {
                field: "node_name",
                reason: format!("{node:?} is not a node name"),
            });
        }
        same_node(&token, node)?;
        self.pods.check(&token, node).await?;
        let authority = self.keys.authority();
        let duration = self
            .policy
            .agent_duration
            .clamp(self.policy.min_duration, self.policy.max_duration);
        drop(csr);
        let issued = authority.issue_component(
            &request.csr_der,
            &self.policy.node_spiffe_id(node),
            &[],
            &[],
            duration,
            SystemTime::now(),
        )?;
        tracing::info!(
            node,
            namespace = %token.namespace,
            pod = %token.pod_name,
            serial = %issued.serial_hex,
            "agent certificate issued"
        );
        Ok(self.answer(issued, 0, 0, Bundle::Included))
    }

    /// IssuePodCertificate without the gRPC wrapping; `peer` is what the
    /// TLS layer verified.
    pub async fn issue_pod(
        &self,
        peer: Option<&PeerInfo>,
        request: &IssuePodCertificateRequest,
    ) -> Result<IssuedProto, Error> {
        self.issue_pod_answer(peer, request, Bundle::Included).await
    }

    /// [`CaService::issue_pod`], with the trust bundle in the answer or not
    /// (a batch carries it once).
    async fn issue_pod_answer(
        &self,
        peer: Option<&PeerInfo>,
        request: &IssuePodCertificateRequest,
        bundle: Bundle,
    ) -> Result<IssuedProto, Error> {
        let Some(node) = peer.and_then(|p| p.node.as_deref()) else {
            return Err(Error::NoClientCertificate);
        };
        if request.renew_before_percent > 99 {
            return Err(Error::InvalidField {
                field: "renew_before_percent",
                reason: format!("{} is not 0-99", request.renew_before_percent),
            });
        }
        let csr = VerifiedCsr::from_der(&request.csr_der)?;
        let token = self.tokens.verify(&request.token).await?;
        cross_check(&token, request)?;
        same_node(&token, node)?;
        let facts = Facts::from(&token);
        let dns_names = self.policy.dns_names(&facts, &request.dns_name_templates)?;
        let ip_addresses = self.policy.ip_addresses(&facts, &request.ip_addresses)?;
        let common_name =
            self.policy
                .common_name(&facts, &request.common_name_template, &dns_names)?;
        let spiffe_id = self.policy.spiffe_id(&facts, &request.spiffe_id_template)?;
        self.pods.check(&token, node).await?;
        let duration = self.policy.duration(request.duration_seconds);
        let issuance = IssuanceRequest {
            // Verified above; `issue_verified` does not read it again.
            csr_der: Vec::new(),
            identity: PodIdentity {
                namespace: token.namespace.clone(),
                name: token.pod_name.clone(),
                uid: token.pod_uid.clone(),
                service_account: token.service_account.clone(),
            },
            spiffe_id,
            dns_names,
            ip_addresses,
            common_name,
            duration,
        };
        // The proof of possession was checked once, above.
        let issued = self
            .keys
            .authority()
            .issue_verified(&csr, &issuance, SystemTime::now())?;
        tracing::info!(
            node,
            namespace = %token.namespace,
            pod = %token.pod_name,
            serial = %issued.serial_hex,
            lifetime_s = duration.as_secs(),
            "pod certificate issued"
        );
        Ok(self.answer(
            issued,
            request.renew_before_seconds,
            request.renew_before_percent,
            bundle,
        ))
    }

    /// One pod certificate request with its metrics and denial log, as
    /// both `IssuePodCertificate` and each entry of `IssuePodCertificates`
    /// answer it.
    async fn issue_pod_observed(
        &self,
        rpc: Rpc,
        peer: Option<&PeerInfo>,
        request: &IssuePodCertificateRequest,
    ) -> Result<IssuedProto, Error> {
        let started = Instant::now();
        let bundle = match rpc {
            Rpc::IssuePodCertificates => Bundle::Omitted,
            _ => Bundle::Included,
        };
        let result = self.issue_pod_answer(peer, request, bundle).await;
        self.metrics.observe(
            rpc,
            result.as_ref().map_or_else(Error::reason, |_| "Issued"),
            started.elapsed(),
        );
        if let Err(error) = &result {
            let pod = format!("{}/{}", request.pod_namespace, request.pod_name);
            let name = match rpc {
                Rpc::IssuePodCertificates => "IssuePodCertificates",
                _ => "IssuePodCertificate",
            };
            log_denial(name, peer, &pod, error);
        }
        result
    }

    /// IssuePodCertificates without the gRPC wrapping: every entry answered
    /// on its own, the trust bundle once.
    pub async fn issue_pods(
        &self,
        peer: Option<&PeerInfo>,
        batch: &IssuePodCertificatesRequest,
    ) -> Result<IssuePodCertificatesResponse, Error> {
        let entries = batch.requests.len();
        if !(1..=MAX_BATCH_ENTRIES).contains(&entries) {
            return Err(Error::InvalidField {
                field: "requests",
                reason: format!("{entries} entries; 1 to {MAX_BATCH_ENTRIES} are accepted"),
            });
        }
        // Token reviews of different entries overlap; signing is CPU work
        // and runs one entry after the other.
        let answers = futures_util::future::join_all(
            batch
                .requests
                .iter()
                .map(|request| self.issue_pod_observed(Rpc::IssuePodCertificates, peer, request)),
        )
        .await;
        let results = answers
            .into_iter()
            .map(|answer| IssuePodCertificateResult {
                result: Some(match answer {
                    Ok(issued) => issue_pod_certificate_result::Result::Issued(issued),
                    Err(error) => {
                        let status = tonic::Status::from(error);
                        issue_pod_certificate_result::Result::Refused(IssueRefusal {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        })
                    }
                }),
            })
            .collect();
        Ok(IssuePodCertificatesResponse {
            results,
            trust_bundle_pem: self.keys.trust_bundle().pem.clone(),
        })
    }

    fn answer(
        &self,
        issued: IssuedCertificate,
        before_s: u64,
        percent: u32,
        bundle: Bundle,
    ) -> IssuedProto {
        let unix = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0)
        };
        IssuedProto {
            renew_at_unix_ms: renew_at_spread_unix_ms(
                issued.not_before,
                issued.not_after,
                before_s,
                percent,
                self.policy.default_renew_before_percent,
                self.policy.renewal_spread_percent,
            ),
            not_before_unix: unix(issued.not_before),
            not_after_unix: unix(issued.not_after),
            // During a rollover: old and new roots.
            trust_bundle_pem: match bundle {
                Bundle::Included => self.keys.trust_bundle().pem.clone(),
                Bundle::Omitted => String::new(),
            },
            chain_pem: issued.chain_pem,
            serial_hex: issued.serial_hex,
        }
    }
}

/// Whether an answer carries the trust bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bundle {
    Included,
    /// A batch answer carries it once, not per entry.
    Omitted,
}

/// The kubelet-reported fields must match the token when given.
fn cross_check(token: &VerifiedToken, request: &IssuePodCertificateRequest) -> Result<(), Error> {
    let fields = [
        ("pod_namespace", &request.pod_namespace, &token.namespace),
        ("pod_name", &request.pod_name, &token.pod_name),
        ("pod_uid", &request.pod_uid, &token.pod_uid),
        (
            "service_account",
            &request.service_account,
            &token.service_account,
        ),
    ];
    for (field, requested, verified) in fields {
        if !requested.is_empty() && requested != verified {
            return Err(Error::TokenForAnotherPod {
                namespace: token.namespace.clone(),
                pod: token.pod_name.clone(),
                field,
                requested: requested.clone(),
                verified: verified.clone(),
            });
        }
    }
    Ok(())
}

fn log_denial(rpc: &'static str, peer: Option<&PeerInfo>, pod: &str, error: &Error) {
    let node = peer.and_then(|p| p.node.as_deref()).unwrap_or("");
    let remote = peer
        .and_then(|p| p.remote_addr)
        .map(|a| a.to_string())
        .unwrap_or_default();
    match error.code() {
        tonic::Code::Internal | tonic::Code::Unavailable => tracing::error!(
            rpc, node, pod, remote, reason = error.reason(), error = %error, "request failed"
        ),
        _ => tracing::warn!(
            rpc, node, pod, remote, reason = error.reason(), error = %error, "request denied"
        ),
    }
}

/// The stream type of WatchTrustBundle.
pub type TrustBundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundleProto, Status>> + Send>>;

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn issue_agent_certificate(
        &self,
        request: Request<IssueAgentCertificateRequest>,
    ) -> Result<Response<IssuedProto>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let body = request.into_inner();
        let started = Instant::now();
        let result = self.issue_agent(&body).await;
        self.metrics.observe(
            Rpc::IssueAgentCertificate,
            result.as_ref().map_or_else(Error::reason, |_| "Issued"),
            started.elapsed(),
        );
        match result {
            Ok(issued) => Ok(Response::new(issued)),
            Err(error) => {
                let who = format!("node {}", body.node_name);
                log_denial("IssueAgentCertificate", peer.as_ref(), &who, &error);
                Err(error.into())
            }
        }
    }

    async fn issue_pod_certificate(
        &self,
        request: Request<IssuePodCertificateRequest>,
    ) -> Result<Response<IssuedProto>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let body = request.into_inner();
        self.issue_pod_observed(Rpc::IssuePodCertificate, peer.as_ref(), &body)
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn issue_pod_certificates(
        &self,
        request: Request<IssuePodCertificatesRequest>,
    ) -> Result<Response<IssuePodCertificatesResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let body = request.into_inner();
        match self.issue_pods(peer.as_ref(), &body).await {
            Ok(answer) => Ok(Response::new(answer)),
            Err(error) => {
                log_denial("IssuePodCertificates", peer.as_ref(), "", &error);
                Err(error.into())
            }
        }
    }

    type WatchTrustBundleStream = TrustBundleStream;

    async fn watch_trust_bundle(
        &self,
        _request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        let mut bundles = self.keys.subscribe_bundle();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let bundle = bundles.borrow_and_update().clone();
                let message = TrustBundleProto {
                    pem: bundle.pem.clone(),
                    generation: bundle.generation,
                };
                if tx.send(Ok(message)).await.is_err() {
                    break;
                }
                tokio::select! {
                    changed = bundles.changed() => if changed.is_err() { break },
                    () = tx.closed() => break,
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A token whose binding names a node must name the caller's.
fn same_node(token: &VerifiedToken, node: &str) -> Result<(), Error> {
    match &token.node_name {
        Some(token_node) if token_node != node => Err(Error::NodeMismatch {
            namespace: token.namespace.clone(),
            name: token.pod_name.clone(),
            pod_node: token_node.clone(),
            caller_node: node.to_owned(),
        }),
        _ => Ok(()),
    }
}
