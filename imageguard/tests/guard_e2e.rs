//! End-to-end tests of the image guard: credlet's CRI proxy in front of a
//! real containerd, real CNCF distribution registries (htpasswd and token
//! auth) with private images, the node's pods in a fake API server, and a
//! CRI client playing the kubelet.
//!
//! The kubelet's order for a pod (kuberuntime `SyncPod`): `RunPodSandbox`,
//! then per container `EnsureImageExists` (`ImageStatus`, then `PullImage`
//! with the pod's credentials and sandbox config unless the image is present
//! under `IfNotPresent`, or ErrImageNeverPull under `Never`),
//! `CreateContainer` (image by the ref `EnsureImageExists` returned, sandbox
//! config alongside), `StartContainer`.
//!
//! Needs root and the packages of `test-util/install-deps.sh`.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credlet_imageguard::guard::{GuardMetrics, Outcome};
use credlet_imageguard::policy::{GuardPolicy, Mode, Provenance, VerifyPolicy};
use credlet_imageguard::proxy::{PassThrough, Rpc};
use credlet_imageguard::reference::Allowlist;
use credlet_test_util::cri::v1::{
    ContainerStatusRequest, GetEventsRequest, ImageFsInfoRequest, ListContainerStatsRequest,
    ListContainersRequest, ListImagesRequest, ListPodSandboxRequest, ListPodSandboxStatsRequest,
    PodSandboxStatusRequest, StatusRequest, VersionRequest,
};
use credlet_test_util::{ANYONE, Containerd, Grant, Registry, build_and_push_image};
use support::{
    Cluster, Kubelet, KubeletError, NODE, Proxy, assert_status, auth, blocking, guard,
    kubelet_status, open_records, traffic, verifier,
};
use tonic::Code;

const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");
const CAROL: (&str, &str) = ("carol", "carol-secret");
const DAVE: (&str, &str) = ("dave", "dave-secret");

/// The decision counters as a map, zeros left out: compared whole, so an
/// unexpected decision fails the test.
fn decisions(metrics: &GuardMetrics) -> HashMap<(Rpc, Outcome), u64> {
    let rpcs = [Rpc::ImageStatus, Rpc::PullImage, Rpc::CreateContainer];
    let outcomes = [
        Outcome::Allowed,
        Outcome::Verified,
        Outcome::VerifiedCached,
        Outcome::Pulled,
        Outcome::Hidden,
        Outcome::Denied,
        Outcome::AuditDenied,
        Outcome::Unavailable,
    ];
    let mut map = HashMap::new();
    for rpc in rpcs {
        for outcome in outcomes {
            let n = metrics.count(rpc, outcome);
            if n > 0 {
                map.insert((rpc, outcome), n);
            }
        }
    }
    map
}

fn counts(entries: &[(Rpc, Outcome, u64)]) -> HashMap<(Rpc, Outcome), u64> {
    entries.iter().map(|&(r, o, n)| ((r, o), n)).collect()
}

