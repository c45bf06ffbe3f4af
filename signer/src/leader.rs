//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several
//! `credlet ca` replicas exactly one answers PodCertificateRequests and
//! publishes trust bundles.
//!
//! The protocol is client-go's `leaderelection` with a Lease lock:
//!
//! - every `retry_period` a candidate GETs the Lease. It takes it when the
//!   Lease is absent (create), released (empty holder), or its record has
//!   not changed for the record's `leaseDurationSeconds` *as measured by
//!   this process's monotonic clock since it first saw that record* (no
//!   comparison of wall clocks between machines);
//! - every write is a replace guarded by the `resourceVersion` read, so two
//!   candidates can not both win: the loser gets 409 Conflict;
//! - the leader renews every `retry_period`. Leadership is valid until
//!   `renew_deadline` after the *start* of its last successful renewal;
//!   [`Leadership::is_leading`] compares against that instant on every
//!   call, so a replica that can not renew stops writing at its deadline,
//!   `lease_duration − renew_deadline` (5 s by default) before any other
//!   replica may consider the Lease expired;
//! - [`LeaderElector::release`] (on SIGTERM) empties the holder so another
//!   replica takes over at its next retry instead of after expiry.
//!
//! Why not a crate: `kube-leader-election` builds on an older kube and
//! compares wall-clock renew times between machines with no renew deadline
//! (its docs say a split brain of a few seconds is possible);
//! `kube-lease-manager` (kube 5) uses server-side apply and its own
//! grace/duration model without a renew deadline that fences writes. The
//! signer needs a leadership check that fences every status write, which is
//! ~250 lines here.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{SignerError, call};
use crate::metrics::SignerMetrics;

