//! Prometheus metrics of the signer, registered under `credlet_signer_`.
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `credlet_signer_requests_total` | counter | `signer`, `outcome` (`Issued`, `Denied`, `Failed`: the condition type), `reason` |
//! | `credlet_signer_issue_latency_seconds` | histogram | — (request creation to the `Issued` write) |
//! | `credlet_signer_leader` | gauge | — (1 while this replica leads) |
//! | `credlet_signer_leader_transitions_total` | counter | — (leadership gained or lost) |
//! | `credlet_signer_trust_bundle_publications_total` | counter | `signer`, `result` (`Created`, `Updated`, `Unchanged`, `Error`) |
//! | `credlet_signer_api_retries_total` | counter | — (transient API errors retried) |

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a request was answered.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// A certificate was written (`Issued`).
    Issued,
    /// The request was refused (`Denied`).
    Denied,
    /// The signer could not issue (`Failed`).
    Failed,
}

/// Labels of `credlet_signer_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The signer name the request was for.
    pub signer: String,
    /// The answer.
    pub outcome: Outcome,
    /// The condition's reason (`Issued`, `UnsupportedKeyType`, …).
    pub reason: String,
}

/// Result of one trust bundle publication.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Publication {
    /// The bundle object did not exist and was created.
    Created,
    /// The bundle object differed and was replaced.
    Updated,
    /// The bundle object already carried the bundle.
    Unchanged,
    /// The API server refused or did not answer.
    Error,
}

/// Labels of `credlet_signer_trust_bundle_publications_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublicationLabels {
    /// The signer name of the bundle.
    pub signer: String,
    /// What the publication did.
    pub result: Publication,
}

/// The signer's metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct SignerMetrics {
    /// Answered requests by signer, outcome and reason.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from a request's creation to its `Issued` status write.
    pub issue_latency: Histogram,
    /// 1 while this replica holds the Lease, else 0.
    pub leader: Gauge,
    /// Times leadership was gained or lost.
    pub leader_transitions: Counter,
    /// Trust bundle publications by signer and result.
    pub publications: Family<PublicationLabels, Counter>,
    /// Transient API errors that were retried.
    pub api_retries: Counter,
}

impl Default for SignerMetrics {
    fn default() -> Self {
        // 5 ms … ~20 s: the kubelet waits; anything near the 15 min garbage
        // collection of unanswered requests is an outage anyway.
        let buckets = prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 13);
        Self {
            requests: Family::default(),
            issue_latency: Histogram::new(buckets),
            leader: Gauge::default(),
            leader_transitions: Counter::default(),
            publications: Family::default(),
            api_retries: Counter::default(),
        }
    }
}

impl SignerMetrics {
    /// Registers every metric under `credlet_signer_`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("credlet_signer");
        sub.register(
            "requests",
            "PodCertificateRequests answered, by signer, outcome and reason",
            self.requests.clone(),
        );
        sub.register(
            "issue_latency_seconds",
            "Seconds from a PodCertificateRequest's creation to its Issued status",
            self.issue_latency.clone(),
        );
        sub.register(
            "leader",
            "1 while this replica holds the signer's Lease",
            self.leader.clone(),
        );
        sub.register(
            "leader_transitions",
            "Times this replica gained or lost leadership",
            self.leader_transitions.clone(),
        );
        sub.register(
            "trust_bundle_publications",
            "ClusterTrustBundle publications, by signer and result",
            self.publications.clone(),
        );
        sub.register(
            "api_retries",
            "Transient Kubernetes API errors that were retried",
            self.api_retries.clone(),
        );
    }

    /// Counts one answered request.
    pub fn answered(&self, signer: &str, outcome: Outcome, reason: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                signer: signer.to_owned(),
                outcome,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// How many requests for `signer` got `outcome` with `reason`.
    pub fn answered_for(&self, signer: &str, outcome: Outcome, reason: &str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                signer: signer.to_owned(),
                outcome,
                reason: reason.to_owned(),
            })
            .get()
    }

    /// Counts one trust bundle publication.
    pub fn published(&self, signer: &str, result: Publication) {
        self.publications
            .get_or_create(&PublicationLabels {
                signer: signer.to_owned(),
                result,
            })
            .inc();
    }

    /// Records leadership.
    pub fn set_leader(&self, leading: bool) {
        let before = self.leader.set(i64::from(leading));
        if (before != 0) != leading {
            self.leader_transitions.inc();
        }
    }
}

/// The registry's text exposition (OpenMetrics text, which Prometheus
/// scrapes as its text format).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_outcomes_and_leadership() {
        let metrics = SignerMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.answered("example.com/pods", Outcome::Issued, "Issued");
        metrics.answered("example.com/pods", Outcome::Denied, "UnsupportedKeyType");
        metrics.set_leader(true);
        metrics.set_leader(true);
        metrics.issue_latency.observe(0.02);
        metrics.published("example.com/pods", Publication::Created);
        let text = encode(&registry);
        assert!(text.contains(
            r#"credlet_signer_requests_total{signer="example.com/pods",outcome="Denied",reason="UnsupportedKeyType"} 1"#
        ), "{text}");
        assert!(text.contains("credlet_signer_leader 1"), "{text}");
        assert!(
            text.contains("credlet_signer_leader_transitions_total 1"),
            "{text}"
        );
        assert!(
            text.contains("credlet_signer_issue_latency_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains(
            r#"credlet_signer_trust_bundle_publications_total{signer="example.com/pods",result="Created"} 1"#
        ), "{text}");
        assert_eq!(
            metrics.answered_for("example.com/pods", Outcome::Issued, "Issued"),
            1
        );
    }
}
