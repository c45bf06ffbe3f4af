//! Publishing the CA's trust bundle as one `ClusterTrustBundle`
//! (`certificates.k8s.io/v1beta1`) per signer name, so that pods can mount
//! the roots their peers' certificates chain to (`clusterTrustBundle`
//! projected volumes select by `signerName`).
//!
//! A bundle linked to a signer must be named with the signer name as a
//! prefix, slashes turned into colons: signer `example.com/pods` publishes
//! `example.com:pods:<suffix>` (suffix `credlet` by default), with
//! `spec.signerName` set. Writing it needs `attest` on `signers` for that
//! name.
//!
//! Only the leader publishes: when it becomes leader, whenever the CA's
//! bundle changes (a CA rotation publishes old and new roots together) and
//! every resync interval, which also repairs a bundle someone else edited
//! or deleted. Updates are replaces guarded by the resourceVersion read.

use std::sync::Arc;
use std::time::Duration;

use credlet_ca_service::{KeyStore, TrustBundle};
use k8s_openapi::api::certificates::v1beta1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::error::{SignerError, call};
use crate::leader::Leadership;
use crate::metrics::{Publication, SignerMetrics};

/// Label set on published bundles.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "credlet";

/// The name of the bundle published for `signer_name`:
/// `<signer name with '/' as ':'>:<suffix>`.
pub fn bundle_name(signer_name: &str, suffix: &str) -> String {
    format!("{}:{suffix}", signer_name.replace('/', ":"))
}

/// Longest object name the API server accepts for a ClusterTrustBundle.
pub const MAX_BUNDLE_NAME_LEN: usize = 253;

/// How bundles are published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublisherSettings {
    /// The signer names to publish for.
    pub signer_names: Vec<String>,
    /// Last segment of the bundle names. Default `credlet`.
    pub name_suffix: String,
    /// Interval of re-checking the published objects. Default 60 s.
    pub resync: Duration,
    /// Timeout of one API call. Default 5 s.
    pub api_timeout: Duration,
}

impl PublisherSettings {
    /// Defaults for `signer_names`.
    pub fn new(signer_names: Vec<String>) -> Self {
        Self {
            signer_names,
            name_suffix: "credlet".to_owned(),
            resync: Duration::from_secs(60),
            api_timeout: Duration::from_secs(5),
        }
    }
}

impl PublisherSettings {
    /// Checks that every bundle name fits the API's limit (a long signer
    /// name plus the suffix could exceed it and then fail at every resync).
    pub fn validate(&self) -> Result<(), SignerError> {
        for signer in &self.signer_names {
            let name = bundle_name(signer, &self.name_suffix);
            if name.len() > MAX_BUNDLE_NAME_LEN {
                return Err(SignerError::Config {
                    reason: format!(
                        "the ClusterTrustBundle name for signer {signer:?} would be {} characters (at most {MAX_BUNDLE_NAME_LEN}); shorten the signer name or the suffix",
                        name.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The running publisher; dropping it stops it.
#[derive(Debug)]
pub struct TrustBundlePublisher {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TrustBundlePublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TrustBundlePublisher {
    /// Starts publishing `keys`' trust bundle while `leadership` holds.
    pub fn start(
        client: kube::Client,
        keys: Arc<KeyStore>,
        leadership: Leadership,
        settings: PublisherSettings,
        metrics: SignerMetrics,
    ) -> Self {
        let api: Api<ClusterTrustBundle> = Api::all(client);
        let task = tokio::spawn(run(api, keys, leadership, settings, metrics));
        Self { task }
    }

    /// Stops publishing.
    pub fn stop(self) {
        drop(self);
    }
}

async fn run(
    api: Api<ClusterTrustBundle>,
    keys: Arc<KeyStore>,
    mut leadership: Leadership,
    settings: PublisherSettings,
    metrics: SignerMetrics,
) {
    let mut bundles = keys.subscribe_bundle();
    loop {
        if !leadership.wait_leading().await {
            return;
        }
        let mut lost = leadership.clone();
        loop {
            let bundle = bundles.borrow_and_update().clone();
            let mut failed = false;
            for signer in &settings.signer_names {
                if !leadership.is_leading() {
                    break;
                }
                match publish(&api, &leadership, signer, &bundle, &settings).await {
                    Ok(result) => {
                        metrics.published(signer, result);
                        if result != Publication::Unchanged {
                            tracing::info!(
                                signer,
                                bundle = %bundle_name(signer, &settings.name_suffix),
                                generation = bundle.generation,
                                roots = bundle.roots_der.len(),
                                result = ?result,
                                "trust bundle published"
                            );
                        }
                    }
                    Err(error) => {
                        failed = true;
                        metrics.published(signer, Publication::Error);
                        tracing::warn!(signer, error = %error, "publishing the trust bundle failed");
                    }
                }
            }
            // After a failure, retry sooner than the resync.
            let wait = if failed {
                settings.resync.min(Duration::from_secs(2))
            } else {
                settings.resync
            };
            tokio::select! {
                changed = bundles.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(wait) => {}
                () = lost.wait_lost() => break,
            }
        }
    }
}

/// Makes the bundle object for `signer` carry `bundle`.
async fn publish(
    api: &Api<ClusterTrustBundle>,
    leadership: &Leadership,
    signer: &str,
    bundle: &TrustBundle,
    settings: &PublisherSettings,
) -> Result<Publication, SignerError> {
    let name = bundle_name(signer, &settings.name_suffix);
    let wanted = ClusterTrustBundleSpec {
        signer_name: Some(signer.to_owned()),
        trust_bundle: bundle.pem.clone(),
    };
    let timeout = settings.api_timeout;
    // A conflict means someone wrote meanwhile: read again, a few times.
    for _ in 0..3 {
        let current = call(
            || format!("GET clustertrustbundle {name}"),
            timeout,
            api.get_opt(&name),
        )
        .await?;
        if !leadership.is_leading() {
            return Ok(Publication::Unchanged);
        }
        let result = match current {
            None => {
                let object = ClusterTrustBundle {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())].into()),
                        ..ObjectMeta::default()
                    },
                    spec: wanted.clone(),
                };
                call(
                    || format!("create clustertrustbundle {name}"),
                    timeout,
                    api.create(&PostParams::default(), &object),
                )
                .await
                .map(|_| Publication::Created)
            }
            Some(existing) if existing.spec == wanted => return Ok(Publication::Unchanged),
            Some(mut existing) => {
                existing.spec = wanted.clone();
                call(
                    || format!("update clustertrustbundle {name}"),
                    timeout,
                    api.replace(&name, &PostParams::default(), &existing),
                )
                .await
                .map(|_| Publication::Updated)
            }
        };
        match result {
            Err(e) if e.status_code() == Some(409) => continue,
            other => return other,
        }
    }
    Err(SignerError::Conflict {
        what: format!("clustertrustbundle {name}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_signer_prefix_rule() {
        assert_eq!(
            bundle_name("example.com/pods", "credlet"),
            "example.com:pods:credlet"
        );
        assert_eq!(bundle_name("credlet.io/a/b", "v1"), "credlet.io:a:b:v1");
    }
}