/// Where the Lease lives and how it is timed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease that is not renewed stays held (whole seconds, at
    /// least 1). Default 15 s.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    /// Below `lease_duration`. Default 10 s.
    pub renew_deadline: Duration,
    /// Interval between acquisition attempts and renewals. Below
    /// `renew_deadline`. Default 2 s.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Settings with client-go's defaults (15 s / 10 s / 2 s).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks the settings' consistency; the error names the setting.
    pub fn validate(&self) -> Result<(), SignerError> {
        let bad = |reason: String| Err(SignerError::Config { reason });
        if self.namespace.is_empty() || self.name.is_empty() {
            return bad("the Lease namespace and name must not be empty".into());
        }
        if self.identity.is_empty() {
            return bad("the leader election identity must not be empty".into());
        }
        if self.lease_duration < Duration::from_secs(1) || self.lease_duration.subsec_nanos() != 0 {
            return bad(format!(
                "lease duration {:?} must be whole seconds, at least 1 s",
                self.lease_duration
            ));
        }
        if self.renew_deadline >= self.lease_duration || self.renew_deadline.is_zero() {
            return bad(format!(
                "renew deadline {:?} must be above 0 and below the lease duration {:?}",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period >= self.renew_deadline || self.retry_period.is_zero() {
            return bad(format!(
                "retry period {:?} must be above 0 and below the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    /// `Some(deadline)` while leading: valid until then unless renewed.
    leading_until: Option<Instant>,
}

/// A cheap, cloneable view of this replica's leadership.
#[derive(Clone, Debug)]
pub struct Leadership {
    state: watch::Receiver<State>,
    /// For [`Leadership::always`]: the sender, kept alive with the view.
    _always: Option<Arc<watch::Sender<State>>>,
}

impl Leadership {
    /// Leadership that is always held: for a single replica run without
    /// election (and for tests of the controller alone).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(State {
            leading_until: Some(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)),
        });
        Self {
            state: rx,
            _always: Some(Arc::new(tx)),
        }
    }

    /// Leadership whose deadline has just passed, as between a late renewal
    /// and its success.
    #[cfg(test)]
    pub(crate) fn lapsed() -> Self {
        let (tx, rx) = watch::channel(State {
            leading_until: Some(Instant::now()),
        });
        Self {
            state: rx,
            _always: Some(Arc::new(tx)),
        }
    }

    /// Whether this replica leads *now*: it holds the Lease and its last
    /// renewal started less than the renew deadline ago. Checked before
    /// every write.
    pub fn is_leading(&self) -> bool {
        self.state
            .borrow()
            .leading_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Waits until this replica leads (at once if it does). Returns `false`
    /// if the elector stopped.
    pub async fn wait_leading(&mut self) -> bool {
        loop {
            if self.is_leading() {
                return true;
            }
            if self.state.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Waits until this replica no longer leads (at its renew deadline at
    /// the latest, even if the elector task is stalled).
    pub async fn wait_lost(&mut self) {
        loop {
            let until = self.state.borrow_and_update().leading_until;
            let Some(until) = until else { return };
            if Instant::now() >= until {
                return;
            }
            tokio::select! {
                changed = self.state.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

/// A running elector; dropping it stops campaigning *without* releasing
/// the Lease (as a crash would). Call [`LeaderElector::release`] on a
/// graceful stop.
#[derive(Debug)]
pub struct LeaderElector {
    leadership: Leadership,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    api: Api<Lease>,
    settings: LeaseSettings,
    state: watch::Sender<State>,
    metrics: SignerMetrics,
}

/// holder, renewTime, acquireTime, leaseDurationSeconds, transitions.
type LeaseRecord = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i32>,
);

/// What this replica last saw of the Lease.
#[derive(Debug)]
struct Observed {
    /// holder, renewTime, acquireTime, leaseDurationSeconds, transitions.
    record: LeaseRecord,
    /// When this replica first saw that record.
    at: Instant,
}

impl LeaderElector {
    /// Starts campaigning for the Lease. Must run inside a Tokio runtime.
    pub fn start(
        client: kube::Client,
        settings: LeaseSettings,
        metrics: SignerMetrics,
    ) -> Result<Self, SignerError> {
        settings.validate()?;
        let (state_tx, state_rx) = watch::channel(State {
            leading_until: None,
        });
        let shared = Arc::new(Shared {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            state: state_tx,
            metrics,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(campaign(Arc::clone(&shared), stop_rx));
        Ok(Self {
            leadership: Leadership {
                state: state_rx,
                _always: None,
            },
            stop: Some(stop_tx),
            task: Some(task),
            shared,
        })
    }

    /// This replica's leadership.
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Stops campaigning and, if this replica holds the Lease, releases it
    /// (empty holder, resourceVersion-guarded) so another replica takes over
    /// at once. Callers stop writing first.
    pub async fn release(mut self) -> Result<(), SignerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let was_leading = self.shared.state.borrow().leading_until.is_some();
        self.shared.set_leading(None);
        if !was_leading {
            return Ok(());
        }
        self.shared.release().await
    }
}

impl Drop for LeaderElector {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shared.set_leading(None);
    }
}

impl Shared {
    fn set_leading(&self, until: Option<Instant>) {
        let was = self.state.borrow().leading_until.is_some();
        self.state.send_replace(State {
            leading_until: until,
        });
        if was != until.is_some() {
            tracing::info!(
                lease = %format!("{}/{}", self.settings.namespace, self.settings.name),
                identity = %self.settings.identity,
                leading = until.is_some(),
                "signer leadership changed"
            );
        }
        self.metrics.set_leader(until.is_some());
    }

    fn what(&self, verb: &str) -> String {
        format!(
            "{verb} lease {}/{}",
            self.settings.namespace, self.settings.name
        )
    }

    /// One attempt; `Ok(true)`: this replica holds the Lease now.
    async fn try_acquire_or_renew(
        &self,
        observed: &mut Option<Observed>,
        timeout: Duration,
    ) -> Result<bool, SignerError> {
        let settings = &self.settings;
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let duration_s = i32::try_from(settings.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let current = call(
            || self.what("GET"),
            timeout,
            self.api.get_opt(&settings.name),
        )
        .await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(settings.identity.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match call(
                || self.what("create"),
                timeout,
                self.api.create(&PostParams::default(), &lease),
            )
            .await
            {
                Ok(_) => Ok(true),
                Err(e) if e.status_code() == Some(409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
            spec.acquire_time.as_ref().map(|t| t.0.to_string()),
            spec.lease_duration_seconds,
            spec.lease_transitions,
        );
        let seen_at = match observed {
            Some(o) if o.record == record => o.at,
            _ => {
                let at = Instant::now();
                *observed = Some(Observed { record, at });
                at
            }
        };
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let ours = holder == settings.identity;
        if !holder.is_empty() && !ours {
            let held_for = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(duration_s)).unwrap_or(0),
            );
            if seen_at.elapsed() < held_for {
                return Ok(false);
            }
            tracing::info!(
                previous = holder,
                identity = %settings.identity,
                "signer Lease expired; taking it over"
            );
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(settings.identity.clone());
        new_spec.lease_duration_seconds = Some(duration_s);
        new_spec.renew_time = Some(now.clone());
        if !ours {
            new_spec.acquire_time = Some(now);
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(new_spec);
        // `lease.metadata.resource_version` is the one read: a concurrent
        // writer makes this a 409.
        match call(
            || self.what("update"),
            timeout,
            self.api
                .replace(&settings.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status_code() == Some(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), SignerError> {
        let timeout = self.settings.renew_deadline;
        let Some(mut lease) = call(
            || self.what("GET"),
            timeout,
            self.api.get_opt(&self.settings.name),
        )
        .await?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        lease.spec = Some(spec);
        match call(
            || self.what("release"),
            timeout,
            self.api
                .replace(&self.settings.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => {
                tracing::info!(identity = %self.settings.identity, "signer Lease released");
                Ok(())
            }
            // Someone else wrote it meanwhile: it is not ours to release.
            Err(e) if e.status_code() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

async fn campaign(shared: Arc<Shared>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let settings = shared.settings.clone();
    let mut observed: Option<Observed> = None;
    loop {
        let started = Instant::now();
        let leading_until = shared.state.borrow().leading_until;
        // A renewal must answer before the deadline; an acquisition within
        // one retry period.
        let timeout = match leading_until {
            Some(until) => until
                .saturating_duration_since(started)
                .max(Duration::from_millis(100)),
            None => settings.retry_period,
        };
        // A stop does not wait for an API call in flight (up to the renew
        // deadline): `release` settles the Lease with its own request.
        let attempt = tokio::select! {
            _ = &mut stop => return,
            attempt = shared.try_acquire_or_renew(&mut observed, timeout) => attempt,
        };
        match attempt {
            Ok(true) => shared.set_leading(Some(started + settings.renew_deadline)),
            Ok(false) => {
                if leading_until.is_some() {
                    tracing::warn!(
                        identity = %settings.identity,
                        "signer Lease taken by another replica"
                    );
                }
                shared.set_leading(None);
            }
            Err(error) => {
                tracing::warn!(
                    identity = %settings.identity,
                    error = %error,
                    leading = leading_until.is_some(),
                    "signer Lease acquire/renew failed"
                );
                if leading_until.is_some_and(|until| Instant::now() >= until) {
                    shared.set_leading(None);
                }
            }
        }
        let next = started + settings.retry_period;
        let lapse = shared.state.borrow().leading_until;
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep_until(next) => {}
            () = async {
                match lapse {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::warn!(identity = %settings.identity, "signer renew deadline passed");
                shared.set_leading(None);
                tokio::select! {
                    _ = &mut stop => return,
                    () = tokio::time::sleep_until(next) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let ok = LeaseSettings::new("credlet", "credlet-signer", "ca-0");
        assert!(ok.validate().is_ok());
        let mut s = ok.clone();
        s.renew_deadline = s.lease_duration;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("renew deadline")
        );
        let mut s = ok.clone();
        s.retry_period = s.renew_deadline;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("retry period")
        );
        let mut s = ok.clone();
        s.lease_duration = Duration::from_millis(1500);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("whole seconds")
        );
        let mut s = ok;
        s.identity.clear();
        assert!(s.validate().unwrap_err().to_string().contains("identity"));
    }

    #[tokio::test]
    async fn always_leads() {
        let mut l = Leadership::always();
        assert!(l.is_leading());
        assert!(l.wait_leading().await);
    }
}
