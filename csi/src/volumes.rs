//! The volume manager: publish, republish, unpublish, renew and recover.
//!
//! Each volume has its own async lock (no global lock on the hot path: the
//! map is sharded). Order of effects on first publish: state record →
//! tmpfs mount → key, CSR, issue → atomic write → state record with the
//! certificate → timer. A crash between any two steps is repaired by
//! [`VolumeManager::recover`] or by the kubelet's retry.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use credlet_ca::{IssuanceRequest, PodIdentity, PrivateKey};
use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::attributes::{ExpandedNames, ServiceAccountToken, VolumeAttributes};
use crate::error::{Error, InputError};
use crate::fsops::{
    self, MountState, NodeSyscalls, Payload, TargetDir, TmpfsOptions, VisibleLinks,
    ensure_visible_links, has_payload, read_current, remove_payload, remove_stale_payloads,
    write_atomically,
};
use crate::issuer::{BoxFuture, IssueRequest, Issuer, IssuerError, NameTemplates};
use crate::metrics::{Metrics, Operation, Outcome};
use crate::paths::{TargetPath, VolumeId};
use crate::rotation::{Renew, RotationHandle};
use crate::schedule::{backoff, renewal_time, until};
use crate::state::{CertificateRecord, RECORD_VERSION, StateStore, VolumeRecord};

/// Settings of the volume manager.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// The kubelet root (canonical); every target path must be below it.
    pub kubelet_root: PathBuf,
    /// Where volume records are kept.
    pub state_dir: PathBuf,
    /// Audience of the service account token handed to the issuer.
    pub token_audience: String,
    /// Size limit of each volume's tmpfs.
    pub tmpfs_size_bytes: u64,
    /// First retry delay after an issuer failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
}

impl VolumeConfig {
    /// Defaults for a kubelet root and state directory.
    pub fn new(kubelet_root: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            kubelet_root,
            state_dir,
            token_audience: "credlet-ca".into(),
            tmpfs_size_bytes: 1 << 20,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
        }
    }
}

/// A validated `NodePublishVolume` request.
#[derive(Debug)]
pub struct PublishRequest {
    /// Volume id.
    pub volume_id: VolumeId,
    /// Target path.
    pub target: TargetPath,
    /// The `credlet.io/` attributes as sent.
    pub raw_attributes: BTreeMap<String, String>,
    /// The parsed attributes.
    pub attributes: VolumeAttributes,
    /// The pod, from `podInfoOnMount`.
    pub pod: PodIdentity,
    /// The pod's token for the issuer's audience.
    pub token: Option<ServiceAccountToken>,
    /// The group from `volume_mount_group`.
    pub volume_mount_group: Option<u32>,
}

/// What [`VolumeManager::update_trust_bundle`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BundleUpdateReport {
    /// Volumes whose bundle file was replaced.
    pub updated: usize,
    /// Volumes that already had the bundle, or no files yet.
    pub unchanged: usize,
    /// Volumes whose files could not be read or written.
    pub failed: usize,
}

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Volumes whose files were intact; timers resumed.
    pub resumed: usize,
    /// Volumes scheduled for immediate re-issue (missing, mismatched,
    /// expired or due).
    pub reissue: usize,
    /// Records dropped because their target directory is gone.
    pub gone: usize,
    /// Records that could not be used.
    pub failed: usize,
}

#[derive(Debug)]
struct Volume {
    target: TargetPath,
    /// The parsed attributes, shared with the other volumes that sent
    /// the same ones; their fingerprint tells a republish from a
    /// conflicting publish without keeping a copy of the attributes as sent.
    attributes: SharedAttributes,
    names: ExpandedNames,
    pod: PodIdentity,
    volume_mount_group: Option<u32>,
    /// The pod's latest token, held only while the next renewal may
    /// need it (see [`Volume::retain_token`]).
    token: Option<HeldToken>,
    certificate: Option<CertificateRecord>,
    failures: u32,
    /// A renewal fell due without a usable token: the next republish
    /// (which brings one) renews at once.
    awaiting_token: bool,
}

impl Volume {
    /// Keeps the token only while it can serve the next renewal and that
    /// renewal is near or can not wait:
    ///
    /// - a token that expires before the renewal point could not serve it
    ///   (the kubelet's are valid for an hour, certificates often for a
    ///   day);
    /// - a renewal more than [`TOKEN_HOLD_AHEAD`] away whose certificate
    ///   stays valid at least [`REPUBLISH_SLACK`] past it does not need
    ///   the token held: the kubelet republishes every minute or two with
    ///   a fresh one, and one arriving within the hold window is kept;
    ///   if none does, the renewal waits for the next (see
    ///   [`VolumeManager::renew`]), which the slack easily allows.
    ///
    /// So 10,000 volumes of hour-long certificates hold the tokens of the
    /// few renewing soon, not 10,000 credentials of about 1 KB each.
    fn retain_token(&mut self, now: SystemTime) {
        let Some(certificate) = self.certificate.as_ref() else {
            return;
        };
        let renew_at = from_millis(certificate.renew_at_ms);
        let slack = until(from_secs(certificate.not_after), renew_at);
        let needed = renew_at <= now + TOKEN_HOLD_AHEAD || slack < REPUBLISH_SLACK;
        // With a margin: the renewal starts a little after its point.
        if !needed
            || self
                .token
                .as_ref()
                .is_some_and(|t| !t.token.valid_at(renew_at + TOKEN_MARGIN))
        {
            self.token = None;
        }
    }

    /// A token that still proves the pod's identity now.
    fn usable_token(&self, now: SystemTime) -> bool {
        self.token.as_ref().is_some_and(|t| t.token.valid_at(now))
    }

    fn gid(&self) -> Option<u32> {
        self.attributes.fs_group.or(self.volume_mount_group)
    }

    fn record(&self, id: &VolumeId, attributes: &BTreeMap<String, String>) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            volume_id: id.to_string(),
            target_path: self.target.as_path().to_owned(),
            pod: self.pod.clone(),
            attributes: attributes.clone(),
            volume_mount_group: self.volume_mount_group,
            certificate: self.certificate.clone(),
        }
    }

    fn has_valid_certificate(&self, now: SystemTime) -> bool {
        self.certificate
            .as_ref()
            .is_some_and(|c| c.not_after > secs(now))
    }
}

