//! The Kubernetes API client of `credlet ca` and the image guard. A
//! kubeconfig that is missing, unreadable or unusable is a configuration
//! error of `--kubeconfig` (exit 64), not a failure at run time.

use std::path::Path;

use crate::config::ConfigError;

/// A client from `--kubeconfig`, else in-cluster or `$KUBECONFIG`;
/// `needs` says what for, in the error when there is none.
pub async fn client(kubeconfig: Option<&Path>, needs: &str) -> Result<kube::Client, ConfigError> {
    let flag = "--kubeconfig";
    let config = match kubeconfig {
        Some(path) => {
            // Its message names the path.
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ConfigError::new(flag, e.to_string()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| ConfigError::new(flag, format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            ConfigError::new(
                flag,
                format!(
                    "not set, and neither in a pod nor $KUBECONFIG gives the Kubernetes API ({e}); {needs}"
                ),
            )
        })?,
    };
    kube::Client::try_from(config)
        .map_err(|e| ConfigError::new(flag, format!("building the Kubernetes client: {e}")))
}
