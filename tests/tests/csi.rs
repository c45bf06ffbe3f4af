//! The CSI Identity and Node services of a real agent process, over its
//! Unix socket, with real tmpfs mounts (needs root).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use credlet_ca::KeyType;
use credlet_proto::csi::node_service_capability::{Type as CapabilityType, rpc};
use credlet_proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetCapabilitiesRequest,
    NodeGetInfoRequest, NodePublishVolumeRequest, VolumeCapability,
};
use credlet_tests::agent_bin;
use credlet_tests::harness::{
    CheckTime, Csi, DRIVER_NAME, NODE_ID, TestEnv, Volume, block_capability, check_volume, keys,
    mount_at, mounts_under, read_volume, wait_for_new_certificate,
};
use tonic::Code;

const DURATION: &str = "credlet.io/duration";

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

fn gid(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").gid()
}

/// Entries of a volume's root, sorted.
fn entries(target: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(target)
        .expect("list volume")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    names.sort();
    names
}

fn tokens_json(token: &str) -> String {
    format!(r#"{{"credlet":{{"token":"{token}","expirationTimestamp":"2099-01-01T00:00:00Z"}}}}"#)
}

#[tokio::test]
async fn identity_and_node_info() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;

    let info = csi
        .identity
        .clone()
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, DRIVER_NAME);
    assert!(!info.vendor_version.is_empty(), "vendor_version is empty");

    csi.identity
        .clone()
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities");
    assert_eq!(csi.probe().await.expect("Probe"), Some(true));

    let node = csi
        .node
        .clone()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(node.node_id, NODE_ID);

    let caps = csi
        .node
        .clone()
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("NodeGetCapabilities")
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|CapabilityType::Rpc(r)| r.r#type))
        .collect();
    assert!(
        rpcs.contains(&(rpc::Type::VolumeMountGroup as i32)),
        "VOLUME_MOUNT_GROUP (6) missing from {rpcs:?}"
    );
    assert!(
        !rpcs.contains(&(rpc::Type::StageUnstageVolume as i32)),
        "ephemeral-only plugin must not ask for staging: {rpcs:?}"
    );
}

#[tokio::test]
async fn publish_mounts_tmpfs_and_writes_files_then_unpublish_removes_everything() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let volume = env.volume("basic");
    csi.publish(&volume).await.expect("publish");

    // A size-limited nodev,nosuid,noexec tmpfs on the target.
    let mount = mount_at(&volume.target).expect("a mount at the target");
    assert_eq!(mount.fstype, "tmpfs", "{mount:?}");
    for option in ["nodev", "nosuid", "noexec", "size"] {
        assert!(mount.has_option(option), "mount lacks {option}: {mount:?}");
    }

    // The files, their layout and their contents.
    let files = volume.files();
    let snapshot = check_volume(&volume.target, &files, CheckTime::Now).expect("consistent volume");
    assert_eq!(snapshot.leaf.uris, [volume.spiffe_id()]);
    assert_eq!(
        snapshot.leaf.uris,
        ["spiffe://cluster.local/ns/shop/sa/web"],
        "default SPIFFE ID"
    );
    assert!(snapshot.leaf.dns_names.is_empty());
    let lifetime = snapshot
        .leaf
        .not_after
        .duration_since(snapshot.leaf.not_before)
        .expect("positive lifetime");
    assert_eq!(lifetime, Duration::from_secs(24 * 3600), "default duration");
    assert!(snapshot.ca.contains("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        entries(&volume.target),
        sorted(&["..data", &snapshot.data_dir, "ca.crt", "tls.crt", "tls.key"]),
        "exactly ..data, one payload directory and the visible links"
    );

    // Modes and owners (no fs group: root's group, key 0400).
    let key = volume.target.join("tls.key");
    assert!(
        fs::symlink_metadata(&key)
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert_eq!(mode(&key), 0o400, "key mode");
    assert_eq!(fs::metadata(&key).expect("stat").uid(), 0);
    assert_eq!(gid(&key), 0);
    for name in ["tls.crt", "ca.crt"] {
        assert_eq!(mode(&volume.target.join(name)), 0o444, "{name} mode");
    }

    // The state record: there, private, and without the key.
    let state_file = env.state_file(&volume.id);
    let record = fs::read_to_string(&state_file).expect("state record");
    assert_eq!(
        mode(&state_file) & 0o077,
        0,
        "state record readable by others"
    );
    let json: serde_json::Value = serde_json::from_str(&record).expect("state record is JSON");
    assert_eq!(json["record"]["volume_id"], volume.id.as_str());
    assert!(json["mac"].is_string(), "the record is not signed");
    let key_body: String = snapshot.key.lines().nth(1).expect("key body").to_owned();
    assert!(
        !record.contains(&key_body),
        "the key leaked into the state record"
    );
    assert!(!record.contains("PRIVATE KEY"));
    assert!(
        !env.log().contains(&key_body),
        "the key leaked into the log"
    );

    // Unpublish: unmounted, directory gone, record gone; the kubelet's
    // parent directory stays.
    csi.unpublish_volume(&volume).await.expect("unpublish");
    assert!(mount_at(&volume.target).is_none(), "still mounted");
    assert!(!volume.target.exists(), "target directory left behind");
    assert!(volume.target.parent().expect("parent").is_dir());
    assert!(!state_file.exists(), "state record left behind");
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());

    // Idempotent, also for volumes the agent never saw.
    csi.unpublish_volume(&volume)
        .await
        .expect("second unpublish");
    let stranger = env.volume("stranger");
    csi.unpublish_volume(&stranger)
        .await
        .expect("unpublish of an unknown volume");
    assert!(stranger.target.parent().expect("parent").is_dir());
}