type Slot = Arc<Mutex<Option<Volume>>>;

/// Publishes volumes and keeps their certificates fresh.
#[derive(Debug)]
pub struct VolumeManager {
    config: VolumeConfig,
    root: OwnedFd,
    issuer: Arc<dyn Issuer>,
    syscalls: Arc<dyn NodeSyscalls>,
    state: StateStore,
    volumes: DashMap<VolumeId, Slot>,
    attribute_sets: AttributeSets,
    rotation: RotationHandle,
    metrics: Metrics,
    recovered: AtomicBool,
}

fn fingerprint(attributes: &BTreeMap<String, String>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    attributes.hash(&mut hasher);
    hasher.finish()
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_secs(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Shortest wait before a renewal, so a certificate whose renewal point has
/// already passed (very short lifetimes) can not make the loop spin.
const MIN_RENEWAL_DELAY: Duration = Duration::from_millis(50);
/// A token is kept for a renewal only if it is still valid this long after
/// the renewal point (the renewal starts a little after it).
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// A token is held for a renewal due within this long.
const TOKEN_HOLD_AHEAD: Duration = Duration::from_secs(5 * 60);
/// A certificate valid at least this long past its renewal point can wait
/// for a republish to bring a token; the kubelet republishes every minute
/// or two.
const REPUBLISH_SLACK: Duration = Duration::from_secs(10 * 60);

/// The parsed attributes of the published volumes, one copy per distinct
/// set: the pods of one workload send the same attributes, so 10,000
/// volumes hold a handful of sets instead of 10,000 copies. An entry
/// lives as long as a volume uses it.
#[derive(Debug, Default)]
struct AttributeSets {
    by_fingerprint: Arc<DashMap<u64, Weak<VolumeAttributes>>>,
}

impl AttributeSets {
    /// The shared copy of `attributes` (whose raw form hashes to
    /// `fingerprint`), made the shared copy if there is none.
    fn share(&self, fingerprint: u64, attributes: VolumeAttributes) -> SharedAttributes {
        let shared = match self.by_fingerprint.entry(fingerprint) {
            dashmap::Entry::Occupied(mut entry) => match entry.get().upgrade() {
                Some(existing) if *existing == attributes => existing,
                // Gone, or (rarely) other attributes with the same hash:
                // this set takes the entry, the other keeps its copy.
                _ => {
                    let fresh = Arc::new(attributes);
                    entry.insert(Arc::downgrade(&fresh));
                    fresh
                }
            },
            dashmap::Entry::Vacant(entry) => {
                let fresh = Arc::new(attributes);
                entry.insert(Arc::downgrade(&fresh));
                fresh
            }
        };
        SharedAttributes {
            attributes: Some(shared),
            fingerprint,
            sets: Arc::clone(&self.by_fingerprint),
        }
    }
}

/// One volume's use of a shared attribute set; the last user removes the
/// set's entry.
struct SharedAttributes {
    /// Always `Some` until dropped.
    attributes: Option<Arc<VolumeAttributes>>,
    /// Hash of the `credlet.io/` attributes as sent.
    fingerprint: u64,
    sets: Arc<DashMap<u64, Weak<VolumeAttributes>>>,
}

impl std::ops::Deref for SharedAttributes {
    type Target = VolumeAttributes;

    fn deref(&self) -> &VolumeAttributes {
        self.attributes
            .as_deref()
            .expect("shared attributes are present until dropped")
    }
}

impl Drop for SharedAttributes {
    fn drop(&mut self) {
        let Some(attributes) = self.attributes.take() else {
            return;
        };
        // The reference goes first, then the entry if no reference is
        // left: of two last users dropping at once, each sees the other's
        // reference gone by the time it checks, and at least one removes
        // it. The check runs under the entry's lock, where `share`
        // upgrades, so no new reference can appear meanwhile; the `Weak`
        // held here keeps the allocation, so the pointer can not be
        // another set's.
        let weak = Arc::downgrade(&attributes);
        drop(attributes);
        self.sets.remove_if(&self.fingerprint, |_, entry| {
            Weak::ptr_eq(entry, &weak) && entry.strong_count() == 0
        });
    }
}

impl fmt::Debug for SharedAttributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// A pod's token held by its volume, counted in
/// `credlet_csi_tokens_held` while it lives.
struct HeldToken {
    token: ServiceAccountToken,
    held: Gauge,
}

impl HeldToken {
    fn new(token: ServiceAccountToken, held: &Gauge) -> Self {
        held.inc();
        Self {
            token,
            held: held.clone(),
        }
    }
}

impl Drop for HeldToken {
    fn drop(&mut self) {
        self.held.dec();
    }
}

impl fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.token.fmt(f)
    }
}

impl VolumeManager {
    /// Opens the kubelet root and the state directory.
    pub fn new(
        config: VolumeConfig,
        issuer: Arc<dyn Issuer>,
        syscalls: Arc<dyn NodeSyscalls>,
        rotation: RotationHandle,
        metrics: Metrics,
    ) -> Result<Self, Error> {
        let root = fsops::open_root(&config.kubelet_root)?;
        let state = StateStore::open(&config.state_dir)?;
        Ok(Self {
            config,
            root,
            issuer,
            syscalls,
            state,
            volumes: DashMap::new(),
            attribute_sets: AttributeSets::default(),
            rotation,
            metrics,
            recovered: AtomicBool::new(false),
        })
    }

    /// The settings.
    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    /// Ready for CSI calls: recovery ran and the issuer is usable.
    pub fn is_ready(&self) -> bool {
        self.recovered.load(Ordering::Acquire) && self.issuer.is_ready()
    }

    /// The manager's metrics (register them with [`Metrics::register`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Number of volumes managed.
    pub fn volume_count(&self) -> usize {
        self.volumes.len()
    }

