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
        // Every series exists from the start (at zero), so rates and
        // alerts see a value before the first issuance.
        for operation in [Operation::Publish, Operation::Renew, Operation::Repair] {
            for outcome in [Outcome::Success, Outcome::Error] {
                let labels = IssuanceLabels { operation, outcome };
                let _ = self.issuances.get_or_create(&labels);
                let _ = self.issuance_seconds.get_or_create(&labels);
            }
        }
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
    /// `Ok`, `Timeout`, or the gRPC code's name (`Unavailable`,
    /// `PermissionDenied`, …).
    pub outcome: &'static str,
}

/// The agent's calls to the CA service.
#[derive(Debug, Clone)]
pub struct CaClientMetrics {
    /// Calls by RPC and outcome.
    pub requests: Family<CaRequestLabels, Counter>,
    /// Call latency by RPC.
    pub request_seconds: Family<CaRpcLabel, Histogram, fn() -> Histogram>,
    /// Reads of the agent's own token file (`--ca-token-file`) that failed
    /// or found it empty: the agent can not renew its client certificate.
    pub token_read_errors: Counter,
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
            token_read_errors: Counter::default(),
        }
    }
}

impl CaClientMetrics {
    /// Registers the metrics under `credlet_ca_client_`.
    pub fn register(&self, registry: &mut Registry) {
        for rpc in [
            CaRpc::IssuePodCertificate,
            CaRpc::IssuePodCertificates,
            CaRpc::IssueAgentCertificate,
            CaRpc::WatchTrustBundle,
        ] {
            let _ = self
                .requests
                .get_or_create(&CaRequestLabels { rpc, outcome: "Ok" });
            let _ = self.request_seconds.get_or_create(&CaRpcLabel { rpc });
        }
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
        sub.register(
            "token_read_errors",
            "Reads of the agent's service account token file that failed or found it empty",
            self.token_read_errors.clone(),
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

/// The outcome label of a gRPC status code: its name as gRPC spells it
/// (`PermissionDenied`), the style of every credlet label value.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
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

/// `credlet_csi_certificate_expiration_timestamp_seconds{namespace, pod,
/// volume}`: each volume's certificate notAfter, as cert-manager exports
/// per certificate. One series per volume, so only on request
/// (`--per-volume-metrics`): fine for small clusters, a cardinality cost on
/// nodes with thousands of volumes.
#[derive(Debug)]
pub struct VolumeExpiryCollector {
    volumes: std::sync::Weak<crate::volumes::VolumeManager>,
}

impl VolumeExpiryCollector {
    /// A collector reading `volumes` (weakly).
    pub fn new(volumes: &std::sync::Arc<crate::volumes::VolumeManager>) -> Self {
        Self {
            volumes: std::sync::Arc::downgrade(volumes),
        }
    }
}

impl prometheus_client::collector::Collector for VolumeExpiryCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let expiries = self
            .volumes
            .upgrade()
            .map(|v| v.expiries())
            .unwrap_or_default();
        let family = Family::<Vec<(&'static str, String)>, Gauge>::default();
        for expiry in expiries {
            family
                .get_or_create(&vec![
                    ("namespace", expiry.namespace),
                    ("pod", expiry.pod),
                    ("volume", expiry.volume),
                ])
                .set(i64::try_from(expiry.not_after).unwrap_or(i64::MAX));
        }
        family.encode(encoder.encode_descriptor(
            "credlet_csi_certificate_expiration_timestamp_seconds",
            "When each volume's certificate expires (notAfter), seconds since the Unix epoch",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?)
    }
}