#[tokio::test]
async fn fs_group_from_attribute_or_volume_mount_group() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;

    let by_attribute = env
        .volume("attr")
        .with("credlet.io/fs-group", "2345")
        .with("credlet.io/credential-bundle-file", "credential.pem");
    let mut by_kubelet = env.volume("kubelet");
    by_kubelet.volume_mount_group = "3456".into();
    // The explicit attribute wins over the kubelet's fsGroup.
    let mut both = env.volume("both").with("credlet.io/fs-group", "4567");
    both.volume_mount_group = "3456".into();

    for (volume, group) in [(&by_attribute, 2345), (&by_kubelet, 3456), (&both, 4567)] {
        csi.publish(volume).await.expect("publish");
        let files = volume.files();
        check_volume(&volume.target, &files, CheckTime::Now).expect("consistent");
        let key = volume.target.join(&files.key);
        assert_eq!(mode(&key), 0o440, "{}: key mode", volume.id);
        assert_eq!(gid(&key), group, "{}: key group", volume.id);
        for name in [&files.certificate, &files.ca] {
            let path = volume.target.join(name);
            assert_eq!(mode(&path), 0o444, "{}: {name} mode", volume.id);
            assert_eq!(gid(&path), group, "{}: {name} group", volume.id);
        }
        if let Some(bundle) = &files.bundle {
            // The bundle holds the key: it must be as private as the key.
            let path = volume.target.join(bundle);
            assert_eq!(mode(&path), 0o440, "{}: bundle mode", volume.id);
            assert_eq!(gid(&path), group, "{}: bundle group", volume.id);
        }
    }
}

#[tokio::test]
async fn templates_key_types_custom_file_names_and_credential_bundle() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;

    let volume = env
        .volume("tmpl")
        .with(
            "credlet.io/dns-names",
            "$POD_NAME.$POD_NAMESPACE.svc, ${SERVICE_ACCOUNT_NAME}.internal, my-service",
        )
        .with("credlet.io/ip-addresses", "10.0.0.7, fd00::7")
        .with("credlet.io/common-name", "$POD_NAME")
        .with(
            "credlet.io/spiffe-id",
            "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME/replica",
        )
        .with("credlet.io/key-type", "ED25519")
        .with(DURATION, "1h30m")
        .with("credlet.io/certificate-file", "cert.pem")
        .with("credlet.io/key-file", "key.pem")
        .with("credlet.io/ca-file", "trust.pem")
        .with("credlet.io/credential-bundle-file", "credential.pem");
    csi.publish(&volume).await.expect("publish");
    let files = volume.files();
    let snapshot = check_volume(&volume.target, &files, CheckTime::Now).expect("consistent");
    let leaf = &snapshot.leaf;
    assert_eq!(
        leaf.dns_names,
        ["web-tmpl.shop.svc", "web.internal", "my-service"]
    );
    assert_eq!(
        leaf.ip_addresses,
        [
            "10.0.0.7".parse::<std::net::IpAddr>().expect("ip"),
            "fd00::7".parse().expect("ip")
        ]
    );
    assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/shop/sa/web/replica"]);
    assert!(
        leaf.subject.contains("CN=web-tmpl"),
        "subject {:?}",
        leaf.subject
    );
    assert_eq!(
        leaf.not_after
            .duration_since(leaf.not_before)
            .expect("lifetime"),
        Duration::from_secs(5400)
    );
    let key = credlet_ca::PrivateKey::from_pem(&snapshot.key).expect("key parses");
    assert_eq!(key.key_type(), KeyType::Ed25519);
    assert_eq!(
        snapshot.bundle.as_deref(),
        Some(format!("{}{}", snapshot.key, snapshot.chain).as_str())
    );
    assert_eq!(
        entries(&volume.target),
        sorted(&[
            "..data",
            &snapshot.data_dir,
            "cert.pem",
            "credential.pem",
            "key.pem",
            "trust.pem"
        ]),
        "only the requested names"
    );

    for (i, (name, expected)) in [
        ("ECDSAP256", KeyType::EcdsaP256),
        ("ECDSAP384", KeyType::EcdsaP384),
        ("ecdsap384", KeyType::EcdsaP384),
        ("ed25519", KeyType::Ed25519),
    ]
    .into_iter()
    .enumerate()
    {
        let volume = env
            .volume(&format!("kt{i}"))
            .with("credlet.io/key-type", name);
        csi.publish(&volume).await.expect("publish");
        let snapshot =
            check_volume(&volume.target, &volume.files(), CheckTime::Now).expect("consistent");
        let key = credlet_ca::PrivateKey::from_pem(&snapshot.key).expect("key parses");
        assert_eq!(key.key_type(), expected, "key-type {name}");
    }
}

