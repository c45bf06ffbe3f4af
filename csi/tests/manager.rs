//! The volume manager end to end on plain directories (no root needed):
//! publish, republish, unpublish, renewal with an issuer outage, recovery.

mod support;

use support::{serial, wait_for};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use credlet_ca::{Authority, Policy, PrivateKey};
use credlet_csi::attributes as attr;
use credlet_csi::fsops::PlainDirectories;
use credlet_csi::issuer::{BoxFuture, IssueRequest, Issued, IssuerError};
use credlet_csi::metrics::{Metrics, Operation, Outcome};
use credlet_csi::paths::{TargetPath, VolumeId};
use credlet_csi::volumes::PublishRequest;
use credlet_csi::{EmbeddedIssuer, Issuer, VolumeConfig, VolumeManager, rotation};
use tokio::sync::watch;

/// An issuer that can be switched off, counting calls.
#[derive(Debug)]
struct SwitchableIssuer {
    inner: EmbeddedIssuer,
    down: AtomicBool,
    calls: AtomicUsize,
}

impl Issuer for SwitchableIssuer {
    fn issue<'a>(
        &'a self,
        key: &'a PrivateKey,
        request: IssueRequest,
    ) -> BoxFuture<'a, Result<Issued, IssuerError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(IssuerError::Unavailable {
                    reason: "test outage".into(),
                })
            });
        }
        self.inner.issue(key, request)
    }
    fn is_ready(&self) -> bool {
        true
    }
    fn trust_domain(&self) -> &str {
        self.inner.trust_domain()
    }
    fn requires_token(&self) -> bool {
        false
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    issuer: Arc<SwitchableIssuer>,
    metrics: Metrics,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("kubelet").canonicalize_or_create();
        let state = tmp.path().join("state");
        let mut policy = Policy::new("cluster.local");
        policy.min_duration = Duration::from_secs(1);
        let authority = Authority::generate_self_signed(policy).expect("ca");
        Self {
            _tmp: tmp,
            root,
            state,
            issuer: Arc::new(SwitchableIssuer {
                inner: EmbeddedIssuer::trusting_claimed_identity(authority),
                down: AtomicBool::new(false),
                calls: AtomicUsize::new(0),
            }),
            metrics: Metrics::default(),
        }
    }

    /// A manager with its rotation loop running.
    fn start(&self) -> (Arc<VolumeManager>, watch::Sender<bool>) {
        let mut config = VolumeConfig::new(self.root.clone(), self.state.clone());
        config.backoff_base = Duration::from_millis(50);
        config.backoff_cap = Duration::from_millis(200);
        let (handle, queue) = rotation::channel();
        let manager = Arc::new(
            VolumeManager::new(
                config,
                Arc::clone(&self.issuer) as Arc<dyn Issuer>,
                Arc::new(PlainDirectories),
                handle,
                self.metrics.clone(),
            )
            .expect("manager"),
        );
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(queue.run(Arc::clone(&manager), 8, stop_rx));
        (manager, stop)
    }

    fn target(&self, pod: &str) -> PathBuf {
        support::target(&self.root, pod)
    }

    fn request(&self, id: &str, target: &Path, extra: &[(&str, &str)]) -> PublishRequest {
        support::publish_request(&self.root, id, target, None, extra)
    }

    fn count(&self, operation: Operation, outcome: Outcome) -> u64 {
        support::count(&self.metrics, operation, outcome)
    }
}

trait CanonicalizeOrCreate {
    fn canonicalize_or_create(&self) -> PathBuf;
}

impl CanonicalizeOrCreate for PathBuf {
    fn canonicalize_or_create(&self) -> PathBuf {
        std::fs::create_dir_all(self).expect("mkdir");
        self.canonicalize().expect("canonicalize")
    }
}

#[tokio::test]
async fn publish_republish_unpublish() {
    let fx = Fixture::new();
    let (manager, _stop) = fx.start();
    manager.recover().await.expect("recover");
    assert!(manager.is_ready());
    let target = fx.target("p1");
    manager
        .publish(fx.request("csi-1", &target, &[]))
        .await
        .expect("publish");
    let first = serial(&target);
    assert_eq!(fx.issuer.calls.load(Ordering::SeqCst), 1);

    // Republish is cheap: nothing re-issued.
    manager
        .publish(fx.request("csi-1", &target, &[]))
        .await
        .expect("republish");
    assert_eq!(serial(&target), first);
    assert_eq!(fx.issuer.calls.load(Ordering::SeqCst), 1);
    assert_eq!(fx.metrics.republishes.get(), 1);

    // Same id, different attributes or target: AlreadyExists.
    let err = manager
        .publish(fx.request("csi-1", &target, &[(attr::DURATION, "2h")]))
        .await
        .expect_err("different attributes");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let other = fx.target("p2");
    let err = manager
        .publish(fx.request("csi-1", &other, &[]))
        .await
        .expect_err("different target");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(!other.exists());

    let id = VolumeId::parse("csi-1").expect("id");
    let tp = TargetPath::parse(target.to_str().expect("utf8"), &fx.root).expect("target");
    manager.unpublish(&id, &tp).await.expect("unpublish");
    assert!(!target.exists());
    assert!(!fx.state.join("volumes/csi-1.json").exists());
    manager
        .unpublish(&id, &tp)
        .await
        .expect("unpublish is idempotent");
    assert_eq!(manager.volume_count(), 0);
}

