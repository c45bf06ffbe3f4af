//! The pod check: the pod a token is bound to must still exist, be the same
//! pod (uid), and run on the caller's node.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use crate::error::Error;
use crate::tokens::VerifiedToken;

/// Looks pods up on the API server (one GET per check, with a timeout).
#[derive(Clone)]
pub struct PodChecker {
    client: kube::Client,
    timeout: Duration,
}

impl std::fmt::Debug for PodChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodChecker")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PodChecker {
    /// A checker using `client`, giving up on one GET after `timeout`.
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    /// Checks that the token's pod exists with the token's uid and is
    /// scheduled to `node`. Returns the pod's node name.
    pub async fn check(&self, token: &VerifiedToken, node: &str) -> Result<String, Error> {
        let what = format!("GET pod {}/{}", token.namespace, token.pod_name);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &token.namespace);
        let pod = tokio::time::timeout(self.timeout, api.get_opt(&token.pod_name))
            .await
            .map_err(|_| Error::ApiUnavailable {
                what: what.clone(),
                reason: format!("no answer within {:?}", self.timeout),
            })?
            .map_err(|e| Error::ApiUnavailable {
                what,
                reason: e.to_string(),
            })?;
        let Some(pod) = pod else {
            return Err(Error::PodGone {
                namespace: token.namespace.clone(),
                name: token.pod_name.clone(),
            });
        };
        let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        if pod_uid != token.pod_uid {
            return Err(Error::PodUidMismatch {
                namespace: token.namespace.clone(),
                name: token.pod_name.clone(),
                token_uid: token.pod_uid.clone(),
                pod_uid,
            });
        }
        if pod.metadata.deletion_timestamp.is_some() {
            tracing::debug!(
                namespace = %token.namespace,
                pod = %token.pod_name,
                "pod is terminating; issuing anyway (volumes are still mounted)"
            );
        }
        let pod_node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if pod_node != node {
            return Err(Error::NodeMismatch {
                namespace: token.namespace.clone(),
                name: token.pod_name.clone(),
                pod_node,
                caller_node: node.to_owned(),
            });
        }
        Ok(pod_node)
    }
}
