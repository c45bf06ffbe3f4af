//! Coalescing of pod certificate calls.
//!
//! A request goes out at once, on its own, while fewer than
//! [`MAX_CALLS_IN_FLIGHT`] calls to the CA are open. Requests that arrive
//! while that many are open wait in a bounded queue and leave together, in
//! one `IssuePodCertificates` call, as soon as one of them answers. An idle
//! agent therefore adds no waiting to a publish, and a burst of renewals
//! costs the CA one call per batch instead of one per certificate.
//!
//! A CA that does not know `IssuePodCertificates` (an older release during
//! an upgrade) answers `Unimplemented`; the batch is then sent again as
//! single calls and the agent stops batching.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use credlet_proto::ca::certificate_authority_client::CertificateAuthorityClient;
use credlet_proto::ca::{
    IssuePodCertificateRequest, IssuePodCertificatesRequest, IssuePodCertificatesResponse,
    IssuedCertificate, issue_pod_certificate_result,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::transport::Channel;

use super::{CallError, call, call_raw, status_error};
use crate::issuer::IssuerError;
use crate::metrics::{CaClientMetrics, CaRpc};

/// Calls to the CA open at once for pod certificates.
pub(super) const MAX_CALLS_IN_FLIGHT: usize = 2;
/// Most requests in one `IssuePodCertificates` call (the CA accepts 256).
pub(super) const MAX_BATCH: usize = 64;
/// Requests waiting for a call; a caller beyond this waits to enqueue.
const QUEUE_LEN: usize = 1024;

/// Whether the CA serves `IssuePodCertificates`.
const BATCH_UNKNOWN: u8 = 0;
const BATCH_SUPPORTED: u8 = 1;
const BATCH_UNSUPPORTED: u8 = 2;

/// One request and where its answer goes.
struct Pending {
    client: CertificateAuthorityClient<Channel>,
    request: IssuePodCertificateRequest,
    reply: oneshot::Sender<Result<IssuedCertificate, IssuerError>>,
}

/// What every call needs.
struct Settings {
    deadline: Duration,
    metrics: CaClientMetrics,
    /// `BATCH_UNKNOWN` until the CA answered a batch call.
    batch: AtomicU8,
}

/// The queue in front of the CA; its task starts with the first request
/// and ends when the coalescer is dropped and the queue is empty.
pub(super) struct Coalescer {
    queue: std::sync::OnceLock<mpsc::Sender<Pending>>,
    settings: Arc<Settings>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("deadline", &self.settings.deadline)
            .field("batch", &self.settings.batch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Coalescer {
    /// A coalescer whose calls each get `deadline`.
    pub(super) fn new(deadline: Duration, metrics: CaClientMetrics) -> Self {
        Self {
            queue: std::sync::OnceLock::new(),
            settings: Arc::new(Settings {
                deadline,
                metrics,
                batch: AtomicU8::new(BATCH_UNKNOWN),
            }),
        }
    }

    /// Sends `request` on `client`'s connection, alone or with others, and
    /// returns its answer. Must run inside the tokio runtime. Dropping the
    /// future abandons the request; a batch already sent still completes.
    pub(super) async fn issue(
        &self,
        client: CertificateAuthorityClient<Channel>,
        request: IssuePodCertificateRequest,
    ) -> Result<IssuedCertificate, IssuerError> {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(QUEUE_LEN);
            tokio::spawn(run(receiver, Arc::clone(&self.settings)));
            sender
        });
        let (reply, answer) = oneshot::channel();
        let gone = || IssuerError::Unavailable {
            reason: "the agent's CA call queue stopped".into(),
        };
        queue
            .send(Pending {
                client,
                request,
                reply,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Takes a slot, then everything queued (up to [`MAX_BATCH`]), and sends it.
async fn run(mut queue: mpsc::Receiver<Pending>, settings: Arc<Settings>) {
    let slots = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let mut batch = Vec::with_capacity(queue.len().min(MAX_BATCH - 1) + 1);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        tokio::spawn(send(batch, slot, Arc::clone(&settings)));
    }
}

/// One call for `batch`; every entry gets its answer.
async fn send(batch: Vec<Pending>, _slot: OwnedSemaphorePermit, settings: Arc<Settings>) {
    // Callers that gave up (deadline, cancelled publish) are not asked for.
    let mut batch: Vec<Pending> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
    let batching = settings.batch.load(Ordering::Relaxed);
    if batch.len() > 1 && batching != BATCH_UNSUPPORTED {
        let Some(first) = batch.first() else { return };
        let mut client = first.client.clone();
        // Until the CA has shown it batches, keep the requests for a retry
        // one by one.
        let keep = batching == BATCH_UNKNOWN;
        let mut requests = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut kept = Vec::new();
        for pending in batch {
            if keep {
                requests.push(pending.request.clone());
                kept.push(pending);
            } else {
                requests.push(pending.request);
                replies.push(pending.reply);
            }
        }
        let mut call_request = tonic::Request::new(IssuePodCertificatesRequest { requests });
        call_request.set_timeout(settings.deadline);
        let answer = call_raw(
            &settings.metrics,
            CaRpc::IssuePodCertificates,
            settings.deadline,
            client.issue_pod_certificates(call_request),
        )
        .await;
        match answer {
            Err(CallError::Status(status))
                if keep && status.code() == tonic::Code::Unimplemented =>
            {
                tracing::info!(
                    message = status.message(),
                    "the CA does not serve IssuePodCertificates; sending requests one by one"
                );
                settings.batch.store(BATCH_UNSUPPORTED, Ordering::Relaxed);
                batch = kept;
            }
            answer => {
                if answer.is_ok() {
                    settings.batch.store(BATCH_SUPPORTED, Ordering::Relaxed);
                }
                if keep {
                    replies = kept.into_iter().map(|p| p.reply).collect();
                }
                deliver(
                    replies,
                    answer.map_err(|e| e.into_issuer_error(settings.deadline)),
                );
                return;
            }
        }
    }
    futures_util::future::join_all(batch.into_iter().map(|pending| {
        let settings = &settings;
        async move {
            let Pending {
                mut client,
                request,
                reply,
            } = pending;
            let mut call_request = tonic::Request::new(request);
            call_request.set_timeout(settings.deadline);
            let answer = call(
                &settings.metrics,
                CaRpc::IssuePodCertificate,
                settings.deadline,
                client.issue_pod_certificate(call_request),
            )
            .await;
            let _ = reply.send(answer);
        }
    }))
    .await;
}

/// Hands each caller its entry of a batch answer (or the call's error).
fn deliver(
    replies: Vec<oneshot::Sender<Result<IssuedCertificate, IssuerError>>>,
    answer: Result<IssuePodCertificatesResponse, IssuerError>,
) {
    let answer = match answer {
        Ok(answer) if answer.results.len() == replies.len() => answer,
        Ok(answer) => {
            let error = IssuerError::Internal {
                reason: format!(
                    "the CA answered {} entries for {} requests",
                    answer.results.len(),
                    replies.len()
                ),
            };
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
    };
    let bundle = answer.trust_bundle_pem;
    for (reply, entry) in replies.into_iter().zip(answer.results) {
        let result = match entry.result {
            Some(issue_pod_certificate_result::Result::Issued(mut issued)) => {
                issued.trust_bundle_pem.clone_from(&bundle);
                Ok(issued)
            }
            Some(issue_pod_certificate_result::Result::Refused(refusal)) => Err(status_error(
                &tonic::Status::new(tonic::Code::from(refusal.code), refusal.message),
            )),
            None => Err(IssuerError::Internal {
                reason: "the CA sent an empty batch entry".into(),
            }),
        };
        let _ = reply.send(result);
    }
}