#[tokio::test]
async fn failed_first_publish_leaves_nothing() {
    let fx = Fixture::new();
    let (manager, _stop) = fx.start();
    manager.recover().await.expect("recover");
    fx.issuer.down.store(true, Ordering::SeqCst);
    let target = fx.target("p1");
    let err = manager
        .publish(fx.request("csi-1", &target, &[]))
        .await
        .expect_err("issuer down");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(!target.exists(), "target directory removed");
    assert!(
        !fx.state.join("volumes/csi-1.json").exists(),
        "record removed"
    );
    assert_eq!(manager.volume_count(), 0);
    assert_eq!(fx.count(Operation::Publish, Outcome::Error), 1);
}

#[tokio::test]
async fn outage_keeps_certificate_backs_off_and_recovers() {
    let fx = Fixture::new();
    let (manager, _stop) = fx.start();
    manager.recover().await.expect("recover");
    let target = fx.target("p1");
    manager
        .publish(fx.request("csi-1", &target, &[(attr::DURATION, "3s")]))
        .await
        .expect("publish");
    let first = serial(&target);
    fx.issuer.down.store(true, Ordering::SeqCst);
    let calls_before = fx.issuer.calls.load(Ordering::SeqCst);
    // Renewal is due at 1.5–2.1 s; with 50–200 ms backoff several retries fail.
    wait_for("failed renewals", Duration::from_secs(5), || {
        fx.count(Operation::Renew, Outcome::Error) >= 3
    })
    .await;
    assert_eq!(
        serial(&target),
        first,
        "current certificate kept during the outage"
    );
    let retries = fx.issuer.calls.load(Ordering::SeqCst) - calls_before;
    // Backoff bounds the retry rate: nowhere near a spin.
    assert!(retries < 100, "{retries} retries");
    fx.issuer.down.store(false, Ordering::SeqCst);
    wait_for("rotation after the outage", Duration::from_secs(3), || {
        serial(&target) != first
    })
    .await;
}

#[tokio::test]
async fn rotation_replaces_key_and_certificate() {
    let fx = Fixture::new();
    let (manager, _stop) = fx.start();
    manager.recover().await.expect("recover");
    let target = fx.target("p1");
    manager
        .publish(fx.request("csi-1", &target, &[(attr::DURATION, "2s")]))
        .await
        .expect("publish");
    let key1 = std::fs::read(target.join("tls.key")).expect("key");
    let first = serial(&target);
    wait_for("rotation", Duration::from_secs(4), || {
        serial(&target) != first
    })
    .await;
    let key2 = std::fs::read(target.join("tls.key")).expect("key");
    assert_ne!(key1, key2, "new key on every renewal");
    assert!(fx.count(Operation::Renew, Outcome::Success) >= 1);
}

#[tokio::test]
async fn recovery_resumes_intact_and_repairs_broken_volumes() {
    let fx = Fixture::new();
    let targets: Vec<PathBuf> = (0..3).map(|i| fx.target(&format!("p{i}"))).collect();
    let serials: Vec<String>;
    {
        let (manager, stop) = fx.start();
        manager.recover().await.expect("recover");
        for (i, t) in targets.iter().enumerate() {
            manager
                .publish(fx.request(&format!("csi-{i}"), t, &[]))
                .await
                .expect("publish");
        }
        serials = targets.iter().map(|t| serial(t)).collect();
        let _ = stop.send(true);
    }
    // Break volume 1 (key gone) and leave volume 2 with an interrupted write.
    let data = std::fs::read_link(targets[1].join("..data")).expect("..data");
    std::fs::remove_file(targets[1].join(&data).join("tls.key")).expect("remove key");
    std::fs::create_dir(targets[2].join("..2020_01_01_00_00_00.1")).expect("stale");
    // Volume record for a pod whose directory vanished.
    let gone = fx.target("gone");
    {
        let (manager, stop) = fx.start();
        manager.recover().await.expect("recover");
        manager
            .publish(fx.request("csi-gone", &gone, &[]))
            .await
            .expect("publish");
        let _ = stop.send(true);
    }
    std::fs::remove_dir_all(gone.parent().expect("parent")).expect("pod dir gone");

    let calls_before = fx.issuer.calls.load(Ordering::SeqCst);
    let (manager, _stop) = fx.start();
    let report = manager.recover().await.expect("recover");
    assert_eq!(report.resumed, 2, "{report:?}");
    assert_eq!(report.reissue, 1, "{report:?}");
    assert_eq!(report.gone, 1, "{report:?}");
    assert!(!fx.state.join("volumes/csi-gone.json").exists());
    wait_for(
        "repair of the broken volume",
        Duration::from_secs(3),
        || targets[1].join("tls.key").exists(),
    )
    .await;
    assert_ne!(serial(&targets[1]), serials[1]);
    assert_eq!(
        serial(&targets[0]),
        serials[0],
        "intact volume not re-issued"
    );
    assert_eq!(
        serial(&targets[2]),
        serials[2],
        "intact volume not re-issued"
    );
    assert!(
        !targets[2].join("..2020_01_01_00_00_00.1").exists(),
        "stale payload removed"
    );
    assert_eq!(fx.issuer.calls.load(Ordering::SeqCst) - calls_before, 1);
    let _ = SystemTime::now();
}