    /// The earliest `notAfter` among the certificates in managed volumes
    /// (for metrics and alerts). Volumes being written right now are
    /// skipped rather than waited for: their certificate is being replaced.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.volumes
            .iter()
            .filter_map(|slot| {
                let guard = slot.value().try_lock().ok()?;
                guard.as_ref()?.certificate.as_ref().map(|c| c.not_after)
            })
            .min()
            .map(from_secs)
    }

    /// Each volume with a certificate: its pod, volume id and notAfter
    /// (Unix seconds). A volume busy at this instant is skipped, as in
    /// [`Self::earliest_expiry`].
    pub fn expiries(&self) -> Vec<VolumeExpiry> {
        self.volumes
            .iter()
            .filter_map(|slot| {
                let guard = slot.value().try_lock().ok()?;
                let volume = guard.as_ref()?;
                Some(VolumeExpiry {
                    namespace: volume.pod.namespace.clone(),
                    pod: volume.pod.name.clone(),
                    volume: slot.key().to_string(),
                    not_after: volume.certificate.as_ref()?.not_after,
                })
            })
            .collect()
    }

    fn slot(&self, id: &VolumeId) -> Slot {
        Arc::clone(self.volumes.entry(id.clone()).or_default().value())
    }

    /// The volume's slot, locked, and still the one in the table: an
    /// unpublish may forget an empty slot between its look-up and the
    /// lock, and a volume put into a forgotten slot would never be renewed
    /// or unpublished.
    async fn lock_slot(&self, id: &VolumeId) -> (Slot, OwnedMutexGuard<Option<Volume>>) {
        loop {
            let slot = self.slot(id);
            let guard = Arc::clone(&slot).lock_owned().await;
            if self
                .volumes
                .get(id)
                .is_some_and(|current| Arc::ptr_eq(current.value(), &slot))
            {
                return (slot, guard);
            }
        }
    }

    fn forget_slot_if_empty(&self, id: &VolumeId, slot: &Slot) {
        self.volumes.remove_if(id, |_, v| {
            Arc::ptr_eq(v, slot) && v.try_lock().is_ok_and(|g| g.is_none())
        });
    }

    /// `NodePublishVolume`: first publish issues; a republish refreshes the
    /// token and only re-issues if the volume's certificate is gone or
    /// expired.
    pub async fn publish(&self, request: PublishRequest) -> Result<(), Error> {
        if self.issuer.requires_token() && request.token.is_none() {
            return Err(InputError::MissingToken {
                audience: self.config.token_audience.clone(),
            }
            .into());
        }
        // Before any disk access: a remote issuer without its own client
        // certificate yet can not issue.
        if !self.issuer.is_ready() {
            return Err(Error::NotReady {
                reason: "the issuer is not ready (no CA client certificate yet); retry later",
            });
        }
        let names = request
            .attributes
            .expand(&request.pod, self.issuer.trust_domain())?;
        let id = request.volume_id.clone();
        let (slot, mut guard) = self.lock_slot(&id).await;
        if let Some(volume) = guard.as_mut() {
            return self.republish(&id, volume, request).await;
        }
        let target = TargetDir::open_parent(&self.root, &request.target)?.ok_or_else(|| {
            Error::TargetParentMissing {
                path: request.target.as_path().to_owned(),
            }
        })?;
        let mut volume = Volume {
            target: request.target,
            attributes: self
                .attribute_sets
                .share(fingerprint(&request.raw_attributes), request.attributes),
            names,
            pod: request.pod,
            volume_mount_group: request.volume_mount_group,
            token: request
                .token
                .map(|t| HeldToken::new(t, &self.metrics.tokens_held)),
            certificate: None,
            failures: 0,
            awaiting_token: false,
        };
        let started = Instant::now();
        let result = async {
            // The record goes first: a crash after mounting must be found.
            self.state
                .save(&id, &volume.record(&id, &request.raw_attributes))?;
            let dir = self.ensure_mounted(&target, volume.gid())?;
            let certificate = self
                .issue_into(&id, &volume, &dir, VisibleLinks::Verify)
                .await?;
            volume.certificate = Some(certificate);
            self.state
                .save(&id, &volume.record(&id, &request.raw_attributes))?;
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                volume.retain_token(SystemTime::now());
                let renew_at = volume.certificate.as_ref().map_or(0, |c| c.renew_at_ms);
                self.rotation.schedule(
                    id.clone(),
                    until(from_millis(renew_at), SystemTime::now()).max(MIN_RENEWAL_DELAY),
                );
                self.metrics
                    .issued(Operation::Publish, Outcome::Success, started.elapsed());
                tracing::info!(
                    volume_id = %id,
                    pod = %format_args!("{}/{}", volume.pod.namespace, volume.pod.name),
                    target = %volume.target.as_path().display(),
                    serial = volume.certificate.as_ref().map_or("", |c| c.serial_hex.as_str()),
                    "volume published"
                );
                *guard = Some(volume);
                self.metrics.volumes.set(self.volumes.len() as i64);
                Ok(())
            }
            Err(error) => {
                self.metrics
                    .issued(Operation::Publish, Outcome::Error, started.elapsed());
                tracing::warn!(volume_id = %id, %error, "publish failed; undoing");
                let files: Vec<&str> = volume.attributes.files.iter().collect();
                if let Err(cleanup) = self.teardown(&id, &target, Owner::Written(&files)) {
                    tracing::error!(volume_id = %id, error = %cleanup, "cleanup after failed publish");
                }
                if let Err(cleanup) = self.state.remove(&id) {
                    tracing::error!(volume_id = %id, error = %cleanup, "cleanup after failed publish");
                }
                drop(guard);
                self.forget_slot_if_empty(&id, &slot);
                Err(error)
            }
        }
    }

    async fn republish(
        &self,
        id: &VolumeId,
        volume: &mut Volume,
        request: PublishRequest,
    ) -> Result<(), Error> {
        if volume.target != request.target {
            return Err(Error::AlreadyPublished {
                volume_id: id.to_string(),
                existing_target: volume.target.as_path().to_owned(),
                difference: "a different target path",
            });
        }
        if volume.attributes.fingerprint != fingerprint(&request.raw_attributes)
            || volume.pod != request.pod
            || volume.volume_mount_group != request.volume_mount_group
        {
            return Err(Error::AlreadyPublished {
                volume_id: id.to_string(),
                existing_target: volume.target.as_path().to_owned(),
                difference: "different attributes",
            });
        }
        if let Some(token) = request.token {
            volume.token = Some(HeldToken::new(token, &self.metrics.tokens_held));
            if volume.failures > 0 || volume.awaiting_token {
                // A fresh token may be what the renewal waited for or what
                // the failing renewals lacked. It is kept for that renewal
                // (scheduled now): the renewal point has passed, so
                // `retain_token` below counts it as needed.
                volume.awaiting_token = false;
                self.rotation.schedule(id.clone(), Duration::ZERO);
            }
        }
        if volume.has_valid_certificate(SystemTime::now()) {
            let intact = TargetDir::open_parent(&self.root, &volume.target)?
                .map(|t| t.open())
                .transpose()?
                .flatten()
                .is_some_and(|dir| {
                    has_payload(&dir)
                        && ensure_visible_links(
                            &dir,
                            &volume.attributes.files.iter().collect::<Vec<_>>(),
                        )
                        .is_ok()
                });
            if intact {
                self.metrics.republishes.inc();
                // Not needed before the renewal: let it go (a renewal that
                // is due already has its timer armed and keeps it).
                if !volume.awaiting_token && volume.failures == 0 {
                    volume.retain_token(SystemTime::now());
                }
                return Ok(());
            }
        }
        // The repair uses the token just received; it is let go after.
        self.repair(id, volume, Operation::Repair).await.map(|_| ())
    }

    /// Re-issues into an already known volume and re-arms its timer.
    async fn repair(
        &self,
        id: &VolumeId,
        volume: &mut Volume,
        operation: Operation,
    ) -> Result<Duration, Error> {
        let target = TargetDir::open_parent(&self.root, &volume.target)?.ok_or_else(|| {
            Error::TargetParentMissing {
                path: volume.target.as_path().to_owned(),
            }
        })?;
        let started = Instant::now();
        let result = async {
            let dir = self.ensure_mounted(&target, volume.gid())?;
            // A routine renewal after a successful write: the visible links
            // are the ones that write made.
            let links = if operation == Operation::Renew && volume.failures == 0 {
                VisibleLinks::AsWritten
            } else {
                VisibleLinks::Verify
            };
            self.issue_into(id, volume, &dir, links).await
        }
        .await;
        match result {
            Ok(certificate) => {
                let next = until(from_millis(certificate.renew_at_ms), SystemTime::now())
                    .max(MIN_RENEWAL_DELAY);
                // Routine renewals are the steady state of 10,000 volumes: debug
                // level; a repair (missing, mismatched or expired files) is news.
                if operation == Operation::Renew {
                    tracing::debug!(
                        volume_id = %id,
                        serial = %certificate.serial_hex,
                        renew_in_s = next.as_secs(),
                        "certificate renewed"
                    );
                } else {
                    tracing::info!(
                        volume_id = %id,
                        pod = %format_args!("{}/{}", volume.pod.namespace, volume.pod.name),
                        serial = %certificate.serial_hex,
                        renew_in_s = next.as_secs(),
                        ?operation,
                        "certificate reissued"
                    );
                }
                volume.certificate = Some(certificate);
                volume.failures = 0;
                volume.awaiting_token = false;
                volume.retain_token(SystemTime::now());
                self.metrics
                    .issued(operation, Outcome::Success, started.elapsed());
                // The record is not rewritten: recovery reads the facts of
                // the current certificate back from the volume itself.
                self.rotation.schedule(id.clone(), next);
                Ok(next)
            }
            Err(error) => {
                self.metrics
                    .issued(operation, Outcome::Error, started.elapsed());
                Err(error)
            }
        }
    }

    /// Mounts the volume's tmpfs if it is not mounted yet and opens it.
    /// A mount that is not credlet's is never written into.
    fn ensure_mounted(&self, target: &TargetDir, gid: Option<u32>) -> Result<OwnedFd, Error> {
        let open = || {
            target.open()?.ok_or_else(|| Error::TargetParentMissing {
                path: target.path().to_owned(),
            })
        };
        let dir = match target.open()? {
            Some(dir) => dir,
            None => {
                target.create()?;
                open()?
            }
        };
        let options = TmpfsOptions {
            size_bytes: self.config.tmpfs_size_bytes,
            gid,
        };
        if !self.syscalls.mounts() {
            self.syscalls
                .mount_tmpfs(dir.as_fd(), options)
                .map_err(|e| Error::io("prepare volume directory", target.path(), e))?;
            return Ok(dir);
        }
        match target.mount_state(&dir)? {
            MountState::Credlet => return Ok(dir),
            MountState::Foreign { description } => {
                return Err(Error::ForeignMount {
                    path: target.path().to_owned(),
                    mount: description,
                });
            }
            MountState::NotMounted => {}
        }
        self.syscalls
            .mount_tmpfs(dir.as_fd(), options)
            .map_err(|e| Error::io("mount tmpfs", target.path(), e))?;
        let mounted = open()?;
        if target.mount_state(&mounted)? != MountState::Credlet {
            return Err(Error::io(
                "mount tmpfs",
                target.path(),
                std::io::Error::other("credlet's tmpfs not visible at the target after mounting"),
            ));
        }
        Ok(mounted)
    }

    /// Takes a target down as far as it is credlet's to take down (see
    /// [`teardown_step`]): unmounts only credlet's tmpfs, removes only files
    /// credlet wrote and the directory only when that leaves it empty.
    fn teardown(&self, id: &VolumeId, target: &TargetDir, owner: Owner<'_>) -> Result<(), Error> {
        // Mounts can be stacked (a mount made twice); a bound, not a loop
        // that trusts the kernel to run out of them.
        for _ in 0..8 {
            let Some(dir) = target.open()? else {
                return Ok(());
            };
            let state = if self.syscalls.mounts() {
                target.mount_state(&dir)?
            } else {
                MountState::NotMounted
            };
            match teardown_step(owner.is_written(), self.syscalls.mounts(), &state) {
                TeardownStep::Unmount => self
                    .syscalls
                    .unmount(dir.as_fd())
                    .map_err(|e| Error::io("unmount", target.path(), e))?,
                TeardownStep::Refuse => {
                    return Err(Error::ForeignMount {
                        path: target.path().to_owned(),
                        mount: mount_description(state),
                    });
                }
                TeardownStep::Leave => {
                    tracing::warn!(
                        volume_id = %id,
                        target = %target.path().display(),
                        mount = %mount_description(state),
                        "unpublish of a volume credlet has no record of: the target is a mount that is not credlet's; leaving it"
                    );
                    return Ok(());
                }
                TeardownStep::RemoveDirectory { payload } => {
                    if payload && let Owner::Written(files) = owner {
                        remove_payload(&dir, files)
                            .map_err(|e| Error::io("remove volume files", target.path(), e))?;
                    }
                    drop(dir);
                    if !target.remove_if_empty()? {
                        tracing::warn!(
                            volume_id = %id,
                            target = %target.path().display(),
                            "the target directory holds files that are not credlet's; leaving it"
                        );
                    }
                    return Ok(());
                }
            }
        }
        Err(Error::io(
            "unmount",
            target.path(),
            std::io::Error::other("still mounted after 8 unmounts"),
        ))
    }

    /// Generates a key on the node, sends only the CSR, checks the answer
    /// and writes key, chain and bundle atomically.
    async fn issue_into(
        &self,
        id: &VolumeId,
        volume: &Volume,
        dir: &OwnedFd,
        links: VisibleLinks,
    ) -> Result<CertificateRecord, Error> {
        let crypto = |source| Error::Crypto {
            volume_id: id.to_string(),
            source,
        };
        let key = PrivateKey::generate(volume.attributes.key_type).map_err(crypto)?;
        let request = IssueRequest {
            request: IssuanceRequest {
                csr_der: Vec::new(),
                identity: volume.pod.clone(),
                spiffe_id: Some(volume.names.spiffe_id.clone()),
                dns_names: volume.names.dns_names.clone(),
                ip_addresses: volume.attributes.ip_addresses.clone(),
                common_name: volume.names.common_name.clone(),
                duration: volume.attributes.duration,
            },
            token: volume.token.as_ref().map(|t| t.token.clone()),
            templates: NameTemplates {
                dns_names: volume.attributes.dns_names.clone(),
                common_name: volume.attributes.common_name.clone(),
                spiffe_id: volume.attributes.spiffe_id.to_string(),
            },
            renew_before: volume.attributes.renew_before,
        };
        let issued = self
            .issuer
            .issue(&key, request)
            .await
            .map_err(|source| Error::Issue {
                volume_id: id.to_string(),
                source,
            })?;
        // Never hand a pod a certificate that does not belong to its key.
        let leaf = credlet_ca::inspect_leaf(&issued.chain_pem).map_err(crypto)?;
        if leaf.public_key_der != key.public_key_der() {
            return Err(Error::Issue {
                volume_id: id.to_string(),
                source: IssuerError::Internal {
                    reason: "issued certificate does not match the key".into(),
                },
            });
        }
        let gid = volume.gid();
        let key_mode = if gid.is_some() { 0o440 } else { 0o400 };
        let files = &volume.attributes.files;
        let bundle;
        let mut payload = Vec::with_capacity(4);
        payload.push(Payload {
            name: &files.key,
            contents: key.pem().as_bytes(),
            mode: key_mode,
        });
        payload.push(Payload {
            name: &files.certificate,
            contents: issued.chain_pem.as_bytes(),
            mode: 0o444,
        });
        payload.push(Payload {
            name: &files.ca,
            contents: issued.trust_bundle_pem.as_bytes(),
            mode: 0o444,
        });
        if let Some(name) = &files.credential_bundle {
            bundle = zeroize::Zeroizing::new(
                [key.pem().as_bytes(), issued.chain_pem.as_bytes()].concat(),
            );
            payload.push(Payload {
                name,
                contents: &bundle,
                mode: key_mode,
            });
        }
        write_atomically(self.syscalls.as_ref(), dir, &payload, gid, links)
            .map_err(|e| Error::io("write volume files", volume.target.as_path(), e))?;
        // The issuer's renewal point if it gave a sane one (a remote CA
        // spreads renewals), else a point in the volume's window.
        let renew_at = issued
            .renew_at
            .filter(|at| *at >= issued.not_before && *at < issued.not_after)
            .unwrap_or_else(|| {
                renewal_time(
                    issued.not_before,
                    issued.not_after,
                    volume.attributes.renew_before,
                    fastrand::f64(),
                )
            });
        Ok(CertificateRecord {
            serial_hex: issued.serial_hex,
            not_before: secs(issued.not_before),
            not_after: secs(issued.not_after),
            renew_at_ms: millis(renew_at),
        })
    }

    /// `NodeUnpublishVolume`: stops rotation, unmounts, removes the target
    /// directory and the record. Unknown volumes are fine (idempotent), but
    /// for them only credlet's own tmpfs is unmounted and only an empty
    /// directory removed: a volume id credlet never published does not make
    /// another volume's files credlet's.
    pub async fn unpublish(&self, id: &VolumeId, target: &TargetPath) -> Result<(), Error> {
        let slot = self.volumes.get(id).map(|s| Arc::clone(s.value()));
        let mut guard = match &slot {
            Some(slot) => Some(slot.clone().lock_owned().await),
            None => None,
        };
        let files: Option<Vec<&str>> = match guard.as_ref().and_then(|g| g.as_ref()) {
            Some(volume) if volume.target != *target => {
                tracing::warn!(
                    volume_id = %id,
                    published = %volume.target.as_path().display(),
                    requested = %target.as_path().display(),
                    "unpublish for a target the volume is not published at; leaving it"
                );
                return Ok(());
            }
            Some(volume) => Some(volume.attributes.files.iter().collect()),
            None => {
                if let Some(other) = self.volume_published_at(id, target).await {
                    tracing::warn!(
                        volume_id = %id,
                        published_volume = %other,
                        target = %target.as_path().display(),
                        "unpublish of an unknown volume id for the target of another volume; leaving it"
                    );
                    return Ok(());
                }
                None
            }
        };
        self.rotation.cancel(id.clone());
        if let Some(dir) = TargetDir::open_parent(&self.root, target)? {
            let owner = match &files {
                Some(files) => Owner::Written(files),
                None => Owner::Unknown,
            };
            self.teardown(id, &dir, owner)?;
        }
        drop(files);
        self.state.remove(id)?;
        if let Some(g) = guard.as_mut()
            && let Some(volume) = g.take()
        {
            tracing::info!(
                volume_id = %id,
                pod = %format_args!("{}/{}", volume.pod.namespace, volume.pod.name),
                "volume unpublished"
            );
        }
        drop(guard);
        if let Some(slot) = slot {
            self.forget_slot_if_empty(id, &slot);
        }
        self.metrics.volumes.set(self.volumes.len() as i64);
        Ok(())
    }

    /// The id of another volume published at `target`, if any. Slots busy
    /// with a publish or renewal are waited for: they may be that volume.
    async fn volume_published_at(&self, id: &VolumeId, target: &TargetPath) -> Option<VolumeId> {
        let slots: Vec<(VolumeId, Slot)> = self
            .volumes
            .iter()
            .filter(|entry| entry.key() != id)
            .map(|entry| (entry.key().clone(), Arc::clone(entry.value())))
            .collect();
        for (other, slot) in slots {
            let guard = match slot.try_lock() {
                Ok(guard) => guard,
                Err(_) => slot.lock().await,
            };
            if guard.as_ref().is_some_and(|v| v.target == *target) {
                return Some(other);
            }
        }
        None
    }

    /// Writes a new trust bundle into every published volume WITHOUT
    /// re-issuing: key and certificate are read back from the current
    /// payload and written again, with the new bundle, through the same
    /// atomic `..data` swap. At most `concurrency` volumes at once; volumes
    /// that already carry this bundle are left alone.
    pub async fn update_trust_bundle(
        self: &Arc<Self>,
        bundle_pem: Arc<str>,
        concurrency: usize,
    ) -> BundleUpdateReport {
        let ids: Vec<VolumeId> = self.volumes.iter().map(|e| e.key().clone()).collect();
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut report = BundleUpdateReport::default();
        let tally = |report: &mut BundleUpdateReport, done| match done {
            Ok(Ok(true)) => report.updated += 1,
            Ok(Ok(false)) => report.unchanged += 1,
            Ok(Err((id, error))) => {
                report.failed += 1;
                tracing::warn!(volume_id = %id, %error, "writing the new trust bundle failed");
            }
            Err(error) => {
                report.failed += 1;
                tracing::error!(%error, "trust bundle update task failed");
            }
        };
        for id in ids {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let manager = Arc::clone(self);
            let bundle = Arc::clone(&bundle_pem);
            tasks.spawn(async move {
                let _permit = permit;
                manager
                    .swap_trust_bundle(&id, &bundle)
                    .await
                    .map_err(|e| (id, e))
            });
            while let Some(done) = tasks.try_join_next() {
                tally(&mut report, done);
            }
        }
        while let Some(done) = tasks.join_next().await {
            tally(&mut report, done);
        }
        tracing::info!(
            updated = report.updated,
            unchanged = report.unchanged,
            failed = report.failed,
            "trust bundle written into published volumes"
        );
        report
    }

    /// One volume's bundle swap; `Ok(false)` when there is nothing to do.
    async fn swap_trust_bundle(&self, id: &VolumeId, bundle_pem: &str) -> Result<bool, Error> {
        let Some(slot) = self.volumes.get(id).map(|s| Arc::clone(s.value())) else {
            return Ok(false);
        };
        let guard = slot.lock().await;
        let Some(volume) = guard.as_ref() else {
            return Ok(false);
        };
        let Some(dir) = TargetDir::open_parent(&self.root, &volume.target)?
            .map(|t| t.open())
            .transpose()?
            .flatten()
        else {
            return Ok(false);
        };
        let files = &volume.attributes.files;
        let names: Vec<&str> = files.iter().collect();
        // Nothing written yet (or an incomplete set): the next issuance
        // writes the bundle the CA returns with it.
        let Some(contents) = read_current(&dir, &names)
            .map_err(|e| Error::io("read volume files", volume.target.as_path(), e))?
        else {
            return Ok(false);
        };
        let contents: Vec<zeroize::Zeroizing<Vec<u8>>> =
            contents.into_iter().map(zeroize::Zeroizing::new).collect();
        if contents[2].as_slice() == bundle_pem.as_bytes() {
            return Ok(false);
        }
        let gid = volume.gid();
        let key_mode = if gid.is_some() { 0o440 } else { 0o400 };
        let mut payload = vec![
            Payload {
                name: &files.key,
                contents: &contents[0],
                mode: key_mode,
            },
            Payload {
                name: &files.certificate,
                contents: &contents[1],
                mode: 0o444,
            },
            Payload {
                name: &files.ca,
                contents: bundle_pem.as_bytes(),
                mode: 0o444,
            },
        ];
        if let Some(name) = &files.credential_bundle {
            payload.push(Payload {
                name,
                contents: &contents[3],
                mode: key_mode,
            });
        }
        write_atomically(
            self.syscalls.as_ref(),
            &dir,
            &payload,
            gid,
            VisibleLinks::Verify,
        )
        .map_err(|e| Error::io("write volume files", volume.target.as_path(), e))?;
        tracing::debug!(volume_id = %id, "trust bundle updated");
        Ok(true)
    }

    /// Renews one volume (called by the rotation loop). Returns when it is
    /// due next, or `None` when there is nothing to arm: the volume is
    /// gone, or its renewal waits for the republish that re-arms it.
    pub async fn renew(&self, id: &VolumeId) -> Option<Duration> {
        let slot = self.volumes.get(id).map(|s| Arc::clone(s.value()))?;
        let mut guard = slot.lock().await;
        let volume = guard.as_mut()?;
        let now = SystemTime::now();
        // A timer that fired while another renewal of this volume ran (a
        // republish asked for one, and its own repair got there first):
        // nothing is due yet.
        if volume.failures == 0
            && !volume.awaiting_token
            && let Some(certificate) = &volume.certificate
            && certificate.renew_at_ms > millis(now)
            && volume.has_valid_certificate(now)
        {
            return Some(until(from_millis(certificate.renew_at_ms), now));
        }
        if self.issuer.requires_token() && !volume.usable_token(now) {
            // No CA call without a token: wait for the kubelet's next
            // republish, which brings a fresh one and renews at once. The
            // current certificate stays in place meanwhile.
            if !volume.awaiting_token {
                volume.awaiting_token = true;
                self.metrics.awaiting_token.inc();
                tracing::info!(
                    volume_id = %id,
                    pod = %format_args!("{}/{}", volume.pod.namespace, volume.pod.name),
                    "renewal due; waiting for the kubelet's next republish to bring a fresh token"
                );
            }
            volume.token = None;
            // The republish that brings a token schedules the renewal;
            // arming a timer here could override that.
            return None;
        }
        let operation = if volume.has_valid_certificate(now) {
            Operation::Renew
        } else {
            Operation::Repair
        };
        match self.repair(id, volume, operation).await {
            Ok(next) => Some(next),
            Err(Error::TargetParentMissing { path }) => {
                tracing::warn!(volume_id = %id, target = %path.display(), "target directory is gone; forgetting the volume");
                let _ = self.state.remove(id);
                guard.take();
                drop(guard);
                self.forget_slot_if_empty(id, &slot);
                self.metrics.volumes.set(self.volumes.len() as i64);
                None
            }
            Err(error) => {
                let attempt = volume.failures;
                volume.failures = volume.failures.saturating_add(1);
                let delay = backoff(
                    attempt,
                    self.config.backoff_base,
                    self.config.backoff_cap,
                    fastrand::f64(),
                );
                let expires_in = volume
                    .certificate
                    .as_ref()
                    .map(|c| until(from_secs(c.not_after), SystemTime::now()).as_secs());
                tracing::warn!(
                    volume_id = %id,
                    pod = %format_args!("{}/{}", volume.pod.namespace, volume.pod.name),
                    %error,
                    attempt = volume.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    current_certificate_expires_in_s = expires_in,
                    "renewal failed; keeping the current certificate and retrying"
                );
                Some(delay)
            }
        }
    }

    /// Reloads every recorded volume after a restart: checks the files on
    /// each target, removes leftovers of interrupted writes, and arms
    /// timers — immediately for volumes whose files are missing,
    /// mismatched, expired or due.
    pub async fn recover(&self) -> Result<RecoveryReport, Error> {
        let (records, bad) = self.state.load_all()?;
        let mut report = RecoveryReport {
            failed: bad.len(),
            ..RecoveryReport::default()
        };
        for record in bad {
            tracing::error!(path = %record.path.display(), reason = %record.reason, "unreadable volume record moved aside");
        }
        for record in records {
            let volume_id = record.volume_id.clone();
            match self.recover_one(record) {
                Ok(Recovered::Resumed) => report.resumed += 1,
                Ok(Recovered::Reissue) => report.reissue += 1,
                Ok(Recovered::Gone) => report.gone += 1,
                Err(error) => {
                    report.failed += 1;
                    tracing::error!(volume_id, %error, "could not recover volume");
                }
            }
        }
        self.metrics.volumes.set(self.volumes.len() as i64);
        self.recovered.store(true, Ordering::Release);
        tracing::info!(?report, "volume recovery done");
        Ok(report)
    }

    fn recover_one(&self, record: VolumeRecord) -> Result<Recovered, Error> {
        let id = VolumeId::parse(&record.volume_id)?;
        let raw_target = record.target_path.to_str().ok_or(InputError::TargetPath {
            path: record.target_path.display().to_string(),
            reason: "not UTF-8",
        })?;
        let target = TargetPath::parse(raw_target, &self.config.kubelet_root)?;
        let attributes = VolumeAttributes::parse(&record.attributes)?;
        let names = attributes.expand(&record.pod, self.issuer.trust_domain())?;
        let dir = match TargetDir::open_parent(&self.root, &target)? {
            Some(t) if t.open()?.is_some() => t,
            _ => {
                self.state.remove(&id)?;
                return Ok(Recovered::Gone);
            }
        };
        let mut volume = Volume {
            target,
            attributes: self
                .attribute_sets
                .share(fingerprint(&record.attributes), attributes),
            names,
            pod: record.pod,
            volume_mount_group: record.volume_mount_group,
            token: None,
            certificate: None,
            failures: 0,
            awaiting_token: false,
        };
        let fd = self.ensure_mounted(&dir, volume.gid())?;
        let removed =
            remove_stale_payloads(&fd).map_err(|e| Error::io("clean volume", dir.path(), e))?;
        if removed > 0 {
            tracing::info!(volume_id = %id, removed, "removed leftovers of an interrupted write");
        }
        volume.certificate = self.check_files(&fd, &volume, record.certificate.as_ref());
        let now = SystemTime::now();
        let (outcome, delay) = match &volume.certificate {
            Some(c) if c.not_after > secs(now) && c.renew_at_ms > millis(now) => {
                (Recovered::Resumed, until(from_millis(c.renew_at_ms), now))
            }
            _ => (Recovered::Reissue, Duration::ZERO),
        };
        if volume.certificate != record.certificate {
            self.state
                .save(&id, &volume.record(&id, &record.attributes))?;
        }
        // The volume goes into its slot before its timer is armed: a timer
        // firing first would find nothing and be dropped for good.
        *self.slot(&id).try_lock().map_err(|_| Error::NotReady {
            reason: "volume busy during recovery",
        })? = Some(volume);
        self.rotation.schedule(id, delay);
        Ok(outcome)
    }

    /// Reads key and chain back from the volume; the certificate facts if
    /// the pair matches and every expected file is there.
    fn check_files(
        &self,
        dir: &OwnedFd,
        volume: &Volume,
        recorded: Option<&CertificateRecord>,
    ) -> Option<CertificateRecord> {
        let names: Vec<&str> = volume.attributes.files.iter().collect();
        let contents = read_current(dir, &names).ok()??;
        // A writer killed between the ..data swap and the links leaves a
        // complete payload the pod can not see: restore the links.
        if let Err(error) = ensure_visible_links(dir, &names) {
            tracing::warn!(target = %volume.target.as_path().display(), %error, "restoring visible file names");
            return None;
        }
        let key = std::str::from_utf8(&contents[0]).ok()?;
        let chain = std::str::from_utf8(&contents[1]).ok()?;
        if !credlet_ca::key_matches_certificate(key, chain).ok()? {
            return None;
        }
        let leaf = credlet_ca::inspect_leaf(chain).ok()?;
        let renew_at = match recorded {
            Some(r) if r.serial_hex == leaf.serial_hex => from_millis(r.renew_at_ms),
            _ => renewal_time(
                leaf.not_before,
                leaf.not_after,
                volume.attributes.renew_before,
                fastrand::f64(),
            ),
        };
        Some(CertificateRecord {
            serial_hex: leaf.serial_hex,
            not_before: secs(leaf.not_before),
            not_after: secs(leaf.not_after),
            renew_at_ms: millis(renew_at),
        })
    }
}

