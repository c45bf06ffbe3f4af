//! What the volume-manager tests (`manager.rs`, `remote.rs`) share: a
//! kubelet-like target path and `NodePublishVolume` request for the pod
//! `shop/web-0`, and the issuance counters.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use credlet_csi::attributes as attr;
use credlet_csi::metrics::{IssuanceLabels, Metrics, Operation, Outcome};
use credlet_csi::server::parse_publish_request;
use credlet_csi::volumes::PublishRequest;
use credlet_proto::csi::volume_capability::{AccessType, MountVolume};
use credlet_proto::csi::{NodePublishVolumeRequest, VolumeCapability};

/// The audience the tests' tokens are for.
pub const AUDIENCE: &str = "credlet";

/// A target path below `root` laid out as the kubelet does for `pod`
/// (parent created, target not).
pub fn target(root: &Path, pod: &str) -> PathBuf {
    let parent = root
        .join("pods")
        .join(pod)
        .join("volumes/kubernetes.io~csi/certs");
    std::fs::create_dir_all(&parent).expect("parent");
    parent.join("mount")
}

/// A validated publish request for pod `shop/web-0` (service account
/// `web`), with the pod's token for [`AUDIENCE`] if given and `extra`
/// volume attributes.
pub fn publish_request(
    root: &Path,
    id: &str,
    target: &Path,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> PublishRequest {
    let mut context: HashMap<String, String> = [
        (attr::POD_NAME, "web-0"),
        (attr::POD_NAMESPACE, "shop"),
        (attr::POD_UID, "uid-1"),
        (attr::SERVICE_ACCOUNT_NAME, "web"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    if let Some(token) = token {
        context.insert(
            attr::SERVICE_ACCOUNT_TOKENS.into(),
            serde_json::json!({
                AUDIENCE: {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}
            })
            .to_string(),
        );
    }
    for (k, v) in extra {
        context.insert((*k).to_owned(), (*v).to_owned());
    }
    let raw = NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: None,
        }),
        volume_context: context,
        ..Default::default()
    };
    parse_publish_request(&raw, root, AUDIENCE).expect("valid request")
}

/// How many issuances ended with `outcome`.
pub fn count(metrics: &Metrics, operation: Operation, outcome: Outcome) -> u64 {
    metrics
        .issuances
        .get_or_create(&IssuanceLabels { operation, outcome })
        .get()
}

/// The serial of the certificate in a volume, after checking that the
/// volume's key belongs to it.
pub fn serial(target: &Path) -> String {
    let chain = std::fs::read_to_string(target.join("tls.crt")).expect("read chain");
    let key = std::fs::read_to_string(target.join("tls.key")).expect("read key");
    assert!(credlet_ca::key_matches_certificate(&key, &chain).expect("compare"));
    credlet_ca::inspect_leaf(&chain).expect("leaf").serial_hex
}

/// Polls `f` every 20 ms until it holds; fails after `timeout`.
pub async fn wait_for<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
