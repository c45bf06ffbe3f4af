//! Prometheus metrics of the CSI node plugin.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

/// The plugin's metrics.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Issuances by operation and outcome.
    pub issuances: Family<IssuanceLabels, Counter>,
    /// Volumes currently managed.
    pub volumes: Gauge,
    /// Republish calls answered without re-issuing.
    pub republishes: Counter,
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
            "volumes",
            "Volumes managed by this agent",
            self.volumes.clone(),
        );
        sub.register(
            "republishes",
            "Republish calls answered without re-issuing",
            self.republishes.clone(),
        );
    }

    /// Counts one issuance.
    pub fn issued(&self, operation: Operation, outcome: Outcome) {
        self.issuances
            .get_or_create(&IssuanceLabels { operation, outcome })
            .inc();
    }
}