#[tokio::test]
async fn republish_is_idempotent_and_conflicts_are_already_exists() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let mut volume = env.volume("repub").with(DURATION, "2h");
    volume.tokens = Some(tokens_json("token-one"));
    csi.publish(&volume).await.expect("publish");
    let first = check_volume(&volume.target, &volume.files(), CheckTime::Now).expect("consistent");

    // Identical republish, and a republish with a fresh token (what the
    // kubelet does with requiresRepublish): OK, same certificate.
    csi.publish(&volume).await.expect("identical republish");
    volume.tokens = Some(tokens_json("token-two"));
    csi.publish(&volume)
        .await
        .expect("republish with a fresh token");
    let again = check_volume(&volume.target, &volume.files(), CheckTime::Now).expect("consistent");
    assert_eq!(
        again.leaf.serial_hex, first.leaf.serial_hex,
        "republish re-issued"
    );
    assert_eq!(
        again.data_dir, first.data_dir,
        "republish rewrote the files"
    );

    // Same id, different target.
    let elsewhere = env.volume("repub-elsewhere");
    let mut moved = volume.clone();
    moved.target = elsewhere.target.clone();
    let status = csi
        .publish(&moved)
        .await
        .expect_err("different target accepted");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(!moved.target.exists(), "the conflicting target was created");

    // Same id, different attributes or group.
    let changed = volume.clone().with(DURATION, "3h");
    let status = csi
        .publish(&changed)
        .await
        .expect_err("different attributes accepted");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let extra = volume.clone().with("credlet.io/dns-names", "extra.example");
    let status = csi
        .publish(&extra)
        .await
        .expect_err("added attribute accepted");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let mut regrouped = volume.clone();
    regrouped.volume_mount_group = "2000".into();
    let status = csi
        .publish(&regrouped)
        .await
        .expect_err("different group accepted");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // The original volume is untouched.
    let after = check_volume(&volume.target, &volume.files(), CheckTime::Now).expect("consistent");
    assert_eq!(after.leaf.serial_hex, first.leaf.serial_hex);
    assert_eq!(env.mounts().len(), 1, "{:?}", env.mounts());
    assert_eq!(env.state_files(), [format!("{}.json", volume.id)]);
}