/// Cases 1, 2, 3 and 5: who may use a cached private image under the
/// default policy (`NeverVerifyPreloadedImages`, enforcing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_decide_who_may_use_a_cached_private_image() {
    let t0 = Instant::now();
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE, BOB])).expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("push");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let image = app.reference.as_str();
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let (records, dropped) = open_records(state.path());
    assert_eq!(dropped, 0);
    let (inspector, metrics) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    let ready = t0.elapsed();

    let a = cluster
        .add_pod(
            "team",
            "pod-a",
            &[(image, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let b = cluster
        .add_pod(
            "team",
            "pod-b",
            &[(image, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let b2 = cluster
        .add_pod(
            "other",
            "pod-b2",
            &[(image, "IfNotPresent")],
            Some(auth(BOB.0, BOB.1)),
        )
        .await;
    let mut sandboxes = Vec::new();

    // --- 1. pod A, right credentials, image absent: a forwarded pull.
    let sandbox_a = kubelet.run_sandbox(&a).await;
    sandboxes.push(sandbox_a.clone());
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "absent before any pull"
    );
    let before = blocking(|| traffic(&registry, &app.name));
    let image_ref = kubelet.pull(image, &a).await.expect("pod A pulls");
    assert_eq!(image_ref, app.config_digest);
    let pulled = blocking(|| traffic(&registry, &app.name)) - before;
    assert!(
        pulled.blob_gets >= 2,
        "config and layer downloaded: {pulled:?}"
    );
    let record = records.get(&app.config_digest).expect("record of the pull");
    assert_eq!(record.provenance, Provenance::Credentials);
    assert!(record.repositories.contains(&app.repository), "{record:?}");
    assert!(record.grants.contains_key(&a.uid), "{record:?}");
    let id_a = kubelet
        .create_container(&a, &sandbox_a, "app", &image_ref, image)
        .await
        .expect("CreateContainer A");
    kubelet
        .start_container(&id_a)
        .await
        .expect("StartContainer A");

    // Pod B, the same (right) credentials, image cached: ImageStatus hides it
    // (B holds no verification), PullImage is answered by credlet with the
    // existing image. The credential was proven by A's pull moments ago
    // (within the TTL), so not even a HEAD is needed; nothing is downloaded.
    let sandbox_b = kubelet.run_sandbox(&b).await;
    sandboxes.push(sandbox_b.clone());
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "hidden from unverified pod B"
    );
    let before = blocking(|| traffic(&registry, &app.name));
    let started = Instant::now();
    let id_b = kubelet
        .start_container_of(&b, &sandbox_b, "app", image, "IfNotPresent")
        .await
        .expect("pod B starts");
    let b_took = started.elapsed();
    assert_eq!(
        blocking(|| traffic(&registry, &app.name)) - before,
        Default::default(),
        "same credential within the TTL: no registry request at all"
    );

    // Pod B2, other right credentials: one check with a manifest HEAD, no
    // manifest GET, no blob. (This verifier's first contact with the
    // registry: an unauthenticated HEAD learns the Basic challenge first.)
    let sandbox_b2 = kubelet.run_sandbox(&b2).await;
    sandboxes.push(sandbox_b2.clone());
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "hidden from unverified pod B2"
    );
    let before = blocking(|| traffic(&registry, &app.name));
    assert_eq!(
        kubelet.pull(image, &b2).await.expect("pod B2 pull"),
        app.config_digest
    );
    let checked = blocking(|| traffic(&registry, &app.name)) - before;
    assert_eq!(
        (
            checked.manifest_heads_ok,
            checked.manifest_gets,
            checked.blob_gets
        ),
        (1, 0, 0),
        "{checked:?}"
    );
    assert!(checked.manifest_heads <= 2, "{checked:?}");
    let id_b2 = kubelet
        .create_container(&b2, &sandbox_b2, "app", &app.config_digest, image)
        .await
        .expect("CreateContainer B2");
    kubelet
        .start_container(&id_b2)
        .await
        .expect("StartContainer B2");
    // Every pod using the image is verified: ImageStatus tells the truth.
    assert_eq!(
        kubelet.image_id(image).await.as_deref(),
        Some(app.config_digest.as_str())
    );
    assert_eq!(
        decisions(&metrics),
        counts(&[
            (Rpc::PullImage, Outcome::Pulled, 1),
            (Rpc::PullImage, Outcome::VerifiedCached, 1),
            (Rpc::PullImage, Outcome::Verified, 1),
            (Rpc::ImageStatus, Outcome::Hidden, 3),
            (Rpc::CreateContainer, Outcome::Allowed, 3),
        ])
    );

    // --- 2. pod C, wrong credentials.
    let c = cluster
        .add_pod(
            "tenant-c",
            "pod-c",
            &[(image, "IfNotPresent")],
            Some(auth(ALICE.0, "not-the-password")),
        )
        .await;
    let sandbox_c = kubelet.run_sandbox(&c).await;
    sandboxes.push(sandbox_c.clone());
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "hidden while pod C is unverified"
    );
    let before = blocking(|| traffic(&registry, &app.name));
    let denied = kubelet_status(
        kubelet
            .start_container_of(&c, &sandbox_c, "app", image, "IfNotPresent")
            .await,
    );
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    for needle in ["pod tenant-c/pod-c", image, "not authorized"] {
        assert!(
            denied.message().contains(needle),
            "{needle:?}: {}",
            denied.message()
        );
    }
    let checked = blocking(|| traffic(&registry, &app.name)) - before;
    // The HEAD with the pod's credentials is refused; the verifier then
    // asks once anonymously whether the image is public. Nothing is fetched.
    assert_eq!(
        (
            checked.manifest_heads,
            checked.manifest_heads_ok,
            checked.manifest_gets,
            checked.blob_gets
        ),
        (2, 0, 0, 0),
        "{checked:?}"
    );
    // A kubelet that calls CreateContainer anyway (by id or by name) is refused.
    for by in [app.config_digest.as_str(), image] {
        assert_status(
            kubelet
                .create_container(&c, &sandbox_c, "app", by, image)
                .await,
            Code::FailedPrecondition,
            &["pod tenant-c/pod-c", "no verification"],
        );
    }
    let event = cluster.denial_event(&c, "not authorized").await;
    assert_eq!(event.reason.as_deref(), Some("CachedImageAccessDenied"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.involved_object.name.as_deref(), Some("pod-c"));
    assert_eq!(event.involved_object.namespace.as_deref(), Some("tenant-c"));
    assert!(
        event.message.as_deref().unwrap_or("").contains(image),
        "{event:?}"
    );
    assert_eq!(
        event.source.as_ref().and_then(|s| s.host.as_deref()),
        Some(NODE)
    );
    let events_text = format!("{:?}", cluster.api.events());
    assert!(!events_text.contains(ALICE.1) && !events_text.contains("not-the-password"));

    // --- 3. pod D, no credentials.
    let d = cluster
        .add_pod("tenant-d", "pod-d", &[(image, "IfNotPresent")], None)
        .await;
    let sandbox_d = kubelet.run_sandbox(&d).await;
    sandboxes.push(sandbox_d.clone());
    let denied = kubelet_status(
        kubelet
            .start_container_of(&d, &sandbox_d, "app", image, "IfNotPresent")
            .await,
    );
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("pod tenant-d/pod-d"),
        "{}",
        denied.message()
    );
    assert_status(
        kubelet
            .create_container(&d, &sandbox_d, "app", &app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &["pod tenant-d/pod-d"],
    );
    cluster.denial_event(&d, "not authorized").await;

    // --- 5. pod E, `imagePullPolicy: Never`, no verification: ImageStatus
    // says absent, so the kubelet reports ErrImageNeverPull.
    let e = cluster
        .add_pod("tenant-e", "pod-e", &[(image, "Never")], None)
        .await;
    let sandbox_e = kubelet.run_sandbox(&e).await;
    sandboxes.push(sandbox_e.clone());
    let never = kubelet
        .start_container_of(&e, &sandbox_e, "app", image, "Never")
        .await;
    assert!(matches!(never, Err(KubeletError::NeverPull)), "{never:?}");
    assert_status(
        kubelet
            .create_container(&e, &sandbox_e, "app", &app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &["pod tenant-e/pod-e"],
    );

    // The verified pods run, from one copy of the image, downloaded once.
    let images = direct
        .im
        .list_images(ListImagesRequest { filter: None })
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    assert_eq!(
        images.iter().filter(|i| i.id == app.config_digest).count(),
        1
    );
    let total = blocking(|| traffic(&registry, &app.name));
    assert_eq!(
        total.blob_gets, pulled.blob_gets,
        "only pod A's pull downloaded blobs"
    );
    let running = direct
        .rt
        .list_containers(ListContainersRequest { filter: None })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    let mut ids: Vec<&str> = running.iter().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = vec![id_a.as_str(), id_b.as_str(), id_b2.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "only the verified pods' containers exist");

    let m = decisions(&metrics);
    assert_eq!(m.get(&(Rpc::PullImage, Outcome::Denied)), Some(&2), "{m:?}");
    assert_eq!(
        m.get(&(Rpc::CreateContainer, Outcome::Denied)),
        Some(&4),
        "{m:?}"
    );
    assert_eq!(
        m.get(&(Rpc::CreateContainer, Outcome::Allowed)),
        Some(&3),
        "{m:?}"
    );
    assert!(
        m.get(&(Rpc::ImageStatus, Outcome::Hidden))
            .is_some_and(|n| *n >= 5),
        "{m:?}"
    );

    // Cleanup as the kubelet does it, through the proxy.
    for sandbox in &sandboxes {
        kubelet.remove_sandbox(sandbox).await;
    }
    let left = kubelet
        .rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(left.is_empty(), "{left:?}");
    proxy.stop().await;
    eprintln!(
        "set-up {ready:?}; pod B (same credential, cached) started in {b_took:?}; total {:?}",
        t0.elapsed()
    );
}

/// Case 6 and 7: each policy mode, the allowlist's trailing `/*` wildcard, a
/// per-namespace override and audit mode, for one pod without credentials
/// facing three cached images: one pulled through credlet with credentials,
/// one preloaded (pulled on containerd's own socket, credlet never saw it),
/// one pulled through credlet with credentials but allowlisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_namespace_overrides_and_audit_mode() {
    let t0 = Instant::now();
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let (app, pre, tools) = blocking(|| {
        (
            build_and_push_image(&registry, "team/app", "v1", ALICE).expect("push app"),
            build_and_push_image(&registry, "team/preloaded", "v1", ALICE).expect("push pre"),
            build_and_push_image(&registry, "base/tools", "v1", ALICE).expect("push tools"),
        )
    });
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let (records, _) = open_records(state.path());
    let verifier = verifier(&[&registry]);
    // Every guard below shares the records, the pod index and the Events.
    let socket = containerd.cri_socket().to_path_buf();
    let start = |policy: GuardPolicy| {
        let (inspector, metrics) = guard(
            policy,
            &records,
            &verifier,
            cluster.pod_index(),
            cluster.event_sink(),
        );
        let socket = socket.clone();
        async move { (Proxy::start(&socket, inspector).await, metrics) }
    };

    let owner = cluster
        .add_pod(
            "plain",
            "owner",
            &[
                (&app.reference, "IfNotPresent"),
                (&tools.reference, "IfNotPresent"),
            ],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let n = cluster
        .add_pod(
            "plain",
            "nocreds",
            &[
                (&app.reference, "IfNotPresent"),
                (&pre.reference, "IfNotPresent"),
                (&tools.reference, "IfNotPresent"),
            ],
            None,
        )
        .await;

    // The owner pulls app and tools through credlet (default policy).
    let (default_proxy, _) = start(GuardPolicy::default()).await;
    let mut kubelet = default_proxy.kubelet().await;
    let sandbox_owner = kubelet.run_sandbox(&owner).await;
    for img in [&app, &tools] {
        assert_eq!(
            kubelet
                .pull(&img.reference, &owner)
                .await
                .expect("owner pulls"),
            img.config_digest
        );
    }
    // The preloaded image reaches containerd without credlet.
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    assert_eq!(
        direct
            .pull_with(&pre.reference, None, Some(auth(ALICE.0, ALICE.1)))
            .await
            .expect("direct pull"),
        pre.config_digest
    );
    assert!(
        records.get(&pre.config_digest).is_none(),
        "credlet never saw the preload"
    );
    let sandbox_n = kubelet.run_sandbox(&n).await;

    let allowlist = Allowlist::parse([format!("{}/base/*", registry.host())]).expect("allowlist");
    assert!(Allowlist::parse(["/*"]).is_err(), "a bare /* is invalid");
    let with = |default: VerifyPolicy| GuardPolicy {
        default,
        allowlist: allowlist.clone(),
        ..GuardPolicy::default()
    };
    // Which of (app, preloaded, tools) each policy protects from `nocreds`.
    let table = [
        (VerifyPolicy::NeverVerify, [false, false, false]),
        (
            VerifyPolicy::NeverVerifyPreloadedImages,
            [true, false, true],
        ),
        (
            VerifyPolicy::NeverVerifyAllowlistedImages,
            [true, true, false],
        ),
        (VerifyPolicy::AlwaysVerify, [true, true, true]),
    ];
    for (policy, protected) in table {
        let (proxy, metrics) = start(with(policy)).await;
        let mut kubelet = proxy.kubelet().await;
        for (img, protected) in [&app, &pre, &tools].into_iter().zip(protected) {
            let what = format!("{policy}: {} protected={protected}", img.reference);
            let status = kubelet.image_id(&img.reference).await;
            let created = kubelet
                .create_container(&n, &sandbox_n, "c", &img.config_digest, &img.reference)
                .await;
            if protected {
                assert_eq!(status, None, "{what}: hidden");
                assert_status(created, Code::FailedPrecondition, &["plain/nocreds"]);
                assert_status(
                    kubelet.pull(&img.reference, &n).await,
                    Code::PermissionDenied,
                    &["plain/nocreds", &img.reference],
                );
            } else {
                assert_eq!(
                    status.as_deref(),
                    Some(img.config_digest.as_str()),
                    "{what}: present"
                );
                let id = created.unwrap_or_else(|e| panic!("{what}: {e:?}"));
                kubelet.remove_container(&id).await;
            }
        }
        let denied = protected.iter().filter(|p| **p).count() as u64;
        let m = decisions(&metrics);
        assert_eq!(
            m.get(&(Rpc::CreateContainer, Outcome::Denied))
                .copied()
                .unwrap_or(0),
            denied,
            "{policy}: {m:?}"
        );
        assert_eq!(
            m.get(&(Rpc::CreateContainer, Outcome::Allowed))
                .copied()
                .unwrap_or(0),
            3 - denied,
            "{policy}: {m:?}"
        );
        assert_eq!(
            m.get(&(Rpc::PullImage, Outcome::Denied))
                .copied()
                .unwrap_or(0),
            denied,
            "{policy}: {m:?}"
        );
        proxy.stop().await;
    }

    // A per-namespace override: AlwaysVerify, except NeverVerify in `trusted`.
    let trusted = cluster
        .add_pod(
            "trusted",
            "relaxed",
            &[(&app.reference, "IfNotPresent")],
            None,
        )
        .await;
    let sandbox_t = kubelet.run_sandbox(&trusted).await;
    let mut policy = with(VerifyPolicy::AlwaysVerify);
    policy
        .namespaces
        .insert("trusted".into(), VerifyPolicy::NeverVerify);
    let (proxy, metrics) = start(policy).await;
    let mut over = proxy.kubelet().await;
    // ImageStatus hides the image (pod nocreds uses it unverified), so the
    // kubelet pulls for the trusted pod, which has no credentials: credlet
    // answers with the cached image instead of asking containerd, whose
    // re-resolution would need credentials.
    assert_eq!(over.image_id(&app.reference).await, None);
    let before = blocking(|| traffic(&registry, &app.name));
    let id = over
        .start_container_of(&trusted, &sandbox_t, "app", &app.reference, "IfNotPresent")
        .await
        .expect("trusted namespace: no verification needed");
    assert_eq!(
        blocking(|| traffic(&registry, &app.name)) - before,
        Default::default()
    );
    over.remove_container(&id).await;
    assert_status(
        over.create_container(&n, &sandbox_n, "app", &app.config_digest, &app.reference)
            .await,
        Code::FailedPrecondition,
        &["plain/nocreds"],
    );
    cluster.delete_pod(&n).await;
    assert_eq!(
        over.image_id(&app.reference).await.as_deref(),
        Some(app.config_digest.as_str()),
        "only verified or trusted pods use the image now"
    );
    let m = decisions(&metrics);
    assert_eq!(
        m.get(&(Rpc::PullImage, Outcome::Allowed)),
        Some(&1),
        "{m:?}"
    );
    assert_eq!(
        m.get(&(Rpc::CreateContainer, Outcome::Allowed)),
        Some(&1),
        "{m:?}"
    );
    assert_eq!(
        m.get(&(Rpc::CreateContainer, Outcome::Denied)),
        Some(&1),
        "{m:?}"
    );
    proxy.stop().await;

    // --- 7. audit mode: decided and counted as a denial, never blocked.
    let auditee = cluster
        .add_pod(
            "plain",
            "auditee",
            &[(&app.reference, "IfNotPresent")],
            Some(auth(ALICE.0, "not-the-password")),
        )
        .await;
    let sandbox_audit = kubelet.run_sandbox(&auditee).await;
    let (proxy, metrics) = start(GuardPolicy {
        mode: Mode::Audit,
        ..GuardPolicy::default()
    })
    .await;
    let mut audited = proxy.kubelet().await;
    // ImageStatus is not hidden, so the kubelet creates the container from
    // the cached image without pulling.
    let id = audited
        .start_container_of(
            &auditee,
            &sandbox_audit,
            "app",
            &app.reference,
            "IfNotPresent",
        )
        .await
        .expect("audit mode never blocks");
    // A pull with the wrong credentials goes on to containerd, whose own
    // resolution refuses it (gRPC Unknown, 401), not credlet.
    let pulled = audited.pull(&app.reference, &auditee).await;
    assert_status(pulled, Code::Unknown, &["401 Unauthorized"]);
    let m = decisions(&metrics);
    assert_eq!(
        m,
        counts(&[
            (Rpc::ImageStatus, Outcome::AuditDenied, 1),
            (Rpc::CreateContainer, Outcome::AuditDenied, 1),
            (Rpc::PullImage, Outcome::AuditDenied, 1),
        ])
    );
    let event = cluster.denial_event(&auditee, "audit mode").await;
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or("")
            .contains("not enforced"),
        "{event:?}"
    );
    audited.remove_container(&id).await;
    proxy.stop().await;

    for sandbox in [sandbox_owner, sandbox_n, sandbox_t, sandbox_audit] {
        kubelet.remove_sandbox(&sandbox).await;
    }
    default_proxy.stop().await;
    eprintln!("policies and audit: {:?}", t0.elapsed());
}

/// Cases 8, 9 and 10: positive verifications expire after the TTL and a new
/// credential is checked again; records survive a restart of the guard, a
/// corrupted record makes the guard verify again; a registry that is down
/// denies with `Unavailable`, a runtime that is down fails every call with
/// `Unavailable`. `AlwaysVerify`, so every decision below is credlet's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifications_expire_survive_restarts_and_fail_closed() {
    const TTL: Duration = Duration::from_secs(3);
    let t_start = Instant::now();
    let mut registry = blocking(|| Registry::start_basic_auth(&[ALICE, BOB])).expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("push");
    let mut containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let image = app.reference.as_str();
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let policy = |ttl| GuardPolicy {
        default: VerifyPolicy::AlwaysVerify,
        ttl,
        ..GuardPolicy::default()
    };
    let heads = |registry: &Registry| blocking(|| traffic(registry, &app.name)).manifest_heads;

    let v = cluster
        .add_pod(
            "team",
            "v",
            &[(image, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;

    // --- 8. TTL.
    let (records, _) = open_records(state.path());
    let (inspector, metrics) = guard(
        policy(TTL),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let sandbox_v = kubelet.run_sandbox(&v).await;
    assert_eq!(
        kubelet.pull(image, &v).await.expect("pull"),
        app.config_digest
    );
    let pulled_at = Instant::now();
    let id = kubelet
        .create_container(&v, &sandbox_v, "app", &app.config_digest, image)
        .await
        .expect("verified by its pull");
    kubelet.remove_container(&id).await;

    // Within the TTL: answered from the record, no registry request.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(pulled_at.elapsed())).await;
    let before = heads(&registry);
    kubelet.pull(image, &v).await.expect("cached");
    assert_eq!(heads(&registry), before, "within the TTL");
    assert_eq!(metrics.count(Rpc::PullImage, Outcome::VerifiedCached), 1);

    // Past the TTL of the verification (the cached answer at 1.5 s must not
    // have extended it): the pod's grant is gone, so ImageStatus hides the
    // image and CreateContainer refuses; the next PullImage asks the registry.
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(pulled_at.elapsed())).await;
    assert_eq!(kubelet.image_id(image).await, None, "grant expired");
    assert_status(
        kubelet
            .create_container(&v, &sandbox_v, "app", &app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &["team/v"],
    );
    let before = heads(&registry);
    kubelet.pull(image, &v).await.expect("verified again");
    assert!(heads(&registry) > before, "expired: checked again");
    assert_eq!(metrics.count(Rpc::PullImage, Outcome::Verified), 1);
    // A different credential for the same pod and image: checked again.
    let before = heads(&registry);
    kubelet
        .pull_with(image, Some(&v), Some(auth(BOB.0, BOB.1)))
        .await
        .expect("bob verified");
    assert_eq!(heads(&registry), before + 1, "new credential: one HEAD");
    assert_eq!(metrics.count(Rpc::PullImage, Outcome::Verified), 2);

    // --- 9. restart: the guard goes away, its records stay on disk.
    proxy.stop().await;
    drop(records);
    let (records, dropped) = open_records(state.path());
    assert_eq!(dropped, 0);
    let record = records.get(&app.config_digest).expect("record survived");
    assert_eq!(record.provenance, Provenance::Credentials);
    assert_eq!(record.verified.len(), 2, "alice and bob: {record:?}");
    // The record's head and every entry file (grants, verifications).
    let images = state.path().join("imageguard/images");
    let stem = app.config_digest.replace(':', "-");
    let mut on_disk =
        std::fs::read_to_string(images.join(format!("{stem}.json"))).expect("record file");
    for entry in std::fs::read_dir(images.join(format!("{stem}.d"))).expect("entries") {
        let path = entry.expect("entry").path();
        on_disk.push_str(&std::fs::read_to_string(&path).expect("entry file"));
    }
    assert!(
        !on_disk.contains(ALICE.1) && !on_disk.contains(BOB.1) && !on_disk.contains("alice"),
        "no credential on disk: {on_disk}"
    );
    let hour = Duration::from_secs(3600);
    let (inspector, metrics) = guard(
        policy(hour),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let v2 = cluster
        .add_pod(
            "team",
            "v2",
            &[(image, "IfNotPresent")],
            Some(auth(BOB.0, BOB.1)),
        )
        .await;
    let sandbox_v2 = kubelet.run_sandbox(&v2).await;
    let before = heads(&registry);
    kubelet
        .start_container_of(&v2, &sandbox_v2, "app", image, "IfNotPresent")
        .await
        .expect("bob's verification survived the restart");
    assert_eq!(heads(&registry), before, "no HEAD after the restart");
    assert_eq!(metrics.count(Rpc::PullImage, Outcome::VerifiedCached), 1);
    assert_eq!(
        kubelet.image_id(image).await.as_deref(),
        Some(app.config_digest.as_str()),
        "v's and v2's grants survived"
    );

    // A corrupted record: replaced at the next start by one that keeps the
    // image private with nothing verified, so verify again.
    proxy.stop().await;
    drop(records);
    let file = state
        .path()
        .join("imageguard/images")
        .join(format!("{}.json", app.config_digest.replace(':', "-")));
    let text = std::fs::read_to_string(&file).expect("record file");
    std::fs::write(&file, &text[..text.len() / 2]).expect("garble");
    let (records, dropped) = open_records(state.path());
    assert_eq!(dropped, 1);
    let kept = records.get(&app.config_digest).expect("kept as private");
    assert!(kept.verified.is_empty() && kept.grants.is_empty());
    let (inspector, metrics) = guard(
        policy(hour),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    assert_eq!(
        kubelet.image_id(image).await,
        None,
        "grants lost with the record"
    );
    let before = blocking(|| traffic(&registry, &app.name));
    kubelet.pull(image, &v2).await.expect("verified again");
    let checked = blocking(|| traffic(&registry, &app.name)) - before;
    assert!(
        checked.manifest_heads_ok == 1 && checked.manifest_gets == 0,
        "{checked:?}"
    );
    assert_eq!(metrics.count(Rpc::PullImage, Outcome::Verified), 1);
    assert_status(
        kubelet
            .create_container(&v, &sandbox_v, "app", &app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &["team/v"],
    );

    // --- 10. the registry is down: an unverified credential is refused
    // with Unavailable; a credential verified within the TTL still works.
    blocking(|| registry.stop());
    let down = assert_status(
        kubelet.pull(image, &v).await,
        Code::Unavailable,
        &[
            "cannot verify pull credentials",
            image,
            "unreachable",
            "refusing",
        ],
    );
    eprintln!("registry down: {}", down.message());
    assert_eq!(metrics.count(Rpc::PullImage, Outcome::Unavailable), 1);
    cluster.denial_event(&v, "cannot verify").await;
    kubelet
        .pull(image, &v2)
        .await
        .expect("bob verified minutes ago");
    blocking(|| registry.restart()).expect("registry restart");
    kubelet.pull(image, &v).await.expect("registry back");
    assert_eq!(metrics.count(Rpc::PullImage, Outcome::Verified), 2);

    // The runtime is down: every call fails with Unavailable, inspected or not.
    blocking(|| containerd.stop());
    let mut calls: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "Version",
            kubelet
                .rt
                .version(VersionRequest {
                    version: "v1".into(),
                })
                .await
                .map(drop),
        ),
        (
            "ListImages",
            kubelet
                .im
                .list_images(ListImagesRequest { filter: None })
                .await
                .map(drop),
        ),
        ("ImageStatus", kubelet.image_status(image).await.map(drop)),
        ("PullImage", kubelet.pull(image, &v2).await.map(drop)),
        (
            "CreateContainer",
            kubelet
                .create_container(&v2, &sandbox_v2, "again", &app.config_digest, image)
                .await
                .map(drop),
        ),
    ];
    for (call, result) in calls.drain(..) {
        let status = result.expect_err(call);
        assert_eq!(status.code(), Code::Unavailable, "{call}: {status:?}");
        assert!(
            status.message().contains("unavailable"),
            "{call}: {}",
            status.message()
        );
    }
    // The proxy's pooled connections recover once the runtime is back.
    blocking(|| containerd.restart()).expect("containerd restart");
    let mut recovered = false;
    for _ in 0..100 {
        if kubelet
            .rt
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "proxy reconnects to the restarted runtime");
    for sandbox in [sandbox_v, sandbox_v2] {
        kubelet.remove_sandbox(&sandbox).await;
    }
    proxy.stop().await;
    eprintln!("ttl/restart/outages: {:?}", t_start.elapsed());
}

/// Cases 11 and 4: a token-auth registry (Bearer flow through the harness's
/// token endpoint): a user with a pull grant is verified, a valid user
/// without one is denied; an image pulled anonymously is public, so any pod
/// may use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_registry_grants_and_public_images() {
    let t0 = Instant::now();
    let registry = blocking(|| {
        Registry::start_token_auth(
            &[ALICE, CAROL, DAVE],
            &[
                Grant::new(ALICE.0, "team/app", &["pull", "push"]),
                Grant::new(DAVE.0, "team/app", &["pull"]),
                Grant::new(ALICE.0, "public/base", &["pull", "push"]),
                Grant::new(ANYONE, "public/base", &["pull"]),
            ],
        )
    })
    .expect("token registry");
    let (app, base) = blocking(|| {
        (
            build_and_push_image(&registry, "team/app", "v1", ALICE).expect("push app"),
            build_and_push_image(&registry, "public/base", "v1", ALICE).expect("push base"),
        )
    });
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let (records, _) = open_records(state.path());
    let (inspector, metrics) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let image = app.reference.as_str();

    // --- 11. alice pulls; carol (valid user, no grant) is denied; dave (grant)
    // is verified with a token and one HEAD.
    let a = cluster
        .add_pod(
            "team",
            "alice",
            &[(image, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let sandbox_a = kubelet.run_sandbox(&a).await;
    kubelet
        .start_container_of(&a, &sandbox_a, "app", image, "IfNotPresent")
        .await
        .expect("alice pulls and runs");

    let c = cluster
        .add_pod(
            "team",
            "carol",
            &[(image, "IfNotPresent")],
            Some(auth(CAROL.0, CAROL.1)),
        )
        .await;
    let sandbox_c = kubelet.run_sandbox(&c).await;
    let tokens_before = registry.token_requests().len();
    let denied = kubelet_status(
        kubelet
            .start_container_of(&c, &sandbox_c, "app", image, "IfNotPresent")
            .await,
    );
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    for needle in ["pod team/carol", image, "not authorized"] {
        assert!(
            denied.message().contains(needle),
            "{needle:?}: {}",
            denied.message()
        );
    }
    eprintln!("no grant: {}", denied.message());
    let tokens: Vec<_> = registry.token_requests().split_off(tokens_before);
    assert!(
        tokens
            .iter()
            .any(|t| t.user.as_deref() == Some("carol") && t.status == 200 && t.granted.is_empty()),
        "carol got a token without access: {tokens:?}"
    );
    assert_status(
        kubelet
            .create_container(&c, &sandbox_c, "app", &app.config_digest, image)
            .await,
        Code::FailedPrecondition,
        &["pod team/carol"],
    );
    cluster.denial_event(&c, "not authorized").await;
    cluster.delete_pod(&c).await;

    let d = cluster
        .add_pod(
            "team",
            "dave",
            &[(image, "IfNotPresent")],
            Some(auth(DAVE.0, DAVE.1)),
        )
        .await;
    let sandbox_d = kubelet.run_sandbox(&d).await;
    assert_eq!(kubelet.image_id(image).await, None, "hidden from dave");
    let before = blocking(|| traffic(&registry, &app.name));
    let tokens_before = registry.token_requests().len();
    kubelet
        .start_container_of(&d, &sandbox_d, "app", image, "IfNotPresent")
        .await
        .expect("dave is verified and runs");
    let checked = blocking(|| traffic(&registry, &app.name)) - before;
    assert_eq!(
        (
            checked.manifest_heads,
            checked.manifest_heads_ok,
            checked.manifest_gets,
            checked.blob_gets
        ),
        (1, 1, 0, 0),
        "Bearer challenge remembered: token, then one HEAD: {checked:?}"
    );
    let tokens: Vec<_> = registry.token_requests().split_off(tokens_before);
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(tokens[0].user.as_deref(), Some("dave"));
    assert!(
        tokens[0]
            .granted
            .iter()
            .any(|g| g.contains("team/app") && g.contains("pull")),
        "{tokens:?}"
    );
    assert_eq!(
        kubelet.image_id(image).await.as_deref(),
        Some(app.config_digest.as_str())
    );

    // --- 4. a public image pulled anonymously first: any pod may use it.
    let p = cluster
        .add_pod(
            "public",
            "first",
            &[(&base.reference, "IfNotPresent")],
            None,
        )
        .await;
    let sandbox_p = kubelet.run_sandbox(&p).await;
    kubelet
        .start_container_of(&p, &sandbox_p, "app", &base.reference, "IfNotPresent")
        .await
        .expect("anonymous pull of a public image");
    assert_eq!(
        records.get(&base.config_digest).map(|r| r.provenance),
        Some(Provenance::Anonymous)
    );
    let q = cluster
        .add_pod(
            "public",
            "second",
            &[(&base.reference, "IfNotPresent")],
            None,
        )
        .await;
    let r = cluster
        .add_pod(
            "public",
            "third",
            &[(&base.reference, "Never")],
            Some(auth(CAROL.0, CAROL.1)),
        )
        .await;
    let before = blocking(|| traffic(&registry, &base.name));
    for (pod, policy) in [(&q, "IfNotPresent"), (&r, "Never")] {
        assert_eq!(
            kubelet.image_id(&base.reference).await.as_deref(),
            Some(base.config_digest.as_str()),
            "a public image is never hidden"
        );
        let sandbox = kubelet.run_sandbox(pod).await;
        kubelet
            .start_container_of(pod, &sandbox, "app", &base.reference, policy)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", pod.key()));
        kubelet.remove_sandbox(&sandbox).await;
    }
    assert_eq!(
        blocking(|| traffic(&registry, &base.name)) - before,
        Default::default()
    );
    let m = decisions(&metrics);
    assert_eq!(
        m,
        counts(&[
            (Rpc::PullImage, Outcome::Pulled, 2),
            (Rpc::PullImage, Outcome::Verified, 1),
            (Rpc::PullImage, Outcome::Denied, 1),
            (Rpc::ImageStatus, Outcome::Hidden, 3),
            (Rpc::CreateContainer, Outcome::Denied, 1),
            (Rpc::CreateContainer, Outcome::Allowed, 5),
        ])
    );
    for sandbox in [sandbox_a, sandbox_c, sandbox_d, sandbox_p] {
        kubelet.remove_sandbox(&sandbox).await;
    }
    proxy.stop().await;
    eprintln!("token registry: {:?}", t0.elapsed());
}

/// A record that cannot be read must count as "no verification" under the
/// default policy too (fail closed): the image stays protected instead of
/// looking preloaded, which `NeverVerifyPreloadedImages` would let any pod
/// use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_record_keeps_the_image_protected_under_the_default_policy() {
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("push");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let start = |records| {
        let (inspector, _) = guard(
            GuardPolicy::default(),
            &records,
            &verifier(&[&registry]),
            cluster.pod_index(),
            cluster.event_sink(),
        );
        Proxy::start(containerd.cri_socket(), inspector)
    };
    let owner = cluster
        .add_pod(
            "a",
            "owner",
            &[(&app.reference, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let other = cluster
        .add_pod("b", "other", &[(&app.reference, "IfNotPresent")], None)
        .await;
    let proxy = start(open_records(state.path()).0).await;
    let mut kubelet = proxy.kubelet().await;
    kubelet
        .pull(&app.reference, &owner)
        .await
        .expect("owner pulls");
    let sandbox = kubelet.run_sandbox(&other).await;
    proxy.stop().await;

    let file = state
        .path()
        .join("imageguard/images")
        .join(format!("{}.json", app.config_digest.replace(':', "-")));
    std::fs::write(&file, b"{\"record\":").expect("garble");
    let (records, dropped) = open_records(state.path());
    assert_eq!(dropped, 1);
    let proxy = start(records).await;
    let mut kubelet = proxy.kubelet().await;
    assert_eq!(kubelet.image_id(&app.reference).await, None, "still hidden");
    assert_status(
        kubelet
            .create_container(&other, &sandbox, "app", &app.config_digest, &app.reference)
            .await,
        Code::FailedPrecondition,
        &["b/other"],
    );
    kubelet.remove_sandbox(&sandbox).await;
    proxy.stop().await;
}

/// Compares one CRI answer direct vs through the proxy: equal messages
/// (after `normalize`), or the same gRPC code and message.
fn same<T: serde::Serialize + std::fmt::Debug>(
    call: &str,
    direct: Result<tonic::Response<T>, tonic::Status>,
    proxied: Result<tonic::Response<T>, tonic::Status>,
    normalize: fn(&mut serde_json::Value),
) {
    match (direct, proxied) {
        (Ok(d), Ok(p)) => {
            let mut d = serde_json::to_value(d.into_inner()).expect("json");
            let mut p = serde_json::to_value(p.into_inner()).expect("json");
            normalize(&mut d);
            normalize(&mut p);
            assert_eq!(d, p, "{call}: direct vs proxied");
        }
        (Err(d), Err(p)) => {
            assert_eq!(
                (d.code(), d.message()),
                (p.code(), p.message()),
                "{call}: errors differ"
            );
        }
        (d, p) => panic!("{call}: direct {d:?} vs proxied {p:?}"),
    }
}

fn as_is(_: &mut serde_json::Value) {}

/// Drops what legitimately changes between two calls: sample times and
/// resource usage figures.
fn without_samples(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for key in [
                "timestamp",
                "cpu",
                "memory",
                "swap",
                "writable_layer",
                "io",
                "linux",
                "windows",
            ] {
                map.remove(key);
            }
            map.values_mut().for_each(without_samples);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(without_samples),
        _ => {}
    }
}

/// Case 12: ordinary CRI calls give the same answers through the proxy (with
/// the image guard deciding) as directly from containerd, errors and RPCs
/// containerd 1.6 does not implement included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_is_transparent() {
    let containerd = blocking(Containerd::start).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let (records, _) = open_records(state.path());
    // No registry is contacted here; the verifier just needs a trust anchor.
    let ca = credlet_test_util::TestCa::new("unused").expect("ca");
    let verifier = Arc::new(
        credlet_imageguard::registry::RegistryVerifier::new(
            credlet_imageguard::registry::RegistryVerifierConfig {
                extra_root_pems: vec![ca.cert_pem().to_string()],
                use_system_roots: false,
                ..Default::default()
            },
        )
        .expect("verifier"),
    );
    let (inspector, metrics) = guard(
        GuardPolicy::default(),
        &records,
        &verifier,
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let passthrough = Proxy::start(containerd.cri_socket(), Arc::new(PassThrough)).await;
    let mut d = Kubelet::connect(containerd.cri_socket()).await;
    let mut p = proxy.kubelet().await;
    let mut pt = passthrough.kubelet().await;

    // Something to list: a running pod with one container (pause image).
    let pod = cluster
        .add_pod(
            "team",
            "listed",
            &[(containerd.pause_image(), "IfNotPresent")],
            None,
        )
        .await;
    let sandbox = d.run_sandbox(&pod).await;
    let pause = containerd.pause_image();
    let ctr = d
        .start_container_of(&pod, &sandbox, "app", pause, "IfNotPresent")
        .await
        .expect("container");

    for p in [&mut p, &mut pt] {
        same(
            "Version",
            d.rt.version(VersionRequest {
                version: "v1".into(),
            })
            .await,
            p.rt.version(VersionRequest {
                version: "v1".into(),
            })
            .await,
            as_is,
        );
        for verbose in [false, true] {
            same(
                "Status",
                d.rt.status(StatusRequest { verbose }).await,
                p.rt.status(StatusRequest { verbose }).await,
                as_is,
            );
        }
        same(
            "ListImages",
            d.im.list_images(ListImagesRequest { filter: None }).await,
            p.im.list_images(ListImagesRequest { filter: None }).await,
            as_is,
        );
        for image in [
            pause,
            "127.0.0.1:1/absent:v1",
            containerd.pause_image_id(),
            "Not A Reference",
        ] {
            let request = || credlet_test_util::cri::v1::ImageStatusRequest {
                image: Some(support::spec(image)),
                verbose: true,
            };
            same(
                "ImageStatus",
                d.im.image_status(request()).await,
                p.im.image_status(request()).await,
                as_is,
            );
        }
        same(
            "ImageFsInfo",
            d.im.image_fs_info(ImageFsInfoRequest {}).await,
            p.im.image_fs_info(ImageFsInfoRequest {}).await,
            without_samples,
        );
        same(
            "ListPodSandbox",
            d.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await,
            p.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await,
            as_is,
        );
        let request = || PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: true,
        };
        same(
            "PodSandboxStatus",
            d.rt.pod_sandbox_status(request()).await,
            p.rt.pod_sandbox_status(request()).await,
            as_is,
        );
        same(
            "ListContainers",
            d.rt.list_containers(ListContainersRequest { filter: None })
                .await,
            p.rt.list_containers(ListContainersRequest { filter: None })
                .await,
            as_is,
        );
        for id in [ctr.as_str(), "no-such-container"] {
            let request = || ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            };
            same(
                "ContainerStatus",
                d.rt.container_status(request()).await,
                p.rt.container_status(request()).await,
                as_is,
            );
        }
        same(
            "ListContainerStats",
            d.rt.list_container_stats(ListContainerStatsRequest { filter: None })
                .await,
            p.rt.list_container_stats(ListContainerStatsRequest { filter: None })
                .await,
            without_samples,
        );
        same(
            "ListPodSandboxStats",
            d.rt.list_pod_sandbox_stats(ListPodSandboxStatsRequest { filter: None })
                .await,
            p.rt.list_pod_sandbox_stats(ListPodSandboxStatsRequest { filter: None })
                .await,
            without_samples,
        );
        // Newer RPCs than containerd 1.6: its own answer, whatever it is.
        same(
            "RuntimeConfig",
            d.rt.runtime_config(credlet_test_util::cri::v1::RuntimeConfigRequest {})
                .await,
            p.rt.runtime_config(credlet_test_util::cri::v1::RuntimeConfigRequest {})
                .await,
            as_is,
        );
        same(
            "ListMetricDescriptors",
            d.rt.list_metric_descriptors(
                credlet_test_util::cri::v1::ListMetricDescriptorsRequest {},
            )
            .await,
            p.rt.list_metric_descriptors(
                credlet_test_util::cri::v1::ListMetricDescriptorsRequest {},
            )
            .await,
            as_is,
        );
        // A server-streaming RPC.
        let direct = d.rt.get_container_events(GetEventsRequest {}).await;
        let proxied = p.rt.get_container_events(GetEventsRequest {}).await;
        match (direct, proxied) {
            (Err(d), Err(p)) => {
                assert_eq!((d.code(), d.message()), (p.code(), p.message()));
                eprintln!("GetContainerEvents: {:?} {:?}", d.code(), d.message());
            }
            (Ok(_), Ok(mut stream)) => {
                let extra = d
                    .create_container(&pod, &sandbox, "evented", pause, pause)
                    .await
                    .expect("create");
                let event =
                    tokio::time::timeout(Duration::from_secs(10), stream.get_mut().message())
                        .await
                        .expect("an event through the proxy")
                        .expect("stream")
                        .expect("not ended");
                assert_eq!(event.container_id, extra, "{event:?}");
                d.remove_container(&extra).await;
            }
            (d, p) => panic!("GetContainerEvents: direct {d:?} vs proxied {p:?}"),
        }
    }
    // The guard inspected ImageStatus without changing anything.
    assert_eq!(
        decisions(&metrics),
        HashMap::new(),
        "no decision was needed: no pod uses a protected image"
    );
    d.remove_sandbox(&sandbox).await;
    proxy.stop().await;
    passthrough.stop().await;
}

/// Case 12, streaming: containerd 1.6 implements no server-streaming CRI
/// call, so a stand-in runtime streams `GetContainerEvents`: each message
/// must reach the kubelet as the runtime sends it (the second one is only
/// sent once the first arrived through the proxy), with the runtime's
/// headers and trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_calls_pass_through_as_they_arrive() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use prost::Message;

    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("runtime.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let go_on = Arc::new(tokio::sync::Notify::new());
    let notify = Arc::clone(&go_on);
    let runtime = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let go_on = Arc::clone(&notify);
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let go_on = Arc::clone(&go_on);
                    async move {
                        assert_eq!(
                            request.uri().path(),
                            "/runtime.v1.RuntimeService/GetContainerEvents"
                        );
                        let (tx, rx) = tokio::sync::mpsc::channel::<http_body::Frame<Bytes>>(4);
                        tokio::spawn(async move {
                            let frame = |id: &str| {
                                let msg = credlet_test_util::cri::v1::ContainerEventResponse {
                                    container_id: id.into(),
                                    ..Default::default()
                                };
                                let mut buf = vec![0u8];
                                buf.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
                                msg.encode(&mut buf).expect("encode");
                                http_body::Frame::data(Bytes::from(buf))
                            };
                            tx.send(frame("first")).await.expect("send");
                            go_on.notified().await;
                            tx.send(frame("second")).await.expect("send");
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().expect("value"));
                            trailers.insert("x-runtime-trailer", "kept".parse().expect("value"));
                            tx.send(http_body::Frame::trailers(trailers))
                                .await
                                .expect("send");
                        });
                        let body = http_body_util::StreamBody::new(futures_util::stream::unfold(
                            rx,
                            |mut rx| async move {
                                rx.recv()
                                    .await
                                    .map(|f| (Ok::<_, std::convert::Infallible>(f), rx))
                            },
                        ));
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("x-runtime-header", "kept")
                            .body(body.boxed())
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });

    let proxy = Proxy::start(&socket, Arc::new(PassThrough)).await;
    let mut kubelet = proxy.kubelet().await;
    let response = kubelet
        .rt
        .get_container_events(GetEventsRequest {})
        .await
        .expect("stream opens");
    assert_eq!(
        response
            .metadata()
            .get("x-runtime-header")
            .and_then(|v| v.to_str().ok()),
        Some("kept")
    );
    let mut stream = response.into_inner();
    assert_eq!(
        next(&mut stream).await.expect("first").container_id,
        "first"
    );
    go_on.notify_one();
    assert_eq!(
        next(&mut stream).await.expect("second").container_id,
        "second"
    );
    assert!(next(&mut stream).await.is_none(), "ended");
    let trailers = stream.trailers().await.expect("trailers").expect("present");
    assert_eq!(
        trailers
            .get("x-runtime-trailer")
            .and_then(|v| v.to_str().ok()),
        Some("kept")
    );
    proxy.stop().await;
    runtime.abort();
}

/// The next message of a stream, which must come within 5 s.
async fn next<T>(stream: &mut tonic::Streaming<T>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("message before the runtime sends more: not buffered")
        .expect("stream")
}
