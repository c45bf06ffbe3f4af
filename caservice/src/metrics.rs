//! Prometheus metrics of the CA service's gRPC API.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A signing call of the CA API.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Rpc {
    /// `IssuePodCertificate`.
    IssuePodCertificate,
    /// One entry of `IssuePodCertificates`.
    IssuePodCertificates,
    /// `IssueAgentCertificate`.
    IssueAgentCertificate,
}

/// Labels of `credlet_ca_requests`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The call.
    pub rpc: Rpc,
    /// `Issued`, or the denial/failure reason (`TokenExpired`,
    /// `NodeMismatch`, `DnsNameNotAllowed`, …; see `Error::reason`).
    pub outcome: &'static str,
}

/// Labels of `credlet_ca_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The call.
    pub rpc: Rpc,
}

/// The CA API's metrics.
#[derive(Debug, Clone)]
pub struct CaServiceMetrics {
    /// Calls by RPC and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to answer, by RPC (token review and pod check included).
    pub request_seconds: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for CaServiceMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl CaServiceMetrics {
    /// Registers the metrics under `credlet_ca_`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("credlet_ca");
        sub.register(
            "requests",
            "Signing calls answered by the CA, by RPC and outcome (Issued or the denial reason)",
            self.requests.clone(),
        );
        sub.register(
            "request_duration_seconds",
            "Time the CA took to answer a signing call, by RPC",
            self.request_seconds.clone(),
        );
    }

    /// Counts one answered call.
    pub fn observe(&self, rpc: Rpc, outcome: &'static str, elapsed: std::time::Duration) {
        self.requests
            .get_or_create(&RequestLabels { rpc, outcome })
            .inc();
        self.request_seconds
            .get_or_create(&RpcLabels { rpc })
            .observe(elapsed.as_secs_f64());
    }

    /// How many calls of `rpc` ended with `outcome`.
    pub fn count(&self, rpc: Rpc, outcome: &'static str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels { rpc, outcome })
            .get()
    }
}