#[tokio::test]
async fn rotation_replaces_key_and_certificate_before_expiry() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let volume = env.volume("rot").with(DURATION, "4s");
    csi.publish(&volume)
        .await
        .expect("publish (dev CA must allow a 4 s lifetime)");
    let files = volume.files();
    let first = check_volume(&volume.target, &files, CheckTime::Now).expect("consistent");
    assert_eq!(
        first
            .leaf
            .not_after
            .duration_since(first.leaf.not_before)
            .expect("lifetime"),
        Duration::from_secs(4),
        "the CA did not honour a 4 s duration"
    );

    let second =
        wait_for_new_certificate(&volume, &first.leaf.serial_hex, Duration::from_secs(8)).await;
    let seen = std::time::SystemTime::now();
    // Renewed between 50 % and 70 % of the lifetime, so before expiry.
    let since_issue = seen
        .duration_since(first.leaf.not_before)
        .expect("after issuance");
    assert!(
        since_issue >= Duration::from_secs(2),
        "renewed after only {since_issue:?} of a 4 s lifetime"
    );
    assert!(
        seen < first.leaf.not_after,
        "renewed only after the old certificate expired ({since_issue:?})"
    );
    let renewed_at = second
        .leaf
        .not_before
        .duration_since(first.leaf.not_before)
        .expect("later");
    assert!(
        renewed_at >= Duration::from_secs(2) && renewed_at <= Duration::from_secs(3),
        "new certificate issued {renewed_at:?} into the old one's 4 s"
    );
    assert_ne!(second.key, first.key, "rotation must generate a new key");
    assert_eq!(second.leaf.uris, first.leaf.uris);
    assert_ne!(second.data_dir, first.data_dir);
    assert!(
        !volume.target.join(&first.data_dir).exists(),
        "old payload directory left behind"
    );

    // And it keeps going.
    let third =
        wait_for_new_certificate(&volume, &second.leaf.serial_hex, Duration::from_secs(8)).await;
    assert_ne!(third.key, second.key);
    assert_eq!(
        env.mounts().len(),
        1,
        "rotation stacked mounts: {:?}",
        env.mounts()
    );
}

/// Everything a rejected request could have left behind is absent.
fn assert_untouched(env: &TestEnv, what: &str, extra_paths: &[&Path]) {
    let mounts = mounts_under(env.base());
    assert!(mounts.is_empty(), "{what}: left mounts {mounts:?}");
    assert!(
        env.state_files().is_empty(),
        "{what}: left state {:?}",
        env.state_files()
    );
    for path in extra_paths {
        assert!(
            fs::symlink_metadata(path).is_err(),
            "{what}: created {}",
            path.display()
        );
    }
}