enum Recovered {
    Resumed,
    Reissue,
    Gone,
}

/// Whose a target is, for taking it down.
#[derive(Clone, Copy, Debug)]
enum Owner<'a> {
    /// A volume credlet published there, with its visible file names.
    Written(&'a [&'a str]),
    /// A volume id credlet has no record of.
    Unknown,
}

impl Owner<'_> {
    fn is_written(self) -> bool {
        matches!(self, Self::Written(_))
    }
}

/// The next step of taking a target down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TeardownStep {
    /// Unmount the tmpfs on top (credlet's).
    Unmount,
    /// A mount that is not credlet's covers a volume credlet published:
    /// an error, the kubelet retries and an operator has a look.
    Refuse,
    /// A mount that is not credlet's, at a target credlet has no record
    /// of: not credlet's business.
    Leave,
    /// Remove the directory if empty; with `payload`, first the files the
    /// atomic writer put into it (plain-directory volumes, which have no
    /// tmpfs to take them along).
    RemoveDirectory {
        /// Remove the writer's files first.
        payload: bool,
    },
}

/// Decides the next step of a teardown from what is at the target. Only
/// credlet's tmpfs is ever unmounted; files are removed only for a volume
/// credlet wrote, and only the writer's own; a directory only if empty.
fn teardown_step(written: bool, mounts: bool, state: &MountState) -> TeardownStep {
    match (state, written) {
        (MountState::Credlet, _) => TeardownStep::Unmount,
        (MountState::Foreign { .. }, true) => TeardownStep::Refuse,
        (MountState::Foreign { .. }, false) => TeardownStep::Leave,
        (MountState::NotMounted, written) => TeardownStep::RemoveDirectory {
            payload: written && !mounts,
        },
    }
}

