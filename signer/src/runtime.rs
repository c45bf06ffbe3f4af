//! The signer as `credlet ca` runs it: leader election, the request
//! controller and the trust bundle publisher, started and stopped together.

use std::sync::Arc;

use credlet_ca_service::{KeyStore, ServicePolicy};

use crate::controller::{Signer, SignerSettings};
use crate::error::SignerError;
use crate::leader::{LeaderElector, Leadership, LeaseSettings};
use crate::metrics::SignerMetrics;
use crate::trust_bundle::{PublisherSettings, TrustBundlePublisher};

/// Settings of the whole signer.
#[derive(Clone, Debug)]
pub struct SignerRuntimeSettings {
    /// The request controller.
    pub signer: SignerSettings,
    /// The Lease; `None`: no election, this replica always leads (one
    /// replica only).
    pub lease: Option<LeaseSettings>,
    /// Trust bundle publishing; `None`: not published.
    pub publisher: Option<PublisherSettings>,
}

/// The running signer.
#[derive(Debug)]
pub struct SignerRuntime {
    elector: Option<LeaderElector>,
    leadership: Leadership,
    signer: Signer,
    publisher: Option<TrustBundlePublisher>,
}

impl SignerRuntime {
    /// Starts election, controller and publisher. Must run inside a Tokio
    /// runtime.
    pub async fn start(
        client: kube::Client,
        keys: Arc<KeyStore>,
        policy: Arc<ServicePolicy>,
        settings: SignerRuntimeSettings,
        metrics: SignerMetrics,
    ) -> Result<Self, SignerError> {
        settings.signer.validate()?;
        let elector = settings
            .lease
            .map(|lease| LeaderElector::start(client.clone(), lease, metrics.clone()))
            .transpose()?;
        let leadership = match &elector {
            Some(elector) => elector.leadership(),
            None => {
                metrics.set_leader(true);
                Leadership::always()
            }
        };
        let signer = Signer::start(
            client.clone(),
            Arc::clone(&keys),
            policy,
            leadership.clone(),
            settings.signer,
            metrics.clone(),
        )
        .await?;
        let publisher = settings.publisher.map(|publisher| {
            TrustBundlePublisher::start(client, keys, leadership.clone(), publisher, metrics)
        });
        Ok(Self {
            elector,
            leadership,
            signer,
            publisher,
        })
    }

    /// This replica's leadership.
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Stops writing (workers and publisher), then releases the Lease so
    /// another replica takes over at once.
    pub async fn shutdown(self) -> Result<(), SignerError> {
        self.signer.stop().await;
        drop(self.publisher);
        match self.elector {
            Some(elector) => elector.release().await,
            None => Ok(()),
        }
    }
}