#[tokio::test]
async fn invalid_publish_requests_are_rejected_and_change_nothing() {
    const SECRET: &str = "SECRET-TOKEN-VALUE-31337";
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let mut good = env.volume("good");
    good.tokens = Some(tokens_json(SECRET));
    let target = good.target.to_string_lossy().into_owned();
    let root = env.root.to_string_lossy().into_owned();
    let outside = env.outside.to_string_lossy().into_owned();

    let mut cases: Vec<(String, NodePublishVolumeRequest)> = Vec::new();
    let mut case = |name: &str, edit: &dyn Fn(&mut NodePublishVolumeRequest)| {
        let mut request = good.request();
        edit(&mut request);
        cases.push((name.to_owned(), request));
    };
    case("missing volume id", &|r| r.volume_id.clear());
    case("missing target path", &|r| r.target_path.clear());
    case("missing capability", &|r| r.volume_capability = None);
    case("block capability", &|r| {
        r.volume_capability = Some(block_capability())
    });
    case("capability without access type", &|r| {
        r.volume_capability = Some(VolumeCapability {
            access_type: None,
            ..block_capability()
        });
    });
    case("non-numeric volume_mount_group", &|r| {
        r.volume_capability = Some(credlet_tests::harness::mount_capability("staff"));
    });
    case("target outside the kubelet root", &|r| {
        r.target_path = format!("{outside}/mount");
    });
    case("target is the kubelet root", &|r| {
        r.target_path = root.clone()
    });
    case("target with ..", &|r| {
        r.target_path =
            format!("{root}/pods/x/volumes/kubernetes.io~csi/../../../../outside/mount");
    });
    case("target with .. staying inside", &|r| {
        r.target_path = target.replace("/certs/mount", "/certs/../certs/mount");
    });
    case("target with .", &|r| {
        r.target_path = target.replace("/certs/mount", "/certs/./mount");
    });
    case("relative target", &|r| {
        r.target_path = "pods/x/volumes/kubernetes.io~csi/certs/mount".into();
    });
    case("target with NUL", &|r| {
        r.target_path = format!("{target}\0x")
    });
    for bad_id in [
        "csi/evil",
        "../csi-evil",
        "csi-a..b",
        "..",
        "csi-\0-nul",
        ".hidden",
    ] {
        case(&format!("volume id {bad_id:?}"), &|r| {
            r.volume_id = bad_id.into()
        });
    }
    for attribute in [
        "credlet.io/key-file",
        "credlet.io/certificate-file",
        "credlet.io/ca-file",
        "credlet.io/credential-bundle-file",
    ] {
        for bad_name in ["a/b", "..", "..data", "../escape", "bad\0name", "/abs", ""] {
            case(&format!("{attribute}={bad_name:?}"), &|r| {
                r.volume_context.insert(attribute.into(), bad_name.into());
            });
        }
    }
    case("two files with one name", &|r| {
        r.volume_context
            .insert("credlet.io/key-file".into(), "tls.crt".into());
    });
    case("unknown credlet.io attribute", &|r| {
        r.volume_context
            .insert("credlet.io/typo".into(), "x".into());
    });
    for bad in ["1d", "abc", "", "-5s", "0s", "1.5h", "99999999999h"] {
        case(&format!("duration {bad:?}"), &|r| {
            r.volume_context.insert(DURATION.into(), bad.into());
        });
    }
    case("renew-before not shorter than duration", &|r| {
        r.volume_context.insert(DURATION.into(), "1h".into());
        r.volume_context
            .insert("credlet.io/renew-before".into(), "2h".into());
    });
    case("oversized credlet.io attribute", &|r| {
        r.volume_context
            .insert("credlet.io/dns-names".into(), "a".repeat(4097));
    });
    case("oversized foreign attribute", &|r| {
        r.volume_context
            .insert("example.com/blob".into(), "b".repeat(4097));
    });
    case("too many DNS names", &|r| {
        r.volume_context.insert(
            "credlet.io/dns-names".into(),
            vec!["a.example"; 33].join(","),
        );
    });
    case("unknown template variable", &|r| {
        r.volume_context
            .insert("credlet.io/dns-names".into(), "$HOSTNAME.example".into());
    });
    case("bad IP address", &|r| {
        r.volume_context
            .insert("credlet.io/ip-addresses".into(), "10.0.0.300".into());
    });
    case("non-numeric fs-group", &|r| {
        r.volume_context
            .insert("credlet.io/fs-group".into(), "staff".into());
    });
    for key in [
        keys::POD_NAME,
        keys::POD_NAMESPACE,
        keys::POD_UID,
        keys::SERVICE_ACCOUNT_NAME,
    ] {
        case(&format!("missing {key}"), &|r| {
            r.volume_context.remove(key);
        });
    }
    case("malformed pod namespace", &|r| {
        r.volume_context
            .insert(keys::POD_NAMESPACE.into(), "Not/A/Namespace".into());
    });
    case("malformed token JSON", &|r| {
        r.volume_context.insert(
            keys::TOKENS.into(),
            format!(r#"{{"credlet":{{"token":"{SECRET}""#),
        );
    });
    case("token map of the wrong shape", &|r| {
        r.volume_context
            .insert(keys::TOKENS.into(), format!(r#"["{SECRET}"]"#));
    });
    for bad in ["RSA1024", "RSA3072", "DSA", "P256", ""] {
        case(&format!("key type {bad:?}"), &|r| {
            r.volume_context
                .insert("credlet.io/key-type".into(), bad.into());
        });
    }
    // Policy refusals happen after the mount; they must be undone.
    for bad in [
        "spiffe://evil.example/ns/shop/sa/web",
        "spiffe://cluster.local/ns/kube-system/sa/admin",
        "spiffe://cluster.local/ns/shop/sa/other",
    ] {
        case(&format!("SPIFFE ID {bad:?}"), &|r| {
            r.volume_context
                .insert("credlet.io/spiffe-id".into(), bad.into());
        });
    }

    let escaped = env.outside.join("mount");
    for (name, request) in &cases {
        let status = csi
            .publish_request(request.clone())
            .await
            .expect_err(&format!("{name}: accepted"));
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(!status.message().is_empty(), "{name}: empty message");
        assert_untouched(&env, name, &[&good.target, &escaped]);
    }
    assert!(
        !env.log().contains(SECRET),
        "a service account token appeared in the log"
    );

    // The base request was fine all along.
    csi.publish(&good).await.expect("the unmodified request");
    check_volume(&good.target, &good.files(), CheckTime::Now).expect("consistent");
    csi.unpublish_volume(&good).await.expect("unpublish");
    assert_untouched(&env, "after unpublish", &[&good.target]);
    assert!(!env.log().contains(SECRET), "a token appeared in the log");
}

#[tokio::test]
async fn planted_symlinks_and_missing_parents() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;

    // A pod directory that is a symlink to somewhere else, where the rest
    // of the path exists: nothing may be created or mounted there.
    let victim = env.outside.join("victim");
    fs::create_dir_all(victim.join("volumes/kubernetes.io~csi/certs")).expect("victim tree");
    let linked = env.volume_without_parent("linked");
    let pod_dir = env.root.join("pods").join(&linked.pod.uid);
    std::os::unix::fs::symlink(&victim, &pod_dir).expect("plant pod dir link");
    let status = csi
        .publish(&linked)
        .await
        .expect_err("publish through a symlink");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let escaped = victim.join("volumes/kubernetes.io~csi/certs/mount");
    assert_untouched(&env, "symlinked pod dir", &[&escaped]);
    assert!(mounts_under(&env.outside).is_empty());

    // The same with a symlink in the middle of the path.
    let middle = env.volume_without_parent("middle");
    let pod_dir = env.root.join("pods").join(&middle.pod.uid);
    fs::create_dir_all(&pod_dir).expect("pod dir");
    std::os::unix::fs::symlink(&victim, pod_dir.join("volumes")).expect("plant volumes link");
    let status = csi
        .publish(&middle)
        .await
        .expect_err("publish through a symlink");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_untouched(&env, "symlinked volumes dir", &[&escaped]);

    // The mount point itself is a symlink to a directory outside.
    let last = env.volume("last");
    let elsewhere = env.outside.join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, &last.target).expect("plant mount point link");
    let status = csi
        .publish(&last)
        .await
        .expect_err("publish onto a symlink");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_untouched(&env, "symlinked mount point", &[]);
    assert_eq!(
        fs::read_dir(&elsewhere).expect("list").count(),
        0,
        "files written through the symlink"
    );

    // Nothing outside the root was touched.
    let mut outside_entries: Vec<_> = walk(&env.outside);
    outside_entries.sort();
    assert_eq!(
        outside_entries,
        [
            env.outside.join("elsewhere"),
            env.outside.join("victim"),
            env.outside.join("victim/volumes"),
            env.outside.join("victim/volumes/kubernetes.io~csi"),
            env.outside.join("victim/volumes/kubernetes.io~csi/certs"),
        ]
    );

    // The kubelet did not create the parent: FailedPrecondition, nothing made.
    let orphan = env.volume_without_parent("orphan");
    let status = csi
        .publish(&orphan)
        .await
        .expect_err("publish without parent");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_untouched(
        &env,
        "missing parent",
        &[&env.root.join("pods").join(&orphan.pod.uid)],
    );

    // Unpublish validates too, and never removes anything outside.
    fs::write(env.outside.join("precious"), b"keep me").expect("precious file");
    for (volume_id, target, what) in [
        (
            "",
            last.target.to_string_lossy().into_owned(),
            "missing volume id",
        ),
        (last.id.as_str(), String::new(), "missing target path"),
        (
            last.id.as_str(),
            env.outside.to_string_lossy().into_owned(),
            "target outside the root",
        ),
        (
            "../csi-x",
            last.target.to_string_lossy().into_owned(),
            "bad volume id",
        ),
    ] {
        let status = csi
            .unpublish(volume_id, Path::new(&target))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    assert_eq!(
        fs::read(env.outside.join("precious")).expect("precious still there"),
        b"keep me"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("list") {
        let path = entry.expect("entry").path();
        out.push(path.clone());
        if fs::symlink_metadata(&path).expect("lstat").is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_and_unpublishes() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let volumes: Vec<Volume> = (0..24).map(|i| env.volume(&format!("par{i}"))).collect();

    let mut tasks = tokio::task::JoinSet::new();
    for volume in volumes.clone() {
        let csi = csi.clone();
        tasks.spawn(async move { csi.publish(&volume).await });
    }
    // The kubelet may retry a publish that is still running: identical
    // concurrent calls for one volume must give one mount, one certificate.
    let twin = env.volume("twin");
    for _ in 0..8 {
        let csi = csi.clone();
        let twin = twin.clone();
        tasks.spawn(async move { csi.publish(&twin).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("task").expect("publish");
    }

    let mut serials = HashSet::new();
    for volume in volumes.iter().chain([&twin]) {
        let snapshot =
            check_volume(&volume.target, &volume.files(), CheckTime::Now).expect("consistent");
        assert!(
            serials.insert(snapshot.leaf.serial_hex.clone()),
            "serial reused"
        );
        let at_target: Vec<_> = env
            .mounts()
            .into_iter()
            .filter(|m| m.mount_point == volume.target)
            .collect();
        assert_eq!(at_target.len(), 1, "{}: mounts {at_target:?}", volume.id);
    }
    assert_eq!(env.mounts().len(), 25);
    assert_eq!(env.state_files().len(), 25);
    let twin_serial = read_volume(&twin.target, &twin.files())
        .expect("read")
        .leaf
        .serial_hex;
    csi.publish(&twin).await.expect("republish");
    assert_eq!(
        read_volume(&twin.target, &twin.files())
            .expect("read")
            .leaf
            .serial_hex,
        twin_serial
    );

    let mut tasks = tokio::task::JoinSet::new();
    let targets: Vec<_> = volumes.iter().map(|v| v.target.clone()).collect();
    for volume in volumes.into_iter().chain([twin]) {
        let csi: Csi = csi.clone();
        tasks.spawn(async move { csi.unpublish_volume(&volume).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("task").expect("unpublish");
    }
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert!(env.state_files().is_empty(), "{:?}", env.state_files());
    for target in &targets {
        assert!(!target.exists(), "{} left", target.display());
    }
}

/// Mounts a tmpfs the way another driver (or an `emptyDir` in memory) would:
/// source `tmpfs`, not credlet's.
fn mount_foreign_tmpfs(dir: &Path) {
    use rustix::mount::{MountFlags, mount};
    fs::create_dir_all(dir).expect("create mount point");
    mount("tmpfs", dir, "tmpfs", MountFlags::NODEV, c"size=1m").expect("mount tmpfs");
}

/// Writes a file and a file in a subdirectory; returns their paths.
fn plant_data(dir: &Path) -> [std::path::PathBuf; 2] {
    let file = dir.join("data.txt");
    let nested = dir.join("sub/nested.txt");
    fs::create_dir_all(nested.parent().expect("parent")).expect("subdirectory");
    fs::write(&file, b"another volume's data").expect("file");
    fs::write(&nested, b"more of it").expect("nested file");
    [file, nested]
}

/// `NodeUnpublishVolume` with a volume id credlet never published: a mount
/// that is not credlet's stays mounted, a directory with files credlet did
/// not write keeps them, a volume credlet published under another id is
/// left alone; only an empty directory is removed, and a tmpfs credlet
/// mounted for a volume it no longer has a record of is unmounted.
#[tokio::test]
async fn unpublish_of_an_unknown_volume_destroys_nothing_it_did_not_write() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;

    // Another driver's tmpfs volume of some pod, with files.
    let foreign_mount = env.target_path("0f1e2d3c-7ad9-4cf1-other", "scratch");
    mount_foreign_tmpfs(&foreign_mount);
    let on_mount = plant_data(&foreign_mount);
    // A plain directory with files (another plugin's, or the kubelet's).
    let foreign_dir = env.target_path("0f1e2d3c-7ad9-4cf1-plain", "cache");
    fs::create_dir_all(&foreign_dir).expect("directory");
    let in_dir = plant_data(&foreign_dir);
    // A volume credlet published, asked for under an id it never saw.
    let owned = env.volume("owned");
    csi.publish(&owned).await.expect("publish");
    let before = check_volume(&owned.target, &owned.files(), CheckTime::Now).expect("volume");

    for target in [&foreign_mount, &foreign_dir, &owned.target] {
        csi.unpublish("csi-never-published", target)
            .await
            .unwrap_or_else(|status| panic!("{}: {status:?}", target.display()));
    }
    let mount = mount_at(&foreign_mount).expect("the other driver's tmpfs was unmounted");
    assert_eq!(mount.source, "tmpfs", "{mount:?}");
    for file in on_mount.iter().chain(&in_dir) {
        assert!(file.is_file(), "{} was deleted", file.display());
    }
    let after = check_volume(&owned.target, &owned.files(), CheckTime::Now)
        .expect("the published volume survived");
    assert_eq!(after.leaf.serial_hex, before.leaf.serial_hex);
    assert!(
        env.log().contains("not credlet's"),
        "the refusal to touch foreign data is not logged"
    );

    // An empty directory is removed (the kubelet expects the target gone).
    let empty = env.volume("empty");
    fs::create_dir(&empty.target).expect("empty target");
    csi.unpublish("csi-never-published", &empty.target)
        .await
        .expect("unpublish an empty target");
    assert!(!empty.target.exists(), "the empty target was left");

    // A volume whose record is gone (deleted while the agent was down):
    // its tmpfs is credlet's, so it is unmounted and its directory removed.
    let orphan = env.volume("orphan");
    csi.publish(&orphan).await.expect("publish");
    drop(csi);
    assert!(env.stop().await.success());
    fs::remove_file(env.state_file(&orphan.id)).expect("remove the record");
    let csi = env.start().await;
    assert_eq!(
        mount_at(&orphan.target).expect("still mounted").source,
        "credlet"
    );
    csi.unpublish_volume(&orphan).await.expect("unpublish");
    assert!(mount_at(&orphan.target).is_none(), "credlet's tmpfs left");
    assert!(!orphan.target.exists(), "target directory left behind");

    csi.unpublish_volume(&owned).await.expect("unpublish");
    assert!(!owned.target.exists());
    rustix::mount::unmount(&foreign_mount, rustix::mount::UnmountFlags::DETACH).expect("unmount");
}

/// Runs `command` to its end (at most 30 s), capturing its output.
fn output_within(mut command: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn inode(path: &Path) -> u64 {
    fs::symlink_metadata(path).expect("stat socket").ino()
}

/// A second agent started with the same flags as a live one: it refuses
/// the socket (exit 64, one line) before touching the state directory, and
/// the first keeps serving its volumes on the same socket.
#[tokio::test]
async fn a_second_agent_does_not_take_a_live_socket() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let volume = env.volume("kept");
    csi.publish(&volume).await.expect("publish");
    let serial = check_volume(&volume.target, &volume.files(), CheckTime::Now)
        .expect("consistent")
        .leaf
        .serial_hex;
    let socket = inode(&env.socket);

    let mut second = env.command();
    second.args(env.agent_args());
    let output = output_within(second);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "credlet: --csi-endpoint (CREDLET_CSI_ENDPOINT): {} is served by another running process; stop it first or choose another path\n",
            env.socket.display()
        )
    );

    assert_eq!(inode(&env.socket), socket, "the socket was replaced");
    assert_eq!(csi.probe().await.expect("Probe"), Some(true));
    let fresh = Csi::connect(&env.socket).await.expect("connect anew");
    assert_eq!(fresh.probe().await.expect("Probe"), Some(true));
    let after = check_volume(&volume.target, &volume.files(), CheckTime::Now).expect("consistent");
    assert_eq!(after.leaf.serial_hex, serial);
    assert!(env.state_file(&volume.id).exists(), "the record is gone");
    csi.publish(&env.volume("after"))
        .await
        .expect("publish after");
    drop((csi, fresh));
    assert!(env.stop().await.success());
    assert!(!env.socket.exists(), "the agent leaves its own socket");
}

/// A socket file nobody listens on (an agent killed with SIGKILL) is
/// replaced at start.
#[tokio::test]
async fn a_stale_socket_is_replaced() {
    let mut env = TestEnv::new(agent_bin!());
    fs::create_dir_all(env.socket.parent().expect("parent")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(&env.socket).expect("bind"));
    assert!(std::os::unix::net::UnixStream::connect(&env.socket).is_err());
    let csi = env.start().await;
    assert_eq!(csi.probe().await.expect("Probe"), Some(true));

    // And after a SIGKILL, the next start replaces what it left.
    drop(csi);
    env.kill();
    assert!(env.socket.exists(), "SIGKILL leaves the socket file");
    let csi = env.start().await;
    assert_eq!(csi.probe().await.expect("Probe"), Some(true));
}

/// The first agent's socket disappears (a cleaned directory) and a newer
/// agent binds the path: when the first one exits, it leaves the newer
/// one's socket in place.
#[tokio::test]
async fn an_exiting_agent_leaves_a_newer_agents_socket() {
    let mut first = TestEnv::new(agent_bin!());
    let first_csi = first.start().await;
    fs::remove_file(&first.socket).expect("remove the first socket");

    let mut newer = TestEnv::new(agent_bin!());
    newer.socket = first.socket.clone();
    let newer_csi = newer.start().await;
    let socket = inode(&newer.socket);

    drop(first_csi);
    assert!(first.stop().await.success());
    assert_eq!(inode(&newer.socket), socket, "the first agent removed it");
    assert_eq!(newer_csi.probe().await.expect("Probe"), Some(true));
    let fresh = Csi::connect(&newer.socket).await.expect("connect anew");
    assert_eq!(fresh.probe().await.expect("Probe"), Some(true));
    drop((newer_csi, fresh));
    assert!(newer.stop().await.success());
    assert!(
        !newer.socket.exists(),
        "the newer agent removes its own socket"
    );
}