fn mount_description(state: MountState) -> String {
    match state {
        MountState::Foreign { description } => description,
        MountState::Credlet => "credlet's tmpfs".into(),
        MountState::NotMounted => "nothing".into(),
    }
}

impl Renew for VolumeManager {
    fn renew(&self, volume: VolumeId) -> BoxFuture<'_, Option<Duration>> {
        Box::pin(async move { VolumeManager::renew(self, &volume).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(pairs: &[(&str, &str)]) -> (u64, VolumeAttributes) {
        let raw: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let attributes = VolumeAttributes::parse(&raw).expect("valid attributes");
        (fingerprint(&raw), attributes)
    }

    #[test]
    fn teardown_touches_only_what_is_credlets() {
        let foreign = MountState::Foreign {
            description: "a tmpfs mount of \"tmpfs\"".into(),
        };
        // (record, real mounts, what is there) → step
        let cases: &[(bool, bool, &MountState, TeardownStep)] = &[
            (true, true, &MountState::Credlet, TeardownStep::Unmount),
            (false, true, &MountState::Credlet, TeardownStep::Unmount),
            (true, true, &foreign, TeardownStep::Refuse),
            (false, true, &foreign, TeardownStep::Leave),
            (
                true,
                true,
                &MountState::NotMounted,
                TeardownStep::RemoveDirectory { payload: false },
            ),
            (
                true,
                false,
                &MountState::NotMounted,
                TeardownStep::RemoveDirectory { payload: true },
            ),
            (
                false,
                true,
                &MountState::NotMounted,
                TeardownStep::RemoveDirectory { payload: false },
            ),
            (
                false,
                false,
                &MountState::NotMounted,
                TeardownStep::RemoveDirectory { payload: false },
            ),
        ];
        for (written, mounts, state, step) in cases {
            assert_eq!(
                teardown_step(*written, *mounts, state),
                *step,
                "record {written}, mounts {mounts}, {state:?}"
            );
        }
    }

    #[test]
    fn volumes_with_the_same_attributes_share_one_copy_until_the_last_goes() {
        let sets = AttributeSets::default();
        let (fp, attributes) = parsed(&[("credlet.io/duration", "1h")]);
        let first = sets.share(fp, attributes.clone());
        let second = sets.share(fp, attributes);
        assert!(Arc::ptr_eq(
            first.attributes.as_ref().expect("present"),
            second.attributes.as_ref().expect("present")
        ));
        assert_eq!(sets.by_fingerprint.len(), 1);

        let (other_fp, other) = parsed(&[("credlet.io/duration", "2h")]);
        let third = sets.share(other_fp, other);
        assert!(!Arc::ptr_eq(
            first.attributes.as_ref().expect("present"),
            third.attributes.as_ref().expect("present")
        ));
        assert_eq!(third.duration, Duration::from_secs(7200));
        assert_eq!(sets.by_fingerprint.len(), 2);

        drop(first);
        assert_eq!(sets.by_fingerprint.len(), 2, "still used by the second");
        drop(second);
        drop(third);
        assert!(
            sets.by_fingerprint.is_empty(),
            "the last user removes the entry"
        );
    }

    #[test]
    fn last_users_leaving_together_leave_no_entry_behind() {
        let sets = Arc::new(AttributeSets::default());
        let (fp, attributes) = parsed(&[("credlet.io/duration", "1h")]);
        let threads = 4;
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (sets, barrier, attributes) =
                    (Arc::clone(&sets), Arc::clone(&barrier), attributes.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let shared = sets.share(fp, attributes.clone());
                        barrier.wait();
                        drop(shared);
                        barrier.wait();
                        // Every user of the round has left: so has the entry.
                        assert!(sets.by_fingerprint.is_empty());
                        barrier.wait();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("no thread panicked");
        }
    }

    #[test]
    fn different_attributes_under_one_hash_keep_their_own_copies() {
        let sets = AttributeSets::default();
        let (fp, one_hour) = parsed(&[("credlet.io/duration", "1h")]);
        let (_, two_hours) = parsed(&[("credlet.io/duration", "2h")]);
        // As if both hashed alike: the newer set takes the entry.
        let first = sets.share(fp, one_hour.clone());
        let second = sets.share(fp, two_hours);
        assert_eq!(first.duration, Duration::from_secs(3600));
        assert_eq!(second.duration, Duration::from_secs(7200));
        // The older one leaving does not remove the newer one's entry.
        drop(first);
        assert_eq!(sets.by_fingerprint.len(), 1);
        let third = sets.share(fp, one_hour);
        assert_eq!(third.duration, Duration::from_secs(3600));
        drop(second);
        assert_eq!(sets.by_fingerprint.len(), 1, "the entry is the third's now");
        drop(third);
        assert!(sets.by_fingerprint.is_empty());
    }
}

/// One volume's certificate expiry ([`VolumeManager::expiries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeExpiry {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The CSI volume id.
    pub volume: String,
    /// The certificate's notAfter, Unix seconds.
    pub not_after: u64,
}
