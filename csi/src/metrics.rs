//! Prometheus metrics of the CSI node plugin.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What caused an issuance.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Operation {
    /// First publish of a volume.
    Publish,
    /// Scheduled renewal.
    Renew,
    /// Re-issue on restart recovery or republish of a bad volume.
    Repair,
}

/// How an issuance ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Certificate written.
    Success,
    /// Failed (see logs).
    Error,
}

/// Labels of `credlet_csi_issuances`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuanceLabels {
    /// Cause.
    pub operation: Operation,
    /// Result.
    pub outcome: Outcome,
}

/// Buckets of the latency histograms: 0.5 ms to about 8 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 15))
}

/// The plugin's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Issuances by operation and outcome.
    pub issuances: Family<IssuanceLabels, Counter>,
    /// Issuance latency (key generation, CA, writing the files) by
    /// operation and outcome.
    pub issuance_seconds: Family<IssuanceLabels, Histogram, fn() -> Histogram>,
    /// Volumes currently managed.
    pub volumes: Gauge,
    /// Republish calls answered without re-issuing.
    pub republishes: Counter,
    /// Renewals that fell due without a usable token and waited for the
    /// kubelet's next republish.
    pub awaiting_token: Counter,
    /// Pod tokens held in memory for coming renewals.
    pub tokens_held: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            issuances: Family::default(),
            issuance_seconds: Family::new_with_constructor(latency_histogram),
            volumes: Gauge::default(),
            republishes: Counter::default(),
            awaiting_token: Counter::default(),
            tokens_held: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Registers the metrics under `credlet_csi_`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("credlet_csi");
        sub.register(
            "issuances",
            "Certificates issued into volumes, by operation and outcome",
            self.issuances.clone(),
        );
        sub.register(
            "issuance_duration_seconds",
            "Time to issue into a volume (key, CSR, CA, files), by operation and outcome",
            self.issuance_seconds.clone(),
        );
        sub.register(
            "volumes",
            "Volumes managed by this agent",
            self.volumes.clone(),
        );
        sub.register(
            "republishes",
            "Republish calls answered without re-issuing",
            self.republishes.clone(),
        );
        sub.register(
            "renewals_awaiting_token",
            "Renewals that fell due without a usable token and waited for the kubelet's next republish",
            self.awaiting_token.clone(),
        );
        sub.register(
            "tokens_held",
            "Pod service account tokens held in memory for renewals due soon",
            self.tokens_held.clone(),
        );
    }

    /// Counts one issuance that took `elapsed`.
    pub fn issued(&self, operation: Operation, outcome: Outcome, elapsed: std::time::Duration) {
        let labels = IssuanceLabels { operation, outcome };
        self.issuances.get_or_create(&labels).inc();
        self.issuance_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// A call of the agent to the CA service.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CaRpc {
    /// `IssuePodCertificate`.
    IssuePodCertificate,
    /// `IssuePodCertificates` (several pod certificates in one call).
    IssuePodCertificates,
    /// `IssueAgentCertificate`.
    IssueAgentCertificate,
    /// Opening `WatchTrustBundle`.
    WatchTrustBundle,
}

/// Labels of `credlet_ca_client_requests`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaRequestLabels {
    /// The call.
    pub rpc: CaRpc,
    /// `ok`, `timeout`, or the gRPC code in snake case
    /// (`unavailable`, `permission_denied`, …).
    pub outcome: &'static str,
}

/// The agent's calls to the CA service.
#[derive(Debug, Clone)]
pub struct CaClientMetrics {
    /// Calls by RPC and outcome.
    pub requests: Family<CaRequestLabels, Counter>,
    /// Call latency by RPC.
    pub request_seconds: Family<CaRpcLabel, Histogram, fn() -> Histogram>,
}

/// The `rpc` label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaRpcLabel {
    /// The call.
    pub rpc: CaRpc,
}

impl Default for CaClientMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl CaClientMetrics {
    /// Registers the metrics under `credlet_ca_client_`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("credlet_ca_client");
        sub.register(
            "requests",
            "Calls to the CA service, by RPC and outcome",
            self.requests.clone(),
        );
        sub.register(
            "request_duration_seconds",
            "Latency of calls to the CA service, by RPC",
            self.request_seconds.clone(),
        );
    }

    /// Counts one call.
    pub fn observe(&self, rpc: CaRpc, outcome: &'static str, elapsed: std::time::Duration) {
        self.requests
            .get_or_create(&CaRequestLabels { rpc, outcome })
            .inc();
        self.request_seconds
            .get_or_create(&CaRpcLabel { rpc })
            .observe(elapsed.as_secs_f64());
    }

    /// The count of calls of `rpc` that ended with `outcome`.
    pub fn count(&self, rpc: CaRpc, outcome: &'static str) -> u64 {
        self.requests
            .get_or_create(&CaRequestLabels { rpc, outcome })
            .get()
    }
}

/// The outcome label of a gRPC status code.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// `credlet_csi_certificate_expiry_seconds`: seconds until the earliest
/// certificate expiry among the managed volumes, computed at scrape time
/// (absent while no volume has a certificate). Alert when it drops below a
/// renewal window: renewals are failing.
#[derive(Debug)]
pub struct ExpiryCollector {
    volumes: std::sync::Weak<crate::volumes::VolumeManager>,
}

impl ExpiryCollector {
    /// A collector reading `volumes` (weakly: it does not keep the manager
    /// alive).
    pub fn new(volumes: &std::sync::Arc<crate::volumes::VolumeManager>) -> Self {
        Self {
            volumes: std::sync::Arc::downgrade(volumes),
        }
    }
}

impl prometheus_client::collector::Collector for ExpiryCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let Some(earliest) = self.volumes.upgrade().and_then(|v| v.earliest_expiry()) else {
            return Ok(());
        };
        let now = std::time::SystemTime::now();
        let seconds = match earliest.duration_since(now) {
            Ok(left) => left.as_secs_f64(),
            Err(past) => -past.duration().as_secs_f64(),
        };
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(seconds);
        let metric = encoder.encode_descriptor(
            "credlet_csi_certificate_expiry_seconds",
            "Seconds until the earliest certificate expiry among managed volumes (negative: expired)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        prometheus_client::encoding::EncodeMetric::encode(&gauge, metric)
    }
}
